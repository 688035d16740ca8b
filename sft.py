"""Supervised fine-tuning (SFT) of the GR backbone: L_GR of Eq. (1), the paper's starting point (Sec. 2, 4.1).

    L_GR = - sum_l log P_GR(t_l | U, t_{<l})          (Eq. 1, losses.gr_loss)

AdamW (weight decay on matrices only), linear warm-up then cosine decay to 10% of the peak
learning rate over `epochs`, gradients clipped at norm 1, length-bucketed batches. After each
epoch the model is scored on (a fixed subsample of) the validation users by beam search; the
epoch with the best valid NDCG@10 is kept, and `patience` epochs without a better one stop the
run; `eval_from` skips the scoring of epochs too early to be the best (the last epoch is
always scored). The whole training state is saved after every epoch, so a killed run resumes to the same
numbers.

Usage: `info = train_sft(model, to_tensors(splits["train"], dev), to_tensors(splits["valid"], dev), cfg.train, logger)`
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cache
import distributed
from batches import length_bucketed_batches, trim
from evaluation import evaluate
from gflowgr import GRModel
from losses import gr_loss
from runtime import JsonlLogger, check_finite


def train_sft(model: GRModel, train_t: dict, valid_t: dict, cfg, logger: JsonlLogger, log=print,
              resume_path: Path | None = None, resume: dict | None = None) -> dict:
    """Minimise L_GR (Eq. 1) with AdamW, warm-up + cosine schedule, early stopping on valid NDCG@10.

    train_t, valid_t: batches.to_tensors of the splits; cfg: config.TrainConfig (lr, epochs,
    batch_size, warmup_steps, weight_decay, patience, eval_users, seed, and the beam search's).

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
    gen = torch.Generator().manual_seed(cfg.seed)  # the batch order: the same on every rank under torchrun
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
        cache.set_rng_state(distributed.own(resume, "rng"))
        best, step, bad, t_train, n_seen, start = (resume[k] for k in ("best", "step", "bad", "t_train", "n_seen", "epoch"))
        log(f"[resume] SFT continues after epoch {start} of {cfg.epochs} ({resume_path})")
    else:
        distributed.reseed_rank_streams(cfg.seed)  # torchrun: each rank its own dropout masks (a resumed rank has its own back)
    compute = distributed.ddp([model])  # torchrun: backward all-reduces the gradients

    def save_state(epoch):  # after epoch (0-based) ends, unless it is the last
        if resume_path is not None and epoch + 1 < cfg.epochs:
            ranks = distributed.gather({"rng": cache.rng_state()})  # torchrun: every rank's own streams
            cache.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "rng": cache.rng_state(), "ranks": ranks, "best": best, "step": step, "bad": bad,
                        "t_train": t_train, "n_seen": n_seen, "epoch": epoch + 1, "log_bytes": logger.tell(),
                        "identity": None}, resume_path)  # the stage folder's key is the identity

    epoch, stop = start - 1, False
    for epoch in range(start, cfg.epochs):
        model.train()
        t0 = time.time()
        bar = tqdm(length_bucketed_batches(train_t["hist_len"].cpu(), cfg.batch_size, gen), desc=f"sft epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not distributed.is_main())
        run_loss = None
        for b in bar:
            mine = distributed.shard(b).to(train_t["target"].device)  # this rank's rows of the batch (all of it in one process)
            w = distributed.share(len(mine), len(b))
            hl = train_t["hist_len"][mine]
            # --bf16: the matrix products in bfloat16, the loss from float32 log-probabilities
            with torch.autocast(train_t["target"].device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                log_pf, _ = compute(model, trim(train_t["hist"][mine], hl), hl, train_t["target"][mine])  # (B, L)
            loss = gr_loss(log_pf.float()) * w
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            check_finite(step, loss, {"loss/gr": loss.detach()}, grad_norm, "SFT ")
            opt.step()
            sched.step()
            step += 1
            n_seen += len(b)
            batch_loss = distributed.batch_mean(loss.detach(), 1.0).item()  # the global batch's L_GR
            run_loss = batch_loss if run_loss is None else 0.98 * run_loss + 0.02 * batch_loss
            if step % 50 == 0:
                bar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                logger.log(step=step, epoch=epoch, **{"loss/gr": run_loss, "charts/lr": sched.get_last_lr()[0]})
        t_train += time.time() - t0
        if epoch + 1 < min(cfg.eval_from, cfg.epochs):  # --eval-from: too early to be the kept epoch
            logger.log(step=step, epoch=epoch + 1, **{"loss/gr": run_loss, "charts/samples_per_s": n_seen / t_train,
                                                      "charts/epoch_seconds": time.time() - t0})
            log(f"epoch {epoch + 1:3d}  loss {run_loss:.4f}  (validation from epoch {cfg.eval_from}; {n_seen / t_train:.0f} samples/s)")
            save_state(epoch)
            continue
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
        if not stop:
            save_state(epoch)
        if stop:
            log(f"early stop: no better valid NDCG@10 for {cfg.patience} epochs (best epoch {best['epoch']})")
            break
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "step": best["step"], "epochs_run": epoch + 1, "train_seconds": t_train,
            "samples_per_s": n_seen / max(t_train, 1e-9)}
