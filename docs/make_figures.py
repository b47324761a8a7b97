"""Makes the figures of docs/data.md.

- docs/figures/synthetic_examples.png: one preprocessed ED mid-ventricular slice per vendor and pathology;
- docs/figures/synthetic_waterbirds.png: four images of each Waterbirds group from the synthetic stand-in.

Usage: python docs/make_figures.py [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles" / "shared"))  # the bundles' scripts

from monai_groupdistil.data import (
    MNMS_VENDOR_NAMES,
    MNMS_VENDORS,
    WATERBIRDS_GROUP_NAMES,
    load_mnms_datalist,
    load_waterbirds_datalist,
)
from scripts import cardiac_preprocessing, make_synthetic_mnms, make_synthetic_waterbirds

CLASSES = ("NOR", "HCM", "DCM")
OUTPUT = Path(__file__).resolve().parent / "figures" / "synthetic_examples.png"
WATERBIRDS_OUTPUT = OUTPUT.parent / "synthetic_waterbirds.png"


def waterbirds_figure(seed: int) -> None:
    """Four images per group of the synthetic Waterbirds stand-in (validation split: the groups are balanced)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_waterbirds(tmp, n_images=200, seed=seed)
        datalist = load_waterbirds_datalist(root, split="val")
        fig, axes = plt.subplots(4, 4, figsize=(8, 8.6))
        for row, name in enumerate(WATERBIRDS_GROUP_NAMES):
            entries = [d for d in datalist if d["group_name"] == name][:4]
            for col in range(4):
                ax = axes[row][col]
                ax.axis("off")
                if col < len(entries):
                    ax.imshow(Image.open(entries[col]["image"]))
                    ax.set_title(name, fontsize=8)
        fig.suptitle(f"Synthetic Waterbirds stand-in, 64 x 64 images (seed {seed})", fontsize=9)
        fig.tight_layout()
        fig.savefig(WATERBIRDS_OUTPUT, dpi=90)
    print(f"wrote {WATERBIRDS_OUTPUT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    balanced = {v: 0.25 for v in MNMS_VENDORS}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_mnms(
            tmp, n_subjects=36, seed=args.seed, vendor_fractions=balanced, split_fractions=(1.0, 0.0, 0.0)
        )
        datalist = load_mnms_datalist(root, split="train", classes=CLASSES)
        preprocess = cardiac_preprocessing(spatial_size=(96, 96), pixdim=(1.5, 1.5))
        fig, axes = plt.subplots(len(CLASSES), len(MNMS_VENDORS), figsize=(2.2 * len(MNMS_VENDORS), 2.3 * len(CLASSES)))
        for row, pathology in enumerate(CLASSES):
            for col, vendor in enumerate(MNMS_VENDORS):
                ax = axes[row][col]
                ax.axis("off")
                entry = next((d for d in datalist if d["vendor"] == vendor and d["pathology"] == pathology), None)
                if entry is None:
                    continue
                ax.imshow(preprocess(entry)["image"][0].numpy().T, cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{vendor} ({MNMS_VENDOR_NAMES[vendor]}) / {pathology}", fontsize=8)
        fig.suptitle(
            f"Synthetic M&Ms-layout data: preprocessed ED mid-ventricular slices (seed {args.seed})", fontsize=9
        )
        fig.tight_layout()
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(OUTPUT, dpi=110)
    print(f"wrote {OUTPUT}")
    waterbirds_figure(args.seed)


if __name__ == "__main__":
    main()
