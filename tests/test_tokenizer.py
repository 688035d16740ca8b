"""Semantic IDs: embeddings, k-means, RQ-VAE collapse guard, dedup uniqueness, the prefix trie."""
import itertools
import math

import pytest
import torch

from data import DataError
from tokenizer import (RQVAE, LetterRegulariser, TokenizerConfig, Trie, add_dedup_level, build_semantic_ids, id_report, kmeans,
                       tfidf_svd, train_letter, train_rqvae)


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


def test_dedup_level_by_popularity_hand_example():
    # group (1, 2) holds items 0, 1, 3; group (3, 4) item 2 alone; group (3, 5) item 4 alone
    codes = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [3, 5]])
    popularity = torch.tensor([5, 9, 100, 5, 0])
    out = add_dedup_level(codes, codebook_size=4, popularity=popularity)
    # inside (1, 2): item 1 (9) first, then items 0 and 3 (5 each) in id order; singletons keep 0
    assert out[:, 2].tolist() == [1, 0, 0, 2, 0]
    assert torch.equal(out[:, :2], codes)
    # equal counts everywhere: the id order, as without popularity
    assert torch.equal(add_dedup_level(codes, 4, torch.zeros(5, dtype=torch.long)), add_dedup_level(codes, 4))
    cfg = TokenizerConfig(id_method="rkmeans", levels=1, codebook_size=4, dedup="popularity")
    with pytest.raises(DataError, match="popularity"):
        build_semantic_ids(torch.randn(5, 3), cfg, log=None)


def test_build_semantic_ids_unique_with_rqvae_and_rkmeans():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    for method in ("rqvae", "rkmeans"):
        cfg = TokenizerConfig(id_method=method, levels=2, codebook_size=32, rq_latent=8, rq_hidden=32, rq_epochs=20, rq_batch=64)
        ids, report = build_semantic_ids(x, cfg, log=None)
        assert ids.shape == (300, 3)
        assert torch.unique(ids, dim=0).shape[0] == 300
        assert len(report["usage_per_level"]) == 2


def text_and_cf(n=300, k_text=6, k_cf=5, dim=32, d_cf=16, seed=0):
    """Unit text embeddings x (n, dim) and CF embeddings h (n, d_cf).

    x is dominated by k_text clusters; h has k_cf clusters drawn independently of them, of which
    x keeps only a faint trace (as a brand word in a title would): a tokenizer that just
    reconstructs x gives codes that say little about h.
    """
    g = torch.Generator().manual_seed(seed)
    text, cf = torch.randint(k_text, (n,), generator=g), torch.randint(k_cf, (n,), generator=g)
    x = torch.randn(k_text, dim, generator=g)[text] * 3 + torch.randn(n, dim, generator=g)
    h = torch.randn(k_cf, d_cf, generator=g)[cf] * 3 + torch.randn(n, d_cf, generator=g)
    x = x + torch.randn(k_cf, dim, generator=g)[cf]  # the trace: as large as the noise, a third of the text signal
    return torch.nn.functional.normalize(x, dim=1), h


LETTER_TOY = dict(levels=3, codebook_size=16, rq_latent=8, rq_hidden=64, rq_batch=64)


def test_letter_ids_unique_after_dedup():
    _, h = text_and_cf()
    x = torch.nn.functional.normalize(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = TokenizerConfig(id_method="letter", rq_epochs=20, **LETTER_TOY)
    ids, report = build_semantic_ids(x, cfg, log=None, cf_emb=h)
    assert ids.shape == (300, 4)
    assert torch.unique(ids, dim=0).shape[0] == 300
    _, rq_report = train_rqvae(x, TokenizerConfig(rq_epochs=1, **LETTER_TOY))
    assert set(rq_report) < set(report)  # the RQ-VAE's report (usage, collisions), and more
    assert len(report["usage_per_level"]) == 3 and -1 <= report["letter_cf_cos"] <= 1
    with pytest.raises(DataError, match="collaborative"):
        build_semantic_ids(x, cfg, log=None)
    with pytest.raises(DataError, match="one CF embedding per item"):
        train_letter(x, h[:10], cfg)


def test_letter_without_regularisers_is_rqvae():
    x, h = text_and_cf()
    base = dict(rq_epochs=5, **LETTER_TOY)
    codes_rq, _ = train_rqvae(x, TokenizerConfig(**base), seed=3)
    codes_letter, _ = train_letter(x, h, TokenizerConfig(**base, letter_cf_weight=0.0, letter_div_weight=0.0), seed=3)
    assert torch.equal(codes_rq, codes_letter)


def test_letter_cf_regulariser_aligns_quantised_and_cf_embeddings():
    x, h = text_and_cf()
    base = dict(rq_epochs=100, **LETTER_TOY)
    _, off = train_letter(x, h, TokenizerConfig(**base, letter_cf_weight=0.0), seed=0)
    _, on = train_letter(x, h, TokenizerConfig(**base), seed=0)  # the default letter_cf_weight
    # the probe is refitted on the final z_q of both runs: it compares the codes, not the head W
    assert on["letter_cf_probe_cos"] > off["letter_cf_probe_cos"] + 0.3, (off, on)
    assert on["letter_cf_cos"] > 0.3 and on["letter_final_cf"] < off["letter_final_cf"] - 1.5, (off, on)


def test_letter_diversity_loss_is_zero_for_even_usage():
    V, D = 4, 3
    cfg = TokenizerConfig(letter_temp=0.1)
    reg = LetterRegulariser(D, torch.zeros(8, 2), cfg)
    codebooks = (torch.eye(V, D) * 10)[None]  # (1, V, D): one level, codes far apart
    even = codebooks[:, [0, 1, 2, 3, 0, 1, 2, 3]]  # (1, 8, D): each code holds two items
    lopsided = codebooks[:, [0] * 8]  # every item on code 0
    assert reg.div_loss(even, codebooks).item() == pytest.approx(0.0, abs=1e-4)
    # one code used: KL(q || U) = log V, up to the soft assignment's leak to the other codes
    assert reg.div_loss(lopsided, codebooks).item() == pytest.approx(math.log(V), rel=0.02)


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


@pytest.mark.parametrize("id_method", ["rqvae", "letter"])
def test_rqvae_interrupted_after_an_epoch_resumes_to_the_same_codes(tmp_path, monkeypatch, id_method):
    """A crash after epoch 3's state was saved: the rerun says it resumes and gives the uninterrupted run's codes."""
    import cache

    x, _ = blobs(n_per=32, k=8, dim=16)
    x = torch.nn.functional.normalize(x, dim=1)
    cf = torch.randn(len(x), 6, generator=torch.Generator().manual_seed(3))
    cfg = TokenizerConfig(id_method=id_method, levels=2, codebook_size=16, rq_latent=8, rq_hidden=32, rq_epochs=8, rq_batch=64)
    train = (lambda **kw: train_rqvae(x, cfg, 5, **kw)) if id_method == "rqvae" else (lambda **kw: train_letter(x, cf, cfg, 5, **kw))
    whole, report = train(log=None)
    path = tmp_path / "resume.pt"
    real_save, saves = cache.save, []

    def crash_after_third(obj, p):
        real_save(obj, p)
        saves.append(obj["epoch"])
        if len(saves) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C right after the epoch-3 checkpoint

    monkeypatch.setattr(cache, "save", crash_after_third)
    with pytest.raises(KeyboardInterrupt):
        train(log=None, resume_path=path)
    monkeypatch.setattr(cache, "save", real_save)
    assert saves == [1, 2, 3] and path.exists()
    lines = []
    again, report_again = train(log=lines.append, resume_path=path)
    what = "RQ-VAE" if id_method == "rqvae" else "LETTER"
    assert any(f"[resume] {what} continues after epoch 3 of 8" in str(l) for l in lines)
    assert torch.equal(again, whole)
    assert report_again["rq_final_loss"] == report["rq_final_loss"]


def test_rqvae_gradient_is_the_same_every_time_on_two_threads():
    """Codebook rows are looked up with F.embedding: indexing (cb[idx]) accumulates its
    gradient in a thread-dependent order on the CPU, so same-seed RQ-VAEs drifted apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model, x = RQVAE(64, 64, 16, 3, 64), torch.randn(2048, 64)
        grads = []
        for _ in range(10):
            model.zero_grad()
            x_hat, _, vq_loss, _, _ = model(x)
            (torch.nn.functional.mse_loss(x_hat, x) + vq_loss).backward()
            grads.append(model.codebooks.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
