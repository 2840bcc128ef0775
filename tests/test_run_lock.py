"""One run per --save directory: the second run is refused, stale locks are taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, run_cli
from megatron_rlp.training.run_lock import LOCK_FILE, RunLock


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ValueError, match=f"in use by another run: pid {os.getpid()} on "):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(str(tmp_path)).acquire()  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "process_start": 1.0, "started": 1.0}))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_never_assumed_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": "node-elsewhere", "pid": 1, "process_start": 1.0, "started": 1.0}))
    with pytest.raises(ValueError, match="pid 1 on node-elsewhere .*delete .*run.lock"):
        RunLock(str(tmp_path)).acquire()


def test_two_runs_on_one_save_directory_the_second_stops_at_once(tiny_flags, tmp_path):
    save = str(tmp_path / "shared")
    first = subprocess.Popen(
        [sys.executable, "-m", "megatron_rlp.train", *tiny_flags, "--train-iters", "400",
         "--save", save, "--save-interval", "1000"],
        cwd=REPO_ROOT, env=dict(os.environ, TORCHDYNAMO_DISABLE="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(save, LOCK_FILE)) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        second = run_cli(tiny_flags + ["--train-iters", "2", "--save", save, "--seed", "2"])
        assert second.returncode == 2
        error = second.stderr.strip().splitlines()
        assert len(error) == 1 and f"pid {first.pid}" in error[0] and "in use" in error[0]
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
