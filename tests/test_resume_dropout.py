"""Resume on two ranks with BERT's dropout on: fine-tuning killed mid-search and mid-epoch (after an evaluation) ends
with the uninterrupted two-rank run's ticket, losses, scores and weights, bit for bit: no DataLoader iterator opened
at resume may shift the dropout masks (train.stage). Ranks whose generators differ are covered where train.checkpoint
keeps every rank's RNG state. A run moves to another number of ranks only with --allow-world-size-change."""

import json
import signal

import pytest
from test_finetune_resume import assert_same_run, earlybert_run_args, run_cli
from test_multirank import launch

FINETUNE = ("-m", "earlybert_pretrain.finetune.cli")


@pytest.mark.slow
def test_two_rank_finetuning_killed_mid_search_and_mid_epoch_resumes_bit_identically(tmp_path):
    common = earlybert_run_args(tmp_path)
    reference = tmp_path / "reference"
    codes, log = launch([*common, f"output_dir={reference}"], program=FINETUNE)
    assert codes == [0, 0], log[-3000:]
    args = [*common, f"output_dir={tmp_path / 'run'}", "--resume"]
    codes, log = launch(args, kill_on=r"search step 5/6", program=FINETUNE)  # the search's checkpoint at 3
    assert codes == [-signal.SIGKILL] * 2, log[-3000:]
    codes, log = launch(args, kill_on=r"finetune step 7/8", program=FINETUNE)  # fine-tuning's at 6
    assert codes == [-signal.SIGKILL] * 2 and "search: resumed at step 3 of 6" in log, log[-3000:]
    codes, log = launch(args, program=FINETUNE)
    assert codes == [0, 0] and "finetune: resumed at step 6 of 8" in log, log[-3000:]
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
def test_two_rank_finetuning_resumes_on_one_rank_only_with_the_flag(tmp_path):
    """Killed on 2 ranks after the search's checkpoint at step 3: on 1 rank refused in one line that names the flag
    (nothing changed), with it resumed at step 3 and finished (the global batches do not depend on the ranks)."""
    args = [*earlybert_run_args(tmp_path), f"output_dir={tmp_path / 'run'}", "--resume"]
    codes, log = launch(args, kill_on=r"search step 5/6", program=FINETUNE)
    assert codes == [-signal.SIGKILL] * 2, log[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {path: path.read_bytes() for path in sorted(checkpoints.rglob("*")) if path.is_file()}
    code, log = run_cli(args)
    errors = [line for line in log.splitlines() if line.startswith("earlybert-finetune: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert errors[0].startswith(f"earlybert-finetune: error: {checkpoints}: the run's checkpoints were saved by 2 "
                                "rank(s), this run has 1; resume it on 2 rank(s)")
    assert "pass --allow-world-size-change to continue on 1" in errors[0]
    assert {path: path.read_bytes() for path in sorted(checkpoints.rglob("*")) if path.is_file()} == before
    code, log = run_cli([*args, "--allow-world-size-change"])
    assert code == 0 and "search: resumed at step 3 of 6" in log, log[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["schedule"]["steps"] == 8 and len(metrics["epochs"]) == 2
