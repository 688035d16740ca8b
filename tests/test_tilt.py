"""tilt.py: the realised share of a target's tilt, worked by hand, and the tilt the target asks for."""
import math

import pytest
import torch

import tilt


def test_realised_hand_examples():
    t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 8.0]])  # centred: [-1, 0, 1], [-4, 0, 4]; sum t^2 = 34
    valid = torch.ones_like(t, dtype=torch.bool)
    whole = tilt.realised(t + torch.tensor([[5.0], [-2.0]]), t, valid)  # the tilt up to each user's log Z
    assert whole["slope"] == pytest.approx(1.0) and whole["closed"] == pytest.approx(1.0)
    none = tilt.realised(torch.zeros_like(t), t, valid)
    assert none["slope"] == 0.0 and none["closed"] == 0.0 and none["move"] == 0.0
    half = tilt.realised(0.5 * t, t, valid)
    assert half["slope"] == pytest.approx(0.5) and half["closed"] == pytest.approx(0.75)  # 1 - 0.25
    assert half["tilt"] == pytest.approx((2 + 8) / 6)  # mean |centred t|: (1+0+1 + 4+0+4) / 6
    wrong = tilt.realised(-t, t, valid)
    assert wrong["slope"] == pytest.approx(-1.0) and wrong["closed"] == pytest.approx(-3.0)  # 1 - 4
    # a masked item counts nowhere: user 0 becomes [1, 2] (centred -0.5, 0.5), user 1 as before
    valid[0, 2] = False
    d = t.clone()
    d[0, 2] = 100.0
    m = tilt.realised(d, t, valid)
    assert m["slope"] == pytest.approx(1.0) and m["closed"] == pytest.approx(1.0)
    assert m["tilt"] == pytest.approx((0.5 + 0.5 + 8) / 5)


def test_target_tilt_is_beta_log_r_c_under_the_sft_prior_and_minus_log_p_sft_without():
    """R = r_c: t(v) = beta log max(r_c, floor) under --sft-prior (the prior cancels), beta log R - log P_SFT without."""
    from types import SimpleNamespace

    from config import parse_config

    r_c_of = torch.tensor([0.9, 0.25, 0.0, 0.04])  # the CM's score of items 0..3, the same for every user
    log_p_of = torch.tensor([-1.0, -2.0, -3.0, -4.0])  # log P_SFT of items 0..3, as a sum over the ID's steps
    sft = SimpleNamespace(item_codes=torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]),
                          trajectories=lambda hist, hl, items: (log_p_of[items][..., None] / 4 * torch.ones(4),))
    cm = SimpleNamespace(score=lambda hist, hl, items: r_c_of[items])
    t = {"hist": torch.tensor([[2, -1], [0, 1]]), "hist_len": torch.tensor([1, 2]), "target": torch.tensor([3, 2])}
    items = torch.tensor([[0, 1, 2], [3, 1, 0]])
    flags = ["--dataset", "toy", "--levels", "3", "--reward", "rc", "--reward-beta", "0.5", "--reward-floor", "0.01"]
    got = tilt.target_tilt(sft, cm, t, torch.arange(2), items, parse_config(flags + ["--sft-prior"]))
    b = lambda r: 0.5 * math.log(max(r, 0.01))
    assert got.tolist() == [pytest.approx([b(0.9), b(0.25), b(0.0)]), pytest.approx([b(0.04), b(0.25), b(0.9)])]
    got = tilt.target_tilt(sft, cm, t, torch.arange(2), items, parse_config(flags + ["--no-sft-prior"]))
    assert got.tolist() == [pytest.approx([b(0.9) + 1, b(0.25) + 2, b(0.0) + 3]),
                            pytest.approx([b(0.04) + 4, b(0.25) + 2, b(0.9) + 1])]


def test_ranked_orders_each_pool_by_its_score_with_padding_last():
    items = torch.tensor([[7, 3, 9, -1], [4, 5, 6, 8]])
    score = torch.tensor([[0.1, 2.0, -1.0, 5.0], [1.0, 1.0, 3.0, 0.0]])  # the padding's 5.0 must not count
    assert tilt.ranked(items, score, 3).tolist() == [[3, 7, 9], [6, 4, 5]]  # 4 before 5: the tie keeps pool order
    drop = torch.tensor([[False, True, False, False], [False, False, True, False]])  # e.g. the user's own items
    assert tilt.ranked(items, score, 3, drop).tolist() == [[7, 9, 3], [4, 5, 8]]


def test_share_rankings_rank_by_base_plus_the_share_of_the_tilt():
    items = torch.tensor([[10, 11, 12]])
    base = torch.tensor([[0.0, -1.0, -2.0]])
    t = torch.tensor([[0.0, 0.0, 3.0]])  # the target lifts item 12 by 3 nats
    got = tilt.share_rankings(items, base, t, torch.tensor([12]), k=1, shares=(0.5, 1.0))
    assert set(got) == {"target x0.5", "target"}
    assert got["target x0.5"]["hr@5"] == 0.0  # -2 + 1.5 = -0.5 < 0: item 10 stays first
    assert got["target"]["hr@5"] == 1.0  # -2 + 3 = 1 > 0: item 12 first
