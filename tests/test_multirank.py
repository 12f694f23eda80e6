"""Two ranks on one machine, launched by hand (RANK / WORLD_SIZE / MASTER_* as a launcher sets them), so each rank
can be killed, or given an output folder no other rank sees: SIGKILL mid-search and mid-phase 2 resumes to the
bit-identical weights of an uninterrupted 2-rank run; a non-shared checkpoint folder is refused on every rank."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_pretrain import free_port, subprocess_env, tiny_recipe

pytest_plugins = ["data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], kill_on: str | None = None, wrap=None, timeout: float = 600,
           program: tuple[str, ...] = ("-m", "earlybert_pretrain.pretrain")) -> tuple[list[int], str]:
    """Start ranks 0 and 1 of ``python <program> args``; SIGKILL both as soon as rank 0's log matches ``kill_on``.
    ``wrap(rank, command)`` may wrap a rank's command (e.g. in its own mount namespace)."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, *program, *args]
        processes.append(subprocess.Popen(wrap(rank, command) if wrap else command, cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT, text=True))
    lines, deadline = [], time.monotonic() + timeout
    for line in processes[0].stdout:
        lines.append(line)
        if (kill_on and re.search(kill_on, line)) or time.monotonic() > deadline:
            for process in processes:
                process.send_signal(signal.SIGKILL)
            break
    processes[0].stdout.close()
    return [process.wait(timeout=120) for process in processes], "".join(lines)


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_model" / "model.safetensors"))


@pytest.mark.slow
def test_two_rank_sigkill_mid_search_and_mid_phase2_resumes_bit_identically(recipe, tmp_path):
    reference = tmp_path / "reference"
    codes, log = launch(["--config", str(recipe), f"output_dir={reference}"])
    assert codes == [0, 0], log[-3000:]
    out = tmp_path / "run"
    args = ["--config", str(recipe), f"output_dir={out}", "--resume"]
    for kill_on in (r"search step 5/6", r"phase2 step 4/6"):  # checkpoints at search step 3 and phase-2 step 3
        codes, log = launch(args, kill_on=kill_on)
        assert codes == [-signal.SIGKILL] * 2, f"ended before {kill_on!r}: {codes}\n{log[-3000:]}"
    codes, log = launch(args)
    assert codes == [0, 0], log[-3000:]
    assert "phase2: resumed at step 3 of 6" in log
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["draw"]["digest"] == json.loads((reference / "progress.json").read_text())["draw"]["digest"]
    assert len(set(progress["phase2"]["parameter_digests_by_rank"])) == 1


def _unshare_prefix() -> list[str] | None:
    """A command prefix that runs a process in its own mount namespace able to mount a tmpfs: as root plainly, as
    another user inside a user namespace (``-r``) where the kernel allows unprivileged ones; else None."""
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        command = [*prefix, "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp && true"]
        if subprocess.run(command, capture_output=True).returncode == 0:
            return [*prefix, "--propagation", "private"]
    return None


UNSHARE = _unshare_prefix()


@pytest.mark.slow
@pytest.mark.skipif(UNSHARE is None, reason="needs mount namespaces (`unshare -m` as root, or `unshare -r -m` with "
                                            "unprivileged user namespaces) to give each rank its own disk")
def test_a_checkpoint_folder_the_ranks_do_not_share_is_refused_on_every_rank(recipe, tmp_path):
    """Each rank in its own mount namespace with a private tmpfs over output_dir: what one writes, the other
    cannot see, as on cloud nodes with local disks."""
    out = tmp_path / "local"
    out.mkdir()

    def own_disk(rank: int, command: list[str]) -> list[str]:
        inner = " ".join(["mount", "-t", "tmpfs", "tmpfs", str(out), "&&", "exec", *command])
        return [*UNSHARE, "sh", "-c", inner]

    codes, log = launch(["--config", str(recipe), f"output_dir={out / 'run'}"], wrap=own_disk, timeout=300)
    assert codes[0] == 2 and codes[1] == 2, (codes, log[-3000:])
    assert re.search(r"checkpoints: rank\(s\) \[1\] do not see the file rank 0 just wrote there; .*shared path", log)
    assert not os.listdir(out)  # the host's folder (outside the namespaces) was never touched
