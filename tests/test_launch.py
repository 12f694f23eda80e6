"""Launch scripts and the Dockerfile: valid bash, and every file or module they name exists in the repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*.slurm")])


def referenced_paths(text: str) -> set[str]:
    """Repository paths (configs/..., launch/..., docker/...) and python modules (-m / --module) a script names."""
    pattern = r"(?<![\w/.-])((?:configs|launch|docker|benchmarks)/[\w./-]+\.(?:yaml|json|sh|slurm|py|example))"
    paths = set(re.findall(pattern, text))
    for module in re.findall(r"(?:--module|-m)\s+([\w.]+)", text):
        if module.split(".")[0] in sys.stdlib_module_names:  # python3 -m venv in the Dockerfile
            continue
        stem = module.replace(".", "/")  # a module file, or a package run through its __main__.py
        paths.add(f"{stem}/__main__.py" if (ROOT / stem).is_dir() else f"{stem}.py")
    return paths


def test_there_are_launch_scripts():
    names = {path.name for path in SCRIPTS}
    assert {"pretrain_single_node.sh", "pretrain_multi_node.sh", "pretrain.slurm"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_references_exist(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '"$@"' in text, "extra key=value overrides must be forwarded"
    missing = [path for path in referenced_paths(text) if not (ROOT / path).exists()]
    assert not missing, f"{script.name} references missing files: {missing}"


def test_dockerfile_copies_and_references_exist():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M) for src in line.split()[:-1]
              if not src.startswith("--")]  # options such as --chmod=755
    assert {"setup.py", "earlybert_pretrain", "data_prep", "configs", "launch"} <= set(copied)
    missing = [src for src in copied if not (ROOT / src).exists()]
    missing += [path for path in referenced_paths(text) if not (ROOT / path).exists()]
    assert not missing, f"docker/Dockerfile references missing files: {missing}"
    assert "DS_BUILD_FUSED_LAMB=1" in text and 'TORCH_CUDA_ARCH_LIST="7.0;8.0;9.0"' in text  # more: test_docker.py


def test_hostfile_example_is_deepspeed_format():
    lines = [line for line in (ROOT / "launch" / "hostfile.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", line) for line in lines)
