"""Batches of a split (batches.py): every sample once per epoch, similar lengths together, padding trimmed."""
import numpy as np
import torch

from batches import append_item, length_bucketed_batches, to_tensors, trim
from data import Split


def test_every_sample_once_and_reproducible():
    hist_len = torch.randint(1, 21, (1000,), generator=torch.Generator().manual_seed(0))
    a = length_bucketed_batches(hist_len, 32, torch.Generator().manual_seed(1))
    b = length_bucketed_batches(hist_len, 32, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(a).tolist()) == list(range(1000))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(len(x) for x in a) == [8] + [32] * 31  # one chunk of 1,000: 31 full batches and the rest
    c = length_bucketed_batches(hist_len, 32, torch.Generator().manual_seed(2))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # another seed: another order


def test_batches_hold_similar_lengths():
    """Within a batch the lengths come from one sorted chunk of 50 batches: their spread is far
    below that of a random batch."""
    hist_len = torch.randint(1, 21, (32 * 50,), generator=torch.Generator().manual_seed(0))
    batches = length_bucketed_batches(hist_len, 32, torch.Generator().manual_seed(3))
    assert len(batches) == 50
    for b in batches:
        lens = hist_len[b]
        assert int(lens.max() - lens.min()) <= 1  # 1,600 samples over 20 lengths: 80 per length, 2.5 batches each


def test_trim_cuts_only_the_padding_no_row_needs():
    hist = torch.tensor([[5, 6, -1, -1, -1], [7, -1, -1, -1, -1]])
    assert trim(hist, torch.tensor([2, 1])).tolist() == [[5, 6], [7, -1]]


def test_to_tensors_keeps_every_field():
    split = Split(hist=np.array([[1, -1], [1, 2]]), hist_len=np.array([1, 2]), target=np.array([2, 3]), user=np.array([0, 0]))
    t = to_tensors(split, "cpu")
    assert t["hist"].tolist() == [[1, -1], [1, 2]] and t["target"].tolist() == [2, 3] and t["hist_len"].dtype == torch.int64


def test_append_item_gives_the_context_one_item_later():
    """A short history gains the item at its end; a full one (max_len items) drops its oldest first;
    the result is cut to its longest row."""
    hist = torch.tensor([[7, 8, -1, -1], [1, 2, 3, 4], [5, -1, -1, -1]])
    new, n = append_item(hist, torch.tensor([2, 4, 1]), torch.tensor([9, 6, 0]), max_len=4)
    assert new.tolist() == [[7, 8, 9, -1], [2, 3, 4, 6], [5, 0, -1, -1]]
    assert n.tolist() == [3, 4, 2]
    new, n = append_item(torch.tensor([[7, -1], [1, -1]]), torch.tensor([1, 1]), torch.tensor([2, 3]), max_len=4)
    assert new.tolist() == [[7, 2], [1, 3]] and n.tolist() == [2, 2]
