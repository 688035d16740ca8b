"""Adaptive trajectory sampler: which augmented items v' GFlowGR trains on (paper Sec. 3.1).

Observed data hold one positive per (U, v). GFlowGR adds K augmented trajectories tau'
per sample: N candidate items (not in U's history, not v) are scored by the collaborative
model, y_CM(v', U) = CM(v', U), and K of them are chosen.

Schedule ("adaptive", a curriculum): with training progress p = step / total_steps in
[0, 1], sort the N candidates by CM score, lowest first, and take the K consecutive ones
starting at rank round(p * (N - K)). At p = 0 these are the K lowest-scored (easy: clearly
not the user's taste), at p = 1 the K highest-scored (hard: items the CM thinks the user
would like but never interacted with). `random` picks K candidates uniformly (the paper's
"w/o Ada" ablation); `none` uses no augmented trajectory (K = 0, "w/o Traj").

Where the N candidates come from (the paper does not say): `random` draws them uniformly
from the catalogue; `policy` takes the current model's own top-N items for U (trie beam
search, beam N, no gradient), i.e. the unobserved items the generator already ranks high,
which are the ones the GFlowNet loss can re-rank; `prior` takes the frozen SFT model's top-N
(ours: the same pool at the start, but fixed, so finetune.py searches it once per context
before the first epoch and passes it in as `proposals`, with the prior's log P_SFT of each
item that the --sft-prior target needs); `cm` takes the CM's own top-N items for U
outside the history and v, the "potential positives" of Sec. 3.1. Items in the history or
equal to v are replaced by uniform draws (random, policy, prior) or never proposed (cm);
uniform draws are with replacement, so a row of `random` candidates can hold an item twice
(with N = 50 of Beauty's 12,101 items about one row in ten), and it then counts twice in the loss;
with `--candidates-history` only v is, so on data where users come back (Yelp: 6.5% of the
targets are places already visited) the pool keeps the history items the policy or the CM
rank high, as IPA's pool (the GR's own top-N, baselines.py) does. v is the label of the
context the pool is drawn for; where that context has none (`--gfn-context next`: v is its
newest history item) the caller passes -1 and nothing but the history rule applies.

History trajectories (`--aug-history H`, our addition; the paper does not say whether the
user's own items may be augmented): the H most recent items of U's history join the K
sampled ones as augmented trajectories, scored by the CM like any other (r_c = 0 under
--cm-filter-seen). On Beauty no item recurs, yet 7% of SFT's top-10 are history items
(experiments.py, fusion study); no candidate source above ever proposes them, so without
these trajectories the GFlowNet is never asked to move them down.

Usage: `aug, r_c_aug = TrajectorySampler(cm, n_items, SamplerConfig()).sample(hist, hist_len, target, progress)`
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SAMPLERS = ("adaptive", "random", "none")
CANDIDATES = ("random", "policy", "prior", "cm")


@dataclass
class SamplerConfig:
    sampler: str = field(default="adaptive", metadata={"help": "augmented-item sampler: adaptive | random | none"})
    K: int = field(default=3, metadata={"help": "augmented trajectories per sample (0 with --sampler none)"})
    n_candidates: int = field(default=50, metadata={"help": "N: candidates scored by the CM per sample"})
    candidates: str = field(default="random", metadata={"help": "candidate source: random (uniform) | policy (the model's own top-N, searched every step) | prior (the frozen SFT model's top-N, searched once per context; GFlowGR only) | cm (the CM's top-N)"})
    aug_history: int = field(default=0, metadata={"help": "H: the user's H most recent history items join the K sampled items as augmented trajectories"})
    candidates_history: bool = field(default=False, metadata={"help": "the candidate pool may hold the user's own history items (data with repeat visits, Yelp); off: they are never candidates"})


class TrajectorySampler:
    """Draw K augmented items per (U, v) following the configured schedule."""

    def __init__(self, cm, n_items: int, cfg: SamplerConfig, seed: int = 0):
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {cfg.sampler!r}")
        if cfg.candidates not in CANDIDATES:
            raise ValueError(f"unknown candidate source {cfg.candidates!r}")
        self.cm, self.n_items, self.cfg = cm, n_items, cfg
        self.K = 0 if cfg.sampler == "none" else cfg.K
        self.H = cfg.aug_history
        self.gen = torch.Generator().manual_seed(seed)

    def candidates(self, hist: torch.Tensor, target: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """N items per sample, none equal to the target nor (unless --candidates-history) in the history: (B, N), on the CPU.

        target (B,): the context's label v, never a candidate (-1: the context has none).

        start (B, N): proposed items (the policy's top-N, -1 for none); default all uniform.
        Items that are excluded or -1 are redrawn uniformly until none is left; with tiny
        catalogues a few rounds suffice.
        """
        B, N = target.shape[0], self.cfg.n_candidates
        cand = torch.full((B, N), -1, dtype=torch.long) if start is None else start.cpu().clone()
        cand[cand < 0] = torch.randint(self.n_items, (int((cand < 0).sum()),), generator=self.gen)
        for _ in range(100):
            bad = cand == target.cpu()[:, None]
            if not self.cfg.candidates_history:
                bad |= (cand[:, :, None] == hist.cpu()[:, None, :]).any(-1)
            if not bad.any():
                return cand
            cand[bad] = torch.randint(self.n_items, (int(bad.sum()),), generator=self.gen)
        raise ValueError("could not draw candidates outside the history: the catalogue is too small for --n-candidates")

    @torch.no_grad()
    def cm_top(self, hist: torch.Tensor, hist_len: torch.Tensor, target: torch.Tensor,
               full: torch.Tensor | None = None, cm=None) -> torch.Tensor:
        """The CM's N highest-scored items for U other than the target and (unless --candidates-history) the history: (B, N).

        full: the CM's `full_scores` of these users, if the caller has them (left unchanged);
        cm: the CM that scores this batch (default the sampler's; see `sample`)."""
        cm = self.cm if cm is None else cm
        full = cm.full_scores(hist, hist_len) if full is None else full  # (B, n_items) logits
        full = torch.cat([full, full.new_zeros(len(full), 1)], 1)  # a spare column for the padding (-1) ids
        if not self.cfg.candidates_history:
            full.scatter_(1, torch.where(hist >= 0, hist, self.n_items), float("-inf"))  # history items
        full.scatter_(1, torch.where(target >= 0, target, self.n_items)[:, None], float("-inf"))  # the observed item v (-1: none)
        return full[:, : self.n_items].topk(self.cfg.n_candidates, dim=1).indices

    @staticmethod
    def recent_history(hist: torch.Tensor, hist_len: torch.Tensor, H: int) -> torch.Tensor:
        """The H most recent history items, newest first: (B, H); a history shorter than H repeats its oldest item.

        hist is left-aligned (data.Split): [[7, 8, 9, -1]], hist_len [3], H 2 -> [[9, 8]];
        [[7, -1, -1, -1]], [1], 2 -> [[7, 7]].
        """
        back = torch.arange(H, device=hist.device)  # 0 = newest
        col = (hist_len[:, None] - 1 - back).clamp_min(0)  # (B, H)
        return hist.gather(1, col)

    @torch.no_grad()
    def sample(self, hist: torch.Tensor, hist_len: torch.Tensor, target: torch.Tensor, progress: float, model=None,
               full: torch.Tensor | None = None, cm=None, proposals: torch.Tensor | None = None):
        """Returns augmented items (B, K + H) and their CM scores r_c (B, K + H), on the device of hist.

        Columns 0..K-1 are the sampled items, K..K+H-1 the history items (--aug-history).
        target (B,): the context's label v, kept out of the pool; -1 where the context has none.
        model: the generator being fine-tuned; needed for candidates = "policy".
        full: the CM's `full_scores` of these users, if the caller has them: computed once
        per batch, they serve the CM's top-N and every r_c the mapping reads from them.
        cm: the CM that scores this batch, if not the sampler's own (--cm-crossfit: the CMs
        that never saw these users, collab.CrossFitCM.held_out).
        proposals (B, N): candidates = "prior": the frozen SFT model's top-N of these contexts.
        """
        cm = self.cm if cm is None else cm
        aug, r_c = self._sample(hist, hist_len, target, progress, model, full, cm, proposals)  # (B, K), (B, K)
        if self.H == 0:
            return aug, r_c
        own = self.recent_history(hist, hist_len, self.H)  # (B, H)
        return torch.cat([aug, own], 1), torch.cat([r_c, cm.score(hist, hist_len, own, full)], 1)

    def _sample(self, hist, hist_len, target, progress, model, full=None, cm=None, proposals=None):
        """The K sampled augmented items and their r_c (see `sample`)."""
        cm = self.cm if cm is None else cm
        B, dev = target.shape[0], hist.device
        if self.K == 0:
            return torch.empty(B, 0, dtype=torch.long, device=dev), torch.empty(B, 0, device=dev)
        top = None
        if self.cfg.candidates == "policy":
            was_training = model.training
            model.eval()  # no dropout while proposing
            top, _ = model.beam_search(hist, hist_len, self.cfg.n_candidates, self.cfg.n_candidates)  # (B, N)
            model.train(was_training)
        elif self.cfg.candidates == "prior":
            if proposals is None:
                raise ValueError("--candidates prior: pass the frozen SFT model's top-N of these contexts as proposals")
            top = proposals  # (B, N)
        elif self.cfg.candidates == "cm":
            top = self.cm_top(hist, hist_len, target, full, cm)  # (B, N)
        cand = self.candidates(hist, target, top).to(dev)  # (B, N)
        score = cm.score(hist, hist_len, cand, full)  # (B, N) in [0, 1]: y_CM(v'_n, U)
        N = cand.shape[1]
        if self.cfg.sampler == "random":
            pick = torch.argsort(torch.rand(B, N, generator=self.gen), 1)[:, : self.K].to(dev)
        else:
            # Sec. 3.1 curriculum: the K-wide window slides from the lowest to the highest CM scores
            start = round(min(max(progress, 0.0), 1.0) * (N - self.K))
            order = torch.argsort(score, 1)  # ascending: easy first
            pick = order[:, start : start + self.K]
        return cand.gather(1, pick), score.gather(1, pick)
