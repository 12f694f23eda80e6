"""common/run_folder.py: what --resume and --overwrite may do to an output folder, file by file."""

import json
import shutil
from pathlib import Path

import pytest

from earlybert_pretrain.common.run_folder import prepare
from earlybert_pretrain.errors import RunError

OWNED = ["run.json", "progress.json", "checkpoints", "final_model"]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def start(folder, config=None, inputs=None):
    return prepare(folder, "pre-training", config or {"lr": 1}, inputs or {"vocab": "a"}, OWNED, resume=False,
                   overwrite=False, is_main=True)


def test_a_new_folder_becomes_a_run(tmp_path):
    folder = tmp_path / "run"
    assert start(folder) is False
    record = json.loads((folder / "run.json").read_text())
    assert record["kind"] == "pre-training" and record["config"] == {"lr": 1} and record["inputs"] == {"vocab": "a"}


def test_a_folder_of_other_files_is_refused_even_with_overwrite_and_left_alone(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.bin").write_bytes(b"data")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(RunError, match=r"not a pre-training run \(notes.txt, shards\).*nothing there is deleted"):
            prepare(tmp_path, "pre-training", {}, {}, OWNED, resume=False, overwrite=overwrite, is_main=True)
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    start(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x").write_text("state")
    (tmp_path / "final_model").mkdir()
    (tmp_path / "my_notes.txt").write_text("mine")
    prepare(tmp_path, "pre-training", {"lr": 2}, {"vocab": "b"}, OWNED, resume=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt", "run.json"]
    assert json.loads((tmp_path / "run.json").read_text())["config"] == {"lr": 2}


def test_resume_needs_the_same_config_and_inputs_and_touches_nothing_when_refused(tmp_path):
    start(tmp_path, {"phase1": {"lr": 1}}, {"vocab_sha256": "a", "ticket_sha256": "t"})
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match=r"holds another pre-training run; pass --resume"):
        start(tmp_path)
    with pytest.raises(RunError, match=r"different config \(phase1.lr differ"):
        prepare(tmp_path, "pre-training", {"phase1": {"lr": 2}}, {"vocab_sha256": "a", "ticket_sha256": "t"}, OWNED,
                resume=True, overwrite=False, is_main=True)
    with pytest.raises(RunError, match=r"inputs changed since it started \(ticket_sha256\)"):
        prepare(tmp_path, "pre-training", {"phase1": {"lr": 1}}, {"vocab_sha256": "a", "ticket_sha256": "u"}, OWNED,
                resume=True, overwrite=False, is_main=True)
    assert snapshot(tmp_path) == before
    assert prepare(tmp_path, "pre-training", {"phase1": {"lr": 1}}, {"vocab_sha256": "a", "ticket_sha256": "t"},
                   OWNED, resume=True, overwrite=False, is_main=True) is True


def test_another_kind_of_run_and_a_file_in_place_of_the_folder_are_refused(tmp_path):
    prepare(tmp_path / "ft", "fine-tuning", {}, {}, ["run.json"], resume=False, overwrite=False, is_main=True)
    with pytest.raises(RunError, match="holds a fine-tuning run, not a pre-training run"):
        start(tmp_path / "ft")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"file: is a file, expected a folder"):
        start(tmp_path / "file" / "run")


def test_a_run_moved_with_cp_a_resumes_under_its_new_name(tmp_path, monkeypatch):
    """The config names the folder (output_dir) and files inside it; neither counts as a change once moved."""
    def config(root, shards="/data/shards"):
        return {"output_dir": str(root), "ticket": str(root / "ticket.json"), "data": {"shard_dir": shards},
                "optimizer": {"name": "lamb"}}

    old, new = tmp_path / "a" / "run", tmp_path / "b" / "moved"
    prepare(old, "pre-training", config(old), {"vocab": "a"}, OWNED, resume=False, overwrite=False, is_main=True)
    shutil.copytree(old, new, symlinks=True)  # cp -a
    with pytest.raises(RunError, match=r"different config \(data.shard_dir differ"):  # a real change still counts
        prepare(new, "pre-training", config(new, "/data/other"), {"vocab": "a"}, OWNED, resume=True, overwrite=False,
                is_main=True)
    assert prepare(new, "pre-training", config(new), {"vocab": "a"}, OWNED, resume=True, overwrite=False,
                   is_main=True) is True
    record = json.loads((new / "run.json").read_text())
    assert record["config"]["output_dir"] == str(new) and record["location"] == str(new)

    shutil.copytree(new, tmp_path / "c" / "again", symlinks=True)  # relative names, from another working directory
    monkeypatch.chdir(tmp_path / "c")
    assert prepare(Path("again"), "pre-training", {**config(Path("again")), "output_dir": "again"}, {"vocab": "a"},
                   OWNED, resume=True, overwrite=False, is_main=True) is True
