from pathlib import Path

from setuptools import find_packages, setup


DEMO_REQUIRES = ["gradio>=6,<7"]
# the reference implementations the panoptic and instance metrics are tested against
METRIC_REFERENCES = ["torchmetrics>=1.4", "faster-coco-eval>=1.6"]
# the documentation site (mkdocs.yml); the tests build it, so the test extra includes it
DOCS_REQUIRES = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings-python>=1.10"]

setup(
    name="maft",
    version="0.1.0.dev0",
    description="MAFT (Mask-aware Fine-Tuning of CLIP) for open-vocabulary semantic segmentation, with the transformers API",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["maft", "maft.*"]),
    package_data={"maft": ["data/*", "kernels/csrc/*", "metrics/mean_iou/*.py", "pretrained/**/*", "training/accelerate_configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "evaluate>=0.4",
        "ninja>=1.11",
        "pillow>=10",
        "numpy>=1.26",
        "scipy>=1.11",
        "tqdm>=4.66",
        # COCO mask AP (`maft evaluate --task instance`)
        "pycocotools>=2.0.7",
    ],
    extras_require={
        "demo": DEMO_REQUIRES,
        "docs": DOCS_REQUIRES,
        # the demo's browser test drives Debian's chromium (/usr/bin/chromium) with Playwright
        "test": ["pytest>=8", *DEMO_REQUIRES, "playwright>=1.40", *METRIC_REFERENCES, *DOCS_REQUIRES],
        "dev": ["pytest>=8", "ruff"],
    },
    entry_points={"console_scripts": ["maft=maft.cli:main"]},
)
