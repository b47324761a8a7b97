"""Packaging for monai-groupdistil (setuptools)."""

import os
import re

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "monai_groupdistil", "__init__.py"), encoding="utf-8") as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="monai-groupdistil",
    version=version,
    description="Group distributionally robust knowledge distillation (GroupDistil) for MONAI",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["monai_groupdistil", "monai_groupdistil.*"]),
    install_requires=[
        "torch>=2.4",
        "monai[fire]>=1.6.0",  # the lowest version the library tests pass on (.ci/run runs them against it)
        "pytorch-ignite>=0.4.11",
        "numpy>=1.24",
        "nibabel>=5.0",
        "SimpleITK>=2.2",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "tqdm>=4.60",
        "scipy>=1.10",  # MONAI's HausdorffDistanceMetric (HD95 of the segmentation bundle)
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.12"],
        # experiment tracking with `python -m monai.bundle run ... --tracking mlflow` (docs/operations.md);
        # tested with 3.17.2; MLflow 3.13+ refuses file stores, the bundles default to SQLite
        "mlflow": ["mlflow>=3.17,<4"],
        # the documentation site with the API reference: mkdocs build --strict (scripts/run_tests.sh); builds with
        # mkdocs 1.6.0-1.6.1, mkdocstrings 1.0.7-1.0.8 (older ones fail with pymdown-extensions 13) and
        # mkdocstrings-python 2.0.0-2.0.11
        "docs": ["mkdocs>=1.6,<2", "mkdocstrings[python]>=1.0.7,<2", "mkdocstrings-python>=2.0,<3"],
        "test": [
            "pytest>=7.0",
            "pytest-timeout>=2.1",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "tensorboard>=2.12",
            "itk>=5.3",
            "jsonschema>=4.0",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
