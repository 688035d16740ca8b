"""Top-K ranking metrics of the paper's evaluation (Sec. 4.1): HR@K (the paper's R@K) and NDCG@K.

Leave-one-out: each user has exactly one held-out target, so
    HR@K   = 1[rank < K]
    NDCG@K = 1[rank < K] / log2(rank + 2)      (rank 0 = top of the list; IDCG = 1)
An item counts only if the whole semantic ID (dedup token included) matched, i.e. the
generated ID resolved to the same item id.

Usage: `ranking_metrics(topk_items, targets, ks=(5, 10))`
"""
from __future__ import annotations

import numpy as np
import torch

KS = (5, 10)


def ranking_metrics(topk: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, ks=KS) -> dict[str, float]:
    """topk (N, >= max(ks)) item ids best first (-1 = empty slot), target (N,) -> {'hr@5': .., 'ndcg@5': .., ...}."""
    topk, target = np.asarray(topk), np.asarray(target)
    hit = topk == target[:, None]  # (N, K): at most one True per row
    rank = np.where(hit.any(1), hit.argmax(1), np.iinfo(np.int64).max)  # (N,)
    out = {}
    for k in ks:
        in_top = rank < k
        out[f"hr@{k}"] = float(in_top.mean())
        out[f"ndcg@{k}"] = float(np.where(in_top, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0).mean())
    return out
