"""The generative recommender (GR) backbone: a small TIGER-style encoder-decoder.

Paper Sec. 2 (GR, Eq. 1) and Sec. 3.3 (P_F = P_GR): given a user's history U, the model
generates the L semantic-ID tokens t_1..t_L of the next item one at a time. The step-l
softmax, restricted to the children of the prefix s_{l-1} in the ID trie, is the GFlowNet
forward policy P_F(t_l | U, s_{l-1}) of Eq. (5)/(6); since each prefix has one parent,
P_B = 1. Beam search over the same masked policy is inference (Sec. 3.3, "unchanged").

CPU design (measured in BENCHMARKS.md): TIGER feeds the encoder L tokens per history item
(80 positions for 20 items). Here each history item is ONE encoder position, the sum of
the embeddings of its L ID tokens plus a recency position; batches are padded only to
their own longest history. The decoder has L positions (BOS, t_1..t_{L-1}) and one output
head per level (V codes each). GFlowGR scores 1 + K trajectories per user, and a beam's top-K
share most of their prefixes: `tree_trajectories` decodes each distinct prefix once (on Beauty's
top-50, 96 positions instead of 200 per user; a fine-tuning step 16% faster, alternated in one hour).

One concept at ~520 lines: the layers, the policy (teacher-forced, over a prefix tree, masked),
beam search, sampling and the GFlowNet heads all read the same trie-masked P_F.

`--copy-bonus` (off by default, on for Yelp) adds one learned number b_l per level to the logit
of every token whose prefix leads to one of the user's own history items: TIGER has no way to
say "this place again", and a generated ID must otherwise be rebuilt token by token from a
summed embedding. P_F stays a masked softmax, so every loss and beam search are unchanged.

Usage: `model = GRModel(ModelConfig(), trie); log_pf, h = model(hist, hist_len, items)`
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from tokenizer import Trie


@dataclass
class ModelConfig:
    d_model: int = field(default=128, metadata={"help": "model width"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    n_enc_layers: int = field(default=2, metadata={"help": "encoder layers"})
    n_dec_layers: int = field(default=2, metadata={"help": "decoder layers"})
    d_ff: int = field(default=512, metadata={"help": "feed-forward width"})
    dropout: float = field(default=0.1, metadata={"help": "dropout (costs ~25%% of a CPU step)"})
    max_his_len: int = field(default=20, metadata={"help": "history positions (items) the encoder sees"})
    copy_bonus: bool = field(default=False, metadata={"help": "a learned bonus b_l on every level-l token that continues one of the user's own history items, so the GR can recommend a place again (a copy path; Yelp: 6.5%% of test targets are repeats, BENCHMARKS.md). Off: TIGER's policy"})


MODEL_ADDED_LATER = ("copy_bonus",)  # in the SFT stage key only when on (off was the behaviour before them)


class Attention(nn.Module):
    """Multi-head attention whose key/value projection can be computed once and reused."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.h, self.dropout = n_heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def project_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = rearrange(self.kv(mem), "b s (two h e) -> two b h s e", two=2, h=self.h)
        return k, v  # (B, H, S, E) each

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal=False) -> torch.Tensor:
        q = rearrange(self.q(x), "b t (h e) -> b h t e", h=self.h)  # (B, H, T, E)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.o(rearrange(y, "b h t e -> b t (h e)"))

    def forward(self, x, mem, mask=None, causal=False):
        return self.attend(x, *self.project_kv(mem), mask=mask, causal=causal)


class FeedForward(nn.Sequential):
    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), nn.Dropout(dropout))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm self-attention block over history items."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask=mask))
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    """Pre-LayerNorm causal self-attention, cross-attention to the history, feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cross_kv, mem_mask, ancestors=None):
        """Teacher-forced pass over all L prefixes at once. x: (B, L, d).

        cross_kv may hold U users' keys/values for B = U * M items, M consecutive items per user
        (U = 1: one user scored on all B items): the M*L prefixes of a user then become the query
        axis of that user's cross-attention, and the memory is neither copied nor projected M times.
        ancestors (GRModel.tree_trajectories): x (B, W, d) holds a prefix tree's positions, and
        each attends to its own path's positions (tree_self_attention) instead of the causal left.
        """
        h = self.ln1(x)
        y = self.self_attn(h, h, causal=True) if ancestors is None else self.tree_self_attention(h, *ancestors)
        x = x + self.drop(y)
        return self.cross_and_ff(x, cross_kv, mem_mask)

    def tree_self_attention(self, h, index, ok):
        """Causal self-attention on a prefix tree: position w attends to index[:, w] (B, W, L), the
        positions s_0..s_l of its own path (ok (B, W, L) False past its level), as scaled dot-product
        attention with that mask would. The softmax and dropout run on the L path entries only; the
        scores come from one dense product and the output from another (a gather of each path's
        keys/values, or dropout on a (W, W) matrix, cost more on a CPU)."""
        att = self.self_attn
        B, W, L = index.shape
        q = rearrange(att.q(h), "b w (h e) -> b h w e", h=att.h)  # (B, H, W, E)
        k, v = rearrange(att.kv(h), "b w (two h e) -> two b h w e", two=2, h=att.h)  # (B, H, W, E) each
        path = index[:, None].expand(-1, att.h, -1, -1)  # (B, H, W, L)
        scores = (q @ k.transpose(-1, -2)).gather(-1, path) / math.sqrt(q.shape[-1])  # (B, H, W, L)
        w = scores.masked_fill(~ok[:, None], float("-inf")).softmax(-1)
        w = F.dropout(w, att.dropout, self.training)
        dense = torch.zeros(B, att.h, W, W, dtype=w.dtype, device=w.device).scatter_add(-1, path, w)  # (B, H, W, W)
        return att.o(rearrange(dense @ v, "b h w e -> b w (h e)"))

    def cross_and_ff(self, x, cross_kv, mem_mask):
        """The cross-attention to the history and the feed-forward block of forward."""
        q = self.ln2(x)
        n_users = cross_kv[0].shape[0]
        if n_users < x.shape[0]:
            y = self.cross.attend(rearrange(q, "(u m) l d -> u (m l) d", u=n_users), *cross_kv, mask=mem_mask).view_as(x)
        else:
            y = self.cross.attend(q, *cross_kv, mask=mem_mask)
        x = x + self.drop(y)
        return x + self.ff(self.ln3(x))

    def step(self, x, cache, cross_kv, mem_mask):
        """One decoding step for K beams per user. x: (B, K, d); cache: (k, v) of (B, K, H, t, E) or None.

        Self-attention: each beam attends to its own cached past. Cross-attention: the K
        beams are the query axis against the user's keys/values, projected once per user
        (no copy of the memory per beam).
        """
        h = self.ln1(x)
        att = self.self_attn
        q = rearrange(att.q(h), "b k (h e) -> b k h e", h=att.h)
        k_new, v_new = rearrange(att.kv(h), "b k (two h e) -> two b k h 1 e", two=2, h=att.h)
        k_all = k_new if cache is None else torch.cat([cache[0], k_new], 3)  # (B, K, H, t+1, E)
        v_all = v_new if cache is None else torch.cat([cache[1], v_new], 3)
        w = torch.einsum("bkhe,bkhte->bkht", q, k_all) / math.sqrt(q.shape[-1])
        y = torch.einsum("bkht,bkhte->bkhe", w.softmax(-1), v_all)
        x = x + att.o(rearrange(y, "b k h e -> b k (h e)"))
        x = x + self.cross.attend(self.ln2(x), *cross_kv, mask=mem_mask)
        return x + self.ff(self.ln3(x)), (k_all, v_all)


class GRModel(nn.Module):
    """TIGER-style GR backbone over semantic IDs, constrained by the ID trie.

    Tokens of level l live at rows l*V..(l+1)*V-1 of one shared embedding table, used both
    to embed history items (sum over their L tokens) and as decoder inputs.
    """

    def __init__(self, cfg: ModelConfig, trie: Trie):
        super().__init__()
        self.cfg = cfg
        n_items, self.L = trie.codes.shape
        self.V = trie.next_node.shape[1]
        d = cfg.d_model
        self.register_buffer("item_codes", trie.codes.clone())  # (I, L), saved with the weights
        self.register_buffer("level_offset", torch.arange(self.L) * self.V, persistent=False)
        # the trie tensors are derived from item_codes: rebuilt on load, never saved
        for name in ("next_node", "mask", "leaf_item", "item_nodes"):
            self.register_buffer("trie_" + name, getattr(trie, name), persistent=False)
        self.code_emb = nn.Embedding(self.L * self.V, d)
        self.enc_pos = nn.Embedding(cfg.max_his_len, d)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.dec_pos = nn.Embedding(self.L, d)
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        self.enc_ln, self.dec_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Parameter(torch.randn(self.L, d, self.V) * d**-0.5)  # one output layer per level
        self.head_bias = nn.Parameter(torch.zeros(self.L, self.V))
        if cfg.copy_bonus:  # b_l, one per level, starting at 0 (= TIGER's policy)
            self.copy_bias = nn.Parameter(torch.zeros(self.L))
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.code_emb.weight, std=0.02)
        nn.init.normal_(self.enc_pos.weight, std=0.02)
        nn.init.normal_(self.dec_pos.weight, std=0.02)

    # -- checkpoint round trip ------------------------------------------------------------
    def model_args(self) -> dict:
        return {"cfg": asdict(self.cfg), "n_items": int(self.item_codes.shape[0]), "L": self.L, "V": self.V}

    @classmethod
    def from_state(cls, model_args: dict, state: dict) -> "GRModel":
        trie = Trie.build(state["item_codes"], model_args["V"])
        model = cls(ModelConfig(**model_args["cfg"]), trie)
        model.load_state_dict(state)
        return model

    # -- encoder ----------------------------------------------------------------------------
    def encode(self, hist: torch.Tensor, hist_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hist (B, S) item ids, -1 padded on the right -> memory (B, S, d), attention mask (B, 1, 1, S)."""
        S = hist.shape[1]
        valid = torch.arange(S, device=hist.device) < hist_len[:, None]  # (B, S)
        tokens = self.item_codes[hist.clamp_min(0)] + self.level_offset  # (B, S, L)
        x = self.code_emb(tokens).sum(2)  # (B, S, d): one position per history item
        recency = (hist_len[:, None] - 1 - torch.arange(S, device=hist.device)).clamp_min(0)  # 0 = newest item
        x = self.drop(x + self.enc_pos(recency)) * valid[..., None]
        mask = valid[:, None, None, :]  # (B, 1, 1, S): attend to real items only
        for layer in self.enc_layers:
            x = layer(x, mask)
        return self.enc_ln(x), mask

    # -- decoder, teacher forced ----------------------------------------------------------
    def decode(self, mem: torch.Tensor, mask: torch.Tensor, items: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Hidden state of every prefix s_0..s_{L-1} of each target item: (B, L, d).

        mem (B, S, d) pairs row b with items[b]; mem (U, S, d) with B = U * M pairs user u with
        items[u*M : (u+1)*M] (U = 1: one user scored on all B items).
        depth P < L stops after the prefixes s_0..s_{P-1}: (B, P, d) (the decoder is causal)."""
        P = depth or self.L
        codes = self.item_codes[items]  # (B, L)
        prev = self.code_emb(codes[:, : P - 1] + self.level_offset[: P - 1])  # (B, P-1, d): t_1..t_{P-1}
        x = torch.cat([self.bos.expand(len(items), 1, -1), prev], 1) + self.dec_pos.weight[:P]  # (B, P, d)
        x = self.drop(x)
        for layer in self.dec_layers:
            x = layer(x, layer.cross.project_kv(mem), mask)
        return self.dec_ln(x)

    def logits(self, h: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """Unmasked logits: h (B, P, d) of the prefixes s_0..s_{P-1} -> (B, P, V), or h (..., d) at one level -> (..., V)."""
        if level is None:
            P = h.shape[1]
            return torch.einsum("bld,ldv->blv", h, self.head[:P]) + self.head_bias[:P]
        return h @ self.head[level] + self.head_bias[level]

    def masked_log_pf(self, logits: torch.Tensor, nodes: torch.Tensor, on_path: torch.Tensor | None = None,
                      level: int | None = None) -> torch.Tensor:
        """log P_F(. | U, s) over the children of trie node s: log_softmax(logits + mask[s]).

        Invalid tokens get -inf before the softmax, so P_F sums to 1 over the tokens that
        lead to a real item. This one function defines the policy for SFT, for every
        GFlowNet/RL loss and for beam search. logits (R, P, V) with nodes (R, P) at levels
        0..P-1, or logits (R, K, V) with nodes (R, K) all at `level`. With --copy-bonus,
        on_path (R / M, n_nodes) (`history_paths`) marks the prefixes of the user's history items
        (one row per user, shared by M consecutive rows of logits), and a token whose child is one
        of them gets the level's bonus b_l before the softmax.
        """
        if on_path is not None and hasattr(self, "copy_bias"):
            # P_GR of Eq. (1) = P_F of Eqs. (5)/(6), with --copy-bonus:
            # P_F(t | U, s_{l-1}) ∝ exp(logit_t + b_l [s_{l-1}·t is a prefix of an item in U])
            child = self.trie_next_node[nodes]  # (R, P, V): -1 where the token is not in the trie
            per_user = child.clamp_min(0).view(on_path.shape[0], -1)  # (R / M, M * P * V): no copy of on_path
            hit = on_path.gather(1, per_user).view_as(child) & (child >= 0)  # (R, P, V)
            b = self.copy_bias[level] if level is not None else self.copy_bias[: nodes.shape[1], None]  # () or (P, 1)
            logits = logits + b * hit
        return F.log_softmax(logits + self.trie_mask[nodes], dim=-1)

    def history_paths(self, hist: torch.Tensor) -> torch.Tensor | None:
        """(B, n_nodes) True on every trie node s_1..s_L of an item in hist (B, S) (-1 padded);
        None without --copy-bonus."""
        if not hasattr(self, "copy_bias"):
            return None
        n_nodes = self.trie_next_node.shape[0]
        nodes = self.trie_item_nodes[hist.clamp_min(0), 1:]  # (B, S, L)
        nodes = torch.where(hist[..., None] >= 0, nodes, n_nodes)  # padding -> a spare column
        on_path = torch.zeros(hist.shape[0], n_nodes + 1, dtype=torch.bool, device=hist.device)
        return on_path.scatter_(1, nodes.flatten(1), True)[:, :n_nodes]

    def trajectories(self, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor, tree: bool = False):
        """Per-step log P_F along the paths of M items per user (the user is encoded once).

        items (B, M) -> log_pf (B, M, L): log P_F(t_l | U, s_{l-1}) for l = 1..L;
        h (B, M, L, d): decoder states of s_0..s_{L-1} (where log F(s_l) is read);
        mem (B, S, d), mask (B, 1, 1, S): the encoded history (where log Z(U) is read).
        tree: decode each user's distinct prefixes once (tree_trajectories): the same values up to
        float rounding (dropout aside: a shared prefix gets one mask), fewer decoder positions when
        the M items share prefixes (a beam's top-M do).
        """
        B, M = items.shape
        mem, mask = self.encode(hist, hist_len)
        if tree:
            log_pf, h = self.tree_trajectories(mem, mask, items, self.history_paths(hist))
            return log_pf, h, mem, mask
        flat = items.flatten()  # (B*M,)
        h = self.decode(mem, mask, flat)  # (B*M, L, d): each user's keys/values projected once, for its M items
        nodes = self.trie_item_nodes[flat, : self.L]  # (B*M, L): s_0..s_{L-1}
        on_path = self.history_paths(hist)  # (B, n_nodes) with --copy-bonus, else None; M rows per user
        log_pf_all = self.masked_log_pf(self.logits(h), nodes, on_path)  # (B*M, L, V)
        log_pf = log_pf_all.gather(2, self.item_codes[flat][..., None]).squeeze(2)  # (B*M, L)
        return log_pf.view(B, M, self.L), h.view(B, M, self.L, -1), mem, mask

    def prefix_tree(self, items: torch.Tensor) -> list[dict]:
        """The distinct prefixes of each user's M items, one block per level l = 0..L-1.

        items (B, M). Block l: `node` (B, W_l) the trie nodes s_l of the user's items, each once,
        padded with the root (`valid` False there); `token` (B, W_l) the level-(l-1) token that leads
        into s_l (its code_emb row; l = 0 has none: BOS); `col` (B, M) the column of item m's s_l.
        A beam's top-50 shares most of its prefixes: ~2x fewer positions than 50 x L (BENCHMARKS.md).
        """
        B, M = items.shape
        n_nodes = self.trie_next_node.shape[0]
        nodes = self.trie_item_nodes[items, : self.L]  # (B, M, L): s_0..s_{L-1}
        codes = self.item_codes[items]  # (B, M, L)
        rows = torch.arange(B, device=items.device)[:, None].expand(B, M)  # (B, M)
        blocks = []
        for level in range(self.L):
            uniq, inverse = torch.unique(rows * n_nodes + nodes[..., level], return_inverse=True)  # sorted by user
            user = uniq // n_nodes  # (N,)
            counts = torch.bincount(user, minlength=B)  # (B,)
            col_of = torch.arange(len(uniq), device=items.device) - (counts.cumsum(0) - counts)[user]  # (N,)
            W = int(counts.max())
            node = torch.zeros(B, W, dtype=torch.long, device=items.device)  # the root pads
            node[user, col_of] = uniq % n_nodes
            valid = torch.zeros(B, W, dtype=torch.bool, device=items.device)
            valid[user, col_of] = True
            col = col_of[inverse]  # (B, M)
            token = torch.zeros(B, W, dtype=torch.long, device=items.device)
            if level > 0:
                token[rows, col] = codes[..., level - 1] + self.level_offset[level - 1]
            blocks.append({"node": node, "token": token, "valid": valid, "col": col})
        return blocks

    def tree_trajectories(self, mem, mask, items: torch.Tensor, on_path=None):
        """trajectories' log_pf (B, M, L) and h (B, M, L, d), each distinct prefix decoded once.

        The decoder runs on the prefix_tree's blocks side by side, (B, W, d) with W = sum_l W_l;
        a position's self-attention sees its own prefix's ancestors (the causal mask of one item's
        path, shared by the items below it), its cross-attention the user's memory. Each level's
        block is scored by that level's head, as decode + logits score position l.
        """
        B, M = items.shape
        blocks = self.prefix_tree(items)
        widths = [b["node"].shape[1] for b in blocks]
        offsets = [sum(widths[:level]) for level in range(self.L)]
        W = sum(widths)
        rows = torch.arange(B, device=items.device)[:, None]  # (B, 1)
        pos = torch.stack([offsets[l] + b["col"] for l, b in enumerate(blocks)], -1)  # (B, M, L): item m's s_l
        # ancestors: s_l attends to s_0..s_l of its own path (a padding position to itself alone)
        index = torch.arange(W, device=items.device).repeat(B, 1)[..., None].repeat(1, 1, self.L)  # (B, W, L)
        ok = torch.zeros(B, W, self.L, dtype=torch.bool, device=items.device)
        ok[..., 0] = True  # position j = 0 of every path: the root (padding: itself)
        for level in range(1, self.L):
            index[rows, pos[..., level]] = pos  # the path s_0..s_{L-1} of an item below: its first level + 1 are s_l's
            ok[rows, pos[..., level], : level + 1] = True
        x = torch.cat([self.bos.expand(B, 1, -1)] + [self.code_emb(b["token"]) for b in blocks[1:]], 1)  # (B, W, d)
        level_of = torch.repeat_interleave(torch.arange(self.L, device=items.device), torch.tensor(widths, device=items.device))  # (W,)
        x = self.drop(x + self.dec_pos(level_of))
        for layer in self.dec_layers:
            x = layer(x, layer.cross.project_kv(mem), mask, ancestors=(index, ok))
        h = self.dec_ln(x)  # (B, W, d)
        codes = self.item_codes[items]  # (B, M, L)
        log_pf = []
        for level, b in enumerate(blocks):
            h_l = h[:, offsets[level]: offsets[level] + widths[level]]  # (B, W_l, d)
            lp = self.masked_log_pf(self.logits(h_l, level), b["node"], on_path, level=level)  # (B, W_l, V)
            log_pf.append(lp[rows, b["col"], codes[..., level]])  # (B, M)
        return torch.stack(log_pf, -1), h[rows[..., None], pos]  # (B, M, L), (B, M, L, d)

    def forward(self, hist: torch.Tensor, hist_len: torch.Tensor, items: torch.Tensor):
        """One target item per user: log_pf (B, L) = log P_F(t_l | U, s_{l-1}), h (B, L, d)."""
        log_pf, h, _, _ = self.trajectories(hist, hist_len, items[:, None])
        return log_pf[:, 0], h[:, 0]

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(self, hist: torch.Tensor, hist_len: torch.Tensor, beam: int = 20, topk: int = 10,
                    exclude_seen: bool = False):
        """Trie-constrained beam search: top-k real items and their sequence log-probabilities.

        Returns items (B, topk) (-1 only if fewer than topk items exist) and
        log P(item | U) = sum_l log P_F (B, topk), best first. With beam >= the number of
        prefixes at every level this is exhaustive, i.e. the exact ranking. exclude_seen
        leaves the items of hist out of the list: their last token is cut at the last step
        (the policy is not renormalised; the scores stay the model's log P(item | U)).
        """
        B, V, dev = hist.shape[0], self.V, hist.device
        mem, mask = self.encode(hist, hist_len)
        on_path = self.history_paths(hist)  # --copy-bonus
        cross_kv = [layer.cross.project_kv(mem) for layer in self.dec_layers]  # once per user
        node = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, K): every beam starts at the root
        score = torch.zeros(B, 1, device=dev)  # (B, K): sum of log P_F so far
        x = self.bos.expand(B, 1, -1)  # (B, K, d)
        caches = [None] * len(self.dec_layers)
        for level in range(self.L):
            h = x + self.dec_pos.weight[level]
            for i, layer in enumerate(self.dec_layers):
                h, caches[i] = layer.step(h, caches[i], cross_kv[i], mask)
            log_pf = self.masked_log_pf(self.logits(self.dec_ln(h), level), node.clamp_min(0), on_path, level)  # (B, K, V)
            if exclude_seen and level == self.L - 1:
                log_pf = log_pf.masked_fill(self._seen_children(hist, node), float("-inf"))
            total = (score[..., None] + log_pf).flatten(1)  # (B, K*V)
            score, flat = total.topk(min(beam, total.shape[1]), dim=1)  # (B, K')
            parent, token = flat // V, flat % V
            parent_node = node.gather(1, parent)
            # dead beams (score -inf: fewer valid prefixes than beams) keep node -1
            node = torch.where(parent_node >= 0, self.trie_next_node[parent_node.clamp_min(0), token], -1)
            node = torch.where(torch.isfinite(score), node, -1)
            idx = parent[:, :, None, None, None]
            caches = [tuple(c.gather(1, idx.expand(-1, -1, *c.shape[2:])) for c in kv) for kv in caches]
            x = self.code_emb(token + self.level_offset[level])  # (B, K', d)
        items = torch.where(node >= 0, self.trie_leaf_item[node.clamp_min(0)], -1)
        return items[:, :topk], score[:, :topk]


    def _seen_children(self, hist: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """(B, K, V) True where token v from last-level prefix node (B, K) completes an item of hist (B, S)."""
        B, n_items = hist.shape[0], self.item_codes.shape[0]
        seen = torch.zeros(B, n_items + 1, dtype=torch.bool, device=hist.device)  # column n_items: padding (-1)
        seen.scatter_(1, torch.where(hist >= 0, hist, n_items), True)
        seen[:, n_items] = False
        child = self.trie_next_node[node.clamp_min(0)]  # (B, K, V): -1 where token v is not in the trie
        leaf = self.trie_leaf_item[child.clamp_min(0)]  # (B, K, V): the item a last token completes
        item = torch.where((child >= 0) & (leaf >= 0), leaf, n_items)  # (B, K, V)
        return seen.gather(1, item.flatten(1)).view_as(item) & (node[..., None] >= 0)

    @torch.no_grad()
    def sample(self, hist: torch.Tensor, hist_len: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """Draw n items per user from the trie-masked policy, token by token (ancestral sampling).

        Used by the RL baselines (GRPO, PPO). Every draw is a real item because each step
        samples from P_F(. | U, s_l), which is zero outside the trie. Returns items (B, n)
        and their log P(item | U) = sum_l log P_F (B, n). Draws are independent (with
        replacement). Sampling runs on the CPU generator for reproducibility.
        """
        B, dev = hist.shape[0], hist.device
        mem, mask = self.encode(hist, hist_len)
        on_path = self.history_paths(hist)  # --copy-bonus
        cross_kv = [layer.cross.project_kv(mem) for layer in self.dec_layers]
        node = torch.zeros(B, n, dtype=torch.long, device=dev)  # (B, n): all draws start at the root
        score = torch.zeros(B, n, device=dev)
        x = self.bos.expand(B, n, -1)  # (B, n, d)
        caches = [None] * len(self.dec_layers)
        for level in range(self.L):
            h = x + self.dec_pos.weight[level]
            for i, layer in enumerate(self.dec_layers):
                h, caches[i] = layer.step(h, caches[i], cross_kv[i], mask)
            log_pf = self.masked_log_pf(self.logits(self.dec_ln(h), level), node, on_path, level)  # (B, n, V)
            token = torch.multinomial(log_pf.exp().flatten(0, 1).cpu(), 1, generator=generator).view(B, n).to(dev)
            score = score + log_pf.gather(2, token[..., None]).squeeze(2)
            node = self.trie_next_node[node, token]
            x = self.code_emb(token + self.level_offset[level])  # (B, n, d)
        return self.trie_leaf_item[node], score

    @torch.no_grad()
    def item_log_probs(self, hist: torch.Tensor, hist_len: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """log P_F(t_l | U, s_{l-1}) for every item's ID, one user: (I, L). Their sum over l is log P(v | U).

        Where the trie leaves a prefix one child, the masked policy gives that child P_F = 1 whatever
        the network says, so each item is decoded only down to its last prefix with a real choice
        (on Beauty 82% of items are alone after their 3 semantic tokens, so their last step is skipped).
        """
        n_items, L = self.item_codes.shape
        choices = (self.trie_mask == 0).sum(1)  # (nodes,): valid children of each prefix
        branching = choices[self.trie_item_nodes[:, :L]] > 1  # (I, L): s_{l-1} has a real choice
        depth = torch.where(branching, torch.arange(1, L + 1, device=branching.device), 0).amax(1)  # (I,): prefixes worth decoding
        mem, mask = self.encode(hist, hist_len)  # (1, S, d): decode shares it across the items
        on_path = self.history_paths(hist)  # (1, n_nodes) with --copy-bonus
        log_pf = torch.zeros(n_items, L, device=mem.device)  # P_F = 1 below the last choice
        for P in range(1, L + 1):
            for items in (depth == P).nonzero()[:, 0].split(chunk):
                h = self.decode(mem, mask, items, depth=P)  # (M, P, d)
                nodes = self.trie_item_nodes[items, :P]  # (M, P): prefixes s_0..s_{P-1}
                log_pf_all = self.masked_log_pf(self.logits(h), nodes, on_path)  # (M, P, V): the trie-masked policy
                log_pf[items, :P] = log_pf_all.gather(2, self.item_codes[items, :P, None]).squeeze(2)
        return log_pf


class GFlowNetHeads(nn.Module):
    """The learnable GFlowNet quantities of Eq. (5)/(6), kept apart from the SFT backbone.

    - log F(s_l) for the prefixes s_0..s_{L-1}: an MLP on the decoder hidden state of each
      prefix (Eq. 5). The terminal flow is not learned: log F(s_L) = log R (Sec. 3.3).
    - log Z: the paper calls Z a global scalar approximating F(s_0) (Sec. 2). But every user
      is a different GFlowNet (a different reward over items), so Z = sum_v R(U, v) differs
      per user; `log_z="user"` is a user-conditioned head log Z(U) on the pooled encoder output,
      `log_z="scalar"` the paper's single learned number, and `log_z="vargrad"` learns no Z at
      all: it is estimated in closed form from each sample's own trajectories
      (`losses.vargrad_log_z`), so this module's log_z is not used.
    They start untrained on top of an SFT backbone and get their own (larger) learning rate.
    """

    def __init__(self, d_model: int, log_z: str = "user"):
        super().__init__()
        if log_z not in ("user", "scalar", "vargrad"):
            raise ValueError(f"log_z must be 'user', 'scalar' or 'vargrad', got {log_z!r}")
        self.log_z_mode = log_z
        self.flow = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.z_user = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.z_scalar = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def init_offset(self, value: float) -> None:
        """Start log Z and every log F(s_l) at `value` (the output biases), e.g. the mean of
        log R - sum_l log P_F over a first batch, so the first TB residuals are centred at 0 (and
        DB's under --log-flow prefix; with a bare head every log F starts equal, so the inner DB
        residuals start at log P_F(t_{l+1} | s_l))."""
        self.z_scalar.fill_(value)
        self.z_user[-1].bias.fill_(value)
        self.flow[-1].bias.fill_(value)

    def log_flow(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., L, d) decoder states of s_0..s_{L-1} -> log F(s_l) (..., L)."""
        return self.flow(h).squeeze(-1)

    def log_z(self, mem: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder memory (B, S, d) and its mask (B, 1, 1, S) -> log Z(U) (B,)."""
        if self.log_z_mode == "vargrad":
            raise ValueError("log_z='vargrad' is computed from the trajectories: use losses.vargrad_log_z")
        if self.log_z_mode == "scalar":
            return self.z_scalar.expand(mem.shape[0])
        valid = mask[:, 0, 0, :, None].float()  # (B, S, 1)
        pooled = (mem * valid).sum(1) / valid.sum(1).clamp_min(1)  # (B, d): mean over the history
        return self.z_user(pooled).squeeze(-1)
