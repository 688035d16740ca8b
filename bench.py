"""Throughput benchmark: our GR backbone vs a token-level TIGER-size reference, same machine, same run.

Measures (on the real training samples of a data set):
  - training samples/s of `gflowgr.GRModel` (one encoder position per history item,
    batches padded to their own longest history, length-bucketed) with the config of a run;
  - training samples/s of a token-level TIGER reference: nn.Transformer, 4+4 layers,
    d_model 128, d_ff 1024, every history item as its L tokens, source padded to
    max_his_len * L = 80 tokens, one softmax over all L*V tokens (as TIGER's T5 does);
  - constrained beam-search users/s (beam 20, top 10) of GRModel;
  - app.py's cost of one user switch (`app.user_view`: two beam searches, the K augmented
    trajectories, both models' probabilities of every item) and of its first
    "random interesting user" click (`app.interesting_users`), with the models loaded.
The speed-up is the ratio of the first two, measured in one process.

`--rqvae N` measures instead the RQ-VAE on the real item texts (TF-IDF), N times without and
N times with its per-epoch resume state saved (the cost of being resumable), and checks
that every run gives the same IDs (same seed, same threads: same numbers).

`--bf16` adds our SFT step under bfloat16 autocast (`train.py --bf16`), timed after the
float32 one on the same model.

Usage: `python bench.py --dataset beauty`  |  `python bench.py --dataset beauty --rqvae 2`
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data as data_mod
from data import DataConfig
from gflowgr import GRModel, ModelConfig
from losses import gr_loss
from tokenizer import TokenizerConfig, Trie, add_dedup_level


class TokenTiger(nn.Module):
    """Reference only: a TIGER-size token-level encoder-decoder (no trie, no caching)."""

    def __init__(self, L: int, V: int, d: int = 128, layers: int = 4, d_ff: int = 1024, src_len: int = 80):
        super().__init__()
        self.L, self.V = L, V
        self.emb = nn.Embedding(L * V + 2, d)  # + pad + bos
        self.pos = nn.Embedding(src_len, d)
        self.tf = nn.Transformer(d, 4, layers, layers, d_ff, dropout=0.1, batch_first=True)
        self.out = nn.Linear(d, L * V)

    def forward(self, src, src_pad, tgt_in):
        x = self.emb(src) + self.pos.weight[: src.shape[1]]
        y = self.emb(tgt_in)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        return self.out(self.tf(x, y, tgt_mask=causal, src_key_padding_mask=src_pad))


def batches(split, batch_size, n_steps, gen):
    """Length-bucketed random batches, as train.py forms them."""
    perm = torch.randperm(len(split.target), generator=gen)[: batch_size * n_steps]
    hist_len = torch.as_tensor(split.hist_len)[perm]
    perm = perm[torch.argsort(hist_len, stable=True)]
    out = list(perm.split(batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen)]


def bench_rqvae(ds, runs: int) -> None:
    """Seconds of the RQ-VAE with and without a resume state saved every epoch; are the IDs identical?"""
    import tempfile
    from pathlib import Path

    from tokenizer import embed_texts, train_rqvae

    cfg = TokenizerConfig()
    emb = embed_texts(ds.texts(), cfg)
    codes, rows = [], []
    for with_state in [False, True] * runs:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "resume.pt" if with_state else None
            t0 = time.perf_counter()
            c, report = train_rqvae(emb, cfg, seed=42, resume_path=path)
            seconds = time.perf_counter() - t0
            size = path.stat().st_size if with_state and path.exists() else 0
        codes.append(c)
        rows.append((with_state, seconds, size, report["collision_rate"]))
    print(f"RQ-VAE, {ds.n_items:,} items, {cfg.rq_epochs} epochs, {torch.get_num_threads()} threads")
    for with_state, seconds, size, collisions in rows:
        print(f"  {'state saved every epoch' if with_state else 'no resume state':<24} {seconds:6.1f} s"
              f"  state {size / 1e6:.1f} MB  collision rate {collisions:.4%}")
    print(f"  identical IDs in all {len(codes)} runs: {all(torch.equal(codes[0], c) for c in codes[1:])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=100, help="timed training steps per model (100: ~15 s of SFT steps on Beauty, less exposed to a moment of a shared machine than 20)")
    p.add_argument("--ref-steps", type=int, default=5, help="timed steps of the (slow) token-level reference")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-users", type=int, default=4096)
    p.add_argument("--app-users", type=int, default=20, help="users timed through app.user_view (0: the app is not timed)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--bf16", action="store_true", help="also time our SFT step under bfloat16 autocast (train.py --bf16)")
    p.add_argument("--rqvae", type=int, default=0, help="only time the RQ-VAE, this many runs without and with resume states")
    a = p.parse_args()
    for name, least in (("steps", 1), ("ref_steps", 1), ("batch_size", 1), ("eval_users", 1), ("app_users", 0),
                        ("threads", 0), ("rqvae", 0)):
        if getattr(a, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least} (got {getattr(a, name)})")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ds = data_mod.load_dataset(DataConfig(dataset=a.dataset, data_dir=a.data_dir))
    if a.rqvae:
        return bench_rqvae(ds, a.rqvae)
    splits = data_mod.split_leave_one_out(ds, 20)
    tr = splits["train"]
    # random semantic IDs of the real shape: throughput does not depend on which IDs
    tok = TokenizerConfig()
    codes = add_dedup_level(torch.randint(0, tok.codebook_size, (ds.n_items, tok.levels)), tok.codebook_size)
    trie = Trie.build(codes, tok.codebook_size)
    L, V = codes.shape[1], tok.codebook_size
    hist, hist_len, target = (torch.as_tensor(getattr(tr, k)) for k in ("hist", "hist_len", "target"))
    gen = torch.Generator().manual_seed(0)
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
           "dataset": a.dataset, "batch_size": a.batch_size}

    model = GRModel(ModelConfig(), trie)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()

    def step_ours(b, bf16=False):
        hl = hist_len[b]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as sft.py under --bf16
            log_pf, _ = model(hist[b][:, : int(hl.max())], hl, target[b])
        loss = gr_loss(log_pf.float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    ref = TokenTiger(L, V)
    ref_opt = torch.optim.AdamW(ref.parameters(), 1e-3)
    ref.train()
    offset = torch.arange(L) * V

    def step_ref(b):
        h = hist[b]  # (B, 20) item ids, -1 pad
        src = (codes[h.clamp_min(0)] + offset).flatten(1)  # (B, 80) tokens
        src_pad = (h < 0).repeat_interleave(L, 1)
        src = src.masked_fill(src_pad, L * V)
        tgt = codes[target[b]] + offset  # (B, L)
        tgt_in = torch.cat([torch.full((len(b), 1), L * V + 1), tgt[:, :-1]], 1)
        logits = ref(src, src_pad, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    timed = [("ours", step_ours, a.steps), ("token_tiger_ref", step_ref, a.ref_steps)]
    if a.bf16:
        timed.insert(1, ("ours_bf16", lambda b: step_ours(b, bf16=True), a.steps))
    for name, fn, n in timed:
        bs = batches(tr, a.batch_size, n + 2, gen)
        for b in bs[:2]:  # warm-up
            fn(b)
        t0 = time.perf_counter()
        for b in bs[2:]:
            fn(b)
        res[f"train_samples_per_s/{name}"] = n * a.batch_size / (time.perf_counter() - t0)
        print(f"{name:>16}: {res[f'train_samples_per_s/{name}']:8.1f} training samples/s")
    res["speedup"] = res["train_samples_per_s/ours"] / res["train_samples_per_s/token_tiger_ref"]
    res["sft_epoch_minutes_est"] = len(tr) / res["train_samples_per_s/ours"] / 60
    print(f"speed-up {res['speedup']:.1f}x; one {a.dataset} epoch ({len(tr):,} samples) ~ {res['sft_epoch_minutes_est']:.1f} min")

    model.eval()
    te = splits["test"]
    idx = torch.arange(min(a.eval_users, len(te.target)))
    th, thl = torch.as_tensor(te.hist)[idx], torch.as_tensor(te.hist_len)[idx]
    order = torch.argsort(thl, stable=True)
    t0 = time.perf_counter()
    for c in order.split(512):
        model.beam_search(th[c][:, : int(thl[c].max())], thl[c], beam=20, topk=10)
    res["beam_users_per_s"] = len(idx) / (time.perf_counter() - t0)
    res["all_test_users_s_est"] = len(te.target) / res["beam_users_per_s"]
    print(f"beam search: {res['beam_users_per_s']:.0f} users/s; all {len(te.target):,} test users ~ {res['all_test_users_s_est']:.0f} s")

    if a.app_users == 0:  # --app-users 0: the app is not timed
        print("app: not timed (--app-users 0)")
    else:
        bench_app(a, ds, te, model, res)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


def bench_app(a, ds, te, model, res: dict) -> None:
    """app.py with the models already in memory (st.cache_resource): one user switch, one disagreement scan."""
    import copy

    import app
    import collab
    from gflowgr import GFlowNetHeads
    from config import Config

    cfg = Config()
    cfg.data.dataset = a.dataset
    test_t = {k: torch.as_tensor(getattr(te, k)) for k in ("hist", "hist_len", "target", "user")}
    b = app.Bundle(name="bench", method="gflowgr-tb", objective="tb", cfg=cfg, titles=ds.titles, attributes=ds.attributes,
                   test=test_t, user_to_sample={}, model=model, sft_model=copy.deepcopy(model),
                   heads=GFlowNetHeads(model.cfg.d_model).eval(), cm=collab.SASRec(ds.n_items, collab.CollabConfig()).eval(),
                   metrics={}, curves=[])
    app.user_view(b, 0)  # warm-up
    times = []
    for sample in range(1, a.app_users + 1):
        t0 = time.perf_counter()
        app.user_view(b, sample)
        times.append(time.perf_counter() - t0)
    res["app_user_switch_s"] = {"median": sorted(times)[len(times) // 2], "max": max(times)}
    t0 = time.perf_counter()
    app.interesting_users(b)
    res["app_interesting_scan_s"] = time.perf_counter() - t0
    print(f"app: user switch {res['app_user_switch_s']['median']:.2f} s median, {res['app_user_switch_s']['max']:.2f} s max "
          f"({a.app_users} users); first random-user scan {res['app_interesting_scan_s']:.1f} s")


if __name__ == "__main__":
    main()
