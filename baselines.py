"""The fine-tuning baselines of Table 1 (paper Sec. 4.1): DPO, S-DPO, SPRec, IPA, GRPO, PPO.

Each baseline says what one fine-tuning batch trains on; `train.finetune` runs them with
the same SFT starting point, optimiser, epochs budget and evaluation as GFlowGR. Every
log-probability is log pi(v | U) = sum_l log P_F along v's semantic ID under the same
trie-masked policy that beam search decodes (`GRModel.trajectories`); the losses are in
`losses.py`.

- dpo   (Rafailov et al. 2023): chosen = the observed item v, rejected = one uniformly drawn
        item (not in the history, not v), drawn once per training sample and kept fixed;
        reference = the frozen SFT model.
- sdpo  (Chen et al. 2024): chosen = v, rejected = the K items of GFlowGR's adaptive sampler
        (sampler.py), all in one softmax; reference = the frozen SFT model.
- sprec (Gao et al. 2025, self-play): one round per epoch. At the start of a round every
        training sample gets as rejected item the current model's top-1 prediction (its
        top-2 where top-1 is v); the round trains L_GR + DPO with the round-start model as
        reference. SPRec alternates an SFT and a DPO phase; here the two losses are summed.
- ipa   (OneRec's iterative preference alignment, Deng et al. 2025): one round per epoch. At
        the start of a round beam search gives the current model's top-N items per sample;
        the reward model (the CM) scores them; chosen = the highest-scored, rejected = the
        lowest-scored of those N. The round trains L_GR + DPO(chosen, rejected) with the
        round-start model as reference (OneRec adds the next-token loss to the DPO loss).
- grpo  (Shao et al. 2024): G items per user drawn from the policy, rewarded by GFlowGR's
        reward model R = r_a + r_c + r_sim (r_a = 1 when the draw is v, r_sim against v),
        group-normalised advantages, clipped ratio objective + KL to the frozen SFT model.
- ppo   (Schulman et al. 2017): one item per user drawn from the policy, reward
        R - kl_coef * (log pi_old - log pi_ref), a value head V(U) on the pooled encoder
        output, clipped objective; `ppo_epochs` optimiser steps on each batch.

Usage: `b = Baseline("dpo", model, ref, cm, sampler, BaselineConfig(), ...); loss, parts = b.loss(idx, hist, hist_len, target, progress, inner)`
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from losses import (dpo_loss, gr_loss, group_advantages, grpo_loss, kl_to_reference, ppo_loss,
                    reward, sdpo_loss)

BASELINES = ("dpo", "sdpo", "sprec", "ipa", "grpo", "ppo")


@dataclass
class BaselineConfig:
    pref_beta: float = field(default=1.0, metadata={"help": "beta of DPO / S-DPO / SPRec / IPA (S-DPO's recommendation setting uses 1)"})
    ipa_n: int = field(default=10, metadata={"help": "IPA: beam-search outputs per user ranked by the CM"})
    group: int = field(default=4, metadata={"help": "GRPO: items drawn per user (G)"})
    clip: float = field(default=0.2, metadata={"help": "GRPO / PPO ratio clip epsilon"})
    kl_coef: float = field(default=0.04, metadata={"help": "GRPO KL term / PPO KL penalty to the reference"})
    vf_coef: float = field(default=0.5, metadata={"help": "PPO value-loss weight"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO optimiser steps per batch of draws"})


class Baseline:
    """One Table 1 baseline. `start_epoch` builds what a round needs; `loss` gives one step's loss."""

    def __init__(self, method: str, model, ref_model, cm, sampler, cfg: BaselineConfig, reward_terms: tuple,
                 sem_levels: int | None, n_train: int, propose=None, seed: int = 0):
        if method not in BASELINES:
            raise ValueError(f"unknown baseline {method!r}")
        self.method, self.model, self.ref, self.cm, self.sampler, self.cfg = method, model, ref_model, cm, sampler, cfg
        # sem_levels: ID tokens r_sim compares (train.trajectory_rewards' rule; None = all, --rsim-dedup)
        self.reward_terms, self.sem_levels, self.n_train = reward_terms, sem_levels, n_train
        self.propose = propose  # propose(model, n) -> top-n items (n_train, n) of the model for every training sample
        self.gen = torch.Generator().manual_seed(seed)
        self.inner_steps = cfg.ppo_epochs if method == "ppo" else 1
        # PPO's value head V(U): an MLP on the mean-pooled encoder output
        d = model.cfg.d_model
        self.value_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) if method == "ppo" else None
        self.pairs = None  # (n_train, 2): chosen, rejected per training sample (dpo, sprec, ipa)
        self._cache = None  # PPO: the draws of the current batch, reused by its inner steps

    def parameters(self):
        return [] if self.value_head is None else list(self.value_head.parameters())

    @torch.no_grad()
    def state(self) -> dict:
        """What a resumed run needs back (train.finetune): the value head, the random generator and
        DPO's pairs (drawn once for the whole run). The reference model and the self-play pairs of
        SPRec / IPA are rebuilt by start_epoch from the restored model."""
        return {"gen": self.gen.get_state(), "pairs": self.pairs,
                "value_head": self.value_head.state_dict() if self.value_head is not None else None}

    def load_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.pairs = state["pairs"]
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])

    def start_epoch(self, epoch: int, train_t: dict) -> None:
        """Build this round's (chosen, rejected) pairs; refresh the round-start reference."""
        target = train_t["target"].cpu()
        if self.method == "dpo" and self.pairs is None:
            # one uniformly drawn rejected item per sample, fixed for the whole run
            rejected = torch.empty_like(target)
            for chunk in torch.arange(self.n_train).split(4096):
                rejected[chunk] = self.sampler.candidates(train_t["hist"][chunk], target[chunk])[:, 0]
            self.pairs = torch.stack([target, rejected], 1)
        elif self.method == "sprec":
            top = self.propose(self.model, 2)  # (n, 2): the model's own top-2
            rejected = torch.where(top[:, 0] == target, top[:, 1], top[:, 0])
            self.pairs = torch.stack([target, rejected], 1)
            self.ref = copy.deepcopy(self.model).eval()  # self-play: last round's model is the reference
        elif self.method == "ipa":
            top = self.propose(self.model, self.cfg.ipa_n)  # (n, N)
            score = torch.empty(top.shape)
            for chunk in torch.arange(self.n_train).split(4096):
                hl = train_t["hist_len"][chunk]
                hist = train_t["hist"][chunk][:, : int(hl.max())]
                score[chunk] = self.cm.score(hist, hl, top[chunk].to(hist.device)).cpu()  # (B, N) reward model
            score[top < 0] = float("nan")
            best = torch.where(score.isnan(), -float("inf"), score).argmax(1)
            worst = torch.where(score.isnan(), float("inf"), score).argmin(1)
            self.pairs = torch.stack([top.gather(1, best[:, None])[:, 0], top.gather(1, worst[:, None])[:, 0]], 1)
            self.ref = copy.deepcopy(self.model).eval()

    def _logp(self, model, hist, hist_len, items):
        """log pi(item | U) for items (B, M) -> (B, M), and the per-step log P_F (B, M, L)."""
        log_pf, _, mem, mask = model.trajectories(hist, hist_len, items)
        return log_pf.sum(-1), log_pf, mem, mask

    def _reward(self, items: torch.Tensor, target: torch.Tensor, hist, hist_len) -> dict:
        """GFlowGR's reward model on drawn items (B, G): r_a = 1[item = v], r_c = CM, r_sim against v."""
        r_c = self.cm.score(hist, hist_len, items)  # (B, G)
        codes = self.model.item_codes[torch.cat([target[:, None], items], 1)][..., : self.sem_levels]
        r_a = torch.cat([torch.ones_like(target[:, None], dtype=torch.float), (items == target[:, None]).float()], 1)
        rew = reward(codes, torch.cat([torch.zeros_like(r_c[:, :1]), r_c], 1), self.reward_terms, r_a=r_a)
        return {k: v[:, 1:] for k, v in rew.items()}

    def loss(self, idx, hist, hist_len, target, progress: float, inner: int = 0):
        """One step's loss and the parts to log. idx: the batch's training-sample indices."""
        c, m = self.cfg, self.method
        if m in ("dpo", "sprec", "ipa"):
            pair = self.pairs[idx.cpu()].to(target.device)  # (B, 2): chosen, rejected
            logp, log_pf, _, _ = self._logp(self.model, hist, hist_len, pair)
            with torch.no_grad():
                ref, _, _, _ = self._logp(self.ref, hist, hist_len, pair)
            l_pref = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], c.pref_beta).mean()
            if m == "dpo":
                return l_pref, {"loss/dpo": l_pref.detach()}
            # SPRec / IPA keep the next-token loss on the observed item
            obs_log_pf, _ = self.model(hist, hist_len, target)
            l_gr = gr_loss(obs_log_pf)
            return l_gr + l_pref, {"loss/gr": l_gr.detach(), "loss/dpo": l_pref.detach()}
        if m == "sdpo":
            aug, _ = self.sampler.sample(hist, hist_len, target, progress, self.model)  # (B, K)
            items = torch.cat([target[:, None], aug], 1)
            logp, _, _, _ = self._logp(self.model, hist, hist_len, items)
            with torch.no_grad():
                ref, _, _, _ = self._logp(self.ref, hist, hist_len, items)
            l = sdpo_loss(logp[:, 0], logp[:, 1:], ref[:, 0], ref[:, 1:], c.pref_beta).mean()
            return l, {"loss/sdpo": l.detach()}
        if m == "grpo":
            items, logp_old = self.model.sample(hist, hist_len, c.group, self.gen)  # (B, G) from pi_old = pi
            with torch.no_grad():
                R = self._reward(items, target, hist, hist_len)["R"]  # (B, G)
                adv = group_advantages(R)
                ref, _, _, _ = self._logp(self.ref, hist, hist_len, items)
            logp, _, _, _ = self._logp(self.model, hist, hist_len, items)
            l = grpo_loss(logp, logp.detach(), ref, adv, c.clip, c.kl_coef)
            return l, {"loss/grpo": l.detach(), "rl/reward": R.mean(), "rl/kl": kl_to_reference(logp, ref).mean().detach()}
        # ppo
        if inner == 0:
            with torch.no_grad():
                items, logp_old = self.model.sample(hist, hist_len, 1, self.gen)  # (B, 1)
                ref, _, _, _ = self._logp(self.ref, hist, hist_len, items)
                R = self._reward(items, target, hist, hist_len)["R"][:, 0]
                ret = R - c.kl_coef * (logp_old[:, 0] - ref[:, 0])  # KL-penalised sequence reward
            self._cache = (items, logp_old[:, 0], ret, R)
        items, logp_old, ret, R = self._cache
        logp, _, mem, mask = self._logp(self.model, hist, hist_len, items)
        valid = mask[:, 0, 0, :, None].float()
        value = self.value_head((mem * valid).sum(1) / valid.sum(1).clamp_min(1)).squeeze(-1)  # V(U): (B,)
        adv = ret - value.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        l = ppo_loss(logp[:, 0], logp_old, adv, value, ret, c.clip, c.vf_coef)
        return l, {"loss/ppo": l.detach(), "rl/reward": R.mean(), "rl/value": value.mean().detach()}
