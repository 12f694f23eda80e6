"""Checkpoint safety: content checksums (a newest checkpoint whose bytes changed is skipped for the previous one),
loading without running code, a full disk mid-save, the world size a checkpoint resumes on."""

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from test_engine import batches, make_engine, parameters, tiny_model, train_steps

from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.common.oserrors import FileSystemError
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.train import checkpoint
from earlybert_pretrain.train.checkpoint import (
    COMPLETE_MARKER,
    capture_rng_state,
    checkpoint_tag,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from earlybert_pretrain.train.engine import build_engine, deepspeed_config
from earlybert_pretrain.train.optim import build_optimizer

STATES = "mp_rank_00_model_states.pt"


def two_checkpoints(tmp_path):
    """Save after step 1 and after step 2; returns the weights saved at step 1."""
    data = batches(2, 8)
    engine, _ = make_engine(tiny_model())
    train_steps(engine, data[:1])
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 1), {"step": 1}, keep=3)
    first = parameters(engine)
    train_steps(engine, data[1:])
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 2), {"step": 2}, keep=3)
    return first


def test_marker_records_size_and_sha256_of_every_file(single_process_dist, tmp_path):
    two_checkpoints(tmp_path)
    tag_dir = tmp_path / checkpoint_tag("phase1", 2)
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    files = sorted(p.name for p in tag_dir.iterdir() if p.name != COMPLETE_MARKER)
    assert sorted(marker["files"]) == sorted(marker["sha256"]) == files and STATES in files
    for name in files:
        assert marker["files"][name] == (tag_dir / name).stat().st_size
        assert marker["sha256"][name] == sha256_file(tag_dir / name)


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous(single_process_dist, tmp_path, caplog):
    first = two_checkpoints(tmp_path)
    states = tmp_path / checkpoint_tag("phase1", 2) / STATES
    size = states.stat().st_size
    with open(states, "r+b") as handle:  # flip a few bytes well inside the tensor data: the size stays the same
        handle.seek(size // 2)
        chunk = handle.read(4)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert states.stat().st_size == size

    resumed, _ = make_engine(tiny_model(seed=5))
    with caplog.at_level(logging.WARNING, logger="earlybert_pretrain.train.checkpoint"):
        assert load_latest_checkpoint(resumed, tmp_path) == {"step": 1}
    warning = next(r.getMessage() for r in caplog.records if "corrupt" in r.getMessage())
    assert "phase1-step000002" in warning and STATES in warning and "sha256" in warning
    assert "falling back to the previous complete checkpoint phase1-step000001" in warning
    loaded = parameters(resumed)
    assert loaded.keys() == first.keys()
    for name, value in loaded.items():
        assert torch.equal(value, first[name]), name
    assert resumed.global_steps == 1


def test_a_marker_without_checksums_is_not_trusted(single_process_dist, tmp_path, caplog):
    two_checkpoints(tmp_path)
    marker_path = tmp_path / checkpoint_tag("phase1", 2) / COMPLETE_MARKER
    marker = json.loads(marker_path.read_text())
    del marker["sha256"]
    marker_path.write_text(json.dumps(marker))
    resumed, _ = make_engine(tiny_model(seed=5))
    with caplog.at_level(logging.WARNING, logger="earlybert_pretrain.train.checkpoint"):
        assert load_latest_checkpoint(resumed, tmp_path) == {"step": 1}
    assert "phase1-step000002" in caplog.text and "lacks the sha256" in caplog.text


class WritesAFile:
    """What a crafted checkpoint holds: unpickling it calls ``Path.write_text`` (any code could run there)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "code ran"))


def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running(single_process_dist, tmp_path):
    two_checkpoints(tmp_path)
    tag_dir = tmp_path / checkpoint_tag("phase1", 2)
    states, marker_path = tag_dir / STATES, tag_dir / COMPLETE_MARKER
    crafted = torch.load(states, weights_only=False)  # the test's own file: trusted here
    ran = tmp_path / "ran.txt"
    crafted["earlybert_client_state"]["step"] = WritesAFile(ran)
    torch.save(crafted, states)
    marker = json.loads(marker_path.read_text())  # the marker updated to match, as an attacker would
    marker["files"][STATES], marker["sha256"][STATES] = states.stat().st_size, sha256_file(states)
    marker_path.write_text(json.dumps(marker))
    resumed, _ = make_engine(tiny_model(seed=5))
    with pytest.raises(RunError) as refused:
        load_latest_checkpoint(resumed, tmp_path)
    assert not ran.exists()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{states}: refused to load: it holds ")
    assert "it holds getattr," in message and "could run code" in message  # how Path.write_text pickles


def test_a_full_disk_mid_save_keeps_the_previous_checkpoint_and_resume_works(single_process_dist, tmp_path,
                                                                             monkeypatch):
    data = batches(2, 8)
    engine, _ = make_engine(tiny_model(dropout=0.1))
    train_steps(engine, data[:1])
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 1), {"step": 1, "rng": capture_rng_state()}, keep=2)
    first = parameters(engine)
    before = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    expected = train_steps(engine, data[1:])
    real_save = torch.save

    def disk_full(obj, handle, **options):  # some bytes reach the file, then the disk is full
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    tag_dir = tmp_path / checkpoint_tag("phase1", 2)
    with pytest.raises(FileSystemError) as refused:
        save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 2), {"step": 2}, keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(refused.value) == (f"{tag_dir}: No space left on device while saving this checkpoint; removed it, "
                                  "the last complete checkpoint phase1-step000001 is kept: free space and resume "
                                  "with --resume")
    assert not tag_dir.exists()  # no half-written tag left behind, the previous one byte for byte
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()} == before

    resumed, _ = make_engine(tiny_model(seed=5, dropout=0.1))
    client = load_latest_checkpoint(resumed, tmp_path)
    assert client["step"] == 1 and resumed.global_steps == 1
    assert all(torch.equal(value, first[name]) for name, value in parameters(resumed).items())
    restore_rng_state(client["rng"])
    assert train_steps(resumed, data[1:]) == expected  # dropout on: the resumed step is the same step


def test_checkpoints_of_another_world_size_are_refused_before_loading(single_process_dist, tmp_path):
    two_checkpoints(tmp_path)
    marker_path = tmp_path / checkpoint_tag("phase1", 2) / COMPLETE_MARKER
    marker = json.loads(marker_path.read_text())
    assert marker["world_size"] == 1
    marker_path.write_text(json.dumps({**marker, "world_size": 2}))
    before = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    resumed, _ = make_engine(tiny_model(seed=5))
    with pytest.raises(RunError, match=rf"^{tmp_path}: the run's checkpoints were saved by 2 rank\(s\), this run has "
                                       r"1; resume it on 2 rank\(s\) .*or pass --overwrite to start over$"):
        load_latest_checkpoint(resumed, tmp_path, stage="phase1")
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()} == before


def files_of(folder: Path) -> dict:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def claim_world_size(tag_dir: Path, world: int) -> None:
    """Make a checkpoint look written by ``world`` ranks (what the marker records; the check reads nothing else)."""
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps({**marker, "world_size": world}))


def moments(engine) -> list[torch.Tensor]:
    return [value for state in engine.optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def test_a_world_size_change_is_refused_naming_the_flag_and_continued_with_it(single_process_dist, tmp_path, caplog):
    """ZeRO 0: the optimizer state is whole in the checkpoint, so the accepted run loads exactly what was saved."""
    engine, _ = make_engine(tiny_model(seed=3, dropout=0.1))
    train_steps(engine, batches(2, 8))
    saved = {"weights": parameters(engine), "moments": [value.clone() for value in moments(engine)]}
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 2), {"step": 2, "rng": capture_rng_state()}, keep=2)
    claim_world_size(tmp_path / checkpoint_tag("phase1", 2), 2)
    before = files_of(tmp_path)
    refused, _ = make_engine(tiny_model(seed=5, dropout=0.1))
    with pytest.raises(RunError) as refusal:
        load_latest_checkpoint(refused, tmp_path, "phase1", allow_world_size_change=False)
    assert str(refusal.value) == (
        f"{tmp_path}: the run's checkpoints were saved by 2 rank(s), this run has 1; resume it on 2 rank(s) (the "
        "dropout streams and optimizer partitions each rank continues are its own), pass --allow-world-size-change "
        "to continue on 1 (the same samples per step; new per-rank random streams), or pass --overwrite to start over")
    assert files_of(tmp_path) == before and refused.global_steps == 0

    resumed, _ = make_engine(tiny_model(seed=5, dropout=0.1))
    with caplog.at_level(logging.WARNING, logger="earlybert_pretrain"):
        client = load_latest_checkpoint(resumed, tmp_path, "phase1", allow_world_size_change=True)
    assert client["step"] == 2 and resumed.global_steps == 2
    assert "continuing on 1 rank(s) as asked" in caplog.text
    assert all(torch.equal(value, saved["weights"][name]) for name, value in parameters(resumed).items())
    loaded = moments(resumed)
    assert len(loaded) == len(saved["moments"]) > 0 and all(map(torch.equal, loaded, saved["moments"]))
    assert files_of(tmp_path) == before


def test_under_zero_2_a_world_size_change_is_refused_accepted_or_not(single_process_dist, tmp_path):
    """ZeRO 1/2 partition the optimizer state over the ranks that wrote it; DeepSpeed cannot re-partition it."""
    model = tiny_model(seed=3)
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 1e-2)
    engine = build_engine(model, optimizer, None, deepspeed_config(8, 2, 1, "fp32", 1.0, 2, "lamb"))
    train_steps(engine, batches(1, 8))
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 1), {"step": 1}, keep=2)
    claim_world_size(tmp_path / checkpoint_tag("phase1", 1), 2)
    before = files_of(tmp_path)
    expected = (r"saved by 2 rank\(s\), this run has 1: under ZeRO 2 each rank saved its own partition of the "
                r"optimizer state, which DeepSpeed cannot re-partition over 1; resume it on 2 rank\(s\), or pass "
                r"--overwrite to start over$")
    for accepted in (False, True):
        with pytest.raises(RunError, match=expected):
            load_latest_checkpoint(engine, tmp_path, "phase1", allow_world_size_change=accepted)
    assert files_of(tmp_path) == before


def test_a_rank_the_saved_run_did_not_have_gets_a_new_stream_the_same_on_every_rerun(monkeypatch):
    saved = capture_rng_state()  # one rank's generators
    draws = {}
    for as_rank in (0, 1, 1, 2):
        monkeypatch.setattr(checkpoint, "rank", lambda as_rank=as_rank: as_rank)
        restore_rng_state(saved)
        draws.setdefault(as_rank, []).append(torch.rand(4))
    monkeypatch.undo()
    restore_rng_state(saved)
    assert torch.equal(draws[0][0], torch.rand(4))  # rank 0 continues its own stream
    assert torch.equal(draws[1][0], draws[1][1])  # a new rank's stream is the same on a rerun
    assert not any(torch.equal(draws[a][0], draws[b][0]) for a, b in ((0, 1), (0, 2), (1, 2)))
