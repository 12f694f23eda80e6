"""common/files.py: atomic writes keep the umask's permissions, leave nothing half-written, sweep stale temps."""

import hashlib
import json
import os
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
    remove_stale_temps,
    sha256_file,
)
from earlybert_pretrain.errors import TicketError, UserError
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
