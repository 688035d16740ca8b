"""The cached stages of a run: item embeddings -> semantic IDs -> the SFT backbone (and its evaluation).

Each stage is cached under `runs/<dataset>/<stage>-<key>/`, keyed by a hash of the config
that produced it (cache.stage_key), so a second run with the same settings skips it and
says so with a `[cache]` line; a stage killed half way resumes from its last saved state.
The collaborative model is the fourth cached stage (collab.load_or_train, beside its code).

    runs/<dataset>/emb-<key>/emb.pt            item text embeddings (tokenizer.embed_texts)
    runs/<dataset>/ids-<key>/codes.pt          semantic IDs + tokenizer report (Sec. 4.1, RQ-VAE)
    runs/<dataset>/sft-<key>/checkpoint.pt     SFT backbone (+ metrics.jsonl, eval.json; sft.train_sft, Eq. 1)

Usage: `trie, report, ids_key = semantic_ids(ds, cfg); model, info, stage = sft_stage(ds, splits, trie, ids_key, cfg, device)`
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

import cache
import distributed
from batches import to_tensors
from config import NOT_SFT_SETTINGS, Config, train_settings
from data import item_popularity
from evaluation import evaluate
from gflowgr import MODEL_ADDED_LATER, GRModel
from runtime import JsonlLogger, set_seed
from sft import train_sft
from tokenizer import Trie, build_semantic_ids, embed_texts


def semantic_ids(ds, cfg: Config, log=print, cf_emb: torch.Tensor | None = None) -> tuple[Trie, dict, str]:
    """Item text -> embeddings -> unique semantic IDs -> trie, each stage cached on disk.

    cf_emb (n_items, d): the CM's item embeddings, used by the LETTER tokenizer (--backbone letter).
    """
    root = Path(cfg.train.out) / ds.name
    tok = cfg.tok
    emb_key = cache.stage_key(ds.name, cache.fingerprint(ds.texts()), tok.embedder, tok.emb_dim if tok.embedder == "tfidf" else None)
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
    # and the dedup order keys only a non-default order (so adding it kept every cache valid too)
    tok_key = {k: v for k, v in asdict(tok).items()
               if (tok.id_method == "letter" or not k.startswith("letter_")) and (k != "dedup" or v != "id")}
    cf_key = [hashlib.sha256(cf_emb.numpy().tobytes()).hexdigest()[:16]] if tok.id_method == "letter" else []
    ids_key = cache.stage_key(emb_key, tok_key, cfg.train.seed, *cf_key)
    ids_path = root / f"ids-{ids_key}" / "codes.pt"
    saved = cache.load(ids_path, "semantic IDs", log)
    if saved is not None:
        log(f"[cache] semantic IDs: {ids_path}")
        codes, report = saved["codes"], saved["report"]
    else:
        t0 = time.time()
        # the stage folder is keyed by the config, so any resume state in it is this config's
        resume_path = ids_path.parent / "resume.pt"
        popularity = torch.from_numpy(item_popularity(ds)) if tok.dedup == "popularity" else None  # training split only
        codes, report = build_semantic_ids(emb, tok, seed=cfg.train.seed, log=log, cf_emb=cf_emb, resume_path=resume_path,
                                           popularity=popularity)
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


def sft_key(ds, ids_key: str, cfg: Config) -> str:
    """The SFT stage's key: the IDs, the data, the backbone's config and the TrainConfig fields
    that change the SFT model (not the method, seeds, device, threads, study, tag, ...)."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in MODEL_ADDED_LATER or v}  # off: the key of before
    return cache.stage_key(ids_key, cache.fingerprint(ds.sequences), model,
                           train_settings(cfg.train, NOT_SFT_SETTINGS), *distributed.key())  # key(): [] for one process


def sft_stage(ds, splits, trie, ids_key: str, cfg: Config, device, log=print) -> tuple[GRModel, dict, Path]:
    """Train (or load the cached) SFT backbone. Returns the model, its info and the stage folder."""
    t = cfg.train
    stage = Path(t.out) / ds.name / f"sft-{sft_key(ds, ids_key, cfg)}"
    ckpt_path = stage / "checkpoint.pt"
    ckpt = cache.load(ckpt_path, "SFT checkpoint", log, map_location=device)
    if ckpt is not None:
        log(f"[cache] SFT checkpoint: {ckpt_path} (skipping training)")
        model = GRModel.from_state(ckpt["model_args"], ckpt["model"]).to(device).eval()
        return model, ckpt["info"], stage
    for name in ("eval.json", "eval-history-out.json"):  # the evaluations of a checkpoint that is gone
        (stage / name).unlink(missing_ok=True)
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
    distributed.barrier()  # torchrun: no rank goes on before rank 0 has saved it
    return model, info, stage


def sft_evaluation(model: GRModel, splits: dict, stage: Path, cfg: Config, device, log=print) -> dict:
    """Valid and test metrics of the SFT model, cached in its stage folder (eval.json): the beam
    search of a given checkpoint is deterministic, so it is done once per ranking (--filter-seen:
    eval-history-out.json)."""
    eval_path = stage / ("eval-history-out.json" if cfg.train.filter_seen else "eval.json")
    if eval_path.exists():
        try:
            ev = json.loads(eval_path.read_text())
            log(f"[cache] SFT evaluation: {eval_path}")
            return ev
        except json.JSONDecodeError:
            log(f"[cache] SFT evaluation {eval_path} is damaged (not JSON): evaluating again")
    t0 = time.time()
    ev = {name: evaluate(model, to_tensors(splits[name], device), cfg.train, desc=name, exclude_seen=cfg.train.filter_seen)
          for name in ("valid", "test")}
    ev["eval_seconds"] = time.time() - t0
    ev["eval_users_per_s"] = (len(splits["valid"]) + len(splits["test"])) / ev["eval_seconds"]
    cache.atomic_write_json(ev, eval_path)
    return ev
