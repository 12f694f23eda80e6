"""docker/: pins that are exact and agree with setup.py, constraints-cpu.txt and the Dockerfile's ARGs, the CUDA
arch list, the fused-op build, and what `deepspeed --hostfile` needs. Read as text: no docker needed (the image itself
is not built by the tests)."""

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
CONSTRAINTS = ROOT / "docker" / "constraints-cuda.txt"


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)$", DOCKERFILE, flags=re.M))


def instructions(keyword: str) -> list[str]:
    """The Dockerfile's ``keyword`` instructions, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [line for line in joined.splitlines() if line.startswith(keyword + " ")]


def install_requires() -> list[Requirement]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(ast.literal_eval(element)) for element in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def test_constraints_are_exact_pins():
    lines = [line.split("#", 1)[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    loose = [line for line in lines if line and not re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", line)]
    assert not loose, f"docker/constraints-cuda.txt: not an exact pin: {loose}"


def test_pins_satisfy_setup_py():
    pinned = pins(CONSTRAINTS)
    for requirement in install_requires():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"setup.py needs {requirement}; docker/constraints-cuda.txt does not pin it"
        assert requirement.specifier.contains(Version(pinned[name])), (
            f"docker/constraints-cuda.txt pins {name}=={pinned[name]}, outside setup.py's {requirement}")


def test_torch_transformers_and_deepspeed_pins_are_the_tested_ones():
    """The image pins what `make test` installs first (constraints-cpu.txt): the environment the suite passed in."""
    pinned, args, tested = pins(CONSTRAINTS), dockerfile_args(), pins(ROOT / "constraints-cpu.txt")
    assert {name: pinned[name] for name in ("torch", "transformers", "deepspeed")} == tested
    assert args["TORCH_VERSION"] == tested["torch"] and args["DEEPSPEED_VERSION"] == tested["deepspeed"]


def test_the_image_runs_the_python_the_tests_run_on():
    """CI builds its venvs with the Makefile's PYTHON; the image's venv is made with the same CPython line."""
    (tested,) = re.findall(r"^TESTED_PYTHON := (\d+\.\d+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert dockerfile_args()["PYTHON_VERSION"] == tested
    (apt,) = [run for run in instructions("RUN") if "apt-get install" in run]
    assert '"python${PYTHON_VERSION}" -m venv /opt/venv' in apt and " python3 " not in apt


def test_setup_py_floors_are_the_oldest_tested_versions():
    """Every lower bound in install_requires is pinned exactly in constraints-oldest.txt, which `make test` runs the
    suite with, and nothing else is pinned there but the test extras (inside their ranges)."""
    oldest = pins(ROOT / "constraints-oldest.txt")
    floors = {}
    for requirement in install_requires():
        (spec,) = [spec for spec in requirement.specifier if spec.operator in (">=", "==")]
        floors[canonicalize_name(requirement.name)] = Version(spec.version)
    assert {name: Version(oldest.get(name, "0")) for name in floors} == floors
    tree = ast.parse((ROOT / "setup.py").read_text())
    (extras,) = [ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.keyword) and node.arg == "extras_require"]
    for requirement in map(Requirement, extras["test"]):
        name = canonicalize_name(requirement.name)
        assert name not in oldest or requirement.specifier.contains(Version(oldest[name])), requirement
    assert set(oldest) - set(floors) <= {canonicalize_name(Requirement(r).name) for r in extras["test"]}


def test_base_image_cuda_matches_the_torch_build():
    args = dockerfile_args()
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu\d+\.\d+", args["BASE_IMAGE"])
    assert match, f"BASE_IMAGE {args['BASE_IMAGE']}: expected a pinned nvidia/cuda X.Y.Z devel tag (nvcc)"
    cuda = f"cu{match[1]}{match[2]}"
    assert args["TORCH_CUDA"] == cuda and args["TORCH_INDEX_URL"].endswith("/" + cuda)
    # CUDA 12.6 is the newest line PyTorch 2.13 builds for Volta (sm_70); the 12.8+ and 13.x builds start at sm_75.
    assert (int(match[1]), int(match[2])) <= (12, 6)
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_REF"]), "Apex is pinned to a commit"


def test_arch_list_covers_v100_a100_h100():
    assert re.search(r'^\s*TORCH_CUDA_ARCH_LIST="7\.0;8\.0;9\.0"', DOCKERFILE, flags=re.M)


def test_deepspeed_fused_ops_built_without_build_isolation():
    (run,) = [run for run in instructions("RUN") if '"deepspeed==${DEEPSPEED_VERSION}"' in run]
    deepspeed_install = run[run.index("DS_ACCELERATOR=cuda"):]  # no GPU at build time: else it builds for the CPU
    for flag in ("DS_BUILD_OPS=0", "DS_BUILD_FUSED_LAMB=1", "DS_BUILD_FUSED_ADAM=1", "--no-build-isolation"):
        assert flag in deepspeed_install.split('"deepspeed==')[0], flag
    assert "installed_ops" in run, "the build checks that the ops were compiled"


@pytest.mark.parametrize("run", [run for run in instructions("RUN") if "pip install" in run])
def test_every_pip_install_is_constrained(run):
    for install in run.split("pip install")[1:]:
        assert "-c docker/constraints-cuda.txt" in install.split("&&")[0], f"unpinned: pip install{install[:80]}"


def test_multi_node_launch_needs_are_in_the_image():
    (apt,) = [run for run in instructions("RUN") if "apt-get install" in run]
    for package in ("pdsh", "openssh-client", "openssh-server"):
        assert re.search(rf"\s{package}\s", apt), package
    assert "sshd_config.d" in apt and "ssh_config.d" in apt and apt.count("Port 2222") == 2  # server and client
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    assert os.access(entrypoint, os.X_OK) and "/usr/sbin/sshd" in entrypoint.read_text()
    subprocess.run(["bash", "-n", str(entrypoint)], check=True)
    assert 'exec "$@"' in entrypoint.read_text()
    assert instructions("ENTRYPOINT") == ['ENTRYPOINT ["/workspace/earlybert/docker/entrypoint.sh"]']
    assert "WORKDIR /workspace/earlybert" in DOCKERFILE  # the same path on every node: the launcher cds there


def test_build_context_lets_every_copied_path_through():
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore, "an allow-list: everything else (.venv, runs/, .git) stays out of the context"
    copied = [src for copy in instructions("COPY") for src in copy.split()[1:-1] if not src.startswith("--")]
    assert copied and all(src in allowed for src in copied), sorted(set(copied) - allowed)
