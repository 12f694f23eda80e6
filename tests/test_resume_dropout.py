"""Resume on two ranks with BERT's dropout on: fine-tuning killed mid-search and mid-epoch (after an evaluation) ends
with the uninterrupted two-rank run's ticket, losses, scores and weights, bit for bit: no DataLoader iterator opened
at resume may shift the dropout masks (train.stage). Ranks whose generators differ are covered where train.checkpoint
keeps every rank's RNG state."""

import signal

import pytest
from test_finetune_resume import assert_same_run, earlybert_run_args
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
