"""Batches of a split: the tensors a training loop reads, shuffled length-bucketed batches, padding trimmed.

A split (data.Split) holds every sample's history left-aligned and padded to the longest
history of the data set. Most histories are short (median 4 items on Beauty), so batches are
formed from samples of similar length and each is cut to its own longest history.

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
