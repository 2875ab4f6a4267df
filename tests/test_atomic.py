"""atomic_path: rename-on-success, and a dead writer's temporary is swept even if its PID lives on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import psutil
import pytest

from heimdall.atomic import atomic_path, remove_stale_temporaries

WRITER = """
import sys, time, h5py
from heimdall.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with h5py.File(tmp, "w") as f:
        f["x"] = 1
    open(tmp, "rb").close()  # a library closing another descriptor must not drop the liveness lock
    print("writing", flush=True)
    time.sleep(60)
"""


def test_success_renames_and_failure_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out.h5"
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as f:
            f["x"] = 1
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as f:
            f["x"] = 2
        raise RuntimeError("stage failed")
    with h5py.File(target) as f:
        assert f["x"][()] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def _run_writer_and_kill(target, with_guardian: bool = False):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        live = target.with_name(f".{target.name}.tmp-{writer.pid}")
        assert live.exists()
        assert remove_stale_temporaries(target) == []  # still being written: left alone
        assert live.exists()
        guardians = psutil.Process(writer.pid).children() if with_guardian else []
        assert len(guardians) == int(with_guardian)
        for proc in [writer, *guardians]:
            proc.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.stdout.close()
    return live


def test_guardian_removes_a_killed_writers_temporary_without_another_writer(tmp_path):
    # Under DVC a killed stage may never run again (its outputs come back from the run cache), so
    # nobody would sweep: the writer's guardian removes the temporary when the writer dies.
    live = _run_writer_and_kill(tmp_path / "out.h5")
    deadline = time.monotonic() + 10
    while live.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live.exists()
    assert list(tmp_path.iterdir()) == []


KILLED_BEFORE_LOCK = """
import os, signal, sys
import heimdall.atomic as atomic
def die(fd):  # the temporary exists, its lock is not taken yet
    print(os.fstat(fd).st_nlink, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
atomic._try_lock = die
with atomic.atomic_path(sys.argv[1]):
    pass
"""


def test_guardian_removes_a_temporary_whose_writer_died_before_locking_it(tmp_path):
    # The CI failure this guards: a stage SIGKILLed right after creating its temporary, before the
    # guardian knew the path; DVC restored the outputs from its run cache and the file stayed.
    target = tmp_path / "out.h5"
    writer = subprocess.run([sys.executable, "-c", KILLED_BEFORE_LOCK, str(target)], capture_output=True,
                            text=True, timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert writer.stdout.strip() == "1"  # the temporary was on disk when the writer died
    deadline = time.monotonic() + 10
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []


def test_live_writer_is_respected_and_a_killed_one_is_swept(tmp_path):
    # The writer's guardian is killed too (as by `kill -9 -<pgid>` or a container stop): the next
    # writer of the same target sweeps.
    target = tmp_path / "out.h5"
    live = _run_writer_and_kill(target, with_guardian=True)
    assert live.exists()  # SIGKILL: the writer could not clean up
    assert remove_stale_temporaries(target) == [live]
    assert not live.exists()


def test_stale_temporary_is_swept_even_when_its_pid_was_reused(tmp_path):
    # The CI failure this guards: a SIGKILLed stage's PID was reused (pid_max 32768 in a container),
    # so a kill(pid, 0) liveness check kept its temporary forever. Our own PID is certainly alive.
    target = tmp_path / "out.h5"
    stale = tmp_path / f".out.h5.tmp-{os.getpid()}0"
    reused = tmp_path / ".out.h5.tmp-1"  # PID 1 always exists
    stale.write_bytes(b"half-written")
    reused.write_bytes(b"half-written")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    assert target.read_bytes() == b"done"


def test_write_json_refuses_non_finite_numbers_by_key(tmp_path):
    """Issue 20: no stage writes NaN/Inf into a JSON output (it is not JSON): one line naming the file
    and the key, the previous output intact, no temporary left."""
    from heimdall.atomic import write_json
    from heimdall.errors import HeimdallError

    out = tmp_path / "test.json"
    out.write_text('{"previous": 1}\n')
    with pytest.raises(HeimdallError) as info:
        write_json(out, {"ok": 1.0, "calibration": {"mass": [0.5, float("nan")], "t": float("-inf")}})
    msg = str(info.value)
    assert "\n" not in msg and str(out) in msg and "calibration.mass[1]" in msg and "calibration.t" in msg
    assert out.read_text() == '{"previous": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["test.json"]
