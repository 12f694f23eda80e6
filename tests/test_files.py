"""common/files.py: atomic writes keep the umask's permissions, leave nothing half-written, sweep stale temps; every
removal (run_folder's --overwrite too) stays inside the folder and never leaves half a run."""

import errno
import hashlib
import json
import os
import shutil
import stat

import pytest
import torch

from earlybert_pretrain.common.files import (
    TEMP_MARK,
    atomic_folder,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    file_digest,
    read_json,
    remove_entry,
    remove_stale_temps,
    sha256_file,
)
from earlybert_pretrain.common.run_folder import prepare
from earlybert_pretrain.errors import RunError, TicketError, UserError
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.model.hf import save_pretrained


@pytest.fixture
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         indirect=["umask"])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "new" / "b.json", {"k": 1})  # a missing parent is created, also with the umask
    with atomic_path(tmp_path / "c.bin") as temp, open(temp, "wb") as handle:
        handle.write(b"\0")
    with atomic_folder(tmp_path / "folder") as staging:
        (staging / "inside.txt").write_text("y")
    torch.manual_seed(0)
    save_pretrained(BertForPreTraining(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=8)), tmp_path / "model")
    for name in ("a.txt", "new/b.json", "c.bin", "folder/inside.txt", "model/config.json", "model/model.safetensors"):
        assert mode(tmp_path / name) == file_mode, name
    for name in ("new", "folder", "model"):
        assert mode(tmp_path / name) == dir_mode, name


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_a_failed_folder_write_leaves_the_old_folder_and_no_staging(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_folder(folder) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(folder) == ["old.txt"]
    with atomic_folder(folder) as staging:  # a finished write replaces the folder's contents
        (staging / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(folder) == ["new.txt"]


def test_temp_names_keep_the_target_suffix_and_carry_the_mark(tmp_path):
    with atomic_path(tmp_path / "x.tokens.npy") as temp:
        assert temp.parent == tmp_path and temp.name.startswith(TEMP_MARK) and temp.name.endswith("-x.tokens.npy")
        assert temp.exists() and temp.stat().st_size == 0


def test_remove_stale_temps_sweeps_marked_files_and_folders_only(tmp_path):
    (tmp_path / f"{TEMP_MARK}123-ab-shard.bin").write_bytes(b"half")
    (tmp_path / f"{TEMP_MARK}123-cd-model").mkdir()
    (tmp_path / f"{TEMP_MARK}123-cd-model" / "config.json").write_text("{}")
    (tmp_path / "shard.bin").write_bytes(b"done")
    (tmp_path / ".hidden").write_text("keep")
    remove_stale_temps(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".hidden", "shard.bin"]


def test_read_json_names_the_file_and_raises_the_given_user_error(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": [1, 2]}))
    assert read_json(good, "ticket") == {"a": [1, 2]}
    with pytest.raises(UserError, match=r"missing.json: ticket file not found"):
        read_json(tmp_path / "missing.json", "ticket")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TicketError, match=r"bad.json: not valid JSON"):
        read_json(bad, "ticket", TicketError)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"bad.json: not valid JSON"):
        read_json(bad, "ticket")


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "data.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # crosses block boundaries
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(payload).hexdigest()
    assert file_digest(path, "sha1", block=7) == hashlib.sha1(payload).hexdigest()


def test_remove_entry_removes_a_link_never_what_it_points_to(tmp_path):
    target = tmp_path / "other_disk" / "checkpoints"
    target.mkdir(parents=True)
    (target / "step10.pt").write_bytes(b"weights")
    (tmp_path / "linked").symlink_to(target)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text("x")
    for name in ("linked", "tree", "missing"):
        remove_entry(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["other_disk"] and (target / "step10.pt").read_bytes() == b"weights"


def test_a_failed_write_names_its_target(tmp_path, monkeypatch):
    """A full disk on write (no file name from the OS) is reported with the file being written, and no temp stays."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic_write_text(tmp_path / "out.txt", "x")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "out.txt")
    assert os.listdir(tmp_path) == []


def test_read_json_refuses_deep_nesting_in_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TicketError, match=r"deep.json: JSON nested too deeply"):
        read_json(deep, "ticket", TicketError)


OWNED = ["run.json", "progress.json", "checkpoints", "final_model"]


def _run_folder(folder, linked_checkpoints=None):
    """A finished run's folder: run.json, progress.json, final_model/, checkpoints/ (or a link to elsewhere)."""
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"kind": "pre-training", "config": {}, "inputs": {}}))
    (folder / "progress.json").write_text("{}")
    (folder / "final_model").mkdir()
    (folder / "final_model" / "config.json").write_text("{}")
    if linked_checkpoints is None:
        (folder / "checkpoints").mkdir()
    else:
        linked_checkpoints.mkdir(parents=True)
        (linked_checkpoints / "step10").write_bytes(b"weights")
        (folder / "checkpoints").symlink_to(linked_checkpoints)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_overwrite_refuses_a_linked_entry_before_removing_anything(tmp_path):
    """checkpoints/ moved to another disk and linked: --overwrite neither deletes there nor half-removes the run."""
    _run_folder(tmp_path / "run", linked_checkpoints=tmp_path / "disk2" / "ckpt")
    before = _files(tmp_path)
    with pytest.raises(RunError, match=r"run/checkpoints -> .*disk2/ckpt.*nothing was removed"):
        prepare(tmp_path / "run", "pre-training", {}, {}, OWNED, resume=False, overwrite=True, is_main=True)
    assert _files(tmp_path) == before


def test_an_overwrite_that_fails_halfway_leaves_a_run_the_next_overwrite_finishes(tmp_path, monkeypatch):
    _run_folder(tmp_path / "run")
    real_rmtree, calls = shutil.rmtree, []

    def failing_rmtree(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.raises(PermissionError):
        prepare(tmp_path / "run", "pre-training", {}, {}, OWNED, resume=False, overwrite=True, is_main=True)
    assert (tmp_path / "run" / "run.json").is_file()  # removed last: still a run
    monkeypatch.undo()
    prepare(tmp_path / "run", "pre-training", {"lr": 1}, {}, OWNED, resume=False, overwrite=True, is_main=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["run.json"]
