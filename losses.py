"""Training objectives of GFlowGR: L_GR (Eq. 1), reward (Sec. 3.2), L_DB (Eq. 5), L_TB (Eq. 6), Eq. (7)/(8),
and of the Table 1 baselines: DPO, S-DPO (also used by SPRec and IPA), GRPO, PPO.

Every log P_F here is the trie-masked policy of `gflowgr.GRModel.masked_log_pf`: the same
distribution beam search decodes from. Trajectories are paths in the ID prefix tree, so each
state has exactly one parent and log P_B = 0 throughout (Sec. 2, "P_B = 1").

Shapes: B samples, M = 1 + K trajectories per sample (index 0 is the observed item tau,
1..K the augmented items tau'; under --gfn-context next M = K, all augmented), L tokens per ID.

Usage: `loss, parts = gflowgr_loss(log_pf, log_r, log_z=log_z, r_a=r_a, r_c=r_c, objective="tb")`
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

# R can be 0 (e.g. an augmented item under the r_a-only reward); log R is floored at
# log(0.01): such an item should get ~1/500 of the observed item's flow at beta 1 (R = 1 + r_c + 3:
# r_sim counts the 3 semantic levels by default),
# not -infinity, which would make the squared residual infinite.
REWARD_FLOOR = 0.01
# Eq. (8) weight 1 / (r_a - r_c)^2 is unbounded as r_c -> r_a. |r_a - r_c| is floored at
# 0.3, so weights lie in [1, 1/0.09 ~ 11.1] (|r_a - r_c| <= 1 gives the lower bound).
WEIGHT_MIN_GAP = 0.3
REWARD_TERMS = ("ra", "rc", "rsim")


def gr_loss(log_pf: torch.Tensor) -> torch.Tensor:
    """Eq. (1) averaged over the batch. log_pf: (B, L) per-step log P_F of the observed ID -> scalar."""
    # Eq. (1): L_GR = - sum_l log P_GR(t_l | U, t_{<l})
    return -log_pf.sum(1).mean()


def reward(codes: torch.Tensor, r_c: torch.Tensor, terms=REWARD_TERMS, r_a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Comprehensive reward of Sec. 3.2 for M = 1 + K trajectories per sample.

    codes (B, M, L): semantic IDs, column 0 the observed item (r_sim compares with it); r_c (B, M): CM scores in [0, 1].
    r_a (B, M): default 1 for column 0 and 0 elsewhere; the RL baselines pass 1 where a
    sampled item is the observed one. Returns r_a, r_c, r_sim and R, each (B, M).
    """
    B, M, L = codes.shape
    if r_a is None:
        # r_a: 1 for the observed trajectory tau, 0 for every augmented tau'
        r_a = torch.zeros(B, M, device=codes.device)
        r_a[:, 0] = 1.0
    # r_sim = sum_l 1[t_l = t'_l] (= L for tau itself)
    r_sim = (codes == codes[:, :1]).sum(-1).float()
    parts = {"ra": r_a, "rc": r_c, "rsim": r_sim}
    unknown = set(terms) - set(REWARD_TERMS)
    if unknown or not terms:
        raise ValueError(f"reward terms must be a non-empty subset of {REWARD_TERMS}, got {terms}")
    # R(tau) = r_a + r_c + r_sim, over the chosen subset (the ablations of Table 2)
    R = sum(parts[t] for t in terms)
    return {"r_a": r_a, "r_c": r_c, "r_sim": r_sim, "R": R}


def log_reward(R: torch.Tensor, floor: float | torch.Tensor = REWARD_FLOOR, beta: float = 1.0) -> torch.Tensor:
    """log R^beta = beta * log R, with R floored at `floor` (R = 0 is possible; see REWARD_FLOOR).

    floor: one number, or a tensor of R's shape (a floor per trajectory, e.g. --history-floor).

    beta is the reward exponent of GFlowNets (Bengio et al. 2021 train towards R^beta): the
    balanced policy gives P(tau') / P(tau) = (R(tau') / R(tau))^beta. The paper uses beta = 1;
    see README "Choices" for why fine-tuning needs a larger one.
    """
    # log R(s_L) of Eq. (5)/(6), sharpened: beta * log max(R, floor)
    return beta * torch.log(R.clamp_min(floor))


def tb_loss(log_z: torch.Tensor, log_pf: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r"""Trajectory balance, Eq. (6), with P_B = 1.

    \mathcal{L}_{TB}(\tau) = \left(\log Z + \sum_{l=0}^{L-1} \log P_F(s_{l+1}|s_l) - \log R(s_L)\right)^2

    log_z (...,), log_pf (..., L), log_r (...,) -> loss (...,).
    """
    # Eq. (6): (log Z + sum_l log P_GR(t_{l+1} | U, s_l) - log R(s_L))^2
    residual = log_z + log_pf.sum(-1) - log_r
    return residual**2


def vargrad_log_z(log_pf: torch.Tensor, log_r: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    r"""Closed-form log Z of each sample from its own M = 1 + K trajectories (the variance form of TB,
    "VarGrad": Richter et al. 2020; Zhang et al. 2023, "Robust scheduling with GFlowNets").

    \hat{\log Z} = \frac{\sum_m w_m (\log R(\tau_m) - \sum_l \log P_F(\tau_m))}{\sum_m w_m}

    is the log Z that minimises sum_m w_m L_TB(tau_m) for this sample, so Eq. (6) with it is the
    weighted variance of log R - sum log P_F over the sample's trajectories: TB then matches
    log-probability *ratios* to reward ratios, with no learned Z that may lag behind.
    The estimate is detached: the gradient through it is sum_m w_m residual_m = 0 anyway.

    log_pf (B, M, L), log_r (B, M), w (B, M) (default 1) -> log Z (B,).
    """
    x = (log_r - log_pf.sum(-1)).detach()  # (B, M): the log Z each trajectory alone would need
    w = torch.ones_like(x) if w is None else w.detach()
    return (w * x).sum(1) / w.sum(1)


def db_loss(log_flow: torch.Tensor, log_pf: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r"""Detailed balance, Eq. (5), with P_B = 1 and F(s_L) = R(s_L).

    \mathcal{L}_{DB}(\tau) = \sum_{l=0}^{L-1} \left(\log F(s_l) + \log P_F(s_{l+1}|s_l) - \log F(s_{l+1})\right)^2

    log_flow (..., L): log F(s_0..s_{L-1}); log_pf (..., L); log_r (...,) -> loss (...,).
    The per-step residuals telescope: their sum is the TB residual with log Z = log F(s_0).
    """
    preds = log_flow + log_pf  # log F(s_l) + log P_F(s_{l+1} | s_l)
    # terminal state: log F(s_L) = log R(s_L); log P_B = 0 (one parent per prefix)
    targets = torch.cat([log_flow[..., 1:], log_r[..., None]], -1)  # log F(s_{l+1})
    # Eq. (5): sum_l (log F(s_l) P_GR(t_{l+1} | U, s_l) / F(s_{l+1}))^2
    return ((preds - targets) ** 2).sum(-1)


def trajectory_weight(r_a: torch.Tensor, r_c: torch.Tensor, min_gap: float = WEIGHT_MIN_GAP) -> torch.Tensor:
    """Eq. (8) weight 1 / (r_a - r_c)^2, with |r_a - r_c| floored at `min_gap` (see WEIGHT_MIN_GAP)."""
    # Eq. (8): w(kappa) = 1 / (r_a - r_c)^2, clamped
    return 1.0 / (r_a - r_c).abs().clamp_min(min_gap) ** 2


def target_share(log_r: torch.Tensor) -> torch.Tensor:
    r"""--target-weight: each trajectory weighted by the target's probability of it within its sample's set.

    q_m = M \cdot \frac{R(\tau_m)^\beta}{\sum_{m'} R(\tau_{m'})^\beta}    (detached; mean 1 over the M trajectories)

    TB's loss is an expectation over some distribution of training trajectories; its optimum (zero
    residual everywhere) does not depend on which, but where a policy that cannot reach zero puts its
    errors does. Uniform weights over a pool spend the fit on the many trajectories of tiny reward
    (the largest log-ratios, far from any list); q_m makes the pool a draw from the target itself, so
    the fit is best where the target puts its mass: the items that decide the top of the list.

    log_r (B, M) -> (B, M).
    """
    return log_r.shape[1] * torch.softmax(log_r.detach(), dim=1)  # (B, M)


def policy_share(log_pf: torch.Tensor) -> torch.Tensor:
    r"""--policy-mix: each trajectory's share under the policy itself, renormalised within its sample's set.

    p_m = M \cdot \frac{P_F(\tau_m)}{\sum_{m'} P_F(\tau_{m'})}    (detached; mean 1 over the M trajectories)

    A GFlowNet trained on its own samples (on-policy) weighs TB's errors this way. Near balance the
    target's share (`target_share`) weighs the squared log-ratio like a forward KL, q log(q/p): the
    trajectories the policy over-weights (p >> q) get little of the fit; the policy's share adds
    the other side, p log(p/q), so a mix of the two pushes down what the policy wrongly favours as
    hard as it lifts what the target favours, as the distillation control's gradient p - q does.
    On Beauty a half mix was worse than the target alone (BENCHMARKS.md, 2026-12-07, thirteenth): off.

    log_pf (B, M, L) -> (B, M).
    """
    return log_pf.shape[1] * torch.softmax(log_pf.detach().sum(-1), dim=1)  # (B, M)


def pool_kd_loss(log_pf: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r"""A control, not the paper's (--gfn-kd): the GFlowNet's target distilled instead of balanced.

    \mathcal{L}_{KD} = -\sum_m q_m \log \frac{P_F(\tau_m)}{\sum_{m'} P_F(\tau_{m'})},
    \qquad q_m = \frac{R(\tau_m)^\beta}{\sum_{m'} R(\tau_{m'})^\beta}

    over a sample's M trajectories. Its optimum is TB's with the closed-form log Z: the policy's
    ratios within the set equal the target's. It weighs the errors by the target (a KL), where
    TB weighs squared log-ratios, so whatever GFlowGR gains beyond this is the balance's own.
    log_pf (B, M, L), log_r (B, M) (the target, detached) -> (B,).
    """
    q = torch.softmax(log_r.detach(), dim=1)  # (B, M): the target within the set
    log_p = torch.log_softmax(log_pf.sum(-1), dim=1)  # (B, M): the policy within the set
    return -(q * log_p).sum(1)  # (B,)


def gflowgr_loss(log_pf: torch.Tensor, log_r: torch.Tensor, *, objective: str, r_a: torch.Tensor, r_c: torch.Tensor,
                 log_z: torch.Tensor | None = None, log_flow: torch.Tensor | None = None, lam: float = 1.0,
                 weighted: bool = True, w: torch.Tensor | None = None,
                 log_pf_gr: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (7)/(8): L_GR on the observed trajectory + lambda * sum_kappa w(kappa) L_GFN(kappa).

    log_pf (B, M, L) with column 0 the observed item; log_r, r_a, r_c (B, M); log_z (B,) for
    TB (None: the closed-form estimate of `vargrad_log_z`); log_flow (B, M, L) for DB.
    Returns the batch-mean loss and its parts for logging; parts["_l_gr"] and parts["_l_gfn"]
    are the two terms with their graphs (for measuring their gradients), the rest detached.
    w (B, M): the trajectories' weights when the caller has them (finetune.training_weights, e.g.
    times `target_share` under --target-weight); None: Eq. (8)'s, or 1 if not weighted.
    log_pf_gr (B, L): the observed trajectory's log P_F when the GFlowNet's trajectories were drawn
    on another context (--gfn-context next); every column of log_pf is then an augmented one.
    """
    if w is None:
        # Eq. (7) uses w = 1; Eq. (8) the inverse squared disagreement of r_a and r_c
        w = trajectory_weight(r_a, r_c) if weighted else torch.ones_like(log_r)  # (B, M)
    if objective == "tb":
        if log_z is None:  # the closed-form (VarGrad) log Z of each sample, with the same weights
            log_z = vargrad_log_z(log_pf, log_r, w)
        l_gfn = tb_loss(log_z[:, None], log_pf, log_r)  # (B, M)
    elif objective == "db":
        l_gfn = db_loss(log_flow, log_pf, log_r)  # (B, M)
    elif objective == "kd":  # the distillation control (--gfn-kd): one term per sample, w unused
        l_gfn = pool_kd_loss(log_pf, log_r)[:, None]  # (B, 1)
        w = torch.ones_like(l_gfn)
    else:
        raise ValueError(f"objective must be 'tb', 'db' or 'kd', got {objective!r}")
    # Eq. (1): L_GR = -sum_l log P_F along the observed trajectory tau
    l_gr = gr_loss(log_pf[:, 0] if log_pf_gr is None else log_pf_gr)
    # Eq. (8): L = L_GR + lambda * sum_{kappa in {tau, tau'}} w(kappa) L_GFN(kappa)
    l_gfn_total = (w * l_gfn).sum(1).mean()
    loss = l_gr + lam * l_gfn_total
    return loss, {"loss/gr": l_gr.detach(), "loss/gfn": l_gfn_total.detach(), "weight/mean": w.mean().detach(),
                  "_l_gr": l_gr, "_l_gfn": lam * l_gfn_total}


# ----------------------------------------------------------------------------------------
# Table 1 baselines. logp = log pi(v | U) = sum_l log P_F along v's ID (the same trie-masked
# policy); ref = the same under the frozen reference model.
# ----------------------------------------------------------------------------------------


def dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    r"""DPO (Rafailov et al. 2023) for chosen w and rejected l, all (B,) -> (B,).

    \mathcal{L}_{DPO} = -\log\sigma\big(\beta[(\log\pi(w) - \log\pi_{ref}(w)) - (\log\pi(l) - \log\pi_{ref}(l))]\big)
    """
    # DPO: -log sigma(beta [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))])
    return -F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))


def sdpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    r"""S-DPO (Chen et al. 2024, softmax DPO): J rejected items in one softmax. logp_w (B,), logp_l (B, J) -> (B,).

    \mathcal{L}_{S-DPO} = -\log\sigma\Big(-\log\sum_j \exp\big(\beta (r_j - r_w)\big)\Big), \quad r = \log\pi - \log\pi_{ref}
    With J = 1 it is DPO.
    """
    r_w, r_l = logp_w - ref_w, logp_l - ref_l  # (B,), (B, J)
    # S-DPO: -log sigma(-log sum_j exp(beta (r_j - r_w)))
    return -F.logsigmoid(-torch.logsumexp(beta * (r_l - r_w[:, None]), dim=1))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_g R) / (std_g R + eps) within each user's group. (B, G) -> (B, G)."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    # GRPO advantage: A_i = (R_i - mean_g R) / (std_g R + eps)
    return (rewards - mean) / (std + eps)


def kl_to_reference(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of KL(pi || pi_ref) on items drawn from pi (Schulman's k3, as GRPO uses):
    pi_ref/pi - log(pi_ref/pi) - 1 >= 0."""
    d = ref - logp
    # k3 estimator: pi_ref/pi - log(pi_ref/pi) - 1
    return d.exp() - d - 1


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped objective as a loss: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi / pi_old (elementwise)."""
    ratio = (logp - logp_old).exp()
    # PPO clip: -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, clip: float,
              kl_coef: float) -> torch.Tensor:
    """GRPO: clipped surrogate with group advantages plus kl_coef * KL to the frozen reference; (B, G) -> scalar."""
    return (clipped_surrogate(logp, logp_old, adv, clip) + kl_coef * kl_to_reference(logp, ref)).mean()


def ppo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, value: torch.Tensor, ret: torch.Tensor,
             clip: float, vf_coef: float) -> torch.Tensor:
    """PPO (Schulman et al. 2017), one-step episodes: clipped surrogate + vf_coef * (V(U) - return)^2. (B,) -> scalar.

    The KL penalty to the reference sits in the reward (return = R - kl_coef * (log pi_old - log pi_ref)),
    as in RLHF's PPO.
    """
    return clipped_surrogate(logp, logp_old, adv, clip).mean() + vf_coef * ((value - ret) ** 2).mean()
