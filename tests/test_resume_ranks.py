"""Resuming, through the CLI and on 2 ranks: each rank gets its own RNG state back; a run's checkpoints resume on the
world size that wrote them, on another only with --allow-world-size-change and ZeRO 0 (2 ranks -> 1 -> 2 continued to
the end; under ZeRO 2, 2 -> 1 and 1 -> 2 refused in one line before anything is loaded, with the flag or without);
a run copied with ``cp -a`` resumes in its new folder; a crafted checkpoint is refused without running its code."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_checkpoint import WritesAFile
from test_multirank import launch
from test_pretrain import run_cli, tiny_recipe

from earlybert_pretrain.common.files import sha256_file

pytest_plugins = ["data_fixtures"]
WORKER = Path(__file__).with_name("checkpoint_ranks.py")


def run_worker(mode: str, tmp_path: Path):
    out = tmp_path / "result.json"
    codes, log = launch([mode, str(out), str(tmp_path / "checkpoints")], timeout=300, program=(str(WORKER),))
    assert codes == [0, 0], log[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_rank_resumes_with_its_own_generators(tmp_path):
    by_rank = run_worker("rng", tmp_path)
    assert by_rank[0]["expected"] != by_rank[1]["expected"]  # the ranks' generators differ
    for rank, draws in enumerate(by_rank):
        assert draws["got"] == draws["expected"], f"rank {rank} did not get its own RNG state back"


@pytest.mark.slow
def test_a_full_disk_on_one_rank_mid_save_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    result = run_worker("full-disk", tmp_path)
    tag = tmp_path / "checkpoints" / "phase1-step000002"
    expected = (f"{tag}: No space left on device while saving this checkpoint; removed it, the last complete "
                "checkpoint phase1-step000001 is kept: free space and resume with --resume")
    assert result == {"raised_by_rank": [expected, expected], "tags": ["phase1-step000001"],
                      "resumed_step": 1}


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    """The tiny recipe under ZeRO 2, whose optimizer partitions belong to the world size that wrote them."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    settings = tiny_recipe(wiki_build.shards)
    settings["engine"]["zero_stage"] = 2
    path.write_text(yaml.safe_dump(settings))
    return path


KILL_AFTER_A_CHECKPOINT = r"search step 5/6"  # the search checkpoints at step 3


@pytest.fixture(scope="module")
def one_rank_killed(recipe, tmp_path_factory) -> Path:
    """A one-rank run SIGKILLed after its search checkpoint at step 3; tests work on copies (cp -a)."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    code, log = run_cli(["--config", str(recipe), f"output_dir={out}"], kill_on=KILL_AFTER_A_CHECKPOINT)
    assert code == -signal.SIGKILL, log[-3000:]
    return out


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def checkpoint_files(run: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted((run / "checkpoints").rglob("*"))
            if path.is_file()}


def the_error(log: str) -> str:
    """The one line a refused run prints, checked to be alone (no traceback)."""
    errors = [line for line in log.splitlines() if line.startswith("earlybert-pretrain: error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_two_rank_run_resumed_on_one_rank_is_refused_in_one_line(recipe, tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(recipe), f"output_dir={out}", "--resume"]
    codes, log = launch(args, kill_on=KILL_AFTER_A_CHECKPOINT)
    assert codes == [-signal.SIGKILL] * 2, log[-3000:]
    before = checkpoint_files(out)
    for flag in ([], ["--allow-world-size-change"]):
        code, log = run_cli(args + flag)
        assert code == 2
        assert the_error(log) == (
            f"earlybert-pretrain: error: {out / 'checkpoints'}: the run's checkpoints were saved by 2 rank(s), this "
            "run has 1: under ZeRO 2 each rank saved its own partition of the optimizer state, which DeepSpeed cannot "
            "re-partition over 1; resume it on 2 rank(s), or pass --overwrite to start over")
        assert "corrupt" not in log and checkpoint_files(out) == before


@pytest.mark.slow
def test_a_one_rank_run_resumed_on_two_ranks_is_refused_on_both(one_rank_killed, recipe, tmp_path):
    out = copy_run(one_rank_killed, tmp_path / "run")
    before = checkpoint_files(out)
    codes, log = launch(["--config", str(recipe), f"output_dir={out}", "--resume"], timeout=300)
    assert codes == [2, 2], log[-3000:]
    assert "checkpoints were saved by 1 rank(s), this run has 2: under ZeRO 2 each rank saved its own" in the_error(log)
    assert checkpoint_files(out) == before


@pytest.mark.slow
def test_a_run_copied_with_cp_a_resumes_in_its_new_folder(one_rank_killed, recipe, tmp_path):
    out = copy_run(one_rank_killed, tmp_path / "moved")
    code, log = run_cli(["--config", str(recipe), f"output_dir={out}", "--resume"], kill_on=r"phase1 step 2/")
    assert code == -signal.SIGKILL, log[-3000:]  # stopped once the search resumed, finished and drew its ticket
    assert "search: resumed at step 3 of 6" in log
    assert set(json.loads((out / "progress.json").read_text())) == {"search", "draw"}


@pytest.mark.slow
def test_a_crafted_checkpoint_does_not_run_its_code_on_resume(one_rank_killed, recipe, tmp_path):
    """An object with a __reduce__ in the newest checkpoint's model states, its marker updated to match."""
    out = copy_run(one_rank_killed, tmp_path / "run")
    tag_dir = out / "checkpoints" / "search-step000003"
    states, marker_path = tag_dir / "mp_rank_00_model_states.pt", tag_dir / "complete.json"
    crafted = torch.load(states, weights_only=False)  # the test's own file: trusted here
    ran = tmp_path / "ran.txt"
    crafted["earlybert_client_state"]["losses"] = WritesAFile(ran)
    torch.save(crafted, states)
    marker = json.loads(marker_path.read_text())
    marker["files"][states.name], marker["sha256"][states.name] = states.stat().st_size, sha256_file(states)
    marker_path.write_text(json.dumps(marker))
    code, log = run_cli(["--config", str(recipe), f"output_dir={out}", "--resume"])
    assert code == 2 and not ran.exists()
    assert the_error(log).startswith(f"earlybert-pretrain: error: {states}: refused to load: it holds getattr, ")


@pytest.mark.slow
def test_under_zero_0_a_run_moves_from_2_ranks_to_1_and_back_with_the_flag(wiki_build, tmp_path):
    """The flag's whole path, dropout on: killed on 2 ranks after the search's checkpoint at step 3, resumed on 1 (which
    refuses without the flag) and killed after phase 1's at step 3, finished on 2. Each resume continues at the step
    it saved; the same samples per step are test_data's invariant, the loaded state test_checkpoint's."""
    recipe = tmp_path / "zero0.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))  # ZeRO 0, dropout 0.1
    out = tmp_path / "run"
    args = ["--config", str(recipe), f"output_dir={out}", "--resume"]
    codes, log = launch(args, kill_on=KILL_AFTER_A_CHECKPOINT)
    assert codes == [-signal.SIGKILL] * 2, log[-3000:]
    before = checkpoint_files(out)
    code, log = run_cli(args)
    assert code == 2 and "pass --allow-world-size-change to continue on 1" in the_error(log)
    assert checkpoint_files(out) == before

    code, log = run_cli([*args, "--allow-world-size-change"], kill_on=r"phase1 step 5/")
    assert code == -signal.SIGKILL, log[-3000:]
    assert "saved by 2 rank(s), this run has 1: continuing on 1 rank(s) as asked" in log
    assert "search: resumed at step 3 of 6" in log
    codes, log = launch([*args, "--allow-world-size-change"], timeout=300)
    assert codes == [0, 0], log[-3000:]
    assert "saved by 1 rank(s), this run has 2: continuing on 2 rank(s) as asked" in log
    assert "phase1: resumed at step 3 of 26" in log
    progress = json.loads((out / "progress.json").read_text())
    assert [progress[stage]["steps"] for stage in ("search", "phase1", "phase2")] == [6, 26, 6]
