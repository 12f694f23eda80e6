"""The recipes are re-entrant: pretrain() / the fine-tuning run() and each CLI's main() run several times in one
process (a notebook), each leaving the process-group state as it found it: a group it created is destroyed with
DeepSpeed's cached handles and the launcher variables it filled in; a group the caller made is left alone.

Each test runs in a fresh interpreter, so no group left by an earlier test hides the bug."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_fixtures import make_tiny_model, sentiment_rows, write_jsonl
from test_pretrain import subprocess_env, tiny_recipe

pytest_plugins = ["data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]

# What every call must leave as it found it; then the caller's own group, which calls join and leave alone.
CHECKS = """
import os, sys, json
import torch.distributed as dist
from deepspeed.utils import groups
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
before = {key: os.environ.get(key) for key in LAUNCHER}

def left_as_found():
    assert not dist.is_initialized() and groups._WORLD_GROUP is None
    assert {key: os.environ.get(key) for key in LAUNCHER} == before

def own_group():
    from earlybert_pretrain.train.engine import init_distributed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[-1])
    init_distributed()  # the caller's group, made as a host application would
    return dist.group.WORLD
"""


def run_script(body: str, *args: str) -> str:
    from test_pretrain import free_port

    result = subprocess.run([sys.executable, "-c", CHECKS + body, *args, str(free_port())], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


PRETRAIN = """
import dataclasses
from safetensors.torch import load_file
from earlybert_pretrain.config import PretrainConfig, load_config
from earlybert_pretrain.pretrain.cli import main
from earlybert_pretrain.pretrain.recipe import pretrain
recipe, out = sys.argv[1], sys.argv[2]
base = ["--config", recipe, "mode=dense", "total_steps=4"]
for name in ("cli-1", "cli-2"):
    assert main([*base, f"output_dir={out}/{name}"]) == 0
    left_as_found()
cfg = load_config(PretrainConfig, recipe, ["mode=dense", "total_steps=4"])
for name in ("api-1", "api-2"):
    pretrain(dataclasses.replace(cfg, output_dir=f"{out}/{name}"))
    left_as_found()
world = own_group()
for name in ("own-1", "own-2"):
    assert main([*base, f"output_dir={out}/{name}"]) == 0
    assert dist.is_initialized() and dist.group.WORLD is world
dist.destroy_process_group()
weights = [load_file(f"{out}/{name}/final_model/model.safetensors")
           for name in ("cli-1", "cli-2", "api-1", "api-2", "own-1", "own-2")]
assert all(w.keys() == weights[0].keys() and all((w[k] == weights[0][k]).all() for k in w) for w in weights)
print("ok", len(weights))
"""


@pytest.mark.slow
def test_pretrain_runs_again_in_one_process_to_the_same_weights(wiki_build, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))  # dropout on, accumulation 2
    assert run_script(PRETRAIN, str(recipe), str(tmp_path)).split()[-2:] == ["ok", "6"]


FINETUNE = """
from earlybert_pretrain.finetune.cli import main
model, train, dev, out = sys.argv[1:5]
base = ["--task", "sst2", "--model", model, f"data.train_file={train}", f"data.validation_files=[{dev}]",
        "batch_size=16", "eval_batch_size=32", "epochs=1", "lr=1e-3", "--mode", "dense"]
runs = ["cli-1", "cli-2"]
for name in runs:
    assert main([*base, f"output_dir={out}/{name}"]) == 0
    left_as_found()
world = own_group()
runs.append("own-1")
assert main([*base, f"output_dir={out}/own-1"]) == 0
assert dist.is_initialized() and dist.group.WORLD is world
dist.destroy_process_group()
losses = [json.load(open(f"{out}/{name}/metrics.json"))["losses"]["finetune"] for name in runs]
assert losses[0] and all(each == losses[0] for each in losses), losses
print("ok", len(losses))
"""


@pytest.mark.slow
def test_finetune_runs_again_in_one_process_to_the_same_losses(tmp_path):
    model = make_tiny_model(tmp_path / "model", hidden_dropout_prob=0.1)
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(32, 1))
    assert run_script(FINETUNE, str(model), str(train), str(dev), str(tmp_path)).split()[-2:] == ["ok", "3"]
