"""Checkpoint content checksums: a newest checkpoint whose bytes changed (same size) is skipped for the previous one."""

import json
import logging

import torch
from test_engine import batches, make_engine, parameters, tiny_model, train_steps

from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.train.checkpoint import COMPLETE_MARKER, checkpoint_tag, load_latest_checkpoint, save_checkpoint

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
