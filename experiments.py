"""Analysis studies: the paper's claims about GFlowGR, each tested by one command (Sec. 4.3-4.5).

- ablation (Table 2): GFlowGR with each subset of the reward terms r_a, r_c, r_sim (Sec. 3.2),
  without the adaptive sampler (random choice of the K candidates, "w/o Ada", Sec. 3.1),
  without augmented trajectories (K = 0, "w/o Traj") and without the Eq. (8) weight
  ("w/o Wt", Eq. 7), next to the full model.
- k, lambda (Fig. 3): K in {0, 1, 3, 5} augmented trajectories per sample, lambda in
  {0.01, 0.1, 1, 10, 100} (the weight of L_GFN in Eq. 8), with SFT as a dashed line.
- diversity (Sec. 4.5): SFT against GFlowGR on the top-10 lists of every test user: KL of
  the aggregate item distribution from a fitted normal, the std of P(v|U) over all items,
  mean / range / std of the CM scores of the recommended items, coverage@10 and Gini@10.
- exposure (the paper's central claim, Sec. 1): on the generated toy world, whose users'
  true preferences are known and whose observations are biased towards popular items,
  recall@10 of the held-out observed item and of the true preferences never observed.

Every study trains the runs it needs through pipeline.run; a run that finished earlier with the
same config is reused (run_or_reuse), so a study can be stopped and restarted, and the
K = 3, lambda = 1 and full-ablation columns are the same run. Results are written to
results/<dataset>_<study>.md (tables), .json (every number, per seed) and .html (a plotly
figure, standalone). Same seeds and config give the same numbers.

One concept at ~700 lines: the studies share the run sweep, the seeds statistics and the
output writer; each study is one function (`study_*`) that reads top to bottom.

Usage: `python train.py --dataset beauty --study ablation --seeds 42`
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

import collab
import data as data_mod
import metrics as M
import results
from batches import to_tensors, trim
from config import STUDIES, Config, finalize, run_dir, set_field, with_method
from data import DataError
from evaluation import recommend
from finetune import OBJECTIVE
from pipeline import run_or_reuse
from runtime import resolve_device
from gflowgr import GRModel

# Table 2's columns, in the paper's order: (label, config overrides)
ABLATION = [
    ("r_a", {"ft.reward": "ra"}),
    ("r_c", {"ft.reward": "rc"}),
    ("r_sim", {"ft.reward": "rsim"}),
    ("r_a+r_c", {"ft.reward": "ra,rc"}),
    ("r_a+r_sim", {"ft.reward": "ra,rsim"}),
    ("r_c+r_sim", {"ft.reward": "rc,rsim"}),
    ("w/o Ada", {"sampler.sampler": "random"}),
    ("w/o Traj", {"sampler.K": 0}),  # the same run as K = 0 of the K study
    ("w/o Wt", {"ft.weight": False}),
    ("GFlowGR", {}),
]
K_VALUES = (0, 1, 3, 5)
LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0)
# Table 2 of the paper (TIGER, Beauty), per column: HR@5, HR@10, NDCG@5, NDCG@10
PAPER_TABLE2 = {
    "r_a": (0.0403, 0.0641, 0.0261, 0.0341), "r_c": (0.0399, 0.0631, 0.0263, 0.0338),
    "r_sim": (0.0404, 0.0634, 0.0260, 0.0343), "r_a+r_c": (0.0399, 0.0629, 0.0264, 0.0337),
    "r_a+r_sim": (0.0406, 0.0648, 0.0260, 0.0344), "r_c+r_sim": (0.0381, 0.0600, 0.0253, 0.0323),
    "w/o Ada": (0.0386, 0.0600, 0.0257, 0.0326), "w/o Traj": (0.0397, 0.0617, 0.0261, 0.0332),
    "w/o Wt": (0.0388, 0.0615, 0.0254, 0.0327), "GFlowGR": (0.0407, 0.0651, 0.0266, 0.0344),
}
PAPER_SFT_TIGER_BEAUTY = (0.0354, 0.0558, 0.0234, 0.0299)  # Table 1, TIGER-SFT on Beauty
# Sec. 4.5's diversity numbers (TIGER, Beauty): GFlowGR vs SFT
PAPER_DIVERSITY = "KL to a normal 3.13 (GFlowGR) vs 3.24 (SFT); std of P(v|U) 2.2% lower; " \
                  "CM score mean 0.4% lower, range 0.45 vs 0.42, std 3.6% higher"
METRICS = results.METRICS


# ----------------------------------------------------------------------------------------
# Running the variants a study needs
# ----------------------------------------------------------------------------------------


def study_config(cfg: Config, method: str, seed: int, overrides: dict) -> Config:
    """The run config of one study cell: cfg with method, seed and the overrides, study fields cleared."""
    c = with_method(cfg, method)  # the method's own preset (config.METHOD_PRESETS), flags kept
    c.train.seed, c.train.seeds, c.train.study = seed, [], ""
    for dotted, value in overrides.items():
        set_field(c, dotted, value)
    return finalize(c)


def cell_config(cfg: Config, method: str, seed: int, overrides: dict, log=print) -> Config:
    """study_config, except where a cell has no augmented trajectory (K = 0) under the closed-form
    log Z (--log-z vargrad, Beauty's and Yelp's preset): log Z is then fitted to the observed
    trajectory alone, its TB residual is 0 by construction, L_GFN vanishes and Eq. (8) is L_GR on the
    fine-tuning contexts: the SFT-continued run with the same budget, which the cell reuses."""
    if overrides.get("sampler.K") == 0 and cfg.ft.log_z == "vargrad" and method == "gflowgr-tb":
        log("K = 0 under --log-z vargrad: L_GFN is 0 by construction, so this cell is SFT-continued")
        return study_config(cfg, "sft-continued", seed, {})
    return study_config(cfg, method, seed, overrides)


def gflowgr_method(cfg: Config) -> str:
    """The GFlowGR objective a study varies: --method gflowgr-db studies DB, otherwise TB (as Table 2)."""
    if cfg.train.method in OBJECTIVE:
        return cfg.train.method
    if cfg.train.method != "sft":
        raise DataError(f"--study {cfg.train.study} studies GFlowGR: use --method gflowgr-tb (default) or gflowgr-db, "
                        f"not {cfg.train.method!r}")
    return "gflowgr-tb"


def seeds_of(cfg: Config) -> list[int]:
    return list(cfg.train.seeds) or [cfg.train.seed]


def out_dir(cfg: Config) -> Path:
    """results/ beside the default runs folder, else <out>/results (as pipeline.run_table)."""
    return Path("results") if cfg.train.out == "runs" else Path(cfg.train.out) / "results"


def load_model(cfg: Config, device) -> GRModel:
    """The trained backbone of the finished run cfg describes (its checkpoint.pt)."""
    path = run_dir(cfg) / "checkpoint.pt"
    try:
        ckpt = torch.load(path, map_location=device)
    except Exception as e:  # torch raises many kinds on a bad file
        raise DataError(f"cannot read {path} ({type(e).__name__}): delete that run folder and run the study again")
    return GRModel.from_state(ckpt["model_args"], ckpt["model"]).to(device).eval()


# ----------------------------------------------------------------------------------------
# Writing tables, numbers and figures
# ----------------------------------------------------------------------------------------


def _fmt(s: dict) -> str:
    if not s["n"]:
        return "–"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["n"] > 1 else "")


def write_outputs(cfg: Config, study: str, md: str, summary: dict, fig: go.Figure, log=print) -> dict:
    """results/<dataset>_<study>.md, .json and .html (<dataset>_letter_<study> for the LETTER backbone), each written atomically."""
    folder = out_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = "" if cfg.train.backbone == "tiger" else f"{cfg.train.backbone}_"  # a LETTER study must not overwrite TIGER's
    stem = folder / f"{cfg.data.dataset}_{backbone}{study}"
    paths = {"md": stem.with_suffix(".md"), "json": stem.with_suffix(".json"), "html": stem.with_suffix(".html")}
    results._atomic_write(md, paths["md"])
    results._atomic_write(json.dumps(results._jsonable(summary), indent=1), paths["json"])
    tmp = paths["html"].with_suffix(".html.tmp")
    fig.write_html(tmp, include_plotlyjs=True, full_html=True)  # standalone: opens offline
    tmp.replace(paths["html"])
    log("\n" + md + f"\nwritten: {paths['md']}, {paths['json']}, {paths['html']}")
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    return summary


# ----------------------------------------------------------------------------------------
# Table 2 and Fig. 3: ablation, K and lambda
# ----------------------------------------------------------------------------------------


def sweep_cells(study: str, cfg: Config | None = None) -> list[tuple[str, dict]]:
    """(label, overrides) of each column / point of a sweep study.

    Where the preset already draws the K candidates at random, "w/o Ada" would be the full model
    again: the column becomes "with Ada", the curriculum switched on. Where every candidate is drawn
    (K = N, Beauty's and Yelp's presets: the GR's whole top-10) there is nothing for the sampler to
    choose, and the column is left out. Where the preset has no Eq. (8) weight (Beauty's GFlowGR-TB),
    "w/o Wt" becomes "with Wt". Under --gfn-context next (Beauty's GFlowGR-TB preset) the
    GFlowNet's context has no observed item, so r_a and r_sim do not exist there: the columns that
    use them are left out (run the paper's reward columns with --gfn-context same).
    """
    if study == "ablation":
        cells = ABLATION
        if cfg is not None and cfg.ft.gfn_context == "next":
            cells = [(label, o) for label, o in cells if set(o.get("ft.reward", "rc").split(",")) == {"rc"}]
        if cfg is not None and not cfg.ft.weight:  # the preset is Eq. (7) already: the column switches Eq. (8) on
            cells = [("with Wt", {"ft.weight": True}) if label == "w/o Wt" else (label, o) for label, o in cells]
        if cfg is not None and cfg.sampler.K >= cfg.sampler.n_candidates:
            return [(label, o) for label, o in cells if label != "w/o Ada"]
        if cfg is not None and cfg.sampler.sampler == "random":
            return [("with Ada", {"sampler.sampler": "adaptive"}) if label == "w/o Ada" else (label, o) for label, o in cells]
        return cells
    if study == "k":
        return [(f"K={k}", {"sampler.K": k}) for k in K_VALUES]
    return [(f"λ={lam:g}", {"ft.lam": lam}) for lam in LAMBDAS]


def run_sweep(cfg: Config, study: str, log=print) -> dict:
    """Train (or reuse) every cell of the study for every seed; collect test metrics and the SFT level."""
    method, seeds = gflowgr_method(cfg), seeds_of(cfg)
    cells = []
    sft = {k: [] for k in METRICS}
    for label, overrides in sweep_cells(study, cfg):
        values = {k: [] for k in METRICS}
        runs = []
        for seed in seeds:
            c = cell_config(cfg, method, seed, overrides, log)
            log(f"\n=== {study}: {label}, seed {seed} ({run_dir(c).name}) ===")
            m = run_or_reuse(c, log)
            runs.append(run_dir(c).name)
            for k in METRICS:
                values[k].append(m["test"][k])
            if not cells:  # every run of a seed starts from the same SFT model: take its level once
                for k in METRICS:
                    sft[k].append(m["sft_eval"]["test"][k])
        cells.append({"label": label, "overrides": overrides, "runs": runs,
                      "metrics": {k: results.seed_stats(v) for k, v in values.items()}})
    return {"study": study, "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "method": method,
            "seeds": seeds, "cells": cells, "sft": {k: results.seed_stats(v) for k, v in sft.items()}}


def sweep_markdown(s: dict) -> str:
    study, name = s["study"], results.display(s["method"])
    seeds = ", ".join(map(str, s["seeds"]))
    paper_note = s["dataset"] == "beauty" and s["backbone"] == "tiger"
    if study == "ablation":
        head = f"# Table 2: ablation of {name}, {s['dataset']} ({s['backbone'].upper()}), test split, seeds {seeds}\n\n"
        cols = [c["label"] for c in s["cells"]] + ["SFT"]
        lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for k in METRICS:
            cells = [_fmt(c["metrics"][k]) for c in s["cells"]] + [_fmt(s["sft"][k])]
            lines.append(f"| {results.COLUMN[k]} | " + " | ".join(cells) + " |")
        if paper_note:
            for i, k in enumerate(METRICS):
                ref = [f"{PAPER_TABLE2[c['label']][i]:.4f}" if c["label"] in PAPER_TABLE2 else "–" for c in s["cells"]] + \
                      [f"{PAPER_SFT_TIGER_BEAUTY[i]:.4f}"]
                lines.append(f"| {results.COLUMN[k]} (paper) | " + " | ".join(ref) + " |")
        full = s["cells"][-1]["metrics"]
        lines += ["", "Change of HR@10 / NDCG@10 against the full model (this run):", "",
                  "| variant | ΔHR@10 | ΔNDCG@10 |", "|---|---|---|"]
        for c in s["cells"][:-1]:
            d = [c["metrics"][k]["mean"] - full[k]["mean"] for k in ("hr@10", "ndcg@10")]
            lines.append(f"| {c['label']} | {d[0]:+.4f} | {d[1]:+.4f} |")
        return head + "\n".join(lines) + "\n"
    what = "K (augmented trajectories per sample)" if study == "k" else "λ (weight of L_GFN, Eq. 8)"
    head = f"# Fig. 3: {name} against {what}, {s['dataset']} ({s['backbone'].upper()}), test split, seeds {seeds}\n\n"
    lines = [f"| {study} | " + " | ".join(results.COLUMN[k] for k in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for c in s["cells"]:
        lines.append(f"| {c['label']} | " + " | ".join(_fmt(c["metrics"][k]) for k in METRICS) + " |")
    lines.append("| SFT (dashed line) | " + " | ".join(_fmt(s["sft"][k]) for k in METRICS) + " |")
    best = max(s["cells"], key=lambda c: c["metrics"]["ndcg@10"]["mean"])
    lines += ["", f"Best NDCG@10 at {best['label']}. The paper (Fig. 3, a plot without numbers) reports a reverse-V "
              f"with its best at {'an intermediate K (neither 0 nor 5)' if study == 'k' else 'λ = 1'}."]
    return head + "\n".join(lines) + "\n"


def sweep_figure(s: dict) -> go.Figure:
    """Fig. 3 layout: one panel per metric, the study's values with seed std as error bars, SFT dashed."""
    fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=[results.COLUMN[k] for k in METRICS])
    labels = [c["label"] for c in s["cells"]]
    x = labels
    if s["study"] == "k":
        x = list(K_VALUES)
    elif s["study"] == "lambda":
        x = list(LAMBDAS)
    for j, k in enumerate(METRICS, start=1):
        y = [c["metrics"][k]["mean"] for c in s["cells"]]
        err = [0.0 if math.isnan(c["metrics"][k]["std"]) else c["metrics"][k]["std"] for c in s["cells"]]
        trace = go.Bar if s["study"] == "ablation" else go.Scatter
        kw = {} if s["study"] == "ablation" else {"mode": "lines+markers"}
        fig.add_trace(trace(x=x, y=y, error_y={"type": "data", "array": err}, name=results.display(s["method"]),
                            showlegend=j == 1, marker_color="#1f77b4", hovertext=labels, **kw), row=1, col=j)
        fig.add_hline(y=s["sft"][k]["mean"], line_dash="dash", line_color="red", row=1, col=j, annotation_text="SFT")
    if s["study"] == "lambda":
        fig.update_xaxes(type="log", title_text="λ")
    elif s["study"] == "k":
        fig.update_xaxes(title_text="K", tickvals=list(K_VALUES))
    fig.update_layout(title=f"{s['study']}: {results.display(s['method'])} on {s['dataset']} "
                            f"({s['backbone'].upper()}), seeds {', '.join(map(str, s['seeds']))}; red dashed: SFT",
                      height=420, width=1400)
    return fig


# ----------------------------------------------------------------------------------------
# Sec. 4.5: diversity of SFT and GFlowGR recommendations
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def diversity_of(model: GRModel, cm, t: dict, cfg: Config, popularity: np.ndarray, users: torch.Tensor) -> dict:
    """Diversity numbers of one model over all test users t (tensors of to_tensors).

    popularity (I,): training interaction counts, the order of the KL's axis. users: the test
    samples whose whole distribution P(v|U) over the catalogue is computed (it costs a decode
    of every item per user).
    """
    n_items = model.item_codes.shape[0]
    topk, _ = recommend(model, t, cfg.train, desc="top-10 lists")  # (N, 10)
    counts = M.item_counts(topk, n_items)  # (I,)
    order = np.argsort(-popularity, kind="stable")  # most popular first: the axis of the fitted normal
    # CM scores y_CM(v, U) of each user's recommended items (Sec. 4.5 "Collaborative Scores")
    r_c = []
    for chunk in torch.arange(len(topk)).split(cfg.train.eval_batch):
        hl = t["hist_len"][chunk]
        items = topk[chunk].to(hl.device)
        r_c.append(cm.score(trim(t["hist"][chunk], hl), hl, items.clamp_min(0)).cpu())
    r_c = torch.cat(r_c)  # (N, 10)
    # std (and entropy) of P(v|U) = prod_l P_F over every item, per user, then averaged
    stds, ents, top_mass = [], [], []
    for i in tqdm(users.tolist(), desc="P(v|U) over all items", leave=False):
        hl = t["hist_len"][i : i + 1]
        p = model.item_log_probs(t["hist"][i : i + 1, : int(hl)], hl).sum(1).exp().cpu()  # (I,)
        stds.append(float(p.std(unbiased=False)))
        ents.append(float(-(p * p.clamp_min(1e-30).log()).sum()))
        top_mass.append(float(p.topk(10).values.sum()))
    return {
        "kl_normal": M.kl_to_fitted_normal(counts[order]),
        "prob_std": float(np.mean(stds)), "prob_entropy": float(np.mean(ents)), "top10_mass": float(np.mean(top_mass)),
        "cm_mean": float(r_c.mean(1).mean()), "cm_range": float((r_c.amax(1) - r_c.amin(1)).mean()),
        "cm_std": float(r_c.std(1, unbiased=False).mean()),
        "coverage@10": M.coverage(counts), "gini@10": M.gini(counts),
        "hr@10": M.ranking_metrics(topk, t["target"].cpu())["hr@10"],
        "_counts": counts[order].tolist(), "_r_c": r_c.flatten().tolist(),
    }


DIVERSITY_ROWS = [("kl_normal", "KL(aggregate top-10 distribution ‖ fitted normal)", "lower"),
                  ("prob_std", "std of P(v|U) over all items (mean over users)", "lower"),
                  ("prob_entropy", "entropy of P(v|U), nats (mean over users)", "higher"),
                  ("top10_mass", "P(top-10 items | U) (mean over users)", "lower"),
                  ("cm_mean", "CM score of recommended items: mean", "–"),
                  ("cm_range", "CM score of recommended items: range (max − min per list)", "higher"),
                  ("cm_std", "CM score of recommended items: std (per list)", "higher"),
                  ("coverage@10", "coverage@10 (share of items recommended)", "higher"),
                  ("gini@10", "Gini@10 of item recommendation counts", "lower"),
                  ("hr@10", "HR@10 (for reference)", "higher")]


def study_diversity(cfg: Config, log=print) -> dict:
    method, seeds = gflowgr_method(cfg), seeds_of(cfg)
    device = resolve_device(cfg.train.device)
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    t = to_tensors(splits["test"], device)
    popularity = data_mod.item_popularity(ds)
    per = {"sft": [], method: []}
    for seed in seeds:
        for name in per:
            c = study_config(cfg, name, seed, {})
            log(f"\n=== diversity: {name}, seed {seed} ===")
            run_or_reuse(c, log)
        c = study_config(cfg, method, seed, {})
        cm, _ = collab.load_or_train(ds, splits, c.cm, Path(c.train.out) / ds.name, device, log)
        cm.to(device).eval()
        n = len(t["target"])
        k = cfg.train.diversity_users or n
        users = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(k, n)].sort().values
        for name in per:
            log(f"diversity of {name}, seed {seed}: top-10 lists of {n:,} users, P(v|U) over {ds.n_items:,} items "
                f"for {len(users):,} users")
            per[name].append(diversity_of(load_model(study_config(cfg, name, seed, {}), device), cm, t, c, popularity, users))
    rows = {name: {key: results.seed_stats([d[key] for d in per[name]]) for key, _, _ in DIVERSITY_ROWS} for name in per}
    summary = {"study": "diversity", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "method": method,
               "seeds": seeds, "diversity_users": cfg.train.diversity_users, "rows": rows, "paper": PAPER_DIVERSITY,
               "curves": {name: {"counts_by_popularity": per[name][0]["_counts"], "r_c": per[name][0]["_r_c"]}
                          for name in per}}
    name = results.display(method)
    lines = [f"# Diversity (Sec. 4.5): SFT vs {name}, {cfg.data.dataset} ({cfg.train.backbone.upper()}), "
             f"all {len(t['target']):,} test users' top-10 lists; P(v|U) over {min(k, n):,} users; seeds "
             f"{', '.join(map(str, seeds))}", "",
             f"| measure | more diverse is | SFT | {name} | change |", "|---|---|---|---|---|"]
    for key, text, better in DIVERSITY_ROWS:
        a, b = rows["sft"][key]["mean"], rows[method][key]["mean"]
        change = f"{(b - a) / abs(a) * 100:+.1f}%" if a else "–"
        lines.append(f"| {text} | {better} | {_fmt(rows['sft'][key])} | {_fmt(rows[method][key])} | {change} |")
    lines += ["", f"Paper (TIGER, Beauty): {PAPER_DIVERSITY}.", "",
              "KL: the aggregate distribution of top-10 recommendations over items, items ordered by training "
              "popularity, against the normal with the same mean and variance on that axis (metrics.kl_to_fitted_normal). "
              "CM range and std are taken within each user's list, then averaged."]
    return write_outputs(cfg, "diversity", "\n".join(lines) + "\n", summary, diversity_figure(summary), log)


def diversity_figure(s: dict) -> go.Figure:
    """Left: Lorenz curve of the item recommendation counts (the Gini's curve). Right: CM scores of recommended items."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Lorenz curve of top-10 recommendation counts",
                                                        "CM score of recommended items"])
    colours = {"sft": "#7f7f7f", s["method"]: "#1f77b4"}
    for name, curve in s["curves"].items():
        c = np.sort(np.asarray(curve["counts_by_popularity"], dtype=float))
        share = np.concatenate([[0.0], np.cumsum(c) / max(c.sum(), 1)])
        x = np.linspace(0, 1, len(share))
        step = max(1, len(x) // 2000)  # at most ~2,000 points per curve
        fig.add_trace(go.Scatter(x=x[::step], y=share[::step], name=results.display(name), line_color=colours[name]),
                      row=1, col=1)
        fig.add_trace(go.Histogram(x=curve["r_c"], name=results.display(name), marker_color=colours[name], opacity=0.6,
                                   histnorm="probability", nbinsx=40, showlegend=False), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="equal exposure", line={"dash": "dash", "color": "black"}), row=1, col=1)
    fig.update_xaxes(title_text="share of items (fewest recommendations first)", row=1, col=1)
    fig.update_yaxes(title_text="share of recommendations", row=1, col=1)
    fig.update_xaxes(title_text="y_CM(v, U)", row=1, col=2)
    fig.update_layout(barmode="overlay", title=f"Diversity on {s['dataset']}, seed {s['seeds'][0]}", height=450, width=1200)
    return fig


# ----------------------------------------------------------------------------------------
# Exposure bias where the truth is known (the toy world)
# ----------------------------------------------------------------------------------------


def hidden_positives(ds) -> list[list[int]]:
    """Per user, the true preferences never observed: true_prefs minus the whole observed sequence."""
    return [sorted(set(p) - set(s)) for p, s in zip(ds.true_prefs, ds.sequences)]


def exposure_of(topk: np.ndarray, target: np.ndarray, hidden: list, tail: list, pop_pct: np.ndarray) -> dict:
    """recall@10 of the held-out observed item and of the hidden true positives (all, and only the
    low-exposure half), plus the mean exposure percentile of what is recommended (1 = most exposed)."""
    topk = np.asarray(topk)
    return {"recall_observed": M.ranking_metrics(topk, target)["hr@10"],
            "recall_hidden": M.recall_hidden(topk, hidden, 10),
            "recall_hidden_tail": M.recall_hidden(topk, tail, 10),
            "exposure_pct": float(pop_pct[topk[:, :10].clip(0)].mean())}


EXPOSURE_ROWS = [("recall_observed", "recall@10, held-out observed item (= HR@10)"),
                 ("recall_hidden", "recall@10, true preferences never observed"),
                 ("recall_hidden_tail", "recall@10, hidden preferences of low exposure (below the median propensity)"),
                 ("exposure_pct", "exposure percentile of recommended items (1 = most exposed)")]


def study_exposure(cfg: Config, log=print) -> dict:
    if cfg.data.dataset != "toy":  # say so before loading a large data set
        raise DataError(f"--study exposure needs a world whose true preferences are known: use --dataset toy "
                        f"({cfg.data.dataset} records only what users were exposed to)")
    method, seeds = gflowgr_method(cfg), seeds_of(cfg)
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    if ds.true_prefs is None or ds.item_pop_weight is None:
        raise DataError(f"--study exposure needs a world whose true preferences are known: use --dataset toy "
                        f"({cfg.data.dataset} records only what users were exposed to)")
    device = resolve_device(cfg.train.device)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    test = splits["test"]
    t = to_tensors(test, device)
    hidden_all = hidden_positives(ds)
    hidden = [hidden_all[u] for u in test.user]
    w = ds.item_pop_weight
    pop_pct = np.argsort(np.argsort(w)) / max(len(w) - 1, 1)  # (I,): rank of the exposure propensity in [0, 1]
    median = np.median(w)
    tail = [[i for i in h if w[i] < median] for h in hidden]
    mostpop = np.tile(np.argsort(-data_mod.item_popularity(ds), kind="stable")[:10], (len(test), 1))
    # GFlowGR twice: rewarded by the learned CM, and by the truth (collab.TasteOracle), the control
    # that tells what fine-tuning can add when the reward knows the hidden preferences; SFT-continued
    # is the same budget of plain L_GR (Eq. 1)
    oracle_run = f"{method}+oracle"
    runs = {"sft": ("sft", {}), "sft-continued": ("sft-continued", {}), method: (method, {}),
            oracle_run: (method, {"ft.oracle_reward": True})}
    names = [*runs, "cm", "oracle", "mostpop"]
    per = {name: [] for name in names}
    every_item = torch.arange(ds.n_items, device=device).expand(len(test), -1)  # (N, I)
    for seed in seeds:
        for name, (m, overrides) in runs.items():
            c = study_config(cfg, m, seed, overrides)
            log(f"\n=== exposure: {name}, seed {seed} ===")
            run_or_reuse(c, log)
            topk, _ = recommend(load_model(c, device), t, c.train, desc="top-10 lists")
            per[name].append(exposure_of(topk.numpy(), test.target, hidden, tail, pop_pct))
        cm, _ = collab.load_or_train(ds, splits, c.cm, Path(c.train.out) / ds.name, device, log)
        oracle = collab.TasteOracle(ds.item_cluster, c.cm).to(device)
        with torch.no_grad():  # each model's own top-10 over the whole (small) catalogue, history included as for the GR
            scores = cm.eval().score(t["hist"], t["hist_len"], every_item)
            truth = oracle.score(t["hist"], t["hist_len"], every_item)  # 0 / 1: ties broken by item id, random here
        per["cm"].append(exposure_of(scores.topk(10).indices.cpu().numpy(), test.target, hidden, tail, pop_pct))
        per["oracle"].append(exposure_of(truth.topk(10).indices.cpu().numpy(), test.target, hidden, tail, pop_pct))
        per["mostpop"].append(exposure_of(mostpop, test.target, hidden, tail, pop_pct))
    rows = {name: {key: results.seed_stats([d[key] for d in per[name]]) for key, _ in EXPOSURE_ROWS} for name in names}
    keys = ("recall_observed", "recall_hidden", "recall_hidden_tail")
    tests = {key: results.welch_greater(rows[method][key]["values"], rows["sft"][key]["values"]) for key in keys}
    tests_oracle = {key: results.welch_greater(rows[oracle_run][key]["values"], rows["sft-continued"][key]["values"])
                    for key in keys}
    obs_pop = float(np.mean([w[i] for s in ds.sequences for i in s]))
    hid_pop = float(np.mean([w[i] for h in hidden_all for i in h]))
    summary = {"study": "exposure", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "method": method,
               "seeds": seeds, "rows": rows, "welch_gflowgr_gt_sft": tests, "welch_oracle_gt_sft_continued": tests_oracle,
               "world": {"mean_propensity_observed": obs_pop, "mean_propensity_hidden": hid_pop,
                         "users_with_hidden": int(sum(1 for h in hidden if h)),
                         "mean_hidden_per_user": float(np.mean([len(h) for h in hidden]))}}
    display = {n: results.display(n) for n in names} | {oracle_run: f"{results.display(method)}, oracle reward",
                                                       "oracle": "oracle (taste clusters)"}
    lines = [f"# Exposure bias where the truth is known: {cfg.data.dataset}, test users, seeds {', '.join(map(str, seeds))}", "",
             f"Observed items have mean exposure propensity {obs_pop:.3f}, the true preferences never observed "
             f"{hid_pop:.3f}: observation favours popular items. Each user has {summary['world']['mean_hidden_per_user']:.1f} "
             f"hidden true positives on average.", "",
             "| measure | " + " | ".join(display[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, text in EXPOSURE_ROWS:
        lines.append(f"| {text} | " + " | ".join(_fmt(rows[n][key]) for n in names) + " |")
    lines += ["", f"One-sided Welch t-test, {display[method]} > SFT (needs 2+ seeds): " +
              ", ".join(f"{k} p = {results._p(v[1])}" for k, v in tests.items()) + f"; {display[oracle_run]} > "
              f"SFT-continued: " + ", ".join(f"{k} p = {results._p(v[1])}" for k, v in tests_oracle.items()), "",
              "recall@10 of hidden positives = |top-10 ∩ H_u| / min(10, |H_u|), H_u = true preferences minus every "
              "observed item (metrics.recall_hidden). CM = the SASRec teacher's own top-10; MostPop = training popularity. "
              "Oracle reward: r_c = 1 for an unseen item of a taste cluster the history shows, else 0 (collab.TasteOracle), "
              "in place of the CM; the oracle row is that truth's own top-10 (ties broken by item id)."]
    return write_outputs(cfg, "exposure", "\n".join(lines) + "\n", summary, exposure_figure(summary, names, display), log)


def exposure_figure(s: dict, names: list[str], display: dict) -> go.Figure:
    fig = go.Figure()
    keys = [k for k, _ in EXPOSURE_ROWS]
    for name in names:
        r = s["rows"][name]
        fig.add_trace(go.Bar(x=keys, y=[r[k]["mean"] for k in keys], name=display[name],
                             error_y={"type": "data", "array": [0.0 if math.isnan(r[k]["std"]) else r[k]["std"] for k in keys]}))
    fig.update_layout(barmode="group", title=f"Exposure bias on {s['dataset']}: recall of observed vs hidden true "
                                             f"preferences, seeds {', '.join(map(str, s['seeds']))}", height=450, width=1100)
    return fig


# ----------------------------------------------------------------------------------------
# Fusion: the ceiling of what the CM's knowledge can add to the GR
# ----------------------------------------------------------------------------------------

FUSION_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
FUSION_POOL = 50  # the SFT model's beam top-50 is re-ranked


@torch.no_grad()
def fusion_pool(model: GRModel, cm, t: dict, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SFT model's beam top-FUSION_POOL items per sample, their log P_GR and the CM's logits, each (N, pool)."""
    tc = copy.copy(cfg.train)
    tc.beam, tc.topk = max(cfg.train.beam, FUSION_POOL), FUSION_POOL
    items, log_p = recommend(model, t, tc, desc="fusion pool")
    logits = torch.empty(items.shape)
    for chunk in torch.arange(len(items)).split(1024):
        hl = t["hist_len"][chunk]
        logits[chunk] = cm.logits(trim(t["hist"][chunk], hl), hl, items[chunk].clamp_min(0).to(hl.device)).cpu()
    pad = items < 0  # fewer real items than the pool (tiny catalogues)
    # Under --cm-filter-seen a history item's logit is -inf; a large finite one ranks it last for
    # every alpha > 0 and keeps alpha = 0 the SFT model itself (0 * -inf would be NaN).
    logits = logits.clamp_min(-1e4)
    return items, log_p.masked_fill(pad, float("-inf")), logits.masked_fill(pad, 0.0)


def history_in_pool(items: torch.Tensor, t: dict) -> torch.Tensor:
    """(N, pool) bool: True where the pool's item is in the sample's own history (t["hist"], -1 = padding)."""
    return collab.in_history(items, t["hist"].cpu())


def fused_topk(items: torch.Tensor, log_p: torch.Tensor, logits: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """Top-k of the pool by log P_GR(v | U) + alpha * s_CM(v, U): (N, k)."""
    order = torch.argsort(log_p + alpha * logits, dim=1, descending=True, stable=True)[:, :k]
    return items.gather(1, order)


@torch.no_grad()
def r_c_distribution(cm, t: dict, n_items: int, seed: int, n_users: int = 2000, n_random: int = 50) -> dict:
    """r_c of the observed item against uniformly random items, for each mapping of collab.CM_SCORES.

    {mapping: {"observed": {mean, q10, q50, q90}, "random": {...}}} over n_users random samples.
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(t["target"]), generator=g)[:n_users]
    hist, hl, target = t["hist"][idx], t["hist_len"][idx], t["target"][idx]
    rand = torch.randint(0, n_items, (len(idx), n_random), generator=g).to(target.device)
    saved, out = cm.cfg.score, {}
    q = lambda x: {"mean": float(x.mean()), "q10": float(x.quantile(0.1)), "q50": float(x.quantile(0.5)),
                   "q90": float(x.quantile(0.9))}
    try:
        for mapping in collab.CM_SCORES:
            cm.cfg.score = mapping
            out[mapping] = {"observed": q(cm.score(hist, hl, target[:, None]).flatten().cpu()),
                            "random": q(cm.score(hist, hl, rand).flatten().cpu())}
    finally:
        cm.cfg.score = saved
    return out


def study_fusion(cfg: Config, log=print) -> dict:
    """SFT's beam top-50 re-ranked by log P_GR + alpha * CM logit, alpha chosen on validation NDCG@10."""
    seeds = seeds_of(cfg)
    device = resolve_device(cfg.train.device)
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    tensors = {name: to_tensors(splits[name], device) for name in ("valid", "test")}
    per_seed = []
    for seed in seeds:
        c = study_config(cfg, "sft", seed, {})
        log(f"\n=== fusion: SFT, seed {seed} ===")
        sft_metrics = run_or_reuse(c, log)
        model = load_model(c, device)
        cm, cm_info = collab.load_or_train(ds, splits, c.cm, Path(c.train.out) / ds.name, device, log)
        cm.to(device).eval()
        pools = {name: fusion_pool(model, cm, tensors[name], c) for name in tensors}
        curve = {name: [M.ranking_metrics(fused_topk(*pools[name], a, cfg.train.topk), tensors[name]["target"].cpu())
                        for a in FUSION_WEIGHTS] for name in tensors}
        best = max(range(len(FUSION_WEIGHTS)), key=lambda i: curve["valid"][i]["ndcg@10"])  # chosen on validation
        # How much of the fusion is only "do not recommend what the user already has": SFT's own
        # order with its history items moved to the end, and their share of SFT's top-k.
        seen = {name: history_in_pool(pools[name][0], tensors[name]) for name in tensors}  # (N, pool) each
        no_history = {name: M.ranking_metrics(fused_topk(pools[name][0], pools[name][1], -1e4 * seen[name].float(), 1.0,
                                                         cfg.train.topk), tensors[name]["target"].cpu()) for name in tensors}
        seen_share = {name: float(seen[name][:, : cfg.train.topk].float().mean()) for name in tensors}
        per_seed.append({"seed": seed, "alpha": FUSION_WEIGHTS[best], "fusion": {n: curve[n][best] for n in curve},
                         "sft_no_history": no_history, "history_share_of_sft_topk": seen_share,
                         "sft": {n: sft_metrics[n] for n in ("valid", "test")}, "cm": {n: cm_info[n] for n in ("valid", "test")},
                         "curve": {n: [m["ndcg@10"] for m in curve[n]] for n in curve},
                         "r_c": r_c_distribution(cm, tensors["valid"], ds.n_items, seed)})
        log(f"fusion, seed {seed}: alpha {FUSION_WEIGHTS[best]} (valid NDCG@10 {curve['valid'][best]['ndcg@10']:.4f}), "
            f"test HR@10 {curve['test'][best]['hr@10']:.4f} against SFT {sft_metrics['test']['hr@10']:.4f}")
    rows = {name: {k: results.seed_stats([p[name]["test"][k] for p in per_seed]) for k in METRICS}
            for name in ("sft", "sft_no_history", "cm", "fusion")}
    summary = {"study": "fusion", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "seeds": seeds,
               "weights": FUSION_WEIGHTS, "pool": FUSION_POOL, "per_seed": per_seed, "rows": rows}
    lines = [f"# Fusion ceiling: SFT's beam top-{FUSION_POOL} re-ranked by log P_GR + alpha * CM logit, "
             f"{cfg.data.dataset} ({cfg.train.backbone.upper()}), test split, seeds {', '.join(map(str, seeds))}", "",
             "| model | " + " | ".join(m.upper() for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, label in (("sft", "SFT"), ("sft_no_history", "SFT, history items left out"), ("cm", "CM (SASRec)"),
                        ("fusion", "SFT + CM fusion")):
        lines.append(f"| {label} | " + " | ".join(_fmt(rows[name][k]) for k in METRICS) + " |")
    lines += ["", f"Share of SFT's top-{cfg.train.topk} that is in the user's own history (test): "
              + ", ".join(f"seed {p['seed']}: {p['history_share_of_sft_topk']['test']:.1%}" for p in per_seed) + ".",
              "", "alpha chosen on validation NDCG@10 from " + ", ".join(f"{a:g}" for a in FUSION_WEIGHTS) + ": "
              + ", ".join(f"seed {p['seed']}: {p['alpha']:g}" for p in per_seed) + ".", "",
              "## r_c of the observed item against 50 random items (validation users, first seed)", "",
              "| mapping | observed: mean (q10 / q50 / q90) | random: mean (q10 / q50 / q90) |", "|---|---|---|"]
    for mapping, d in per_seed[0]["r_c"].items():
        f = lambda x: f"{x['mean']:.3f} ({x['q10']:.3f} / {x['q50']:.3f} / {x['q90']:.3f})"
        lines.append(f"| {mapping} | {f(d['observed'])} | {f(d['random'])} |")
    fig = go.Figure([go.Scatter(x=list(FUSION_WEIGHTS), y=per_seed[0]["curve"][n], mode="lines+markers", name=n)
                     for n in ("valid", "test")])
    fig.update_layout(title=f"Fusion weight alpha against NDCG@10 (seed {per_seed[0]['seed']})", xaxis_title="alpha",
                      yaxis_title="NDCG@10")
    return write_outputs(cfg, "fusion", "\n".join(lines) + "\n", summary, fig, log)


# ----------------------------------------------------------------------------------------
# The paper's regime: fine-tuning an under-trained SFT
# ----------------------------------------------------------------------------------------

REGIME_METHODS = ("gflowgr-tb", "sft-continued", "sdpo")


def study_paper_regime(cfg: Config, log=print) -> dict:
    """Train an SFT stopped early (--regime-epochs, a full schedule of that length), fine-tune it with
    GFlowGR-TB, SFT-continued and S-DPO for the same budget, and test whether GFlowGR's gain over
    that SFT exceeds SFT-continued's (one-sided Welch t-test over seeds)."""
    seeds = seeds_of(cfg)
    regime = {"train.epochs": cfg.train.regime_epochs, "train.tag": "paper-regime"}
    values = {name: {k: [] for k in METRICS} for name in ("sft", *REGIME_METHODS)}
    valid = {name: [] for name in values}
    for seed in seeds:
        for method in ("sft", *REGIME_METHODS):
            c = study_config(cfg, method, seed, regime)
            log(f"\n=== paper-regime: {method}, seed {seed} ({run_dir(c).name}) ===")
            m = run_or_reuse(c, log)
            for k in METRICS:
                values[method][k].append(m["test"][k])
            valid[method].append(m["valid"]["hr@10"])
    stats = {name: {k: results.seed_stats(v) for k, v in d.items()} for name, d in values.items()}
    gains = {name: {k: [a - b for a, b in zip(values[name][k], values["sft"][k])] for k in METRICS} for name in REGIME_METHODS}
    tests = {k: results.welch_greater(gains["gflowgr-tb"][k], gains["sft-continued"][k])[1] for k in METRICS}  # p
    summary = {"study": "paper-regime", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "seeds": seeds,
               "regime_epochs": cfg.train.regime_epochs, "test": stats, "valid_hr@10": valid,
               "gains": {n: {k: results.seed_stats(v) for k, v in g.items()} for n, g in gains.items()},
               "welch_gflowgr_gain_gt_sft_continued_gain": tests}
    lines = [f"# The paper's regime: fine-tuning an SFT trained for {cfg.train.regime_epochs} epochs, {cfg.data.dataset} "
             f"({cfg.train.backbone.upper()}), test split, seeds {', '.join(map(str, seeds))}", "",
             "| model | " + " | ".join(m.upper() for m in METRICS) + " | gain in HR@10 over this SFT |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for name in ("sft", *REGIME_METHODS):
        gain = _fmt(summary["gains"][name]["hr@10"]) if name in gains else "–"
        lines.append(f"| {results.display(name)} | " + " | ".join(_fmt(stats[name][k]) for k in METRICS) + f" | {gain} |")
    lines += ["", f"Paper, TIGER-SFT on Beauty: HR@10 {PAPER_SFT_TIGER_BEAUTY[1]}.", "",
              "One-sided Welch t-test, gain of GFlowGR-TB > gain of SFT-continued: "
              + ", ".join(f"{k.upper()} p = {tests[k]:.3g}" if tests[k] == tests[k] else f"{k.upper()} p = –" for k in METRICS)
              + " (needs 2 or more seeds)."]
    fig = go.Figure([go.Bar(x=[results.display(n) for n in REGIME_METHODS],
                            y=[summary["gains"][n]["hr@10"]["mean"] for n in REGIME_METHODS],
                            error_y=dict(array=[np.nan_to_num(summary["gains"][n]["hr@10"]["std"]) for n in REGIME_METHODS]))])
    fig.update_layout(title="Gain in test HR@10 over the under-trained SFT", yaxis_title="HR@10 gain")
    return write_outputs(cfg, "paper-regime", "\n".join(lines) + "\n", summary, fig, log)


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def run_study(cfg: Config, log=print) -> dict:
    """Run cfg.train.study for cfg.train.seeds (default: cfg.train.seed); returns the summary written to JSON."""
    cfg = finalize(cfg)
    study = cfg.train.study
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if study in ("ablation", "k", "lambda"):
        s = run_sweep(cfg, study, log)
        return write_outputs(cfg, study, sweep_markdown(s), s, sweep_figure(s), log)
    if study == "diversity":
        return study_diversity(cfg, log)
    if study == "exposure":
        return study_exposure(cfg, log)
    if study == "fusion":
        return study_fusion(cfg, log)
    if study == "paper-regime":
        return study_paper_regime(cfg, log)
    raise DataError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")
