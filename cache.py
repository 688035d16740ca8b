"""Stage cache files: written atomically with their size and SHA-256 recorded, verified on load.

Every expensive stage (item embeddings, semantic IDs, the SFT checkpoint, the collaborative
model) is cached under `runs/<dataset>/<stage>-<key>/`. A cached file is used only if it is
whole: `save` writes it to a temporary file, renames it into place (a crash never leaves half
a file under the real name) and records `{"size", "sha256"}` beside it in `<file>.sha256`;
`load` checks size and checksum, then that torch can load it. A truncated or corrupt file is
reported, deleted, and `load` returns None so that the caller redoes the stage.

Files written before checksums were recorded have no `.sha256`: they are accepted if they
load, and their checksum is recorded then.

Usage: `cache.save(obj, path)`; `obj = cache.load(path, "SFT checkpoint", log)  # None: redo the stage`
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save(obj, path: Path) -> None:
    """torch.save to a temporary file, rename it into place, then record its size and checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    digest = _digest(tmp)
    os.replace(tmp, path)
    side = _sidecar(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(digest))
    os.replace(side_tmp, side)


def load(path: Path, what: str, log=print, map_location=None):
    """The object cached at path, or None if it is absent or damaged (then it is deleted and said so)."""
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
        if got["size"] != recorded.get("size"):
            problem = f"{got['size']:,} bytes where {recorded.get('size'):,} were written (truncated?)"
        elif got["sha256"] != recorded.get("sha256"):
            problem = "its SHA-256 differs from the one recorded when it was written"
    obj = None
    if problem is None:
        try:
            obj = torch.load(path, map_location=map_location)
        except Exception as e:  # torch raises many kinds on a damaged file
            problem = f"it does not load ({type(e).__name__})"
    if problem is not None:
        log(f"[cache] {what} {path} is damaged: {problem}. Deleting it and redoing that stage.")
        path.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        return None
    if recorded is None:  # written before checksums were recorded: it loads, so record it now
        side.write_text(json.dumps(_digest(path)))
    return obj
