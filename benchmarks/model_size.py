"""Parameter count and inference speed of a bundle's student relative to its teacher, in one process.

Both networks are built from the bundle's own ``network_def`` and ``teacher_def`` (no weights needed), then timed
interleaved on the same random batch (median of ``--repeats`` forward passes under ``torch.no_grad()``).

Usage: python benchmarks/model_size.py [--bundle bundles/cardiac_mri_groupdistil] [--batch 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def build(bundle: Path, key: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    parser["num_classes"] = 2 if "waterbirds" in bundle.name else 3
    return parser.get_parsed_content(key).eval()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--bundle", default=str(ROOT / "bundles" / "cardiac_mri_groupdistil"))
    args.add_argument("--batch", type=int, default=16)
    args.add_argument("--repeats", type=int, default=30)
    args.add_argument("--threads", type=int, default=0)
    opts = args.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    bundle = Path(opts.bundle)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    size = parser["spatial_size"]
    channels = parser["network_def"]["n_input_channels"]
    nets = {"student": build(bundle, "network_def"), "teacher": build(bundle, "teacher_def")}
    x = torch.rand(opts.batch, channels, *size)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for _ in range(3):
            for net in nets.values():
                net(x)
        for _ in range(opts.repeats):
            for name, net in nets.items():
                start = time.perf_counter()
                net(x)
                times[name].append(time.perf_counter() - start)
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"bundle {bundle.name}, input {opts.batch}x{channels}x{'x'.join(map(str, size))}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for name in nets:
        print(f"{name:8s} parameters {params[name]:>10,d}   forward {1e3 * median[name]:8.2f} ms per batch")
    print(
        f"student / teacher: parameters {params['student'] / params['teacher']:.3f}x, "
        f"inference time {median['student'] / median['teacher']:.3f}x "
        f"(speed-up {median['teacher'] / median['student']:.1f}x)"
    )


if __name__ == "__main__":
    main()
