"""Metrics: top-K ranking (Sec. 4.1), diversity (Sec. 4.5) and recall of hidden preferences.

Ranking, the paper's evaluation: HR@K (the paper's R@K) and NDCG@K.

Leave-one-out: each user has exactly one held-out target, so
    HR@K   = 1[rank < K]
    NDCG@K = 1[rank < K] / log2(rank + 2)      (rank 0 = top of the list; IDCG = 1)
An item counts only if the whole semantic ID (dedup token included) matched, i.e. the
generated ID resolved to the same item id.

Diversity of the top-K lists of all users (Sec. 4.5 and the usual catalogue measures):
    coverage@K = |distinct items in any list| / |items|
    Gini@K     = sum_i (2i - n - 1) c_(i) / (n sum_i c_i), c_(1) <= ... <= c_(n) the number of
                 lists each of the n items appears in (0: every item equally often; -> 1: one item)
    KL to a fitted normal: see `kl_to_fitted_normal`.

Exposure (the toy world, whose true preferences are known):
    recall@K of hidden positives = |top-K  ∩  H_u| / min(K, |H_u|), averaged over users with
    H_u (true preferences never observed) non-empty; min(K, |H_u|) so a perfect list scores 1.

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


def item_counts(topk: torch.Tensor | np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) how many of the top-K lists (N, K) each item appears in; -1 slots are ignored."""
    topk = np.asarray(topk).ravel()
    return np.bincount(topk[topk >= 0], minlength=n_items)


def coverage(counts: np.ndarray) -> float:
    """Share of the catalogue recommended to at least one user."""
    return float((np.asarray(counts) > 0).mean())


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the per-item recommendation counts (the module docstring's formula)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(c), c.sum()
    if total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * c).sum() / (n * total))


def kl_to_fitted_normal(p: np.ndarray, floor: float = 1e-12) -> float:
    """KL(p || q) of a distribution p over items from the normal fitted to it (Sec. 4.5, "Generation
    Distribution"; the paper compares to a normal rather than a uniform because item popularities differ).

    The paper does not say how items are placed on the normal's axis. Here p is indexed by
    item popularity rank x = 0..n-1 (most popular first, as the caller orders it), the normal
    N(mu, sigma^2) has p's own mean and variance of x, and q is that normal discretised onto
    the ranks, q_x = Phi((x + 1/2 - mu) / sigma) - Phi((x - 1/2 - mu) / sigma), renormalised.
    Then KL = sum_x p_x log(p_x / q_x) (terms with p_x = 0 are 0). q is floored at `floor`
    (far tails underflow) so the value stays finite. Lower = closer to a smooth bell over the
    popularity axis; a list piled onto a few head items is far from it.
    """
    from scipy import stats  # imported here: scipy.stats costs ~1.5 s, and only this function needs it

    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    x = np.arange(len(p))
    mu = (x * p).sum()
    sigma = max(np.sqrt(((x - mu) ** 2 * p).sum()), 1e-6)  # a one-item p: a normal of (almost) zero width
    q = stats.norm.cdf((x + 0.5 - mu) / sigma) - stats.norm.cdf((x - 0.5 - mu) / sigma)
    q = np.maximum(q / q.sum(), floor)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def recall_hidden(topk: torch.Tensor | np.ndarray, hidden: list, k: int = 10) -> float:
    """Mean over users with a non-empty hidden set of |top-k ∩ H_u| / min(k, |H_u|).

    topk (N, >= k) item ids, hidden: N collections of item ids (the user's true preferences
    that were never observed). Users with nothing hidden are left out, not counted as 0 or 1.
    """
    topk = np.asarray(topk)[:, :k]
    scores = [len(set(row.tolist()) & set(h)) / min(k, len(h)) for row, h in zip(topk, hidden) if len(h)]
    return float(np.mean(scores)) if scores else float("nan")
