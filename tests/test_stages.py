"""The cached stages (stages.py): a second run loads every stage; the SFT key holds what changes the model."""
import copy
from pathlib import Path

import data as data_mod
from pipeline import run
from stages import semantic_ids, sft_key


def test_second_run_uses_the_cache(toy_run):
    cfg, metrics, _ = toy_run
    lines = []
    again = run(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "[cache] SFT checkpoint" in text and "[cache] semantic IDs" in text and "[cache] item embeddings" in text
    assert again["test"] == metrics["test"]




def test_sft_key_names_the_stage_and_ignores_settings_that_do_not_change_the_model(toy_run):
    cfg, metrics, _ = toy_run
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    _, _, ids_key = semantic_ids(ds, cfg, log=lambda *a: None)  # cached: no training
    assert Path(metrics["stage"]).name == f"sft-{sft_key(ds, ids_key, cfg)}"
    other = copy.deepcopy(cfg)
    other.train.method, other.train.threads, other.train.tag, other.train.device = "gflowgr-tb", 1, "x", "cpu"
    assert sft_key(ds, ids_key, other) == sft_key(ds, ids_key, cfg)  # the same SFT is reused
    for field, value in (("lr", cfg.train.lr * 2), ("epochs", cfg.train.epochs + 1), ("seed", 7)):
        changed = copy.deepcopy(cfg)
        setattr(changed.train, field, value)
        assert sft_key(ds, ids_key, changed) != sft_key(ds, ids_key, cfg), field
