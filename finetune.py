"""Fine-tuning from the SFT checkpoint: GFlowGR (paper Sec. 3.3) and every other method of Table 1, in one loop.

Read it top to bottom:

1. `gflowgr_step`: one GFlowGR training step of Sec. 3.3. For a batch of users U with their
   observed items v: the adaptive sampler (sampler.py, Sec. 3.1) draws K augmented items
   tau'; the reward model scores all 1 + K trajectories, R = r_a + r_c + r_sim (Sec. 3.2,
   `trajectory_rewards`); the loss is Eq. (8) (losses.gflowgr_loss)

       L = L_GR(tau) + lambda * sum_{tau in {tau} u tau'} w(tau) * L_GFN(tau),
       w(tau) = 1 / (r_a - r_c)^2,   L_GFN = L_TB (Eq. 6) or L_DB (Eq. 5).

   Under `--gfn-context next` (ours; Beauty GFlowGR-TB's default) the GFlowNet term moves one
   item later, to the history with v appended (for a user's newest sample: the whole training
   sequence, which has no label): only tau' there, v a history item like the others, L_GR stays
   on (U, v). That context is the one validation asks about; the test asks one item later, so
   `--refit-test` (Beauty's default) gives the test its own model, fitted on the test contexts
   (`test_contexts`: the validation item appended, as input only; pipeline.refit_for_test):
   the validation model continued `--refit-epochs` epochs (Beauty: 2), or with
   `--refit-epochs 0` a model fitted from SFT for the epochs validation chose.
   Beauty's GFlowGR-TB preset (config.METHOD_PRESETS) also changes the step's parts: the reward is
   r_c alone times the SFT prior, the K = N tau' are the policy's whole top-N (no curriculum),
   log Z is closed-form and the weights are the target's shares instead of Eq. (8)'s (Eq. 7).

2. `Method`: what the loop asks of a fine-tuning method (its loss for a batch, its extra
   parameters, a hook at each epoch, its state for resuming). `GFlowGR` wraps gflowgr_step;
   `SFTContinued` is Eq. (1) alone, the control that tells a GFlowGR gain from extra
   training; `Preference` runs the baselines of baselines.py (DPO, S-DPO, SPRec, IPA, GRPO, PPO).
3. `METHODS`: the table from a method's name to its class. Adding a method = its loss in
   losses.py (or its data in baselines.py) + a small Method subclass + one entry here
   (README, "Adding a method").
4. `finetune`: the loop. Every method gets the same SFT starting point, optimiser (AdamW,
   the backbone at --ft-lr, a method's extra parameters at --head-lr), epochs, clipping at
   norm 1 and evaluation; the epoch with the best valid NDCG@10 is kept. (A method's preset may
   set its own --ft-lr: Beauty's GFlowGR-TB 1e-3, the others 3e-4; and GFlowGR with a log Z / log F
   head spends its first --head-warmup steps training the head alone.) The whole state is
   saved after every epoch, so a killed run resumes to the same numbers.

One concept at ~640 lines: the step, the methods' interface and the loop are read together, Sec. 3.3
top to bottom, and FinetuneConfig's help strings are the flags' documentation.

Usage: `heads, sampler, info = finetune(model, cm, train_t, valid_t, cfg, "gflowgr-tb", logger)`
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cache
import distributed
from baselines import BASELINES, Baseline
from batches import append_item, length_bucketed_batches, trim
from data import DataError
from evaluation import evaluate, recommend
from gflowgr import GFlowNetHeads, GRModel
from losses import REWARD_FLOOR, gflowgr_loss, gr_loss, log_reward, policy_share, reward, target_share, trajectory_weight, vargrad_log_z
from runtime import JsonlLogger, check_finite, set_seed
from sampler import TrajectorySampler

OBJECTIVE = {"gflowgr-tb": "tb", "gflowgr-db": "db"}  # the GFlowNet objective of each GFlowGR method
LOG_Z_FORMS = ("user", "scalar", "vargrad")  # gflowgr.GFlowNetHeads; vargrad: losses.vargrad_log_z
LOG_FLOW_FORMS = ("head", "prefix")
GFN_CONTEXTS = ("same", "next", "own")  # --gfn-context


@dataclass
class FinetuneConfig:
    ft_epochs: int = field(default=2, metadata={"help": "fine-tuning epochs (every fine-tuning method: same budget)"})
    ft_last: int = field(default=0, metadata={"help": "fine-tune on each user's N most recent training contexts only (0: all of them, the paper's setting). A user's validation and test contexts are their last training context plus one and two items: the contexts nearest to those GFlowGR is judged on"})
    ft_lr: float = field(default=3e-4, metadata={"help": "fine-tuning learning rate of the backbone"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the log Z / log F heads (larger, as GFlowNets use)"})
    head_warmup: int = field(default=200, metadata={"help": "first steps train only the log Z / log F heads: the backbone's learning rate is 0 (its gradients still enter AdamW's moment estimates). None under TB with --log-z vargrad (no head to warm up)"})
    lam: float = field(default=1.0, metadata={"help": "lambda of Eq. (7)/(8): weight of the GFlowNet loss", "flag": "--lambda"})
    reward: str = field(default="ra,rc,rsim", metadata={"help": "reward terms, any subset of ra,rc,rsim (Sec. 3.2)"})
    weight: bool = field(default=True, metadata={"help": "Eq. (8) weighting 1/(r_a - r_c)^2 (--no-weight: Eq. 7)"})
    gfn_context: str = field(default="same", metadata={"help": "the context of Eq. (8)'s GFlowNet term: same (the paper: the observed item's context, the item as trajectory tau) | next (that context with the observed item appended, only augmented trajectories, r_c alone: for a user's newest training sample it is the whole training sequence, the context that has no label in the training part and that validation asks about; L_GR stays on the observed sample) | own (a diagnostic: the observed item's context as in same, but only augmented trajectories and r_c alone as in next: the GFlowNet term one item before the context validation asks about, as next's is one item before the test's)"})
    refit_test: bool = field(default=False, metadata={"help": "with --gfn-context next: the test split gets its own model, fine-tuned again from the SFT checkpoint with the GFlowNet term on the test contexts (each user's training sequence with the validation item appended, as input only: L_GR stays on the training samples) for the epochs validation chose; the valid numbers are the first model's. next fits the CM's tilt on the contexts validation asks about, and the test asks one item later"})
    refit_epochs: int = field(default=0, metadata={"help": "with --refit-test: N > 0 continues the validation model N epochs on the test contexts (a fresh optimiser; Beauty's GFlowGR-TB preset: 2); 0 fine-tunes the test's model from the SFT checkpoint for the epochs validation chose (named refit-cold where a preset continues)"})
    init_from: str = field(default="", metadata={"help": "a run folder: fine-tune from its fine-tuned model (checkpoint.pt) instead of the SFT checkpoint; the SFT prior and the preference baselines' reference stay the SFT model. A diagnostic: from a --gfn-context own run with --gfn-context next it is validation's analog of --refit-epochs (the fit moved one item later)"})
    gfn_kd: bool = field(default=False, metadata={"help": "a control, not the paper's: GFlowGR-TB's step with Eq. (6)'s squared log-ratio replaced by the cross-entropy of the policy, renormalised over each sample's trajectories, to the target's shares of them (losses.pool_kd_loss): the same target on the same pool, distilled instead of balanced"})
    target_weight: bool = field(default=False, metadata={"help": "multiply each trajectory's weight by the target's probability of it within its sample's 1 + K (losses.target_share): the fit goes where the target's mass is, the top of the list"})
    policy_mix: float = field(default=0.0, metadata={"help": "with --target-weight: the share a of the policy's own probability in the draw the weights stand for, M((1 - a) q_m + a p_m) (losses.policy_share): 0 the target alone, 1 on-policy; a mix also pushes down what the policy over-weights"})
    log_z: str = field(default="user", metadata={"help": "log Z form: user (log Z(U) head) | scalar (the paper's global Z) | vargrad (closed form from each sample's 1 + K trajectories)"})
    log_flow: str = field(default="prefix", metadata={"help": "DB's log F(s_l): head (an MLP on the prefix state) | prefix (the MLP plus the policy's own log-probability of reaching s_l, detached: starts near balance)"})
    reward_beta: float = field(default=3.0, metadata={"help": "reward exponent beta: GFlowNet targets R^beta (paper: 1; 3 was best on Beauty valid for the paper's reward R = r_a + r_c + r_sim; the presets' r_c times the SFT prior: Beauty 1, Yelp 4)"})
    reward_floor: float = field(default=REWARD_FLOOR, metadata={"help": "R is floored here before the log (R = 0 is possible): the lowest target, beta * log floor, below which no item is pushed"})
    history_floor: float = field(default=0.0, metadata={"help": "R of an item in the user's own history is floored here instead of at --reward-floor (0: no separate floor). With --aug-history and a history-filtered CM (r_c = 0) a floor far below --reward-floor pushes the history items down without lowering the observed item's target. Refuted on Beauty: 1e-6 with --aug-history 3 cut valid HR@10 0.0867 -> 0.0626 (BENCHMARKS.md)"})
    sft_prior: bool = field(default=False, metadata={"help": "reward times the frozen SFT likelihood: target P_SFT(v|U) R^beta / Z(U)"})
    oracle_reward: bool = field(default=False, metadata={"help": "toy only, a control: r_c from the toy world's truth (1 for an unseen item of a taste cluster the history shows, else 0; collab.TasteOracle) instead of the CM"})
    rsim_dedup: bool = field(default=False, metadata={"help": "count the dedup (collision) token in r_sim too (default: semantic levels only)"})
    prefix_tree: bool = field(default=True, metadata={"help": "decode each user's distinct ID prefixes once in GFlowGR's step (gflowgr.GRModel.tree_trajectories): the same log P_F up to float rounding, fewer decoder positions when the 1 + K trajectories share prefixes (the policy's own top-50 on Beauty: 96 distinct of 200, a step 16%% faster); dropout draws one mask per shared prefix. --no-prefix-tree: every trajectory's prefixes decoded apart, as before"})
    inspect_users: int = field(default=40, metadata={"help": "test users whose trajectories go into inspect.json"})


# ----------------------------------------------------------------------------------------
# 1. One GFlowGR step (Sec. 3.3)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def prior_log_p(prior: GRModel, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor, tree: bool = True,
                known: tuple | None = None) -> torch.Tensor:
    """log P_SFT(v | U) = sum_l log P_F of the frozen SFT model, for items (B, M): (B, M).

    known (--candidates prior): (top (B, N), log_p (B, N)), the prior's own top-N of these
    contexts with their beam-search log-probabilities, searched once per context before the first
    epoch (GFlowGR.proposals). An item found there is read from it; only rows holding an item
    outside it (the sampler's redraws of v) are decoded.
    """
    if known is None:
        return prior.trajectories(hist, hist_len, items, tree=tree)[0].sum(-1)
    top, top_log_p = known
    found = items[:, :, None] == top[:, None, :]  # (B, M, N)
    out = torch.where(found, top_log_p[:, None, :], 0.0).sum(-1)  # (B, M)
    miss = ~found.any(-1).all(-1)  # (B,) rows with an item outside the top-N
    if bool(miss.any()):
        out[miss] = prior.trajectories(hist[miss], hist_len[miss], items[miss], tree=tree)[0].sum(-1)
    return out


def trajectory_rewards(model: GRModel, items: torch.Tensor, r_c: torch.Tensor, cfg, prior: GRModel | None = None,
                       hist: torch.Tensor | None = None, hist_len: torch.Tensor | None = None, observed: bool = True,
                       known: tuple | None = None):
    """Sec. 3.2 reward of items (B, M) (column 0 observed) and the log-reward the GFlowNet targets, each (B, M).

    observed=False (--gfn-context next): every column is augmented (r_a = 0); only r_c applies.

    log R^beta is floored (losses.log_reward), at --history-floor for items in the user's
    history when that is set (needs hist), else at --reward-floor. r_sim compares the semantic tokens t_1..t_levels
    only, unless --rsim-dedup: the last token only numbers items that collide on those, and
    82% of Beauty items carry dedup token 0, so two unrelated items would 'share' it.

    prior (--sft-prior; needs hist, hist_len): the frozen SFT model; the target becomes
    log R^beta + log P_SFT(v | U), so the balanced policy is P_SFT(v|U) R(v)^beta / Z(U).
    known: the prior's own top-N with its log P_SFT (see prior_log_p). cfg: config.Config (its ft and tok parts).
    """
    codes = model.item_codes[items]  # (B, M, L)
    if not cfg.ft.rsim_dedup:
        codes = codes[..., : cfg.tok.levels]
    rew = reward(codes, r_c, tuple(cfg.ft.reward.split(",")), r_a=None if observed else torch.zeros_like(r_c))
    floor = cfg.ft.reward_floor
    if cfg.ft.history_floor > 0:  # --history-floor: the user's own items get their own, lower floor
        seen = (items[:, :, None] == hist[:, None, :]).any(-1)  # (B, M); hist's padding is -1, never an item
        floor = torch.where(seen, cfg.ft.history_floor, cfg.ft.reward_floor)  # (B, M)
    log_r = log_reward(rew["R"], floor=floor, beta=cfg.ft.reward_beta)  # (B, M)
    if prior is not None:
        log_r = log_r + prior_log_p(prior, hist, hist_len, items, cfg.ft.prefix_tree, known)  # + log P_SFT(v | U)
    return rew, log_r


def training_weights(r_a: torch.Tensor, r_c: torch.Tensor, log_r: torch.Tensor, ft: FinetuneConfig,
                     log_pf: torch.Tensor | None = None) -> torch.Tensor:
    """Each trajectory's weight in Eq. (8) and in the closed-form log Z, all (B, M): 1 / (r_a - r_c)^2
    (1 under --no-weight, Eq. 7), times the target's probability of it under --target-weight, mixed
    with the policy's own (log_pf (B, M, L)) under --policy-mix."""
    w = trajectory_weight(r_a, r_c) if ft.weight else torch.ones_like(log_r)  # Eq. (8)'s weight
    if ft.target_weight:  # the trajectories as a draw from the target (losses.target_share)
        share = target_share(log_r)  # (B, M)
        if ft.policy_mix > 0:  # ... and from the policy itself (losses.policy_share)
            share = (1 - ft.policy_mix) * share + ft.policy_mix * policy_share(log_pf)
        w = w * share
    return w


def balance_terms(heads: GFlowNetHeads, objective: str, ft: FinetuneConfig, log_pf, h, mem, mask, log_r, w):
    """log Z (B,) for TB, or log F(s_l) (B, M, L) for DB, in the form --log-z / --log-flow chose.

    TB, --log-z vargrad: the closed-form log Z of each sample from its own 1 + K trajectories,
    weighted as Eq. (8) weights them (losses.vargrad_log_z); else the log Z head.
    DB, --log-flow prefix: log F(s_l) = head(s_l) + sum_{j<l} log P_F(t_{j+1} | s_j), the second
    term detached: F(s) is the head times the policy's probability of reaching s, so at the
    start (head = a constant) every DB step but the last is balanced and the last carries the
    TB residual. Returns (log_z, log_flow), the one the objective does not use None.
    """
    if objective == "tb":
        if ft.log_z == "vargrad":
            return vargrad_log_z(log_pf, log_r, w), None  # (B,)
        return heads.log_z(mem, mask), None  # (B,)
    log_flow = heads.log_flow(h)  # (B, M, L)
    if ft.log_flow == "prefix":
        log_flow = log_flow + (log_pf.detach().cumsum(-1) - log_pf.detach())  # exclusive cumulative sum
    return None, log_flow


def gflowgr_step(model, heads, cm, sampler, hist, hist_len, target, progress: float, cfg, objective: str,
                 prior: GRModel | None = None, context: tuple | None = None, proposals: tuple | None = None):
    """One GFlowGR batch: sample tau', score rewards, compute Eq. (8). Returns loss, parts, stats, terms.

    hist (B, S), hist_len (B,), target (B,); progress in [0, 1]: the sampler's curriculum position.
    context (--gfn-context next): (hist, hist_len) of the GFlowNet term, with no observed item
    there: tau' are drawn, scored and balanced on it, L_GR stays on (hist, target). None: the paper's
    step, the GFlowNet term on the observed item's own context with tau as column 0.
    parts: the loss terms (detached, logged); stats: log Z, log R, the mean absolute TB residual
    of the observed and of the augmented trajectories, the curriculum's CM score; terms: L_GR
    and lambda * L_GFN with their graphs (finetune measures their gradient norms from them).
    prior (--sft-prior): the frozen SFT model (see trajectory_rewards). cm: the CM that scores
    this batch (--cm-crossfit: the CMs that never saw these users, collab.CrossFitCM.held_out).
    proposals (--candidates prior): the frozen SFT model's top-N of the GFlowNet term's contexts and
    their log P_SFT, (B, N) each (GFlowGR.proposals): the pool, and the prior's term of the target.
    """
    ft = cfg.ft
    observed = context is None  # the paper's step: tau is column 0 of the GFlowNet's trajectories
    g_hist, g_len = (hist, hist_len) if observed else context  # where the GFlowNet term is computed
    # the CM's logits of these users over all items, once per batch, where the CM's top-N
    # candidates or the r_c mapping (softmax, rank) read them (three calls were ~22% of a Beauty step)
    full = cm.full_scores(g_hist, g_len) if cm.cfg.score != "sigmoid" or sampler.cfg.candidates == "cm" else None  # (B, n_items)
    # the item the pool never holds: the label of the GFlowNet's context. Under next that context ends
    # with v, so it has none, and v is a history item like the others (--candidates-history)
    label = torch.full_like(target, -1) if ft.gfn_context == "next" else target  # (B,)
    # Sec. 3.1: K augmented items from the adaptive sampler (+ H history items), with their CM scores
    aug, r_c_aug = sampler.sample(g_hist, g_len, label, progress, model, full, cm,
                                  proposals[0] if proposals is not None else None)  # (B, K + H), (B, K + H)
    if observed:
        r_c_obs = cm.score(hist, hist_len, target[:, None], full)  # (B, 1): y_CM(v, U)
        items = torch.cat([target[:, None], aug], 1)  # (B, M): column 0 is the observed trajectory tau
        r_c = torch.cat([r_c_obs, r_c_aug], 1)  # (B, M)
    else:
        items, r_c = aug, r_c_aug  # (B, M): augmented trajectories only
    log_pf, h, mem, mask = model.trajectories(g_hist, g_len, items, tree=ft.prefix_tree)  # (B, M, L), (B, M, L, d)
    # Sec. 3.2: R = r_a + r_c + r_sim, and the log-reward the GFlowNet targets
    rew, log_r = trajectory_rewards(model, items, r_c, cfg, prior, g_hist, g_len, observed, proposals)  # (B, M)
    w = training_weights(rew["r_a"], r_c, log_r, ft, log_pf)  # (B, M): Eq. (8)'s weight (and --target-weight's)
    log_z, log_flow = balance_terms(heads, objective, ft, log_pf, h, mem, mask, log_r, w)
    # Eq. (1)'s observed trajectory, on its own context when the GFlowNet's is another
    log_pf_gr = None if observed else model(hist, hist_len, target)[0]  # (B, L)
    # Eq. (8) (Eq. 7 with --no-weight)
    loss, parts = gflowgr_loss(log_pf, log_r, objective="kd" if ft.gfn_kd else objective, r_a=rew["r_a"], r_c=r_c, log_z=log_z,
                               log_flow=log_flow, lam=ft.lam, w=w, log_pf_gr=log_pf_gr)
    terms = {"gr": parts.pop("_l_gr"), "gfn": parts.pop("_l_gfn")}  # with their graphs, for the gradient norms
    parts["gfn/balance_offset"] = (log_r - log_pf.sum(-1)).mean().detach()  # the log Z that balances the batch on average
    # Eq. (6)'s residual log Z + sum_l log P_F - log R per trajectory (DB: telescoped, log Z = log F(s_0))
    with torch.no_grad():
        start = log_z[:, None] if log_z is not None else log_flow[..., 0]  # (B, 1) or (B, M)
        residual = (start + log_pf.sum(-1) - log_r).abs()  # (B, M)
    first_aug = 1 if observed else 0  # the first augmented column
    nan = float("nan")
    stats = {"gfn/log_z": (log_z if log_z is not None else log_flow[:, 0, 0]).mean().item(),
             "gfn/log_r_obs": log_r[:, 0].mean().item() if observed else nan,
             "gfn/log_r_aug": log_r[:, first_aug:].mean().item() if log_r.shape[1] > first_aug else nan,
             "gfn/residual_obs": residual[:, 0].mean().item() if observed else nan,
             "gfn/residual_aug": residual[:, first_aug:].mean().item() if log_r.shape[1] > first_aug else nan,
             "sampler/cm_score": r_c_aug.mean().item() if r_c_aug.numel() else float("nan")}
    return loss, parts, stats, terms


def last_contexts(train_t: dict, n: int) -> dict:
    """The rows of train_t (batches.to_tensors) that are each user's n most recent training contexts (n = 0: all).

    Training samples are stored user by user, positions ascending (data.split_leave_one_out), so a
    row is among its user's last n when fewer than n rows of the same user follow it.
    >>> last_contexts({"user": torch.tensor([0, 0, 0, 1, 1]), "target": torch.tensor([5, 6, 7, 8, 9])}, 1)["target"]
    tensor([7, 9])
    """
    if n == 0:
        return train_t
    user = train_t["user"]
    n_rows = torch.bincount(user)  # (n_users,) training contexts per user
    first = torch.cumsum(n_rows, 0) - n_rows  # (n_users,) each user's first row
    after = first[user] + n_rows[user] - 1 - torch.arange(len(user), device=user.device)  # (N,) rows of the same user after this one
    keep = after < n
    return {k: v[keep] for k, v in train_t.items()}


def test_contexts(train_t: dict, valid_t: dict, max_len: int) -> dict:
    """--refit-test: train_t (each user's newest training sample, --ft-last 1) with "after" (N,), the
    user's validation item: GFlowGR.context appends it after the sample's own target, so the
    GFlowNet term sits on the test's context. The validation item is input there, never a label.

    Checks that the sample's history with its target appended is the user's validation context
    (the split's layout), so that one more item is the test's context.
    """
    n_users = int(torch.maximum(train_t["user"].max(), valid_t["user"].max())) + 1
    item = torch.full((n_users,), -1, dtype=valid_t["target"].dtype, device=valid_t["target"].device)
    item[valid_t["user"]] = valid_t["target"]  # (n_users,) each user's validation item
    row = torch.full((n_users,), -1, dtype=torch.long, device=valid_t["target"].device)
    row[valid_t["user"]] = torch.arange(len(valid_t["user"]), device=row.device)  # (n_users,) its row in valid_t
    v = row[train_t["user"]]  # (N,)
    if bool((v < 0).any()) or len(torch.unique(train_t["user"])) != len(train_t["user"]):
        raise DataError("--refit-test fine-tunes on each user's newest training sample and the validation item after it: "
                        "use it with --ft-last 1")
    hist, hist_len = append_item(train_t["hist"], train_t["hist_len"], train_t["target"], max_len)
    want = trim(valid_t["hist"][v], valid_t["hist_len"][v])
    if hist.shape != want.shape or not torch.equal(hist, want) or not torch.equal(hist_len, valid_t["hist_len"][v]):
        raise DataError("--refit-test: a training sample's history with its item appended is not its user's validation "
                        "context; the split is not leave-one-out")
    return {**train_t, "after": item[train_t["user"]]}


def grad_norms(terms: dict, params: list) -> dict:
    """The L2 norm of the gradient of each loss term alone (before clipping), e.g. L_GR and lambda L_GFN.

    Uses autograd.grad with the graph kept, so nothing accumulates into .grad and the step that
    follows is the same as without this measurement.
    """
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"grad/{name}"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None) or torch.zeros(())))
    return out


# ----------------------------------------------------------------------------------------
# 2. The methods, as the loop sees them
# ----------------------------------------------------------------------------------------


@dataclass
class Loss:
    """What a method's `loss` returns for one batch."""
    value: torch.Tensor  # the scalar to minimise
    parts: dict  # its terms, detached, logged as they are named ("loss/gr", ...)
    stats: dict = field(default_factory=dict)  # other numbers to log ("gfn/log_z", ...)
    terms: dict = field(default_factory=dict)  # loss terms with their graphs: the loop logs each one's gradient norm


class Method:
    """One fine-tuning method. The loop builds it once, then for every epoch calls start_epoch and,
    for every batch, loss (inner_steps times, each followed by an optimiser step).

    The base class holds what every method may use; it is not a method itself.
    """
    uses_sampler = False  # whether it draws augmented items from the adaptive sampler (sampler.py)
    inner_steps = 1  # optimiser steps per batch (PPO: several)
    warmup = 0  # first steps in which the backbone stays frozen and only `parameters()` train

    def __init__(self, name: str, model: GRModel, heads: GFlowNetHeads, cm, sampler, cfg, train_t: dict, sft: GRModel):
        self.name, self.model, self.heads, self.cm, self.sampler, self.cfg = name, model, heads, cm, sampler, cfg
        self.sft = sft  # the SFT model (not trained): GFlowGR's prior, the baselines' reference

    @classmethod
    def needs_sampler(cls, name: str) -> bool:
        """Asked before the method is built: the loop builds the sampler for methods that draw from it."""
        return cls.uses_sampler

    def parameters(self) -> list:
        """Parameters besides the backbone's, trained at --head-lr (GFlowNet heads, a value head)."""
        return []

    def start(self, train_t: dict) -> None:
        """Once, before the first epoch of a run that is not resumed."""

    def start_epoch(self, epoch: int, train_t: dict) -> None:
        """At the start of every epoch (self-play baselines build their pairs here)."""

    def loss(self, idx, hist, hist_len, target, progress: float, inner: int) -> Loss:
        """The loss of one batch: idx (B,) training-sample indices, hist (B, S), hist_len (B,), target (B,)."""
        raise NotImplementedError

    def state(self) -> dict | None:
        """What a resumed run needs back besides the backbone, the heads and the optimiser."""
        return None

    def load_state(self, state: dict | None) -> None:
        pass


class SFTContinued(Method):
    """Eq. (1) alone with the same optimiser, steps and schedule: any gain of GFlowGR over this is
    not just extra training."""

    def loss(self, idx, hist, hist_len, target, progress, inner):
        log_pf, _ = self.model(hist, hist_len, target)  # (B, L)
        loss = gr_loss(log_pf)  # Eq. (1)
        return Loss(loss, {"loss/gr": loss.detach()})


class GFlowGR(Method):
    """GFlowGR-TB / GFlowGR-DB: Eq. (8) by gflowgr_step, with the log Z / log F heads."""
    uses_sampler = True

    def __init__(self, name, model, heads, cm, sampler, cfg, train_t, sft):
        super().__init__(name, model, heads, cm, sampler, cfg, train_t, sft)
        self.objective = OBJECTIVE[name]
        self.user = train_t["user"]  # (N,) each training sample's user: --cm-crossfit scores it with the CM that never saw them
        self.after = train_t.get("after")  # (N,) --refit-test: the item after each sample's target (see test_contexts)
        ft = cfg.ft
        frozen = copy.deepcopy(sft).eval() if ft.sft_prior or cfg.sampler.candidates == "prior" else None
        self.prior = frozen if ft.sft_prior else None  # the frozen SFT model of the target
        # --candidates prior: the frozen model's top-N of every context, searched once (it never changes)
        self.proposals = self.prior_top(frozen, train_t) if cfg.sampler.candidates == "prior" else None
        # The heads start untrained: their first, huge residuals would flow into the SFT backbone
        # and undo it (on toy, valid HR@10 fell from 0.52 to 0.12 in the first epoch). So the
        # backbone waits `head_warmup` steps while log Z / log F catch up.
        # (a closed-form log Z has nothing to warm up: with --log-z vargrad, TB starts at once)
        self.warmup = 0 if self.objective == "tb" and ft.log_z == "vargrad" else ft.head_warmup

    def parameters(self):
        return list(self.heads.parameters())

    @torch.no_grad()
    def start(self, train_t):
        """Centre the first TB / DB residuals (see GFlowNetHeads.init_offset) on one batch."""
        # measured without dropout: a cached SFT model arrives in train mode, a fresh one in eval
        # mode, and the offset (so the whole run) must not depend on which
        self.model.eval()
        t = self.cfg.train
        n = len(train_t["target"])
        b = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed))[: t.batch_size].to(train_t["target"].device)
        hl = train_t["hist_len"][b]
        hist, target = trim(train_t["hist"][b], hl), train_t["target"][b]
        _, parts, _, _ = gflowgr_step(self.model, self.heads, self.cm.held_out(self.user[b]), self.sampler, hist, hl, target,
                                      0.0, self.cfg, self.objective, self.prior, self.context(b, hist, hl, target),
                                      self.proposals_of(b))
        self.heads.init_offset(float(parts["gfn/balance_offset"]))

    def context(self, idx, hist, hist_len, target):
        """The GFlowNet term's context: None (the sample's own, the paper's), under --gfn-context own
        the sample's own history without its observed item as a trajectory, under next the history
        with its observed item appended (batches.append_item), and in a --refit-test run the item
        after it (the validation item) appended too: the test's context."""
        if self.cfg.ft.gfn_context == "same":
            return None
        if self.cfg.ft.gfn_context == "own":
            return hist, hist_len
        hist, hist_len = append_item(hist, hist_len, target, self.cfg.data.max_his_len)
        if self.after is not None:
            hist, hist_len = append_item(hist, hist_len, self.after[idx], self.cfg.data.max_his_len)
        return hist, hist_len

    @torch.no_grad()
    def prior_top(self, frozen: GRModel, train_t: dict) -> tuple:
        """--candidates prior: the frozen SFT model's top-N items of every sample's GFlowNet context
        (`context`) and their log P_SFT, (N_samples, N) each. One beam search per context before the
        first epoch (and again, identically, on resume), where --candidates policy searches the
        fine-tuned model every step; the log-probabilities are the --sft-prior term of the target."""
        t, n_cand = self.cfg.train, self.cfg.sampler.n_candidates
        rows = torch.arange(len(train_t["target"]), device=train_t["target"].device)
        tops, log_ps = [], []
        for b in tqdm(rows.split(t.eval_batch), desc=f"prior top-{n_cand}", leave=False, disable=not distributed.is_main()):
            hl = train_t["hist_len"][b]
            hist, target = trim(train_t["hist"][b], hl), train_t["target"][b]
            top, log_p = frozen.beam_search(*(self.context(b, hist, hl, target) or (hist, hl)), n_cand, n_cand)  # (b, N) each
            tops.append(top)
            log_ps.append(log_p)
        return torch.cat(tops), torch.cat(log_ps)

    def proposals_of(self, idx):
        """The rows idx of `proposals` (None unless --candidates prior)."""
        return None if self.proposals is None else (self.proposals[0][idx], self.proposals[1][idx])

    def loss(self, idx, hist, hist_len, target, progress, inner):
        loss, parts, stats, terms = gflowgr_step(self.model, self.heads, self.cm.held_out(self.user[idx]), self.sampler, hist, hist_len, target,
                                                 progress, self.cfg, self.objective, self.prior, self.context(idx, hist, hist_len, target),
                                                 self.proposals_of(idx))
        return Loss(loss, parts, stats, terms)


class Preference(Method):
    """A Table 1 baseline of baselines.py (DPO, S-DPO, SPRec, IPA, GRPO, PPO), from the same SFT start."""

    def __init__(self, name, model, heads, cm, sampler, cfg, train_t, sft):
        super().__init__(name, model, heads, cm, sampler, cfg, train_t, sft)
        t, ft = cfg.train, cfg.ft

        def propose(m, n):  # the model's own top-n items for every training sample (SPRec, IPA)
            items = recommend(m, train_t, dataclasses.replace(t, beam=max(t.beam, n), topk=n), desc=f"{name} proposals")[0]
            m.train()
            return items

        self.baseline = Baseline(name, model, copy.deepcopy(sft).eval(), cm, sampler, cfg.bl, tuple(ft.reward.split(",")),
                                 None if ft.rsim_dedup else cfg.tok.levels, len(train_t["target"]), propose,
                                 seed=distributed.rank_seed(t.seed))  # per-sample draws: each rank its own stream
        for p in self.baseline.parameters():
            p.data = p.data.to(train_t["target"].device)
        self.inner_steps = self.baseline.inner_steps

    @classmethod
    def needs_sampler(cls, name):
        return name in ("dpo", "sdpo")  # DPO's rejected item and S-DPO's K negatives come from the sampler

    def parameters(self):
        return self.baseline.parameters()

    def start_epoch(self, epoch, train_t):
        self.baseline.start_epoch(epoch, train_t)

    def loss(self, idx, hist, hist_len, target, progress, inner):
        return Loss(*self.baseline.loss(idx, hist, hist_len, target, progress, inner))

    def state(self):
        return self.baseline.state()

    def load_state(self, state):
        self.baseline.load_state(state)


# ----------------------------------------------------------------------------------------
# 3. The table: a method's name -> its class. `--method NAME` accepts every key.
# ----------------------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {
    "sft-continued": SFTContinued,
    "gflowgr-tb": GFlowGR,
    "gflowgr-db": GFlowGR,
    **{name: Preference for name in BASELINES},
}


# ----------------------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------------------


def finetune(model: GRModel, cm, train_t: dict, valid_t: dict, cfg, method: str, logger: JsonlLogger, log=print,
             resume_path: Path | None = None, resume: dict | None = None, identity=None, refit: bool = False,
             sft: GRModel | None = None):
    """Fine-tune the SFT backbone with `method` for ft_epochs; keep the epoch with the best valid NDCG@10.

    refit (--refit-test's second model): the GFlowNet term on the test contexts (test_contexts), no
    validation (valid_t is that model's validation of the contexts' layout only), the last epoch kept.

    train_t, valid_t: batches.to_tensors of the splits; cfg: config.Config. After every epoch
    the whole state (backbone, heads, the method's own state, optimiser, schedule, batch order,
    sampler and other random generators, best epoch) is saved atomically to resume_path with
    `identity` (the run's configuration); `resume` (that state, loaded) continues from it to
    the same result. sft: the SFT model, GFlowGR's frozen prior and the baselines' reference
    (default: model, which is the SFT model unless --init-from or --refit-epochs started it
    elsewhere). Returns the GFlowNet heads, the sampler (None if the method has none) and
    the run's info (best epoch, seconds, samples/s).
    """
    t, ft = cfg.train, cfg.ft
    device = train_t["target"].device
    train_t = last_contexts(train_t, ft.ft_last)  # --ft-last: each user's most recent contexts only
    if refit:
        train_t = test_contexts(train_t, valid_t, cfg.data.max_his_len)
    # the heads' initial weights and the dropout masks: the same whatever ran before in this
    # process (a study trains many runs in one), so a run's numbers depend on its config alone
    set_seed(t.seed)
    # the GFlowNet heads exist in every run (built first, so every method's random stream starts
    # at the same point; saved with every checkpoint); only GFlowGR trains them
    heads = GFlowNetHeads(cfg.model.d_model, ft.log_z).to(device)
    cls = METHODS[method]
    # torchrun: the sampler draws per sample, so each rank has its own stream (distributed.rank_seed)
    sampler = (TrajectorySampler(cm, model.item_codes.shape[0], cfg.sampler, seed=distributed.rank_seed(t.seed))
               if cls.needs_sampler(method) else None)
    m = cls(method, model, heads, cm, sampler, cfg, train_t, model if sft is None else sft)
    extra_params = m.parameters()
    # the method's own parameters (log Z / log F heads, PPO's value head) get their own, larger learning rate
    groups = [{"params": model.parameters(), "lr": ft.ft_lr, "weight_decay": t.weight_decay}]
    if extra_params:
        groups.append({"params": extra_params, "lr": ft.head_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    params = [*model.parameters(), *extra_params]  # what the clipping at norm 1 sees
    warm = m.warmup
    # the backbone's learning rate is 0 during the warm-up; the extra parameters train throughout
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: float(s >= warm), lambda s: 1.0][: len(groups)])
    gen = torch.Generator().manual_seed(t.seed + 1)  # the batch order: the same on every rank under torchrun
    n_batches = math.ceil(len(train_t["target"]) / t.batch_size)
    total = ft.ft_epochs * n_batches
    if warm >= total:
        raise DataError(f"--head-warmup ({warm} steps) is not shorter than the whole fine-tuning ({total} steps: "
                        f"{ft.ft_epochs} epochs of {n_batches}): lower it or raise --ft-epochs")
    eval_idx = None
    if 0 < t.eval_users < len(valid_t["target"]) and not refit:
        eval_idx = torch.randperm(len(valid_t["target"]), generator=torch.Generator().manual_seed(t.seed))[: t.eval_users]
    best = {"ndcg@10": -1.0}
    step, t_train, n_seen, start = 0, 0.0, 0, 0
    if resume is not None and len(resume["opt"]["param_groups"]) != len(opt.param_groups):
        # written before finetune.py, when SFT-continued's optimiser also held the idle log Z / log F heads
        log(f"[resume] {resume_path} was written by an older version with another optimiser layout: {method} starts afresh")
        resume = None
        logger.restart()
    if resume is not None:
        model.load_state_dict(resume["model"])
        heads.load_state_dict(resume["heads"])
        # this rank's own random streams (distributed.own); 'baseline': resume files written before finetune.py
        m.load_state(distributed.own(resume, "method") if "method" in resume else resume["baseline"])
        if sampler is not None:
            sampler.gen.set_state(distributed.own(resume, "sampler_gen"))
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        gen.set_state(resume["gen"])
        cache.set_rng_state(distributed.own(resume, "rng"))
        best, step, t_train, n_seen, start = (resume[k] for k in ("best", "step", "t_train", "n_seen", "epoch"))
        log(f"[resume] {method} continues after epoch {start} of {ft.ft_epochs} ({resume_path})")
    else:
        m.start(train_t)
        distributed.reseed_rank_streams(t.seed)  # torchrun: each rank its own dropout masks
    # torchrun: DDP over the backbone and the method's own parameters (log Z / log F heads, PPO's
    # value head), built once every rank holds the same values; backward all-reduces their gradients
    compute = distributed.ddp([model], extra_params)
    for epoch in range(start, ft.ft_epochs):
        m.start_epoch(epoch, train_t)
        model.train()
        heads.train()
        t0 = time.time()
        bar = tqdm(length_bucketed_batches(train_t["hist_len"].cpu(), t.batch_size, gen), desc=f"{method} epoch {epoch + 1}/{ft.ft_epochs}",
                   leave=False, disable=not distributed.is_main())
        for b_all in bar:
            b = distributed.shard(b_all).to(device)  # this rank's rows of the batch (all of it in one process)
            w = distributed.share(len(b), len(b_all))
            hl = train_t["hist_len"][b]
            hist, target = trim(train_t["hist"][b], hl), train_t["target"][b]
            progress = step / max(1, total - 1)  # the sampler's curriculum position, 0 -> 1 over the run
            logged = (step + 1) % 20 == 0 or step == 0  # this step's numbers go into metrics.jsonl
            for inner in range(m.inner_steps):
                out = compute(m.loss, b, hist, hl, target, progress, inner)
                grads = grad_norms(out.terms, params) if logged and out.terms else {}  # this rank's share's
                opt.zero_grad(set_to_none=True)
                (out.value * w).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                check_finite(step, out.value, out.parts, grad_norm)
                opt.step()
            sched.step()
            step += 1
            n_seen += len(b_all)
            if logged:
                # charts/clipped: 1 when clipping at norm 1 scaled this step down (grad/total > 1);
                # torchrun: the loss terms are the global batch's, stats and gradient norms rank 0's share's
                parts = {k: distributed.batch_mean(torch.as_tensor(v, dtype=torch.float64), w) for k, v in out.parts.items()}
                row = {k: float(v) for k, v in parts.items()} | out.stats | grads | {
                    "grad/total": float(grad_norm), "charts/clipped": float(grad_norm > 1.0)}
                bar.set_postfix(loss=f"{out.value.item():.3f}",
                                **({"log_z": f"{out.stats['gfn/log_z']:.2f}"} if "gfn/log_z" in out.stats else {}))
                logger.log(step=step, epoch=epoch, **row)
        t_train += time.time() - t0
        # --refit-test's model sees the validation item as input: it is not validated, its last epoch is kept
        val = evaluate(model, valid_t, t, eval_idx, desc="valid") if not refit else {}
        logger.log(step=step, epoch=epoch + 1, **{f"eval/valid_{k}": v for k, v in val.items()},
                   **{"charts/samples_per_s": n_seen / t_train, "charts/epoch_seconds": time.time() - t0})
        # only epochs in which the backbone trained compete: a warm-up-only epoch is the SFT model
        improved = (val["ndcg@10"] > best["ndcg@10"] if not refit else epoch + 1 == ft.ft_epochs) and step > warm
        log(f"{method} epoch {epoch + 1}  " + (f"valid HR@10 {val['hr@10']:.4f} NDCG@10 {val['ndcg@10']:.4f}" if val else "(test refit)")
            + f"  ({n_seen / t_train:.0f} samples/s){'  *' if improved else ''}")
        if improved:
            best = {"ndcg@10": val.get("ndcg@10", float("nan")), "epoch": epoch + 1, "step": step,
                    "state": copy.deepcopy(model.state_dict()), "heads": copy.deepcopy(heads.state_dict())}
        if resume_path is not None and epoch + 1 < ft.ft_epochs:
            streams = {"method": m.state(), "sampler_gen": sampler.gen.get_state() if sampler is not None else None,
                       "rng": cache.rng_state()}  # per rank under torchrun
            cache.save({"model": model.state_dict(), "heads": heads.state_dict(), **streams, "ranks": distributed.gather(streams),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                        "best": best, "step": step, "t_train": t_train, "n_seen": n_seen, "epoch": epoch + 1,
                        "log_bytes": logger.tell(), "identity": identity}, resume_path)
    model.load_state_dict(best["state"])
    heads.load_state_dict(best["heads"])
    info = {"best_epoch": best["epoch"], "step": best["step"], "train_seconds": t_train,
            "seconds_per_epoch": t_train / ft.ft_epochs, "samples_per_s": n_seen / max(t_train, 1e-9)}
    return heads, sampler, info
