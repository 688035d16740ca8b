"""Command line for the whole pipeline: data -> semantic IDs -> SFT -> beam search -> metrics.

Paper Sec. 4 (experimental setup): leave-one-out split, TIGER-style GR backbone trained
with L_GR (Eq. 1), exact trie-constrained beam search, HR@5/10 and NDCG@5/10 on the test
users, next to a MostPop reference computed by the same evaluation code.

Every expensive stage is cached under `runs/<dataset>/<stage>-<key>/`, keyed by a hash of
the config that produced it, so a second run skips it and says so. Each run writes
`runs/<dataset>__<method>__seed<seed>/` with config.json, metrics.json, metrics.jsonl and
checkpoint.pt ({model, model_args, step, config}).

Usage: `python train.py --dataset toy --method sft`   (or `main(Config(...))` in Python)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import cache
import collab
import results
from baselines import BASELINES, Baseline, BaselineConfig
import data as data_mod
from collab import CollabConfig
from data import DataConfig, DataError, Split
from gflowgr import GFlowNetHeads, GRModel, ModelConfig
from losses import REWARD_TERMS, gflowgr_loss, gr_loss, log_reward, reward, trajectory_weight, vargrad_log_z
from metrics import ranking_metrics
from sampler import CANDIDATES, SAMPLERS, SamplerConfig, TrajectorySampler
from tokenizer import TokenizerConfig, Trie, build_semantic_ids, embed_texts

METHODS = ("sft", "sft-continued", "gflowgr-tb", "gflowgr-db", *BASELINES)
OBJECTIVE = {"gflowgr-tb": "tb", "gflowgr-db": "db"}  # the GFlowNet objective of each GFlowGR method
FINETUNE_METHODS = METHODS[1:]
# --method all: Table 1's rows (SFT, the six baselines, GFlowGR-DB/TB) plus the SFT-continued reference
TABLE_BASELINES, TABLE_GFLOWGR = results.BASELINES, results.GFLOWGR  # in the paper's row order
TABLE_METHODS = (*TABLE_BASELINES, *TABLE_GFLOWGR, "sft-continued")
BACKBONES = ("tiger", "letter")
LOG_Z_FORMS = ("user", "scalar", "vargrad")  # gflowgr.GFlowNetHeads; vargrad: losses.vargrad_log_z
STUDIES = ("ablation", "k", "lambda", "diversity", "exposure", "fusion", "paper-regime")  # experiments.py
# The settings the studies vary (Table 2, Fig. 3). A GFlowGR run whose config differs from
# the default in any of them is a variant: its folder name says how (see `variant`), so an
# ablation never overwrites the full model and identical configs share one run.
VARIANT_FIELDS = (("ft.reward", "reward-{}"), ("sampler.sampler", "sampler-{}"), ("sampler.K", "K{}"),
                  ("ft.weight", "no-weight"), ("ft.lam", "lambda{}"))


@dataclass
class TrainConfig:
    method: str = field(default="sft", metadata={"help": f"training method: {' | '.join(METHODS)} | all (every Table 1 row)"})
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
    beam: int = field(default=20, metadata={"help": "beam width of the constrained beam search"})
    topk: int = field(default=10, metadata={"help": "length of the recommendation list"})
    eval_batch: int = field(default=512, metadata={"help": "users per beam-search batch"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})
    study: str = field(default="", metadata={"help": "run an analysis study instead of one run: ablation | k | lambda | diversity | exposure | fusion | paper-regime (experiments.py, writes results/<dataset>_<study>.*)"})
    tag: str = field(default="", metadata={"help": "a name appended to the run folder (<method>+<tag>), to keep a study's runs apart"})
    regime_epochs: int = field(default=3, metadata={"help": "paper-regime study: SFT epochs of the under-trained starting point (chosen on validation)"})
    diversity_users: int = field(default=200, metadata={"help": "diversity study: test users whose whole item distribution P(v|U) is computed (~1 s each on a CPU for Beauty; 0 = all)"})


@dataclass
class FinetuneConfig:
    ft_epochs: int = field(default=2, metadata={"help": "fine-tuning epochs (every fine-tuning method: same budget)"})
    ft_lr: float = field(default=3e-4, metadata={"help": "fine-tuning learning rate of the backbone"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the log Z / log F heads (larger, as GFlowNets use)"})
    head_warmup: int = field(default=200, metadata={"help": "first steps train only the log Z / log F heads (backbone frozen)"})
    lam: float = field(default=1.0, metadata={"help": "lambda of Eq. (7)/(8): weight of the GFlowNet loss", "flag": "--lambda"})
    reward: str = field(default="ra,rc,rsim", metadata={"help": "reward terms, any subset of ra,rc,rsim (Sec. 3.2)"})
    weight: bool = field(default=True, metadata={"help": "Eq. (8) weighting 1/(r_a - r_c)^2 (--no-weight: Eq. 7)"})
    log_z: str = field(default="user", metadata={"help": "log Z form: user (log Z(U) head) | scalar (the paper's global Z) | vargrad (closed form from each sample's 1 + K trajectories)"})
    log_flow: str = field(default="prefix", metadata={"help": "DB's log F(s_l): head (an MLP on the prefix state) | prefix (the MLP plus the policy's own log-probability of reaching s_l, detached: starts near balance)"})
    reward_beta: float = field(default=3.0, metadata={"help": "reward exponent beta: GFlowNet targets R^beta (paper: 1; 3 was best on Beauty valid)"})
    sft_prior: bool = field(default=False, metadata={"help": "reward times the frozen SFT likelihood: target P_SFT(v|U) R^beta / Z(U)"})
    rsim_dedup: bool = field(default=False, metadata={"help": "count the dedup (collision) token in r_sim too (default: semantic levels only)"})
    inspect_users: int = field(default=40, metadata={"help": "test users whose trajectories go into inspect.json"})


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
    "beauty": {"train.epochs": 20, "train.eval_users": 5000, "cm.lr": 2e-3, "train.regime_epochs": 4},
    # Yelp's validation curve is flatter and noisier than Beauty's: with patience 3 on 5,000
    # users, seeds 43/44 stopped at epochs 6/9 (test HR@10 0.015/0.018) while seed 42 was still
    # improving at epoch 20 (0.027); BENCHMARKS.md, Table 1 on Yelp.
    "yelp": {"train.epochs": 40, "train.patience": 6, "train.eval_users": 10000, "cm.lr": 2e-3},
}
# TrainConfig fields that do not change the SFT model, so are left out of its cache key
NOT_SFT_SETTINGS = ("method", "backbone", "seeds", "device", "out", "eval_batch", "threads", "study", "diversity_users",
                    "tag", "regime_epochs")
# ... and those that do not change a run's result, so a finished run is reused whatever they are
NOT_RUN_SETTINGS = ("seeds", "study", "diversity_users", "threads", "eval_batch", "out", "regime_epochs")
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


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults <- dataset preset <- explicit flags, then derived fields."""
    given = vars(build_parser().parse_args(argv))
    cfg = Config()
    dataset = given.get("data.dataset", cfg.data.dataset)
    if dataset not in PRESETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(PRESETS)}")
    for dotted, value in {**PRESETS[dataset], **given}.items():
        set_field(cfg, dotted, value)
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
    if t.study and t.study not in STUDIES:
        raise DataError(f"unknown study {t.study!r}: choose one of {', '.join(STUDIES)}")
    if t.tag and not all(ch.isalnum() or ch == "-" for ch in t.tag):
        raise DataError(f"--tag may hold letters, digits and '-' only (got {t.tag!r}): it becomes part of a folder name")
    if t.regime_epochs < 1:
        raise DataError(f"--regime-epochs must be >= 1 (got {t.regime_epochs})")
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
    if sp.K < 0:
        raise DataError(f"--K must be >= 0 (got {sp.K})")
    if sp.sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sp.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sp.candidates not in CANDIDATES:
        raise DataError(f"unknown --candidates {sp.candidates!r}: choose one of {', '.join(CANDIDATES)}")
    if ft.reward_beta <= 0:
        raise DataError(f"--reward-beta must be > 0 (got {ft.reward_beta})")
    if sp.sampler != "none" and sp.K > sp.n_candidates:
        raise DataError(f"--K ({sp.K}) cannot exceed the candidate pool --n-candidates ({sp.n_candidates})")
    terms = [x for x in ft.reward.split(",") if x]
    if not terms or set(terms) - set(REWARD_TERMS):
        raise DataError(f"--reward must be a comma-separated subset of {','.join(REWARD_TERMS)} (got {ft.reward!r})")
    if ft.log_z not in LOG_Z_FORMS:
        raise DataError(f"--log-z must be one of {', '.join(LOG_Z_FORMS)} (got {ft.log_z!r})")
    if ft.log_z == "vargrad" and (sp.K == 0 or sp.sampler == "none") and t.method == "gflowgr-tb":
        raise DataError("--log-z vargrad estimates log Z from each sample's 1 + K trajectories: it needs --K >= 1 "
                        "and a sampler (with K = 0 the TB residual is 0 by construction)")
    if ft.log_flow not in ("head", "prefix"):
        raise DataError(f"--log-flow must be head or prefix (got {ft.log_flow!r})")
    if cfg.cm.loss not in collab.CM_LOSSES:
        raise DataError(f"--cm-loss must be one of {', '.join(collab.CM_LOSSES)} (got {cfg.cm.loss!r})")
    if cfg.cm.score not in collab.CM_SCORES:
        raise DataError(f"--cm-score must be one of {', '.join(collab.CM_SCORES)} (got {cfg.cm.score!r})")
    if cfg.cm.negatives < 1:
        raise DataError(f"--cm-negatives must be >= 1 (got {cfg.cm.negatives})")
    return cfg


def apply_preset(cfg: Config) -> Config:
    """For in-process callers: start from the dataset preset, keeping fields already changed from the defaults."""
    base, out = Config(), copy.deepcopy(cfg)
    for dotted, value in PRESETS.get(cfg.data.dataset, {}).items():
        group, name = dotted.split(".")
        if getattr(getattr(cfg, group), name) == getattr(getattr(base, group), name):
            set_field(out, dotted, value)
    return finalize(out)


def variant(cfg: Config) -> str:
    """'' for the full model, else the study settings that differ from the defaults, '+'-joined.

    >>> c = Config(); c.train.method, c.sampler.K, c.ft.lam = "gflowgr-tb", 0, 10.0; variant(c)
    'K0+lambda10'
    """
    tag = [cfg.train.tag] if cfg.train.tag else []
    if cfg.train.method not in OBJECTIVE:
        return "+".join(tag)
    base, parts = Config(), []
    for dotted, fmt in VARIANT_FIELDS:
        group, name = dotted.split(".")
        value = getattr(getattr(cfg, group), name)
        if value != getattr(getattr(base, group), name):
            parts.append(fmt.format(f"{value:g}" if isinstance(value, float) else str(value).replace(",", "-")))
    return "+".join(parts + tag)


def run_dir(cfg: Config) -> Path:
    """The folder of the run cfg describes: runs/<dataset>__[<backbone>__]<method>[+<variant>]__seed<N>."""
    t = cfg.train
    return Path(t.out) / results.run_name(cfg.data.dataset, t.backbone, t.method, t.seed, variant(cfg))


def finished(cfg: Config) -> bool:
    """Whether the run of cfg has finished earlier with this very configuration: its metrics.json
    exists and its config.json equals cfg (fields added since it ran count as their defaults)."""
    d = run_dir(cfg)
    if not (d / "metrics.json").exists() or not (d / "config.json").exists():
        return False
    try:
        done = config_from_dict(json.loads((d / "config.json").read_text()))
    except json.JSONDecodeError:
        return False
    return run_identity(done) == run_identity(cfg)


def run_identity(cfg: Config) -> dict:
    """What makes a run's result: its config, not who asked for it or how fast it ran."""
    return json.loads(json.dumps({**asdict(cfg), "train": {k: v for k, v in asdict(cfg.train).items() if k not in NOT_RUN_SETTINGS}}))


def run_or_reuse(cfg: Config, log=print) -> dict:
    """main(cfg), unless that run finished earlier with the same config: then its metrics.json."""
    cfg = finalize(cfg)
    if finished(cfg):
        log(f"[done] {run_dir(cfg)} (finished earlier, reused)")
        return json.loads((run_dir(cfg) / "metrics.json").read_text())
    return main(cfg, log)


# ----------------------------------------------------------------------------------------
# Small utilities: seeding, device, hashing, atomic files
# ----------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage_key(*parts) -> str:
    """Short stable hash of the configs that determine a stage's output."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def fingerprint(obj) -> str:
    """Hash of the data itself (item texts, user sequences): two toy worlds with the same
    sizes but another seed or user count must not share a cached stage."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def atomic_write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------
# Stages 1-2: item embeddings and semantic IDs (cached)
# ----------------------------------------------------------------------------------------


def semantic_ids(ds, cfg: Config, log=print, cf_emb: torch.Tensor | None = None) -> tuple[Trie, dict, str]:
    """Item text -> embeddings -> unique semantic IDs -> trie, each stage cached on disk.

    cf_emb (n_items, d): the CM's item embeddings, used by the LETTER tokenizer (--backbone letter).
    """
    root = Path(cfg.train.out) / ds.name
    tok = cfg.tok
    emb_key = stage_key(ds.name, fingerprint(ds.texts()), tok.embedder, tok.emb_dim if tok.embedder == "tfidf" else None)
    emb_path = root / f"emb-{emb_key}" / "emb.pt"
    emb = cache.load(emb_path, "item embeddings", log)
    if emb is not None:
        log(f"[cache] item embeddings: {emb_path}")
    else:
        t0 = time.time()
        emb = embed_texts(ds.texts(), tok)
        cache.save(emb, emb_path)
        log(f"[stage] item embeddings ({tok.embedder}) {tuple(emb.shape)} in {time.time() - t0:.1f}s -> {emb_path}")
    # LETTER's fields only key LETTER IDs (so adding them kept every RQ-VAE cache valid)
    tok_key = {k: v for k, v in asdict(tok).items() if tok.id_method == "letter" or not k.startswith("letter_")}
    cf_key = [hashlib.sha256(cf_emb.numpy().tobytes()).hexdigest()[:16]] if tok.id_method == "letter" else []
    ids_key = stage_key(emb_key, tok_key, cfg.train.seed, *cf_key)
    ids_path = root / f"ids-{ids_key}" / "codes.pt"
    saved = cache.load(ids_path, "semantic IDs", log)
    if saved is not None:
        log(f"[cache] semantic IDs: {ids_path}")
        codes, report = saved["codes"], saved["report"]
    else:
        t0 = time.time()
        # the stage folder is keyed by the config, so any resume state in it is this config's
        resume_path = ids_path.parent / "resume.pt"
        codes, report = build_semantic_ids(emb, tok, seed=cfg.train.seed, log=log, cf_emb=cf_emb, resume_path=resume_path)
        report["seconds"] = time.time() - t0
        cache.save({"codes": codes, "report": report}, ids_path)
        cache.remove(resume_path)
        log(f"[stage] semantic IDs ({tok.id_method}) in {report['seconds']:.1f}s -> {ids_path}")
    log(f"        codebook usage per level {report['usage_per_level']} of {report['codebook_size']}, "
        f"collision rate before dedup {report['collision_rate']:.2%} (max {report['max_items_per_id']} items per ID)")
    t0 = time.time()
    trie = Trie.build(codes, tok.codebook_size)
    report["trie_seconds"] = time.time() - t0
    report["trie_nodes"] = trie.n_nodes
    return trie, report, ids_key


# ----------------------------------------------------------------------------------------
# Batching and evaluation
# ----------------------------------------------------------------------------------------


def to_tensors(split: Split, device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(getattr(split, k), device=device) for k in ("hist", "hist_len", "target", "user")}


def length_bucketed_batches(hist_len: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffle, sort by history length within chunks of 50 batches, shuffle the batches.

    Samples of similar length share a batch, so each batch is padded only to its own
    (short: median 4 items on Beauty) longest history.
    """
    perm = torch.randperm(len(hist_len), generator=gen)
    batches = []
    for chunk in perm.split(batch_size * 50):
        chunk = chunk[torch.argsort(hist_len[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in order]


def trim(hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
    """Cut the padding columns no row in this batch needs."""
    return hist[:, : int(hist_len.max())]


@torch.no_grad()
def recommend(model: GRModel, t: dict, cfg: TrainConfig, idx: torch.Tensor | None = None, desc: str = "eval"):
    """Beam-search top-k lists for the samples `idx` (default all): items (N, k), log-probs (N, k)."""
    model.eval()
    n = len(t["target"])
    idx = torch.arange(n) if idx is None else idx
    # sort by length so each beam-search batch is padded only to its own longest history
    order = idx[torch.argsort(t["hist_len"][idx].cpu(), stable=True)]
    items = torch.empty(len(idx), cfg.topk, dtype=torch.long)
    scores = torch.empty(len(idx), cfg.topk)
    pos = torch.empty(n, dtype=torch.long)
    pos[idx] = torch.arange(len(idx))  # where sample idx[j] goes in the output: row j
    for chunk in tqdm(order.split(cfg.eval_batch), desc=desc, leave=False):
        hl = t["hist_len"][chunk]
        it, sc = model.beam_search(trim(t["hist"][chunk], hl), hl, beam=cfg.beam, topk=cfg.topk)
        items[pos[chunk]] = it.cpu()
        scores[pos[chunk]] = sc.cpu()
    return items, scores


def evaluate(model: GRModel, t: dict, cfg: TrainConfig, idx=None, desc="eval") -> dict[str, float]:
    items, _ = recommend(model, t, cfg, idx, desc)
    target = t["target"].cpu() if idx is None else t["target"].cpu()[idx]
    return ranking_metrics(items, target)


def mostpop_metrics(ds, splits: dict[str, Split], k: int) -> dict[str, dict]:
    """MostPop: every user gets the k items most frequent in the training part, scored by the same code."""
    top = np.argsort(-data_mod.item_popularity(ds), kind="stable")[:k]
    return {name: ranking_metrics(np.tile(top, (len(splits[name]), 1)), splits[name].target) for name in ("valid", "test")}


# ----------------------------------------------------------------------------------------
# Stage 3: SFT of the GR backbone (cached)
# ----------------------------------------------------------------------------------------


class JsonlLogger:
    """Append training curves to metrics.jsonl, one JSON object per line, keys grouped by prefix."""

    def __init__(self, path: Path, resume_bytes: int | None = None):
        """resume_bytes: continue an interrupted run's file, cut back to its length at the checkpoint."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if resume_bytes is not None and path.exists():
            self.f = open(path, "r+")
            self.f.truncate(resume_bytes)
            self.f.seek(resume_bytes)
        else:
            self.f = open(path, "w")

    def log(self, **row) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


STOPPED = ("The run stopped before saving anything from this epoch (the last per-epoch state is kept); "
           "rerun with a lower learning rate (--lr for SFT, --ft-lr / --head-lr for fine-tuning), "
           "or check the rewards (--reward, --reward-beta).")


def check_finite(step: int, loss: torch.Tensor, parts: dict, grad_norm: torch.Tensor, stage: str = "") -> None:
    """Stop with a message naming the step and the offending term, before a NaN is saved."""
    if not torch.isfinite(loss):
        bad = [k for k, v in parts.items() if not torch.isfinite(torch.as_tensor(v)).all()] or ["loss"]
        raise FloatingPointError(f"non-finite {stage}loss at step {step}: {', '.join(bad)}. {STOPPED}")
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite {stage}gradient at step {step} (loss {loss.item():.4g}). {STOPPED}")


def train_sft(model: GRModel, train_t: dict, valid_t: dict, cfg: TrainConfig, logger: JsonlLogger, log=print,
              resume_path: Path | None = None, resume: dict | None = None) -> dict:
    """Minimise L_GR (Eq. 1) with AdamW, warm-up + cosine schedule, early stopping on valid NDCG@10.

    After every epoch the whole training state (model, optimiser, schedule, batch order and
    random generators, best epoch so far) is saved atomically to resume_path; `resume` (that
    state, loaded) continues from it, giving the same result as an uninterrupted run.
    """
    params_decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n and "pos" not in n]
    params_rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": cfg.weight_decay},
                             {"params": params_rest, "weight_decay": 0.0}], lr=cfg.lr)
    n_batches = math.ceil(len(train_t["target"]) / cfg.batch_size)
    total = cfg.epochs * n_batches

    def lr_at(step):  # linear warm-up, then cosine decay to 10% of the peak
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_valid = len(valid_t["target"])
    eval_idx = None
    if 0 < cfg.eval_users < n_valid:  # fixed subsample, the same for every epoch
        eval_idx = torch.randperm(n_valid, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_users]
    best = {"ndcg@10": -1.0, "epoch": -1, "state": None}
    step, bad, t_train, n_seen, start = 0, 0, 0.0, 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        gen.set_state(resume["gen"])
        cache.set_rng_state(resume["rng"])
        best, step, bad, t_train, n_seen, start = (resume[k] for k in ("best", "step", "bad", "t_train", "n_seen", "epoch"))
        log(f"[resume] SFT continues after epoch {start} of {cfg.epochs} ({resume_path})")
    epoch, stop = start - 1, False
    for epoch in range(start, cfg.epochs):
        model.train()
        t0 = time.time()
        bar = tqdm(length_bucketed_batches(train_t["hist_len"].cpu(), cfg.batch_size, gen), desc=f"sft epoch {epoch + 1}/{cfg.epochs}", leave=False)
        run_loss = None
        for b in bar:
            b = b.to(train_t["target"].device)
            hl = train_t["hist_len"][b]
            log_pf, _ = model(trim(train_t["hist"][b], hl), hl, train_t["target"][b])
            loss = gr_loss(log_pf)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            check_finite(step, loss, {"loss/gr": loss.detach()}, grad_norm, "SFT ")
            opt.step()
            sched.step()
            step += 1
            n_seen += len(b)
            run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                logger.log(step=step, epoch=epoch, **{"loss/gr": run_loss, "charts/lr": sched.get_last_lr()[0]})
        t_train += time.time() - t0
        t1 = time.time()
        val = evaluate(model, valid_t, cfg, eval_idx, desc="valid")
        t_eval = time.time() - t1
        sps = n_seen / t_train
        logger.log(step=step, epoch=epoch + 1, **{f"eval/valid_{k}": v for k, v in val.items()},
                   **{"loss/gr": run_loss, "charts/samples_per_s": sps, "charts/epoch_seconds": time.time() - t0, "charts/eval_seconds": t_eval})
        improved = val["ndcg@10"] > best["ndcg@10"]
        log(f"epoch {epoch + 1:3d}  loss {run_loss:.4f}  valid HR@10 {val['hr@10']:.4f} NDCG@10 {val['ndcg@10']:.4f}"
            f"  ({sps:.0f} samples/s, eval {t_eval:.1f}s){'  *' if improved else ''}")
        if improved:
            best = {"ndcg@10": val["ndcg@10"], "epoch": epoch + 1, "step": step, "state": copy.deepcopy(model.state_dict())}
            bad = 0
        else:
            bad += 1
            stop = bad >= cfg.patience
        if resume_path is not None and not stop and epoch + 1 < cfg.epochs:
            cache.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "rng": cache.rng_state(), "best": best, "step": step, "bad": bad,
                        "t_train": t_train, "n_seen": n_seen, "epoch": epoch + 1, "log_bytes": logger.tell(),
                        "identity": None}, resume_path)  # the stage folder's key is the identity
        if stop:
            log(f"early stop: no better valid NDCG@10 for {cfg.patience} epochs (best epoch {best['epoch']})")
            break
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "step": best["step"], "epochs_run": epoch + 1, "train_seconds": t_train,
            "samples_per_s": n_seen / max(t_train, 1e-9)}


def sft_stage(ds, splits, trie, ids_key: str, cfg: Config, device, log=print) -> tuple[GRModel, dict, Path]:
    """Train (or load the cached) SFT backbone. Returns the model, its info and the stage folder."""
    t = cfg.train
    key = stage_key(ids_key, fingerprint(ds.sequences), asdict(cfg.model),
                    {k: v for k, v in asdict(t).items() if k not in NOT_SFT_SETTINGS})
    stage = Path(t.out) / ds.name / f"sft-{key}"
    ckpt_path = stage / "checkpoint.pt"
    ckpt = cache.load(ckpt_path, "SFT checkpoint", log, map_location=device)
    if ckpt is not None:
        log(f"[cache] SFT checkpoint: {ckpt_path} (skipping training)")
        model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).to(device).eval()
        return model, ckpt["info"], stage
    (stage / "eval.json").unlink(missing_ok=True)  # the evaluation of a checkpoint that is gone
    set_seed(t.seed)
    model = GRModel(cfg.model, trie).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[stage] SFT: {n_params / 1e6:.2f}M parameters, {len(splits['train']):,} training samples, device {device}")
    # the stage folder is keyed by the config, so any resume state in it is this config's
    resume_path = stage / "resume.pt"
    resume = cache.load_resume(resume_path, None, "SFT", log)
    logger = JsonlLogger(stage / "metrics.jsonl", resume["log_bytes"] if resume else None)
    info = train_sft(model, to_tensors(splits["train"], device), to_tensors(splits["valid"], device), t, logger, log,
                     resume_path, resume)
    logger.close()
    info["n_params"] = n_params
    cache.save({"model": model.state_dict(), "model_args": model.model_args(), "step": info["step"],
                "config": asdict(cfg), "info": info}, ckpt_path)
    cache.remove(resume_path)
    return model, info, stage


# ----------------------------------------------------------------------------------------
# Stage 4: fine-tuning from the SFT checkpoint (GFlowGR, Sec. 3; SFT-continued)
# ----------------------------------------------------------------------------------------


def trajectory_rewards(model: GRModel, items: torch.Tensor, r_c: torch.Tensor, cfg: Config):
    """Sec. 3.2 reward of items (B, M) (column 0 observed) and its floored log R^beta, each (B, M).

    r_sim compares the semantic tokens t_1..t_levels only, unless --rsim-dedup: the last
    token only numbers items that collide on those, and 82% of Beauty items carry dedup
    token 0, so two unrelated items would 'share' it.
    """
    codes = model.item_codes[items]  # (B, M, L)
    if not cfg.ft.rsim_dedup:
        codes = codes[..., : cfg.tok.levels]
    rew = reward(codes, r_c, tuple(cfg.ft.reward.split(",")))
    return rew, log_reward(rew["R"], beta=cfg.ft.reward_beta)


def gflowgr_step(model, heads, cm, sampler, hist, hist_len, target, progress: float, cfg: Config, objective: str,
                 prior: GRModel | None = None):
    """One GFlowGR batch: sample tau', score rewards, compute Eq. (8). Returns loss, parts, stats, terms.

    parts: the loss terms (detached, logged); stats: log Z, log R, the mean absolute TB residual
    of the observed and of the augmented trajectories, the curriculum's CM score; terms: L_GR
    and lambda * L_GFN with their graphs (finetune measures their gradient norms from them).

    prior (--sft-prior): the frozen SFT model; log R += log P_SFT(v | U), so the balanced
    policy is the SFT distribution tilted by the reward, P_SFT(v|U) R(v)^beta / Z(U).
    """
    ft = cfg.ft
    aug, r_c_aug = sampler.sample(hist, hist_len, target, progress, model)  # (B, K), (B, K)
    r_c_obs = cm.score(hist, hist_len, target[:, None])  # (B, 1): y_CM(v, U)
    items = torch.cat([target[:, None], aug], 1)  # (B, M): column 0 is the observed trajectory tau
    r_c = torch.cat([r_c_obs, r_c_aug], 1)  # (B, M)
    log_pf, h, mem, mask = model.trajectories(hist, hist_len, items)  # (B, M, L), (B, M, L, d)
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)  # log_r: (B, M)
    if prior is not None:
        with torch.no_grad():
            log_r = log_r + prior.trajectories(hist, hist_len, items)[0].sum(-1)  # + log P_SFT(v | U)
    if objective == "tb" and ft.log_z == "vargrad":
        # closed-form log Z of each sample from its own 1 + K trajectories (losses.vargrad_log_z)
        w = trajectory_weight(rew["r_a"], r_c) if ft.weight else torch.ones_like(log_r)  # (B, M), as in Eq. (8)
        log_z = vargrad_log_z(log_pf, log_r, w)  # (B,)
    else:
        log_z = heads.log_z(mem, mask) if objective == "tb" else None  # (B,)
    log_flow = heads.log_flow(h) if objective == "db" else None  # (B, M, L)
    if log_flow is not None and ft.log_flow == "prefix":
        # log F(s_l) = head(s_l) + sum_{j<l} log P_F(t_{j+1} | s_j), the second term detached: F(s) is
        # the head times the policy's probability of reaching s, so at the start (head = a constant)
        # every DB step but the last is balanced and the last carries the TB residual
        log_flow = log_flow + (log_pf.detach().cumsum(-1) - log_pf.detach())  # (B, M, L), exclusive cumsum
    loss, parts = gflowgr_loss(log_pf, log_r, objective=objective, r_a=rew["r_a"], r_c=r_c, log_z=log_z,
                               log_flow=log_flow, lam=ft.lam, weighted=ft.weight)
    terms = {"gr": parts.pop("_l_gr"), "gfn": parts.pop("_l_gfn")}  # with their graphs, for the gradient norms
    parts["gfn/balance_offset"] = (log_r - log_pf.sum(-1)).mean().detach()  # the log Z that balances the batch on average
    # Eq. (6)'s residual log Z + sum_l log P_F - log R per trajectory (DB: telescoped, log Z = log F(s_0))
    with torch.no_grad():
        start = log_z[:, None] if log_z is not None else log_flow[..., 0]  # (B, 1) or (B, M)
        residual = (start + log_pf.sum(-1) - log_r).abs()  # (B, M)
    stats = {"gfn/log_z": (log_z if log_z is not None else log_flow[:, 0, 0]).mean().item(),
             "gfn/log_r_obs": log_r[:, 0].mean().item(),
             "gfn/log_r_aug": log_r[:, 1:].mean().item() if log_r.shape[1] > 1 else float("nan"),
             "gfn/residual_obs": residual[:, 0].mean().item(),
             "gfn/residual_aug": residual[:, 1:].mean().item() if log_r.shape[1] > 1 else float("nan"),
             "sampler/cm_score": r_c_aug.mean().item() if r_c_aug.numel() else float("nan")}
    return loss, parts, stats, terms


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


def finetune(model: GRModel, cm, train_t: dict, valid_t: dict, cfg: Config, method: str, logger: JsonlLogger, log=print,
             resume_path: Path | None = None, resume: dict | None = None):
    """Fine-tune the SFT backbone for ft_epochs; keep the epoch with the best valid NDCG@10.

    After every epoch the whole state (backbone, heads, optimiser, schedule, batch order,
    sampler and other random generators, best epoch) is saved atomically to resume_path;
    `resume` (that state, loaded, see load_resume) continues from it to the same result.

    gflowgr-tb / gflowgr-db minimise Eq. (8) (Eq. 7 with --no-weight); sft-continued
    minimises Eq. (1) alone with the same optimiser, steps and schedule, so that any gain of
    GFlowGR can be told apart from extra training.
    """
    t, ft = cfg.train, cfg.ft
    device = train_t["target"].device
    objective = OBJECTIVE.get(method)
    # the heads' initial weights and the dropout masks: the same whatever ran before in this
    # process (a study trains many runs in one), so a run's numbers depend on its config alone
    set_seed(t.seed)
    heads = GFlowNetHeads(cfg.model.d_model, ft.log_z).to(device)
    needs_sampler = objective or method in ("dpo", "sdpo")
    sampler = TrajectorySampler(cm, model.item_codes.shape[0], cfg.sampler, seed=t.seed) if needs_sampler else None
    prior = copy.deepcopy(model).eval() if objective and ft.sft_prior else None
    baseline = None
    if method in BASELINES:
        def propose(m, n):  # the model's own top-n items for every training sample (SPRec, IPA)
            items = recommend(m, train_t, dataclasses.replace(t, beam=max(t.beam, n), topk=n), desc=f"{method} proposals")[0]
            m.train()
            return items
        baseline = Baseline(method, model, copy.deepcopy(model).eval(), cm, sampler, cfg.bl, tuple(ft.reward.split(",")),
                            None if ft.rsim_dedup else cfg.tok.levels, len(train_t["target"]), propose, seed=t.seed)
        for p in baseline.parameters():
            p.data = p.data.to(device)
    extra_params = list(heads.parameters()) if baseline is None else baseline.parameters()
    # the heads (log Z / log F, or PPO's value head) get their own, larger learning rate
    groups = [{"params": model.parameters(), "lr": ft.ft_lr, "weight_decay": t.weight_decay}]
    if extra_params:
        groups.append({"params": extra_params, "lr": ft.head_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    params = [*model.parameters(), *extra_params]  # what the clipping at norm 1 sees
    # The heads start untrained: their first, huge residuals would flow into the SFT backbone
    # and undo it (on toy, valid HR@10 fell from 0.52 to 0.12 in the first epoch). So the
    # backbone waits `head_warmup` steps while log Z / log F catch up (GFlowGR methods only).
    # (a closed-form log Z has nothing to warm up: with --log-z vargrad, TB starts at once)
    warm = ft.head_warmup if objective and not (objective == "tb" and ft.log_z == "vargrad") else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: float(s >= warm), lambda s: 1.0][: len(groups)])
    gen = torch.Generator().manual_seed(t.seed + 1)
    n_batches = math.ceil(len(train_t["target"]) / t.batch_size)
    total = ft.ft_epochs * n_batches
    if warm >= total:
        raise DataError(f"--head-warmup ({warm} steps) is not shorter than the whole fine-tuning ({total} steps: "
                        f"{ft.ft_epochs} epochs of {n_batches}): lower it or raise --ft-epochs")
    eval_idx = None
    if 0 < t.eval_users < len(valid_t["target"]):
        eval_idx = torch.randperm(len(valid_t["target"]), generator=torch.Generator().manual_seed(t.seed))[: t.eval_users]
    best = {"ndcg@10": -1.0}
    step, t_train, n_seen, start = 0, 0.0, 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        heads.load_state_dict(resume["heads"])
        if baseline is not None:
            baseline.load_state(resume["baseline"])
        if sampler is not None:
            sampler.gen.set_state(resume["sampler_gen"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        gen.set_state(resume["gen"])
        cache.set_rng_state(resume["rng"])
        best, step, t_train, n_seen, start = (resume[k] for k in ("best", "step", "t_train", "n_seen", "epoch"))
        log(f"[resume] {method} continues after epoch {start} of {ft.ft_epochs} ({resume_path})")
    elif objective:  # centre the first TB / DB residuals (see GFlowNetHeads.init_offset)
        # measured without dropout: a cached SFT model arrives in train mode, a fresh one in eval
        # mode, and the offset (so the whole run) must not depend on which
        model.eval()
        with torch.no_grad():
            b = torch.randperm(len(train_t["target"]), generator=torch.Generator().manual_seed(t.seed))[: t.batch_size].to(device)
            hl = train_t["hist_len"][b]
            _, parts0, _, _ = gflowgr_step(model, heads, cm, sampler, trim(train_t["hist"][b], hl), hl, train_t["target"][b], 0.0, cfg, objective, prior)
            heads.init_offset(float(parts0["gfn/balance_offset"]))
    for epoch in range(start, ft.ft_epochs):
        if baseline is not None:
            baseline.start_epoch(epoch, train_t)
        model.train()
        heads.train()
        t0 = time.time()
        bar = tqdm(length_bucketed_batches(train_t["hist_len"].cpu(), t.batch_size, gen), desc=f"{method} epoch {epoch + 1}/{ft.ft_epochs}", leave=False)
        for b in bar:
            b = b.to(device)
            hl = train_t["hist_len"][b]
            hist, target = trim(train_t["hist"][b], hl), train_t["target"][b]
            progress = step / max(1, total - 1)
            logged = (step + 1) % 20 == 0 or step == 0  # this step's numbers go into metrics.jsonl
            for inner in range(baseline.inner_steps if baseline else 1):
                terms = {}
                if baseline is not None:
                    loss, parts = baseline.loss(b, hist, hl, target, progress, inner)
                    stats = {}
                elif objective is None:
                    log_pf, _ = model(hist, hl, target)
                    loss = gr_loss(log_pf)
                    parts, stats = {"loss/gr": loss.detach()}, {}
                else:
                    loss, parts, stats, terms = gflowgr_step(model, heads, cm, sampler, hist, hl, target, progress, cfg, objective, prior)
                grads = grad_norms(terms, params) if logged and terms else {}
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                check_finite(step, loss, parts, grad_norm)
                opt.step()
            sched.step()
            step += 1
            n_seen += len(b)
            if logged:
                # charts/clipped: 1 when clipping at norm 1 scaled this step down (grad/total > 1)
                row = {k: float(v) for k, v in parts.items()} | stats | grads | {
                    "grad/total": float(grad_norm), "charts/clipped": float(grad_norm > 1.0)}
                bar.set_postfix(loss=f"{loss.item():.3f}", **({"log_z": f"{stats['gfn/log_z']:.2f}"} if stats else {}))
                logger.log(step=step, epoch=epoch, **row)
        t_train += time.time() - t0
        val = evaluate(model, valid_t, t, eval_idx, desc="valid")
        logger.log(step=step, epoch=epoch + 1, **{f"eval/valid_{k}": v for k, v in val.items()},
                   **{"charts/samples_per_s": n_seen / t_train, "charts/epoch_seconds": time.time() - t0})
        # only epochs in which the backbone trained compete: a warm-up-only epoch is the SFT model
        improved = val["ndcg@10"] > best["ndcg@10"] and step > warm
        log(f"{method} epoch {epoch + 1}  valid HR@10 {val['hr@10']:.4f} NDCG@10 {val['ndcg@10']:.4f}"
            f"  ({n_seen / t_train:.0f} samples/s){'  *' if improved else ''}")
        if improved:
            best = {"ndcg@10": val["ndcg@10"], "epoch": epoch + 1, "step": step,
                    "state": copy.deepcopy(model.state_dict()), "heads": copy.deepcopy(heads.state_dict())}
        if resume_path is not None and epoch + 1 < ft.ft_epochs:
            cache.save({"model": model.state_dict(), "heads": heads.state_dict(),
                        "baseline": baseline.state() if baseline is not None else None,
                        "sampler_gen": sampler.gen.get_state() if sampler is not None else None,
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(), "rng": cache.rng_state(),
                        "best": best, "step": step, "t_train": t_train, "n_seen": n_seen, "epoch": epoch + 1,
                        "log_bytes": logger.tell(), "identity": run_identity(cfg)}, resume_path)
    model.load_state_dict(best["state"])
    heads.load_state_dict(best["heads"])
    info = {"best_epoch": best["epoch"], "step": best["step"], "train_seconds": t_train,
            "seconds_per_epoch": t_train / ft.ft_epochs, "samples_per_s": n_seen / max(t_train, 1e-9)}
    return heads, sampler, info


def _round(x, nd=4):
    return [round(float(v), nd) for v in x]


@torch.no_grad()
def inspect_users(sft_model: GRModel, model: GRModel, heads: GFlowNetHeads | None, cm, sampler, hist: torch.Tensor,
                  hist_len: torch.Tensor, target: torch.Tensor, cfg: Config, progress: float = 1.0) -> list[dict]:
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
        aug, r_c_aug = sampler.sample(hist, hist_len, target, progress=progress, model=model)  # (B, K)
    else:
        aug, r_c_aug = target.new_empty(len(target), 0), torch.empty(len(target), 0, device=target.device)
    items = torch.cat([target[:, None], aug], 1)  # (B, M): column 0 is the observed item
    r_c = torch.cat([cm.score(hist, hist_len, target[:, None]), r_c_aug], 1) if cm is not None \
        else torch.zeros(items.shape, device=items.device)
    log_pf, h, mem, mask = model.trajectories(hist, hist_len, items)  # (B, M, L)
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)  # Sec. 3.2: R = r_a + r_c + r_sim, log R^beta
    if cfg.ft.sft_prior:  # the target the run trained towards: P_SFT(v | U) R^beta (gflowgr_step)
        log_r = log_r + sft_model.trajectories(hist, hist_len, items)[0].sum(-1)
    # Eq. (8): w = 1 / (r_a - r_c)^2, clamped
    w = trajectory_weight(rew["r_a"], r_c)
    if heads is not None:
        heads.eval()
        log_flow = heads.log_flow(h)  # (B, M, L)
        if cfg.ft.log_flow == "prefix":  # as in gflowgr_step
            log_flow = log_flow + (log_pf.cumsum(-1) - log_pf)
        # TB with --log-z vargrad: the closed-form log Z of each user's own trajectories, as in training
        log_z = vargrad_log_z(log_pf, log_r, w if cfg.ft.weight else None) if cfg.ft.log_z == "vargrad" \
            else heads.log_z(mem, mask)  # (B,)
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


def build_inspect(sft_model: GRModel, model: GRModel, heads: GFlowNetHeads, cm, sampler, test_t: dict, cfg: Config,
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


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    cols = ["hr@5", "hr@10", "ndcg@5", "ndcg@10"]
    lines = [f"{'split':<6} {'model':<14} " + " ".join(f"{c.upper():>8}" for c in cols)]
    lines.append("-" * len(lines[0]))
    for split, name, m in rows:
        lines.append(f"{split:<6} {name:<14} " + " ".join(f"{m[c]:>8.4f}" for c in cols))
    return "\n".join(lines)


def main(cfg: Config, log=print) -> dict:
    """Run the pipeline for cfg.train.method and return the metrics dict that metrics.json holds."""
    cfg = finalize(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    timing, t_start = {}, time.time()

    t0 = time.time()
    ds = data_mod.load_dataset(cfg.data, verbose=True)
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    timing["data_s"] = time.time() - t0
    log(f"split: {len(splits['train']):,} train / {len(splits['valid']):,} valid / {len(splits['test']):,} test samples")

    cf_emb = None
    if t.backbone == "letter":  # LETTER aligns the IDs with the CM's item embeddings: CM first
        cm, _ = collab.load_or_train(ds, splits, cfg.cm, Path(t.out) / ds.name, device, log)
        cf_emb = cm.item_emb.weight[: len(ds.titles)].detach().cpu()
    t0 = time.time()
    trie, tok_report, ids_key = semantic_ids(ds, cfg, log, cf_emb)
    timing["semantic_ids_s"] = time.time() - t0

    t0 = time.time()
    model, sft_info, stage = sft_stage(ds, splits, trie, ids_key, cfg, device, log)
    timing["sft_s"] = time.time() - t0

    eval_path = stage / "eval.json"
    sft_ev = None
    if eval_path.exists():  # evaluation of a cached checkpoint is deterministic: reuse it
        try:
            sft_ev = json.loads(eval_path.read_text())
            log(f"[cache] SFT evaluation: {eval_path}")
        except json.JSONDecodeError:
            log(f"[cache] SFT evaluation {eval_path} is damaged (not JSON): evaluating again")
    if sft_ev is None:
        t0 = time.time()
        sft_ev = {name: evaluate(model, to_tensors(splits[name], device), t, desc=name) for name in ("valid", "test")}
        sft_ev["eval_seconds"] = time.time() - t0
        sft_ev["eval_users_per_s"] = (len(splits["valid"]) + len(splits["test"])) / sft_ev["eval_seconds"]
        atomic_write_json(sft_ev, eval_path)
    pop = mostpop_metrics(ds, splits, t.topk)

    out_dir = run_dir(cfg)
    result = {"sft": sft_info, "sft_eval": sft_ev, "mostpop": pop, "tokenizer": tok_report, "stage": str(stage)}
    rows = {"SFT": sft_ev, "MostPop": pop}
    if t.method == "sft":
        result.update(test=sft_ev["test"], valid=sft_ev["valid"])
        ckpt_src, inspect = stage / "checkpoint.pt", None
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stage / "metrics.jsonl", out_dir / "metrics.jsonl.tmp")
        os.replace(out_dir / "metrics.jsonl.tmp", out_dir / "metrics.jsonl")
    else:
        t0 = time.time()
        cm, cm_info = collab.load_or_train(ds, splits, cfg.cm, Path(t.out) / ds.name, device, log)
        cm.to(device).eval()
        timing["cm_s"] = time.time() - t0
        sft_model = copy.deepcopy(model).eval()
        tensors = {name: to_tensors(splits[name], device) for name in ("train", "valid", "test")}
        resume_path = out_dir / "resume.pt"
        resume = cache.load_resume(resume_path, run_identity(cfg), t.method, log)
        logger = JsonlLogger(out_dir / "metrics.jsonl", resume["log_bytes"] if resume else None)
        t0 = time.time()
        log(f"[stage] {t.method}: {cfg.ft.ft_epochs} epochs from the SFT checkpoint")
        heads, sampler, ft_info = finetune(model, cm, tensors["train"], tensors["valid"], cfg, t.method, logger, log,
                                           resume_path, resume)
        logger.close()
        timing["finetune_s"] = time.time() - t0
        t0 = time.time()
        ev = {name: evaluate(model, tensors[name], t, desc=name) for name in ("valid", "test")}
        timing["eval_s"] = time.time() - t0
        result.update(test=ev["test"], valid=ev["valid"], finetune=ft_info, cm={k: cm_info[k] for k in ("valid", "test")})
        rows = {t.method.upper(): ev, **rows, "CM (SASRec)": cm_info}
        inspect = build_inspect(sft_model, model, heads, cm, sampler, tensors["test"], cfg, t.method, ds)
        ckpt_src = None
    timing["total_s"] = time.time() - t_start
    result.update(timing=timing, peak_memory_mb=peak_memory_mb())

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(asdict(cfg), out_dir / "config.json")
    if ckpt_src is not None:
        shutil.copyfile(ckpt_src, out_dir / "checkpoint.pt.tmp")
        os.replace(out_dir / "checkpoint.pt.tmp", out_dir / "checkpoint.pt")
    else:
        cache.save({"model": model.state_dict(), "model_args": model.model_args(), "heads": heads.state_dict(),
                    "heads_args": {"d_model": cfg.model.d_model, "log_z": cfg.ft.log_z}, "step": ft_info["step"],
                    "config": asdict(cfg)}, out_dir / "checkpoint.pt")
    if inspect is not None:
        atomic_write_json(inspect, out_dir / "inspect.json")
    atomic_write_json(result, out_dir / "metrics.json")
    cache.remove(out_dir / "resume.pt")  # finished: nothing to resume

    log("\n" + format_table([(split, name, m[split]) for split in ("test", "valid") for name, m in rows.items()]))
    log(f"\nrun folder: {out_dir}   total {timing['total_s']:.0f}s")
    return result


def run_table(cfg: Config, log=print) -> dict:
    """--method all and/or --seeds: run every (method, seed), skipping finished runs, then write
    results/<dataset>_<backbone>.md and .json (mean +- std, best baseline, one-sided t-tests).

    A run counts as finished when its metrics.json exists and its config.json equals this
    run's configuration; an interrupted table restarts at the first unfinished run.
    """
    t = cfg.train
    methods = TABLE_METHODS if t.method == "all" else (t.method,)
    for seed in t.seeds:
        for method in methods:
            c = copy.deepcopy(cfg)
            c.train.method, c.train.seed, c.train.seeds = method, seed, []
            log(f"\n=== {method}, seed {seed} ===")
            run_or_reuse(c, log)
    names = [*methods, "cm", "mostpop"] if t.method == "all" else list(methods)
    got = results.collect(t.out, cfg.data.dataset, t.backbone, names, t.seeds)
    values = got["values"]
    summary = results.summarise(values, baselines=[m for m in TABLE_BASELINES if m in values],
                                gflowgr=[m for m in TABLE_GFLOWGR if m in values],
                                reference=[m for m in values if m not in (*TABLE_BASELINES, *TABLE_GFLOWGR)])
    summary["missing"] = got["missing"]
    out = Path("results") if t.out == "runs" else Path(t.out) / "results"
    md, js = results.write(summary, out, cfg.data.dataset, t.backbone)
    log("\n" + md.read_text() + f"\nwritten: {md}, {js}")
    return summary


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        if cfg.train.study:
            import experiments  # imported here: experiments.py builds on this file
            experiments.run_study(cfg)
        elif cfg.train.method == "all" or cfg.train.seeds:
            run_table(cfg)
        else:
            main(cfg)
    except (DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # An object half built when the Ctrl-C landed (a tqdm bar, say) can fail in its __del__
        # as the interrupted frames are freed, printing a traceback that is not the user's
        # concern: the process is ending, so such destructor errors are dropped from here on.
        sys.unraisablehook = lambda unraisable: None
        print("interrupted: rerun the same command to continue after the last finished epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
