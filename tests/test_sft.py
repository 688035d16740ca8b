"""The SFT loop (sft.py): the warm-up + cosine schedule by hand, the best epoch kept, early stopping."""
import json
import math
from pathlib import Path

import pytest
import torch

import data as data_mod


def curves(metrics):
    return [json.loads(line) for line in (Path(metrics["stage"]) / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_follows_warm_up_then_cosine_to_a_tenth(toy_run):
    cfg, metrics, _ = toy_run
    t = cfg.train
    n_train = len(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False))["train"])
    total = t.epochs * math.ceil(n_train / t.batch_size)

    def lr_at(step):  # the schedule written out: linear warm-up, then cosine from the peak to 10% of it
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        return t.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - t.warmup_steps) / (total - t.warmup_steps))))

    logged = [(r["step"], r["charts/lr"]) for r in curves(metrics) if "charts/lr" in r]
    assert len(logged) >= 2  # every 50 steps
    for step, lr in logged:
        assert lr == pytest.approx(lr_at(step), rel=1e-6), step
    assert max(lr for _, lr in logged) <= t.lr * (1 + 1e-9) and min(lr for _, lr in logged) >= 0.1 * t.lr * (1 - 1e-9)


def test_the_kept_model_is_the_epoch_with_the_best_valid_ndcg(toy_run):
    cfg, metrics, _ = toy_run
    evals = [r for r in curves(metrics) if "eval/valid_ndcg@10" in r]
    assert [r["epoch"] for r in evals] == list(range(1, metrics["sft"]["epochs_run"] + 1))
    scores = [r["eval/valid_ndcg@10"] for r in evals]
    best = metrics["sft"]["best_epoch"]
    assert scores[best - 1] == max(scores) and scores.index(max(scores)) == best - 1  # the first best
    if metrics["sft"]["epochs_run"] < cfg.train.epochs:  # stopped early: `patience` epochs without a better one
        assert metrics["sft"]["epochs_run"] - best == cfg.train.patience
    # the checkpoint is that epoch's model: its step is the best epoch's last step
    ckpt = torch.load(Path(metrics["stage"]) / "checkpoint.pt")
    assert ckpt["step"] == metrics["sft"]["step"] == next(r["step"] for r in evals if r["epoch"] == best)


def test_eval_from_skips_early_scoring_and_trains_the_same_model(toy_run):
    """--eval-from 4: epochs 1-3 are trained but not scored, so the same weights give the same
    valid scores from epoch 4 on, and the kept epoch is the best of those."""
    from conftest import tiny_config
    from pipeline import run as main

    cfg, metrics, _ = toy_run
    late = main(tiny_config(cfg.train.out, eval_from=4), log=lambda *a: None)  # the same IDs, its own SFT stage
    assert late["stage"] != metrics["stage"]
    every = {r["epoch"]: r["eval/valid_ndcg@10"] for r in curves(metrics) if "eval/valid_ndcg@10" in r}
    scored = {r["epoch"]: r["eval/valid_ndcg@10"] for r in curves(late) if "eval/valid_ndcg@10" in r}
    assert min(scored) == 4 and sorted(scored) == list(range(4, late["sft"]["epochs_run"] + 1))
    assert all(scored[e] == every[e] for e in scored if e in every)  # bit-identical training
    assert late["sft"]["best_epoch"] == max(scored, key=lambda e: (scored[e], -e))
    trained = [r for r in curves(late) if "charts/epoch_seconds" in r and r["epoch"] < 4]
    assert [r["epoch"] for r in trained] == [1, 2, 3]  # logged, without valid metrics


def test_bf16_autocast_trains_another_model_in_another_stage(toy_run):
    """--bf16 runs the SFT step under bfloat16 autocast: a stage of its own (the float32 stage's
    key is unchanged), different numbers (the autocast is really on), and a model that learns."""
    import copy

    from pipeline import run as main

    cfg, fp32, _ = toy_run
    cfg = copy.deepcopy(cfg)
    cfg.train.bf16, cfg.train.tag = True, "bf16"  # beside the float32 run, sharing its IDs
    bf16 = main(cfg, log=lambda *a: None)
    assert bf16["stage"] != fp32["stage"] and bf16["tokenizer"]["collision_rate"] == fp32["tokenizer"]["collision_rate"]
    assert bf16["valid"] != fp32["valid"]
    losses = [r["loss/gr"] for r in curves(bf16) if "loss/gr" in r]
    assert losses[-1] < losses[0] - 0.5  # L_GR falls under bf16 too
    assert bf16["test"]["hr@10"] > bf16["mostpop"]["test"]["hr@10"]
