"""Data: Amazon Beauty, Yelp and a generated `toy` world, split leave-one-out (paper Sec. 4.1).

GFlowGR follows the data processing and split of earlier generative recommenders
(TIGER, LETTER, LC-Rec; paper Sec. 4.1, refs [42, 51]):

* every user's interactions are ordered in time and 5-core filtered (each user and each
  item has at least 5 interactions);
* leave-one-out: the last item of each user is the test target, the one before it the
  validation target, and every earlier prefix is a training sample;
* every history is cut to its last ``max_his_len = 20`` items.

A data set here is just per-user item sequences (0-based ids) plus per-item text (title and
brand / category attributes), which the tokenizer embeds to build semantic IDs. Real data is
read from a data directory (``--data-dir``, else ``$GFLOWGR_DATA``, else ``data/``); where
Beauty's processed files are missing the public raw files are downloaded and preprocessed
the S3-Rec / P5 / LETTER way (``preprocess_amazon``). The ``toy`` world is generated: it has
taste clusters (so semantic IDs mean something), a sequential structure (so a sequential
model beats popularity) and exposure bias (observed items are the popular part of a larger
hidden set of true preferences, the situation GFlowGR's augmented items address).

One concept at ~680 lines: every data set the paper uses reaches the rest of the code as the
same `Dataset` and `Split`; the three loaders and the toy generator share that contract and
its checks, so they live together.

Usage:  ds = load_dataset(DataConfig(dataset="beauty")); splits = split_leave_one_out(ds)
"""

import ast
import dataclasses
import gzip
import html
import itertools
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("toy", "beauty", "yelp")
ENV_VAR = "GFLOWGR_DATA"

# Beauty, processed (LETTER format; what load_dataset reads).
BEAUTY_INTER = "Beauty.inter.json"
BEAUTY_ITEMS = "beauty_items_joined.jsonl"
# Beauty, raw (McAuley lab 2014 Amazon release; what the processed files are built from).
AMAZON_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
BEAUTY_REVIEWS = "reviews_Beauty_5.json.gz"
BEAUTY_META = "meta_Beauty.json.gz"
# Yelp (P5 / S3-Rec interactions + LETTER item text); its licence rules out auto-download.
YELP_SEQUENCES = "sequential_data.txt"
YELP_ITEMS = "Yelp.item.json"
YELP_URL = "https://www.yelp.com/dataset"


@dataclass
class DataConfig:
    dataset: str = field(default="toy", metadata={"help": "data set: toy | beauty | yelp"})
    data_dir: str | None = field(
        default=None,
        metadata={"help": f"folder holding beauty/ and yelp/ (default: ${ENV_VAR}, else data/)"},
    )
    max_his_len: int = field(
        default=20, metadata={"help": "histories are cut to their last N items (LETTER/LC-Rec: 20)"}
    )
    toy_users: int = field(default=400, metadata={"help": "toy world: number of users"})
    toy_items: int = field(default=240, metadata={"help": "toy world: number of items"})
    toy_seed: int = field(default=0, metadata={"help": "toy world: generator seed"})


class DataError(Exception):
    """A problem the user can fix (missing files, malformed line...).

    str(e) is a complete message that says what is wrong and what to do; callers print it
    instead of a traceback.
    """


@dataclass
class Dataset:
    """Per-user item sequences plus per-item text; ids are 0-based and contiguous."""

    name: str
    sequences: list[list[int]]  # per user, chronological
    titles: list[str]  # per item
    attributes: list[list[str]]  # per item (Beauty: brand, then category path; Yelp: categories)
    # Toy world only: each user's hidden TRUE preferences (a superset of what was observed)
    # and the exposure propensity that decided which of them got observed.
    true_prefs: list[list[int]] | None = None
    item_pop_weight: np.ndarray | None = None
    item_cluster: np.ndarray | None = None  # the taste cluster of each item (collab.TasteOracle)

    def __post_init__(self) -> None:
        if len(self.titles) != len(self.attributes):
            raise ValueError(f"{len(self.titles)} titles but {len(self.attributes)} attribute lists")

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def texts(self) -> list[str]:
        """Per item, the text the tokenizer embeds: title then attributes, whitespace-normalised.

        Items without a title (7 in Beauty) are described by their attributes alone.
        """
        return [" ".join(f"{t} {' '.join(a)}".split()) for t, a in zip(self.titles, self.attributes)]

    def stats(self) -> dict:
        n_inter = self.n_interactions
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "avg_len": n_inter / max(self.n_users, 1),
            "sparsity": 1.0 - n_inter / max(self.n_users * self.n_items, 1),
        }


@dataclass
class Split:
    """One set of (history, target) samples; histories are left-aligned, oldest -> newest."""

    hist: np.ndarray  # (N, max_his_len) int64, padded with -1 on the right
    hist_len: np.ndarray  # (N,) int64, in 1..max_his_len
    target: np.ndarray  # (N,) int64
    user: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.target)


# ----------------------------------------------------------------------------- loading


def resolve_data_dir(flag: str | None) -> Path:
    """The data directory: the --data-dir flag, else $GFLOWGR_DATA, else ./data."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path("data")


def load_dataset(cfg: DataConfig, verbose: bool = True) -> Dataset:
    """Load (or generate) ``cfg.dataset``; prints one stats line when ``verbose``."""
    if cfg.dataset == "toy":
        ds = make_toy(cfg.toy_users, cfg.toy_items, cfg.toy_seed)
    elif cfg.dataset == "beauty":
        ds = _load_beauty(resolve_data_dir(cfg.data_dir), verbose)
    elif cfg.dataset == "yelp":
        ds = _load_yelp(resolve_data_dir(cfg.data_dir))
    else:
        raise DataError(f"unknown data set {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    ds = check_dataset(ds, verbose)
    if verbose:
        print(stats_line(ds))
    return ds


def check_dataset(ds: Dataset, verbose: bool = True) -> Dataset:
    """Reject items without text; drop users with fewer than 3 interactions, saying how many.

    The tokenizer embeds each item's text, so an item with neither title nor attributes has no
    semantic ID to learn. Leave-one-out needs a training, a validation and a test item per
    user; shorter users are dropped, as the standard preprocessing (5-core) does.
    """
    empty = [i for i, text in enumerate(ds.texts()) if not text]
    if empty:
        raise DataError(f"{ds.name}: {len(empty)} items have no text (no title and no attributes), e.g. item "
                        f"{', '.join(map(str, empty[:5]))}. The tokenizer needs a text per item: add a title or "
                        f"attributes in the items file, or remove those items.")
    keep = [u for u, s in enumerate(ds.sequences) if len(s) >= 3]
    if len(keep) < ds.n_users:
        if verbose:
            print(f"{ds.name}: dropped {ds.n_users - len(keep):,} users with fewer than 3 interactions "
                  f"(leave-one-out needs a train, a valid and a test item each)")
        ds = dataclasses.replace(ds, sequences=[ds.sequences[u] for u in keep],
                                 true_prefs=[ds.true_prefs[u] for u in keep] if ds.true_prefs is not None else None)
    if not ds.n_users:
        raise DataError(f"{ds.name}: no user has 3 or more interactions, so there is nothing to train or test on")
    return ds


def stats_line(ds: Dataset) -> str:
    """E.g. 'beauty: 22,363 users, 12,101 items, 198,502 interactions (avg len 8.88, sparsity 99.93%)'."""
    s = ds.stats()
    return (
        f"{ds.name}: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
        f"(avg len {s['avg_len']:.2f}, sparsity {s['sparsity']:.2%})"
    )


def _clean_text(text: str) -> str:
    """Decode HTML entities (Beauty titles keep e.g. 'Cr&egrave;me') and normalise whitespace."""
    text = html.unescape(text)
    # A few scraped titles hold a literal backslash-n / backslash-t (two characters).
    text = text.replace("\\n", " ").replace("\\t", " ").replace("\\r", " ")
    return " ".join(text.split())


def _clean_title(text: str) -> str:
    # About 9 Beauty titles end in a stray comma where the scraping regex stopped at ", '".
    return _clean_text(text).rstrip(", ")


def _dedup(values) -> list[str]:
    """Keep the first occurrence of each value, in order (a category can recur across paths)."""
    return list(dict.fromkeys(values))


def _load_beauty(root: Path, verbose: bool) -> Dataset:
    folder = root / "beauty"
    inter_path, items_path = folder / BEAUTY_INTER, folder / BEAUTY_ITEMS
    if not (inter_path.is_file() and items_path.is_file()):
        _build_beauty(root, verbose)

    try:
        raw = json.loads(inter_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(
            f"cannot read {inter_path}: {err}. Delete it to rebuild it from the raw files, or "
            f"point --data-dir / ${ENV_VAR} to a folder with a good copy."
        ) from err
    # LETTER keys users by their 0-based id as a string; order by the number, not the string.
    users = sorted(raw, key=int)
    if [int(u) for u in users] != list(range(len(users))):
        raise DataError(f"{inter_path}: user ids must be 0..{len(users) - 1} (LETTER format)")
    sequences = [[int(i) for i in raw[u]] for u in users]

    titles: list[str] = []
    attributes: list[list[str]] = []
    for lineno, line in _numbered_lines(items_path):
        try:
            row = json.loads(line)
            letter_id, title, attrs = row["letter_id"], row["title"], row["attributes"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{items_path}, line {lineno}: expected a JSON object with letter_id, title and "
                f"attributes ({err}). Delete the file to rebuild it from the raw files."
            ) from err
        if letter_id != len(titles):
            raise DataError(f"{items_path}, line {lineno}: letter_id {letter_id}, expected {len(titles)}")
        titles.append(_clean_title(title))
        attributes.append(_dedup(_clean_text(a) for a in attrs))

    ds = Dataset("beauty", sequences, titles, attributes)
    _check_item_range(ds, inter_path)
    return ds


def _load_yelp(root: Path) -> Dataset:
    folder = root / "yelp"
    seq_path, items_path = folder / YELP_SEQUENCES, folder / YELP_ITEMS
    if not (seq_path.is_file() and items_path.is_file()):
        raise DataError(
            f"Yelp data not found: expected {seq_path} and {items_path}.\n"
            f"The Yelp Open Dataset cannot be downloaded automatically: its licence must be accepted "
            f"at {YELP_URL}.\n"
            f"To fix it, either put {YELP_SEQUENCES} (P5 / S3-Rec format, 1-based ids: 'user item "
            f"item ...') and {YELP_ITEMS} (LETTER format: id -> title, description) into {folder}, "
            f"or point to a folder that holds yelp/{YELP_SEQUENCES} and yelp/{YELP_ITEMS} with "
            f"--data-dir DIR or the {ENV_VAR} environment variable "
            f"(in this project ../shared/data holds a ready copy: --data-dir ../shared/data)."
        )

    # P5 ids are 1-based; LETTER id = P5 id - 1 (checked in shared/data/README.md, section 4).
    rows: dict[int, list[int]] = {}
    for lineno, line in _numbered_lines(seq_path):
        try:
            user, *items = (int(tok) - 1 for tok in line.split())
        except ValueError as err:
            raise DataError(f"{seq_path}, line {lineno}: expected integer ids 'user item item ...' ({err}). "
                            f"Fix that line, or point --data-dir / ${ENV_VAR} to a folder with a good copy.") from err
        rows[user] = items
    if sorted(rows) != list(range(len(rows))):
        raise DataError(f"{seq_path}: user ids must be 1..{len(rows)} (P5 format)")
    sequences = [rows[u] for u in range(len(rows))]

    try:
        raw = json.loads(items_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {items_path}: {err}. Point --data-dir / ${ENV_VAR} to a folder with a good copy.") from err
    if sorted(map(int, raw)) != list(range(len(raw))):
        raise DataError(f"{items_path}: item ids must be 0..{len(raw) - 1} (LETTER format)")
    titles, attributes = [], []
    for i in range(len(raw)):
        entry = raw[str(i)]
        titles.append(_clean_title(entry.get("title", "")))
        # The description is the business's categories, comma-joined.
        cats = (_clean_text(c) for c in entry.get("description", "").split(", "))
        attributes.append(_dedup(c for c in cats if c))

    ds = Dataset("yelp", sequences, titles, attributes)
    _check_item_range(ds, seq_path)
    return ds


def _check_item_range(ds: Dataset, path: Path) -> None:
    bad = [i for s in ds.sequences for i in s if not 0 <= i < ds.n_items]
    if bad:
        raise DataError(
            f"{path}: {len(bad)} interactions name item ids outside 0..{ds.n_items - 1} "
            f"(e.g. {bad[0]}); the interaction and item files do not belong together."
        )


def _numbered_lines(path: Path):
    """Yield (1-based line number, line) for the non-blank lines of a text file, gzipped or not."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"cannot read {path}: {err}. The file may be truncated or corrupt; delete it and "
            f"download it again."
        ) from err


# ----------------------------------------------------------------------------- Beauty from raw


def _beauty_missing_message(root: Path, reason: str) -> str:
    folder, raw = root / "beauty", root / "beauty" / "raw"
    return (
        f"Beauty data not found in {folder}: the processed files {BEAUTY_INTER} and "
        f"{BEAUTY_ITEMS} are missing, so the raw files {BEAUTY_REVIEWS} and {BEAUTY_META} were "
        f"needed in {raw}, and downloading them failed:\n  {reason}\n"
        f"To fix it, either\n"
        f"  - download these two files by hand into {raw}:\n"
        f"      {AMAZON_URL}{BEAUTY_REVIEWS}\n"
        f"      {AMAZON_URL}{BEAUTY_META}\n"
        f"    and run again (they are preprocessed once, on first use), or\n"
        f"  - point to a folder that holds beauty/{BEAUTY_INTER} and beauty/{BEAUTY_ITEMS} with "
        f"--data-dir DIR or the {ENV_VAR} environment variable "
        f"(in this project ../shared/data holds a ready copy: --data-dir ../shared/data)."
    )


def _build_beauty(root: Path, verbose: bool) -> None:
    """Download the raw Beauty files if needed, preprocess them, write the processed files."""
    folder, raw = root / "beauty", root / "beauty" / "raw"
    for name in (BEAUTY_REVIEWS, BEAUTY_META):
        if not (raw / name).is_file():
            if verbose:
                print(f"downloading {AMAZON_URL}{name} -> {raw / name}")
            try:
                download(AMAZON_URL + name, raw / name)
            except DataError as err:
                raise DataError(_beauty_missing_message(root, str(err))) from err

    if verbose:
        print(f"preprocessing {raw} (5-core, chronological; done once)")
    sequences, titles, attributes, _, asins = preprocess_amazon(raw / BEAUTY_REVIEWS, raw / BEAUTY_META)
    inter = json.dumps({str(u): seq for u, seq in enumerate(sequences)})
    items = "".join(
        json.dumps({"letter_id": i, "p5_id": i + 1, "asin": a, "title": t, "attributes": attrs}) + "\n"
        for i, (a, t, attrs) in enumerate(zip(asins, titles, attributes))
    )
    try:
        # Items first: the interactions file is what marks the folder as processed.
        _atomic_write_text(folder / BEAUTY_ITEMS, items)
        _atomic_write_text(folder / BEAUTY_INTER, inter)
    except OSError as err:
        raise DataError(f"cannot write the processed Beauty files into {folder}: {err}") from err


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to <path>.part, then rename: a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` (via ``dest.part`` then rename); DataError on any failure."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
            expected = response.headers.get("Content-Length") if response.headers else None
        # A dropped connection can end the stream early without an exception.
        if expected is not None and part.stat().st_size != int(expected):
            raise OSError(f"got {part.stat().st_size:,} of {int(expected):,} bytes")
        os.replace(part, dest)
    except (OSError, ValueError) as err:  # URLError, HTTPError and timeouts are all OSErrors
        part.unlink(missing_ok=True)
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise DataError(f"could not download {url} to {dest}: {reason}") from err


def _parse_record(line: str, path: Path, lineno: int, literal_first: bool) -> dict:
    """One raw record: JSON or a Python dict literal (the 2014 meta files are the latter)."""
    parsers = [json.loads, ast.literal_eval]
    if literal_first:
        parsers.reverse()
    for parse in parsers:
        try:
            record = parse(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(record, dict):
            return record
    raise DataError(
        f"{path}, line {lineno}: cannot parse {line.strip()[:80]!r} as a JSON object or a Python "
        f"dict literal. The file may be truncated or corrupt; delete it and download it again."
    )


def _k_core(user_items: dict[str, list[str]], core: int) -> dict[str, list[str]]:
    """Iterative k-core: drop items, then users, with < ``core`` interactions, until stable.

    One pass is not enough: dropping an item can push a user below ``core``, and dropping that
    user can push another item below. The fixed point (the largest sub-data-set where everyone
    has >= core interactions) does not depend on the order of removals.
    """
    while True:
        item_count = Counter(i for items in user_items.values() for i in items)
        kept = {}
        for user, items in user_items.items():
            items = [i for i in items if item_count[i] >= core]
            if len(items) >= core:
                kept[user] = items
        if sum(map(len, kept.values())) == sum(map(len, user_items.values())):
            return kept
        user_items = kept


def preprocess_amazon(
    reviews_path: Path, meta_path: Path, core: int = 5, attribute_core: int = 5
) -> tuple[list[list[int]], list[str], list[list[str]], list[str], list[str]]:
    """Raw Amazon 2014 files -> (sequences, titles, attributes, user raw ids, item asins).

    The S3-Rec ``data_process.py`` recipe that P5 and LETTER share (shared/data/README.md,
    section 5), so ids match the released files:
    1. reviews: one JSON object (or Python literal) per line -> (reviewerID, asin, unixReviewTime);
    2. group by user in order of first appearance; stable-sort each user's items by time
       (day granularity, so ties keep file order);
    3. iterative ``core``-core over users and items;
    4. users numbered in that order; items numbered by first appearance scanning the sorted
       sequences user by user (ids are 0-based, LETTER style);
    5. attributes: brand, then every category path entry without the root ("Beauty"),
       each once per item, kept when it occurs on >= ``attribute_core`` items.
    """
    by_user: dict[str, list[tuple[int, str]]] = {}
    for lineno, line in _numbered_lines(reviews_path):
        review = _parse_record(line, reviews_path, lineno, literal_first=False)
        try:
            user, asin, t = review["reviewerID"], review["asin"], int(review["unixReviewTime"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{reviews_path}, line {lineno}: a review needs reviewerID, asin and an integer "
                f"unixReviewTime ({err!r})"
            ) from err
        by_user.setdefault(user, []).append((t, asin))
    # list.sort is stable: same-day reviews keep their order in the file.
    user_items = {u: [a for _, a in sorted(rows, key=lambda r: r[0])] for u, rows in by_user.items()}
    user_items = _k_core(user_items, core)
    # Leave-one-out needs 1 train + 1 valid + 1 test item; only a core below 3 lets shorter users in.
    user_items = {u: items for u, items in user_items.items() if len(items) >= 3}

    asins = list(dict.fromkeys(a for items in user_items.values() for a in items))
    item_id = {a: i for i, a in enumerate(asins)}
    sequences = [[item_id[a] for a in items] for items in user_items.values()]

    # The meta file covers every Beauty product (~250k); parse only the lines we need.
    asin_re = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
    meta: dict[str, dict] = {}
    for lineno, line in _numbered_lines(meta_path):
        m = asin_re.search(line)
        if m and m.group(1) not in item_id:
            continue
        record = _parse_record(line, meta_path, lineno, literal_first=True)
        if record.get("asin") in item_id:
            meta[record["asin"]] = record

    titles, candidates = [], []
    for a in asins:
        info = meta.get(a, {})
        titles.append(_clean_title(str(info.get("title", ""))))
        brand = _clean_text(str(info.get("brand", "")))
        cats = [_clean_text(str(c)) for path in info.get("categories", []) for c in path[1:]]
        candidates.append(_dedup(x for x in [brand, *cats] if x))
    counts = Counter(x for attrs in candidates for x in attrs)
    attributes = [[x for x in attrs if counts[x] >= attribute_core] for attrs in candidates]
    return sequences, titles, attributes, list(user_items), asins


# ----------------------------------------------------------------------------- toy world

# One theme per taste cluster: (category, brands, cluster words, one product noun per stage).
# Stages are a routine's steps (cleanser -> toner -> serum -> night cream): users move through
# them in order, which is the sequential signal; the nouns put the stage into the text too.
_TOY_THEMES = [
    ("Nails", ["Lacquerly", "Polish Lab", "Tipsy"],
     ["nail", "lacquer", "glossy", "chip-proof", "manicure", "cuticle"],
     ["base coat", "nail color", "top coat", "polish remover"]),
    ("Skin Care", ["Dermalux", "PureLeaf", "Aquabloom"],
     ["hydrating", "facial", "glow", "hyaluronic", "gentle", "radiance"],
     ["cleanser", "toner", "serum", "night cream"]),
    ("Hair Care", ["Silkroot", "Mane Co", "Curlwise"],
     ["hair", "keratin", "frizz", "shine", "argan", "volumizing"],
     ["shampoo", "conditioner", "hair mask", "styling spray"]),
    ("Fragrance", ["Aurelle", "Noir Musk", "Petalia"],
     ["eau", "floral", "musk", "citrus", "scent", "amber"],
     ["sample vial", "rollerball", "eau de toilette", "eau de parfum"]),
    ("Makeup", ["Chroma", "Velvet Lab", "Bloomface"],
     ["matte", "pigment", "blendable", "contour", "shade", "long-wear"],
     ["primer", "foundation", "concealer", "setting powder"]),
    ("Bath & Body", ["Soapstone", "Oatfield", "Driftwood"],
     ["body", "lather", "shea", "lavender", "bubble", "soothing"],
     ["body wash", "body scrub", "body lotion", "body oil"]),
    ("Tools & Accessories", ["Brushworks", "ProGrip", "Lumina"],
     ["brush", "bristle", "ergonomic", "precision", "steel", "vegan"],
     ["starter brush", "blending sponge", "tweezer set", "pro brush kit"]),
    ("Men's Grooming", ["Ironwood", "Beardsmith", "Gentry"],
     ["beard", "shave", "razor", "grooming", "cedar", "barber"],
     ["razor", "shave cream", "aftershave", "beard oil"]),
]
# Words any item may carry: they make titles less clean, as real titles are.
_TOY_SHARED_WORDS = ["new", "classic", "deluxe", "mini", "travel size", "value pack",
                     "limited edition", "1 oz", "2-pack", "bestseller"]
_TOY_STAGES = 4
_TOY_ZIPF = 1.0  # exposure propensity ~ rank^-1
_TOY_PREF_SIZE = 28  # expected size of a user's true preference set
_TOY_MIN_LEN, _TOY_MAX_LEN = 5, 15


def make_toy(n_users: int = 400, n_items: int = 240, seed: int = 0) -> Dataset:
    """A seeded small world where the truth is known.

    * items: a taste cluster (a theme above: category, 3 brands, its own words), a stage
      within the cluster (a sub-category) and a title of cluster words + stage noun + noise
      words, so text embeddings, and hence semantic IDs, group items by taste and stage;
    * exposure propensity ``item_pop_weight`` ~ Zipf over a random item ranking;
    * users: 1-2 clusters; true preferences = each item of those clusters liked with a
      probability that gives ~28 items;
    * observed sequence (5..15 items): drawn from the true preferences with probability
      proportional to the propensity (exposure bias: popular liked items are seen, unpopular
      liked items mostly stay hidden), ordered as one sweep through the stages (from a random
      starting stage, wrapping around) and, within a stage, by cluster, so consecutive items
      share a sub-cluster and the next item is predictable from the last.
    """
    if n_items < 16 or n_users < 1:
        raise DataError(f"the toy world needs at least 1 user and 16 items (got {n_users}, {n_items})")
    rng = np.random.default_rng(seed)
    n_clusters = int(np.clip(n_items // 12, 2, len(_TOY_THEMES)))  # 240 items -> 8 clusters of 30

    # Items: cluster and stage (balanced), brand, Zipf-like propensity over a random ranking.
    cluster = rng.permutation(np.arange(n_items) % n_clusters)
    stage = np.empty(n_items, dtype=np.int64)
    for c in range(n_clusters):
        members = np.flatnonzero(cluster == c)
        stage[members] = rng.permutation(np.arange(len(members)) % _TOY_STAGES)
    brand = rng.integers(0, 3, n_items)
    pop = (rng.permutation(n_items) + 1.0) ** -_TOY_ZIPF  # max 1, least popular 1/n_items

    titles, attributes = [], []
    for i in range(n_items):
        category, brands, words, nouns = _TOY_THEMES[cluster[i]]
        w = rng.choice(len(words), size=2, replace=False)
        noise = rng.choice(len(_TOY_SHARED_WORDS), size=rng.integers(1, 3), replace=False)
        titles.append(" ".join([brands[brand[i]], words[w[0]], words[w[1]], nouns[stage[i]],
                                *(_TOY_SHARED_WORDS[k] for k in noise)]))
        # Category path: cluster category, then the stage's sub-category (like "Makeup > Nails").
        attributes.append([brands[brand[i]], category, nouns[stage[i]].title()])

    members_of = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    sequences, true_prefs = [], []
    for _ in range(n_users):
        tastes = rng.choice(n_clusters, size=1 if rng.random() < 0.6 else 2, replace=False)
        pool = np.concatenate([members_of[c] for c in tastes])
        liked = pool[rng.random(len(pool)) < min(0.95, _TOY_PREF_SIZE / len(pool))]
        if len(liked) < _TOY_MIN_LEN + 1:  # only tiny worlds: top up so a sequence fits
            rest = np.setdiff1d(np.arange(n_items), liked)
            extra = rng.choice(rest, _TOY_MIN_LEN + 1 - len(liked), replace=False)
            liked = np.concatenate([liked, extra])
        n_obs = int(np.clip(_TOY_MIN_LEN + rng.poisson(4), _TOY_MIN_LEN, _TOY_MAX_LEN))
        n_obs = min(n_obs, len(liked))
        # Exposure bias: each draw picks a liked item with probability ~ its propensity.
        p = pop[liked] / pop[liked].sum()
        observed = rng.choice(liked, size=n_obs, replace=False, p=p)
        # Order: one sweep through the stages, starting at a random stage and wrapping around
        # (so every stage is as likely to come last and train-part popularity is not skewed
        # against late stages); within a stage the user's clusters in turn; random within a
        # (stage, cluster) block.
        start = rng.integers(_TOY_STAGES)
        cluster_rank = {int(c): r for r, c in enumerate(tastes)}
        observed = rng.permutation(observed)
        key = np.array([(stage[i] - start) % _TOY_STAGES * 2 + cluster_rank.get(int(cluster[i]), 1)
                        for i in observed])
        observed = observed[np.argsort(key, kind="stable")]
        sequences.append([int(i) for i in observed])
        true_prefs.append(sorted(int(i) for i in liked))

    return Dataset("toy", sequences, titles, attributes, true_prefs=true_prefs, item_pop_weight=pop, item_cluster=cluster)


# ----------------------------------------------------------------------------- split


def _flatten(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sequences end to end: (flat items, start offset per user, length per user)."""
    lengths = np.fromiter((len(s) for s in ds.sequences), dtype=np.int64, count=ds.n_users)
    items = itertools.chain.from_iterable(ds.sequences)
    flat = np.fromiter(items, dtype=np.int64, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    return flat, starts, lengths


def _samples(
    flat: np.ndarray, starts: np.ndarray, user: np.ndarray, pos: np.ndarray, max_his_len: int
) -> Split:
    """Samples whose target is flat[pos] and whose history is the user's items before it."""
    # History = flat[max(start, pos - L) : pos], written left-aligned into an (N, L) block.
    hist_len = np.minimum(pos - starts[user], max_his_len)
    cols = np.arange(max_his_len)
    idx = (pos - hist_len)[:, None] + cols[None, :]  # (N, L)
    hist = np.where(cols[None, :] < hist_len[:, None], flat[np.minimum(idx, len(flat) - 1)], -1)
    return Split(hist=hist.astype(np.int64), hist_len=hist_len, target=flat[pos], user=user)


def split_leave_one_out(ds: Dataset, max_his_len: int = 20) -> dict[str, Split]:
    """LETTER's leave-one-out split (LETTER-TIGER/data.py), histories cut to the last ``max_his_len``.

    For a user with items x_0..x_{n-1}:
      test:  target x_{n-1}, history x_0..x_{n-2}
      valid: target x_{n-2}, history x_0..x_{n-3}
      train: target x_i, history x_0..x_{i-1}, for every 1 <= i <= n-3 (prefixes of x[:-2]),
             user by user, i ascending.
    """
    flat, starts, lengths = _flatten(ds)
    if ds.n_users and lengths.min() < 3:
        short = np.flatnonzero(lengths < 3)
        raise DataError(
            f"{ds.name}: leave-one-out needs >= 3 interactions per user (train, valid, test); "
            f"{len(short)} users have fewer (e.g. user {short[0]} has {lengths[short[0]]}). "
            f"Filter them out first (5-core filtering does)."
        )
    users = np.arange(ds.n_users, dtype=np.int64)

    n_train = lengths - 3
    train_user = np.repeat(users, n_train)
    # Position i (1..n-3) inside each user's sequence, for every training sample.
    offset_in_user = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_pos = starts[train_user] + 1 + offset_in_user

    return {
        "train": _samples(flat, starts, train_user, train_pos, max_his_len),
        "valid": _samples(flat, starts, users, starts + lengths - 2, max_his_len),
        "test": _samples(flat, starts, users, starts + lengths - 1, max_his_len),
    }


def item_popularity(ds: Dataset) -> np.ndarray:
    """(n_items,) interaction counts over the training part (items[:-2] of each user), for MostPop.

    Validation and test targets are left out so that popularity does not peek at them.
    """
    flat, starts, lengths = _flatten(ds)
    pos_in_user = np.arange(len(flat)) - np.repeat(starts, lengths)
    train = pos_in_user < np.repeat(lengths - 2, lengths)
    return np.bincount(flat[train], minlength=ds.n_items).astype(np.int64)


if __name__ == "__main__":
    toy = load_dataset(DataConfig())
    print({k: len(v) for k, v in split_leave_one_out(toy).items()}, "|", toy.texts()[0])
