"""The collaborative model CM: SASRec (Kang & McAuley, ICDM 2018) over item ids.

Paper Sec. 3.1: GFlowGR scores candidate items with a pretrained collaborative model,
    y_hat_CM(v', U) = CM(v', U),
which orders augmented items for the adaptive trajectory sampler (easy = low score first)
and is the collaborative reward r_c of Sec. 3.2, R = r_a + r_c + r_sim. The paper does not
name its CM; SASRec is the standard sequential one and sees the same histories as the GR.

SASRec in brief: item embedding + learned position embedding, causal self-attention
blocks, and the score of item i after position t is the logit s_t(i) = <F_t, M_i>, the dot
product of the block output with the SAME item embedding M (shared in and out). Each
user's training sequence is left-padded to the last `max_len` items; at every position t
the positive is the next item o_t. Three losses (`--cm-loss`):
    ce       full softmax over the catalogue:  - sum_t log softmax_i s_t(i) [o_t]   (default)
    sampled  softmax over o_t and `--cm-negatives` items drawn uniformly per batch
             (accidental hits masked):        - sum_t log softmax_{o_t, j_1..j_n} s_t [o_t]
    bce      the SASRec paper's: one uniform unseen negative j_t per position,
             - sum_t [ log sigma(s_t(o_t)) + log(1 - sigma(s_t(j_t))) ]
Full softmax is the default: on Beauty it more than doubles the BCE model's HR@10
(BENCHMARKS.md, "A strong collaborative model"), as in the literature (Klenitskiy &
Vasilev 2023, "Turning dross into gold loss: is BERT4Rec really better than SASRec?"), and a
12k-20k item catalogue is cheap to normalise over on a CPU.
`--cm-filter-seen` tells the CM that a user never buys an item twice (true of Beauty, where
no valid or test target is in its user's history: BENCHMARKS.md): the items of the history are left out of the
softmax at every training position (- log softmax over the catalogue minus s_1..s_t), and out of
the ranking, so their r_c is 0. The eSASRec benchmark and RecBole rank this way; both rankings
are in the stage's info (`test` follows the flag, `test_filtered` / `test_unfiltered` both).
`--cm-bucket` forms each batch from users of similar length (SFT's batching, batches.py), so
the encoder runs on ~1.1x the real positions instead of ~7.7x (Beauty, 128 random users padded
to their longest); the summed loss over a batch is divided by the mean positions per batch, so
every position keeps the weight a random batch's mean gives it.
Only the training part of each user is used: items[:-2] (the validation target items[-2]
and the test target items[-1] are never seen), as in data.split_leave_one_out.

r_c in [0, 1] (Sec. 3.2) from the logit (`--cm-score`, chosen on validation; it does not
change the trained model, so it is not in the stage's cache key):
    sigmoid  sigma(s(v))                       calibrated for BCE, not for a softmax model
    softmax  exp(s(v) - max_i s(i))            the user's softmax P_CM(v | U) / max_i P_CM(i | U):
                                               log r_c = log P_CM(v|U) + const, so R^beta tilts
                                               a policy by P_CM^beta (a product of experts)
    rank     #{i : s(i) < s(v)} / (n - 1)      the percentile of v in the user's full ranking

`TasteOracle` stands in for the CM on the toy world (`--oracle-reward`): r_c from the truth,
the control that tells a weak reward from a fine-tuning that cannot use a good one.

One concept at ~700 lines: the CM is one stage (model, its three losses, its cached and
resumable training, its r_c mappings); the fine-tuning reads a trained CM through `load_or_train` and `score`.

Usage: `cm, info = load_or_train(ds, splits, CollabConfig(), Path("runs/beauty")); r_c = cm.score(hist, hist_len, items)`
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

import cache
import distributed
from batches import length_bucketed_batches
from data import Dataset, Split
from metrics import ranking_metrics


@dataclass
class CollabConfig:
    d: int = field(default=64, metadata={"help": "CM (SASRec): embedding and hidden width"})
    n_blocks: int = field(default=2, metadata={"help": "CM: self-attention blocks"})
    n_heads: int = field(default=1, metadata={"help": "CM: attention heads"})
    max_len: int = field(default=50, metadata={"help": "CM: the last N items of a sequence are seen"})
    dropout: float = field(default=0.2, metadata={"help": "CM: dropout rate"})
    epochs: int = field(default=30, metadata={"help": "CM: maximum training epochs"})
    batch_size: int = field(default=128, metadata={"help": "CM: users per batch"})
    lr: float = field(default=1e-3, metadata={"help": "CM: Adam learning rate"})
    patience: int = field(default=3, metadata={"help": "CM: early stopping, epochs without a better valid NDCG@10"})
    seed: int = field(default=42, metadata={"help": "CM: seed for initialisation, shuffling and negatives"})
    loss: str = field(default="ce", metadata={"help": "CM training loss: ce (full softmax) | sampled (sampled softmax) | bce (SASRec paper: one negative)"})
    negatives: int = field(default=256, metadata={"help": "CM: uniform negatives per batch for --cm-loss sampled"})
    score: str = field(default="sigmoid", metadata={"help": "CM: how a logit becomes r_c in [0, 1]: sigmoid | softmax (P_CM / max P_CM) | rank (percentile)"})
    filter_seen: bool = field(default=False, metadata={"help": "CM: leave the user's own history items out of the softmax in training and out of the ranking and r_c (Beauty has no repeats)"})
    crossfit: int = field(default=0, metadata={"help": "CM: r_c of GFlowGR's training contexts from F cross-fitted CMs, each trained without one fold of the users (user id mod F): a user's contexts are scored by the CM that never saw them, as a validation user's are (0: the one CM trained on every user, the paper's setting). The CM's own row and every evaluation keep the full CM"})
    bucket: bool = field(default=False, metadata={"help": "CM: batches of users with similar sequence lengths, each cut to its own longest (SFT's batching; the loss keeps every position's weight). ~1.6x faster epochs; off: 0.0009 lower valid NDCG@10 on Beauty, 3 seeds (BENCHMARKS.md)"})


CM_LOSSES = ("ce", "sampled", "bce")
CM_SCORES = ("sigmoid", "softmax", "rank")
NOT_CM_SETTINGS = ("score", "crossfit")  # read when scoring (crossfit: which CMs score), not when training: left out of the stage key
CM_ADDED_LATER = ("filter_seen", "bucket")  # in the stage key only when on (False was the behaviour before them)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data layout


def training_sequences(ds: Dataset, max_len: int, left_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec training arrays from the TRAINING part of each user, items[:-2].

    Returns (seq, pos, user): seq (U', max_len) inputs, pos (U', max_len) next items, both
    left-padded with -1 (newest item in the last column), user (U',) their user ids.
    Users whose training part has fewer than 2 items have no (input, next item) pair and
    are left out. Example, max_len 4: items [5, 6, 7, 8, 9, 10] -> training part [5, 6, 7, 8]
    -> seq [-1, 5, 6, 7], pos [-1, 6, 7, 8] (9 = valid target, 10 = test target, unseen).
    left_out (n_users,) bool: users not trained on (a cross-fitted fold's).
    """
    seqs, poss, users = [], [], []
    for u, items in enumerate(ds.sequences):
        train = items[:-2][-(max_len + 1):]  # the last max_len (input, next) pairs
        if len(train) < 2 or (left_out is not None and left_out[u]):
            continue
        pad = [-1] * (max_len + 1 - len(train))
        seqs.append(pad + train[:-1])
        poss.append(pad + train[1:])
        users.append(u)
    return (np.array(seqs, dtype=np.int64).reshape(-1, max_len), np.array(poss, dtype=np.int64).reshape(-1, max_len),
            np.array(users, dtype=np.int64))


def fold_of(users: np.ndarray | torch.Tensor, folds: int):
    """The cross-fitting fold of each user id: user mod folds (assumes ids carry no order of behaviour)."""
    return users % folds


def user_subset(split: Split, keep: np.ndarray) -> Split:
    """The rows of split whose user is marked in keep (n_users,) bool."""
    rows = keep[split.user]
    return Split(split.hist[rows], split.hist_len[rows], split.target[rows], split.user[rows])


def left_pad(hist: torch.Tensor, hist_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """Split layout (left-aligned, -1 on the right) -> SASRec layout (last max_len items right-aligned, -1 on the left).

    hist [[3, 7, -1]], hist_len [2], max_len 4  ->  [[-1, -1, 3, 7]]
    """
    # Slot j of the output holds history column hist_len - max_len + j (negative = padding).
    cols = hist_len[:, None] - max_len + torch.arange(max_len, device=hist.device)  # (B, max_len)
    out = hist.gather(1, cols.clamp(0, hist.shape[1] - 1))
    return torch.where(cols >= 0, out, torch.full_like(out, -1))


def seen_mask(hist: torch.Tensor, n_items: int) -> torch.Tensor:
    """hist (B, S) item ids, -1 = padding -> (B, n_items) bool, True for the items in the row.

    [[2, 0, -1]], n_items 4 -> [[True, False, True, False]]
    """
    idx = hist.masked_fill(hist < 0, n_items)  # padding points at a spare column, dropped below
    mask = torch.zeros(hist.shape[0], n_items + 1, dtype=torch.bool, device=hist.device)
    return mask.scatter_(1, idx, True)[:, :n_items]


def in_history(items: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """items (B, M), hist (B, S) item ids (-1 = padding in either) -> (B, M) bool: item in its row's history.

    [[5, 3, -1]], [[3, -1]] -> [[False, True, False]]
    """
    return (items[:, :, None] == hist[:, None, :]).any(-1) & (items >= 0)


def prefix_items(seq: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The items seen up to each real position: seq (B, S) SASRec layout -> (P, S), -1 where none.

    Row r = (b, t) holds seq[b, j] for j <= t, -1 for j > t (P = real.sum(), rows in real's order).
    seq [[-1, 4, 5]], real [[False, True, True]] -> [[-1, 4, -1], [-1, 4, 5]]
    """
    S = seq.shape[1]
    upto = torch.ones(S, S, dtype=torch.bool, device=seq.device).tril()  # (t, j): j <= t
    items = seq[:, None, :].expand(-1, S, -1).masked_fill(~upto, -1)  # (B, S, S)
    return items[real]  # (P, S)


# ----------------------------------------------------------------------------- model


class SelfAttentionBlock(nn.Module):
    """One SASRec block, in the order of the reference implementations (TF original, pmixer/SASRec.pytorch):
    x <- LN(x) + Attn(LN(x), x, x);  x <- LN(x) + FFN(LN(x));  padding rows zeroed."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.h, self.dropout = n_heads, dropout
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d, eps=1e-8), nn.LayerNorm(d, eps=1e-8)
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, S, d), mask (B, 1, S, S) True = may attend, keep (B, S, 1) 1 for real items."""
        q_in = self.attn_norm(x)  # SASRec normalises the query only; keys/values are the raw stream
        q = rearrange(self.q(q_in), "b s (h e) -> b h s e", h=self.h)  # (B, H, S, E)
        k, v = rearrange(self.kv(x), "b s (two h e) -> two b h s e", two=2, h=self.h)  # (B, H, S, E) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = q_in + self.o(rearrange(y, "b h s e -> b s (h e)"))  # (B, S, d)
        h = self.ffn_norm(x)
        return (h + self.ffn(h)) * keep


class SASRec(nn.Module):
    """SASRec: y_hat_CM(v', U) = sigma(<F_U, M_{v'}>), F_U the last position's output for history U.

    Items are ids 0..n_items-1; embedding row n_items is padding (-1 outside the model).
    """

    def __init__(self, n_items: int, cfg: CollabConfig):
        super().__init__()
        self.n_items, self.cfg = n_items, cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.d, padding_idx=n_items)  # M, shared by input and output
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)  # position in the left-padded window: newest = max_len - 1
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg.d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_blocks))
        self.final_norm = nn.LayerNorm(cfg.d, eps=1e-8)
        # Xavier-normal for every matrix, as pmixer/SASRec.pytorch does: nn.Embedding's N(0, 1),
        # times the sqrt(d) input scale, starts with huge logits (initial BCE ~6 instead of 2 log 2).
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    # -- checkpoint round trip ------------------------------------------------------------
    def model_args(self) -> dict:
        return {"n_items": self.n_items, "cfg": asdict(self.cfg)}

    @classmethod
    def from_state(cls, model_args: dict, state: dict) -> "SASRec":
        model = cls(model_args["n_items"], CollabConfig(**model_args["cfg"]))
        model.load_state_dict(state)
        return model

    # -- encoder ----------------------------------------------------------------------------
    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, max_len) item ids in SASRec layout (left-padded with -1) -> F (B, max_len, d), one row per position."""
        S = seq.shape[1]
        real = seq >= 0  # (B, S)
        keep = real.unsqueeze(-1).float()  # (B, S, 1)
        x = self.item_emb(seq.masked_fill(~real, self.n_items)) * self.cfg.d**0.5  # (B, S, d), scaled as in SASRec
        # the newest column is always position max_len - 1, also for a batch trimmed to fewer columns
        x = self.drop(x + self.pos_emb.weight[self.cfg.max_len - S:]) * keep
        # Causal, and padding keys masked out so that a representation does not depend on how
        # much padding precedes the history; every position may attend to itself, so padding
        # rows are never fully masked (which would make softmax NaN).
        eye = torch.eye(S, dtype=torch.bool, device=seq.device)
        causal = torch.ones(S, S, dtype=torch.bool, device=seq.device).tril()
        mask = (causal & (real[:, None, :] | eye)).unsqueeze(1)  # (B, 1, S, S)
        for block in self.blocks:
            x = block(x, mask, keep)
        return self.final_norm(x)

    def user_repr(self, hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
        """hist (B, S) in the Split layout (left-aligned, -1 on the right), hist_len (B,) -> F_U (B, d).

        Only as many columns as the batch's longest history (at most max_len) are encoded, as in
        training: padding is masked out, so F_U is the same up to float rounding (~1e-6) as
        with all max_len columns, and a Beauty batch (histories of at most 20 items, 8.9 on
        average) costs a fifth of the encoder's time.
        """
        width = min(self.cfg.max_len, max(1, int(hist_len.max())) if len(hist_len) else 1)
        return self.encode(left_pad(hist, hist_len, width))[:, -1]  # (B, d): the newest position

    def logits(self, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """<F_U, M_i> for items (B, M) -> (B, M)."""
        u = self.user_repr(hist, hist_len)  # (B, d)
        logit = torch.einsum("bd,bmd->bm", u, self.item_emb(items))  # (B, M)
        if self.cfg.filter_seen:
            logit = logit.masked_fill(in_history(items, hist), float("-inf"))
        return logit

    @torch.no_grad()
    def score(self, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor,
              full: torch.Tensor | None = None) -> torch.Tensor:
        """r_c of the paper (Sec. 3.2): y_hat_CM(v', U) in [0, 1] for items (B, M) -> (B, M).

        The mapping from the logit s(v) is `cfg.score` (module docstring): sigma(s(v)), the
        natural link of a BCE-trained model; exp(s(v) - max_i s(i)), the user's softmax
        divided by its largest value; or the percentile of s(v) among all items' logits.
        Call on a model in eval mode (dropout off), as load_or_train returns it. full: these
        users' `full_scores`, if the caller has them already (softmax and rank read them).
        """
        if self.cfg.score == "sigmoid":
            return torch.sigmoid(self.logits(hist, hist_len, items))
        full = self.full_scores(hist, hist_len) if full is None else full  # (B, n_items)
        logit = full.gather(1, items)  # (B, M), the same numbers as in `full`
        if self.cfg.score == "softmax":
            # P_CM(v | U) / max_i P_CM(i | U) = exp(s(v) - max_i s(i))
            return torch.exp(logit - full.max(1, keepdim=True).values)
        if self.cfg.score == "rank":
            # #{i : s(i) < s(v)} / (n - 1): 1 for the CM's top item, 0 for its last
            below = torch.searchsorted(full.sort(1).values, logit.contiguous(), side="left")  # (B, M)
            return below.float() / max(1, self.n_items - 1)
        raise ValueError(f"unknown CM score mapping {self.cfg.score!r}: choose one of {', '.join(CM_SCORES)}")

    @torch.no_grad()
    def full_scores(self, hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
        """Logits over all items, (B, n_items): F_U M^T without the padding row (-inf for history items under filter_seen)."""
        full = self.user_repr(hist, hist_len) @ self.item_emb.weight[: self.n_items].T  # (B, n_items)
        if self.cfg.filter_seen:
            full.masked_fill_(seen_mask(hist, self.n_items), float("-inf"))  # in place: a fresh tensor, no gradient
        return full

    def held_out(self, users: torch.Tensor) -> "SASRec":
        """The CM that scores these users' training contexts: itself (CrossFitCM routes to the fold CMs)."""
        return self


class TasteOracle:
    """A control, not a CM: the toy world's truth as the reward model (`--oracle-reward`, toy only).

    The toy world (data.make_toy) makes each user like the items of one or two taste clusters
    and lets exposure decide which of them get observed. Given a history, the best any model
    can know is which clusters it shows, so here
        r_c(v, U) = 1 if v's cluster is a cluster of U's history and v is not in the history, else 0,
    for the curriculum, the candidates (`--candidates cm`: the clusters' items first) and Sec.
    3.2's reward alike. A learned CM only approximates this; a GFlowGR run with it tells what
    fine-tuning gains when the reward knows the hidden preferences (BENCHMARKS.md, issue 14).
    The interface is the part of SASRec that fine-tuning reads: `cfg`, `score`, `full_scores`.
    """

    def __init__(self, item_cluster: np.ndarray, cfg: CollabConfig):
        self.cluster = torch.as_tensor(item_cluster, dtype=torch.long)  # (n_items,)
        self.n_items, self.cfg = len(self.cluster), cfg

    def to(self, device):
        self.cluster = self.cluster.to(device)
        return self

    def eval(self):
        return self

    @torch.no_grad()
    def held_out(self, users):
        return self

    def full_scores(self, hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
        """r_c of every item, (B, n_items): 1 for the unseen items of the history's clusters, else 0."""
        n_clusters = int(self.cluster.max()) + 1
        shown = torch.zeros(len(hist), n_clusters + 1, dtype=torch.bool, device=hist.device)  # +1: padding's column
        shown.scatter_(1, torch.where(hist >= 0, self.cluster[hist.clamp_min(0)], n_clusters), True)
        liked = shown[:, self.cluster]  # (B, n_items)
        return (liked & ~seen_mask(hist, self.n_items)).float()

    @torch.no_grad()
    def score(self, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor,
              full: torch.Tensor | None = None) -> torch.Tensor:
        """r_c in {0, 1} for items (B, M) -> (B, M) (already in [0, 1]: no --cm-score mapping)."""
        full = self.full_scores(hist, hist_len) if full is None else full
        return full.gather(1, items)


class CrossFitCM:
    """Cross-fitted reward (`--cm-crossfit F`): r_c of a training context from the CM that never saw its user.

    Measured on Beauty (BENCHMARKS.md, session of 2026-12-06): the full CM ranks the observed item of
    a *training* context at median rank 20 (HR@10 0.40), of a validation context at median 934 (HR@10
    0.12): it has learned its training transitions, so the reward GFlowGR trains on says more about
    the training label than about taste, unlike the reward a held-out user would get. F CMs, each
    trained without one fold of the users (user id mod F), score the training contexts of that fold
    (`held_out(users)`); everything else (the CM's row, inspection, the baselines' rewards) reads the
    full CM, which this object stands in for with the same interface (`cfg`, `score`, `full_scores`).
    """

    def __init__(self, full: SASRec, folds: list[SASRec]):
        self.full, self.folds, self.cfg, self.n_items = full, folds, full.cfg, full.n_items

    def to(self, device):
        for m in [self.full, *self.folds]:
            m.to(device)
        return self

    def eval(self):
        for m in [self.full, *self.folds]:
            m.eval()
        return self

    def score(self, hist, hist_len, items, full=None):
        return self.full.score(hist, hist_len, items, full)

    def full_scores(self, hist, hist_len):
        return self.full.full_scores(hist, hist_len)

    def held_out(self, users: torch.Tensor) -> "HeldOutCM":
        """The CM of each user's fold, for a batch of users (B,)."""
        return HeldOutCM(self.folds, fold_of(users, len(self.folds)), self.cfg)


class HeldOutCM:
    """A batch's view of the cross-fitted CMs: row b is scored by folds[fold[b]] (the CM interface)."""

    def __init__(self, folds: list[SASRec], fold: torch.Tensor, cfg: CollabConfig):
        self.folds, self.fold, self.cfg = folds, fold, cfg

    def _by_fold(self, fn, *rows_of):
        """fn(model, *args restricted to its rows) for every fold, reassembled in batch order."""
        out = None
        for f, model in enumerate(self.folds):
            rows = torch.nonzero(self.fold == f).flatten()
            if len(rows) == 0:
                continue
            part = fn(model, *[None if x is None else x[rows] for x in rows_of])
            if out is None:
                out = part.new_empty((len(self.fold), *part.shape[1:]))
            out[rows] = part
        return out

    def score(self, hist, hist_len, items, full=None):
        return self._by_fold(lambda m, h, hl, it, fu: m.score(h, hl, it, fu), hist, hist_len, items, full)

    def full_scores(self, hist, hist_len):
        return self._by_fold(lambda m, h, hl: m.full_scores(h, hl), hist, hist_len)

    def held_out(self, users):
        return self


def cross_fitted(ds: Dataset, splits: dict[str, Split], cfg: CollabConfig, out_root: Path, full: SASRec,
                 device="cpu", log=print) -> CrossFitCM:
    """The full CM together with its cfg.crossfit fold CMs (each a cached stage of its own)."""
    folds = [load_or_train(ds, splits, cfg, out_root, device, log, fold=(f, cfg.crossfit))[0].to(device).eval()
             for f in range(cfg.crossfit)]
    return CrossFitCM(full, folds)


# ----------------------------------------------------------------------------- training


def _sample_negatives(pos: torch.Tensor, seen: torch.Tensor, n_items: int, gen: torch.Generator) -> torch.Tensor:
    """One uniform negative per position, (B, S), not among the user's training items (seen (B, n_items) bool)."""
    neg = torch.randint(0, n_items, pos.shape, generator=gen)
    # Rejection sampling; a user has seen a tiny share of the items, so this ends in a few
    # rounds. The cap only guards a degenerate user who has seen (almost) everything.
    for _ in range(100):
        bad = seen.gather(1, neg) & (pos >= 0)
        if not bad.any():
            break
        neg[bad] = torch.randint(0, n_items, (int(bad.sum()),), generator=gen)
    return neg


def cm_loss(model: SASRec, h: torch.Tensor, p: torch.Tensor, real: torch.Tensor, cfg: CollabConfig,
            neg: torch.Tensor | None = None, gen: torch.Generator | None = None,
            seq: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """The CM's training loss (module docstring) over the real positions of a batch.

    h (B, S, d) block outputs F_t, p (B, S) next items o_t (-1 = padding), real (B, S) p >= 0;
    neg (B, S): the BCE negatives; gen: draws the sampled-softmax negatives; seq (B, S): the
    inputs, needed under cfg.filter_seen (the items s_1..s_t leave position t's softmax);
    reduction: "mean" over the batch's positions, or their "sum".
    """
    M = model.item_emb.weight[: model.n_items]  # (n_items, d) without the padding row
    h_real, o = h[real], p[real]  # (P, d), (P,)
    filter_seen = cfg.filter_seen and cfg.loss != "bce"  # BCE's negatives already avoid the whole training part
    if cfg.loss == "ce":
        logits = h_real @ M.T  # (P, n_items)
        if filter_seen:
            prefix = prefix_items(seq, real)  # (P, S): s_1..s_t of each position, -1 after t
            newest = seq[real][:, None]  # (P, 1): s_t, always an item at a real position
            # o_t is never among s_1..s_t (no repeats): write -inf at s_1..s_t (padding slots
            # repeat s_t). No gradient is needed through this mask: softmax is exactly 0 at -inf,
            # so cross-entropy's gradient is already 0 there; without autograd the mask costs
            # nothing (masked_fill on the (P, n_items) logits made a CM epoch ~50% slower).
            with torch.no_grad():
                logits.scatter_(1, torch.where(prefix >= 0, prefix, newest), float("-inf"))
        # - log softmax_i <F_t, M_i> at i = o_t, over the catalogue (minus the history under filter_seen)
        return F.cross_entropy(logits, o, reduction=reduction)
    if cfg.loss == "sampled":
        negs = torch.randint(0, model.n_items, (cfg.negatives,), generator=gen).to(h.device)  # (n,), shared by the batch
        pos_logit = (h_real * M[o]).sum(-1, keepdim=True)  # (P, 1)
        neg_logit = h_real @ M[negs].T  # (P, n)
        not_neg = negs[None, :] == o[:, None]  # (P, n) an accidental hit is no negative ...
        if filter_seen:
            seen = seen_mask(prefix_items(seq, real), model.n_items)  # (P, n_items): s_1..s_t of each position
            not_neg |= seen[:, negs]  # ... nor, under filter_seen, an item of the history
        neg_logit = neg_logit.masked_fill(not_neg, float("-inf"))
        # - log softmax over {o_t, j_1..j_n} at o_t (uniform proposal: no log Q correction needed)
        return F.cross_entropy(torch.cat([pos_logit, neg_logit], 1), torch.zeros(len(o), dtype=torch.long, device=h.device),
                               reduction=reduction)
    if cfg.loss == "bce":
        pos_logit = (h_real * M[o]).sum(-1)  # (P,)
        neg_logit = (h_real * model.item_emb(neg[real])).sum(-1)  # (P,)
        # SASRec's BCE: -log sigma(<F_t, M_{o_t}>) - log(1 - sigma(<F_t, M_{j_t}>)), real positions only.
        return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit), reduction=reduction)
                + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction=reduction))
    raise ValueError(f"unknown CM loss {cfg.loss!r}: choose one of {', '.join(CM_LOSSES)}")


@torch.no_grad()
def evaluate_full_ranking(model: SASRec, split: Split, k_max: int = 10, batch: int = 1024,
                          filter_seen: bool | None = None) -> dict:
    """HR@5/10, NDCG@5/10 of the top-k_max over ALL items; the history's items are left out of the
    ranking if filter_seen (default: the model's cfg.filter_seen; the GR's beam search does not filter)."""
    model.eval()
    keep = model.cfg
    if filter_seen is not None:
        model.cfg = replace(keep, filter_seen=filter_seen)
    device = next(model.parameters()).device
    tops = []
    for i in range(0, len(split), batch):
        hist = torch.from_numpy(split.hist[i : i + batch]).to(device)
        hist_len = torch.from_numpy(split.hist_len[i : i + batch]).to(device)
        tops.append(model.full_scores(hist, hist_len).topk(k_max, dim=1).indices.cpu())  # (b, k_max)
    model.cfg = keep
    return ranking_metrics(torch.cat(tops).numpy(), split.target)


def train_sasrec(ds: Dataset, splits: dict[str, Split], cfg: CollabConfig, device="cpu", log=print,
                 resume_path: Path | None = None, left_out: np.ndarray | None = None) -> tuple[SASRec, dict]:
    """Train SASRec on items[:-2] of every user, early-stopped on valid NDCG@10 (full ranking).

    After every epoch the training state (model, optimiser, shuffling/negatives generator, the
    global random generators, best epoch) is saved to resume_path (cache.save: atomic); if a
    state is there when training starts, training continues from it, to the same result.

    Returns the model at its best valid epoch (in eval mode) and
    info {epochs_run, best_epoch, train_seconds, n_params, valid: metrics, test: metrics}.
    left_out (n_users,) bool: a cross-fitted fold's CM (cross_fitted): these users are not trained
    on, and validation (early stopping) and the reported metrics are theirs alone.
    """
    _seed_everything(cfg.seed)
    device = torch.device(device)
    seq, pos, users = training_sequences(ds, cfg.max_len, left_out)
    if left_out is not None:  # judged on the users it never saw, as the CM's r_c is used on them
        splits = {name: user_subset(split, left_out) for name, split in splits.items() if name != "train"}
    if len(users) == 0:
        raise ValueError(f"{ds.name}: no user has 2 or more training items; SASRec has nothing to learn from")
    seq, pos = torch.from_numpy(seq), torch.from_numpy(pos)  # (U', max_len) each
    seq_len = (seq >= 0).sum(1)  # (U',) items in each user's window
    positions_per_batch = int((pos >= 0).sum()) / math.ceil(len(users) / cfg.batch_size)
    # Negatives avoid the user's whole training part (also items older than the window),
    # but NOT the valid/test targets: excluding those would leak them into training.
    train_items = [ds.sequences[u][:-2] for u in users]
    seen_len = torch.tensor([len(t) for t in train_items])
    seen_flat = torch.tensor([i for t in train_items for i in t])
    seen_start = seen_len.cumsum(0) - seen_len

    model = SASRec(ds.n_items, cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))  # SASRec's settings
    # shuffling and negatives, drawn for the whole batch: the same on every rank under torchrun
    gen = torch.Generator().manual_seed(cfg.seed)
    log(f"[stage] collaborative model (SASRec): {n_params / 1e6:.2f}M parameters, {len(users):,} training "
        f"sequences, {int((pos >= 0).sum()):,} positions, device {device}")

    best = {"ndcg@10": -1.0, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    bad_epochs, t_train, epoch, start = 0, 0.0, 0, 1
    resume = cache.load_resume(resume_path, None, "the collaborative model", log) if resume_path else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        gen.set_state(resume["gen"])
        cache.set_rng_state(distributed.own(resume, "rng"))
        best, bad_epochs, t_train, epoch = resume["best"], resume["bad_epochs"], resume["t_train"], resume["epoch"]
        start = epoch + 1
        log(f"[resume] collaborative model continues after epoch {epoch} of {cfg.epochs} ({resume_path})")
    else:
        distributed.reseed_rank_streams(cfg.seed)  # torchrun: each rank its own dropout masks (a resumed rank has its own back)
    compute = distributed.ddp([model])  # torchrun: backward all-reduces the gradients
    for epoch in range(start, cfg.epochs + 1):
        model.train()
        t0 = time.time()
        if cfg.bucket:  # users of similar length share a batch: ~1.1x the real positions encoded, not ~7.7x (Beauty)
            batches = length_bucketed_batches(seq_len, cfg.batch_size, gen)
        else:
            batches = torch.randperm(len(users), generator=gen).split(cfg.batch_size)
        bar = tqdm(batches, desc=f"cm epoch {epoch}/{cfg.epochs}", leave=False, disable=not distributed.is_main())
        loss_sum, n_pos = 0.0, 0  # the epoch's mean loss per position (a bucketed batch's own loss swings with its length)
        for b in bar:
            neg = None
            if cfg.loss == "bce":
                # The batch users' training items as a (B, n_items) membership mask, from the ragged lists.
                lens = seen_len[b]
                rows = torch.repeat_interleave(torch.arange(len(b)), lens)
                offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
                seen = torch.zeros(len(b), ds.n_items, dtype=torch.bool)
                seen[rows, seen_flat[torch.repeat_interleave(seen_start[b], lens) + offsets]] = True
                neg = _sample_negatives(pos[b], seen, ds.n_items, gen).to(device)  # (B, S)
            # torchrun: this rank's users of the batch (all of them in one process); the negatives
            # above were drawn for the whole batch, so every rank's generator stays in step
            n_all = int((pos[b] >= 0).sum())
            rows = distributed.shard(torch.arange(len(b)))
            b, neg = b[rows], (neg[rows] if neg is not None else None)
            # trim the padding columns no user of this batch needs (left-padded: the left ones)
            width = int((seq[b] >= 0).sum(1).max().clamp_min(1))
            s, p = seq[b, -width:].to(device), pos[b, -width:].to(device)
            neg = neg[:, -width:] if neg is not None else None
            real = p >= 0  # (B, S) positions that have a next item
            w = distributed.share(int(real.sum()), n_all)  # the mean over this rank's positions -> the batch's
            if cfg.bucket:
                # A bucketed batch of short sequences has few positions: the sum over them divided by the
                # mean positions per batch gives every position the weight a random batch's mean gives it.
                loss = compute(lambda: cm_loss(model, model.encode(s), p, real, cfg, neg, gen, s, reduction="sum")) / positions_per_batch
                w = 1.0 if w == 1.0 else distributed.world()  # a sum: DDP's average of the ranks' sums, times N
            else:
                loss = compute(lambda: cm_loss(model, model.encode(s), p, real, cfg, neg, gen, s))
            opt.zero_grad(set_to_none=True)
            (loss * w).backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite CM loss at epoch {epoch}: {loss.item()}")
            opt.step()
            n_real = int(real.sum())
            loss_sum += loss.item() * (positions_per_batch if cfg.bucket else n_real)
            n_pos += n_real
            run_loss = loss_sum / n_pos
            bar.set_postfix(loss=f"{run_loss:.4f}")
        t_train += time.time() - t0

        val = evaluate_full_ranking(model, splits["valid"])
        improved = val["ndcg@10"] > best["ndcg@10"]
        log(f"cm epoch {epoch:3d}  loss {run_loss:.4f}  valid HR@10 {val['hr@10']:.4f} NDCG@10 {val['ndcg@10']:.4f}"
            f"  ({time.time() - t0:.1f}s){'  *' if improved else ''}")
        if improved:
            best = {"ndcg@10": val["ndcg@10"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                log(f"cm early stop: no better valid NDCG@10 for {cfg.patience} epochs (best epoch {best['epoch']})")
                break
        if resume_path is not None and epoch < cfg.epochs:
            cache.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "rng": cache.rng_state(), "ranks": distributed.gather({"rng": cache.rng_state()}), "best": best, "bad_epochs": bad_epochs, "t_train": t_train,
                        "epoch": epoch, "identity": None}, resume_path)

    model.load_state_dict(best["state"])
    model.eval()
    info = {"epochs_run": epoch, "best_epoch": best["epoch"], "train_seconds": t_train, "n_params": n_params,
            "valid": evaluate_full_ranking(model, splits["valid"]), "test": evaluate_full_ranking(model, splits["test"]),
            "test_filtered": evaluate_full_ranking(model, splits["test"], filter_seen=True),
            "test_unfiltered": evaluate_full_ranking(model, splits["test"], filter_seen=False)}
    log(f"collaborative model: best epoch {info['best_epoch']}, valid HR@10 {info['valid']['hr@10']:.4f} "
        f"NDCG@10 {info['valid']['ndcg@10']:.4f}, test HR@10 {info['test']['hr@10']:.4f} NDCG@10 {info['test']['ndcg@10']:.4f}"
        f" (history filtered: {info['test_filtered']['hr@10']:.4f}, not: {info['test_unfiltered']['hr@10']:.4f})")
    return model, info


# ----------------------------------------------------------------------------- cached stage


def cm_key(ds: Dataset, cfg: CollabConfig, fold: tuple[int, int] | None = None) -> str:
    """Stage key: hash of (data set name, n_items, config) plus a fingerprint of the sequences.

    The fingerprint is there because name and n_items alone do not tell two toy worlds
    (e.g. another --toy-users) apart, and a stale CM would silently score the wrong users.
    fold (f, F): the cross-fitted CM trained without fold f of F (cross_fitted); None: the full CM.
    """
    seqs = hashlib.sha256(json.dumps(ds.sequences).encode()).hexdigest()[:16]
    trained_by = {k: v for k, v in asdict(cfg).items() if k not in NOT_CM_SETTINGS}
    for late in CM_ADDED_LATER:  # added later: at their defaults the key of a CM cached before them is unchanged
        if not getattr(cfg, late):
            del trained_by[late]
    fold_part = [] if fold is None else [{"fold": list(fold)}]  # [] for the full CM: its key is unchanged
    blob = json.dumps([ds.name, ds.n_items, trained_by, seqs, *fold_part, *distributed.key()], sort_keys=True)  # key(): [] for one process
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def load_or_train(ds: Dataset, splits: dict[str, Split], cfg: CollabConfig, out_root: Path, device="cpu",
                  log=print, fold: tuple[int, int] | None = None) -> tuple[SASRec, dict]:
    """The CM from out_root/cm-<key>/checkpoint.pt if it exists, else trained and saved there (atomically).

    Returns (model in eval mode, info as from train_sasrec). fold (f, F): the CM trained without
    the users of fold f (cross_fitted).
    """
    path = Path(out_root) / f"cm-{cm_key(ds, cfg, fold)}" / "checkpoint.pt"
    what = "collaborative model" if fold is None else f"collaborative model without fold {fold[0] + 1} of {fold[1]}"
    ckpt = cache.load(path, what, log, map_location=device)  # None if absent or damaged
    if ckpt is not None:
        log(f"[cache] {what}: {path} (skipping training)")
        model = SASRec.from_state(ckpt["model_args"], ckpt["model"]).to(device).eval()
        model.cfg = replace(model.cfg, score=cfg.score)  # the caller's r_c mapping, not the one it was trained with
        return model, ckpt["info"]
    # the stage folder is keyed by the config, so a resume state in it is this config's
    left_out = None if fold is None else fold_of(np.arange(ds.n_users), fold[1]) == fold[0]
    if left_out is not None:
        log(f"[stage] {what}: {int(left_out.sum()):,} of {ds.n_users:,} users left out (--cm-crossfit)")
    model, info = train_sasrec(ds, splits, cfg, device=device, log=log, resume_path=path.parent / "resume.pt", left_out=left_out)
    # atomic, with its size and checksum recorded (cache.py)
    cache.save({"model": model.state_dict(), "model_args": model.model_args(), "info": info}, path)
    cache.remove(path.parent / "resume.pt")
    distributed.barrier()  # torchrun: no rank goes on before rank 0 has saved it
    return model, info


if __name__ == "__main__":
    from data import DataConfig, load_dataset, split_leave_one_out

    toy = load_dataset(DataConfig(dataset="toy"))
    train_sasrec(toy, split_leave_one_out(toy), CollabConfig(epochs=20, lr=5e-3, patience=5))
