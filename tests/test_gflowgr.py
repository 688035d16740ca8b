"""The GR backbone: masked policy, exact constrained beam search, checkpoint round trip."""
import pytest
import torch

from gflowgr import GRModel, ModelConfig
from losses import gr_loss
from tokenizer import Trie, add_dedup_level


def tiny_world(n_items=60, V=6, levels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = add_dedup_level(torch.randint(0, V, (n_items, levels), generator=g), V)
    trie = Trie.build(codes, V)
    torch.manual_seed(seed)
    model = GRModel(ModelConfig(d_model=32, n_heads=2, d_ff=64, dropout=0.0, max_his_len=5), trie).eval()
    # scale up the output layer so the policy is far from uniform (a sharper test of ranking)
    model.head.data *= 8
    hist = torch.randint(0, n_items, (7, 5), generator=g)
    hist_len = torch.tensor([5, 1, 3, 2, 5, 4, 1])
    hist[torch.arange(5) >= hist_len[:, None]] = -1
    return model, trie, hist, hist_len


def all_item_log_probs(model, hist, hist_len):
    """log P(item | U) = sum_l log P_F for every item, by brute force: (B, n_items)."""
    n_items = model.item_codes.shape[0]
    B = hist.shape[0]
    items = torch.arange(n_items).repeat(B)
    log_pf, _ = model(hist.repeat_interleave(n_items, 0), hist_len.repeat_interleave(n_items), items)
    return log_pf.sum(1).view(B, n_items)


def test_masked_policy_sums_to_one_and_is_zero_off_trie():
    model, trie, hist, hist_len = tiny_world()
    items = torch.arange(7) * 3
    mem, mask = model.encode(hist, hist_len)
    h = model.decode(mem, mask, items)
    nodes = model.trie_item_nodes[items, : model.L]
    p = model.masked_log_pf(model.logits(h), nodes).exp()  # (B, L, V)
    assert torch.allclose(p.sum(-1), torch.ones(7, model.L), atol=1e-5)
    assert (p[trie.next_node[nodes] < 0] == 0).all()  # no mass on tokens leading nowhere


def test_item_distribution_sums_to_one():
    model, _, hist, hist_len = tiny_world()
    total = all_item_log_probs(model, hist, hist_len).exp().sum(1)
    assert torch.allclose(total, torch.ones(7), atol=1e-4)


def test_beam_search_with_full_beam_is_exact_ranking():
    model, trie, hist, hist_len = tiny_world()
    n_items = trie.codes.shape[0]
    items, scores = model.beam_search(hist, hist_len, beam=n_items, topk=n_items)
    exact = all_item_log_probs(model, hist, hist_len)
    ref_scores, ref_items = exact.sort(1, descending=True)
    assert torch.allclose(scores, ref_scores, atol=1e-4)
    # same ranking up to ties: every returned item's exact score equals its beam score
    assert torch.allclose(exact.gather(1, items), scores, atol=1e-4)
    assert all(sorted(row) == list(range(n_items)) for row in items.tolist())


def test_beam_search_returns_only_real_distinct_items():
    model, trie, hist, hist_len = tiny_world(n_items=200, V=8, levels=3)
    items, scores = model.beam_search(hist, hist_len, beam=20, topk=10)
    assert items.shape == (7, 10)
    assert ((items >= 0) & (items < 200)).all()
    assert all(len(set(row)) == 10 for row in items.tolist())
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()  # best first
    exact = all_item_log_probs(model, hist, hist_len)
    assert torch.allclose(exact.gather(1, items), scores, atol=1e-4)


def test_beam_search_excluding_seen_equals_brute_force_without_the_history():
    model, trie, hist, hist_len = tiny_world()
    n_items = trie.codes.shape[0]
    items, scores = model.beam_search(hist, hist_len, beam=n_items, topk=10, exclude_seen=True)
    exact = all_item_log_probs(model, hist, hist_len)
    seen = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, hist.clamp_min(0), hist >= 0)
    ref_scores, _ = exact.masked_fill(seen, float("-inf")).sort(1, descending=True)
    assert torch.allclose(scores, ref_scores[:, :10], atol=1e-4)  # unrenormalised log P(item | U)
    assert not seen.gather(1, items).any()  # no history item in any list
    plain, _ = model.beam_search(hist, hist_len, beam=n_items, topk=10)
    assert seen.gather(1, plain).any()  # the world is one where the filter changes lists


def test_beam_search_with_fewer_items_than_topk_pads_with_minus_one():
    model, trie, hist, hist_len = tiny_world(n_items=6, V=4, levels=1)
    items, scores = model.beam_search(hist, hist_len, beam=20, topk=10)
    assert sorted(items[0, :6].tolist()) == list(range(6))
    assert (items[:, 6:] == -1).all() and torch.isinf(scores[:, 6:]).all()


def test_gr_loss_hand_value_and_gradient_flows():
    log_pf = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.25, 1.0, 1.0]]))
    # Eq. (1): -(log .5 + log .5 + 0) = 2 log 2 ; -(log .25) = 2 log 2 -> mean 2 log 2
    assert gr_loss(log_pf).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    model, _, hist, hist_len = tiny_world()
    log_pf, h = model(hist, hist_len, torch.arange(7))
    assert log_pf.shape == (7, model.L) and h.shape == (7, model.L, 32)
    gr_loss(log_pf).backward()
    assert model.head.grad.abs().sum() > 0 and model.code_emb.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip():
    model, _, hist, hist_len = tiny_world()
    clone = GRModel.from_state(model.model_args(), model.state_dict()).eval()
    a, _ = model(hist, hist_len, torch.arange(7))
    b, _ = clone(hist, hist_len, torch.arange(7))
    assert torch.equal(a, b)
    assert "trie_next_node" not in model.state_dict()  # derived tensors are not saved


def test_policy_sampling_returns_real_items_with_their_exact_log_probability():
    model, trie, hist, hist_len = tiny_world()
    n_items = model.item_codes.shape[0]
    items, logp = model.sample(hist, hist_len, 50, torch.Generator().manual_seed(0))
    assert items.shape == (7, 50) and ((items >= 0) & (items < n_items)).all()
    # the returned log-probability is the teacher-forced one of the drawn item
    log_pf, _, _, _ = model.trajectories(hist, hist_len, items)
    assert torch.allclose(logp, log_pf.sum(-1), atol=1e-4)
    # empirical frequencies follow the model's distribution over all items
    p = all_item_log_probs(model, hist, hist_len).exp()  # (B, I)
    many, _ = model.sample(hist, hist_len, 4000, torch.Generator().manual_seed(1))
    freq = torch.stack([torch.bincount(row, minlength=n_items).float() / 4000 for row in many])
    assert 0.5 * (freq - p).abs().sum(1).max() < 0.05  # total variation
