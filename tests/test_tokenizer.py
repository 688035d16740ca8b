"""Semantic IDs: embeddings, k-means, RQ-VAE collapse guard, dedup uniqueness, the prefix trie."""
import itertools

import pytest
import torch

from data import DataError
from tokenizer import RQVAE, TokenizerConfig, Trie, add_dedup_level, build_semantic_ids, id_report, kmeans, tfidf_svd, train_rqvae


def blobs(n_per=40, k=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 3
    return (centers[:, None] + 0.3 * torch.randn(k, n_per, dim, generator=g)).reshape(-1, dim), torch.arange(k).repeat_interleave(n_per)


def test_tfidf_puts_related_texts_close():
    texts = ["red nail polish opi", "opi nail polish pink", "nail polish red shiny",
             "hair shampoo dry", "shampoo for dry hair", "hair conditioner dry shampoo"] * 2
    emb = tfidf_svd(texts, dim=4)
    assert emb.shape == (12, 4)
    assert torch.allclose(emb.norm(dim=1), torch.ones(12), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 3] + 0.5  # polish vs polish beats polish vs shampoo


def test_kmeans_recovers_separated_clusters():
    x, truth = blobs()
    _, assign = kmeans(x, 8, seed=1)
    # every true cluster maps to exactly one k-means cluster
    pairs = {(int(t), int(a)) for t, a in zip(truth, assign)}
    assert len(pairs) == 8 and len({a for _, a in pairs}) == 8


def test_random_codebook_collapses_and_guard_prevents_it():
    x, _ = blobs(n_per=64, k=16, dim=32)
    x = torch.nn.functional.normalize(x, dim=1)  # unit rows, as the text embedders return
    base = dict(levels=2, codebook_size=32, rq_latent=8, rq_hidden=64, rq_epochs=30, rq_batch=128, rq_lr=1e-3)
    codes_bad, _ = train_rqvae(x, TokenizerConfig(**base, kmeans_init=False, dead_code_restart=False), seed=0)
    codes_good, _ = train_rqvae(x, TokenizerConfig(**base), seed=0)
    usage_bad = id_report(codes_bad, 32)["usage_per_level"]
    usage_good = id_report(codes_good, 32)["usage_per_level"]
    assert usage_bad == [1, 1], usage_bad  # collapse: every item on one code at every level
    assert min(usage_good) >= 16, usage_good  # guarded: at least half the codes in use at every level


def test_dedup_level_makes_ids_unique_hand_example():
    codes = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5]])
    out = add_dedup_level(codes, codebook_size=4)
    assert out[:, 2].tolist() == [0, 1, 0, 2, 0]
    assert torch.unique(out, dim=0).shape[0] == 5
    rep = id_report(codes, 4)
    assert rep["collision_rate"] == pytest.approx(1 - 3 / 5)
    assert rep["items_in_collisions"] == 3 and rep["max_items_per_id"] == 3
    with pytest.raises(DataError, match="dedup"):
        add_dedup_level(torch.zeros(5, 2, dtype=torch.long), codebook_size=4)


def test_build_semantic_ids_unique_with_rqvae_and_rkmeans():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    for method in ("rqvae", "rkmeans"):
        cfg = TokenizerConfig(id_method=method, levels=2, codebook_size=32, rq_latent=8, rq_hidden=32, rq_epochs=20, rq_batch=64)
        ids, report = build_semantic_ids(x, cfg, log=None)
        assert ids.shape == (300, 3)
        assert torch.unique(ids, dim=0).shape[0] == 300
        assert len(report["usage_per_level"]) == 2


def test_trie_accepts_exactly_the_real_ids():
    codes = torch.tensor([[0, 1, 0], [0, 1, 1], [0, 2, 0], [2, 0, 0]])
    trie = Trie.build(codes, vocab_size=3)
    # nodes: root, 2 depth-1 prefixes, 3 depth-2 prefixes, 4 leaves
    assert trie.n_nodes == 1 + 2 + 3 + 4
    assert (trie.mask[0] == 0).tolist() == [True, False, True]  # root children: tokens 0 and 2
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    items = trie.lookup(every)
    real = {tuple(c) for c in codes.tolist()}
    for ids, item in zip(every.tolist(), items.tolist()):
        if tuple(ids) in real:
            assert codes[item].tolist() == ids
        else:
            assert item == -1
    # item_nodes walks the same path as next_node
    for i, c in enumerate(codes.tolist()):
        node = 0
        for level, tok in enumerate(c):
            assert trie.item_nodes[i, level] == node
            node = int(trie.next_node[node, tok])
        assert trie.leaf_item[node] == i


def test_trie_rejects_duplicate_ids():
    with pytest.raises(ValueError):
        Trie.build(torch.tensor([[0, 1], [0, 1]]), vocab_size=2)
