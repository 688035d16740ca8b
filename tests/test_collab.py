"""The collaborative model CM (SASRec): score = sigmoid(logit), padding layout, training split, toy quality, cache."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collab
from collab import CollabConfig, SASRec, evaluate_full_ranking, left_pad, load_or_train, train_sasrec, training_sequences
from data import DataConfig, Dataset, item_popularity, load_dataset, split_leave_one_out
from metrics import ranking_metrics

# Toy sequences are at most 15 items long, so a 16-item window loses nothing and trains fast.
TINY = CollabConfig(max_len=16, batch_size=32, lr=5e-3, epochs=8, patience=8)


@pytest.fixture(scope="module")
def toy():
    ds = load_dataset(DataConfig(dataset="toy"), verbose=False)
    return ds, split_leave_one_out(ds)


@pytest.fixture(scope="module")
def trained(toy):
    ds, splits = toy
    model, info = train_sasrec(ds, splits, TINY, log=lambda s: None)
    return model, info


def hand_made() -> Dataset:
    """Three users with disjoint items, so a held-out item can only leak from its own user."""
    seqs = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
    n = 20
    return Dataset("hand", seqs, [f"item {i}" for i in range(n)], [[] for _ in range(n)])


def test_score_is_sigmoid_of_logits_and_full_scores_agree():
    torch.manual_seed(0)
    model = SASRec(30, CollabConfig(max_len=8)).eval()
    hist = torch.tensor([[3, 7, 1, -1, -1], [4, 4, 9, 2, 11]])
    hist_len = torch.tensor([3, 5])
    items = torch.tensor([[0, 7, 29], [5, 11, 12]])
    logits = model.logits(hist, hist_len, items)
    score = model.score(hist, hist_len, items)
    assert score.shape == (2, 3) and ((score >= 0) & (score <= 1)).all()
    torch.testing.assert_close(score, torch.sigmoid(logits))
    full = model.full_scores(hist, hist_len)
    assert full.shape == (2, 30)
    torch.testing.assert_close(full.gather(1, items), logits.detach())


def test_left_pad_example():
    hist = torch.tensor([[3, 7, -1], [1, 2, 5]])
    out = left_pad(hist, torch.tensor([2, 3]), max_len=4)
    assert out.tolist() == [[-1, -1, 3, 7], [-1, 1, 2, 5]]
    # longer than the window: the newest max_len items are kept
    assert left_pad(hist[1:], torch.tensor([3]), max_len=2).tolist() == [[2, 5]]


def test_user_repr_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = SASRec(50, CollabConfig(max_len=10)).eval()
    hist = torch.tensor([[4, 8, 15, 16, -1, -1], [23, 42, -1, -1, -1, -1]])
    hist_len = torch.tensor([4, 2])
    wide = torch.cat([hist, torch.full((2, 14), -1)], dim=1)  # (2, 20): more -1 on the right
    narrow = hist[:, :4]  # (2, 4): only as wide as the longest history
    a, b, c = (model.user_repr(h, hist_len) for h in (hist, wide, narrow))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # and the representation does not depend on how much left padding the window adds
    short_window = SASRec(50, CollabConfig(max_len=4)).eval()
    state = model.state_dict()
    state["pos_emb.weight"] = state["pos_emb.weight"][-4:]  # the same recency positions
    short_window.load_state_dict(state)
    torch.testing.assert_close(short_window.user_repr(hist, hist_len), a)
    # user_repr encodes only the longest history's 4 columns; the whole max_len window agrees
    full_window = model.encode(left_pad(hist, hist_len, 10))[:, -1]  # (2, d)
    torch.testing.assert_close(full_window, a)


def test_training_sequences_are_items_without_the_last_two():
    seq, pos, user = training_sequences(hand_made(), max_len=4)
    assert user.tolist() == [0, 1, 2]
    assert seq.tolist() == [[-1, -1, 0, 1], [-1, 5, 6, 7], [11, 12, 13, 14]]
    assert pos.tolist() == [[-1, -1, 1, 2], [-1, 6, 7, 8], [12, 13, 14, 15]]


def test_training_never_sees_valid_or_test_targets(monkeypatch):
    ds = hand_made()
    splits = split_leave_one_out(ds)
    seen_inputs = []
    encode = SASRec.encode

    def spy(self, seq):
        if self.training:
            seen_inputs.extend(tuple(i for i in row if i >= 0) for row in seq.tolist())
        return encode(self, seq)

    monkeypatch.setattr(SASRec, "encode", spy)
    train_sasrec(ds, splits, CollabConfig(epochs=2, batch_size=2, max_len=8), log=lambda s: None)
    # every training input is exactly items[:-2] minus its last item (which is the last positive)
    assert set(seen_inputs) == {tuple(s[:-3]) for s in ds.sequences}
    held_out = set(splits["valid"].target.tolist()) | set(splits["test"].target.tolist())
    assert held_out == {3, 4, 9, 10, 16, 17}
    assert not held_out & {i for row in seen_inputs for i in row}


def test_negatives_avoid_the_users_training_items():
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(2, 10, dtype=torch.bool)
    seen[0, :8] = True  # user 0 has seen items 0..7: only 8 and 9 are valid negatives
    seen[1, [2, 3]] = True
    pos = torch.tensor([[-1] + [1] * 99, [2] * 100])
    neg = collab._sample_negatives(pos, seen, 10, gen)
    assert set(neg[0, 1:].tolist()) <= {8, 9}
    assert not set(neg[1].tolist()) & {2, 3}


def test_trained_cm_beats_mostpop_on_toy(toy, trained):
    ds, splits = toy
    model, info = trained
    top = np.argsort(-item_popularity(ds), kind="stable")[:10]
    mostpop = ranking_metrics(np.tile(top, (len(splits["valid"]), 1)), splits["valid"].target)
    assert info["valid"] == evaluate_full_ranking(model, splits["valid"])  # returned model = best state
    assert info["valid"]["hr@10"] > mostpop["hr@10"] + 0.15
    assert info["test"]["hr@10"] > mostpop["hr@10"] + 0.1
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= TINY.epochs


def test_true_next_item_scores_above_random_items(toy, trained):
    ds, splits = toy
    model, _ = trained
    v = splits["valid"]
    hist, hist_len = torch.from_numpy(v.hist), torch.from_numpy(v.hist_len)
    r_true = model.score(hist, hist_len, torch.from_numpy(v.target)[:, None])  # (N, 1)
    rand = torch.randint(0, ds.n_items, (len(v), 20), generator=torch.Generator().manual_seed(0))
    r_rand = model.score(hist, hist_len, rand)  # (N, 20)
    assert r_true.mean() > r_rand.mean() + 0.2
    # per user, the true item outranks most random ones
    assert (r_true > r_rand).float().mean() > 0.75


def test_same_seed_same_metrics(toy, trained):
    ds, splits = toy
    _, info = trained
    _, again = train_sasrec(ds, splits, TINY, log=lambda s: None)
    assert again["valid"] == info["valid"] and again["test"] == info["test"]


def test_cache_round_trip(toy, trained, tmp_path):
    ds, splits = toy
    cfg = CollabConfig(max_len=16, batch_size=32, lr=5e-3, epochs=2, patience=2)
    first_log, second_log = [], []
    m1, info1 = load_or_train(ds, splits, cfg, tmp_path, log=first_log.append)
    m2, info2 = load_or_train(ds, splits, cfg, tmp_path, log=second_log.append)
    assert not any(s.startswith("[cache]") for s in first_log)
    assert any(s.startswith("[cache] collaborative model:") for s in second_log)
    assert info1 == info2 and not m2.training
    (ckpt_dir,) = tmp_path.glob("cm-*")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]  # no .tmp left behind
    assert {"model", "model_args", "info"} <= set(torch.load(ckpt_dir / "checkpoint.pt"))
    v = splits["valid"]
    hist, hist_len = torch.from_numpy(v.hist), torch.from_numpy(v.hist_len)
    items = torch.arange(10).repeat(len(v), 1)
    assert torch.equal(m1.score(hist, hist_len, items), m2.score(hist, hist_len, items))
    # another config or another data set is another stage
    assert collab.cm_key(ds, cfg) != collab.cm_key(ds, CollabConfig(max_len=16, epochs=3))
    other = load_dataset(DataConfig(dataset="toy", toy_users=300), verbose=False)
    assert collab.cm_key(ds, cfg) != collab.cm_key(other, cfg)


def test_ce_and_sampled_losses_against_hand_computed_softmax():
    """cm_loss: full softmax = cross-entropy over all items; sampled = softmax over the positive and
    the drawn negatives, with a negative equal to the positive masked out."""
    torch.manual_seed(0)
    model = SASRec(6, CollabConfig(d=4, max_len=3))
    h = torch.randn(1, 3, 4)
    p = torch.tensor([[-1, 2, 5]])
    real = p >= 0
    M = model.item_emb.weight[:6]
    logits = h[real] @ M.T  # (2, 6)
    want = -(logits.log_softmax(1)[0, 2] + logits.log_softmax(1)[1, 5]) / 2
    got = collab.cm_loss(model, h, p, real, CollabConfig(loss="ce"))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    gen = torch.Generator().manual_seed(3)
    negs = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(3))
    sampled = collab.cm_loss(model, h, p, real, CollabConfig(loss="sampled", negatives=4), gen=gen)
    rows = []
    for i, o in enumerate([2, 5]):
        cand = [logits[i, o]] + [logits[i, j] for j in negs.tolist() if j != o]
        rows.append(-torch.stack(cand).log_softmax(0)[0])
    assert sampled.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_score_mappings_hand_values_and_range():
    """sigmoid(s); softmax: exp(s - max s) (1 for the CM's top item); rank: share of items scored below."""
    torch.manual_seed(0)
    model = SASRec(30, CollabConfig(max_len=8)).eval()
    hist, hist_len = torch.tensor([[3, 7, 1, -1]]), torch.tensor([3])
    full = model.full_scores(hist, hist_len)[0]
    top, bottom = int(full.argmax()), int(full.argmin())
    items = torch.tensor([[top, bottom, 5]])
    model.cfg.score = "softmax"
    soft = model.score(hist, hist_len, items)[0]
    assert soft[0].item() == pytest.approx(1.0) and soft[2].item() == pytest.approx(float(torch.exp(full[5] - full.max())))
    model.cfg.score = "rank"
    rank = model.score(hist, hist_len, items)[0]
    assert rank[0].item() == pytest.approx(1.0) and rank[1].item() == 0.0
    assert rank[2].item() == pytest.approx(float((full < full[5]).sum()) / 29)
    for mapping in collab.CM_SCORES:
        model.cfg.score = mapping
        r = model.score(hist, hist_len, torch.arange(30)[None])
        assert ((r >= 0) & (r <= 1)).all()


def test_cache_key_follows_the_loss_but_not_the_r_c_mapping(toy):
    ds, _ = toy
    base = CollabConfig(max_len=16)
    assert collab.cm_key(ds, base) == collab.cm_key(ds, CollabConfig(max_len=16, score="rank"))
    assert collab.cm_key(ds, base) != collab.cm_key(ds, CollabConfig(max_len=16, loss="bce"))


def test_seen_mask_and_prefix_items_examples():
    assert collab.seen_mask(torch.tensor([[2, 0, -1]]), 4).tolist() == [[True, False, True, False]]
    seq = torch.tensor([[-1, 4, 5]])
    assert collab.prefix_items(seq, seq >= 0).tolist() == [[-1, 4, -1], [-1, 4, 5]]


def test_filter_seen_ce_and_sampled_losses_leave_the_history_out_of_the_softmax():
    """Position t's softmax runs over the catalogue minus s_1..s_t, worked by hand."""
    torch.manual_seed(0)
    model = SASRec(6, CollabConfig(d=4, max_len=3))
    seq = torch.tensor([[-1, 1, 2]])
    p = torch.tensor([[-1, 2, 5]])
    real = p >= 0
    h = torch.randn(1, 3, 4)
    logits = h[real] @ model.item_emb.weight[:6].T  # (2, 6)
    keep = [[0, 2, 3, 4, 5], [0, 3, 4, 5]]  # position 1 has seen item 1; position 2 items 1 and 2
    want = -(logits[0, keep[0]].log_softmax(0)[1] + logits[1, keep[1]].log_softmax(0)[3]) / 2
    cfg = CollabConfig(loss="ce", filter_seen=True)
    assert collab.cm_loss(model, h, p, real, cfg, seq=seq).item() == pytest.approx(want.item(), rel=1e-5)
    assert collab.cm_loss(model, h, p, real, CollabConfig(loss="ce"), seq=seq).item() != pytest.approx(want.item(), rel=1e-3)
    negs = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(3))
    got = collab.cm_loss(model, h, p, real, CollabConfig(loss="sampled", negatives=8, filter_seen=True),
                         gen=torch.Generator().manual_seed(3), seq=seq)
    rows = []
    for i, (o, seen) in enumerate([(2, {1}), (5, {1, 2})]):
        cand = [logits[i, o]] + [logits[i, j] for j in negs.tolist() if j != o and j not in seen]
        rows.append(-torch.stack(cand).log_softmax(0)[0])
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_filter_seen_ranks_history_items_last_and_gives_them_r_c_zero():
    torch.manual_seed(0)
    model = SASRec(30, CollabConfig(max_len=8, filter_seen=True)).eval()
    hist, hist_len = torch.tensor([[3, 7, 1, -1]]), torch.tensor([3])
    full = model.full_scores(hist, hist_len)[0]
    assert torch.isinf(full[[3, 7, 1]]).all() and torch.isfinite(full[[0, 2, 29]]).all()
    items = torch.tensor([[7, 0, 3]])
    for mapping in collab.CM_SCORES:
        model.cfg.score = mapping
        r = model.score(hist, hist_len, items)[0]
        assert r[0].item() == 0.0 and r[2].item() == 0.0 and r[1].item() > 0.0, mapping
    unfiltered = SASRec(30, CollabConfig(max_len=8)).eval()
    unfiltered.load_state_dict(model.state_dict())
    torch.testing.assert_close(unfiltered.full_scores(hist, hist_len)[0, [0, 2, 29]], full[[0, 2, 29]])


def test_evaluation_filter_helps_only_when_the_history_is_ranked_high(toy, trained):
    """A history item is never a target here, so removing them can only move targets up."""
    ds, splits = toy
    model, _ = trained
    plain = evaluate_full_ranking(model, splits["test"], filter_seen=False)
    filt = evaluate_full_ranking(model, splits["test"], filter_seen=True)
    assert model.cfg.filter_seen is False  # the override is undone
    assert plain == evaluate_full_ranking(model, splits["test"])
    assert filt["hr@10"] >= plain["hr@10"] and filt != plain


def test_cache_key_unchanged_without_filter_seen_and_bucket(toy):
    """A CM cached before --cm-filter-seen and --cm-bucket existed keeps its key; turning either on changes it."""
    import hashlib, json
    from dataclasses import asdict
    ds, _ = toy
    cfg = CollabConfig(max_len=16)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("score", "filter_seen", "bucket", "crossfit")}
    seqs = hashlib.sha256(json.dumps(ds.sequences).encode()).hexdigest()[:16]
    want = hashlib.sha256(json.dumps([ds.name, ds.n_items, old, seqs], sort_keys=True).encode()).hexdigest()[:10]
    assert collab.cm_key(ds, cfg) == want
    assert collab.cm_key(ds, CollabConfig(max_len=16, filter_seen=True)) != want
    assert collab.cm_key(ds, CollabConfig(max_len=16, bucket=True)) != want
    # --cm-crossfit does not change the full CM (its key), only adds fold CMs with keys of their own
    assert collab.cm_key(ds, CollabConfig(max_len=16, crossfit=2)) == want
    folds = {collab.cm_key(ds, cfg, (f, 2)) for f in range(2)}
    assert len(folds) == 2 and want not in folds


def test_sum_reduction_is_the_mean_times_the_positions():
    """--cm-bucket divides the summed loss by the mean positions per batch: the sum must be mean x P."""
    torch.manual_seed(0)
    model = SASRec(30, CollabConfig(max_len=8))
    seq = torch.tensor([[-1, -1, 3, 4, 5], [1, 2, 6, 7, 8]])
    p = torch.tensor([[-1, -1, 4, 5, 9], [2, 6, 7, 8, 10]])
    real = p >= 0
    h = model.encode(seq)
    for loss in ("ce", "bce"):
        cfg = CollabConfig(loss=loss)
        neg = torch.full_like(p, 11)
        mean = collab.cm_loss(model, h, p, real, cfg, neg, seq=seq)
        total = collab.cm_loss(model, h, p, real, cfg, neg, seq=seq, reduction="sum")
        assert torch.allclose(total, mean * int(real.sum()))  # 8 real positions


def test_bucketed_cm_trains_as_well_on_toy(toy, trained):
    """Bucketed batches change the order and grouping, not what is learned: toy accuracy stays close."""
    ds, splits = toy
    _, info = train_sasrec(ds, splits, CollabConfig(**{**TINY.__dict__, "bucket": True}), log=lambda s: None)
    _, plain = trained
    assert info["valid"]["hr@10"] > 0.9 * plain["valid"]["hr@10"]
    assert info["test"] != plain["test"]  # the batches did change


def test_filter_seen_ce_gradient_equals_the_explicitly_masked_softmax():
    """The history mask is written into the logits without autograd: its gradient must still be
    that of cross-entropy over the catalogue minus s_1..s_t (0 at the history items)."""
    torch.manual_seed(0)
    model = SASRec(6, CollabConfig(d=4, max_len=3))
    seq = torch.tensor([[-1, 1, 2], [3, 0, 4]])
    p = torch.tensor([[-1, 2, 5], [0, 4, 1]])
    real = p >= 0
    h = torch.randn(2, 3, 4, requires_grad=True)
    got = torch.autograd.grad(collab.cm_loss(model, h, p, real, CollabConfig(loss="ce", filter_seen=True), seq=seq), h)[0]
    logits = h[real] @ model.item_emb.weight[:6].T  # (P, 6)
    seen = collab.seen_mask(collab.prefix_items(seq, real), 6)  # (P, 6)
    want = torch.autograd.grad(F.cross_entropy(logits.masked_fill(seen, float("-inf")), p[real]), h)[0]
    assert torch.allclose(got, want, atol=1e-7) and got.abs().sum() > 0
    plain = torch.autograd.grad(collab.cm_loss(model, h, p, real, CollabConfig(loss="ce"), seq=seq), h)[0]
    assert not torch.allclose(plain, want, atol=1e-4)  # the mask changes the gradient


def test_taste_oracle_hand_values_and_the_toy_truth(toy):
    """r_c = 1 for an unseen item of a cluster the history shows, else 0; on toy it holds every
    hidden true preference of a one-cluster user whose history shows that cluster."""
    oracle = collab.TasteOracle(np.array([0, 0, 1, 1, 2]), CollabConfig())
    hist = torch.tensor([[0, -1], [2, 4]])  # clusters {0}; clusters {1, 2}
    assert oracle.full_scores(hist, torch.tensor([1, 2])).tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert oracle.score(hist, torch.tensor([1, 2]), torch.tensor([[1, 2], [3, 4]])).tolist() == [[1, 0], [1, 0]]
    ds, _ = toy
    o = collab.TasteOracle(ds.item_cluster, CollabConfig())
    checked = 0
    for seq, liked in zip(ds.sequences, ds.true_prefs):
        if len(set(ds.item_cluster[liked])) == 1:  # one taste cluster: the history shows it
            r = o.full_scores(torch.tensor([seq]), torch.tensor([len(seq)]))[0]
            hidden = sorted(set(liked) - set(seq))
            assert r[hidden].eq(1).all() and r[seq].eq(0).all()
            checked += 1
    assert checked > 100


def test_cross_fitted_cms_leave_their_fold_out_and_score_each_user_with_the_cm_that_never_saw_them(toy):
    """--cm-crossfit: fold f's CM trains without the users u with u mod F = f, and held_out routes each row to it."""
    ds, splits = toy
    left_out = collab.fold_of(np.arange(ds.n_users), 2) == 1
    _, _, users = training_sequences(ds, 16, left_out)
    assert len(users) > 0 and (users % 2 == 0).all()  # only fold 0 is trained on
    assert len(training_sequences(ds, 16)[2]) > len(users)
    sub = collab.user_subset(splits["valid"], left_out)
    assert (sub.user % 2 == 1).all() and len(sub) == int(left_out.sum())
    torch.manual_seed(0)
    full, m0, m1 = (SASRec(ds.n_items, CollabConfig(max_len=16, score="softmax")).eval() for _ in range(3))
    cf = collab.CrossFitCM(full, [m0, m1])
    t = splits["train"]
    rows = np.searchsorted(t.user, np.arange(8))  # one training context of each of users 0..7
    hist, hl = torch.as_tensor(t.hist[rows]), torch.as_tensor(t.hist_len[rows])
    user = torch.as_tensor(t.user[rows])
    items = torch.randint(ds.n_items, (8, 5))
    view = cf.held_out(user)
    got, got_full = view.score(hist, hl, items), view.full_scores(hist, hl)
    for b in range(8):
        m = (m0, m1)[int(user[b]) % 2]
        assert torch.allclose(got[b], m.score(hist[b:b + 1], hl[b:b + 1], items[b:b + 1])[0], atol=1e-6)
        assert torch.allclose(got_full[b], m.full_scores(hist[b:b + 1], hl[b:b + 1])[0], atol=1e-5)
    assert len(set(int(u) % 2 for u in user)) == 2  # both folds are in the batch, so the routing was tested
    # without routing, the object is the full CM (the CM row, inspection, the baselines' rewards)
    assert torch.equal(cf.score(hist, hl, items), full.score(hist, hl, items))
    assert full.held_out(user) is full
