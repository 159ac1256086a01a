"""wandb for the structure search and the CUGE runs: one behaviour for both. Offline unless the user
configured wandb: a WANDB_MODE of their own, or a login (WANDB_API_KEY, or the key `wandb login`
keeps in ~/.netrc) lets wandb decide; otherwise the run is written offline into the output folder
(OUT/wandb/offline-run-*) and nothing is sent (`wandb sync OUT/wandb/offline-run-*` sends it later).

    log = Run(enabled, "deltakit-s3pet", config, out_dir, name)
    log.log({"search/loss": 0.69}, step=1); log.image("gates", "gates.png"); log.summary({"cost": 992})
    log.finish()

A disabled Run does nothing, and under torchrun only rank 0's is enabled; wandb is imported only by an
enabled one (its callers check the extra first).
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse


def logged_in() -> bool:
    """An API key in the environment, or one `wandb login` wrote to the netrc file for wandb's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):   # no netrc file (the usual case), or one we cannot read
        return False


def mode() -> str | None:
    """wandb.init's mode: None (wandb's own choice) when the user configured wandb, else "offline"."""
    return None if "WANDB_MODE" in os.environ or logged_in() else "offline"


class Run:
    """One wandb run, or nothing when not enabled."""

    def __init__(self, enabled: bool = False, project: str = "deltakit", config: dict | None = None, out=None,
                 name: str | None = None):
        self.run = None
        from deltakit import distributed as dist
        if not enabled or not dist.is_main():   # torchrun: one run, rank 0's
            return
        import wandb
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, config=config, dir=str(out) if out is not None else None,
                              name=name, mode=mode(), resume="allow")

    def log(self, values: dict, step: int | None = None):
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, key: str, path, caption: str | None = None):
        """A picture the run also wrote as a file (a loss curve, the gate heat map), as a wandb.Image."""
        if self.run is not None and Path(path).is_file():
            import wandb
            self.run.log({key: wandb.Image(str(path), caption=caption)})

    def summary(self, values: dict):
        """Final numbers (test scores, the chosen structure's cost): the run's summary, not a history step."""
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
