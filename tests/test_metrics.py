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


# ---------------------------------------------------------------- diversity (Sec. 4.5) and hidden recall


def test_coverage_and_counts_by_hand():
    from metrics import coverage, item_counts

    counts = item_counts(np.array([[0, 1, -1], [1, 3, -1]]), n_items=5)  # -1: an empty slot, ignored
    assert counts.tolist() == [1, 2, 0, 1, 0]
    assert coverage(counts) == pytest.approx(3 / 5)


def test_gini_by_hand():
    from metrics import gini

    assert gini([4, 4, 4, 4]) == pytest.approx(0.0)  # every item equally often
    # sorted c = (0, 0, 0, 10), n = 4: sum (2i - 5) c_i = 3 * 10 = 30; / (4 * 10) = 0.75
    assert gini([10, 0, 0, 0]) == pytest.approx(0.75)
    # c = (1, 3): (2*1-3)*1 + (2*2-3)*3 = 2; / (2 * 4) = 0.25
    assert gini([3, 1]) == pytest.approx(0.25)
    assert gini([0, 0]) == 0.0


def test_kl_to_fitted_normal_by_hand():
    from metrics import kl_to_fitted_normal

    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    # p = (1/2, 0, 1/2) on x = 0, 1, 2: mu = 1, sigma^2 = (1 + 1) / 2 = 1
    q0 = phi(-0.5) - phi(-1.5)  # 0.2417, and q2 = q0 by symmetry
    q1 = phi(0.5) - phi(-0.5)  # 0.3829
    q0n = q0 / (2 * q0 + q1)  # renormalised over the 3 ranks: 0.2790
    expected = 2 * 0.5 * math.log(0.5 / q0n)  # = 0.5834
    assert kl_to_fitted_normal(np.array([0.5, 0.0, 0.5])) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.5834, abs=1e-4)
    # unnormalised counts give the same value; a spike far from a smooth bell is worse than a bell
    assert kl_to_fitted_normal(np.array([5, 0, 5])) == pytest.approx(expected, rel=1e-9)
    x = np.arange(41)
    bell = np.exp(-0.5 * ((x - 20) / 5.0) ** 2)
    spiky = np.zeros(41)
    spiky[[0, 40]] = 1
    assert kl_to_fitted_normal(bell) < 0.01 < kl_to_fitted_normal(spiky)
    assert math.isfinite(kl_to_fitted_normal(np.eye(1, 500)[0]))  # one item: finite, not inf or nan


def test_recall_hidden_by_hand():
    from metrics import recall_hidden

    topk = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    hidden = [[3, 10, 11, 12], [5], []]  # user 2 has nothing hidden: left out, not scored
    # user 0: 1 of min(3, 4) = 3 -> 1/3; user 1: 1 of min(3, 1) = 1 -> 1
    assert recall_hidden(topk, hidden, k=3) == pytest.approx((1 / 3 + 1) / 2)
    # k = 2: user 0's top-2 (1, 2) holds none of 4 hidden -> 0; user 1's (4, 5) holds its one -> 1
    assert recall_hidden(topk, hidden, k=2) == pytest.approx((0 + 1) / 2)
