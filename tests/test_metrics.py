"""HR@K and NDCG@K on a hand-made ranking (values worked by hand in the comments)."""
import math

import numpy as np
import pytest

from metrics import ranking_metrics


def test_hand_made_ranking():
    topk = np.arange(40).reshape(4, 10)  # user u is shown items 10u .. 10u+9, best first
    # target ranks: user 0 -> 0 (top), user 1 -> 2, user 2 -> 6 (only in the top 10), user 3 -> missed
    target = np.array([0, 12, 26, 99])
    m = ranking_metrics(topk, target)
    assert m["hr@5"] == pytest.approx(2 / 4)
    assert m["hr@10"] == pytest.approx(3 / 4)
    # NDCG: 1/log2(rank + 2): rank 0 -> 1, rank 2 -> 1/2, rank 6 -> 1/3
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)


def test_empty_slots_and_all_miss():
    topk = np.full((3, 10), -1)
    topk[0, 9] = 7  # rank 9: hit at 10 only
    m = ranking_metrics(topk, np.array([7, 1, 2]))
    assert m["hr@5"] == 0.0 and m["ndcg@5"] == 0.0
    assert m["hr@10"] == pytest.approx(1 / 3)
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(11) / 3)
