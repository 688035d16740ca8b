"""Tests for data.py: raw preprocessing, loaders, offline errors, split, toy world, real data."""

import gzip
import json
import os
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import data
from data import DataConfig, DataError, Dataset

# ----------------------------------------------------------------------------- raw fixture

# (reviewerID, asin, unixReviewTime) in file order. Core: users u1..u6 x items IA..IE.
# IX has 4 reviews -> dropped in round 1; that leaves V with 4 -> V dropped in round 1 too;
# that leaves IY with 4 -> dropped in round 2 (a single pass would keep it). W and IZ are short.
REVIEWS = [
    ("u2", "IB", 100), ("u1", "IA", 100), ("u2", "IA", 100),  # same-day ties keep file order
    ("u1", "IB", 100), ("u1", "IX", 50), ("u1", "IY", 700), ("u1", "IC", 300),
    ("V", "IX", 10), ("V", "IY", 20), ("V", "IA", 30), ("V", "IB", 40), ("V", "IC", 50),
    ("u2", "IE", 50), ("u2", "ID", 200), ("u2", "IC", 300), ("u2", "IX", 10), ("u2", "IY", 15),
    ("u1", "ID", 400), ("u1", "IE", 500),
    ("u3", "IB", 50), ("u3", "IA", 40), ("u3", "IE", 30), ("u3", "ID", 20), ("u3", "IC", 10),
    ("u3", "IX", 35), ("u3", "IY", 45),
    ("W", "IA", 1), ("W", "IZ", 2),
    ("u4", "IA", 1), ("u4", "IB", 2), ("u4", "IC", 3), ("u4", "ID", 4), ("u4", "IE", 5), ("u4", "IY", 6),
    ("u5", "IE", 1), ("u5", "ID", 2), ("u5", "IC", 3), ("u5", "IB", 4), ("u5", "IA", 5),
    ("u6", "IC", 9), ("u6", "IA", 8), ("u6", "IB", 7), ("u6", "IE", 6), ("u6", "ID", 5),
]
# Expected, worked by hand: users in first-appearance order (u2, u1, V, u3, W, u4, ...), V and W
# filtered out; items numbered by first appearance in the sorted sequences, starting with u2's.
EXPECTED_USERS = ["u2", "u1", "u3", "u4", "u5", "u6"]
EXPECTED_ASINS = ["IE", "IB", "IA", "ID", "IC"]  # u2 sorted: IE(50) IB(100) IA(100) ID(200) IC(300)
E, B, A, D, C = range(5)
EXPECTED_SEQUENCES = [
    [E, B, A, D, C],  # u2
    [A, B, C, D, E],  # u1: IA, IB tie at 100 -> file order
    [C, D, E, A, B],  # u3: file order reversed, times ascending
    [A, B, C, D, E],  # u4
    [E, D, C, B, A],  # u5
    [D, E, B, A, C],  # u6
]

META_LINES = [
    # Python literals, as in meta_Beauty.json.gz; one JSON line (null is not a Python literal).
    "{'asin': 'IA', 'title': 'Nail Cr&egrave;me  Polish ', 'brand': 'Acme', "
    "'categories': [['Beauty', 'Makeup', 'Nails'], ['Beauty', 'Makeup', 'Nail Polish']]}",
    "{'asin': 'ZZZ', 'title': 'Not in the data', 'brand': 'Solo', 'categories': [['Beauty', 'Lips']]}",
    "{'asin': 'IB', 'title': 'Lip Gloss', 'brand': 'Acme', "
    "'categories': [['Beauty', 'Makeup', 'Lips'], ['Beauty', 'Lips']]}",
    "{'asin': 'IC', 'title': 'Solo Serum', 'brand': 'Solo', 'categories': [['Beauty', 'Skin Care', 'Face']]}",
    '{"asin": "ID", "title": "Face Wash", "price": null, "categories": [["Beauty", "Skin Care", "Face"]]}',
    "{'asin': 'IE', 'brand': '', 'categories': [['Beauty', 'Makeup', 'Nails']]}",
    "{'asin': 'IX', 'title': 'Dropped', 'brand': 'Acme', 'categories': [['Beauty', 'Makeup', 'Nail Polish']]}",
]
# attribute_core=2, counted once per KEPT item: Acme 2, Makeup 3, Nails 2, Skin Care 2, Face 2 stay;
# Nail Polish 1 (IX is filtered out), Lips 1 (twice on IB, once per item), Solo 1 (ZZZ unused) go.
EXPECTED_TITLES = {"IA": "Nail Crème Polish", "IB": "Lip Gloss", "IC": "Solo Serum", "ID": "Face Wash", "IE": ""}
EXPECTED_ATTRS = {
    "IA": ["Acme", "Makeup", "Nails"], "IB": ["Acme", "Makeup"], "IC": ["Skin Care", "Face"],
    "ID": ["Skin Care", "Face"], "IE": ["Makeup", "Nails"],
}


def write_raw(folder: Path) -> tuple[Path, Path]:
    """Gzipped reviews (one line written as a Python literal) and a gzipped meta file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}) for u, a, t in REVIEWS]
    lines[7] = repr({"reviewerID": "V", "asin": "IX", "unixReviewTime": 10, "overall": 5.0})
    reviews, meta = folder / data.BEAUTY_REVIEWS, folder / data.BEAUTY_META
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(meta, "wt", encoding="utf-8") as f:
        f.write("\n".join(META_LINES) + "\n")
    return reviews, meta


def test_preprocess_amazon_exact(tmp_path):
    reviews, meta = write_raw(tmp_path)
    sequences, titles, attributes, users, asins = data.preprocess_amazon(reviews, meta, core=5, attribute_core=2)
    assert users == EXPECTED_USERS
    assert asins == EXPECTED_ASINS
    assert sequences == EXPECTED_SEQUENCES
    assert titles == [EXPECTED_TITLES[a] for a in asins]
    assert attributes == [EXPECTED_ATTRS[a] for a in asins]


def test_preprocess_amazon_plain_text_and_core_5_attributes(tmp_path):
    """Plain (not gzipped) files work too; with attribute_core=5 no attribute here survives."""
    reviews, meta = tmp_path / "r.json", tmp_path / "m.json"
    reviews.write_text("\n".join(json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) for u, a, t in REVIEWS))
    meta.write_text("\n".join(META_LINES))
    sequences, _, attributes, _, _ = data.preprocess_amazon(reviews, meta)
    assert sequences == EXPECTED_SEQUENCES
    assert attributes == [[] for _ in range(5)]


def test_malformed_review_line_names_file_and_line(tmp_path):
    path = tmp_path / "reviews.json"
    good = json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 1})
    path.write_text(f"{good}\n\n{good}\n{{\"reviewerID\": \"u\", \"asin\"\n")
    with pytest.raises(DataError) as err:
        data.preprocess_amazon(path, tmp_path / "meta.json")
    assert str(path) in str(err.value) and "line 4" in str(err.value)


def test_review_without_time_is_a_data_error(tmp_path):
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps({"reviewerID": "u", "asin": "a"}) + "\n")
    with pytest.raises(DataError, match="line 1.*unixReviewTime"):
        data.preprocess_amazon(path, tmp_path / "meta.json")


def test_truncated_gzip_is_a_data_error(tmp_path):
    reviews, meta = write_raw(tmp_path)
    reviews.write_bytes(reviews.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.preprocess_amazon(reviews, meta)


# ----------------------------------------------------------------------------- download / offline


def offline_download(url, dest):
    raise DataError(f"could not download {url} to {dest}: [Errno -3] Temporary failure in name resolution")


def test_beauty_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download", offline_download)
    with pytest.raises(DataError) as err:
        data.load_dataset(DataConfig(dataset="beauty", data_dir=str(tmp_path)), verbose=False)
    msg = str(err.value)
    for needle in ["--data-dir", "GFLOWGR_DATA", "reviews_Beauty_5.json.gz", "meta_Beauty.json.gz",
                   "Beauty.inter.json", "beauty_items_joined.jsonl", "../shared/data",
                   "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
                   "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz",
                   "name resolution", str(tmp_path / "beauty" / "raw")]:
        assert needle in msg, needle


def test_beauty_offline_through_urllib(tmp_path, monkeypatch):
    """The real download() fails cleanly when urllib cannot connect, leaving no .part file."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError, match="no network") as err:
        data.load_dataset(DataConfig(dataset="beauty", data_dir=str(tmp_path)), verbose=False)
    assert "GFLOWGR_DATA" in str(err.value)
    assert not list(tmp_path.rglob("*.part"))


def test_download_writes_atomically(tmp_path):
    """Happy path through a file:// URL (no network needed)."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    dest = tmp_path / "sub" / "dest.bin"
    data.download(src.as_uri(), dest)
    assert dest.read_bytes() == b"x" * 5000
    assert not (tmp_path / "sub" / "dest.bin.part").exists()
    with pytest.raises(DataError, match="could not download"):
        data.download((tmp_path / "missing.bin").as_uri(), tmp_path / "other.bin")
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()


def test_beauty_built_from_raw_then_cached(tmp_path, monkeypatch):
    """Missing processed files: 'download' (here a copy of the fixture), preprocess, write, reload."""
    fixture = tmp_path / "fixture"
    write_raw(fixture)
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixture / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(data, "download", fake_download)
    root = tmp_path / "data"
    # the fixture's item 0 ("IE") has no metadata, so no text: load_dataset stops and names it
    with pytest.raises(DataError, match="1 items have no text .* item 0"):
        data.load_dataset(DataConfig(dataset="beauty", data_dir=str(root)), verbose=False)
    ds = data._load_beauty(root, verbose=False)  # the loader itself, before that check
    assert calls == [data.AMAZON_URL + data.BEAUTY_REVIEWS, data.AMAZON_URL + data.BEAUTY_META]
    assert ds.sequences == EXPECTED_SEQUENCES
    assert ds.titles == [EXPECTED_TITLES[a] for a in EXPECTED_ASINS]
    assert (root / "beauty" / data.BEAUTY_INTER).is_file() and not list(root.rglob("*.part"))
    first = json.loads((root / "beauty" / data.BEAUTY_ITEMS).read_text().splitlines()[0])
    assert first == {"letter_id": 0, "p5_id": 1, "asin": "IE", "title": "", "attributes": []}

    # Second load reads the processed files: no download, same data.
    monkeypatch.setattr(data, "download", offline_download)
    again = data._load_beauty(root, verbose=False)
    assert again.sequences == ds.sequences and again.texts() == ds.texts()


def test_yelp_missing_says_what_to_do(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_dataset(DataConfig(dataset="yelp", data_dir=str(tmp_path)), verbose=False)
    msg = str(err.value)
    for needle in ["--data-dir", "GFLOWGR_DATA", "https://www.yelp.com/dataset", "sequential_data.txt",
                   "Yelp.item.json", "../shared/data"]:
        assert needle in msg, needle


def test_unknown_dataset():
    with pytest.raises(DataError, match="toy, beauty, yelp"):
        data.load_dataset(DataConfig(dataset="movies"), verbose=False)


def test_resolve_data_dir_precedence(monkeypatch):
    monkeypatch.setenv("GFLOWGR_DATA", "/from/env")
    assert data.resolve_data_dir("/from/flag") == Path("/from/flag")
    assert data.resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("GFLOWGR_DATA")
    assert data.resolve_data_dir(None) == Path("data")


# ----------------------------------------------------------------------------- processed-file loaders


def test_beauty_loader_cleans_titles(tmp_path):
    folder = tmp_path / "beauty"
    folder.mkdir()
    (folder / data.BEAUTY_INTER).write_text(json.dumps({"1": [2, 1, 0], "0": [0, 1, 2, 1]}))
    rows = [
        {"letter_id": 0, "title": "Hand Cr&egrave;me  and  more,", "attributes": ["Acme", "Skin Care", "Acme"]},
        {"letter_id": 1, "title": "- \\t LOTION \\nVanilla ", "attributes": ["Bath & Body"]},
        {"letter_id": 2, "title": "", "attributes": ["Tools & Accessories", "Brushes"]},
    ]
    (folder / data.BEAUTY_ITEMS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.load_dataset(DataConfig(dataset="beauty", data_dir=str(tmp_path)), verbose=False)
    assert ds.sequences == [[0, 1, 2, 1], [2, 1, 0]]  # users in numeric order
    assert ds.titles == ["Hand Crème and more", "- LOTION Vanilla", ""]
    assert ds.texts() == ["Hand Crème and more Acme Skin Care", "- LOTION Vanilla Bath & Body",
                          "Tools & Accessories Brushes"]
    assert ds.stats() == {"users": 2, "items": 3, "interactions": 7, "avg_len": 3.5, "sparsity": 1 - 7 / 6}


def test_beauty_loader_bad_line(tmp_path):
    folder = tmp_path / "beauty"
    folder.mkdir()
    (folder / data.BEAUTY_INTER).write_text(json.dumps({"0": [0, 0, 0]}))
    (folder / data.BEAUTY_ITEMS).write_text('{"letter_id": 0, "title": "a", "attributes": []}\n{"letter_id": 1\n')
    with pytest.raises(DataError, match="line 2"):
        data.load_dataset(DataConfig(dataset="beauty", data_dir=str(tmp_path)), verbose=False)


def test_yelp_loader_shifts_ids(tmp_path):
    folder = tmp_path / "yelp"
    folder.mkdir()
    (folder / data.YELP_SEQUENCES).write_text("1 1 2 1 3\n2 3 2 1\n")
    items = {"0": {"title": "Sal's Pizza", "description": "Pizza, Restaurants"},
             "1": {"title": "Cafe", "description": "Coffee & Tea"}, "2": {"title": "Bar", "description": ""}}
    (folder / data.YELP_ITEMS).write_text(json.dumps(items))
    ds = data.load_dataset(DataConfig(dataset="yelp", data_dir=str(tmp_path)), verbose=False)
    assert ds.sequences == [[0, 1, 0, 2], [2, 1, 0]]
    assert ds.attributes == [["Pizza", "Restaurants"], ["Coffee & Tea"], []]
    assert ds.texts()[0] == "Sal's Pizza Pizza Restaurants"


# ----------------------------------------------------------------------------- split


def hand_dataset() -> Dataset:
    seqs = [[0, 1, 2, 3, 4, 5], [5, 4, 3], [1, 2, 3, 4, 0, 1, 2]]
    return Dataset("hand", seqs, [f"item {i}" for i in range(6)], [[] for _ in range(6)])


def test_split_leave_one_out_exact():
    splits = data.split_leave_one_out(hand_dataset(), max_his_len=3)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    assert [len(train), len(valid), len(test)] == [3 + 0 + 4, 3, 3]
    # user 0: prefixes of [0,1,2,3]; user 1: none; user 2: prefixes of [1,2,3,4,0], last one cut.
    assert train.hist.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2],
                                   [1, -1, -1], [1, 2, -1], [1, 2, 3], [2, 3, 4]]
    assert train.hist_len.tolist() == [1, 2, 3, 1, 2, 3, 3]
    assert train.target.tolist() == [1, 2, 3, 2, 3, 4, 0]
    assert train.user.tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert valid.hist.tolist() == [[1, 2, 3], [5, -1, -1], [3, 4, 0]]
    assert valid.hist_len.tolist() == [3, 1, 3] and valid.target.tolist() == [4, 4, 1]
    assert test.hist.tolist() == [[2, 3, 4], [5, 4, -1], [4, 0, 1]]
    assert test.hist_len.tolist() == [3, 2, 3] and test.target.tolist() == [5, 3, 2]
    assert test.user.tolist() == [0, 1, 2]
    for s in splits.values():
        assert s.hist.dtype == np.int64 and s.target.dtype == np.int64 and s.hist.shape == (len(s), 3)


def test_split_needs_three_items():
    ds = Dataset("short", [[0, 1, 2], [1, 0]], ["a", "b", "c"], [[], [], []])
    with pytest.raises(DataError, match="user 1 has 2"):
        data.split_leave_one_out(ds)


def test_item_popularity_counts_training_part_only():
    # items[:-2]: [0,1,2,3], [5], [1,2,3,4,0]
    assert data.item_popularity(hand_dataset()).tolist() == [2, 2, 2, 2, 1, 1]


# ----------------------------------------------------------------------------- toy world


def test_toy_deterministic_and_fast():
    t0 = time.perf_counter()
    a = data.make_toy(400, 240, seed=3)
    assert time.perf_counter() - t0 < 1.0
    b = data.make_toy(400, 240, seed=3)
    c = data.make_toy(400, 240, seed=4)
    assert a.sequences == b.sequences and a.titles == b.titles and a.true_prefs == b.true_prefs
    assert np.array_equal(a.item_pop_weight, b.item_pop_weight)
    assert a.sequences != c.sequences
    assert (a.n_users, a.n_items) == (400, 240)


def test_toy_exposure_bias_and_shape():
    ds = data.make_toy(400, 240, seed=0)
    w = ds.item_pop_weight
    assert w.shape == (240,) and w.max() == 1.0 and (w > 0).all()
    observed_w, hidden_w = [], []
    for seq, prefs in zip(ds.sequences, ds.true_prefs):
        assert len(seq) >= 5 and len(set(seq)) == len(seq)
        assert set(seq) <= set(prefs)
        hidden = sorted(set(prefs) - set(seq))
        assert hidden, "every user should keep some liked items unobserved"
        observed_w.append(w[seq].mean())
        hidden_w.append(w[hidden].mean())
    # Exposure bias: observed liked items are far more popular than the hidden liked ones.
    assert np.mean(observed_w) > 3 * np.mean(hidden_w)
    assert 20 <= np.mean([len(p) for p in ds.true_prefs]) <= 40
    assert all(len(t.split()) >= 4 for t in ds.texts())


def test_toy_has_sequential_signal():
    """A bigram model (next item given the last one) beats MostPop clearly on the test targets."""
    ds = data.make_toy(400, 240, seed=0)
    test = data.split_leave_one_out(ds)["test"]
    pop = data.item_popularity(ds).astype(float)
    transitions = np.zeros((ds.n_items, ds.n_items))
    for seq in ds.sequences:
        for a, b in zip(seq[:-2], seq[1:-1]):  # pairs inside items[:-1]: never the test target
            transitions[a, b] += 1
    last = test.hist[np.arange(len(test)), test.hist_len - 1]
    bigram_scores = transitions[last] + 1e-3 * pop  # popularity breaks ties
    hr_bigram = np.mean([t in np.argsort(-s)[:10] for s, t in zip(bigram_scores, test.target)])
    hr_pop = np.mean(np.isin(test.target, np.argsort(-pop)[:10]))
    assert hr_bigram > 2 * hr_pop and hr_bigram > 0.3


def test_toy_via_load_dataset_prints_stats(capsys):
    ds = data.load_dataset(DataConfig(dataset="toy", toy_users=50, toy_items=60, toy_seed=1))
    out = capsys.readouterr().out
    assert out.startswith("toy: 50 users, 60 items, ") and "sparsity" in out
    assert ds.n_users == 50 and ds.n_items == 60


# ----------------------------------------------------------------------------- real data (optional)


def real_dir(*files: str) -> Path:
    root = os.environ.get("GFLOWGR_DATA")
    if not root:
        pytest.skip("real-data test: set GFLOWGR_DATA to a folder with beauty/ and yelp/ (e.g. ../shared/data)")
    missing = [f for f in files if not (Path(root) / f).is_file()]
    if missing:
        pytest.skip(f"real-data test: {', '.join(missing)} not found under GFLOWGR_DATA={root}")
    return Path(root)


def test_real_beauty():
    root = real_dir("beauty/Beauty.inter.json", "beauty/beauty_items_joined.jsonl")
    ds = data.load_dataset(DataConfig(dataset="beauty", data_dir=str(root)), verbose=False)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (22_363, 12_101, 198_502)
    splits = data.split_leave_one_out(ds, max_his_len=20)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [131_413, 22_363, 22_363]
    full_test_len = np.array([len(s) - 1 for s in ds.sequences])
    assert int((full_test_len > 20).sum()) == 1_019
    assert np.array_equal(splits["test"].hist_len, np.minimum(full_test_len, 20))
    assert ds.sequences[0] == [0, 1, 2, 3, 4] and ds.sequences[1] == [5, 6, 7, 8, 9, 3, 10]
    assert ds.texts()[0] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce OPI Makeup Nails Nail Polish"
    assert not any("&egrave;" in t or "\\t" in t for t in ds.titles)
    assert ds.titles[494] == "" and ds.texts()[494]  # empty title: attributes only
    assert data.item_popularity(ds).sum() == 198_502 - 2 * 22_363


def test_real_yelp():
    root = real_dir("yelp/sequential_data.txt", "yelp/Yelp.item.json")
    ds = data.load_dataset(DataConfig(dataset="yelp", data_dir=str(root)), verbose=False)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (30_431, 20_033, 316_354)
    splits = data.split_leave_one_out(ds)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [225_061, 30_431, 30_431]
    assert ds.titles[0] == "The Great Greek" and ds.attributes[0] == ["Diners", "Greek", "Mediterranean", "Restaurants"]


def test_users_with_fewer_than_three_interactions_are_dropped_with_a_count(capsys):
    ds = Dataset("short", [[0, 1, 2], [1, 0], [2], [2, 1, 0, 1]], ["a", "b", "c"], [[], [], []],
                 true_prefs=[[0, 1, 2], [0, 1], [2], [0, 1, 2]])
    kept = data.check_dataset(ds)
    assert kept.sequences == [[0, 1, 2], [2, 1, 0, 1]] and kept.true_prefs == [[0, 1, 2], [0, 1, 2]]
    assert "dropped 2 users with fewer than 3 interactions" in capsys.readouterr().out
    assert {k: len(v) for k, v in data.split_leave_one_out(kept).items()} == {"train": 1, "valid": 2, "test": 2}
    with pytest.raises(DataError, match="no user has 3 or more"):
        data.check_dataset(Dataset("tiny", [[0, 1]], ["a", "b"], [[], []]), verbose=False)


def test_items_without_text_are_named():
    ds = Dataset("notext", [[0, 1, 2]], ["a", "", " "], [["brand"], [], []])
    with pytest.raises(DataError, match=r"2 items have no text .* e\.g\. item 1, 2\. .*add a title or attributes"):
        data.check_dataset(ds)
    # a title-less item described by its attributes (7 such items in Beauty) is fine
    assert data.check_dataset(Dataset("ok", [[0, 1, 2]], ["a", "", "c"], [[], ["Brand X"], []]), verbose=False).n_items == 3
