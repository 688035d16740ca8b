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


def copy_world():
    """Four items on a 2-level trie (codes 00, 01, 10, 20), a model with --copy-bonus."""
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 0]])
    trie = Trie.build(codes, 3)
    torch.manual_seed(0)
    model = GRModel(ModelConfig(d_model=16, n_heads=2, d_ff=32, dropout=0.0, max_his_len=3, copy_bonus=True), trie).eval()
    return model, trie


def test_copy_bonus_at_zero_is_tigers_policy_and_old_checkpoints_have_no_bonus():
    model, trie = copy_world()
    plain = GRModel(ModelConfig(d_model=16, n_heads=2, d_ff=32, dropout=0.0, max_his_len=3), trie).eval()
    assert not hasattr(plain, "copy_bias") and "copy_bias" not in plain.state_dict()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "copy_bias"})
    hist, hist_len = torch.tensor([[1, -1, -1]]), torch.tensor([1])
    items = torch.arange(4)[None]
    assert torch.equal(model.trajectories(hist, hist_len, items)[0], plain.trajectories(hist, hist_len, items)[0])


def test_copy_bonus_hand_value():
    """History = item 1 (code 01). With b = (1.5, 2.0): at the root token 0 (prefix of item 1)
    gets +1.5; under prefix 0, token 1 (item 1 itself) gets +2.0; nothing else moves."""
    model, trie = copy_world()
    hist, hist_len = torch.tensor([[1, -1, -1]]), torch.tensor([1])
    items = torch.arange(4)[None]
    mem, mask = model.encode(hist, hist_len)
    h = model.decode(mem, mask, torch.tensor([0, 2]))  # s_0 from either; s_1 = prefix 0 (item 0), prefix 1 (item 2)
    raw = model.logits(h).detach()  # (2, 2, V)
    with torch.no_grad():
        model.copy_bias.copy_(torch.tensor([1.5, 2.0]))
    log_p = model.trajectories(hist, hist_len, items)[0].sum(2)[0]  # (4,): log P(v | U)
    root = raw[0, 0] + torch.tensor([1.5, 0.0, 0.0])  # tokens 0, 1, 2 all valid at the root
    p_root = root.softmax(0)
    under0 = (raw[0, 1] + torch.tensor([0.0, 2.0, float("-inf")])).softmax(0)  # children 0, 1 of prefix 0
    expected = torch.stack([p_root[0] * under0[0], p_root[0] * under0[1], p_root[1], p_root[2]]).log()
    assert torch.allclose(log_p, expected, atol=1e-5)
    assert torch.allclose(log_p.exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_beam_search_with_copy_bonus_is_the_exact_ranking_and_agrees_with_item_log_probs():
    model, trie, hist, hist_len = tiny_world()
    copy = GRModel(ModelConfig(**{**model.cfg.__dict__, "copy_bonus": True}), trie).eval()
    copy.load_state_dict({**model.state_dict(), "copy_bias": torch.tensor([0.7, 2.5, 1.0])})
    brute = all_item_log_probs(copy, hist, hist_len)  # (B, I)
    assert not torch.allclose(brute, all_item_log_probs(model, hist, hist_len))  # the bonus moves the policy
    items, scores = copy.beam_search(hist, hist_len, beam=10_000, topk=10)
    top, top_idx = brute.topk(10, dim=1)
    assert torch.allclose(scores, top, atol=1e-5)
    assert torch.allclose(brute.gather(1, items), scores, atol=1e-5)
    for b in range(2):
        one = copy.item_log_probs(hist[b : b + 1, : int(hist_len[b])], hist_len[b : b + 1]).sum(1)
        assert torch.allclose(one, brute[b], atol=1e-4)


def test_copy_bonus_trajectories_of_many_users_match_one_item_at_a_time():
    """trajectories shares each user's history mask across its M items (no copy): with B = 7
    users of different histories, every (user, item) log P equals the one-item-per-row value."""
    model, trie, hist, hist_len = tiny_world()
    copy = GRModel(ModelConfig(**{**model.cfg.__dict__, "copy_bonus": True}), trie).eval()
    copy.load_state_dict({**model.state_dict(), "copy_bias": torch.tensor([0.7, 2.5, 1.0])})
    n_items = copy.item_codes.shape[0]
    log_pf = copy.trajectories(hist, hist_len, torch.arange(n_items).repeat(len(hist), 1))[0]  # (B, I, L)
    assert torch.allclose(log_pf.sum(2), all_item_log_probs(copy, hist, hist_len), atol=1e-5)


def test_trajectories_project_each_users_memory_once_and_match_one_item_per_row():
    """trajectories decodes a user's M items against that user's keys/values, projected once
    (the M*L prefixes are one query axis): log P_F and its gradient equal the one-item-per-row
    pass over a memory copied M times."""
    model, trie, hist, hist_len = tiny_world()
    B, M = hist.shape[0], 9
    items = torch.randint(0, model.item_codes.shape[0], (B, M), generator=torch.Generator().manual_seed(1))
    log_pf = model.trajectories(hist, hist_len, items)[0]  # (B, M, L)
    grad = torch.autograd.grad(log_pf.sum(), model.dec_layers[0].cross.kv.weight)[0]
    copied, _ = model(hist.repeat_interleave(M, 0), hist_len.repeat_interleave(M), items.flatten())  # (B*M, L)
    grad_copied = torch.autograd.grad(copied.sum(), model.dec_layers[0].cross.kv.weight)[0]
    assert torch.allclose(log_pf.view(B * M, -1), copied, atol=1e-5)
    assert torch.allclose(grad, grad_copied, atol=1e-4)
    assert grad.abs().sum() > 0


def test_prefix_tree_lists_each_users_distinct_prefixes_once():
    """Two users: user 0's items share the root and one first token; user 1 asks for one item twice."""
    model, trie = copy_world()  # codes 00, 01, 10, 20 (+ no dedup level: L = 2)
    items = torch.tensor([[0, 1, 2], [3, 3, 3]])
    blocks = model.prefix_tree(items)
    assert [b["valid"].sum(1).tolist() for b in blocks] == [[1, 1], [2, 1]]  # s_0: the root; s_1: {0, 1} and {2}
    root, level1 = blocks
    assert root["col"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert level1["col"][0, 0] == level1["col"][0, 1] != level1["col"][0, 2]  # items 00 and 01 share prefix 0
    assert (level1["token"][0, level1["col"][0]] == torch.tensor([0, 0, 1])).all()  # the level-0 token into s_1
    assert torch.equal(level1["node"][0, level1["col"][0]], trie.item_nodes[items[0], 1])


@pytest.mark.parametrize("copy_bonus", [False, True])
def test_tree_trajectories_equal_the_flat_pass_and_its_gradient(copy_bonus):
    """Decoding each distinct prefix once (tree=True) gives every item's log P_F, decoder states
    and gradients of the flat pass, also when items repeat and users differ in history length."""
    model, trie, hist, hist_len = tiny_world()
    if copy_bonus:
        copy = GRModel(ModelConfig(**{**model.cfg.__dict__, "copy_bonus": True}), trie).eval()
        copy.load_state_dict({**model.state_dict(), "copy_bias": torch.tensor([0.7, 2.5, 1.0])})
        model = copy
    B, M = hist.shape[0], 12
    items = torch.randint(0, model.item_codes.shape[0], (B, M), generator=torch.Generator().manual_seed(1))
    items[:, -1] = items[:, 0]  # a repeated item
    flat, h_flat, _, _ = model.trajectories(hist, hist_len, items)
    tree, h_tree, _, _ = model.trajectories(hist, hist_len, items, tree=True)
    assert torch.allclose(tree, flat, atol=1e-5) and torch.allclose(h_tree, h_flat, atol=1e-5)
    params = [model.dec_layers[0].self_attn.q.weight, model.head, model.enc_layers[0].ff[0].weight]
    g_flat = torch.autograd.grad(flat.sum() + h_flat.square().mean(), params)
    g_tree = torch.autograd.grad(tree.sum() + h_tree.square().mean(), params)
    for a, b in zip(g_flat, g_tree):
        assert torch.allclose(a, b, atol=1e-4) and a.abs().sum() > 0
