"""Rank faults on two CPU ranks: a start-up check failing on one rank alone, a rank killed (SIGKILL) or stopped
(SIGSTOP) mid-run. Every surviving rank ends promptly (or within engine.collective_timeout_s) with one line naming
the rank at fault, and no traceback."""

import errno
import fcntl
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pretrain import free_port, subprocess_env, tiny_recipe

from earlybert_pretrain.common.lock import hold_run_lock
from earlybert_pretrain.common.oserrors import FileSystemError
from earlybert_pretrain.errors import DataError, LostRankError, RunError
from earlybert_pretrain.train import distributed

pytest_plugins = ["data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
PROGRAM = [sys.executable, "-m", "earlybert_pretrain.pretrain"]


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))
    return path


class Ranks:
    """Ranks 0 and 1 started by hand (the variables a launcher sets), each logging to its own file."""

    def __init__(self, args: list[str], logs: Path) -> None:
        port = free_port()
        self.logs = [logs / f"rank{rank}.log" for rank in (0, 1)]
        self.processes = []
        for rank, log in enumerate(self.logs):
            env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            with log.open("w") as out:
                self.processes.append(subprocess.Popen([*PROGRAM, *args], cwd=ROOT, env=env, stdout=out,
                                                       stderr=subprocess.STDOUT))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, pattern: str, timeout: float = 600) -> None:
        """Until rank 0's log matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(0)):
            assert time.monotonic() < deadline and self.processes[0].poll() is None, self.log(0)[-3000:]
            time.sleep(0.2)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def ranks(tmp_path):
    started = []

    def start(args: list[str]) -> Ranks:
        started.append(Ranks(args, tmp_path))
        return started[-1]

    yield start
    for each in started:
        each.close()


def last_line(log: str) -> str:
    return log.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_other_at_once_with_one_line_naming_it(recipe, ranks, tmp_path, victim):
    run = ranks(["--config", str(recipe), f"output_dir={tmp_path / 'run'}"])
    run.wait_for(r"search step 2/6")
    run.processes[victim].send_signal(signal.SIGKILL)
    survivor = 1 - victim
    started = time.monotonic()
    assert run.processes[survivor].wait(timeout=120) == 1
    waited = time.monotonic() - started
    log = run.log(survivor)
    assert last_line(log) == (
        f"earlybert-pretrain: error: rank {victim} is gone (its connection closed: it crashed or was killed; see its "
        f"log); rank {survivor} of 2 stopped too. Restart the run with --resume: it continues from its last complete "
        "checkpoint"), log[-3000:]
    assert "Traceback" not in log and "gloo" not in log
    print(f"survivor stopped {waited:.1f} s after the fault")  # shown with pytest -rP
    assert waited < 60, waited


@pytest.mark.slow
def test_a_stopped_rank_ends_the_other_within_the_collective_timeout(recipe, ranks, tmp_path):
    timeout_s = 20
    run = ranks(["--config", str(recipe), f"output_dir={tmp_path / 'run'}",
                 f"engine.collective_timeout_s={timeout_s}"])
    run.wait_for(r"search step 2/6")
    run.processes[1].send_signal(signal.SIGSTOP)  # as if stuck in an NFS read: alive, never answering
    started = time.monotonic()
    assert run.processes[0].wait(timeout=10 * timeout_s) == 1
    waited = time.monotonic() - started
    log = run.log(0)
    assert last_line(log) == (
        "earlybert-pretrain: error: rank 1 did not answer within collective_timeout_s (stopped, or stuck in a read); "
        "rank 0 of 2 stopped too. Restart the run with --resume: it continues from its last complete checkpoint"
    ), log[-3000:]
    assert "Traceback" not in log
    print(f"survivor stopped {waited:.1f} s after the fault")  # shown with pytest -rP
    assert timeout_s - 1 < waited < 3 * timeout_s, waited  # DeepSpeed's own default would be 10 minutes


@pytest.mark.slow
def test_a_start_up_check_failing_on_one_rank_stops_both_through_the_launcher(recipe, wiki_build, tmp_path):
    """Rank 1 alone sees an empty shard folder (a node where the data disk is not mounted): both ranks stop with
    rank 1's line; the run folder is never made (rank 0 would otherwise have taken its lock)."""
    empty = tmp_path / "not-mounted"
    empty.mkdir()
    out = tmp_path / "run"
    # Each rank runs this through sh, which gives rank 1 (RANK=1 from the launcher) its own shard_dir.
    script = 'exec "$0" -m earlybert_pretrain.pretrain "$@" $([ "$RANK" = 1 ] && echo "data.shard_dir=$EMPTY")'
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port",
               str(free_port()), "--no_python", "--no_local_rank", "sh", "-c", script, sys.executable,
               "--config", str(recipe), f"output_dir={out}"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env={**subprocess_env(), "EMPTY": str(empty)}, capture_output=True,
                            text=True, timeout=300)
    waited = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith("earlybert-pretrain: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], output[-4000:]  # one line from each rank, the same
    assert re.fullmatch(rf"earlybert-pretrain: error: rank 1: {re.escape(str(empty))}.*", lines[0]), lines
    assert "Traceback" not in output
    assert not out.exists()
    print(f"the whole command took {waited:.1f} s")  # shown with pytest -rP
    assert waited < 120, waited


@pytest.mark.slow
def test_rank_0_refused_its_run_lock_stops_rank_1_with_rank_0s_line(recipe, ranks, tmp_path):
    """Another run holds the folder: rank 0 alone takes the lock, so only rank 0 fails its check; rank 1 (which
    passed all of its own) stops with rank 0's line instead of waiting in a barrier."""
    out = tmp_path / "run"
    with hold_run_lock(out, "pre-training run"):
        run = ranks(["--config", str(recipe), f"output_dir={out}"])
        codes = [process.wait(timeout=300) for process in run.processes]
        assert sorted(path.name for path in out.iterdir()) == [".earlybert.lock"]  # the holder's, untouched
    assert codes == [2, 2], (run.log(0)[-2000:], run.log(1)[-2000:])
    for rank in (0, 1):
        assert re.fullmatch(rf"earlybert-pretrain: error: rank 0: {re.escape(str(out))}: another pre-training run is "
                            rf"using this folder \(pid \d+ on .*", last_line(run.log(rank))), run.log(rank)[-2000:]
        assert "Traceback" not in run.log(rank)


def test_a_file_system_without_locks_is_named_and_the_folder_left_as_found(tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # what NFS without lockd answers
    with pytest.raises(RunError, match=r"run/.earlybert.lock: this file system refuses locks \(No locks available; "
                                       r"e.g. NFS without lockd\): run the lock daemon, mount with -o "
                                       r"local_lock=flock"):
        with hold_run_lock(tmp_path / "new" / "run"):
            pass
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_rank_that_never_joins_ends_the_other_after_the_timeout_with_one_line(recipe, tmp_path):
    """Rank 1 never starts (it failed before joining, or cannot reach rank 0): rank 0 stops in the rendezvous."""
    env = {**subprocess_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    out = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run([*PROGRAM, "--config", str(recipe), f"output_dir={out}", "engine.collective_timeout_s=5"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    waited = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert last_line(result.stderr).startswith(
        "earlybert-pretrain: error: not every rank joined the process group within collective_timeout_s (WORLD_SIZE=2"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr and not out.exists()
    print(f"the whole command took {waited:.1f} s")  # shown with pytest -rP
    assert waited < 120, waited


@pytest.mark.parametrize("others, mine, expected", [
    # (what rank 1 reports, what rank 0's block raises, what rank 0 raises)
    (("user-error", DataError, "/data: not found"), None, (DataError, "rank 1: /data: not found")),
    (("failed", None, "KeyError: 'x'"), None, (LostRankError, r"rank 1 failed at start-up \(KeyError: 'x'; its "
                                                               r"traceback is in its log\); rank 0 stopped too")),
    (("user-error", RunError, "bad lr"), RunError("bad lr"), (RunError, "bad lr")),  # alike: as on one rank
    (("user-error", RunError, "bad lr"), KeyError("bug"), (KeyError, "bug")),  # this rank's bug keeps its own
    (None, PermissionError(13, "Permission denied", "/out"), (FileSystemError, "rank 0: /out: Permission denied")),
])
def test_agreed_start_up_checks_decide_from_every_ranks_outcome(monkeypatch, others, mine, expected):
    """Rank 0's view of ``agreed`` with rank 1's outcome given (the collective is the 2-rank tests' business)."""
    monkeypatch.setattr(distributed, "from_every_rank", lambda outcome: [outcome, others])
    error_type, message = expected
    with pytest.raises(error_type, match=message):
        with distributed.agreed():
            if mine is not None:
                raise mine


def test_agreed_a_bug_on_rank_1_keeps_its_traceback_there_when_rank_0_failed_too(monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "from_every_rank",
                        lambda outcome: [("user-error", DataError, "/data: not found"), outcome])
    with pytest.raises(KeyError, match="bug"):
        with distributed.agreed():
            raise KeyError("bug")
