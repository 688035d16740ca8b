"""The analysis studies (experiments.py) on a small toy world: tables, figures, shared runs,
reproducibility, and the exposure-bias generator whose truth is known."""
import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest

import data as data_mod
import experiments
from config import STUDIES, Config, apply_preset, finalize, finished, replaced_run, run_dir, variant
from conftest import tiny_config
from metrics import recall_hidden
from train import cli, main


def study_cfg(out, study: str):
    """A toy budget for the studies: 120 users, 1 fine-tuning epoch, a small CM."""
    cfg = tiny_config(out, study=study, diversity_users=40, regime_epochs=2)
    cfg.data.toy_users = 120
    cfg.ft.ft_epochs, cfg.ft.head_warmup, cfg.cm.epochs = 1, 3, 5
    return cfg


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Every study once on toy, all in one runs folder (so they share runs as on Beauty)."""
    out = tmp_path_factory.mktemp("studies")
    lines = []
    got = {s: main(study_cfg(out, s), log=lines.append) for s in STUDIES}  # train.main: tilt is tilt.py's
    return out, got, lines


def cell(summary, label):
    return next(c for c in summary["cells"] if c["label"] == label)


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_writes_table_json_and_figure(studies, study):
    out, got, _ = studies
    stem = out / "results" / f"toy_{study}"
    md, js, html = (stem.with_suffix(s) for s in (".md", ".json", ".html"))
    assert md.exists() and js.exists() and html.exists()
    assert json.loads(js.read_text())["study"] == study
    text = html.read_text()
    assert "plotly" in text.lower() and len(text) > 1_000_000  # standalone: plotly.js is inside
    assert md.read_text().startswith("# ")
    if study in ("ablation", "k", "lambda"):  # the SFT level, dashed, labelled in each metric's panel
        assert text.count('"text":"SFT"') == 4 and '"dash":"dash"' in text


def test_sweep_tables_hold_the_runs_metrics(studies):
    out, got, _ = studies
    abl, k, lam = got["ablation"], got["k"], got["lambda"]
    assert [c["label"] for c in abl["cells"]] == [label for label, _ in experiments.ABLATION]
    assert [c["label"] for c in k["cells"]] == ["K=0", "K=1", "K=3", "K=5"]
    # each cell is the test metric of its run folder
    for c in abl["cells"] + k["cells"] + lam["cells"]:
        saved = json.loads((out / c["runs"][0] / "metrics.json").read_text())["test"]
        assert c["metrics"]["ndcg@10"]["values"] == [saved["ndcg@10"]]
    # the defaults (K = 3, lambda = 1) and the full ablation column are one run; w/o Traj is K = 0
    assert cell(abl, "GFlowGR")["runs"] == cell(k, "K=3")["runs"] == cell(lam, "λ=1")["runs"] == ["toy__gflowgr-tb__seed42"]
    assert cell(abl, "w/o Traj")["runs"] == cell(k, "K=0")["runs"] == ["toy__gflowgr-tb+K0__seed42"]
    assert cell(abl, "r_a+r_c")["runs"] == ["toy__gflowgr-tb+reward-ra-rc__seed42"]
    assert cell(lam, "λ=0.01")["runs"] == ["toy__gflowgr-tb+lambda0.01__seed42"]
    # the dashed SFT line is the SFT checkpoint these runs started from
    sft = json.loads((out / "toy__gflowgr-tb__seed42" / "metrics.json").read_text())["sft_eval"]["test"]
    assert k["sft"]["hr@10"]["values"] == [sft["hr@10"]]
    # 10 ablation columns + K 1, 5 + 4 lambdas: 16 GFlowGR runs, no more (shared runs are trained once),
    # plus the paper-regime study's own run from its under-trained SFT, kept apart by its tag, and
    # the exposure study's run rewarded by the truth
    runs = {p.name for p in out.glob("toy__gflowgr-tb*__seed42")}
    assert len(runs) == 18 and {"toy__gflowgr-tb+paper-regime__seed42", "toy__gflowgr-tb+oracle__seed42"} <= runs


def test_variants_change_what_they_say(studies):
    out, _, _ = studies
    cfg = lambda name: json.loads((out / name / "config.json").read_text())
    assert cfg("toy__gflowgr-tb+reward-ra__seed42")["ft"]["reward"] == "ra"
    assert cfg("toy__gflowgr-tb+sampler-random__seed42")["sampler"]["sampler"] == "random"
    assert cfg("toy__gflowgr-tb+no-weight__seed42")["ft"]["weight"] is False
    assert cfg("toy__gflowgr-tb+lambda100__seed42")["ft"]["lam"] == 100.0
    # K = 0: the run logged no augmented trajectory (its sampler CM score is nan throughout)
    rows = [json.loads(x) for x in (out / "toy__gflowgr-tb+K0__seed42" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["sampler/cm_score"] for r in rows if "sampler/cm_score" in r]
    assert scores and all(s != s for s in scores)


def test_variants_are_named_against_the_dataset_preset():
    """Beauty's preset rewards with r_c alone and GFlowGR-TB's its next context: its default GFlowGR
    run must carry the plain name that Table 1 (results.collect) reads, and the paper's reward and
    step on Beauty are the variant; the same-context setting GFlowGR-DB keeps is named against the
    GFlowGR-TB preset."""
    from config import parse_config

    assert variant(parse_config(["--dataset", "beauty"])) == ""
    assert run_dir(parse_config(["--dataset", "beauty", "--seed", "43"])).name == "beauty__gflowgr-tb__seed43"
    assert variant(parse_config(["--dataset", "beauty", "--reward", "ra,rc,rsim", "--gfn-context", "same"])) == \
        "reward-ra-rc-rsim+ctx-same"
    assert variant(parse_config(["--dataset", "beauty", "--method", "gflowgr-db"])) == ""
    old_default = ["--gfn-context", "same", "--K", "10", "--n-candidates", "10", "--no-target-weight", "--lambda", "0.03",
                   "--ft-lr", "3e-4"]
    assert variant(parse_config(["--dataset", "beauty", *old_default])) == \
        "K10+lambda0.03+N10+target-weight-off+ctx-same+ftlr0.0003"
    assert variant(parse_config(["--dataset", "toy", "--reward", "rc"])) == "reward-rc"
    assert variant(parse_config(["--dataset", "beauty", "--method", "sft", "--filter-seen"])) == "history-out"


def test_variant_names_and_reuse(tmp_path):
    c = apply_preset(Config())  # the toy preset: variants are named against it
    c.train.method = "gflowgr-tb"
    assert variant(c) == ""
    c.sampler.K, c.ft.lam, c.ft.reward, c.ft.weight = 0, 10.0, "ra,rsim", False
    assert variant(c) == "reward-ra-rsim+K0+no-weight+lambda10"
    c.ft.target_weight = True  # --target-weight runs beside the default, not in its folder
    assert variant(c) == "reward-ra-rsim+K0+no-weight+lambda10+target-weight"
    c.train.method = "sft"
    assert variant(c) == ""  # only GFlowGR runs are study variants
    # a finished run is reused whatever the runs folder, threads or study that asks for it, not with another lambda
    cfg = study_cfg(tmp_path, "")
    cfg.train.method = "gflowgr-tb"
    cfg = finalize(cfg)
    d = run_dir(cfg)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text("{}")
    (d / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    other = finalize(study_cfg(tmp_path, "k"))
    other.train.method, other.train.threads = "gflowgr-tb", 7
    assert finished(other)
    other.ft.lam = 2.0
    assert not finished(other)
    assert replaced_run(other) == []  # lambda is named: another folder, nothing replaced
    other.ft.lam, other.ft.ft_epochs = cfg.ft.lam, cfg.ft.ft_epochs + 2  # not named: the same folder
    assert run_dir(other) == d and replaced_run(other) == [f"ft.ft_epochs: {cfg.ft.ft_epochs} -> {cfg.ft.ft_epochs + 2}"]


def test_learning_rate_sweeps_get_their_own_folder():
    """--ft-lr (every fine-tuning method) and --head-lr (GFlowGR) are named: a sweep once replaced
    the default GFlowGR-TB run of seed 42 in place."""
    from config import parse_config

    assert variant(parse_config(["--dataset", "beauty", "--ft-lr", "3e-3"])) == "ftlr0.003"
    assert variant(parse_config(["--dataset", "beauty", "--ft-lr", "1e-3"])) == ""  # GFlowGR-TB's own preset value
    assert variant(parse_config(["--dataset", "beauty", "--ft-lr", "1e-3", "--method", "ipa"])) == "ftlr0.001"
    assert variant(parse_config(["--dataset", "beauty", "--ft-lr", "1e-3", "--method", "sft"])) == ""
    assert variant(parse_config(["--dataset", "beauty", "--head-lr", "0.1"])) == "headlr0.1"
    assert variant(parse_config(["--dataset", "beauty", "--head-lr", "0.1", "--method", "dpo"])) == ""


def test_a_run_is_reused_when_only_settings_it_never_reads_change(tmp_path):
    """The sampler's settings make GFlowGR's, DPO's and S-DPO's results, not IPA's or PPO's; beta and
    lambda only GFlowGR's."""
    def done(method):
        cfg = study_cfg(tmp_path, "")
        cfg.train.method = method
        cfg = finalize(cfg)
        d = run_dir(cfg)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text("{}")
        (d / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        return cfg

    for method, reads_sampler, reads_beta in (("sft", False, False), ("ipa", False, False), ("ppo", False, False), ("sft-continued", False, False),
                                              ("dpo", True, False), ("sdpo", True, False), ("gflowgr-tb", True, True)):
        cfg = done(method)
        k = copy.deepcopy(cfg)
        k.sampler.K, k.sampler.candidates_history = 5, True
        beta = copy.deepcopy(cfg)
        beta.ft.reward_beta = 7.0
        lam = copy.deepcopy(cfg)
        lam.ft.lam = 0.5
        assert finished(k) is not reads_sampler and finished(beta) is not reads_beta, method
        assert finished(lam) is not reads_beta, method
        other = copy.deepcopy(cfg)
        other.ft.ft_lr = 1e-2  # a setting every method reads
        assert not finished(other), method


def test_boolean_variants_say_on_or_off():
    from config import parse_config

    assert variant(parse_config(["--dataset", "beauty", "--no-candidates-history"])) == "cand-hist-off"
    assert variant(parse_config(["--dataset", "toy", "--candidates-history"])) == "cand-hist-on"
    assert variant(parse_config(["--dataset", "beauty", "--reward-beta", "2", "--candidates", "cm"])) == "cand-cm+beta2"
    assert variant(parse_config(["--dataset", "beauty", "--method", "gflowgr-db", "--reward-beta", "2", "--candidates", "cm",
                                 "--n-candidates", "50"])) == "cand-cm+N50+beta2"


def test_diversity_numbers(studies):
    _, got, _ = studies
    rows = got["diversity"]["rows"]
    for name in ("sft", "gflowgr-tb"):
        r = {k: v["mean"] for k, v in rows[name].items()}
        assert 0 < r["coverage@10"] <= 1 and 0 <= r["gini@10"] < 1
        assert r["kl_normal"] > 0 and r["prob_std"] > 0
        assert 0 < r["top10_mass"] <= 1 and 0 <= r["cm_range"] <= 1 and 0 <= r["cm_mean"] <= 1
        assert r["prob_entropy"] <= np.log(240) + 1e-6  # at most the uniform distribution's entropy
    # HR@10 in the diversity table is the run's own test HR@10: the same lists were scored
    saved = json.loads((studies[0] / "toy__gflowgr-tb__seed42" / "metrics.json").read_text())["test"]
    assert rows["gflowgr-tb"]["hr@10"]["mean"] == pytest.approx(saved["hr@10"])


def test_exposure_table(studies):
    _, got, _ = studies
    s = got["exposure"]
    w = s["world"]
    assert w["mean_propensity_observed"] > 2 * w["mean_propensity_hidden"]
    assert list(s["rows"]) == ["sft", "sft-continued", "gflowgr-tb", "gflowgr-tb+oracle", "cm", "oracle", "mostpop"]
    for name in s["rows"]:
        r = {k: v["mean"] for k, v in s["rows"][name].items()}
        assert 0 <= r["recall_hidden"] <= 1 and 0 <= r["recall_observed"] <= 1
    # the oracle-rewarded run is a run of its own, and the truth's own lists find the hidden preferences
    assert (studies[0] / "toy__gflowgr-tb+oracle__seed42" / "metrics.json").exists()
    assert s["rows"]["oracle"]["recall_hidden"]["mean"] > s["rows"]["sft"]["recall_hidden"]["mean"] + 0.2
    # MostPop recommends the most exposed items: its lists sit at the top of the exposure ranking
    assert s["rows"]["mostpop"]["exposure_pct"]["mean"] > s["rows"]["sft"]["exposure_pct"]["mean"]
    # the generative models find hidden true preferences far more often than popularity does
    assert s["rows"]["sft"]["recall_hidden"]["mean"] > s["rows"]["mostpop"]["recall_hidden"]["mean"] + 0.1


def test_study_rerun_is_reproducible(studies, tmp_path):
    """Same seed, same numbers: a variant retrained from the same cached stages in a fresh folder,
    and the analysis of the same runs repeated, give identical values."""
    out, got, _ = studies
    shutil.copytree(out / "toy", tmp_path / "toy")  # the cached IDs, SFT and CM stages
    cfg = study_cfg(tmp_path, "")
    again = main(experiments.study_config(cfg, "gflowgr-tb", 42, {"sampler.K": 1}), log=lambda *a: None)
    first = cell(got["k"], "K=1")["metrics"]
    assert {k: again["test"][k] for k in first} == {k: v["values"][0] for k, v in first.items()}
    div = experiments.run_study(study_cfg(out, "diversity"), log=lambda *a: None)
    assert div["rows"] == got["diversity"]["rows"]


# ---------------------------------------------------------------- the exposure-biased toy world


def test_toy_observations_are_exposure_biased():
    ds = data_mod.make_toy(n_users=300, seed=3)
    w = ds.item_pop_weight
    observed = [i for s in ds.sequences for i in s]
    hidden = [i for h in experiments.hidden_positives(ds) for i in h]
    # observed items were drawn with probability ~ propensity: far more popular than the liked-but-unseen
    assert np.mean(w[observed]) > 3 * np.mean(w[hidden])
    # every hidden item is a true preference the user never interacted with
    for s, p, h in zip(ds.sequences, ds.true_prefs, experiments.hidden_positives(ds)):
        assert set(h) <= set(p) and not set(h) & set(s) and set(s) <= set(p)


def test_oracle_recommender_scores_recall_one():
    ds = data_mod.make_toy(n_users=100, seed=1)
    hidden = experiments.hidden_positives(ds)
    # the oracle lists 10 of the user's hidden true preferences (all of them when fewer), padded with -1
    oracle = np.array([(h[:10] + [-1] * 10)[:10] for h in hidden])
    assert recall_hidden(oracle, hidden, 10) == pytest.approx(1.0)
    # an anti-oracle that lists only observed items scores 0
    observed = np.array([(s[:10] + [-1] * 10)[:10] for s in ds.sequences])
    assert recall_hidden(observed, hidden, 10) == 0.0


def test_study_errors(tmp_path, capsys):
    assert cli(["--dataset", "toy", "--study", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert cli(["--dataset", "beauty", "--study", "exposure", "--out", str(tmp_path)]) == 2
    assert "use --dataset toy" in capsys.readouterr().err
    assert cli(["--dataset", "toy", "--study", "ablation", "--method", "dpo", "--out", str(tmp_path)]) == 2
    assert "--method gflowgr-tb" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half written


def test_fused_topk_hand_example_with_a_history_item_of_a_filtered_cm():
    """log P_GR + alpha * s_CM, worked by hand; a filtered CM's history item (logit clamped to -1e4
    by fusion_pool) drops to the end for alpha > 0, and alpha = 0 is the SFT order itself."""
    import torch
    items = torch.tensor([[10, 11, 12]])
    log_p = torch.tensor([[-1.0, -2.0, -1.5]])
    logits = torch.tensor([[0.0, 5.0, -1e4]])
    assert experiments.fused_topk(items, log_p, logits, 0.0, 3).tolist() == [[10, 12, 11]]
    assert experiments.fused_topk(items, log_p, logits, 1.0, 3).tolist() == [[11, 10, 12]]  # 3 > -1 > -10001.5
    assert experiments.fused_topk(items, log_p, logits, 0.1, 2).tolist() == [[10, 11]]  # -1 > -1.5 > ... -1001.5


def test_history_in_pool_marks_the_samples_own_items():
    import torch
    items = torch.tensor([[5, 3, 9, -1], [3, 4, 5, 6]])
    t = {"hist": torch.tensor([[3, 9, -1], [6, -1, -1]])}
    assert experiments.history_in_pool(items, t).tolist() == [[False, True, True, False], [False, False, False, True]]


def test_fusion_study_reports_sft_without_its_history(studies):
    """Toy has no repeats (no target is in its history), so moving the history down can only move a target up."""
    out, got, _ = studies
    p = got["fusion"]["per_seed"][0]
    assert 0.0 <= p["history_share_of_sft_topk"]["test"] <= 1.0
    assert p["sft_no_history"]["test"]["ndcg@10"] >= p["curve"]["test"][0] - 1e-12  # alpha 0 = the pool in SFT's order
    assert "| SFT, history items left out |" in (out / "results" / "toy_fusion.md").read_text()


def test_tilt_study_gflowgr_learns_part_of_its_target_and_the_control_none(studies):
    """toy, CM pool (where GFlowGR draws its trajectories): GFlowGR moves towards its target, SFT-continued does not."""
    out, got, _ = studies
    rows = {(r["contexts"], r["pool"], r["model"]): r for r in got["tilt"]["rows"]}
    assert set(rows) == {(c, p, m) for c in ("trained", "held-out") for p in ("SFT top-50", "CM top-50")
                         for m in ("gflowgr-tb", "sft-continued")}
    for ctx in ("trained", "held-out"):
        tb, cont = rows[(ctx, "CM top-50", "gflowgr-tb")], rows[(ctx, "CM top-50", "sft-continued")]
        assert tb["slope"]["mean"] > cont["slope"]["mean"] + 0.05
        assert tb["tilt"]["mean"] > 0 and tb["move"]["mean"] > 0
    # toy keeps the paper's reward (r_a, r_sim read the label): no "target met exactly" row
    assert set(got["tilt"]["ranking"]) == {"sft", "gflowgr-tb", "sft-continued"}
    sft = json.loads((out / got["tilt"]["per_seed"][0]["runs"]["sft"] / "metrics.json").read_text())
    assert got["tilt"]["ranking"]["sft"]["test"]["hr@10"]["mean"] == sft["test"]["hr@10"]


def test_tilt_fit_learns_the_tilt_where_it_fits_and_carries_less_to_new_users(studies):
    _, got, _ = studies
    rows = got["tilt-fit"]["rows"]
    by = lambda k: [r for r in rows if r["contexts"] == k]
    fit, other = by("fitted contexts"), by("other users")
    assert [r["epoch"] for r in fit] == [1, 3, 5, 10, 15, 20]
    assert fit[-1]["loss"] < fit[0]["loss"]  # the VarGrad TB loss over the pool falls
    assert fit[-1]["slope"] > fit[0]["slope"] + 0.1  # more of the tilt is learned where it is fitted
    assert other[-1]["slope"] < fit[-1]["slope"]  # and less of it reaches users never fitted


def test_a_letter_study_does_not_overwrite_the_tiger_one(tmp_path):
    import plotly.graph_objects as go
    written = {}
    for backbone in ("tiger", "letter"):
        cfg = tiny_config(tmp_path)
        cfg.train.backbone = backbone
        summary = experiments.write_outputs(cfg, "tilt", f"# {backbone}\n", {"study": "tilt"}, go.Figure(), log=lambda *_: None)
        written[backbone] = summary["paths"]["md"]
    assert written["tiger"].endswith("toy_tilt.md") and written["letter"].endswith("toy_letter_tilt.md")
    assert open(written["tiger"]).read() == "# tiger\n" and open(written["letter"]).read() == "# letter\n"


def test_sweep_cells_follow_the_preset():
    """Beauty's preset draws all N = K candidates and fits log Z in closed form: Table 2 has no Ada
    column (with K < N at random it is "with Ada"), and a K = 0 cell (L_GFN is 0 by construction) is
    SFT-continued. GFlowGR-TB's next context has no observed item: no r_a or r_sim column, and its
    preset is Eq. (7): the weight's column switches Eq. (8) on."""
    from config import parse_config
    from experiments import ABLATION, cell_config, sweep_cells

    beauty = parse_config(["--dataset", "beauty", "--study", "ablation", "--seeds", "42"])
    assert list(dict(sweep_cells("ablation", beauty))) == ["r_c", "w/o Traj", "with Wt", "GFlowGR"]  # next context, K = N, Eq. (7)
    same = parse_config(["--dataset", "beauty", "--gfn-context", "same"])
    cells = dict(sweep_cells("ablation", same))  # K = N = 50: every candidate is drawn, no choice to ablate
    assert "w/o Ada" not in cells and "with Ada" not in cells and len(cells) == len(ABLATION) - 1
    cells = dict(sweep_cells("ablation", parse_config(["--dataset", "beauty", "--gfn-context", "same", "--n-candidates", "60"])))
    assert "w/o Ada" not in cells and cells["with Ada"] == {"sampler.sampler": "adaptive"}
    assert dict(sweep_cells("ablation", parse_config(["--dataset", "toy"])))["w/o Ada"] == {"sampler.sampler": "random"}
    said = []
    k0 = cell_config(beauty, "gflowgr-tb", 43, {"sampler.K": 0}, said.append)
    assert (k0.train.method, k0.train.seed, k0.sampler.K, k0.ft.ft_lr) == ("sft-continued", 43, 10, 3e-4)  # its own preset
    assert "SFT-continued" in said[0]
    k1 = cell_config(beauty, "gflowgr-tb", 43, {"sampler.K": 1}, said.append)
    assert (k1.train.method, k1.sampler.K, len(said)) == ("gflowgr-tb", 1, 1)
    toy_k0 = cell_config(parse_config(["--dataset", "toy"]), "gflowgr-tb", 42, {"sampler.K": 0}, said.append)
    assert (toy_k0.train.method, toy_k0.sampler.K) == ("gflowgr-tb", 0)  # toy learns log Z(U): K = 0 is a GFlowGR run
