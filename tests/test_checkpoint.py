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
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.train.checkpoint import (
    COMPLETE_MARKER,
    capture_rng_state,
    checkpoint_tag,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

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
