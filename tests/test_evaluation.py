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
