"""app.py: the inspector's computations (by hand and invariants) and the page driven by AppTest."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

import app

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "app.py")
RUN = "toy__gflowgr-tb__seed42"
PANELS = ["User and held-out item", "SFT vs fine-tuned: top-10", "Trajectory tree", "Forward probabilities and flows",
          "Rewards", "Distributions", "Training"]


def start(monkeypatch, runs) -> AppTest:
    monkeypatch.setenv(app.RUNS_ENV, str(runs))
    return AppTest.from_file(APP, default_timeout=120).run()


def list_items(at) -> tuple[list, list]:
    """(SFT items, fine-tuned items) as shown in the two top-10 tables."""
    sft, ft = at.dataframe[1].value, at.dataframe[2].value
    return list(sft["item"]), list(ft["item"])


def test_parse_run_name_and_list_runs(app_runs, tmp_path):
    assert app.parse_run_name("beauty__letter__sft__seed43") == {"name": "beauty__letter__sft__seed43", "dataset": "beauty",
                                                                 "backbone": "letter", "method": "sft", "base": "sft", "seed": 43}
    # a study variant keeps its own menu entry but loads as the algorithm it varies
    v = app.parse_run_name("beauty__gflowgr-tb+K1+lambda10__seed42")
    assert (v["method"], v["base"], v["backbone"]) == ("gflowgr-tb+K1+lambda10", "gflowgr-tb", "tiger")
    assert app.parse_run_name("toy") is None and app.parse_run_name("toy__sft__seedx") is None
    runs = app.list_runs(app_runs)
    # the toy/ stage folder is not a run
    assert [r["name"] for r in runs] == [RUN, "toy__sft__seed42"] and all(r["finished"] for r in runs)
    assert app.list_runs(tmp_path / "absent") == []


def test_item_distribution_is_normalised_and_matches_the_trajectories(app_runs):
    b = app.load_bundle(app_runs / RUN)
    v = app.user_view(b, sample=3)
    for key in ("sft_log_pf", "ft_log_pf"):
        # sum_v prod_l P_F(t_l | U, s_{l-1}) = 1: the trie-masked policy is a distribution over real items
        assert np.exp(v[key].sum(1)).sum() == pytest.approx(1.0, abs=1e-4)
    obs = v["trajectories"][0]
    assert obs["observed"] and obs["item"] == v["target"] == int(b.test["target"][3])
    # the same P_F along the observed path, computed by inspect_users and by the full sweep
    assert np.exp(v["ft_log_pf"][v["target"]]) == pytest.approx(obs["p_f"], abs=1e-3)
    # beam search's top item is the most probable item of the full distribution
    assert v["finetuned"]["items"][0] == int(np.argmax(v["ft_log_pf"].sum(1)))
    # same user, same augmented items (the sampler is seeded by the user)
    again = app.user_view(b, sample=3)
    assert [t["item"] for t in again["trajectories"]] == [t["item"] for t in v["trajectories"]]
    assert len(v["trajectories"]) == 1 + b.cfg.sampler.K


def test_tree_outlines_the_observed_path():
    class B:  # two levels, three items: (0, 0), (0, 1), (1, 0)
        model = type("M", (), {"item_codes": torch.tensor([[0, 0], [0, 1], [1, 0]])})()
        titles = ["a", "b", "c"]
    log_pf = np.log(np.array([[0.6, 0.5], [0.6, 0.5], [0.4, 1.0]]))  # P(v|U) = 0.3, 0.3, 0.4
    fig = app.tree_figure(B, log_pf, target=1, n_items=1)  # top-1 is item 2; the target is added
    sb = fig.data[0]
    assert list(sb.ids) == ["1", "1/0", "0", "0/1"]
    assert list(sb.values) == pytest.approx([0.4, 0.4, 0.3, 0.3])
    assert list(sb.marker.colors) == pytest.approx([0.4, 1.0, 0.6, 0.5])  # P_F of the step into each prefix
    assert [lab.startswith("★") for lab in sb.labels] == [False, False, True, True]
    assert list(sb.marker.line.width) == [0.5, 0.5, 4, 4]


def test_entropy_by_hand():
    assert app.entropy(np.log(np.full(4, 0.25))) == pytest.approx(np.log(4))
    assert app.entropy(np.log(np.array([1.0, 1e-30]))) == pytest.approx(0.0, abs=1e-12)


def test_interesting_users_disagree(app_runs):
    b = app.load_bundle(app_runs / RUN)
    got = app.interesting_users(b)
    assert got["scanned"] == len(b.test["target"])
    from batches import trim
    for kind, (sft_hits, ft_hits) in (("ft_only", (False, True)), ("sft_only", (True, False))):
        for s in got[kind][:5]:
            hl = b.test["hist_len"][s : s + 1]
            h = trim(b.test["hist"][s : s + 1], hl)
            t = int(b.test["target"][s])
            assert (t in b.sft_model.beam_search(h, hl, 20, 10)[0][0].tolist()) == sft_hits
            assert (t in b.model.beam_search(h, hl, 20, 10)[0][0].tolist()) == ft_hits


def test_app_shows_every_panel(app_runs, monkeypatch):
    at = start(monkeypatch, app_runs)
    assert not at.exception
    assert at.title[0].value == "GFlowGR inspector"
    headers = [h.value for h in at.header]
    assert all(p in headers for p in PANELS), headers
    # tree, P_F, TB balance, rewards, distribution, and at least losses + log Z + validation
    assert len(at.get("plotly_chart")) >= 8
    assert any(m.label == "log Z(U)" for m in at.metric)
    # the balance over many users, and the residual / gradient / clipping curves of the training panel
    assert any(m.label == "median |residual|, augmented" for m in at.metric)
    charts = " ".join(str(c.proto.spec) for c in at.get("plotly_chart")).replace("\\u002f", "/")  # the JSON escapes '/'
    for key in ("gfn/residual_obs", "gfn/residual_aug", "grad/gr", "grad/gfn", "charts/clipped"):
        assert key in charts, key


def test_balance_residuals_are_eq6_for_each_trajectory(app_runs):
    """The balance panel's numbers: log Z(U) + sum log P_F - log R for 1 observed and K augmented
    trajectories per user, the same as inspect_users gives for that user."""
    b = app.load_bundle(app_runs / RUN)
    res = app.balance_residuals(b, n_users=30)
    assert res["users"] == 30 and len(res["observed"]) == 30 and len(res["augmented"]) == 30 * b.cfg.sampler.K
    assert np.isfinite(res["observed"]).all() and np.isfinite(res["augmented"]).all()
    idx = torch.randperm(len(b.test["target"]), generator=torch.Generator().manual_seed(0))[:1]
    from sampler import TrajectorySampler
    from inspection import inspect_users
    t = {k: v[idx] for k, v in b.test.items()}
    u = inspect_users(b.sft_model, b.model, b.heads, b.cm, TrajectorySampler(b.cm, len(b.titles), b.cfg.sampler, seed=0),
                      t["hist"], t["hist_len"], t["target"], b.cfg)[0]
    obs = u["trajectories"][0]
    assert res["observed"][0] == pytest.approx(u["log_z"] + obs["log_pf_sum"] - obs["log_r"], abs=1e-3)


def test_picking_another_user_changes_the_lists(app_runs, monkeypatch):
    at = start(monkeypatch, app_runs)
    first = list_items(at)
    at.text_input(key="user_id").set_value("7").run()
    assert not at.exception
    second = list_items(at)
    assert second != first
    assert "user 7 (test sample 7)" in at.caption[0].value
    # the history table shows user 7's history
    b = app.load_bundle(app_runs / RUN)
    assert list(at.dataframe[0].value["item"]) == b.test["hist"][7, : int(b.test["hist_len"][7])].tolist()


def test_random_interesting_user_button(app_runs, monkeypatch):
    at = start(monkeypatch, app_runs)
    at.button(key="pick_ft").click().run()
    assert not at.exception
    found = app.interesting_users(app.load_bundle(app_runs / RUN))["ft_only"]
    if found:
        assert int(at.text_input(key="user_id").value) in found  # toy users are their own test sample
    else:
        assert at.sidebar.info


@pytest.mark.parametrize("make", ["empty", "absent"])
def test_no_runs_tells_the_user_to_train(tmp_path, monkeypatch, make):
    runs = tmp_path / "runs"
    if make == "empty":
        runs.mkdir()
    at = start(monkeypatch, runs)
    assert not at.exception
    assert "python train.py --dataset toy" in at.warning[0].value


def test_unknown_user_gets_a_message(app_runs, monkeypatch):
    at = start(monkeypatch, app_runs)
    at.text_input(key="user_id").set_value("999999").run()
    assert not at.exception
    assert "Unknown user '999999'" in at.warning[0].value


def test_half_written_and_corrupt_runs_get_a_message(app_runs, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(app_runs, runs)
    half = runs / "toy__gflowgr-tb__seed7"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({}))
    corrupt = runs / "toy__gflowgr-tb__seed8"
    shutil.copytree(runs / RUN, corrupt)
    data = (corrupt / "checkpoint.pt").read_bytes()
    (corrupt / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    at = start(monkeypatch, runs)
    at.selectbox(key="seed").set_value(7).run()
    assert not at.exception
    assert "half written" in at.error[0].value
    at.selectbox(key="seed").set_value(8).run()
    assert not at.exception
    assert "could not be read" in at.error[0].value


def test_item_sweep_agrees_with_exhaustive_beam_search(app_runs):
    """Two implementations of P(v|U) for every item: the app's sweep (which skips single-child
    prefixes) and beam search with a beam as wide as the catalogue (exact)."""
    b = app.load_bundle(app_runs / RUN)
    n = len(b.titles)
    for s in (0, 11):
        hl = b.test["hist_len"][s : s + 1]
        h = b.test["hist"][s : s + 1, : int(hl)]
        sweep = b.model.item_log_probs(h, hl, chunk=50).sum(1)  # small chunks: the loop over chunks is used
        items, log_p = b.model.beam_search(h, hl, beam=n, topk=n)
        exact = torch.full((n,), float("-inf"))
        exact[items[0]] = log_p[0]
        assert torch.allclose(sweep, exact, atol=1e-4)


def test_an_sft_run_shows_without_the_gflownet_panels(app_runs, monkeypatch):
    at = start(monkeypatch, app_runs)
    at.selectbox(key="method").set_value("sft").run()
    assert not at.exception
    sft, ft = list_items(at)
    assert sft == ft  # an SFT run compares SFT with itself
    assert "no GFlowNet heads" in at.info[0].value
    assert not any(m.label == "log Z(U)" for m in at.metric)
    assert len(at.get("plotly_chart")) >= 5


def test_an_oracle_rewarded_run_shows_the_truths_r_c(app_runs, tmp_path):
    """A run fine-tuned with --oracle-reward is inspected with the reward it was trained on."""
    import collab
    shutil.copytree(app_runs / "toy", tmp_path / "toy")
    shutil.copytree(app_runs / RUN, tmp_path / RUN)
    cfg = json.loads((tmp_path / RUN / "config.json").read_text())
    cfg["ft"]["oracle_reward"] = True
    (tmp_path / RUN / "config.json").write_text(json.dumps(cfg))
    b = app.load_bundle(tmp_path / RUN)
    assert isinstance(b.cm, collab.TasteOracle)
    r_c = [t["r_c"] for t in app.user_view(b, 0)["trajectories"]]
    assert len(r_c) > 1 and set(r_c) <= {0.0, 1.0}


def test_the_training_panel_draws_a_test_refits_curves_dashed(monkeypatch, app_runs, tmp_path):
    """A --refit-test run's metrics_refit.jsonl (the test model's training) is drawn beside the
    validation model's curves, dashed and named '(test refit)'; a cut last line is skipped."""
    import shutil

    d = tmp_path / "runs"
    shutil.copytree(app_runs, d)
    rows = [json.loads(line) for line in (d / RUN / "metrics.jsonl").read_text().splitlines()]
    with_loss = [r for r in rows if "loss/gr" in r]
    (d / RUN / "metrics_refit.jsonl").write_text("".join(json.dumps({**r, "loss/gr": 123.0}) + "\n" for r in with_loss) + '{"step": 9')
    b = app.load_bundle(d / RUN)
    assert len(b.refit_curves) == len(with_loss) and all(r["loss/gr"] == 123.0 for r in b.refit_curves)
    assert app.load_bundle(app_runs / RUN).refit_curves == []
    at = start(monkeypatch, d)
    assert not at.exception
    charts = " ".join(str(c.proto.spec) for c in at.get("plotly_chart")).replace("\\u002f", "/")  # the JSON escapes '/'
    assert "loss/gr (test refit)" in charts and '"dash":"dash"' in charts.replace(" ", "")
