"""EarlyBERT pre-training system: package metadata and console scripts."""

from setuptools import find_packages, setup

setup(
    name="earlybert-pretrain",
    version="0.1.0",
    description="EarlyBERT (Chen et al., ACL 2021): early-bird lottery tickets for efficient BERT "
    "pre-training and fine-tuning on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["earlybert_pretrain", "earlybert_pretrain.*", "data_prep", "data_prep.*"]),
    include_package_data=True,
    # torch: any 2.x release with SDPA admits the CPU pin 2.13.0 (see constraints-cpu.txt for why the pin matters).
    # NVIDIA Apex is optional and GPU-only; the PyPI package named "apex" is unrelated and must never be installed.
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "datasets>=2.18",
        "tokenizers>=0.15",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "mwparserfromhell==0.7.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-randomly>=3.15", "ruff>=0.5", "scipy>=1.10", "scikit-learn>=1.3"],
    },
    entry_points={
        "console_scripts": [
            "earlybert-pretrain=earlybert_pretrain.pretrain.cli:main",
            "earlybert-ticket=earlybert_pretrain.tickets.cli:main",
            "earlybert-finetune=earlybert_pretrain.finetune.cli:main",
            "earlybert-downstream=earlybert_pretrain.finetune.downstream_cli:main",
            "earlybert-prep=data_prep.cli:main",
        ]
    },
)
