"""Stage cache files (cache.py): keys, atomic writes, checksums; old files without a checksum still load."""
import json
import os
from pathlib import Path

import pytest
import torch

import cache


def test_stage_key_is_stable_and_changes_with_what_it_hashes():
    a = cache.stage_key("ids-1", {"lr": 0.002, "epochs": 12})
    assert a == cache.stage_key("ids-1", {"epochs": 12, "lr": 0.002})  # dict order does not matter
    assert len(a) == 10 and a != cache.stage_key("ids-1", {"lr": 0.003, "epochs": 12})
    assert cache.fingerprint([[1, 2], [3]]) != cache.fingerprint([[1, 2, 3]])


def test_atomic_write_json_leaves_the_file_and_no_temporary(tmp_path):
    path = tmp_path / "deep" / "eval.json"
    cache.atomic_write_json({"hr@10": 0.06}, path)
    assert json.loads(path.read_text()) == {"hr@10": 0.06}
    assert list(path.parent.iterdir()) == [path]


def test_save_records_the_checksum_and_load_refuses_a_changed_file(tmp_path):
    path = tmp_path / "x.pt"
    cache.save({"w": torch.arange(4)}, path)
    assert json.loads((tmp_path / "x.pt.sha256").read_text())["size"] == path.stat().st_size
    assert cache.load(path, "x")["w"].tolist() == [0, 1, 2, 3]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    lines = []
    assert cache.load(path, "x", lines.append) is None and not path.exists()
    assert "SHA-256" in lines[0]


def test_a_kill_between_the_two_renames_keeps_the_new_save(tmp_path, monkeypatch):
    """save renames the file, then its checksum: killed in between, the new file sits beside the
    previous save's checksum; load must take it (the per-epoch resume state of a killed run)."""
    path = tmp_path / "x.pt"
    cache.save({"epoch": 1}, path)
    real = os.replace
    def killed_after_the_file(src, dst):
        real(src, dst)
        if Path(dst) == path:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
    monkeypatch.setattr(cache.os, "replace", killed_after_the_file)
    with pytest.raises(KeyboardInterrupt):
        cache.save({"epoch": 2}, path)
    monkeypatch.setattr(cache.os, "replace", real)
    assert json.loads((tmp_path / "x.pt.sha256").read_text()) != cache._digest(path)  # the old checksum
    lines = []
    assert cache.load(path, "x", lines.append, trusted=True) == {"epoch": 2} and lines == []
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.pt", "x.pt.sha256"]  # the rename completed
    # a file that matches neither checksum is still refused
    path.write_bytes(path.read_bytes()[:-3])
    assert cache.load(path, "x", lines.append) is None and "truncated" in lines[0]


def test_cache_accepts_old_files_without_checksum(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)  # written before checksums were recorded
    assert cache.load(path, "old file") == {"a": 1}
    assert (tmp_path / "x.pt.sha256").exists()  # recorded now
    assert cache.load(tmp_path / "missing.pt", "nothing") is None
