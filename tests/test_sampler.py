"""Adaptive trajectory sampler (Sec. 3.1): valid candidates and the easy-to-hard curriculum."""
import pytest
import torch

from sampler import SamplerConfig, TrajectorySampler


class FixedCM:
    """A stand-in CM whose score of item i is i / n_items for every user (known ordering)."""

    def __init__(self, n_items):
        self.n_items = n_items

    def score(self, hist, hist_len, items, full=None):
        return items.float() / self.n_items


def batch(n_items=100, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, n_items, (B, 6), generator=g)
    hist_len = torch.full((B,), 6)
    target = torch.randint(0, n_items, (B,), generator=g)
    return hist, hist_len, target


@pytest.mark.parametrize("mode", ["adaptive", "random"])
def test_never_returns_history_items_or_target(mode):
    n_items = 30  # small catalogue: collisions with the history are frequent and must be redrawn
    hist, hist_len, target = batch(n_items)
    s = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(sampler=mode, K=4, n_candidates=20), seed=1)
    for progress in (0.0, 0.5, 1.0):
        aug, r_c = s.sample(hist, hist_len, target, progress)
        assert aug.shape == (16, 4) and r_c.shape == (16, 4)
        assert not (aug[:, :, None] == hist[:, None, :]).any()
        assert not (aug == target[:, None]).any()
        assert torch.allclose(r_c, aug.float() / n_items)


def test_adaptive_curriculum_moves_from_easy_to_hard():
    n_items = 1000
    hist, hist_len, target = batch(n_items)
    s = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(sampler="adaptive", K=3, n_candidates=50), seed=0)
    means = [s.sample(hist, hist_len, target, p)[1].mean().item() for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    # at the ends: the K lowest / highest of the candidates
    cand_s = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(K=3, n_candidates=50), seed=5)
    cand = cand_s.candidates(hist, target)
    lo = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(K=3, n_candidates=50), seed=5).sample(hist, hist_len, target, 0.0)[0]
    hi = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(K=3, n_candidates=50), seed=5).sample(hist, hist_len, target, 1.0)[0]
    assert torch.equal(lo.sort(1).values, cand.sort(1).values[:, :3])
    assert torch.equal(hi.sort(1).values, cand.sort(1).values[:, -3:])


def test_random_sampler_has_no_curriculum_and_none_samples_nothing():
    n_items = 1000
    hist, hist_len, target = batch(n_items, B=256)
    s = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(sampler="random", K=3, n_candidates=50), seed=0)
    early, late = s.sample(hist, hist_len, target, 0.0)[1].mean(), s.sample(hist, hist_len, target, 1.0)[1].mean()
    assert abs(early - late) < 0.05  # both near the candidate mean, ~0.5
    aug, r_c = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(sampler="none", K=3)).sample(hist, hist_len, target, 0.5)
    assert aug.shape == (256, 0) and r_c.shape == (256, 0)


class TopPolicy:
    """A stand-in generator whose beam search ranks items 0, 1, 2, ... for every user."""

    training = True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def beam_search(self, hist, hist_len, beam, topk):
        assert not self.training  # proposals are made without dropout
        return torch.arange(topk).expand(len(hist), topk).clone(), torch.zeros(len(hist), topk)


def test_policy_candidates_are_the_models_top_items_minus_history_and_target():
    n_items = 1000
    hist = torch.tensor([[0, 5, 7], [100, 101, 102]])
    target = torch.tensor([3, 2])
    cfg = SamplerConfig(K=3, n_candidates=10, candidates="policy")
    top = torch.arange(10).expand(2, 10).clone()  # what TopPolicy proposes
    cand = TrajectorySampler(FixedCM(n_items), n_items, cfg, seed=0).candidates(hist, target, top)
    # the top-10 stay, except 0, 3, 5, 7 in row 0 and 2 in row 1 (history / target): redrawn uniformly
    assert cand[0, [1, 2, 4, 6, 8, 9]].tolist() == [1, 2, 4, 6, 8, 9]
    assert cand[1, [0, 1, 3, 4, 5, 6, 7, 8, 9]].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert not (cand[:, :, None] == hist[:, None, :]).any() and not (cand == target[:, None]).any()
    # sample() proposes with the model in eval mode, restores its mode, and at the end of the
    # curriculum takes the CM's three favourites among these candidates
    policy = TopPolicy()
    aug, r_c = TrajectorySampler(FixedCM(n_items), n_items, cfg, seed=0).sample(hist, torch.tensor([3, 3]), target, 1.0, model=policy)
    assert policy.training
    assert aug.sort(1).values.tolist() == cand.sort(1).values[:, -3:].tolist()


def test_prior_candidates_are_the_proposals_given_and_required():
    """--candidates prior: the pool is the proposals passed in (the frozen SFT model's top-N, searched
    once per context by finetune.GFlowGR), minus history and target as for the policy's; no model is asked."""
    n_items = 1000
    hist, target = torch.tensor([[0, 5, 7], [100, 101, 102]]), torch.tensor([3, 2])
    cfg = SamplerConfig(K=3, n_candidates=10, candidates="prior")
    proposals = torch.arange(500, 510).expand(2, 10).clone()
    s = TrajectorySampler(FixedCM(n_items), n_items, cfg, seed=0)
    aug, r_c = s.sample(hist, torch.tensor([3, 3]), target, 1.0, model=None, proposals=proposals)
    assert aug.tolist() == [[507, 508, 509]] * 2  # the CM's three favourites of the proposals at the curriculum's end
    with pytest.raises(ValueError, match="proposals"):
        s.sample(hist, torch.tensor([3, 3]), target, 1.0)


class TopCM(FixedCM):
    """FixedCM with full_scores: the CM's ranking of every item is its id (highest id first)."""

    def full_scores(self, hist, hist_len):
        return torch.arange(self.n_items, dtype=torch.float).repeat(len(hist), 1)


def test_cm_candidates_are_the_cms_top_items_minus_history_and_target():
    n_items = 20
    hist = torch.tensor([[19, 17, -1], [3, 2, 1]])  # -1: padding, must not mask item 0 or anything else
    hist_len, target = torch.tensor([2, 3]), torch.tensor([18, 19])
    s = TrajectorySampler(TopCM(n_items), n_items, SamplerConfig(K=2, n_candidates=4, candidates="cm"))
    assert s.cm_top(hist, hist_len, target).tolist() == [[16, 15, 14, 13], [18, 17, 16, 15]]
    hard, _ = s.sample(hist, hist_len, target, 1.0)  # end of the curriculum: the CM's favourites
    easy, _ = s.sample(hist, hist_len, target, 0.0)  # start: the lowest-scored of the CM's top-N
    assert sorted(hard[0].tolist()) == [15, 16] and sorted(easy[0].tolist()) == [13, 14]


def test_candidates_history_keeps_the_users_own_items_and_still_drops_the_target():
    """--candidates-history (repeat visits): history items stay in the policy's and the CM's pools."""
    n_items = 20
    hist = torch.tensor([[19, 17, -1], [3, 2, 1]])
    hist_len, target = torch.tensor([2, 3]), torch.tensor([18, 19])
    cfg = SamplerConfig(K=2, n_candidates=4, candidates="cm", candidates_history=True)
    s = TrajectorySampler(TopCM(n_items), n_items, cfg)
    # row 0: 19 and 17 (history) now lead; 18 (the target) is still left out
    assert s.cm_top(hist, hist_len, target).tolist() == [[19, 17, 16, 15], [18, 17, 16, 15]]
    policy_cfg = SamplerConfig(K=3, n_candidates=10, candidates="policy", candidates_history=True)
    top = torch.arange(10).expand(2, 10).clone()
    hist = torch.tensor([[0, 5, 7], [100, 101, 102]])
    cand = TrajectorySampler(FixedCM(1000), 1000, policy_cfg, seed=0).candidates(hist, torch.tensor([3, 2]), top)
    # only the targets (3 in row 0, 2 in row 1) are redrawn; 0, 5, 7 (row 0's history) stay
    assert cand[0, [0, 1, 2, 4, 5, 6, 7, 8, 9]].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert cand[1, [0, 1, 3, 4, 5, 6, 7, 8, 9]].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert cand[0, 3] != 3 and cand[1, 2] != 2


def test_a_context_without_a_label_holds_nothing_out_but_the_history_rule():
    """target -1 (--gfn-context next: the observed item is the context's newest history item, not
    its label): no item is redrawn or masked for being the label; the history rule still applies."""
    n_items = 20
    hist, hist_len, none = torch.tensor([[19, 17, -1], [3, 2, 1]]), torch.tensor([2, 3]), torch.tensor([-1, -1])
    s = TrajectorySampler(TopCM(n_items), n_items, SamplerConfig(K=2, n_candidates=4, candidates="cm"))
    assert s.cm_top(hist, hist_len, none).tolist() == [[18, 16, 15, 14], [19, 18, 17, 16]]
    s.cfg.candidates_history = True  # --candidates-history: row 0's newest item 17 joins the CM's pool
    assert s.cm_top(hist, hist_len, none).tolist() == [[19, 18, 17, 16], [19, 18, 17, 16]]
    policy_cfg = SamplerConfig(K=3, n_candidates=10, candidates="policy", candidates_history=True)
    top = torch.arange(10).expand(2, 10).clone()
    cand = TrajectorySampler(FixedCM(1000), 1000, policy_cfg, seed=0).candidates(torch.tensor([[0, 5, 7], [3, 2, 9]]), none, top)
    assert torch.equal(cand, top)  # nothing redrawn: 7 and 9, each row's newest item, stay


def test_sharing_the_cms_full_scores_changes_nothing_and_leaves_them_intact():
    """gflowgr_step computes full_scores once and hands them to the sampler and to r_c."""
    import collab

    torch.manual_seed(0)
    n_items = 60
    cm = collab.SASRec(n_items, collab.CollabConfig(max_len=8, score="softmax", filter_seen=True)).eval()
    hist, hist_len, target = batch(n_items)
    hist_len = torch.tensor([6, 5, 1, 2] * 4)
    hist = torch.where(torch.arange(6) < hist_len[:, None], hist, -1)
    cfg = SamplerConfig(K=3, n_candidates=10, candidates="cm", aug_history=1)
    full = cm.full_scores(hist, hist_len)
    kept = full.clone()
    own = TrajectorySampler(cm, n_items, cfg, seed=3).sample(hist, hist_len, target, 0.4)
    shared = TrajectorySampler(cm, n_items, cfg, seed=3).sample(hist, hist_len, target, 0.4, full=full)
    assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
    assert torch.equal(full, kept)  # cm_top masks a copy, not the caller's matrix
    assert torch.equal(cm.score(hist, hist_len, target[:, None], full), cm.score(hist, hist_len, target[:, None]))


def test_recent_history_by_hand():
    hist = torch.tensor([[7, 8, 9, -1], [7, -1, -1, -1]])
    got = TrajectorySampler.recent_history(hist, torch.tensor([3, 1]), 2)
    assert got.tolist() == [[9, 8], [7, 7]]  # newest first; a short history repeats its oldest item


def test_aug_history_appends_the_users_own_items_with_their_cm_scores():
    n_items = 100
    hist, hist_len, target = batch(n_items)
    hist_len = torch.tensor([6, 5, 1, 2] * 4)
    cfg = SamplerConfig(sampler="random", K=3, n_candidates=20, aug_history=2)
    s = TrajectorySampler(FixedCM(n_items), n_items, cfg, seed=1)
    aug, r_c = s.sample(hist, hist_len, target, 0.5)
    assert aug.shape == (16, 5) and r_c.shape == (16, 5)
    rows = torch.arange(16)
    assert torch.equal(aug[:, 3], hist[rows, hist_len - 1])  # the newest history item
    assert torch.equal(aug[:, 4], hist[rows, (hist_len - 2).clamp_min(0)])
    assert torch.allclose(r_c, aug.float() / n_items)
    # the first K columns are the sampler's own draw, the same with or without H
    plain = TrajectorySampler(FixedCM(n_items), n_items, SamplerConfig(sampler="random", K=3, n_candidates=20), seed=1)
    assert torch.equal(plain.sample(hist, hist_len, target, 0.5)[0], aug[:, :3])
