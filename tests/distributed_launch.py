"""Start N ranks of tests/distributed_worker.py as torchrun would (its environment variables, a
localhost rendezvous), wait for them with a timeout (a hang fails, the ranks are killed), and hand
back their exit codes, logs and reports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("distributed_worker.py")


@dataclass
class Run:
    codes: list            # exit code per rank (None: killed after the timeout)
    logs: list             # stderr + stdout per rank
    reports: list          # the rank's JSON report, or None
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c == 0 for c in self.codes)

    def explain(self) -> str:
        return "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-4000:]}" for r, (c, log) in enumerate(zip(self.codes, self.logs)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout: float = 240.0, args=(), per_node: int | None = None,
           script: Path | None = None) -> Run:
    """Run `scenario` of the worker (or `script` with `args`, named `scenario` in the logs) on `world` ranks."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(per_node or world), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    procs, files = [], []
    start = time.monotonic()
    for rank in range(world):
        log = open(out / f"{scenario}-rank{rank}.log", "w+")
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank % (per_node or world))}
        cmd = [str(script), *map(str, args)] if script else [str(WORKER), scenario, str(out), *map(str, args)]
        procs.append(subprocess.Popen([sys.executable, *cmd], env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        files.append(log)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:   # a rank still running after the deadline hangs: stop it
        if p.poll() is None:
            p.kill()
            p.wait()
    logs = []
    for f in files:
        f.seek(0)
        logs.append(f.read())
        f.close()
    reports = []
    for rank in range(world):
        path = out / f"{scenario}-rank{rank}.json"
        reports.append(json.loads(path.read_text()) if path.is_file() else None)
    return Run(codes, logs, reports, time.monotonic() - start)
