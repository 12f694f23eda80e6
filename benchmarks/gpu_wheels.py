"""The wheels benchmarks/gpu_kit.sh installs on a bare CUDA machine (Python and torch, no DeepSpeed, no network).

    python benchmarks/gpu_wheels.py prepare [--python-version 3.12] [--dest .whl]     (here, with network)
    python benchmarks/gpu_wheels.py install --dest .whl --target DIR                  (there, without)

``prepare`` builds DeepSpeed's pure-Python wheel (``pip wheel --no-deps``, DS_BUILD_OPS=0: no op is compiled, and the
project's fused paths fall back to torch) and downloads, without their dependencies, the binary wheels of everything
else in ``KIT`` for the target Python on manylinux x86_64, each at its version in docker/constraints-cuda.txt (the
pins of a tested environment). It copies the Wikipedia sample beside them (the tiny recipe's data) and refuses a set
over ``MAX_BYTES`` (the device copies at most 64 MB). The folder is git-ignored: wheels are never committed.

``install`` adds only what the machine lacks: a wheel whose distribution is already installed (any version) is left
out, so the machine's own torch, numpy and transformers stay as they are; the rest go into ``--target`` with
``pip install --no-index --no-deps`` (put it on PYTHONPATH). KIT assumes what the project needs beside torch and
transformers' own dependencies (numpy, safetensors, tokenizers, PyYAML, packaging, tqdm): ``install`` names any of
``ASSUMED`` the machine lacks, in one line, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "docker" / "constraints-cuda.txt"
MAX_BYTES = 60 * 10**6
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# DeepSpeed and its run-time dependencies; then what the recipe, the data preparation and the tests import that a
# torch + transformers machine lacks: the ticket heatmap and report (matplotlib), TensorBoard's event writer (the
# tensorboard package and protobuf; its server's dependencies are not needed), the Wikipedia parser and pytest.
KIT = (
    "deepspeed", "hjson", "msgpack", "ninja", "nvidia-ml-py", "py-cpuinfo", "psutil", "pydantic", "pydantic-core",
    "annotated-types", "typing-inspection", "einops",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "python-dateutil",
    "tensorboard", "protobuf", "absl-py",
    "mwparserfromhell",
    "pytest", "iniconfig", "pluggy", "pygments",
)
ASSUMED = ("torch", "numpy", "transformers", "safetensors", "tokenizers", "pyyaml", "packaging", "tqdm")


def canonical(name: str) -> str:
    """PEP 503 normalisation (what wheel file names and pins may spell differently)."""
    return name.lower().replace("_", "-").replace(".", "-")


def pins(path: Path = PINS) -> dict[str, str]:
    """canonical name -> version of every ``name==version`` line."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonical(name)] = version
    return found


def wheel_distribution(wheel: Path) -> str:
    """The canonical distribution name a wheel file installs (its name up to the first '-')."""
    return canonical(wheel.name.split("-", 1)[0])


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def prepare(dest: Path, python_version: str) -> int:
    from data_prep.sample_dump import SAMPLE_NAME, sample_dump

    versions = pins()
    missing = [name for name in KIT if name not in versions]
    if missing:
        print(f"gpu_wheels: {PINS.relative_to(ROOT)} pins no version of {', '.join(missing)}", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dest), f"deepspeed=={versions['deepspeed']}"],
                   check=True, env=env)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    for name in KIT[1:]:
        subprocess.run([*pip, "download", "--no-deps", "-q", "--only-binary=:all:", "--python-version", python_version,
                        "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={versions[name]}"], check=True)
    shutil.copyfile(sample_dump(), dest / SAMPLE_NAME)
    total = folder_bytes(dest)
    for path in sorted(dest.iterdir()):
        print(f"{path.stat().st_size / 1e6:8.2f} MB  {path.name}")
    print(f"{total / 1e6:8.2f} MB  in all ({dest})")
    if total > MAX_BYTES:
        print(f"gpu_wheels: {dest} holds {total / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB the device copies",
              file=sys.stderr)
        return 2
    return 0


def install(dest: Path, target: Path) -> int:
    lacking = [name for name in ASSUMED if not installed(name)]
    if lacking:
        print(f"gpu_wheels: this Python ({sys.executable}) lacks {', '.join(lacking)}, which the kit expects the "
              "machine to have (torch and transformers with their dependencies)", file=sys.stderr)
        return 2
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        print(f"gpu_wheels: no wheels in {dest}: run `python benchmarks/gpu_wheels.py prepare` first", file=sys.stderr)
        return 2
    wanted = [wheel for wheel in wheels if not installed(wheel_distribution(wheel))]
    kept = sorted({wheel_distribution(wheel) for wheel in wheels} - {wheel_distribution(w) for w in wanted})
    print(f"already installed, kept: {', '.join(kept) or 'none'}")
    print(f"installing into {target}: {', '.join(wheel.name for wheel in wanted) or 'nothing'}", flush=True)
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", "--target",
                        str(target), *map(str, wanted)], check=True,
                       env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "install"))
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the wheel folder (git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="prepare: the device's Python (3.12 on the H200)")
    parser.add_argument("--target", type=Path, help="install: the folder the wheels go into")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.dest, args.python_version)
    if args.target is None:
        parser.error("install needs --target")
    return install(args.dest, args.target)


if __name__ == "__main__":
    sys.exit(main())
