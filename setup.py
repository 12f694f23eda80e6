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
    # Each lower bound is a version the suite passes with: constraints-oldest.txt pins all of them and `make test`
    # runs the suite there too (tests/test_docker.py checks the two agree). torch 2.11 + transformers 5.17 is what
    # common GPU images carry. Newer releases: see the README's "Tested versions". Without a GPU, install with
    # -c constraints-cpu.txt (the CPU torch build; any looser torch spec pulls the CUDA build and several GB).
    # NVIDIA Apex is optional and GPU-only; the PyPI package named "apex" is unrelated and must never be installed.
    install_requires=[
        "torch>=2.11",
        "deepspeed>=0.19.8",
        "transformers>=5.17",
        "datasets>=2.21",
        "tokenizers>=0.23.1",
        "numpy>=2.0.2",
        "tensorboard>=2.18",
        "safetensors>=0.8",
        "pyyaml>=6.0",
        "tqdm>=4.66.3",
        "matplotlib>=3.9",
        "mwparserfromhell==0.7.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-randomly>=3.15", "ruff>=0.5", "scipy>=1.13", "scikit-learn>=1.4.2"],
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
