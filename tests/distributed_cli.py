"""One rank of a deltakit command (`python tests/distributed_cli.py MODULE ARGS...`, e.g.
benchmarks.cuge.run or search.s3pet), started N times by tests/distributed_launch.py with
torchrun's environment. The command runs as `python -m MODULE ARGS` would, with two checks around it:
* a rank other than 0 that writes a file through deltakit.io.atomic_write (every output file of
  these commands goes through it) fails with an AssertionError: rank 0 alone writes;
* DELTAKIT_TEST_KILL_AFTER=FILE: the last rank kills itself (SIGKILL) once FILE exists (after
  DELTAKIT_TEST_KILL_DELAY seconds), as a rank that dies in the middle of a run.
"""
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deltakit.io  # noqa: E402

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank0_writes_only():
    if RANK == 0:
        return
    original = deltakit.io.atomic_write

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"rank {RANK} wrote {path}: only rank 0 may write")
    for module in list(sys.modules.values()):   # modules that imported it by name; later imports get `refuse`
        if getattr(module, "atomic_write", None) is original:
            module.atomic_write = refuse


def kill_when_asked():
    kill_after = os.environ.get("DELTAKIT_TEST_KILL_AFTER")
    if not kill_after or RANK != WORLD - 1:
        return

    def watch():
        while not Path(kill_after).exists():
            time.sleep(0.02)
        time.sleep(float(os.environ.get("DELTAKIT_TEST_KILL_DELAY", "0")))
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    rank0_writes_only()
    kill_when_asked()
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
