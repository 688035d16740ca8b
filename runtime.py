"""What every training run shares: seeding, the device, the metrics.jsonl logger, the guard
against non-finite losses, and the peak memory it reports.

Training curves go to `metrics.jsonl`, one JSON object per logged step, keys grouped by
prefix as cleanrl groups them: `loss/...`, `gfn/...`, `grad/...`, `eval/...`, `charts/...`.
A loss or gradient that stops being finite ends the run with a message naming the step and
the term, before anything from that epoch is saved.

Usage: `set_seed(42); logger = JsonlLogger(path); logger.log(step=1, **{"loss/gr": 3.2})`
"""
from __future__ import annotations

import json
import os
import random
import resource
from pathlib import Path

import numpy as np
import torch

import distributed


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (dropout, weight initialisation)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; cpu / cuda as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class JsonlLogger:
    """Append training curves to metrics.jsonl, one JSON object per line, keys grouped by prefix."""

    def __init__(self, path: Path, resume_bytes: int | None = None):
        """resume_bytes: continue an interrupted run's file, cut back to its length at the checkpoint.
        Under torchrun rank 0 alone writes; the other ranks' loggers write nowhere."""
        self.path = path
        if not distributed.is_main():
            self.f = open(os.devnull, "w")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_bytes is not None and path.exists():
            self.f = open(path, "r+")
            self.f.truncate(resume_bytes)
            self.f.seek(resume_bytes)
        else:
            self.f = open(path, "w")

    def log(self, **row) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def restart(self) -> None:
        """Empty the file: the run starts afresh after all (its resume state was refused)."""
        if not distributed.is_main():
            return
        self.f.seek(0)
        self.f.truncate(0)

    def tell(self) -> int:
        return self.f.tell() if distributed.is_main() else 0

    def close(self) -> None:
        self.f.close()


STOPPED = ("The run stopped before saving anything from this epoch (the last per-epoch state is kept); "
           "rerun with a lower learning rate (--lr for SFT, --ft-lr / --head-lr for fine-tuning), "
           "or check the rewards (--reward, --reward-beta).")


def check_finite(step: int, loss: torch.Tensor, parts: dict, grad_norm: torch.Tensor, stage: str = "") -> None:
    """Stop with a message naming the step and the offending term, before a NaN is saved."""
    if not torch.isfinite(loss):
        bad = [k for k, v in parts.items() if not torch.isfinite(torch.as_tensor(v)).all()] or ["loss"]
        raise FloatingPointError(f"non-finite {stage}loss at step {step}: {', '.join(bad)}. {STOPPED}")
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite {stage}gradient at step {step} (loss {loss.item():.4g}). {STOPPED}")
