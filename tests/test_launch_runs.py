"""The launch scripts run, not just parsed: launch/pretrain_single_node.sh trains on 2 CPU ranks;
launch/pretrain_multi_node.sh trains on two localhost "nodes" over ssh + pdsh (where the machine has them: CI installs
them in .ci/run; elsewhere the test skips and says why); launch/pretrain.slurm hands srun the torchrun command a
2-node job needs (a stub srun records it; torchrun's own parser and ours read it back)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pretrain import free_port, subprocess_env, tiny_recipe

from earlybert_pretrain.config import PretrainConfig, load_config
from earlybert_pretrain.pretrain.cli import parse_args
from earlybert_pretrain.tickets.ticket import Ticket

pytest_plugins = ["data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["total_steps=10", "search.steps=2"]  # 8 + 2 dense-equivalent steps: a search, a draw, both phases


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launch_recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))
    return path


def script_env(**extra: str) -> dict:
    """The launcher's environment: this interpreter's bin/ first on PATH (deepspeed, torchrun), one thread a rank."""
    env = subprocess_env()
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()), **extra)
    return env


def check_two_rank_run(out: Path) -> None:
    """Both ranks trained every stage, agreed on the ticket and on the weights, and the run finished."""
    progress = json.loads((out / "progress.json").read_text())
    assert progress["draw"]["digests_by_rank"] == [Ticket.load(out / "ticket.json").digest()] * 2
    for stage in ("search", "phase1", "phase2"):
        digests = progress[stage]["parameter_digests_by_rank"]
        assert len(digests) == 2 and digests[0] == digests[1], stage
    assert progress["phase1"]["timing"]["runtime"]["world_size"] == 2
    assert (out / "final_model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_single_node_script_trains_on_two_cpu_ranks(recipe, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["bash", "launch/pretrain_single_node.sh", f"output_dir={out}", *SHORT_RUN], cwd=ROOT,
                            env=script_env(NUM_GPUS="2", CONFIG=str(recipe)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    check_two_rank_run(out)


def ssh_and_pdsh_missing(hosts: list[str]) -> str | None:
    """Why the multi-node script cannot run here, or None: pdsh on PATH and key-based ssh to every host."""
    if shutil.which("pdsh") is None:
        return "pdsh is not installed (CI installs it with openssh-server in .ci/run)"
    for host in hosts:
        probe = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return f"no key-based ssh to {host} ({probe.stderr.strip() or probe.returncode}); CI sets it up in .ci/run"
    return None


@pytest.mark.slow
def test_multi_node_script_trains_on_two_localhost_nodes_over_ssh(recipe, tmp_path):
    hosts = ["localhost", "127.0.0.1"]  # two names for one machine: DeepSpeed refuses a host listed twice
    reason = ssh_and_pdsh_missing(hosts)
    if reason:
        pytest.skip(reason)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in hosts))
    out = tmp_path / "run"
    result = subprocess.run(["bash", "launch/pretrain_multi_node.sh", f"output_dir={out}", *SHORT_RUN], cwd=ROOT,
                            env=script_env(HOSTFILE=str(hostfile), CONFIG=str(recipe)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    check_two_rank_run(out)


def write_stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)


def test_slurm_script_hands_srun_the_torchrun_command_of_a_two_node_job(tmp_path):
    stubs, record = tmp_path / "bin", tmp_path / "srun_args"
    stubs.mkdir()
    write_stub(stubs, "srun", f'printf "%s\\0" "$@" > {record}\n')
    write_stub(stubs, "scontrol", '[ "$1 $2" = "show hostnames" ] && tr "," "\\n" <<< "$3"\n')
    env = {**subprocess_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-7,gpu-9",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("CONFIG", None)
    # As slurmd runs a batch job: a copy of the script in its spool folder, started outside the repository.
    spooled = tmp_path / "slurm_script"
    shutil.copy(ROOT / "launch" / "pretrain.slurm", spooled)
    result = subprocess.run(["bash", str(spooled), "output_dir=runs/large", "phase1.lr=0.005"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = record.read_text().split("\0")[:-1]
    assert args == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", "gpu-7:29500", "--rdzv_id", "4242", "-m", "earlybert_pretrain.pretrain",
                    "--config", "configs/pretrain_bert_base.yaml", "--resume", "output_dir=runs/large",
                    "phase1.lr=0.005"]
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser().parse_args(args[1:])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.rdzv_endpoint) == ("2", "8", "gpu-7:29500")
    assert torchrun.module and torchrun.training_script == "earlybert_pretrain.pretrain"
    ours = parse_args(torchrun.training_script_args)
    assert ours.resume and ours.overrides == ["output_dir=runs/large", "phase1.lr=0.005"]
    cfg = load_config(PretrainConfig, ROOT / ours.config, ours.overrides)  # the job's recipe, as rank 0 reads it
    assert (cfg.output_dir, cfg.phase1.lr, cfg.model.hidden_size) == ("runs/large", 0.005, 768)
