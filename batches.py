"""Batches of a split: the tensors a training loop reads, shuffled length-bucketed batches, padding trimmed.

A split (data.Split) holds every sample's history left-aligned and padded to the longest
history of the data set. Most histories are short (median 4 items on Beauty), so batches are
formed from samples of similar length and each is cut to its own longest history.

`append_item` gives the context one item later (a history with its observed item appended), the
context GFlowGR's `--gfn-context next` trains its GFlowNet term on.

Usage: `t = to_tensors(splits["train"], device); for b in length_bucketed_batches(t["hist_len"], 256, gen): hist = trim(t["hist"][b], t["hist_len"][b])`
"""
from __future__ import annotations

import torch

from data import Split


def to_tensors(split: Split, device) -> dict[str, torch.Tensor]:
    """hist (N, S), hist_len (N,), target (N,), user (N,) of a split, on device."""
    return {k: torch.as_tensor(getattr(split, k), device=device) for k in ("hist", "hist_len", "target", "user")}


def length_bucketed_batches(hist_len: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffle, sort by history length within chunks of 50 batches, shuffle the batches.

    Samples of similar length share a batch, so each batch is padded only to its own
    (short: median 4 items on Beauty) longest history.
    """
    perm = torch.randperm(len(hist_len), generator=gen)
    batches = []
    for chunk in perm.split(batch_size * 50):
        chunk = chunk[torch.argsort(hist_len[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in order]


def trim(hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
    """Cut the padding columns no row in this batch needs."""
    return hist[:, : int(hist_len.max())]


def append_item(hist: torch.Tensor, hist_len: torch.Tensor, item: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context one item later: item (B,) appended to each left-aligned history hist (B, S) of
    hist_len (B,) items, the oldest item dropped where max_len are already there. Returns the new
    (hist, hist_len), hist cut to its longest row.

    >>> append_item(torch.tensor([[7, 8, -1], [1, 2, 3]]), torch.tensor([2, 3]), torch.tensor([9, 4]), 3)
    (tensor([[7, 8, 9],
            [2, 3, 4]]), tensor([3, 3]))
    """
    B = hist.shape[0]
    out = torch.cat([hist, hist.new_full((B, 1), -1)], 1)  # (B, S + 1)
    out[torch.arange(B, device=hist.device), hist_len] = item
    n = hist_len + 1
    over = n > max_len  # the rows that were full: drop their oldest item
    out[over] = torch.cat([out[over, 1:], out.new_full((int(over.sum()), 1), -1)], 1)
    n = n.clamp_max(max_len)
    return out[:, : int(n.max())], n
