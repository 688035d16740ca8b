"""One run of the pipeline, and Table 1's runs over methods and seeds.

A run (paper Sec. 4): load and split the data -> semantic IDs -> SFT (Eq. 1) -> for a
fine-tuning method, the CM and the fine-tuning (finetune.py) -> beam-search evaluation of
valid and test users -> the run folder and the printed table:

    runs/<dataset>__<method>__seed<seed>/   config.json, metrics.json, metrics.jsonl,
                                            checkpoint.pt, inspect.json (fine-tuned runs),
                                            metrics_refit.jsonl (--refit-test: the test's model)

The expensive stages are cached (stages.py, collab.load_or_train); a run that finished with
the same config is reused (`run_or_reuse`), and so is the fine-tuned model of its ranked-in
twin for a --filter-seen run (`ranked_with_history_in`); `run_table` runs every (method, seed) of
--method all / --seeds and writes results/<dataset>_<backbone>.md with the t-tests.

Usage: `metrics = run(config.apply_preset(Config()))`   (the command line is train.py)
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import cache
import collab
import data as data_mod
import distributed
import results
from batches import to_tensors
from config import (RANKING_VARIANT, TABLE_BASELINES, TABLE_GFLOWGR, TABLE_METHODS, Config, finalize, finished, replaced_run,
                    run_dir, run_identity, with_method)
from evaluation import evaluate, format_table, mostpop_metrics
from finetune import finetune
from gflowgr import GFlowNetHeads
from inspection import build_inspect
from runtime import JsonlLogger, peak_memory_mb, resolve_device
from stages import semantic_ids, sft_evaluation, sft_stage


def run(cfg: Config, log=print) -> dict:
    """One run: the pipeline for cfg.train.method; returns the metrics dict that metrics.json holds."""
    cfg = finalize(cfg)
    t = cfg.train
    changes = replaced_run(cfg)
    if changes:
        log(f"[replace] {run_dir(cfg)} holds a finished run with other settings ({'; '.join(changes)}): it is "
            f"retrained in place. To keep both, stop and rerun with --tag NAME.")
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    timing, t_start = {}, time.time()

    t0 = time.time()
    ds = distributed.main_first(lambda: data_mod.load_dataset(cfg.data, verbose=True))  # torchrun: rank 0 may write Beauty's files
    splits = data_mod.split_leave_one_out(ds, cfg.data.max_his_len)
    timing["data_s"] = time.time() - t0
    log(f"split: {len(splits['train']):,} train / {len(splits['valid']):,} valid / {len(splits['test']):,} test samples")

    cf_emb = None
    if t.backbone == "letter":  # LETTER aligns the IDs with the CM's item embeddings: CM first
        cm, _ = collab.load_or_train(ds, splits, cfg.cm, Path(t.out) / ds.name, device, log)
        cf_emb = cm.item_emb.weight[: len(ds.titles)].detach().cpu()
    t0 = time.time()
    # torchrun: rank 0 builds (or loads) the IDs, then the others load them from its cache
    trie, tok_report, ids_key = distributed.main_first(lambda: semantic_ids(ds, cfg, log, cf_emb))
    timing["semantic_ids_s"] = time.time() - t0

    t0 = time.time()
    model, sft_info, stage = sft_stage(ds, splits, trie, ids_key, cfg, device, log)
    timing["sft_s"] = time.time() - t0

    sft_ev = sft_evaluation(model, splits, stage, cfg, device, log)
    pop = mostpop_metrics(ds, splits, t.topk, exclude_seen=t.filter_seen)

    out_dir = run_dir(cfg)
    result = {"sft": sft_info, "sft_eval": sft_ev, "mostpop": pop, "tokenizer": tok_report, "stage": str(stage)}
    rows = {"SFT": sft_ev, "MostPop": pop}
    if t.method == "sft":
        result.update(test=sft_ev["test"], valid=sft_ev["valid"])
        ckpt_src, inspect = stage / "checkpoint.pt", None
        copy_curves(stage, out_dir)
    else:
        t0 = time.time()
        cm, cm_info = collab.load_or_train(ds, splits, cfg.cm, Path(t.out) / ds.name, device, log)
        cm.to(device).eval()
        if cfg.ft.oracle_reward:  # a control: the toy world's truth scores r_c (the CM's row still reports the CM)
            cm = collab.TasteOracle(ds.item_cluster, cm.cfg).to(device)
        elif cfg.cm.crossfit:  # GFlowGR's training contexts scored by CMs that never saw their users
            cm = collab.cross_fitted(ds, splits, cfg.cm, Path(t.out) / ds.name, cm, device, log)
        timing["cm_s"] = time.time() - t0
        sft_model = copy.deepcopy(model).eval()
        if cfg.ft.init_from:  # --init-from: this fine-tuning starts from another run's model (the prior stays SFT)
            start = cache.load(Path(cfg.ft.init_from) / "checkpoint.pt", "--init-from's checkpoint", log, map_location=device)
            if start is None:
                raise data_mod.DataError(f"--init-from {cfg.ft.init_from}: its checkpoint.pt cannot be read; rerun that run")
            model.load_state_dict(start["model"])
            log(f"[init] {t.method} starts from the model of {cfg.ft.init_from}")
        tensors = {name: to_tensors(splits[name], device) for name in ("train", "valid", "test")}
        t0 = time.time()
        ranked_in = ranked_with_history_in(cfg)
        reused = reuse_finetuned(ranked_in, model, cfg, device, log) if ranked_in is not None else None
        validated = validated_twin(cfg)  # --refit-test: the same run without it has the validation model's numbers
        if validated is not None:
            twin = json.loads((validated / "metrics.json").read_text())
            log(f"[reuse] {t.method}: the validation model's numbers of {validated} (its best epoch {twin['finetune']['best_epoch']})")
            ft_info = {k: v for k, v in twin["finetune"].items() if k != "refit"}
            if cfg.ft.refit_epochs:  # the warm refit continues the validation model: the twin's
                ckpt = cache.load(validated / "checkpoint.pt", "the validation model", log, map_location=device)
                if ckpt is None:
                    raise data_mod.DataError(f"--refit-epochs continues the validation model of {validated}, whose checkpoint.pt "
                                             f"cannot be read: delete that folder to train it again")
                model.load_state_dict(ckpt["model"])
            copy_curves(validated, out_dir)  # the validation model's curves
            inspect = None
        elif reused is not None:  # --filter-seen: the same run ranked with the history in has the model
            heads, ft_info, inspect = reused
            copy_curves(ranked_in, out_dir)
        else:
            resume_path = out_dir / "resume.pt"
            resume = cache.load_resume(resume_path, run_identity(cfg), t.method, log)
            logger = JsonlLogger(out_dir / "metrics.jsonl", resume["log_bytes"] if resume else None)
            log(f"[stage] {t.method}: {cfg.ft.ft_epochs} epochs from {'that model' if cfg.ft.init_from else 'the SFT checkpoint'}")
            heads, sampler, ft_info = finetune(model, cm, tensors["train"], tensors["valid"], cfg, t.method, logger, log,
                                               resume_path, resume, identity=run_identity(cfg), sft=sft_model)
            logger.close()
            inspect = None
        timing["finetune_s"] = time.time() - t0
        t0 = time.time()
        ev = {"valid": twin["valid"] if validated is not None else
              evaluate(model, tensors["valid"], t, desc="valid", exclude_seen=t.filter_seen)}
        timing["eval_s"] = time.time() - t0
        if cfg.ft.refit_test and reused is None:  # the test's own model: the GFlowNet term on the test contexts
            t0 = time.time()
            heads, sampler, ft_info["refit"] = refit_for_test(model, sft_model, cm, tensors, cfg, ft_info, out_dir, log)
            timing["finetune_s"] += time.time() - t0
        t0 = time.time()
        ev["test"] = evaluate(model, tensors["test"], t, desc="test", exclude_seen=t.filter_seen)
        timing["eval_s"] += time.time() - t0
        result.update(test=ev["test"], valid=ev["valid"], finetune=ft_info, cm={k: cm_info[k] for k in ("valid", "test")})
        rows = {t.method.upper(): ev, **rows, "CM (SASRec)": cm_info}
        if inspect is None:  # (reused: the ranked-in run's, which the ranking does not change)
            inspect = build_inspect(sft_model, model, heads, cm, sampler, tensors["test"], cfg, t.method, ds)
        ckpt_src = None
    timing["total_s"] = time.time() - t_start
    result.update(timing=timing, peak_memory_mb=peak_memory_mb(), world_size=distributed.world())

    cache.atomic_write_json(asdict(cfg), out_dir / "config.json")
    if ckpt_src is not None:
        if distributed.is_main():  # torchrun: rank 0 alone writes
            shutil.copyfile(ckpt_src, out_dir / "checkpoint.pt.tmp")
            os.replace(out_dir / "checkpoint.pt.tmp", out_dir / "checkpoint.pt")
    else:
        cache.save({"model": model.state_dict(), "model_args": model.model_args(), "heads": heads.state_dict(),
                    "heads_args": {"d_model": cfg.model.d_model, "log_z": cfg.ft.log_z}, "step": ft_info["step"],
                    "config": asdict(cfg)}, out_dir / "checkpoint.pt")
    if inspect is not None:
        cache.atomic_write_json(inspect, out_dir / "inspect.json")
    cache.atomic_write_json(result, out_dir / "metrics.json")
    cache.remove(out_dir / "resume.pt")  # finished: nothing to resume
    distributed.barrier()  # torchrun: every rank ends the run after rank 0 has written it

    log("\n" + format_table([(split, name, m[split]) for split in ("test", "valid") for name, m in rows.items()]))
    log(f"\nrun folder: {out_dir}   total {timing['total_s']:.0f}s")
    return result


def copy_curves(src: Path, out_dir: Path) -> None:
    """Copy the metrics.jsonl of src (a cached stage or a reused run) into out_dir, atomically; under
    torchrun rank 0 alone writes."""
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "metrics.jsonl", out_dir / "metrics.jsonl.tmp")
        os.replace(out_dir / "metrics.jsonl.tmp", out_dir / "metrics.jsonl")


def refit_for_test(model, sft_model, cm, tensors: dict, cfg: Config, ft_info: dict, out_dir: Path, log=print):
    """--refit-test: fine-tune model again from the SFT weights, the GFlowNet term on each user's test
    context (finetune.test_contexts), for the epochs validation chose (ft_info["best_epoch"]); under
    --refit-epochs N, model (the validation model) goes on for N epochs instead. model ends as that test model. Resumable (resume_refit.pt); logs to metrics_refit.jsonl. Returns the
    heads, the sampler and the refit's info.

    Under --gfn-context next the first model fitted the CM's tilt on the contexts validation asks
    about; the test asks one item later (the validation item appended), where that tilt is one
    item stale. The refit gives the test what validation had; L_GR stays on the training samples.
    """
    rcfg = copy.deepcopy(cfg)
    warm = cfg.ft.refit_epochs > 0  # --refit-epochs N: model (the validation model) goes on for N epochs
    rcfg.ft.ft_epochs = cfg.ft.refit_epochs if warm else int(ft_info["best_epoch"])
    if not warm:
        model.load_state_dict(sft_model.state_dict())
    identity = {**run_identity(cfg), "refit_epochs": rcfg.ft.ft_epochs}
    resume_path = out_dir / "resume_refit.pt"
    resume = cache.load_resume(resume_path, identity, "the test refit", log)
    logger = JsonlLogger(out_dir / "metrics_refit.jsonl", resume["log_bytes"] if resume else None)
    log(f"[stage] {cfg.train.method} test refit: {rcfg.ft.ft_epochs} epochs from the "
        f"{'validation model' if warm else 'SFT checkpoint'} on the test contexts")
    out = finetune(model, cm, tensors["train"], tensors["valid"], rcfg, cfg.train.method, logger, log, resume_path, resume,
                   identity=identity, refit=True, sft=sft_model)
    logger.close()
    cache.remove(resume_path)
    return out


def validated_twin(cfg: Config) -> Path | None:
    """For a --refit-test run, the folder of the same run without it, if it has finished (else None):
    its model is this run's validation model (the refit changes only the test's), so its valid
    numbers and best epoch are this run's, and only the refit is left to train."""
    if not cfg.ft.refit_test:
        return None
    plain = copy.deepcopy(cfg)
    plain.ft.refit_test, plain.ft.refit_epochs = False, 0
    d = run_dir(plain)
    need = ("metrics.jsonl", "checkpoint.pt") if cfg.ft.refit_epochs else ("metrics.jsonl",)
    return d if all((d / n).exists() for n in need) and finished(plain) else None


def ranked_with_history_in(cfg: Config) -> Path | None:
    """For a --filter-seen fine-tuning run, the folder of the same run ranked with the history in,
    if it has finished (else None). --filter-seen changes only the final lists, not the training
    (early stopping and the fine-tuning's validation rank with the history in), so that run's
    fine-tuned model is this run's model, and retraining it would only cost time."""
    if not cfg.train.filter_seen or cfg.train.method == "sft" or cfg.ft.refit_test:  # (--refit-test: two models)
        return None
    plain = copy.deepcopy(cfg)
    plain.train.filter_seen = False
    d = run_dir(plain)
    have = all((d / name).exists() for name in ("checkpoint.pt", "inspect.json", "metrics.jsonl"))
    return d if have and finished(plain) else None


def reuse_finetuned(ranked_in: Path, model, cfg: Config, device, log=print):
    """Load the fine-tuned backbone of the finished run ranked_in into model; returns (heads, the
    run's fine-tuning info, its inspect.json), or None if its checkpoint is unreadable (then the
    caller fine-tunes)."""
    ckpt = cache.load(ranked_in / "checkpoint.pt", "the fine-tuned checkpoint", log, map_location=device)
    if ckpt is None:
        return None
    log(f"[reuse] {cfg.train.method}: the fine-tuned model of {ranked_in} (--filter-seen changes only the lists)")
    model.load_state_dict(ckpt["model"])
    heads = GFlowNetHeads(**ckpt["heads_args"]).to(device)
    heads.load_state_dict(ckpt["heads"])
    ft_info = json.loads((ranked_in / "metrics.json").read_text())["finetune"]
    return heads, ft_info, json.loads((ranked_in / "inspect.json").read_text())


def run_or_reuse(cfg: Config, log=print) -> dict:
    """run(cfg), unless that run finished earlier with the same config: then its metrics.json."""
    cfg = finalize(cfg)
    if finished(cfg):
        log(f"[done] {run_dir(cfg)} (finished earlier, reused)")
        return json.loads((run_dir(cfg) / "metrics.json").read_text())
    return run(cfg, log)


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
            c = with_method(cfg, method)  # the method's own preset (config.METHOD_PRESETS), flags kept
            c.train.seed, c.train.seeds = seed, []
            log(f"\n=== {method}, seed {seed} ===")
            run_or_reuse(c, log)
    names = [*methods, "cm", "mostpop"] if t.method == "all" else list(methods)
    ranking = RANKING_VARIANT if t.filter_seen else ""  # a --filter-seen table reads the runs ranked that way
    got = results.collect(t.out, cfg.data.dataset, t.backbone, names, t.seeds, ranking)
    values = got["values"]
    summary = results.summarise(values, baselines=[m for m in TABLE_BASELINES if m in values],
                                gflowgr=[m for m in TABLE_GFLOWGR if m in values],
                                reference=[m for m in values if m not in (*TABLE_BASELINES, *TABLE_GFLOWGR)])
    summary["missing"] = got["missing"]
    out = Path("results") if t.out == "runs" else Path(t.out) / "results"
    if distributed.is_main():  # torchrun: rank 0 alone writes
        md, js = results.write(summary, out, cfg.data.dataset, t.backbone, ranking)
        log("\n" + md.read_text() + f"\nwritten: {md}, {js}")
    return summary
