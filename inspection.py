"""Per-user inspection of a fine-tuned policy: what the app (app.py) and a run's inspect.json show.

For a few users: the top-k lists of SFT and of the fine-tuned model (beam search, as
evaluated) with their probabilities, and along the observed trajectory and K augmented ones
(drawn by the adaptive sampler, Sec. 3.1) every quantity of Sec. 3: P_F per step, log F(s_l)
per prefix, log Z(U), r_a, r_c, r_sim, R, log R^beta and the Eq. (8) weight. With these a
reader checks Eq. (6) user by user: log Z + sum_l log P_F = log R when the flow is balanced.

Usage: `users = inspect_users(sft_model, model, heads, cm, sampler, hist, hist_len, target, cfg)`
"""
from __future__ import annotations

import torch

from batches import trim
from finetune import OBJECTIVE, balance_terms, training_weights, trajectory_rewards
from gflowgr import GFlowNetHeads, GRModel


def _round(x, nd=4):
    return [round(float(v), nd) for v in x]


@torch.no_grad()
def inspect_users(sft_model: GRModel, model: GRModel, heads: GFlowNetHeads | None, cm, sampler, hist: torch.Tensor,
                  hist_len: torch.Tensor, target: torch.Tensor, cfg, progress: float = 1.0) -> list[dict]:
    """What a reader needs to look inside the fine-tuned policy for B users (the app and inspect.json).

    hist (B, S), hist_len (B,), target (B,) on the models' device. Per user: the top-k lists of
    SFT and of the fine-tuned model (beam search, as evaluated) with their probabilities, and
    along the observed trajectory and K augmented ones (drawn by the sampler at curriculum
    position `progress`): P_F per step, log F(s_l) per prefix, log Z(U), r_a, r_c, r_sim, R,
    log R^beta and the Eq. (8) weight. heads=None (an SFT run) leaves log F and log Z out;
    cm=None (no CM trained for the run) gives r_c = 0 and no augmented trajectories.
    """
    sft_model.eval(), model.eval()
    hist = trim(hist, hist_len)
    sft_items, sft_scores = sft_model.beam_search(hist, hist_len, cfg.train.beam, cfg.train.topk)
    ft_items, ft_scores = model.beam_search(hist, hist_len, cfg.train.beam, cfg.train.topk)
    if sampler is not None and cm is not None:
        # --candidates prior: the SFT model's own top-N, as the run searched it once per context
        n = cfg.sampler.n_candidates
        proposals = sft_model.beam_search(hist, hist_len, n, n)[0] if cfg.sampler.candidates == "prior" else None  # (B, N)
        aug, r_c_aug = sampler.sample(hist, hist_len, target, progress=progress, model=model, proposals=proposals)  # (B, K)
    else:
        aug, r_c_aug = target.new_empty(len(target), 0), torch.empty(len(target), 0, device=target.device)
    items = torch.cat([target[:, None], aug], 1)  # (B, M): column 0 is the observed item
    r_c = torch.cat([cm.score(hist, hist_len, target[:, None]), r_c_aug], 1) if cm is not None \
        else torch.zeros(items.shape, device=items.device)
    log_pf, h, mem, mask = model.trajectories(hist, hist_len, items)  # (B, M, L)
    # Sec. 3.2: R = r_a + r_c + r_sim and the target the run trained towards (log R^beta, times
    # P_SFT(v | U) for --sft-prior), as in finetune.gflowgr_step
    prior = sft_model if cfg.ft.sft_prior else None
    # --gfn-context next: the run balanced augmented trajectories alone, on a context with no
    # observed item (r_a = 0 on all of them); the observed item is shown as one more trajectory,
    # and the weights and log Z of the augmented ones are those the run computed
    first = int(cfg.ft.gfn_context == "next")  # the first column the GFlowNet term saw
    rew, log_r = trajectory_rewards(model, items, r_c, cfg, prior, hist, hist_len, observed=not first)  # (B, M)
    # Eq. (8): w = 1 / (r_a - r_c)^2, clamped (1 under --no-weight; times the target's share under --target-weight)
    w = training_weights(rew["r_a"], r_c, log_r, cfg.ft, log_pf)
    if first:  # the augmented trajectories' weights among themselves, as the run computed them
        w[:, 1:] = training_weights(rew["r_a"][:, 1:], r_c[:, 1:], log_r[:, 1:], cfg.ft, log_pf[:, 1:])
    if heads is not None:
        heads.eval()
        # log F (B, M, L) and log Z (B,) in the run's forms (--log-flow, --log-z), as in training
        log_flow = balance_terms(heads, "db", cfg.ft, log_pf, h, mem, mask, log_r, w)[1]
        log_z = balance_terms(heads, "tb", cfg.ft, log_pf[:, first:], h[:, first:], mem, mask, log_r[:, first:],
                              w[:, first:])[0]
    users = []
    for j in range(len(target)):
        trajs = [{"item": int(items[j, m]), "codes": model.item_codes[items[j, m]].tolist(), "observed": m == 0,
                  "p_f": _round(log_pf[j, m].exp()), "log_pf_sum": round(float(log_pf[j, m].sum()), 4),
                  "log_flow": _round(log_flow[j, m]) if heads is not None else None,
                  "r_a": float(rew["r_a"][j, m]), "r_c": round(float(r_c[j, m]), 4), "r_sim": float(rew["r_sim"][j, m]),
                  "R": round(float(rew["R"][j, m]), 4), "log_r": round(float(log_r[j, m]), 4), "weight": round(float(w[j, m]), 4)}
                 for m in range(items.shape[1])]
        users.append({"target": int(target[j]), "log_z": round(float(log_z[j]), 4) if heads is not None else None,
                      "sft": {"items": sft_items[j].tolist(), "probs": _round(sft_scores[j].exp(), 6)},
                      "finetuned": {"items": ft_items[j].tolist(), "probs": _round(ft_scores[j].exp(), 6)},
                      "trajectories": trajs})
    return users


def build_inspect(sft_model: GRModel, model: GRModel, heads: GFlowNetHeads, cm, sampler, test_t: dict, cfg,
                  method: str, ds) -> dict:
    """inspect.json: `inspect_users` for a fixed sample of test users, augmented items drawn at the
    end of the curriculum (the app computes the same live for any user)."""
    n = len(test_t["target"])
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed))[: cfg.ft.inspect_users]
    hl = test_t["hist_len"][idx]
    users = inspect_users(sft_model, model, heads, cm, sampler, test_t["hist"][idx], hl, test_t["target"][idx], cfg)
    for j, (u, i) in enumerate(zip(users, idx.tolist())):
        users[j] = {"sample": i, "user": int(test_t["user"][i]),
                    "history": test_t["hist"][i, : int(test_t["hist_len"][i])].tolist(), **u}
    return {"method": method, "objective": OBJECTIVE.get(method), "users": users}
