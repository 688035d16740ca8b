"""The pipeline end to end on `toy`: artefacts, MostPop reference, caching, evaluation alignment, CLI errors."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data as data_mod
import train
from conftest import tiny_config
from gflowgr import GRModel
from metrics import ranking_metrics
from train import Config, cli, evaluate, finalize, main, parse_config, recommend, to_tensors

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


def test_second_run_uses_the_cache(toy_run):
    cfg, metrics, _ = toy_run
    lines = []
    again = main(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "[cache] SFT checkpoint" in text and "[cache] semantic IDs" in text and "[cache] item embeddings" in text
    assert again["test"] == metrics["test"]


def test_mostpop_uses_training_popularity(toy_run):
    cfg, metrics, _ = toy_run
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds)
    top = np.argsort(-data_mod.item_popularity(ds), kind="stable")[:10]
    expected = ranking_metrics(np.tile(top, (len(splits["test"]), 1)), splits["test"].target)
    assert metrics["mostpop"]["test"] == pytest.approx(expected)


def test_parse_config_preset_then_flags():
    cfg = parse_config(["--dataset", "toy", "--epochs", "3", "--d-model", "32"])
    assert cfg.train.epochs == 3 and cfg.model.d_model == 32
    assert cfg.tok.codebook_size == 16  # from the toy preset
    assert parse_config(["--dataset", "beauty"]).tok.codebook_size == 256


def finetune_config(toy_run, method, **ft):
    cfg, _, _ = toy_run
    c = copy.deepcopy(cfg)
    c.train.method = method
    c.cm.epochs, c.cm.patience = 3, 3
    c.ft.ft_epochs, c.ft.head_warmup, c.ft.inspect_users = 1, 5, 5
    for k, v in ft.items():
        setattr(c.ft, k, v)
    return c


@pytest.mark.parametrize("method", ["gflowgr-tb", "gflowgr-db", "sft-continued"])
def test_finetuning_methods_run_from_the_cached_sft(toy_run, method):
    cfg = finetune_config(toy_run, method)
    lines = []
    metrics = main(cfg, log=lines.append)
    assert "[cache] SFT checkpoint" in "\n".join(lines)
    d = Path(cfg.train.out) / f"toy__{method}__seed{cfg.train.seed}"
    saved = json.loads((d / "metrics.json").read_text())
    assert set(saved["test"]) == KEYS and 0 <= saved["test"]["hr@10"] <= 1
    assert saved["sft_eval"]["test"] == toy_run[1]["test"]  # the SFT reference row is the cached SFT
    ckpt = torch.load(d / "checkpoint.pt")
    assert {"model", "model_args", "heads", "step", "config"} <= set(ckpt)
    # sft-continued gets exactly the fine-tuning budget of the GFlowGR methods
    n_batches = math.ceil(len(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False))["train"]) / cfg.train.batch_size)
    assert metrics["finetune"]["step"] == n_batches
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*curves)
    if method != "sft-continued":
        assert {"loss/gr", "loss/gfn", "gfn/log_z", "gfn/log_r_obs", "gfn/log_r_aug", "weight/mean", "sampler/cm_score",
                "gfn/residual_obs", "gfn/residual_aug", "grad/gr", "grad/gfn", "grad/total", "charts/clipped"} <= keys
        for r in (r for r in curves if "grad/total" in r):
            assert r["charts/clipped"] == float(r["grad/total"] > 1.0)
            assert r["gfn/residual_obs"] >= 0 and r["gfn/residual_aug"] >= 0
            # the two terms' gradients add up to the total (triangle inequality, both ways)
            assert abs(r["grad/gr"] - r["grad/gfn"]) - 1e-3 <= r["grad/total"] <= r["grad/gr"] + r["grad/gfn"] + 1e-3
        ins = json.loads((d / "inspect.json").read_text())
        user = ins["users"][0]
        assert len(user["trajectories"]) == 1 + cfg.sampler.K
        obs = user["trajectories"][0]
        assert obs["observed"] and obs["item"] == user["target"] and obs["r_sim"] == cfg.tok.levels and obs["r_a"] == 1
        assert len(obs["p_f"]) == 4 and all(0 < p <= 1 for p in obs["p_f"])
        assert all(1.0 <= tr["weight"] <= 1 / 0.3**2 + 1e-3 for tr in user["trajectories"])
        assert len(user["sft"]["items"]) == 10 and len(user["finetuned"]["items"]) == 10


@pytest.mark.parametrize("argv, message", [
    (["--reward", "ra,foo"], "--reward must be"),
    (["--candidates", "beam"], "unknown --candidates 'beam'"),
    (["--reward-beta", "0"], "--reward-beta must be > 0"),
    (["--sampler", "greedy"], "unknown sampler"),
])
def test_cli_bad_finetune_flags(argv, message, capsys):
    assert cli(argv) == 2
    assert message in capsys.readouterr().err


def test_non_finite_loss_or_gradient_stops_with_step_and_term():
    from train import check_finite

    nan = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 5: loss/gfn"):
        check_finite(5, nan, {"loss/gr": torch.tensor(1.0), "loss/gfn": nan}, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 7"):
        check_finite(7, torch.tensor(2.0), {}, torch.tensor(float("inf")))
    check_finite(8, torch.tensor(2.0), {"loss/gr": torch.tensor(2.0)}, torch.tensor(3.0))  # finite: no error


def test_rsim_ignores_the_dedup_token_unless_asked():
    from types import SimpleNamespace

    from train import trajectory_rewards
    # item 0 observed; item 1 shares only the dedup token 0; item 2 shares t_1 and the dedup token
    model = SimpleNamespace(item_codes=torch.tensor([[3, 4, 5, 0], [7, 8, 9, 0], [3, 1, 2, 0]]))
    items, r_c = torch.tensor([[0, 1, 2]]), torch.tensor([[0.5, 0.2, 0.1]])
    cfg = parse_config(["--dataset", "toy", "--levels", "3"])
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)
    assert rew["r_sim"].tolist() == [[3.0, 0.0, 1.0]]
    assert rew["R"][0].tolist() == pytest.approx([1 + 0.5 + 3, 0.2, 1.1])
    cfg = parse_config(["--dataset", "toy", "--levels", "3", "--rsim-dedup", "--reward-beta", "2"])
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)
    assert rew["r_sim"].tolist() == [[4.0, 1.0, 2.0]]
    assert log_r[0].tolist() == pytest.approx([2 * math.log(5.5), 2 * math.log(1.2), 2 * math.log(2.1)])


def test_seeds_table_runs_each_seed_once_and_writes_the_results(toy_run, tmp_path):
    from train import run_table
    cfg = copy.deepcopy(toy_run[0])
    cfg.train.out = str(tmp_path)
    cfg.train.epochs = 2
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
    metrics = main(cfg, log=lines.append)
    text = "\n".join(lines)
    assert text.index("collaborative model") < text.index("semantic IDs (letter)")
    assert metrics["tokenizer"]["collision_rate"] >= 0 and "letter_cf_cos" in metrics["tokenizer"]
    assert (tmp_path / "toy__letter__sft__seed42" / "metrics.json").exists()
    assert not (tmp_path / "toy__sft__seed42").exists()


def test_warm_up_only_epochs_never_count_as_the_best_fine_tuned_model(toy_run):
    # 4 epochs, warm-up longer than 3 of them: only the last epoch trained the backbone
    cfg = finetune_config(toy_run, "gflowgr-tb", ft_epochs=4, head_warmup=10_000)
    with pytest.raises(data_mod.DataError, match="--head-warmup"):
        main(cfg, log=lambda *a: None)
    n_batches = math.ceil(len(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False))["train"]) / cfg.train.batch_size)
    cfg = finetune_config(toy_run, "gflowgr-tb", ft_epochs=2, head_warmup=n_batches + 1)
    metrics = main(cfg, log=lambda *a: None)
    assert metrics["finetune"]["best_epoch"] == 2


def test_grad_norms_measure_each_term_without_touching_the_step():
    """grad/gr and grad/gfn are the norms of each term's own gradient, and measuring them leaves .grad alone."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    l_gr, l_gfn = (w ** 2).sum() / 2, 2 * w.sum()  # gradients w = (3, 4) and (2, 2)
    got = train.grad_norms({"gr": l_gr, "gfn": l_gfn}, [w])
    assert got["grad/gr"] == pytest.approx(5.0) and got["grad/gfn"] == pytest.approx(8 ** 0.5)
    assert w.grad is None
    (l_gr + l_gfn).backward()  # the graph was kept: the real step still works
    assert w.grad.tolist() == [5.0, 6.0]


def test_vargrad_run_is_balanced_in_the_mean_and_trains_no_log_z(toy_run):
    """--log-z vargrad: each batch's log Z is its own weighted mean, so the residuals of a batch
    are centred by construction; no warm-up is spent on a head (the backbone trains from step 1)."""
    cfg = finetune_config(toy_run, "gflowgr-tb")
    cfg.ft.log_z, cfg.train.tag = "vargrad", "vargrad"
    metrics = main(cfg, log=lambda s: None)
    d = Path(cfg.train.out) / f"toy__gflowgr-tb+vargrad__seed{cfg.train.seed}"
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in curves if "grad/gr" in r)
    assert first["step"] == 1 and first["grad/gr"] > 0  # the backbone gets L_GR's gradient at once
    assert metrics["finetune"]["step"] >= 1 and 0 <= metrics["test"]["hr@10"] <= 1
    user = json.loads((d / "inspect.json").read_text())["users"][0]
    x = [tr["log_r"] - tr["log_pf_sum"] for tr in user["trajectories"]]
    w = [tr["weight"] for tr in user["trajectories"]]
    assert user["log_z"] == pytest.approx(sum(a * b for a, b in zip(w, x)) / sum(w), abs=1e-3)
