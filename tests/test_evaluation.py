"""Evaluation (evaluation.py): beam-search lists stay aligned with their samples; MostPop by the same code."""
from pathlib import Path

import numpy as np
import pytest
import torch

import data as data_mod
from batches import to_tensors
from evaluation import recommend
from gflowgr import GRModel
from metrics import ranking_metrics


def run_dir(cfg):
    return Path(cfg.train.out) / f"toy__sft__seed{cfg.train.seed}"


def test_recommend_keeps_rows_aligned_with_samples(toy_run):
    """recommend() sorts by history length for speed; row j must still belong to sample idx[j]."""
    cfg, _, _ = toy_run
    ckpt = torch.load(run_dir(cfg) / "checkpoint.pt")
    model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).eval()
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    t = to_tensors(data_mod.split_leave_one_out(ds)["valid"], "cpu")
    idx = torch.tensor([7, 3, 120, 0, 55, 9])
    items, _ = recommend(model, t, cfg.train, idx)
    for row, i in zip(items, idx):
        hl = t["hist_len"][i : i + 1]
        direct, _ = model.beam_search(t["hist"][i : i + 1, : int(hl)], hl, beam=cfg.train.beam, topk=cfg.train.topk)
        assert row.tolist() == direct[0].tolist()


def test_mostpop_uses_training_popularity(toy_run):
    cfg, metrics, _ = toy_run
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds)
    top = np.argsort(-data_mod.item_popularity(ds), kind="stable")[:10]
    expected = ranking_metrics(np.tile(top, (len(splits["test"]), 1)), splits["test"].target)
    assert metrics["mostpop"]["test"] == pytest.approx(expected)


def test_mostpop_without_the_history_by_hand(monkeypatch):
    """--filter-seen's MostPop: a user whose history holds the two most popular items gets the
    next ones, in popularity order; a user with none of them gets the plain list."""
    import evaluation

    monkeypatch.setattr(data_mod, "item_popularity", lambda _: np.array([50, 40, 30, 20, 10, 5]))  # item 0 first
    split = data_mod.Split(hist=np.array([[0, 1, -1], [5, -1, -1]]), hist_len=np.array([2, 1]),
                           target=np.array([2, 3]), user=np.array([0, 1]))
    got = evaluation.mostpop_metrics(None, {"valid": split, "test": split}, k=2, exclude_seen=True)
    plain = evaluation.mostpop_metrics(None, {"valid": split, "test": split}, k=2)
    # user 0 gets [2, 3]: target 2 at rank 1 (NDCG 1); user 1 gets [0, 1]: target 3 missed
    assert got["test"]["hr@5"] == pytest.approx(0.5) and got["test"]["ndcg@5"] == pytest.approx(0.5)
    assert plain["test"]["hr@5"] == pytest.approx(0.0)  # [0, 1] for both users: neither target
