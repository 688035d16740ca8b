"""The run's configuration: one dataclass per concept, every field a flag, data-set presets, run naming.

`Config` gathers the config of each concept, each defined beside its code: data
(data.DataConfig), semantic IDs (tokenizer.TokenizerConfig), the GR backbone
(gflowgr.ModelConfig), the run and its SFT (`TrainConfig`, here), the collaborative model
(collab.CollabConfig), the sampler (sampler.SamplerConfig), fine-tuning
(finetune.FinetuneConfig) and the baselines (baselines.BaselineConfig).

Every field is a command-line flag named after it (`--ft-lr`, `--K`; the CM's get a `cm-`
prefix, `--cm-lr`); its help text is the field's `help`. Values come from: the defaults <- the
data set's preset (`PRESETS`) <- the method's own preset on that data set (`METHOD_PRESETS`;
`with_method` switches methods) <- the flags given. `finalize` fills the derived fields and
rejects, with one message each, settings that cannot work.

A run lives in `runs/<dataset>__[<backbone>__]<method>[+<variant>]__seed<N>/` (`run_dir`);
a finished run whose config.json equals the config is reused (`finished`).

One concept at ~580 lines: most of it is the presets' comments, which record why each preset
value won on validation (BENCHMARKS.md has the runs), and `finalize`'s one message per bad setting.

Usage: `cfg = parse_config(["--dataset", "toy", "--method", "gflowgr-tb"])`
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import collab
import distributed
import results
from baselines import BaselineConfig
from collab import CollabConfig
from data import DataConfig, DataError
from finetune import GFN_CONTEXTS, LOG_FLOW_FORMS, LOG_Z_FORMS, METHODS as FINETUNE_TABLE, OBJECTIVE, FinetuneConfig
from gflowgr import ModelConfig
from losses import REWARD_TERMS
from sampler import CANDIDATES, SAMPLERS, SamplerConfig
from tokenizer import DEDUP_ORDERS, TokenizerConfig

FINETUNE_METHODS = tuple(FINETUNE_TABLE)
METHODS = ("sft", *FINETUNE_METHODS)  # sft, then the fine-tuning methods of finetune.METHODS
# --method all: Table 1's rows (SFT, the six baselines, GFlowGR-DB/TB) plus the SFT-continued reference
TABLE_BASELINES, TABLE_GFLOWGR = results.BASELINES, results.GFLOWGR  # in the paper's row order
TABLE_METHODS = (*TABLE_BASELINES, *TABLE_GFLOWGR, "sft-continued")
BACKBONES = ("tiger", "letter")
STUDIES = ("ablation", "k", "lambda", "diversity", "exposure", "fusion", "paper-regime", "tilt", "tilt-fit")  # experiments.py, tilt.py
# The settings the studies vary (Table 2, Fig. 3). A GFlowGR run whose config differs from
# the default in any of them is a variant: its folder name says how (see `variant`), so an
# ablation never overwrites the full model and identical configs share one run.
VARIANT_FIELDS = (("ft.reward", "reward-{}"), ("sampler.sampler", "sampler-{}"), ("sampler.K", "K{}"),
                  ("ft.weight", "no-weight"), ("ft.lam", "lambda{}"),
                  ("sampler.aug_history", "hist{}"), ("sampler.candidates", "cand-{}"), ("sampler.n_candidates", "N{}"),
                  ("sampler.candidates_history", "cand-hist-{}"), ("ft.reward_beta", "beta{}"), ("ft.reward_floor", "floor{}"),
                  ("ft.history_floor", "hfloor{}"), ("ft.oracle_reward", "oracle"), ("ft.ft_last", "last{}"),
                  ("cm.crossfit", "crossfit{}"), ("ft.head_lr", "headlr{}"), ("ft.target_weight", "target-weight"),
                  ("ft.gfn_context", "ctx-{}"), ("ft.gfn_kd", "kd"), ("ft.policy_mix", "pmix{}"),
                  ("ft.refit_test", "refit"), ("ft.refit_epochs", "refit-warm{}"),
                  ("ft.prefix_tree", "flat"))
# Named for every fine-tuning method (each reads them): a learning-rate sweep must not land in the
# default run's folder and replace it
FINETUNE_VARIANT_FIELDS = (("ft.ft_lr", "ftlr{}"), ("ft.init_from", "init-{}"))
RANKING_VARIANT = "history-out"  # --filter-seen: every method's run is named apart (its lists differ)


@dataclass
class TrainConfig:
    method: str = field(default="gflowgr-tb", metadata={"help": f"training method: {' | '.join(METHODS)} | all (every Table 1 row); a fine-tuning method trains (or reuses) the SFT and the CM first"})
    backbone: str = field(default="tiger", metadata={"help": "tiger (RQ-VAE IDs) | letter (RQ-VAE + collaborative and diversity regularisers)"})
    seed: int = field(default=42, metadata={"help": "random seed (the paper reports 42, 43, 44)"})
    seeds: list = field(default_factory=list, metadata={"help": "run each method for these seeds and write results/<dataset>_<backbone>.md", "nargs": "+"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    out: str = field(default="runs", metadata={"help": "folder for runs and cached stages"})
    epochs: int = field(default=30, metadata={"help": "maximum SFT epochs"})
    batch_size: int = field(default=256, metadata={"help": "training batch size"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=300, metadata={"help": "linear warm-up steps, then cosine decay"})
    patience: int = field(default=3, metadata={"help": "early stopping: evaluations without a better valid NDCG@10"})
    eval_users: int = field(default=0, metadata={"help": "valid users scored after each epoch for early stopping (0 = all)"})
    eval_from: int = field(default=1, metadata={"help": "first SFT epoch scored on validation; earlier ones only train and cannot be the kept epoch (the last epoch is always scored)"})
    bf16: bool = field(default=False, metadata={"help": "SFT training steps under bfloat16 autocast (fast on CPUs with AVX512-BF16 / AMX and on GPUs; evaluation stays float32). 1.2-1.3x faster on such a CPU; off by default: on Beauty one of three seeds fell under the accuracy floor (BENCHMARKS.md, 2026-12-04)"})
    filter_seen: bool = field(default=False, metadata={"help": "GR evaluation: leave each user's history items (the last --max-his-len it sees) out of the beam search's list, as --cm-filter-seen does for the CM's ranking (Beauty and toy have no repeats; on Yelp 5-7%% of the targets are repeats and would be lost). Final valid/test lists only: early stopping and model selection still rank with the history in"})
    beam: int = field(default=20, metadata={"help": "beam width of the constrained beam search"})
    topk: int = field(default=10, metadata={"help": "length of the recommendation list"})
    eval_batch: int = field(default=512, metadata={"help": "users per beam-search batch"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})
    study: str = field(default="", metadata={"help": "run an analysis study instead of one run: ablation | k | lambda | diversity | exposure | fusion | paper-regime | tilt | tilt-fit (experiments.py, tilt.py; writes results/<dataset>_<study>.*)"})
    tag: str = field(default="", metadata={"help": "a name appended to the run folder (<method>+<tag>), to keep a study's runs apart"})
    regime_epochs: int = field(default=3, metadata={"help": "paper-regime study: SFT epochs of the under-trained starting point (chosen on validation)"})
    diversity_users: int = field(default=200, metadata={"help": "diversity study: test users whose whole item distribution P(v|U) is computed (~1 s each on a CPU for Beauty; 0 = all)"})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tok: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cm: CollabConfig = field(default_factory=CollabConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ft: FinetuneConfig = field(default_factory=FinetuneConfig)
    bl: BaselineConfig = field(default_factory=BaselineConfig)


# Per-data-set overrides of the defaults; flags given on the command line win.
PRESETS = {
    "toy": {"tok.codebook_size": 16, "tok.rq_epochs": 150, "tok.rq_batch": 256, "model.d_model": 64, "model.d_ff": 256,
            "train.epochs": 40, "train.batch_size": 128, "train.lr": 3e-3, "train.warmup_steps": 50, "train.patience": 5,
            "cm.max_len": 20, "cm.batch_size": 32, "cm.lr": 5e-3, "cm.epochs": 20, "cm.patience": 5,
            "ft.ft_epochs": 4, "ft.ft_lr": 1e-3, "ft.head_warmup": 10, "sampler.n_candidates": 30},
    # Beauty: SFT keeps its 20-epoch schedule. 12 epochs would fit the main job in ~30 minutes on
    # 2 cores, but costs accuracy: test HR@10 0.0618 / 0.0600 / 0.0580 (seeds 42-44, 1 thread)
    # against 0.0644 / 0.0621 / 0.0635, valid NDCG@10 lower on every seed; `--epochs 12` is the
    # fast option. Fine-tuning on all training contexts had its best valid NDCG@10 after epoch 1
    # in every Beauty run (BENCHMARKS.md, issue 15); on the newest contexts only (below) the
    # epochs are 6x shorter and up to 3 are scored.
    # The paper-regime SFT: 6 epochs gave valid HR@10 0.0732 / test 0.0546 (paper: 0.0558),
    # 4 epochs 0.0683 / 0.0507 (seed 42; BENCHMARKS.md, "The paper's regime").
    # The CM: full softmax with the history left out (--cm-filter-seen; Beauty has no repeats)
    # and dropout 0.5: valid NDCG@10 0.0681 against 0.0657 for the dropout-0.2 CE model ranked the
    # same way, test HR@10 0.0904 (0.0807 ranked with the history in). BENCHMARKS.md, issue 14.
    # SFT validation from epoch 8 (--eval-from): the 5,000-user valid NDCG@10 of seeds 42 and 43
    # rises every epoch up to 7 and is 0.01 below its best there (best epochs 14 and 19), so
    # scoring epochs 1-7 only cost time (~7 s each); BENCHMARKS.md, issue 15.
    "beauty": {"train.epochs": 20, "train.eval_users": 5000, "train.eval_from": 8, "cm.lr": 2e-3, "cm.dropout": 0.5, "cm.filter_seen": True,
               "train.regime_epochs": 6,
               # GFlowGR on Beauty: the configuration that won on validation (BENCHMARKS.md, issue 14,
               # "GFlowGR-TB on Beauty with the new CM"): the target P_SFT(v|U) P_CM(v|U)^beta (reward
               # r_c alone with its softmax mapping, times the SFT prior), the closed-form log Z. With
               # beta 0.5 and the CM's top-N as candidates it had valid NDCG@10 0.0486 against 0.0425
               # for the paper's reward (ra,rc,rsim, beta 3, sigmoid r_c, uniform candidates, log Z(U)
               # head; seed 42).
               "ft.reward": "rc", "ft.reward_beta": 1.0, "ft.sft_prior": True, "cm.score": "softmax",
               "ft.log_z": "vargrad",
               # The augmented trajectories: the GR's own whole top-10, the user's history items in
               # (they sit at the reward floor, the CM leaving the history out), and beta 1. Valid
               # NDCG@10 0.0489 +- 0.0005 over seeds 42/43/44 against 0.0477 for the CM's top-50 with
               # beta 0.5 and 0.0481 for SFT-continued, ahead of both on every seed (seed 44 by 1e-5
               # over SFT-continued); beta 0.5 / 2 / 4 on this pool gave 0.0481 / 0.0476 / 0.0452
               # (seed 42). BENCHMARKS.md, session of 2026-12-06 (seventh).
               "sampler.candidates": "policy", "sampler.n_candidates": 10, "sampler.candidates_history": True,
               "sampler.sampler": "random", "sampler.K": 10,
               # Fine-tuning (every method) on each user's newest training context only, 3 epochs of
               # 88 steps, best epoch on validation; GFlowGR's lambda 0.03. The validation winner of
               # the session of 2026-12-06 (BENCHMARKS.md): GFlowGR-TB's valid NDCG@10 over seeds 42/43/44
               # rose from the one-epoch, all-contexts setting, and the fine-tuning takes ~70 s instead of
               # ~120 s. SFT-continued with the same budget gains more (the recency, not the GFlowNet).
               "ft.ft_last": 1, "ft.ft_epochs": 3, "ft.lam": 0.03},
    # Yelp's validation curve is flatter and noisier than Beauty's: with patience 3 on 5,000
    # users, seeds 43/44 stopped at epochs 6/9 (test HR@10 0.015/0.018) while seed 42 was still
    # improving at epoch 20 (0.027); BENCHMARKS.md, Table 1 on Yelp.
    # The copy path (--copy-bonus): 6.5% of Yelp's targets are places the user has been before;
    # without it the GR gets 7% of those, SASRec 51%. Seed 42, valid NDCG@10 (10,000 users): 0.0174
    # without (40 epochs), 0.0260 with (early stop at epoch 8, best 2), 0.0275 with validation from
    # epoch 20 (the early stop is otherwise taken in the flat stretch after the repeats are learned).
    # BENCHMARKS.md, 2026-12-06 (fourth).
    # Fine-tuning: Beauty's target P_SFT(v|U) r_c(v)^beta, closed-form log Z, newest context, 3 epochs,
    # lambda 0.03, CM dropout 0.5; but the augmented trajectories are the GR's own whole top-10 with
    # the user's history items in (--candidates policy --n-candidates 10 --candidates-history
    # --sampler random --K 10) and beta 4: valid NDCG@10 0.0302 +- 0.0005 over seeds 42-44 against
    # 0.0279 for Beauty's setting (the CM's top-50 less the history, K 3, beta 0.5) and 0.0293 for
    # IPA, ahead of both on every seed; on seed 42 beta 0.5 / 1 / 2 / 4 gave 0.0286 / 0.0291 /
    # 0.0304 / 0.0306 (BENCHMARKS.md, 2026-12-06 (sixth)). No --cm-filter-seen: Yelp's repeats are
    # items of the history, and the CM's view of them is what fine-tuning carries into the GR.
    "yelp": {"train.epochs": 40, "train.patience": 6, "train.eval_users": 10000, "cm.lr": 2e-3,
             "model.copy_bonus": True, "train.eval_from": 20, "cm.dropout": 0.5,
             "ft.reward": "rc", "ft.reward_beta": 4.0, "ft.sft_prior": True, "cm.score": "softmax",
             "sampler.candidates": "policy", "sampler.n_candidates": 10, "sampler.candidates_history": True,
             "sampler.sampler": "random", "sampler.K": 10,
             "ft.log_z": "vargrad", "ft.ft_last": 1, "ft.ft_epochs": 3, "ft.lam": 0.03},
}
# Per-method overrides of a data set's preset: settings that several methods read (--ft-lr, the
# sampler's pool) but one method is best at otherwise, and that method's own settings where they
# hold for it alone. Order: defaults <- PRESETS <- METHOD_PRESETS <- flags; `with_method` moves a
# config from one method to another (--method all, the studies).
METHOD_PRESETS = {
    # Beauty's GFlowGR-TB: the GFlowNet term on the context the next recommendation is made from
    # (the user's whole training sequence; --gfn-context next), over the GR's whole top-50 with
    # --target-weight, lambda 1, ft-lr 1e-3. Valid NDCG@10 0.0524 +- 0.0017 over seeds 42/43/44
    # against 0.0485 +- 0.0020 for the same-context setting above (which GFlowGR-DB keeps) and 0.0482
    # for SFT-continued; on seed 42 the defaults' top-10 pool at this context gave 0.0459-0.0470,
    # K 20 of the 50 0.0476, no target weight 0.0452, ft-lr 3e-4 0.0491 (BENCHMARKS.md, 2026-12-07,
    # eleventh). Its own --ft-lr and pool: SFT-continued is worse at 1e-3 (0.0454 against 0.0474),
    # and DPO / S-DPO keep the top-10 pool they were measured with. ~5x the fine-tuning time of the
    # same-context setting (K 50 trajectories per context instead of 10).
    # Eq. (7), not Eq. (8) (--no-weight): Eq. (8)'s 1 / (r_a - r_c)^2 weighs the disagreement of the
    # observed item's label with the CM; the next context has no observed item (r_a = 0), so it became
    # 1 / r_c^2, largest (11x) for the items the CM ranks lowest, against the target's share.
    # Valid NDCG@10 0.0528 +- 0.0015 over seeds 42/43/44 against 0.0524 +- 0.0017 with Eq. (8): a tie
    # within the spread, taken by the rule set before the runs (BENCHMARKS.md, 2026-12-07, thirteenth).
    # The test's own model (--refit-test): the fit is bound to the context it is made on. The same
    # term one item before validation's context (--gfn-context own, as the default's fit is one item
    # before the test's) had valid NDCG@10 0.0467 on seed 42, SFT-continued's level (0.0465),
    # against 0.0518; with cross-fitted CMs (which remember neither context) 0.0470 against 0.0499.
    # Refitted, test HR@10 / NDCG@10 0.0750 / 0.0410 over seeds 42/43/44 against 0.0707 / 0.0377
    # (BENCHMARKS.md, 2026-12-07, fourteenth).
    # The test refit continues the validation model for 2 epochs (--refit-epochs 2) instead of 3 from
    # SFT: validation's analog (the model fitted one item earlier, continued 2 epochs on the next
    # context, the SFT prior kept) had valid NDCG@10 0.0517, the default's own (seed 42; BENCHMARKS.md,
    # 2026-12-07, sixteenth). One fine-tuning epoch of six less. --refit-epochs 0: the cold refit.
    # The next context's pool may hold v, that context's newest item, like the rest of its history
    # (until the seventeenth session v was redrawn as if it were the label: valid NDCG@10 paired
    # +0.0001 +- 0.0005 over seeds 42/43/44, test 0.0753 / 0.0415 against 0.0754 / 0.0414; a tie).
    "beauty": {"gflowgr-tb": {"ft.gfn_context": "next", "sampler.n_candidates": 50, "sampler.K": 50,
                              "ft.target_weight": True, "ft.weight": False, "ft.lam": 1.0, "ft.ft_lr": 1e-3,
                              "ft.refit_test": True, "ft.refit_epochs": 2}},
}


def method_preset(dataset: str, method: str) -> dict:
    """The METHOD_PRESETS entry of (dataset, method); {} where the data set's preset holds."""
    return METHOD_PRESETS.get(dataset, {}).get(method, {})


def preset_config(dataset: str, method: str) -> Config:
    """The Config that method gets on dataset when no flag is given: defaults <- PRESETS <- METHOD_PRESETS."""
    cfg = Config()
    for dotted, value in {**PRESETS.get(dataset, {}), **method_preset(dataset, method)}.items():
        set_field(cfg, dotted, value)
    return cfg


def method_defaults(dataset: str, method: str) -> dict:
    """For every setting some method preset of dataset sets: the value method gets when no flag is given.

    >>> method_defaults("beauty", "sft-continued")["ft.ft_lr"], method_defaults("beauty", "gflowgr-tb")["ft.ft_lr"]
    (0.0003, 0.001)
    """
    base = preset_config(dataset, method)
    return {k: get_field(base, k) for preset in METHOD_PRESETS.get(dataset, {}).values() for k in preset}


def with_method(cfg: Config, method: str) -> Config:
    """A copy of cfg for another method: each setting a method preset sets moves from the old
    method's default to the new one's, unless it was changed (a flag). A flag that gives exactly
    the old method's default cannot be told apart from no flag, and moves too.

    >>> c = with_method(parse_config(["--dataset", "beauty"]), "sft-continued")
    >>> c.train.method, c.ft.ft_lr, c.sampler.K
    ('sft-continued', 0.0003, 10)
    """
    out = copy.deepcopy(cfg)
    old, new = method_defaults(cfg.data.dataset, cfg.train.method), method_defaults(cfg.data.dataset, method)
    for dotted, value in new.items():
        if get_field(out, dotted) == old[dotted]:
            set_field(out, dotted, value)
    if new.get("ft.refit_test"):  # the new method's preset refit goes where its context does (parse_config)
        out.ft.refit_test = out.ft.gfn_context == "next" and out.ft.ft_last == 1
    if not out.ft.refit_test:  # no refit, no warm refit
        out.ft.refit_epochs = 0
    out.train.method = method
    return out


# TrainConfig fields that do not change the SFT model, so are left out of its cache key
NOT_SFT_SETTINGS = ("method", "backbone", "seeds", "device", "out", "eval_batch", "threads", "study", "diversity_users",
                    "tag", "regime_epochs", "filter_seen")
# ... and those that do not change a run's result, so a finished run is reused whatever they are
NOT_RUN_SETTINGS = ("seeds", "study", "diversity_users", "threads", "eval_batch", "out", "regime_epochs")
# TrainConfig fields added after caches and runs were written: they count in a key only where
# they differ from this value (their default, the old behaviour), so those caches keep their keys
KEYED_UNLESS = {"eval_from": 1, "bf16": False, "filter_seen": False}


def train_settings(t: TrainConfig, leave_out) -> dict:
    """t's fields for a cache key or a run's identity, less leave_out and KEYED_UNLESS defaults."""
    return {k: v for k, v in asdict(t).items() if k not in leave_out and KEYED_UNLESS.get(k, object()) != v}
DERIVED = {"model.max_his_len", "cm.seed"}  # filled from data.max_his_len / train.seed after parsing
FLAG_PREFIX = {"cm": "cm-"}  # SASRec's fields share names with the GR's (epochs, lr, ...)


# ----------------------------------------------------------------------------------------
# Config <-> command line
# ----------------------------------------------------------------------------------------


def _fields(cfg: Config):
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        for f in dataclasses.fields(sub):
            if f"{group.name}.{f.name}" not in DERIVED:
                yield group.name, f, sub


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GFlowGR reference implementation: train and evaluate a generative recommender.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group, f, sub in _fields(Config()):
        flag = f.metadata.get("flag") or "--" + FLAG_PREFIX.get(group, "") + f.name.replace("_", "-")
        kind = type(getattr(sub, f.name))
        kw = {"dest": f"{group}.{f.name}", "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.metadata.get("nargs"):
            p.add_argument(flag, nargs=f.metadata["nargs"], type=int, **kw)
        elif f.name == "data_dir":
            p.add_argument(flag, type=str, **kw)
        else:
            p.add_argument(flag, type=kind, **kw)
    return p


def set_field(cfg: Config, dotted: str, value) -> None:
    group, name = dotted.split(".")
    setattr(getattr(cfg, group), name, value)


def get_field(cfg: Config, dotted: str):
    group, name = dotted.split(".")
    return getattr(getattr(cfg, group), name)


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults <- dataset preset <- the method's preset on that data set <- explicit flags, then derived fields."""
    given = vars(build_parser().parse_args(argv))
    cfg = Config()
    dataset = given.get("data.dataset", cfg.data.dataset)
    if dataset not in PRESETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(PRESETS)}")
    method = given.get("train.method", PRESETS[dataset].get("train.method", cfg.train.method))
    for dotted, value in {**PRESETS[dataset], **method_preset(dataset, method), **given}.items():
        set_field(cfg, dotted, value)
    if "ft.refit_test" not in given:  # a preset's test refit goes where its context does (--gfn-context same: none)
        cfg.ft.refit_test = cfg.ft.refit_test and cfg.ft.gfn_context == "next" and cfg.ft.ft_last == 1
    if "ft.refit_epochs" not in given and not cfg.ft.refit_test:  # and a preset's warm refit with it
        cfg.ft.refit_epochs = 0
    return finalize(cfg)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its asdict() form (a run's config.json). Keys this version does
    not know are ignored and missing ones keep their defaults, so older runs still load."""
    cfg = Config()
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        known = {f.name for f in dataclasses.fields(sub)}
        for name, value in (d.get(group.name) or {}).items():
            if name in known:
                setattr(sub, name, value)
    if "cm" in d and "loss" not in d["cm"]:
        cfg.cm.loss = "bce"  # runs from before --cm-loss trained their CM with SASRec's BCE
    if "ft" in d and "prefix_tree" not in d["ft"]:
        cfg.ft.prefix_tree = False  # runs from before --prefix-tree decoded every trajectory's prefixes apart
    return cfg


def finalize(cfg: Config) -> Config:
    """Fill derived fields and reject settings that cannot work, with a message saying why."""
    cfg.model.max_his_len = cfg.data.max_his_len
    cfg.cm.seed = cfg.train.seed
    t, ft, sp = cfg.train, cfg.ft, cfg.sampler
    if cfg.data.dataset not in PRESETS:
        raise DataError(f"unknown dataset {cfg.data.dataset!r}: choose one of {', '.join(PRESETS)}")
    if t.method not in (*METHODS, "all"):
        raise DataError(f"unknown method {t.method!r}: choose one of {', '.join(METHODS)}, all")
    if t.backbone not in BACKBONES:
        raise DataError(f"unknown backbone {t.backbone!r}: choose one of {', '.join(BACKBONES)}")
    if t.backbone == "letter":
        cfg.tok.id_method = "letter"  # the LETTER tokenizer: RQ-VAE + collaborative and diversity regularisers
    elif cfg.tok.id_method == "letter":
        raise DataError("--id-method letter is the LETTER backbone: use --backbone letter")
    if cfg.tok.dedup not in DEDUP_ORDERS:
        raise DataError(f"--dedup must be one of {', '.join(DEDUP_ORDERS)} (got {cfg.tok.dedup!r})")
    if t.study and t.study not in STUDIES:
        raise DataError(f"unknown study {t.study!r}: choose one of {', '.join(STUDIES)}")
    if t.tag and not all(ch.isalnum() or ch == "-" for ch in t.tag):
        raise DataError(f"--tag may hold letters, digits and '-' only (got {t.tag!r}): it becomes part of a folder name")
    if t.regime_epochs < 1:
        raise DataError(f"--regime-epochs must be >= 1 (got {t.regime_epochs})")
    if t.eval_from < 1:
        raise DataError(f"--eval-from must be >= 1 (got {t.eval_from})")
    if t.diversity_users < 0:
        raise DataError(f"--diversity-users must be >= 0 (got {t.diversity_users})")
    if t.method == "all" and not t.seeds:
        t.seeds = [t.seed]
    if t.beam < t.topk:
        raise DataError(f"--beam ({t.beam}) must be at least --topk ({t.topk})")
    if t.topk < 10:
        raise DataError("--topk must be at least 10 to report HR@10 and NDCG@10")
    if ft.lam < 0:
        raise DataError(f"--lambda must be >= 0 (got {ft.lam})")
    if cfg.cm.crossfit < 0 or cfg.cm.crossfit == 1:
        raise DataError(f"--cm-crossfit must be 0 (off) or a number of folds >= 2 (got {cfg.cm.crossfit})")
    if cfg.cm.crossfit and ft.oracle_reward:
        raise DataError("--cm-crossfit and --oracle-reward both replace the CM's r_c: use one of them")
    if ft.ft_last < 0:
        raise DataError(f"--ft-last must be >= 0 (got {ft.ft_last}): 0 fine-tunes on every training context")
    if sp.K < 0:
        raise DataError(f"--K must be >= 0 (got {sp.K})")
    if sp.aug_history < 0:
        raise DataError(f"--aug-history must be >= 0 (got {sp.aug_history})")
    if sp.sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sp.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sp.candidates not in CANDIDATES:
        raise DataError(f"unknown --candidates {sp.candidates!r}: choose one of {', '.join(CANDIDATES)}")
    if sp.candidates == "prior" and t.method in ("dpo", "sdpo", "all"):
        raise DataError(f"--candidates prior is GFlowGR's pool (the frozen SFT model's top-N, searched once per context); "
                        f"--method {t.method} draws from the sampler without it: use --candidates policy")
    if not 0 < ft.reward_floor < 1:
        raise DataError(f"--reward-floor must be in (0, 1) (got {ft.reward_floor}): log R needs R > 0")
    if not 0 <= ft.history_floor < 1:
        raise DataError(f"--history-floor must be in [0, 1) (got {ft.history_floor}): 0 turns it off, else log R needs R > 0")
    if ft.reward_beta <= 0:
        raise DataError(f"--reward-beta must be > 0 (got {ft.reward_beta})")
    if sp.sampler != "none" and sp.K > sp.n_candidates:
        raise DataError(f"--K ({sp.K}) cannot exceed the candidate pool --n-candidates ({sp.n_candidates})")
    terms = [x for x in ft.reward.split(",") if x]
    if not terms or set(terms) - set(REWARD_TERMS):
        raise DataError(f"--reward must be a comma-separated subset of {','.join(REWARD_TERMS)} (got {ft.reward!r})")
    if ft.oracle_reward and cfg.data.dataset != "toy":
        raise DataError(f"--oracle-reward reads the toy world's true taste clusters: use --dataset toy "
                        f"({cfg.data.dataset} records only what users were exposed to)")
    if ft.oracle_reward and (t.method not in OBJECTIVE or t.study):
        raise DataError(f"--oracle-reward replaces GFlowGR's reward in one run: use it with --method gflowgr-tb or "
                        f"gflowgr-db and no --study (got --method {t.method}{' --study ' + t.study if t.study else ''}; "
                        f"--study exposure has its own oracle row)")
    if ft.log_z not in LOG_Z_FORMS:
        raise DataError(f"--log-z must be one of {', '.join(LOG_Z_FORMS)} (got {ft.log_z!r})")
    if ft.log_z == "vargrad" and (sp.K == 0 or sp.sampler == "none") and t.method == "gflowgr-tb":
        raise DataError("--log-z vargrad estimates log Z from each sample's 1 + K trajectories: it needs --K >= 1 "
                        "and a sampler (with K = 0 the TB residual is 0 by construction)")
    if ft.gfn_context not in GFN_CONTEXTS:
        raise DataError(f"--gfn-context must be {' or '.join(GFN_CONTEXTS)} (got {ft.gfn_context!r})")
    if ft.gfn_context in ("next", "own") and set(terms) != {"rc"}:
        raise DataError(f"--gfn-context {ft.gfn_context} trains the GFlowNet on a context with no observed item, where r_a and "
                        f"r_sim (which compare with that item) do not exist: use it with --reward rc, or --gfn-context same for "
                        f"the paper's step on the observed item's context (got --reward {ft.reward!r})")
    if ft.refit_test and (t.method not in OBJECTIVE or ft.gfn_context != "next" or ft.ft_last != 1):
        raise DataError("--refit-test fine-tunes GFlowGR a second time with the GFlowNet term on each user's test context "
                        "(the newest training sample's next context plus the validation item): use it with --method "
                        f"gflowgr-tb or gflowgr-db, --gfn-context next and --ft-last 1 (got --method {t.method}, "
                        f"--gfn-context {ft.gfn_context}, --ft-last {ft.ft_last})")
    if ft.refit_epochs < 0 or (ft.refit_epochs and not ft.refit_test):
        raise DataError(f"--refit-epochs N continues the validation model N epochs on the test contexts: a number >= 1 with "
                        f"--refit-test on, or 0 (got --refit-epochs {ft.refit_epochs}, --refit-test {'on' if ft.refit_test else 'off'})")
    if ft.init_from:
        if t.method == "sft" or ft.refit_test:
            raise DataError("--init-from starts one fine-tuning from another run's model: use it with a fine-tuning --method "
                            "and --no-refit-test (the test refit starts from the SFT checkpoint or the validation model)")
        if not (Path(ft.init_from) / "checkpoint.pt").exists():
            raise DataError(f"--init-from {ft.init_from}: no checkpoint.pt there; give the folder of a finished fine-tuning run "
                            f"(runs/<dataset>__<method>...__seed<N>)")
    if ft.gfn_kd and (t.method != "gflowgr-tb" or ft.log_z != "vargrad"):
        raise DataError("--gfn-kd is a control of GFlowGR-TB with the closed-form log Z (whose optimum it shares): "
                        f"use it with --method gflowgr-tb --log-z vargrad (got --method {t.method} --log-z {ft.log_z})")
    if not 0 <= ft.policy_mix <= 1 or (ft.policy_mix > 0 and not ft.target_weight):
        raise DataError(f"--policy-mix is the policy's share in --target-weight's draw: a number in [0, 1], with "
                        f"--target-weight on (got --policy-mix {ft.policy_mix:g}, --target-weight {'on' if ft.target_weight else 'off'})")
    if ft.log_flow not in LOG_FLOW_FORMS:
        raise DataError(f"--log-flow must be {' or '.join(LOG_FLOW_FORMS)} (got {ft.log_flow!r})")
    if cfg.cm.loss not in collab.CM_LOSSES:
        raise DataError(f"--cm-loss must be one of {', '.join(collab.CM_LOSSES)} (got {cfg.cm.loss!r})")
    if cfg.cm.score not in collab.CM_SCORES:
        raise DataError(f"--cm-score must be one of {', '.join(collab.CM_SCORES)} (got {cfg.cm.score!r})")
    if cfg.cm.negatives < 1:
        raise DataError(f"--cm-negatives must be >= 1 (got {cfg.cm.negatives})")
    return cfg


def apply_preset(cfg: Config) -> Config:
    """For in-process callers: start from the dataset's (and the method's) preset, keeping fields already changed from the defaults."""
    base, out = Config(), copy.deepcopy(cfg)
    preset = {**PRESETS.get(cfg.data.dataset, {}), **method_preset(cfg.data.dataset, cfg.train.method)}
    for dotted, value in preset.items():
        if get_field(cfg, dotted) == get_field(base, dotted):
            set_field(out, dotted, value)
    return finalize(out)


def variant(cfg: Config) -> str:
    """'' for the full model, else the study settings that differ from the defaults, '+'-joined.

    The defaults are the dataset's preset and the method's (METHOD_PRESETS): `train.py --dataset
    beauty` names its GFlowGR run beauty__gflowgr-tb__seed42 (Beauty's reward is r_c, its context
    the next one), the name Table 1 reads. A setting without a value in its name (target-weight)
    that a preset turned on is named "<name>-off" where it is off.

    >>> variant(parse_config(["--dataset", "beauty", "--K", "3", "--lambda", "10", "--ft-lr", "3e-3"]))
    'K3+lambda10+ftlr0.003'
    """
    tag = [cfg.train.tag] if cfg.train.tag else []
    if cfg.train.filter_seen:
        tag = [RANKING_VARIANT, *tag]
    fields = (*VARIANT_FIELDS, *FINETUNE_VARIANT_FIELDS) if cfg.train.method in OBJECTIVE else \
        FINETUNE_VARIANT_FIELDS if cfg.train.method in FINETUNE_TABLE else ()
    base, default, parts = preset_config(cfg.data.dataset, cfg.train.method), Config(), []
    # the preset's test refit holds only where it applies (parse_config): elsewhere no refit is the default
    base.ft.refit_test = base.ft.refit_test and cfg.ft.gfn_context == "next" and cfg.ft.ft_last == 1
    base.ft.refit_epochs = base.ft.refit_epochs if cfg.ft.refit_test else 0  # (and its warm refit where a refit runs)
    for dotted, fmt in fields:
        value = get_field(cfg, dotted)
        if value != get_field(base, dotted):
            shown = "on" if value is True else "off" if value is False else f"{value:g}" if isinstance(value, float) else str(value)
            if dotted == "ft.init_from":  # a folder: its name's digest keeps the run's name short
                shown = hashlib.sha1(Path(value).name.encode()).hexdigest()[:8]
            if dotted == "ft.refit_epochs" and value == 0:  # a refit from SFT where the preset's continues
                parts.append("refit-cold")
                continue
            named = fmt if "{}" in fmt or value != get_field(default, dotted) else fmt + "-off"  # back at the dataclass default
            parts.append(named.format(shown.replace(",", "-")))
    return "+".join(parts + tag)


def run_dir(cfg: Config) -> Path:
    """The folder of the run cfg describes: runs/<dataset>__[<backbone>__]<method>[+<variant>]__seed<N>."""
    t = cfg.train
    return Path(t.out) / results.run_name(cfg.data.dataset, t.backbone, t.method, t.seed, variant(cfg))


def finished(cfg: Config) -> bool:
    """Whether the run of cfg has finished earlier with this very configuration: its metrics.json
    exists, its config.json equals cfg (fields added since it ran count as their defaults) and it
    ran on as many processes (torchrun) as this one."""
    done = finished_config(run_dir(cfg))
    if done is None:
        return False
    try:
        world = json.loads((run_dir(cfg) / "metrics.json").read_text()).get("world_size", 1)
    except json.JSONDecodeError:
        return False
    return run_identity(done) == run_identity(cfg) and world == distributed.world()


def finished_config(d: Path) -> Config | None:
    """The config of the finished run in folder d (its config.json, next to a metrics.json); None if none."""
    if not (d / "metrics.json").exists() or not (d / "config.json").exists():
        return None
    try:
        return config_from_dict(json.loads((d / "config.json").read_text()))
    except json.JSONDecodeError:
        return None


def identity_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The settings where two run identities differ, as 'group.field: old -> new'.

    >>> identity_changes({"ft": {"ft_lr": 3e-4, "lam": 1}}, {"ft": {"ft_lr": 1e-3, "lam": 1}})
    ['ft.ft_lr: 0.0003 -> 0.001']
    """
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def replaced_run(cfg: Config) -> list[str]:
    """If run_dir(cfg) holds a finished run of another configuration (which this run will replace),
    the settings that differ; [] otherwise. Settings without a name in the folder (VARIANT_FIELDS)
    share the default run's folder: --tag keeps both."""
    done = finished_config(run_dir(cfg))
    return [] if done is None else identity_changes(run_identity(done), run_identity(cfg))


def run_identity(cfg: Config) -> dict:
    """What makes a run's result: its config (and, under torchrun, the number of processes:
    distributed.key), not who asked for it or how fast it ran."""
    identity = {**asdict(cfg), "train": train_settings(cfg.train, NOT_RUN_SETTINGS)}
    # Settings a method never reads do not make its result: SFT, PPO, GRPO, SPRec, IPA and
    # SFT-continued draw nothing from GFlowGR's sampler, and only GFlowGR raises its reward to beta,
    # weighs a GFlowNet loss by lambda and decodes a prefix tree, so a change of those settings (a
    # preset's, say) leaves those runs finished.
    method = cfg.train.method
    if method == "sft" or (method in FINETUNE_TABLE and not FINETUNE_TABLE[method].needs_sampler(method)):
        del identity["sampler"]
    if method not in OBJECTIVE:
        del identity["ft"]["reward_beta"], identity["ft"]["lam"], identity["ft"]["prefix_tree"]
    for part in distributed.key():  # [] for one process: its identity is unchanged
        identity.update(part)
    return json.loads(json.dumps(identity))
