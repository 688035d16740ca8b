"""Did the fine-tuning realise its target? The reward's tilt, measured where GFlowGR trained and where it is judged.

A balanced GFlowNet gives P(v | U) = R(v)^beta / Z(U) (Eq. 6 at zero loss); with --sft-prior the
target is P_SFT(v | U) R(v)^beta / Z(U). Against the SFT model it starts from, the target moves
each item's log-probability by

    t(v) = log R_target(v) - log P_SFT(v | U)    (= beta log R(v) under --sft-prior)

up to the user's log Z(U). A fine-tuned model moved it by d(v) = log P_ft(v | U) - log P_SFT(v | U).
Centred within each user's pool of items (so log Z drops out), over all users and items:

    slope  = sum d t / sum t^2              1: the whole tilt was learned, 0: none of it
    closed = 1 - sum (t - d)^2 / sum t^2    the share of the squared distance SFT -> target covered

for two pools per user, SFT's beam top-50 (the items that decide its list) and the CM's top-50
(where `--candidates cm` draws the augmented trajectories), and two sets of contexts: training
samples the fine-tuning saw (each user's newest --ft-last of them, when that is set) and
validation users (never trained on). The user's own items are left out of both pools (under --cm-filter-seen
their r_c is 0, and no candidate source samples them). SFT-continued (Eq. 1 alone, the same budget) is the control. A second
table ranks SFT's top-50 by log P_SFT + t, the target met exactly on those items, next to the
models' own lists: the accuracy the target holds, apart from how much of it was learned; and by
log P_SFT + s t for shares s = 0.2, 0.5 (SHARES), what learning that share of the tilt exactly,
with no move off it, would be worth (set it beside a model's slope and closed).

The target of a reward with r_a or r_sim depends on the sample's observed item (column 0 of
Sec. 3.2's reward); the tilt is then measured against each sample's own target, and the
"target met exactly" row, which would read the label, is left out.

A second study, the capacity probe (`study_tilt_fit`), fits the tilt alone on fixed contexts and
asks whether the GR can hold it there and how much of it reaches users never fitted.

Usage: `python train.py --dataset beauty --study tilt --seeds 42` (or `--study tilt-fit`)
"""
from __future__ import annotations

import copy
from pathlib import Path

import plotly.graph_objects as go
import torch
from tqdm import tqdm

import collab
import data as data_mod
import metrics as M
import results
from batches import to_tensors, trim
from config import Config, finalize, run_dir
from evaluation import recommend
from experiments import METRICS, _fmt, gflowgr_method, load_model, seeds_of, study_config, write_outputs
from finetune import last_contexts, trajectory_rewards
from losses import tb_loss, vargrad_log_z
from pipeline import run_or_reuse
from runtime import resolve_device

TILT_USERS = 2000  # contexts per set (training samples, validation users), drawn with the seed
TILT_POOL = 50  # items per user in each pool
CONTROL = "sft-continued"
# Partial tilts met exactly: SFT's top-50 ranked by log P_SFT + s t. What learning a share s of the
# target would be worth, to set beside the slope a fine-tuned model reaches (which also moves items
# off the target: "closed").
SHARES = (0.2, 0.5)
# The capacity probe (study_tilt_fit): the tilt alone fitted on fixed contexts, VarGrad TB over SFT's
# whole top-50, Adam at FIT_LR, batches of FIT_BATCH contexts, FIT_EPOCHS passes, slopes at FIT_REPORT.
FIT_EPOCHS, FIT_LR, FIT_BATCH, FIT_REPORT = 20, 1e-3, 200, (1, 3, 5, 10, 15, 20)


@torch.no_grad()
def pools(sft: torch.nn.Module, cm, t: dict, idx: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """{"SFT top-50": (n, pool), "CM top-50": (n, pool)} item ids for the samples idx of t."""
    tc = copy.copy(cfg.train)
    tc.beam, tc.topk = max(cfg.train.beam, TILT_POOL), TILT_POOL
    sft_top, _ = recommend(sft, t, tc, idx, desc="SFT top-50")  # (n, pool), -1 where the trie has fewer items
    cm_top = torch.cat([cm.full_scores(trim(t["hist"][b], t["hist_len"][b]), t["hist_len"][b])
                        .topk(TILT_POOL, dim=1).indices.cpu() for b in idx.split(1024)])  # (n, pool)
    return {"SFT top-50": sft_top, "CM top-50": cm_top}


@torch.no_grad()
def log_probs(model, t: dict, idx: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """log P(v | U) of the pool items (n, pool) under model, for the samples idx."""
    out = []
    for rows in torch.arange(len(idx)).split(256):
        b = idx[rows]
        hl = t["hist_len"][b]
        log_pf, *_ = model.trajectories(trim(t["hist"][b], hl), hl, items[rows].clamp_min(0).to(hl.device))  # (b, pool, L)
        out.append(log_pf.sum(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def target_tilt(sft, cm, t: dict, idx: torch.Tensor, items: torch.Tensor, cfg: Config) -> torch.Tensor:
    """t(v) = log R_target(v) - log P_SFT(v | U) of the pool items (n, pool) (module docstring)."""
    out = []
    for rows in torch.arange(len(idx)).split(256):
        b = idx[rows]
        hl = t["hist_len"][b]
        hist = trim(t["hist"][b], hl)
        cols = torch.cat([t["target"][b, None], items[rows].clamp_min(0).to(hl.device)], 1)  # column 0: the observed item
        r_c = cm.score(hist, hl, cols)  # (b, 1 + pool)
        _, log_r = trajectory_rewards(sft, cols, r_c, cfg)  # (b, 1 + pool): beta log R, floored
        if not cfg.ft.sft_prior:  # the target is R^beta / Z alone: its tilt from SFT subtracts log P_SFT
            log_r = log_r - sft.trajectories(hist, hl, cols)[0].sum(-1)
        out.append(log_r[:, 1:].cpu())
    return torch.cat(out)


def realised(d: torch.Tensor, tilt: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """slope and closed (module docstring) of moves d against the tilt, both (n, pool); valid marks real items."""
    n = valid.sum(1, keepdim=True).clamp_min(1)
    centre = lambda x: torch.where(valid, x - (x * valid).sum(1, keepdim=True) / n, 0.0)  # within each user
    dc, tc = centre(d), centre(tilt)
    sst = float((tc ** 2).sum())
    return {"slope": float((dc * tc).sum()) / sst, "closed": 1.0 - float(((tc - dc) ** 2).sum()) / sst,
            "move": float(dc.abs().sum() / valid.sum()), "tilt": float(tc.abs().sum() / valid.sum())}


def ranked(items: torch.Tensor, score: torch.Tensor, k: int, drop: torch.Tensor | None = None) -> torch.Tensor:
    """The top-k of each pool (n, pool) by score (n, pool), ties in pool order, padding (-1) and the
    items marked in drop (n, pool) last: (n, k)."""
    last = items < 0 if drop is None else (items < 0) | drop
    order = score.masked_fill(last, float("-inf")).argsort(dim=1, descending=True, stable=True)[:, :k]
    return items.gather(1, order)


def share_rankings(items: torch.Tensor, base: torch.Tensor, tilt: torch.Tensor, target: torch.Tensor, k: int,
                   shares=SHARES + (1.0,)) -> dict[str, dict]:
    """Ranking metrics of the pool items (n, pool) ranked by base + s tilt, for each share s (all (n, pool));
    target (n,) the observed items. Keys "target" (s = 1: the target met exactly) and "target x<s>"."""
    return {("target" if s == 1.0 else f"target x{s:g}"): M.ranking_metrics(ranked(items, base + s * tilt, k), target)
            for s in shares}


def study_tilt(cfg: Config, log=print) -> dict:
    """The realised share of the target's tilt for GFlowGR and SFT-continued, on trained and held-out contexts."""
    cfg = finalize(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method, seeds = gflowgr_method(cfg), seeds_of(cfg)
    device = resolve_device(cfg.train.device)
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    tensors = {name: to_tensors(splits[name], device) for name in ("train", "valid", "test")}
    label_free = cfg.ft.reward == "rc"  # the target does not read the observed item
    per_seed = []
    for seed in seeds:
        cfgs = {name: study_config(cfg, name, seed, {}) for name in ("sft", method, CONTROL)}
        run_metrics = {}
        for name, c in cfgs.items():
            log(f"\n=== tilt: {name}, seed {seed} ===")
            run_metrics[name] = run_or_reuse(c, log)
        c = cfgs[method]
        models = {name: load_model(cfgs[name], device) for name in cfgs}
        cm, _ = collab.load_or_train(ds, splits, c.cm, Path(c.train.out) / ds.name, device, log)
        cm.to(device).eval()
        g = torch.Generator().manual_seed(seed)
        trained = last_contexts(tensors["train"], c.ft.ft_last)  # the contexts the fine-tuning saw (--ft-last)
        contexts = {"trained": torch.randperm(len(trained["target"]), generator=g)[:TILT_USERS],
                    "held-out": torch.randperm(len(tensors["valid"]["target"]), generator=g)[:TILT_USERS]}
        cells = []
        for ctx, idx in contexts.items():
            t = trained if ctx == "trained" else tensors["valid"]
            for pool, items in pools(models["sft"], cm, t, idx, c).items():
                valid = (items >= 0) & ~collab.in_history(items, t["hist"][idx].cpu())  # real items the user has not got
                tilt = target_tilt(models["sft"], cm, t, idx, items, c)
                base = log_probs(models["sft"], t, idx, items)
                for name in (method, CONTROL):
                    d = log_probs(models[name], t, idx, items) - base
                    cells.append({"contexts": ctx, "pool": pool, "model": name, **realised(d, tilt, valid)})
                    log(f"tilt, seed {seed}, {ctx}, {pool}, {name}: slope {cells[-1]['slope']:.3f}, "
                        f"closed {cells[-1]['closed']:.3f}")
        ranking = {name: {s: run_metrics[name][s] for s in ("valid", "test")} for name in cfgs}
        if label_free:  # SFT's top-50 re-ranked by log P_SFT + t, every user of both splits
            # the target gives the user's own items r_c = 0 under --cm-filter-seen, so its list holds
            # almost none: beside it, SFT's own list with the history out, the fair comparison
            for s in ("valid", "test"):
                t = tensors[s]
                idx = torch.arange(len(t["target"]))
                items = pools(models["sft"], cm, t, idx, c)["SFT top-50"]
                base = log_probs(models["sft"], t, idx, items)
                tilt = target_tilt(models["sft"], cm, t, idx, items, c)
                for name, m in share_rankings(items, base, tilt, t["target"].cpu(), cfg.train.topk).items():
                    ranking.setdefault(name, {})[s] = m
                seen = collab.in_history(items, t["hist"].cpu())
                ranking.setdefault("sft-history-out", {})[s] = M.ranking_metrics(ranked(items, base, cfg.train.topk, seen), t["target"].cpu())
        per_seed.append({"seed": seed, "cells": cells, "ranking": ranking, "runs": {n: run_dir(c).name for n, c in cfgs.items()},
                         "contexts": {ctx: len(idx) for ctx, idx in contexts.items()}})
    return write_tilt(cfg, method, seeds, per_seed, log)


def write_tilt(cfg: Config, method: str, seeds: list[int], per_seed: list[dict], log=print) -> dict:
    keys = [(c["contexts"], c["pool"], c["model"]) for c in per_seed[0]["cells"]]
    stat = lambda k, f: results.seed_stats([next(c[f] for c in p["cells"] if (c["contexts"], c["pool"], c["model"]) == k)
                                            for p in per_seed])
    rows = {k: {f: stat(k, f) for f in ("slope", "closed", "move", "tilt")} for k in keys}
    seeds_s = ", ".join(map(str, seeds))
    lines = [f"# How much of its target did fine-tuning learn? {cfg.data.dataset} ({cfg.train.backbone.upper()}), "
             f"seeds {seeds_s}, " + ", ".join(f"{n:,} {ctx} contexts" for ctx, n in per_seed[0]["contexts"].items()), "",
             "| contexts | pool | model | slope | closed | mean move (nats) | mean tilt (nats) |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {k[0]} | {k[1]} | {results.display(k[2])} | "
                     + " | ".join(_fmt(rows[k][f]) for f in ("slope", "closed", "move", "tilt")) + " |")
    names = list(per_seed[0]["ranking"])
    label = {"target": "SFT's top-50 ranked by the target (met exactly)", "sft-history-out": "SFT's top-50, history out",
             **{f"target x{a:g}": f"SFT's top-50 ranked by log P_SFT + {a:g} t ({a:g} of the tilt, exactly)" for a in SHARES}}
    lines += ["", "| model | " + " | ".join(f"{s} {m.upper()}" for s in ("valid", "test") for m in ("hr@10", "ndcg@10"))
              + " |", "|---|" + "---|" * 4]
    ranking = {n: {s: {m: results.seed_stats([p["ranking"][n][s][m] for p in per_seed]) for m in METRICS}
                   for s in ("valid", "test")} for n in names}
    for n in names:
        lines.append(f"| {label.get(n, results.display(n))} | "
                     + " | ".join(_fmt(ranking[n][s][m]) for s in ("valid", "test") for m in ("hr@10", "ndcg@10")) + " |")
    summary = {"study": "tilt", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "method": method,
               "seeds": seeds, "users": TILT_USERS, "pool": TILT_POOL, "per_seed": per_seed,
               "rows": [{"contexts": k[0], "pool": k[1], "model": k[2], **rows[k]} for k in keys], "ranking": ranking}
    fig = go.Figure([go.Bar(x=[f"{k[0]}, {k[1]}" for k in keys if k[2] == n], y=[rows[k]["slope"]["mean"] for k in keys if k[2] == n],
                            name=results.display(n)) for n in (method, CONTROL)])
    fig.update_layout(barmode="group", title="Share of the target's tilt the fine-tuned model learned (slope)", yaxis_title="slope")
    return write_outputs(cfg, "tilt", "\n".join(lines) + "\n", summary, fig, log)


def study_tilt_fit(cfg: Config, log=print) -> dict:
    """Can the GR hold its target's tilt at all, and does what it fits carry to new users? (the capacity probe)

    A copy of the SFT model is fitted to the target's tilt alone (no L_GR) on each of TILT_USERS users'
    newest training context: the VarGrad form of Eq. (6) over the context's whole SFT top-50 (the
    variance over the pool of log P - log P_SFT - t, the user's own items left out, unweighted), Adam at
    FIT_LR, gradients clipped at 1. After the epochs in FIT_REPORT: slope and closed (`realised`) on the
    fitted contexts, on the same users' next context (their validation context) and on as many other
    users' validation contexts. First seed of --seeds only.
    """
    cfg = finalize(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed, device = seeds_of(cfg)[0], resolve_device(cfg.train.device)
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    newest = last_contexts(to_tensors(splits["train"], device), 1)  # one row per user
    valid = to_tensors(splits["valid"], device)
    c = study_config(cfg, gflowgr_method(cfg), seed, {})
    sft_cfg = study_config(cfg, "sft", seed, {})
    run_or_reuse(sft_cfg, log)
    sft = load_model(sft_cfg, device)
    cm, _ = collab.load_or_train(ds, splits, c.cm, Path(c.train.out) / ds.name, device, log)
    cm.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    users = newest["user"].cpu()[torch.randperm(len(newest["user"]), generator=g)]
    n = min(TILT_USERS, len(users) // 2)
    row_of = lambda t: {int(u): i for i, u in enumerate(t["user"].tolist())}
    new_row, valid_row = row_of(newest), row_of(valid)
    sets = {"fitted contexts": (newest, torch.tensor([new_row[int(u)] for u in users[:n]])),
            "same users, next context": (valid, torch.tensor([valid_row[int(u)] for u in users[:n]])),
            "other users": (valid, torch.tensor([valid_row[int(u)] for u in users[n:2 * n]]))}
    pre = {}
    for name, (t, idx) in sets.items():
        items = pools(sft, cm, t, idx, c)["SFT top-50"]  # (n, pool)
        ok = (items >= 0) & ~collab.in_history(items, t["hist"][idx].cpu())
        pre[name] = (items, ok, target_tilt(sft, cm, t, idx, items, c), log_probs(sft, t, idx, items))
    model = copy.deepcopy(sft).train()
    opt = torch.optim.Adam(model.parameters(), lr=FIT_LR)
    t, fit = sets["fitted contexts"]
    items, ok, tilt, base = pre["fitted contexts"]
    rows_out = []
    bar = tqdm(range(1, FIT_EPOCHS + 1), desc="fit the tilt")
    for epoch in bar:
        total = 0.0
        for rows in torch.randperm(n, generator=g).split(FIT_BATCH):
            b = fit[rows]
            hl = t["hist_len"][b]
            log_pf, *_ = model.trajectories(trim(t["hist"][b], hl), hl, items[rows].clamp_min(0).to(hl.device))  # (b, pool, L)
            log_r = (base[rows] + tilt[rows]).to(hl.device)  # (b, pool): the target's log R, log P_SFT + t
            w = ok[rows].float().to(hl.device)  # (b, pool): the user's own items and padding count 0
            log_z = vargrad_log_z(log_pf, log_r, w)  # (b,) closed form: the weighted mean of log R - sum log P_F
            # Eq. (6) with that log Z, over the pool: sum_v (log Z + sum_l log P_F(v) - log R(v))^2
            loss = (w * tb_loss(log_z[:, None], log_pf, log_r)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(rows)
        bar.set_postfix(loss=f"{total / n:.3f}")
        if epoch in FIT_REPORT:
            model.eval()
            for name, (ts, idx) in sets.items():
                it, okk, tl, b0 = pre[name]
                r = realised(log_probs(model, ts, idx, it) - b0, tl, okk)
                rows_out.append({"epoch": epoch, "loss": total / n, "contexts": name, **r})
                log(f"tilt-fit, epoch {epoch}, {name}: slope {r['slope']:.3f}, closed {r['closed']:.3f}")
            model.train()
    lines = [f"# Can the GR hold its target's tilt? {cfg.data.dataset} ({cfg.train.backbone.upper()}), seed {seed}, "
             f"{n:,} fitted contexts, lr {FIT_LR:g}, batches of {FIT_BATCH}", "",
             "| epoch | loss | " + " | ".join(f"{k}: slope / closed" for k in sets) + " |", "|---|---|" + "---|" * len(sets)]
    for epoch in sorted({r["epoch"] for r in rows_out}):
        cells = {r["contexts"]: r for r in rows_out if r["epoch"] == epoch}
        lines.append(f"| {epoch} | {cells['fitted contexts']['loss']:.2f} | "
                     + " | ".join(f"{cells[k]['slope']:.3f} / {cells[k]['closed']:.3f}" for k in sets) + " |")
    fig = go.Figure([go.Scatter(x=[r["epoch"] for r in rows_out if r["contexts"] == k],
                                y=[r["slope"] for r in rows_out if r["contexts"] == k], name=k) for k in sets])
    fig.update_layout(title="Share of the tilt learned (slope) while fitting it on fixed contexts", xaxis_title="epoch", yaxis_title="slope")
    summary = {"study": "tilt-fit", "dataset": cfg.data.dataset, "backbone": cfg.train.backbone, "seed": seed,
               "contexts": n, "lr": FIT_LR, "rows": rows_out}
    return write_outputs(cfg, "tilt-fit", "\n".join(lines) + "\n", summary, fig, log)
