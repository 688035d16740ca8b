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


def test_copy_bonus_off_keeps_the_sft_key_of_before_and_on_names_a_new_stage(toy_run):
    """--copy-bonus came after SFT stages were cached: off, the key is computed from the model
    config without the field (so those caches still load); on, it names a stage of its own."""
    from dataclasses import asdict

    import cache
    from config import NOT_SFT_SETTINGS, train_settings

    cfg, _, _ = toy_run
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    _, _, ids_key = semantic_ids(ds, cfg, log=lambda *a: None)
    before = {k: v for k, v in asdict(cfg.model).items() if k != "copy_bonus"}
    assert sft_key(ds, ids_key, cfg) == cache.stage_key(ids_key, cache.fingerprint(ds.sequences), before,
                                                        train_settings(cfg.train, NOT_SFT_SETTINGS))
    on = copy.deepcopy(cfg)
    on.model.copy_bonus = True
    assert sft_key(ds, ids_key, on) != sft_key(ds, ids_key, cfg)


def test_filter_seen_reuses_the_sft_and_names_its_own_run(toy_run):
    """--filter-seen changes the lists, not the model: the SFT stage is loaded, its evaluation is
    cached apart, and the run gets its own folder (a --filter-seen table reads those)."""
    import torch

    from batches import to_tensors
    from evaluation import recommend
    from gflowgr import GRModel

    cfg, metrics, _ = toy_run
    filtered = copy.deepcopy(cfg)
    filtered.train.filter_seen = True
    lines = []
    got = run(filtered, log=lines.append)
    text = "\n".join(lines)
    assert "[cache] SFT checkpoint" in text and "[stage] SFT" not in text
    stage = Path(got["stage"])
    assert stage == Path(metrics["stage"]) and (stage / "eval-history-out.json").exists() and (stage / "eval.json").exists()
    assert (Path(cfg.train.out) / "toy__sft+history-out__seed42" / "metrics.json").exists()
    # the filtered lists hold no history item; the unfiltered ones did, so the metrics moved
    ckpt = torch.load(stage / "checkpoint.pt", weights_only=False)
    model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).eval()
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    t = to_tensors(data_mod.split_leave_one_out(ds, cfg.data.max_his_len)["test"], "cpu")
    seen_in = lambda items: (items[:, :, None] == t["hist"][:, None, :]).any(2)  # (N, k)
    assert not seen_in(recommend(model, t, filtered.train, exclude_seen=True)[0]).any()
    assert seen_in(recommend(model, t, cfg.train)[0]).any()
    assert got["test"] != metrics["test"]
