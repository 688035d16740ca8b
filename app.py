"""Streamlit inspector: look inside a GFlowGR run user by user (paper Sec. 3 and the case study of Sec. 4.5, Fig. 4).

For one finished run and one test user it shows what the paper's equations compute:
the history and held-out item; the SFT and fine-tuned top-10 lists (Sec. 3.3: beam search
over P_GR); the semantic-ID prefix tree coloured by the forward policy P_F(t_l | U, s_{l-1});
P_F, log F(s_l) (Eq. 5) and log Z(U) + sum_l log P_F vs log R (Eq. 6) along the observed and
augmented trajectories; the reward R = r_a + r_c + r_sim (Sec. 3.2) and the Eq. (8) weight;
the user's whole distribution over items under SFT and the fine-tuned model; and the training
curves, including the sampler's curriculum (Sec. 3.1), and a --refit-test run's test model dashed.

Everything is read from `runs/` (env GFLOWGR_RUNS overrides): the run's config.json,
metrics.json, metrics.jsonl (and metrics_refit.jsonl) and checkpoint.pt, the cached SFT stage and the cached CM. The app
never trains; per-user numbers are computed live, so any test user can be inspected.

One concept at ~620 lines: a Streamlit page is one script; each panel is one function
(`panel_*`), loading and the per-user computations come first.

Usage: `streamlit run app.py` (after `python train.py --dataset toy --method gflowgr-tb`)
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

import distributed

RUNS_ENV = "GFLOWGR_RUNS"
EXPLAIN_WIDTH = 1  # columns: chart 3, explanation 1


class RunError(Exception):
    """A run the app cannot show (half written, corrupt, its cached stages gone); the message says what to do."""


# ----------------------------------------------------------------------------------------
# Finding and loading runs (no Streamlit calls here: the tests use these directly)
# ----------------------------------------------------------------------------------------


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV) or "runs")


def parse_run_name(name: str) -> dict | None:
    """'beauty__gflowgr-tb__seed42' or 'beauty__letter__sft__seed43' -> fields; None for other folders."""
    parts = name.split("__")
    if len(parts) not in (3, 4) or not parts[-1].startswith("seed") or not parts[-1][4:].isdigit():
        return None
    backbone = parts[1] if len(parts) == 4 else "tiger"
    # a study variant ('gflowgr-tb+K1', train.variant) is shown as its own method; "base" is the algorithm
    return {"name": name, "dataset": parts[0], "backbone": backbone, "method": parts[-2],
            "base": parts[-2].split("+")[0], "seed": int(parts[-1][4:])}


def list_runs(root: Path) -> list[dict]:
    """Every run folder under root, sorted; 'finished' says whether its artefacts are all there."""
    if not root.is_dir():
        return []
    runs = []
    for d in sorted(root.iterdir()):
        info = parse_run_name(d.name) if d.is_dir() else None
        if info:
            info["finished"] = all((d / f).exists() for f in ("config.json", "metrics.json", "checkpoint.pt"))
            runs.append(info)
    return runs


@dataclass
class Bundle:
    """One run, ready for inference: models on the CPU, the test split, the item texts."""

    name: str
    method: str
    objective: str | None  # "tb" / "db" for GFlowGR runs
    cfg: object
    titles: list
    attributes: list
    test: dict  # tensors: hist, hist_len, target, user
    user_to_sample: dict
    model: object
    sft_model: object
    heads: object | None
    cm: object | None
    metrics: dict
    curves: list
    refit_curves: list = field(default_factory=list)  # --refit-test: the test model's training (metrics_refit.jsonl)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{what} is missing ({path}): the run is half written. Rerun its train.py command to finish it.")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{what} is corrupt ({path}). Delete the run folder and rerun its train.py command.")


def _load_checkpoint(path: Path, what: str) -> dict:
    if not path.exists():
        raise RunError(f"{what} is missing ({path}). Rerun the run's train.py command to rebuild it.")
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # truncated or not a checkpoint: torch raises several kinds
        raise RunError(f"{what} could not be read ({path}: {type(e).__name__}). Delete it and rerun train.py.")


def _stage_dir(recorded: str, root: Path, dataset: str) -> Path:
    """The cached SFT stage: where training recorded it, else under this runs folder (runs moved)."""
    p = Path(recorded)
    return p if p.exists() else root / dataset / p.name


def load_bundle(run_dir: Path) -> Bundle:
    """Rebuild everything a run needs for inference; RunError with a clear message if anything is missing."""
    import collab
    import data as data_mod
    from gflowgr import GFlowNetHeads, GRModel
    from batches import to_tensors
    from config import config_from_dict
    from finetune import OBJECTIVE

    info = parse_run_name(run_dir.name)
    if info is None:
        raise RunError(f"{run_dir} is not a run folder (expected <dataset>__<method>__seed<N>).")
    cfg = config_from_dict(_read_json(run_dir / "config.json", "config.json"))
    metrics = _read_json(run_dir / "metrics.json", "metrics.json")
    try:
        ds = data_mod.load_dataset(cfg.data, verbose=False)
    except data_mod.DataError as e:
        raise RunError(f"the run's data set could not be loaded: {e}")
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    ckpt = _load_checkpoint(run_dir / "checkpoint.pt", "the run's checkpoint")
    model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).eval()
    if info["base"] == "sft":
        sft_model = model
    else:
        stage = _stage_dir(metrics.get("stage", ""), run_dir.parent, info["dataset"])
        sft = _load_checkpoint(stage / "checkpoint.pt", "the SFT checkpoint this run started from")
        sft_model = GRModel.from_state(sft["model_args"], sft["model"]).eval()
    heads = None
    if ckpt.get("heads") is not None and OBJECTIVE.get(info["base"]):
        heads = GFlowNetHeads(**ckpt["heads_args"])
        heads.load_state_dict(ckpt["heads"])
        heads.eval()
    cm = None
    cm_path = run_dir.parent / info["dataset"] / f"cm-{collab.cm_key(ds, cfg.cm)}" / "checkpoint.pt"
    if cm_path.exists():  # SFT runs train no CM; then r_c is 0 and there are no augmented items
        c = _load_checkpoint(cm_path, "the collaborative model")
        cm = collab.SASRec.from_state(c["model_args"], c["model"]).eval()
        cm.cfg.score = cfg.cm.score  # the run's r_c mapping (not part of the CM's training)
        if cfg.ft.oracle_reward:  # the run was rewarded by the toy world's truth: show that r_c
            cm = collab.TasteOracle(ds.item_cluster, cm.cfg)
    test = to_tensors(splits["test"], "cpu")
    return Bundle(name=run_dir.name, method=info["method"], objective=OBJECTIVE.get(info["base"]), cfg=cfg,
                  titles=ds.titles, attributes=ds.attributes, test=test,
                  user_to_sample={int(u): i for i, u in enumerate(test["user"].tolist())},
                  model=model, sft_model=sft_model, heads=heads, cm=cm, metrics=metrics,
                  curves=read_curves(run_dir / "metrics.jsonl"), refit_curves=read_curves(run_dir / "metrics_refit.jsonl"))


def read_curves(path: Path) -> list:
    """The rows of a metrics.jsonl ([] if there is none); a line cut by an interrupted write is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


@torch.no_grad()
def user_view(b: Bundle, sample: int, progress: float = 1.0) -> dict:
    """Everything the panels show for one test sample (one user), computed live on the CPU."""
    from sampler import TrajectorySampler
    from inspection import inspect_users

    t = b.test
    hist, hl, target = t["hist"][sample : sample + 1], t["hist_len"][sample : sample + 1], t["target"][sample : sample + 1]
    # a sampler seeded by the user: the same user always gets the same augmented items
    sampler = TrajectorySampler(b.cm, len(b.titles), b.cfg.sampler, seed=b.cfg.train.seed * 100_003 + sample) \
        if b.cm is not None else None
    view = inspect_users(b.sft_model, b.model, b.heads, b.cm, sampler, hist, hl, target, b.cfg, progress)[0]
    hist = hist[:, : int(hl)]
    view["sample"], view["user"] = sample, int(t["user"][sample])
    view["history"] = hist[0].tolist()
    view["sft_log_pf"] = b.sft_model.item_log_probs(hist, hl).numpy()  # (I, L)
    view["ft_log_pf"] = view["sft_log_pf"] if b.model is b.sft_model else b.model.item_log_probs(hist, hl).numpy()
    return view


@torch.no_grad()
def interesting_users(b: Bundle, max_users: int = 2000, seed: int = 0) -> dict:
    """Test samples where SFT misses and the fine-tuned model hits in its top-k, and the other way.

    Scans up to max_users test users (a fixed random subset on large data sets)."""
    from batches import trim

    n = len(b.test["target"])
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_users].sort().values
    k, beam = b.cfg.train.topk, b.cfg.train.beam
    hit = {}
    for name, model in (("sft", b.sft_model), ("ft", b.model)):
        rows = []
        for chunk in idx.split(512):
            hl = b.test["hist_len"][chunk]
            items, _ = model.beam_search(trim(b.test["hist"][chunk], hl), hl, beam, k)
            rows.append((items == b.test["target"][chunk][:, None]).any(1))
        hit[name] = torch.cat(rows)
    return {"ft_only": idx[~hit["sft"] & hit["ft"]].tolist(), "sft_only": idx[hit["sft"] & ~hit["ft"]].tolist(),
            "scanned": len(idx)}


@torch.no_grad()
def balance_residuals(b: Bundle, n_users: int = 400, progress: float = 1.0, seed: int = 0) -> dict:
    """Eq. (6)'s residual log Z(U) + sum_l log P_F - log R^beta of the observed and of the augmented
    trajectories for n_users random test users (DB runs: log Z = log F(s_0), the telescoped TB).

    Returns {"observed": array (n,), "augmented": array (n * K,), "users": n}; empty for non-GFlowGR runs.
    """
    from sampler import TrajectorySampler
    from inspection import inspect_users

    if b.objective is None or b.heads is None:
        return {"observed": np.array([]), "augmented": np.array([]), "users": 0}
    n = len(b.test["target"])
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_users]
    sampler = TrajectorySampler(b.cm, len(b.titles), b.cfg.sampler, seed=seed) if b.cm is not None else None
    obs, aug = [], []
    for chunk in idx.split(100):
        t = {k: v[chunk] for k, v in b.test.items()}
        for u in inspect_users(b.sft_model, b.model, b.heads, b.cm, sampler, t["hist"], t["hist_len"], t["target"], b.cfg, progress):
            for tr in u["trajectories"]:
                start = u["log_z"] if b.objective == "tb" else tr["log_flow"][0]
                (obs if tr["observed"] else aug).append(start + tr["log_pf_sum"] - tr["log_r"])
    return {"observed": np.array(obs), "augmented": np.array(aug), "users": len(idx)}


def entropy(log_p: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution given by its log-probabilities."""
    p = np.exp(log_p)
    return float(-(p * log_p).sum())


# ----------------------------------------------------------------------------------------
# Cached wrappers: models once per run (resource), per-user inference once per user (data)
# ----------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the run's models and data...", max_entries=4)
def cached_bundle(run_dir: str, stamp: float) -> Bundle:
    return load_bundle(Path(run_dir))


@st.cache_data(show_spinner=False, max_entries=64)
def cached_user_view(run_dir: str, stamp: float, sample: int, progress: float) -> dict:
    return user_view(cached_bundle(run_dir, stamp), sample, progress)


@st.cache_data(show_spinner="Computing the TB balance over test users...", max_entries=4)
def cached_balance(run_dir: str, stamp: float, progress: float) -> dict:
    return balance_residuals(cached_bundle(run_dir, stamp), progress=progress)


@st.cache_data(show_spinner="Finding users where the two models disagree...", max_entries=4)
def cached_interesting(run_dir: str, stamp: float) -> dict:
    return interesting_users(cached_bundle(run_dir, stamp))


# ----------------------------------------------------------------------------------------
# Panels
# ----------------------------------------------------------------------------------------


def item_label(b: Bundle, item: int, width: int = 60) -> str:
    title = b.titles[item] if 0 <= item < len(b.titles) else "?"
    return f"{item}: {title[:width]}"


def explain(text: str) -> None:
    st.caption(text)


def sidebar(root: Path, runs: list[dict]) -> tuple[dict, str | None]:
    """Run pickers (dataset, backbone, method, seed) and the user picker. Returns (run, user id text)."""
    st.sidebar.header("Run")
    st.sidebar.caption(f"runs folder: `{root}` (env {RUNS_ENV})")
    datasets = sorted({r["dataset"] for r in runs})
    dataset = st.sidebar.selectbox("Data set", datasets, key="dataset")
    runs = [r for r in runs if r["dataset"] == dataset]
    backbones = sorted({r["backbone"] for r in runs})
    backbone = st.sidebar.selectbox("Backbone", backbones, key="backbone") if len(backbones) > 1 else backbones[0]
    runs = [r for r in runs if r["backbone"] == backbone]
    methods = sorted({r["method"] for r in runs}, key=lambda m: (not m.startswith("gflowgr"), m))
    method = st.sidebar.selectbox("Method", methods, key="method")
    seeds = sorted(r["seed"] for r in runs if r["method"] == method)
    seed = st.sidebar.selectbox("Seed", seeds, key="seed")
    run = next(r for r in runs if r["method"] == method and r["seed"] == seed)
    st.sidebar.header("User")
    user = st.sidebar.text_input("Test user id", key="user_id", help="the user's id in the data set; every user has one test sample")
    return run, user


def user_buttons(b: Bundle, run_dir: str, stamp: float) -> None:
    """The two 'random interesting user' buttons; a click writes the chosen id into the user box."""
    def pick(kind: str) -> None:
        found = cached_interesting(run_dir, stamp)[kind]
        if found:
            st.session_state["user_id"] = str(int(b.test["user"][random.choice(found)]))
            st.session_state["pick_note"] = None
        else:
            st.session_state["pick_note"] = "no such user among the scanned test users"

    st.sidebar.button("Random user: SFT misses, fine-tuned hits", on_click=pick, args=("ft_only",), key="pick_ft")
    st.sidebar.button("Random user: SFT hits, fine-tuned misses", on_click=pick, args=("sft_only",), key="pick_sft")
    if st.session_state.get("pick_note"):
        st.sidebar.info(st.session_state["pick_note"])


def panel_user(b: Bundle, v: dict) -> None:
    st.header("User and held-out item")
    rows = [{"#": i + 1, "item": it, "title": b.titles[it], "attributes": " / ".join(b.attributes[it][:4])}
            for i, it in enumerate(v["history"])]
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    c1.dataframe(rows, hide_index=True, width="stretch")
    tgt = v["target"]
    c1.markdown(f"**Held-out test item:** {item_label(b, tgt, 120)}  \n*{' / '.join(b.attributes[tgt][:4])}*")
    with c2:
        explain(f"User {v['user']}'s history, oldest first (the last {b.cfg.data.max_his_len} items the model sees). "
                "The held-out item is the user's last interaction: leave-one-out test (Sec. 4.1).")


def _list_rows(b: Bundle, lst: dict, target: int) -> list[dict]:
    return [{"rank": r + 1, "hit": "✓" if it == target else "", "P(v|U)": p, "item": item_label(b, it, 70)}
            for r, (it, p) in enumerate(zip(lst["items"], lst["probs"])) if it >= 0]


def panel_lists(b: Bundle, v: dict, ft_name: str) -> None:
    st.header("SFT vs fine-tuned: top-10")
    c1, c2, c3 = st.columns([3, 3, 2])
    c1.subheader("SFT")
    c1.dataframe(_list_rows(b, v["sft"], v["target"]), hide_index=True, width="stretch")
    c2.subheader(ft_name)
    c2.dataframe(_list_rows(b, v["finetuned"], v["target"]), hide_index=True, width="stretch")
    with c3:
        explain("Trie-constrained beam search (beam 20) over P(v|U) = prod_l P_F(t_l | U, s_{l-1}) (Sec. 3.3: "
                "inference is unchanged by GFlowGR). ✓ marks the held-out item; a hit needs all L ID tokens. "
                "GFlowGR spreads probability by reward, so its list is often flatter and more varied.")


def tree_figure(b: Bundle, log_pf: np.ndarray, target: int, n_items: int) -> go.Figure:
    """Sunburst of the ID prefix tree of the n most probable items (plus the observed one).

    Each node is a prefix s_l; its value is the probability mass of the shown items below it
    and its colour P_F(t_l | U, s_{l-1}), the step that reached it. The observed path is outlined."""
    codes = b.model.item_codes.numpy()  # (I, L)
    total = log_pf.sum(1)  # (I,) log P(v|U)
    top = list(np.argsort(-total)[:n_items])
    if target not in top:
        top.append(target)
    L = codes.shape[1]
    ids, labels, parents, values, colors, widths, hover = [], [], [], [], [], [], []
    node = {}
    for it in top:
        for level in range(L):
            key = tuple(codes[it, : level + 1])
            if key not in node:
                node[key] = len(ids)
                ids.append("/".join(map(str, key)))
                parents.append("/".join(map(str, key[:-1])) if level else "")
                on_path = key == tuple(codes[target, : level + 1])
                leaf = level == L - 1
                labels.append(("★ " if on_path else "") + (f"{it}" if leaf else f"t{level + 1}={key[-1]}"))
                values.append(0.0)
                colors.append(float(np.exp(log_pf[it, level])))
                widths.append(4 if on_path else 0.5)
                hover.append((b.titles[it][:60] + "<br>" if leaf else "") + f"P_F = {math.exp(log_pf[it, level]):.3f}")
            values[node[key]] += float(np.exp(total[it]))
    fig = go.Figure(go.Sunburst(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                                marker=dict(colors=colors, colorscale="Viridis", cmin=0, cmax=1, showscale=True,
                                            colorbar=dict(title="P_F"), line=dict(color="crimson", width=widths)),
                                hovertext=hover, hoverinfo="label+text+value"))
    fig.update_layout(margin=dict(t=10, l=10, r=10, b=10), height=480)
    return fig


def panel_tree(b: Bundle, v: dict, ft_name: str) -> None:
    st.header("Trajectory tree")
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    with c2:
        which = st.radio("Policy", ["fine-tuned", "SFT"], horizontal=True, key="tree_model")
        n = st.slider("Items shown", 5, 50, 20, key="tree_n")
        explain("Each item is a path s_0 -> s_1 -> ... -> s_L through its semantic-ID tokens (one parent per prefix, "
                "so P_B = 1). Colour: P_F(t_l | U, s_{l-1}) of the step into that prefix; size: probability mass of the "
                "shown items below it. ★ and the red outline follow the held-out item's path.")
    log_pf = v["ft_log_pf"] if which == "fine-tuned" else v["sft_log_pf"]
    c1.plotly_chart(tree_figure(b, log_pf, v["target"], n), width="stretch", key="tree")
    c1.caption(f"policy shown: {ft_name if which == 'fine-tuned' else 'SFT'}")


def _traj_name(b: Bundle, tr: dict, k: int) -> str:
    return ("observed " if tr["observed"] else f"augmented {k} ") + f"({tr['item']})"


def panel_balance(b: Bundle, run_dir: str, stamp: float, progress: float) -> None:
    """Eq. (6) over many users: how far from balance the run is, observed against augmented trajectories."""
    res = cached_balance(run_dir, stamp, progress)
    if not res["users"]:
        return
    fig = go.Figure()
    for name, r in (("observed tau", res["observed"]), ("augmented tau'", res["augmented"])):
        if len(r):
            fig.add_trace(go.Histogram(x=r, name=name, opacity=0.6, nbinsx=60, histnorm="probability"))
    fig.update_layout(barmode="overlay", xaxis_title="log Z(U) + sum_l log P_F - log R^beta (nats)",
                      yaxis_title="share of trajectories", height=320, margin=dict(t=20))
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    c1.plotly_chart(fig, width="stretch", key="balance")
    with c2:
        med = lambda r: float(np.median(np.abs(r))) if len(r) else float("nan")
        st.metric("median |residual|, observed", f"{med(res['observed']):.2f}")
        st.metric("median |residual|, augmented", f"{med(res['augmented']):.2f}")
        explain(f"The TB balance of Eq. (6) for {res['users']} random test users (augmented items at the curriculum "
                "position in the sidebar). A balanced GFlowNet has every residual at 0; a positive residual means "
                "the policy gives the trajectory more probability than its reward asks for. DB runs use log F(s_0) as "
                "log Z (the DB residuals telescope to this one).")


def panel_flows(b: Bundle, v: dict, run_dir: str | None = None, stamp: float = 0.0, progress: float = 1.0) -> None:
    st.header("Forward probabilities and flows")
    trajs = v["trajectories"]
    names = [_traj_name(b, tr, k) for k, tr in enumerate(trajs)]
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    fig = go.Figure()
    for name, tr in zip(names, trajs):
        fig.add_trace(go.Scatter(x=[f"t{l + 1}" for l in range(len(tr["p_f"]))], y=tr["p_f"], mode="lines+markers", name=name,
                                 line=dict(width=4 if tr["observed"] else 2)))
    fig.update_layout(yaxis_title="P_F(t_l | U, s_{l-1})", yaxis_range=[0, 1.02], height=320, margin=dict(t=20))
    c1.plotly_chart(fig, width="stretch", key="pf")
    with c2:
        explain("P_F per step along the observed trajectory tau and the augmented ones tau' (drawn by the adaptive "
                "sampler at the curriculum position in the sidebar). P_F is the fine-tuned model's trie-masked softmax "
                "(P_F = P_GR, Sec. 3.3).")
    if b.objective == "db" and trajs and trajs[0]["log_flow"] is not None:
        fig = go.Figure()
        for name, tr in zip(names, trajs):
            L = len(tr["log_flow"])
            fig.add_trace(go.Scatter(x=[f"s{l}" for l in range(L + 1)], y=[*tr["log_flow"], tr["log_r"]],
                                     mode="lines+markers", name=name))
        fig.update_layout(yaxis_title="log F(s_l); last point log R(s_L)", height=320, margin=dict(t=20))
        c1, c2 = st.columns([3, EXPLAIN_WIDTH])
        c1.plotly_chart(fig, width="stretch", key="flows")
        with c2:
            explain("Eq. (5), detailed balance: log F(s_l) + log P_F(s_{l+1}|s_l) = log F(s_{l+1}), with the terminal "
                    "flow fixed to the reward, log F(s_L) = log R^beta. A balanced trajectory's flow falls by exactly "
                    "-log P_F at each step.")
    if b.objective == "tb" and v["log_z"] is not None:
        # Eq. (6): left side log Z(U) + sum_l log P_F(t_l | U, s_{l-1}), right side log R(s_L)
        lhs = [v["log_z"] + tr["log_pf_sum"] for tr in trajs]
        fig = go.Figure([go.Bar(x=names, y=lhs, name="log Z(U) + sum_l log P_F"),
                         go.Bar(x=names, y=[tr["log_r"] for tr in trajs], name="log R^beta")])
        fig.update_layout(barmode="group", height=320, margin=dict(t=20))
        c1, c2 = st.columns([3, EXPLAIN_WIDTH])
        c1.plotly_chart(fig, width="stretch", key="tb")
        with c2:
            st.metric("log Z(U)", f"{v['log_z']:.2f}")
            explain("Eq. (6), trajectory balance: log Z(U) + sum_l log P_F(t_l | U, s_{l-1}) = log R(s_L). The two bars "
                    "of a trajectory are equal when TB is satisfied; their squared gap is L_TB.")
    if b.objective is not None and run_dir is not None:
        panel_balance(b, run_dir, stamp, progress)
    if b.objective is None:
        st.info("This run has no GFlowNet heads (it is not a GFlowGR run): log F and log Z are not defined. "
                "Pick a gflowgr-db or gflowgr-tb run to see Eq. (5) and (6).")


def panel_rewards(b: Bundle, v: dict) -> None:
    st.header("Rewards")
    trajs = v["trajectories"]
    names = [_traj_name(b, tr, k) for k, tr in enumerate(trajs)]
    fig = go.Figure([go.Bar(x=names, y=[tr[k] for tr in trajs], name=k) for k in ("r_a", "r_c", "r_sim")])
    fig.add_trace(go.Scatter(x=names, y=[tr["weight"] for tr in trajs], name="Eq. (8) weight", mode="markers",
                             marker=dict(size=12, symbol="diamond"), yaxis="y2"))
    fig.update_layout(barmode="stack", height=360, margin=dict(t=40), yaxis_title="R = r_a + r_c + r_sim",
                      legend=dict(orientation="h", y=1.12),
                      yaxis2=dict(title="weight 1/(r_a - r_c)^2", overlaying="y", side="right", rangemode="tozero"))
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    c1.plotly_chart(fig, width="stretch", key="rewards")
    with c2:
        terms = b.cfg.ft.reward
        explain(f"Sec. 3.2: r_a = 1 for the observed item, 0 for augmented ones; r_c = the CM's score in [0, 1]; r_sim = "
                f"semantic-ID tokens shared with the observed item. This run's reward uses {terms}. Eq. (8) weights each "
                "trajectory by 1/(r_a - r_c)^2, clamped to [1, 11.1]: large where the CM disagrees least with r_a.")
        if b.cm is None:
            st.info("No collaborative model was trained for this run (an SFT run): r_c = 0, no augmented items.")


def panel_distributions(b: Bundle, v: dict, ft_name: str) -> None:
    st.header("Distributions")
    sft_lp, ft_lp = v["sft_log_pf"].sum(1), v["ft_log_pf"].sum(1)  # (I,) log P(v|U)
    fig = go.Figure()
    for name, lp in (("SFT", sft_lp), (ft_name, ft_lp)):
        fig.add_trace(go.Scatter(y=np.exp(np.sort(lp)[::-1]), mode="lines", name=name))
    fig.update_layout(yaxis_type="log", xaxis_title="items, most probable first", yaxis_title="P(v | U)", height=320,
                      margin=dict(t=20))
    c1, c2 = st.columns([3, EXPLAIN_WIDTH])
    c1.plotly_chart(fig, width="stretch", key="dist")
    with c2:
        st.markdown("| | SFT | fine-tuned |\n|---|---|---|\n"
                    f"| entropy (nats) | {entropy(sft_lp):.2f} | {entropy(ft_lp):.2f} |\n"
                    f"| std of P(v\\|U) | {np.exp(sft_lp).std():.1e} | {np.exp(ft_lp).std():.1e} |\n"
                    f"| top-10 mass | {np.exp(np.sort(sft_lp)[-10:]).sum():.3f} | {np.exp(np.sort(ft_lp)[-10:]).sum():.3f} |")
        explain("This user's generation probabilities over every item, sorted (log scale). A flatter curve and higher "
                "entropy mean probability spread over more items: the diversity claim of Sec. 4.5.")
    div = b.metrics.get("diversity")
    if isinstance(div, dict):
        st.caption("Run-level diversity (from the diversity study)")
        st.json(div, expanded=False)


def panel_training(b: Bundle) -> None:
    st.header("Training")
    curves = b.curves
    if not curves:
        st.info("This run has no training curves (metrics.jsonl).")
        return
    keys = sorted({k for r in curves for k in r if k.startswith("loss/")})
    groups = [("Losses", keys, "explain_loss"), ("log Z", ["gfn/log_z"], "explain_z"),
              ("TB residual |log Z + sum log P_F - log R|, batch mean", ["gfn/residual_obs", "gfn/residual_aug"], "explain_res"),
              ("Gradient norms before clipping at 1", ["grad/gr", "grad/gfn", "grad/total"], "explain_grad"),
              ("Clipping at norm 1 scaled the step (1) or not (0)", ["charts/clipped"], "explain_clip"),
              ("Curriculum: mean CM score of the sampled augmented items", ["sampler/cm_score"], "explain_cur"),
              ("Validation per epoch", [k for k in ("eval/valid_hr@10", "eval/valid_ndcg@10", "eval/valid_hr@5",
                                                    "eval/valid_ndcg@5")], "explain_val")]
    text = {"explain_loss": "L_GR (Eq. 1), the weighted GFlowNet term lambda sum w L_GFN (Eq. 8), or a baseline's loss, per logged "
                            "step. Dashed (a --refit-test run): the test's own model, fitted again on the test contexts.",
            "explain_z": "The TB normaliser log Z(U) averaged over the batch (a scalar with --log-z scalar).",
            "explain_res": "How far Eq. (6) is from balance during training, for the observed trajectory tau and the "
                           "augmented ones tau' (DB: telescoped, log Z = log F(s_0)). A balanced GFlowNet has both near 0.",
            "explain_grad": "The L2 norm of the gradient of L_GR (Eq. 1) and of lambda sum w L_GFN (Eq. 8) alone, and of "
                            "their sum, before clipping. When grad/gfn is hundreds of times grad/gr, the clipped step is "
                            "almost all GFlowNet term.",
            "explain_clip": "1 when the total gradient norm exceeded 1 and clipping scaled the step down, else 0 "
                            "(per logged step).",
            "explain_cur": "Sec. 3.1: the adaptive sampler slides its window from low-CM-score (easy) to high-score (hard) "
                           "augmented items as training proceeds.",
            "explain_val": "Validation HR/NDCG after each epoch (beam search on the preset's validation users)."}
    for title, ks, ex in groups:
        ks = [k for k in ks if any(k in r for r in curves)]
        if not ks:
            continue
        fig = go.Figure()
        # --refit-test: the test model's own training, dashed (it has no validation curve)
        for rows, suffix, dash in ((curves, "", None), (b.refit_curves, " (test refit)", "dash")):
            for k in ks:
                pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
                if pts:
                    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=k + suffix, line=dict(dash=dash),
                                             mode="lines+markers" if "eval" in k else "lines"))
        fig.update_layout(title=title, xaxis_title="step", height=300, margin=dict(t=40))
        if (title == "Losses" and len(ks) > 1) or title.startswith("Gradient"):
            fig.update_layout(yaxis_type="log")
        c1, c2 = st.columns([3, EXPLAIN_WIDTH])
        c1.plotly_chart(fig, width="stretch", key=f"train_{ex}")
        with c2:
            explain(text[ex])


# ----------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="GFlowGR inspector", layout="wide")
    st.title("GFlowGR inspector")
    if distributed.launched() > 1:
        st.error("The inspector is one process: start it with `streamlit run app.py`, not under torchrun.")
        return
    root = runs_root()
    runs = list_runs(root)
    if not runs:
        st.warning(f"No runs found in `{root}`. Train one first: `python train.py --dataset toy --method gflowgr-tb` "
                   f"(or `python train.py --dataset toy`), or point {RUNS_ENV} at a runs folder.")
        return
    run, user_text = sidebar(root, runs)
    run_dir = root / run["name"]
    if not run["finished"]:
        st.error(f"Run `{run['name']}` is half written (config.json, metrics.json or checkpoint.pt is missing): it was "
                 "interrupted or is still training. Rerun its train.py command to finish it, or pick another run.")
        return
    stamp = (run_dir / "metrics.json").stat().st_mtime  # a rerun of the same run invalidates the caches
    try:
        b = cached_bundle(str(run_dir), stamp)
    except RunError as e:
        st.error(f"Run `{run['name']}` cannot be shown: {e}")
        return
    user_buttons(b, str(run_dir), stamp)
    progress = st.sidebar.slider("Sampler curriculum position", 0.0, 1.0, 1.0, 0.25, key="progress",
                                 help="0 = start of training (easy, low CM score), 1 = end (hard); Sec. 3.1")
    if not user_text:
        user_text = str(int(b.test["user"][0]))
    try:
        sample = b.user_to_sample[int(user_text.strip())]
    except (ValueError, KeyError):
        st.warning(f"Unknown user {user_text!r}: enter a user id between {min(b.user_to_sample)} and "
                   f"{max(b.user_to_sample)}, or press one of the random-user buttons.")
        return
    ft_name = {"gflowgr-tb": "GFlowGR-TB", "gflowgr-db": "GFlowGR-DB"}.get(run["base"], run["base"].upper())
    if run["method"] != run["base"]:
        ft_name += f" ({run['method'].split('+', 1)[1]})"
    st.caption(f"run `{run['name']}` · test HR@10 {b.metrics.get('test', {}).get('hr@10', float('nan')):.4f} · "
               f"user {user_text} (test sample {sample})")
    v = cached_user_view(str(run_dir), stamp, sample, float(progress))
    panel_user(b, v)
    panel_lists(b, v, ft_name)
    panel_tree(b, v, ft_name)
    panel_flows(b, v, str(run_dir), stamp, float(progress))
    panel_rewards(b, v)
    panel_distributions(b, v, ft_name)
    panel_training(b)


if __name__ == "__main__":
    main()
