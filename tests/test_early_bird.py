"""The early-bird stop at its defaults (window 5, eps 0.1; You et al. 2020) in both recipes: it fires on masks that
converge, at the step the rule recomputed from the recorded masks names (tests/early_bird_reference.py), after the
window first filled; it does not fire on masks that keep moving (a search learning rate far too high), and the
search then runs to its cap with a warning. Each run is a fresh process, as a user starts it.

The fine-tuning recipe's converging case is tests/test_finetune_e2e.py::test_single_sentence_dense_then_earlybert...
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from early_bird_reference import first_converged_step, recorded_masks, window_distances
from finetune_fixtures import make_tiny_model, sentiment_rows, write_jsonl
from test_pretrain import run_cli, tiny_recipe

from earlybert_pretrain.tickets.ticket import Ticket

pytest_plugins = ["data_fixtures"]
RECORD_EVERY = 2  # the window (5 records) first fills at step 10
EARLY_BIRD = ["search.stop=early-bird", f"search.record_every={RECORD_EVERY}"]


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    """The tiny recipe with 50 steps (phase 1, 41 steps, has room for a 30-step search; the search's lr schedule is
    phase 1's, so a shorter search runs the same first steps), short pruned phases, no intermediate checkpoints."""
    values = tiny_recipe(wiki_build.shards)
    values.update(total_steps=50, pruned_step_fraction=0.1)  # the phases after the search: a few steps suffice
    values["engine"].update(checkpoint_every=1000, log_every=10)
    path = tmp_path_factory.mktemp("early_bird") / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def smallest_window_gap(run: Path) -> float:
    """The smallest, over every full window, of the larger of its worst head and FFN distances."""
    _, masks = recorded_masks(run)
    return min(max(worst) for worst in window_distances(masks, 5) if worst is not None)


@pytest.mark.slow
def test_pretraining_early_bird_fires_when_the_masks_converge(recipe, tmp_path):
    out = tmp_path / "run"
    code, log = run_cli(["--config", str(recipe), f"output_dir={out}", *EARLY_BIRD, "search.steps=30"])
    assert code == 0, log[-3000:]
    search = json.loads((out / "progress.json").read_text())["search"]
    fired = first_converged_step(out)  # measured: step 22
    assert fired is not None and 5 * RECORD_EVERY < fired < 30
    assert search["steps"] == fired and search["stopped_early"]
    assert Ticket.load(out / "ticket.json").step == fired
    assert f"early-bird ticket found at step {fired}" in log


@pytest.mark.slow
def test_pretraining_early_bird_does_not_fire_on_moving_masks(recipe, tmp_path):
    out = tmp_path / "run"
    code, log = run_cli(["--config", str(recipe), f"output_dir={out}", *EARLY_BIRD, "search.steps=20",
                         "phase1.lr=1.0"])
    assert code == 0, log[-3000:]
    search = json.loads((out / "progress.json").read_text())["search"]
    assert first_converged_step(out) is None and smallest_window_gap(out) >= 0.25  # measured: 0.39 (FFN)
    assert search["steps"] == 20 and not search["stopped_early"]
    assert "did not fire within 20 search steps" in log


@pytest.mark.slow
def test_finetuning_early_bird_does_not_fire_on_moving_masks(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, 0))
    out = tmp_path / "run"
    code, log = run_cli(["--task", "sst2", "--model", str(model), "--mode", "earlybert", f"output_dir={out}",
                         f"data.train_file={data}", f"data.validation_files=[{data}]", "batch_size=16", "epochs=1",
                         "pruned_epochs=1", "search.heads_to_prune=1", "search.lr=0.3", "search.steps=20", *EARLY_BIRD],
                        module="earlybert_pretrain.finetune.cli")
    assert code == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert first_converged_step(out) is None and smallest_window_gap(out) >= 0.25  # measured: 0.5
    assert metrics["search"] == {"steps": 20, "planned_steps": 20, "early_bird_fired_at": None}
    assert any("did not fire within 20 search steps" in warning for warning in metrics["warnings"])
