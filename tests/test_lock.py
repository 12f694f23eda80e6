"""One run per folder: a second taker of the folder's lock is refused with the holder named; a killed holder's lock
is free again."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from earlybert_pretrain.common.lock import LOCK_FILE, hold_run_lock
from earlybert_pretrain.errors import RunError

HOLDER = """
import sys, time
from earlybert_pretrain.common.lock import hold_run_lock
with hold_run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of ``tmp_path / "run"``."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield folder, process
    finally:
        process.kill()
        process.wait()


def test_a_second_process_is_refused_with_the_holder_named(holder):
    folder, process = holder
    with pytest.raises(RunError) as refused, hold_run_lock(folder, "shard stage"):
        pass
    message = str(refused.value)
    assert f"pid {process.pid} on {socket.gethostname()}" in message
    assert str(folder) in message and "another shard stage" in message and "\n" not in message
    assert (folder / LOCK_FILE).exists()  # the refused taker left the holder's lock alone


def test_a_sigkilled_holders_lock_can_be_taken(holder):
    folder, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_FILE).exists()  # a crash leaves the file, naming a dead pid, but not the lock
    with hold_run_lock(folder) as lock_path:
        assert f'"pid": {os.getpid()}' in lock_path.read_text()
    assert not lock_path.exists()


def test_one_process_cannot_take_its_own_folder_twice(tmp_path):
    with hold_run_lock(tmp_path / "run"):
        with pytest.raises(RunError, match=f"pid {os.getpid()}"), hold_run_lock(tmp_path / "run"):
            pass


def test_release_leaves_the_disk_as_it_was(tmp_path):
    with hold_run_lock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []  # the folders it created, empty again, are gone
    (tmp_path / "kept").mkdir()
    with hold_run_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "output.txt").write_text("work")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["output.txt"]


def test_a_file_in_place_of_the_folder_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(RunError, match="run: is a file, expected a folder"), hold_run_lock(tmp_path / "run"):
        pass
