"""Evaluation (paper Sec. 4.1): top-k lists by exact trie-constrained beam search, HR@K and NDCG@K
of them (metrics.ranking_metrics), the MostPop reference, and the results table a run prints.

Every model of a table is scored by this same code: the GR backbone after SFT or any
fine-tuning, MostPop (the k most frequent training items for every user) and, in collab.py,
the CM ranking all items.

Usage: `evaluate(model, to_tensors(splits["test"], device), cfg.train)  # {'hr@5': .., 'ndcg@10': ..}`
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

import data as data_mod
import distributed
from batches import trim
from data import Split
from metrics import ranking_metrics


@torch.no_grad()
def recommend(model, t: dict, cfg, idx: torch.Tensor | None = None, desc: str = "eval", exclude_seen: bool = False):
    """Beam-search top-k lists for the samples `idx` (default all): items (N, k), log-probs (N, k).

    model: a gflowgr.GRModel; t: batches.to_tensors of a split; cfg: anything with beam, topk
    and eval_batch (config.TrainConfig). exclude_seen: leave each user's history items out of
    its list (--filter-seen). Under torchrun every rank searches its share of the chunks and
    every rank gets all lists (a collective: all ranks must call it).
    """
    model.eval()
    n = len(t["target"])
    idx = torch.arange(n) if idx is None else idx
    # sort by length so each beam-search batch is padded only to its own longest history
    order = idx[torch.argsort(t["hist_len"][idx].cpu(), stable=True)]
    items = torch.empty(len(idx), cfg.topk, dtype=torch.long)
    scores = torch.empty(len(idx), cfg.topk)
    pos = torch.empty(n, dtype=torch.long)
    pos[idx] = torch.arange(len(idx))  # where sample idx[j] goes in the output: row j
    rows = {}  # chunk index -> its lists; under torchrun each rank searches its own chunks (distributed.chunks)
    for i, chunk in tqdm(distributed.chunks(order, cfg.eval_batch), desc=desc, leave=False, disable=not distributed.is_main()):
        hl = t["hist_len"][chunk]
        it, sc = model.beam_search(trim(t["hist"][chunk], hl), hl, beam=cfg.beam, topk=cfg.topk, exclude_seen=exclude_seen)
        rows[i] = (it.cpu(), sc.cpu())
    for i, (it, sc) in distributed.gather_rows(rows).items():
        chunk = order[i * cfg.eval_batch : (i + 1) * cfg.eval_batch]
        items[pos[chunk]] = it
        scores[pos[chunk]] = sc
    return items, scores


def evaluate(model, t: dict, cfg, idx=None, desc="eval", exclude_seen: bool = False) -> dict[str, float]:
    """HR@5/10 and NDCG@5/10 of the model's beam-search lists for the samples idx (default all)."""
    items, _ = recommend(model, t, cfg, idx, desc, exclude_seen)
    target = t["target"].cpu() if idx is None else t["target"].cpu()[idx]
    return ranking_metrics(items, target)


def mostpop_metrics(ds, splits: dict[str, Split], k: int, exclude_seen: bool = False) -> dict[str, dict]:
    """MostPop: every user gets the k items most frequent in the training part, scored by the same
    code; exclude_seen (--filter-seen): the k most frequent of those not in the user's history."""
    order = np.argsort(-data_mod.item_popularity(ds), kind="stable")
    out = {}
    for name in ("valid", "test"):
        sp = splits[name]
        if not exclude_seen:
            out[name] = ranking_metrics(np.tile(order[:k], (len(sp), 1)), sp.target)
            continue
        pool = order[: k + sp.hist.shape[1]]  # enough for k unseen items whatever the history
        seen = (pool[None, :, None] == sp.hist[:, None, :]).any(2)  # (N, pool)
        rank = np.argsort(seen, axis=1, kind="stable")[:, :k]  # the unseen first, in popularity order
        out[name] = ranking_metrics(pool[rank], sp.target)
    return out


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """rows (split, model name, metrics) -> the fixed-width table a run prints."""
    cols = ["hr@5", "hr@10", "ndcg@5", "ndcg@10"]
    lines = [f"{'split':<6} {'model':<14} " + " ".join(f"{c.upper():>8}" for c in cols)]
    lines.append("-" * len(lines[0]))
    for split, name, m in rows:
        lines.append(f"{split:<6} {name:<14} " + " ".join(f"{m[c]:>8.4f}" for c in cols))
    return "\n".join(lines)
