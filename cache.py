"""Stage cache files: written atomically with their size and SHA-256 recorded, verified on load.

Every expensive stage (item embeddings, semantic IDs, the SFT checkpoint, the collaborative
model) is cached under `runs/<dataset>/<stage>-<key>/`. A cached file is used only if it is
whole: `save` writes it to a temporary file, renames it into place (a crash never leaves half
a file under the real name) and records `{"size", "sha256"}` beside it in `<file>.sha256`;
`load` checks size and checksum, then that torch can load it. A truncated or corrupt file is
reported, deleted, and `load` returns None so that the caller redoes the stage.

Files written before checksums were recorded have no `.sha256`: they are accepted if they
load, and their checksum is recorded then.

Resume states (a training stage's whole state at the end of an epoch: model, optimiser,
schedule, batch order, random generators) are saved the same way; `load_resume` returns one
only if it belongs to the same configuration.

A stage's folder is named by `stage_key`, a short hash of the configs that determine its
output (and `fingerprint`, a hash of the data itself), so two configurations never share one.

Usage: `cache.save(obj, path)`; `obj = cache.load(path, "SFT checkpoint", log)  # None: redo the stage`
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

import distributed


def stage_key(*parts) -> str:
    """Short stable hash of the configs that determine a stage's output."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def fingerprint(obj) -> str:
    """Hash of the data itself (item texts, user sequences): two toy worlds with the same
    sizes but another seed or user count must not share a cached stage."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def atomic_write_json(obj, path: Path) -> None:
    """Write JSON to a temporary file and rename it into place: a crash never leaves half a file.
    Under torchrun rank 0 alone writes (distributed.py)."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save(obj, path: Path) -> None:
    """torch.save to a temporary file, write its size and checksum beside it, then rename both
    into place. Under torchrun rank 0 alone writes (distributed.py).

    The two renames cannot be one atomic step: a process killed between them leaves the new
    file with the previous checksum, and the new checksum still in `<name>.sha256.tmp`; `load`
    accepts the file when that one matches, so a kill at any moment keeps the last whole save.
    """
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    side = _sidecar(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(_digest(tmp)))
    os.replace(tmp, path)
    os.replace(side_tmp, side)


def load(path: Path, what: str, log=print, map_location=None, trusted: bool = False):
    """The object cached at path, or None if it is absent or damaged (then it is deleted and said so).

    trusted: a file this code wrote itself that holds more than tensors (random-generator
    states): unpickled in full (torch.load weights_only=False).
    """
    path = Path(path)
    if not path.exists():
        return None
    side = _sidecar(path)
    problem = None
    recorded = None
    if side.exists():
        try:
            recorded = json.loads(side.read_text())
        except json.JSONDecodeError:
            problem = f"its checksum file {side.name} is unreadable"
    if recorded is not None:
        got = _digest(path)
        pending = side.with_name(side.name + ".tmp")  # killed between save's two renames (see save)
        if got != recorded and pending.exists() and _read_json(pending) == got:
            recorded = got
            if distributed.is_main():
                os.replace(pending, side)
        if got["size"] != recorded.get("size"):
            problem = f"{got['size']:,} bytes where {recorded.get('size'):,} were written (truncated?)"
        elif got["sha256"] != recorded.get("sha256"):
            problem = "its SHA-256 differs from the one recorded when it was written"
    obj = None
    if problem is None:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=not trusted)
        except Exception as e:  # torch raises many kinds on a damaged file
            problem = f"it does not load ({type(e).__name__})"
    if problem is not None:
        log(f"[cache] {what} {path} is damaged: {problem}. Deleting it and redoing that stage.")
        if distributed.is_main():
            path.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            side.with_name(side.name + ".tmp").unlink(missing_ok=True)
        return None
    if recorded is None and distributed.is_main():  # written before checksums were recorded: it loads, so record it now
        side.write_text(json.dumps(_digest(path)))
    return obj


def remove(path: Path) -> None:
    """Delete a cached file and its checksum (a finished stage's resume state); rank 0 alone under torchrun."""
    if not distributed.is_main():
        return
    Path(path).unlink(missing_ok=True)
    _sidecar(Path(path)).unlink(missing_ok=True)


def rng_state() -> dict:
    """Every random generator a training loop draws from implicitly (dropout, numpy, random)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["random"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_resume(path: Path, identity, what: str, log=print) -> dict | None:
    """The resume state at path if it is whole and belongs to this configuration (identity), else None.

    Saved at the end of every epoch with `save` (atomic, checksummed), so a crash never leaves
    it half written; a damaged one or one from another configuration is said and ignored, and
    the stage starts afresh.
    """
    state = load(path, f"resume state of {what}", log, trusted=True)
    if state is None:
        return None
    if state.get("identity") != identity:
        log(f"[resume] {path} belongs to another configuration: {what} starts afresh")
        return None
    return state
