"""GFlowGR objectives against hand-worked values and the GFlowNet promise on an enumerable world."""
import math

import pytest
import torch

from gflowgr import GFlowNetHeads, GRModel, ModelConfig
from losses import (REWARD_FLOOR, WEIGHT_MIN_GAP, db_loss, gflowgr_loss, gr_loss, log_reward, policy_share, reward, target_share,
                    tb_loss, trajectory_weight, vargrad_log_z)
from tokenizer import Trie, add_dedup_level


def test_tb_zero_at_balance_positive_elsewhere_and_zero_gradient():
    log_pf = torch.log(torch.tensor([0.5, 0.25, 1.0, 0.8]))
    log_r = torch.tensor(math.log(3.0))
    log_z = (log_r - log_pf.sum()).clone().requires_grad_(True)  # balance: log Z + sum log P_F = log R
    loss = tb_loss(log_z, log_pf, log_r)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    loss.backward()
    assert log_z.grad.item() == pytest.approx(0.0, abs=1e-6)
    # off balance by 0.5 nats: (0.5)^2
    assert tb_loss(log_z.detach() + 0.5, log_pf, log_r).item() == pytest.approx(0.25)


def test_db_hand_value_and_telescoping_to_tb():
    g = torch.Generator().manual_seed(0)
    log_flow = torch.randn(6, 3, 4, generator=g)
    log_pf = -torch.rand(6, 3, 4, generator=g)
    log_r = torch.randn(6, 3, generator=g)
    # per-step residuals telescope: sum_l (F_l + pf_l - F_{l+1}) = F_0 + sum pf - log R
    preds = log_flow + log_pf
    targets = torch.cat([log_flow[..., 1:], log_r[..., None]], -1)
    tb_residual = log_flow[..., 0] + log_pf.sum(-1) - log_r
    assert torch.allclose((preds - targets).sum(-1), tb_residual, atol=1e-5)
    assert torch.allclose(tb_loss(log_flow[..., 0], log_pf, log_r), tb_residual**2, atol=1e-5)
    # hand value, L = 2: log F = [0, 1], log P_F = [-1, -0.5], log R = 0.2
    # residuals: 0 - 1 - 1 = -2 ; 1 - 0.5 - 0.2 = 0.3  -> 4 + 0.09
    val = db_loss(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -0.5]), torch.tensor(0.2))
    assert val.item() == pytest.approx(4.09)
    assert (db_loss(log_flow, log_pf, log_r) >= 0).all() and (tb_loss(log_flow[..., 0], log_pf, log_r) >= 0).all()


def test_reward_hand_example_and_subsets():
    # observed ID (1, 2, 3, 0); augmented share: 1 token, 0 tokens, 3 tokens
    codes = torch.tensor([[[1, 2, 3, 0], [1, 5, 5, 1], [4, 4, 4, 4], [1, 2, 3, 1]]])
    r_c = torch.tensor([[0.9, 0.2, 0.0, 0.6]])
    out = reward(codes, r_c)
    assert out["r_a"].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert out["r_sim"].tolist() == [[4.0, 1.0, 0.0, 3.0]]
    assert torch.allclose(out["R"], torch.tensor([[5.9, 1.2, 0.0, 3.6]]))
    assert torch.allclose(reward(codes, r_c, ("ra",))["R"], torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(reward(codes, r_c, ("rc", "rsim"))["R"], torch.tensor([[4.9, 1.2, 0.0, 3.6]]))
    assert torch.allclose(reward(codes, r_c, ("ra", "rc"))["R"], torch.tensor([[1.9, 0.2, 0.0, 0.6]]))
    with pytest.raises(ValueError):
        reward(codes, r_c, ("rx",))


def test_log_reward_floor():
    lr = log_reward(torch.tensor([0.0, 1e-5, 1.0, 5.0]))
    assert lr.tolist() == pytest.approx([math.log(REWARD_FLOOR)] * 2 + [0.0, math.log(5.0)])
    assert torch.isfinite(lr).all()


def test_weight_values_and_clamp():
    r_a = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    r_c = torch.tensor([0.0, 0.5, 1.0, 0.1, 0.8])
    w = trajectory_weight(r_a, r_c)
    # 1/1^2, 1/0.5^2, clamped (gap 0), clamped (gap 0.1 < 0.3), 1/0.8^2
    assert w.tolist() == pytest.approx([1.0, 4.0, 1 / WEIGHT_MIN_GAP**2, 1 / WEIGHT_MIN_GAP**2, 1 / 0.64])
    assert torch.isfinite(w).all() and w.max() <= 1 / WEIGHT_MIN_GAP**2 + 1e-6


def test_total_loss_eq8_hand_value():
    # B = 1, M = 2 (observed + 1 augmented), L = 2
    log_pf = torch.log(torch.tensor([[[0.5, 0.5], [0.1, 1.0]]]))
    log_r = torch.log(torch.tensor([[6.0, 1.0]]))
    log_z = torch.tensor([math.log(10.0)])
    r_a, r_c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    loss, parts = gflowgr_loss(log_pf, log_r, objective="tb", r_a=r_a, r_c=r_c, log_z=log_z, lam=2.0)
    tb_obs = (math.log(10) + 2 * math.log(0.5) - math.log(6)) ** 2
    tb_aug = (math.log(10) + math.log(0.1) - 0.0) ** 2
    expected = 2 * math.log(2) + 2.0 * (4.0 * tb_obs + 4.0 * tb_aug)  # weights 1/0.5^2 = 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss/gr"].item() == pytest.approx(gr_loss(log_pf[:, 0]).item())
    unweighted, _ = gflowgr_loss(log_pf, log_r, objective="tb", r_a=r_a, r_c=r_c, log_z=log_z, lam=2.0, weighted=False)
    assert unweighted.item() == pytest.approx(2 * math.log(2) + 2.0 * (tb_obs + tb_aug), rel=1e-5)


def _enumerable_world(seed=0):
    g = torch.Generator().manual_seed(seed)
    n_items, V = 24, 4
    codes = add_dedup_level(torch.randint(0, V, (n_items, 2), generator=g), V)
    trie = Trie.build(codes, V)
    torch.manual_seed(seed)
    model = GRModel(ModelConfig(d_model=32, n_heads=2, d_ff=64, dropout=0.0, max_his_len=3), trie)
    R = 0.2 + 5 * torch.rand(2, n_items, generator=g)  # two users, fixed rewards
    hist = torch.tensor([[0, 1, 2], [5, 6, -1]])
    hist_len = torch.tensor([3, 2])
    return model, R, hist, hist_len, n_items


@pytest.mark.parametrize("objective", ["tb", "db"])
def test_gflownet_matches_reward_distribution(objective):
    """Training with only L_TB (or only L_DB) on all trajectories makes P(item | U) = R / sum R."""
    model, R, hist, hist_len, n_items = _enumerable_world()
    heads = GFlowNetHeads(32, log_z="user")
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 3e-3}, {"params": heads.parameters(), "lr": 1e-2}])
    items = torch.arange(n_items).repeat(2, 1)  # (2, n_items): every trajectory, every step
    for _ in range(400):
        log_pf, h, mem, mask = model.trajectories(hist, hist_len, items)
        if objective == "tb":
            loss = tb_loss(heads.log_z(mem, mask)[:, None], log_pf, R.log()).mean()
        else:
            loss = db_loss(heads.log_flow(h), log_pf, R.log()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_pf, _, _, _ = model.trajectories(hist, hist_len, items)
        p = log_pf.sum(-1).exp()  # (2, n_items): exact P(item | U)
    target = R / R.sum(1, keepdim=True)
    assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-4)
    tv = 0.5 * (p - target).abs().sum(1)
    assert (tv < 0.05).all(), tv


def test_reward_exponent_scales_log_reward():
    R = torch.tensor([0.0, 2.0, 5.0])
    # beta * log max(R, floor): 2 * log 0.01, 2 * log 2, 2 * log 5
    expected = torch.tensor([2 * math.log(0.01), 2 * math.log(2.0), 2 * math.log(5.0)])
    assert torch.allclose(log_reward(R, beta=2.0), expected)
    assert torch.allclose(log_reward(R), expected / 2)


def test_dpo_two_item_hand_value():
    # r_w = -1 - (-2) = 1, r_l = -3 - (-2.5) = -0.5, beta = 0.5 -> -log sigmoid(0.75)
    from losses import dpo_loss
    got = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-6)


def test_sdpo_two_negatives_hand_value_and_reduces_to_dpo():
    from losses import dpo_loss, sdpo_loss
    # r_w = 0.5, r_l = [0.0, 1.0], beta = 1: -log sigmoid(-log(e^-0.5 + e^0.5))
    got = sdpo_loss(torch.tensor([0.5]), torch.tensor([[0.0, 1.0]]), torch.zeros(1), torch.zeros(1, 2), beta=1.0)
    inner = -math.log(math.exp(-0.5) + math.exp(0.5))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-inner)), rel=1e-6)
    w, l, rw, rl = torch.randn(5), torch.randn(5), torch.randn(5), torch.randn(5)
    assert torch.allclose(sdpo_loss(w, l[:, None], rw, rl[:, None], 0.7), dpo_loss(w, l, rw, rl, 0.7), atol=1e-6)


def test_grpo_advantages_on_a_fixed_group_and_kl_estimate():
    from losses import group_advantages, grpo_loss, kl_to_reference
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), eps=0.0)
    # mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3)
    s = math.sqrt(14 / 3)
    assert adv[0].tolist() == pytest.approx([-2 / s, -1 / s, 0.0, 3 / s], rel=1e-6)
    assert kl_to_reference(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert kl_to_reference(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1) + 1 - 1)
    # on-policy (ratio 1) and no KL: the loss is -mean(A) = 0 for normalised advantages
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    loss = grpo_loss(logp, logp.detach(), logp.detach(), adv, clip=0.2, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # policy gradient: d loss / d logp_i = -A_i / G
    assert logp.grad[0].tolist() == pytest.approx((-adv[0] / 4).tolist(), rel=1e-5)


def test_ppo_clipping_and_value_loss():
    from losses import ppo_loss
    logp_old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.5, 0.5]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    # clip 0.2: min(1.5*1, 1.2*1) = 1.2; min(0.5*-1, 0.8*-1) = -0.8 -> loss -(1.2 - 0.8)/2 = -0.2
    loss = ppo_loss(logp, logp_old, adv, value=torch.tensor([0.0, 1.0]), ret=torch.tensor([1.0, 1.0]), clip=0.2, vf_coef=0.5)
    assert loss.item() == pytest.approx(-0.2 + 0.5 * 0.5, rel=1e-6)


@pytest.mark.parametrize("objective", ["tb", "db"])
def test_extreme_rewards_give_finite_loss_gradients_and_clamped_weights(objective):
    """R = 0 on every trajectory (log R floored) and r_c = r_a exactly (Eq. 8's 1/0): all finite."""
    B, M, L = 2, 3, 4
    raw = torch.randn(B, M, L, requires_grad=True)
    log_pf = -torch.nn.functional.softplus(raw)  # (B, M, L), log-probabilities <= 0
    log_z = torch.zeros(B, requires_grad=True)
    log_flow = torch.zeros(B, M, L, requires_grad=True)
    r_a = torch.tensor([[1.0, 0.0, 0.0]] * B)
    log_r = log_reward(torch.zeros(B, M))  # R = 0 -> the floor, not -inf
    loss, parts = gflowgr_loss(log_pf, log_r, objective=objective, r_a=r_a, r_c=r_a.clone(), log_z=log_z,
                               log_flow=log_flow, lam=1.0, weighted=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in parts.values())
    assert parts["weight/mean"].item() == pytest.approx(1 / WEIGHT_MIN_GAP**2)  # every weight at its clamp
    grads = [raw.grad, log_z.grad if objective == "tb" else log_flow.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vargrad_log_z_is_the_weighted_mean_and_minimises_tb():
    """Hand value: residual needs of 1 and 3 with weights 1 and 3 -> log Z = (1 + 9) / 4 = 2.5,
    and no other log Z gives a smaller weighted TB loss."""
    log_pf = torch.tensor([[[-1.0, -1.0], [-2.0, -1.0]]])  # (1, 2, 2): sum log P_F = -2, -3
    log_r = torch.tensor([[-1.0, 0.0]])  # log R - sum log P_F = 1, 3
    w = torch.tensor([[1.0, 3.0]])
    log_z = vargrad_log_z(log_pf, log_r, w)
    assert log_z.item() == pytest.approx(2.5)
    assert vargrad_log_z(log_pf, log_r).item() == pytest.approx(2.0)  # unweighted: the plain mean
    loss_at = lambda z: (w * tb_loss(torch.tensor([z])[:, None], log_pf, log_r)).sum().item()
    assert all(loss_at(2.5) < loss_at(2.5 + d) for d in (-0.1, 0.1, -1.0, 1.0))
    # in Eq. (8), log_z=None means this estimate: the same loss as passing it explicitly
    r_a, r_c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.2]])
    a, _ = gflowgr_loss(log_pf, log_r, objective="tb", r_a=r_a, r_c=r_c, log_z=None)
    b, _ = gflowgr_loss(log_pf, log_r, objective="tb", r_a=r_a, r_c=r_c,
                        log_z=vargrad_log_z(log_pf, log_r, trajectory_weight(r_a, r_c)))
    assert a.item() == pytest.approx(b.item())


def test_policy_mix_hand_value_and_what_it_pushes_down():
    """--policy-mix: the policy's share within the set, P_F 1/2, 1/4, 1/4 -> M p = 1.5, 0.75, 0.75
    (mean 1, no gradient); mixed half and half with the target's share in the weights. A trajectory
    the policy over-weights (p >> q) gets little of target-weighted TB's gradient and more under the mix."""
    log_pf = torch.log(torch.tensor([[[0.5, 1.0], [0.5, 0.5], [0.25, 1.0]]])).requires_grad_(True)  # sums 1/2, 1/4, 1/4
    p = policy_share(log_pf)
    assert p.tolist()[0] == pytest.approx([1.5, 0.75, 0.75])
    assert not p.requires_grad
    log_r = torch.log(torch.tensor([[0.1, 1.0, 0.9]]))  # target shares 0.05, 0.5, 0.45 -> M q = 0.15, 1.5, 1.35
    from finetune import FinetuneConfig, training_weights
    r_a, r_c = torch.zeros(1, 3), torch.ones(1, 3)  # Eq. (8)'s weight 1 everywhere
    w_t = training_weights(r_a, r_c, log_r, FinetuneConfig(target_weight=True), log_pf)
    w_m = training_weights(r_a, r_c, log_r, FinetuneConfig(target_weight=True, policy_mix=0.5), log_pf)
    assert w_t.tolist()[0] == pytest.approx([0.15, 1.5, 1.35], rel=1e-5)
    assert w_m.tolist()[0] == pytest.approx([0.825, 1.125, 1.05], rel=1e-5)  # (q + p) / 2, times M
    grads = []
    for w in (w_t, w_m):
        loss, _ = gflowgr_loss(log_pf, log_r, objective="tb", r_a=r_a, r_c=r_c, w=w, log_pf_gr=log_pf[:, 0])
        g, = torch.autograd.grad(loss - (-log_pf[:, 0].sum()), log_pf)  # the GFlowNet term's gradient alone
        grads.append(g[0, :, 0])  # (3,): per trajectory, on its sum of log P_F (every step of it alike)
        x = (log_r - log_pf.sum(-1)).detach()[0]  # the log Z each trajectory alone needs
        log_z = (w[0] * x).sum() / w[0].sum()  # the closed-form log Z with these weights
        assert grads[-1].tolist() == pytest.approx((2 * w[0] * (log_z - x)).tolist(), rel=1e-5)  # d/d sum log P_F of w r^2
    # trajectory 0 (p 1/2, q 0.05) is pushed down (positive gradient) 4x harder under the mix
    assert 0 < 4 * grads[0][0] < grads[1][0]


def _vargrad_fit_tv(steps: int, target_weighted: bool, policy_mix: float = 0.0) -> torch.Tensor:
    """Fit the enumerable world with the closed-form log Z from 6 random trajectories per user each
    step (as GFlowGR estimates it from 1 + K), optionally --target-weight's weights; the total
    variation between P(item | U) and R / sum R per user, (2,)."""
    model, R, hist, hist_len, n_items = _enumerable_world()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        items = torch.stack([torch.randperm(n_items, generator=g)[:6] for _ in range(2)])  # (2, 6)
        log_pf, _, _, _ = model.trajectories(hist, hist_len, items)
        log_r = R.gather(1, items).log()
        w = target_share(log_r) if target_weighted else torch.ones_like(log_r)
        if policy_mix:
            w = (1 - policy_mix) * w + policy_mix * policy_share(log_pf)
        loss = (w * tb_loss(vargrad_log_z(log_pf, log_r, w)[:, None], log_pf, log_r)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_pf, _, _, _ = model.trajectories(hist, hist_len, torch.arange(n_items).repeat(2, 1))
        p = log_pf.sum(-1).exp()
    return 0.5 * (p - R / R.sum(1, keepdim=True)).abs().sum(1)


def test_vargrad_on_subsets_of_trajectories_matches_reward_distribution():
    """The closed-form log Z, estimated each step from only 6 random trajectories per user, still
    drives P(item | U) to R / sum R: TB's ratio form."""
    tv = _vargrad_fit_tv(500, target_weighted=False)
    assert (tv < 0.05).all(), tv


def test_target_share_hand_value_and_eq8_with_it():
    """Rewards 1 and 3: target probabilities 1/4 and 3/4, times M = 2 -> 0.5 and 1.5 (mean 1), no
    gradient; in Eq. (8) --target-weight multiplies each trajectory's weight (and the closed-form
    log Z's) by them."""
    log_r = torch.log(torch.tensor([[1.0, 3.0]])).requires_grad_(True)
    q = target_share(log_r)
    assert q.tolist()[0] == pytest.approx([0.5, 1.5])
    assert not q.requires_grad
    log_pf = torch.tensor([[[-1.0, -1.0], [-2.0, -1.0]]])  # sum log P_F = -2, -3
    r_a, r_c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.2]])
    w = trajectory_weight(r_a, r_c) * q  # (1, 2)
    assert w.tolist()[0] == pytest.approx([2.0, 1.5 / max(0.2, WEIGHT_MIN_GAP) ** 2])  # 4 * 0.5; the gap 0.2 floored
    x = log_r.detach() - log_pf.sum(-1)  # the log Z each trajectory needs: 2, 3 + log 3
    log_z = (w * x).sum() / w.sum()
    by_hand = 2.0 + 0.1 * (w[0, 0] * (x[0, 0] - log_z) ** 2 + w[0, 1] * (x[0, 1] - log_z) ** 2)  # L_GR = 2, lambda 0.1
    from finetune import FinetuneConfig, training_weights
    w_run = training_weights(r_a, r_c, log_r, FinetuneConfig(target_weight=True))  # what the fine-tuning step uses
    assert w_run.tolist()[0] == pytest.approx(w.tolist()[0])
    loss, _ = gflowgr_loss(log_pf, log_r.detach(), objective="tb", r_a=r_a, r_c=r_c, lam=0.1, w=w_run)
    assert loss.item() == pytest.approx(by_hand.item())


def test_target_weighted_vargrad_still_matches_reward_distribution():
    """Weighting the trajectories by the target's probability changes where an imperfect fit puts
    its errors, not the optimum: on the enumerable world P(item | U) still reaches R / sum R (more
    slowly than unweighted: the rare items get little weight, so 1,000 steps instead of 500)."""
    tv = _vargrad_fit_tv(1000, target_weighted=True)
    assert (tv < 0.05).all(), tv


def test_policy_mixed_vargrad_still_matches_reward_distribution():
    """--policy-mix 0.5 moves where the errors go, not the optimum: P(item | U) still reaches R / sum R
    (more slowly again: 1,500 steps; at 1,000 the total variation is ~0.05)."""
    tv = _vargrad_fit_tv(1500, target_weighted=True, policy_mix=0.5)
    assert (tv < 0.05).all(), tv


def test_pool_kd_loss_by_hand_and_at_its_optimum():
    """--gfn-kd's control: cross-entropy of the policy renormalised over the set to the target's shares.
    P_F sums 0.2 / 0.3 -> 0.4 / 0.6 within the set; R^beta 1 / 3 -> q = 0.25 / 0.75:
    -(0.25 log 0.4 + 0.75 log 0.6) = 0.61216. At P ∝ R within the set its gradient is 0 (TB-VarGrad's optimum)."""
    from losses import pool_kd_loss

    log_pf = torch.log(torch.tensor([[[0.5, 0.4], [0.5, 0.6]]]))  # (1, 2, 2): sums 0.2 and 0.3
    log_r = torch.log(torch.tensor([[1.0, 3.0]]))
    assert pool_kd_loss(log_pf, log_r).item() == pytest.approx(-(0.25 * math.log(0.4) + 0.75 * math.log(0.6)), abs=1e-6)
    at_opt = torch.log(torch.tensor([[[0.1, 1.0], [0.3, 1.0]]])).requires_grad_()  # within the set: 0.25 / 0.75
    pool_kd_loss(at_opt, log_r).sum().backward()
    assert at_opt.grad.abs().max().item() < 1e-6
    # in Eq. (8)'s place: L_GR on column 0 plus lambda times the per-sample mean, no trajectory weight
    loss, parts = gflowgr_loss(log_pf, log_r, objective="kd", r_a=torch.tensor([[1.0, 0.0]]), r_c=torch.tensor([[0.5, 0.9]]),
                               lam=2.0)
    assert loss.item() == pytest.approx(-math.log(0.2) + 2 * 0.61216, abs=1e-4) and parts["weight/mean"].item() == 1.0
