"""One run end to end on `toy` (pipeline.py): artefacts, caching, the reused SFT, the seeds table, LETTER."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data as data_mod
from batches import to_tensors
from conftest import tiny_config
from config import finalize
from evaluation import evaluate
from gflowgr import GRModel
from pipeline import ranked_with_history_in, run, run_table

KEYS = {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}


def run_dir(cfg):
    return Path(cfg.train.out) / f"toy__sft__seed{cfg.train.seed}"


def test_run_writes_all_artefacts(toy_run):
    cfg, metrics, _ = toy_run
    d = run_dir(cfg)
    saved = json.loads((d / "metrics.json").read_text())
    assert set(saved["test"]) == KEYS and set(saved["valid"]) == KEYS
    assert saved["test"] == metrics["test"]
    assert json.loads((d / "config.json").read_text())["data"]["dataset"] == "toy"
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/gr" in row for row in curves) and any("eval/valid_ndcg@10" in row for row in curves)
    ckpt = torch.load(d / "checkpoint.pt")
    assert {"model", "model_args", "step", "config"} <= set(ckpt)
    assert ckpt["step"] > 0


def test_sft_beats_mostpop_on_toy(toy_run):
    _, metrics, _ = toy_run
    assert metrics["test"]["hr@10"] > metrics["mostpop"]["test"]["hr@10"] + 0.1
    assert metrics["valid"]["ndcg@10"] > metrics["mostpop"]["valid"]["ndcg@10"]


def test_checkpoint_rebuilds_the_model_and_reproduces_test_metrics(toy_run):
    cfg, metrics, _ = toy_run
    ckpt = torch.load(run_dir(cfg) / "checkpoint.pt")
    model = GRModel.from_state(ckpt["model_args"], ckpt["model"])
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    test = to_tensors(data_mod.split_leave_one_out(ds)["test"], "cpu")
    assert evaluate(model, test, cfg.train) == pytest.approx(metrics["test"])


def test_seeds_table_runs_each_seed_once_and_writes_the_results(toy_run, tmp_path):
    cfg = copy.deepcopy(toy_run[0])
    cfg.train.out = str(tmp_path)
    cfg.train.epochs, cfg.tok.rq_epochs, cfg.data.toy_users = 2, 30, 150  # the table's bookkeeping, not accuracy
    cfg.train.seeds = [42, 43]
    lines = []
    summary = run_table(cfg, log=lines.append)
    sft = summary["rows"]["sft"]["hr@10"]
    assert sft["n"] == 2 and len(sft["values"]) == 2
    assert sft["mean"] == pytest.approx(np.mean(sft["values"])) and sft["std"] == pytest.approx(np.std(sft["values"], ddof=1))
    md = (tmp_path / "results" / "toy_tiger.md").read_text()
    assert "| **" in md and "SFT" in md and json.loads((tmp_path / "results" / "toy_tiger.json").read_text())
    # a second call finds both runs finished and trains nothing
    lines2 = []
    run_table(cfg, log=lines2.append)
    assert sum("[done]" in line for line in lines2) == 2 and not any("[stage]" in line for line in lines2)


def test_letter_backbone_trains_the_cm_first_and_keeps_its_own_runs(tmp_path):
    cfg = tiny_config(tmp_path, backbone="letter")
    cfg.train.epochs, cfg.tok.rq_epochs, cfg.cm.epochs = 2, 20, 2
    cfg = finalize(cfg)
    lines = []
    metrics = run(cfg, log=lines.append)
    text = "\n".join(lines)
    assert text.index("collaborative model") < text.index("semantic IDs (letter)")
    assert metrics["tokenizer"]["collision_rate"] >= 0 and "letter_cf_cos" in metrics["tokenizer"]
    assert (tmp_path / "toy__letter__sft__seed42" / "metrics.json").exists()
    assert not (tmp_path / "toy__sft__seed42").exists()


def test_filter_seen_reuses_the_fine_tuned_model_of_the_run_ranked_with_the_history_in(toy_run, tmp_path):
    """--filter-seen on a fine-tuning run whose ranked-in run has finished: its fine-tuned model is
    loaded, not retrained, and the lists are that model's with the history out."""
    import shutil

    import config

    base, _, _ = toy_run
    shutil.copytree(base.train.out, tmp_path / "runs")  # the SFT stage, cached
    cfg = copy.deepcopy(base)
    cfg.train.out, cfg.train.method, cfg.ft.ft_epochs, cfg.cm.epochs = str(tmp_path / "runs"), "gflowgr-tb", 1, 5
    filtered = copy.deepcopy(cfg)
    filtered.train.filter_seen = True
    assert ranked_with_history_in(filtered) is None  # nothing ranked-in has run yet: it would fine-tune
    plain = run(cfg, log=lambda *a: None)
    lines = []
    reused = run(filtered, log=lines.append)
    text = "\n".join(lines)
    assert "[reuse] gflowgr-tb" in text and "[stage] gflowgr-tb" not in text
    ckpt = torch.load(config.run_dir(cfg) / "checkpoint.pt", weights_only=False)
    model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).eval()
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    for split in ("valid", "test"):  # the ranked-in run's model, ranked with the history out
        assert reused[split] == evaluate(model, to_tensors(splits[split], "cpu"), filtered.train, exclude_seen=True), split
    assert reused["test"] != plain["test"]  # the lists did change
    assert reused["finetune"] == plain["finetune"]
    d, src = config.run_dir(filtered), config.run_dir(cfg)
    assert json.loads((d / "inspect.json").read_text()) == json.loads((src / "inspect.json").read_text())
    assert (d / "checkpoint.pt").exists() and (d / "metrics.jsonl").read_text() == (src / "metrics.jsonl").read_text()


def test_copy_bonus_trains_end_to_end_and_its_checkpoint_keeps_the_bonus(tmp_path):
    """--copy-bonus: SFT learns b_l (it leaves 0), GFlowGR-TB fine-tunes the same model, and the
    saved checkpoint rebuilds it with the bonus and reproduces the run's test metrics."""
    from pipeline import run as main

    cfg = tiny_config(tmp_path, method="gflowgr-tb")
    cfg.model.copy_bonus, cfg.train.epochs = True, 3
    cfg.ft.ft_epochs, cfg.cm.epochs = 1, 3
    metrics = main(cfg, log=lambda *a: None)
    sft = torch.load(Path(metrics["stage"]) / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert sft["model_args"]["cfg"]["copy_bonus"] and sft["model"]["copy_bias"].abs().min() > 0
    cfg = finalize(cfg)
    ck = torch.load(Path(cfg.train.out) / "toy__gflowgr-tb__seed42" / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = GRModel.from_state(ck["model_args"], ck["model"]).eval()
    assert hasattr(model, "copy_bias")
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    again = evaluate(model, to_tensors(splits["test"], "cpu"), cfg.train)
    assert again == pytest.approx(metrics["test"], abs=1e-9)
