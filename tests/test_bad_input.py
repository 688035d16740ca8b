"""Bad input, one case each, through the command line: one clear message naming the problem,
exit status 2, no traceback, and nothing written (no runs folder, no file in the data folder)."""
import json
from pathlib import Path

import pytest

import data as data_mod
from train import cli


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def yelp_folder(root: Path, sequences: str, items: dict) -> Path:
    """A tiny Yelp data folder (P5 sequences, LETTER items) under root; returns root."""
    (root / "yelp").mkdir(parents=True)
    (root / "yelp" / data_mod.YELP_SEQUENCES).write_text(sequences)
    (root / "yelp" / data_mod.YELP_ITEMS).write_text(json.dumps(items))
    return root


ITEMS = {str(i): {"title": f"Place {i}", "description": "Food, Pizza"} for i in range(4)}
GOOD_SEQUENCES = "1 1 2 3\n2 2 3 4\n3 4 1 2\n"


def bad_yelp_line(root: Path) -> Path:
    return yelp_folder(root, "1 1 2 3\n2 2 x 4\n3 4 1 2\n", ITEMS)  # line 2: "x" is no item id


def yelp_items_without_text(root: Path) -> Path:
    items = {**ITEMS, "2": {"title": "", "description": ""}, "3": {"title": " ", "description": ""}}
    return yelp_folder(root, GOOD_SEQUENCES, items)


def bad_beauty_items_line(root: Path) -> Path:
    folder = root / "beauty"
    folder.mkdir(parents=True)
    (folder / data_mod.BEAUTY_INTER).write_text(json.dumps({"0": [0, 1, 1], "1": [1, 0, 1]}))
    good = json.dumps({"letter_id": 0, "title": "Nail polish", "attributes": ["OPI"]})
    (folder / data_mod.BEAUTY_ITEMS).write_text(good + '\n{"letter_id": 1, "title": \n')  # line 2 cut short
    return root


def bad_beauty_interactions(root: Path) -> Path:
    root = bad_beauty_items_line(root)
    (root / "beauty" / data_mod.BEAUTY_INTER).write_text('{"0": [0, 1, 1], "1": [1, 0,')  # truncated JSON
    return root


# (case, argv, data folder builder or None, words the message must hold)
CASES = [
    ("unknown dataset", ["--dataset", "movies"], None, ["unknown dataset 'movies'"]),
    ("unknown method", ["--method", "magic"], None, ["unknown method 'magic'"]),
    ("unknown backbone", ["--backbone", "bert"], None, ["unknown backbone 'bert'"]),
    ("unknown study", ["--study", "nope"], None, ["unknown study 'nope'"]),
    ("lambda < 0", ["--method", "gflowgr-tb", "--lambda", "-1"], None, ["--lambda must be >= 0"]),
    ("K < 0", ["--method", "gflowgr-tb", "--K", "-2"], None, ["--K must be >= 0"]),
    ("cm-crossfit 1", ["--method", "gflowgr-tb", "--cm-crossfit", "1"], None, ["--cm-crossfit must be 0 (off) or a number of folds >= 2"]),
    ("ft-last < 0", ["--method", "gflowgr-tb", "--ft-last", "-1"], None, ["--ft-last must be >= 0"]),
    ("reward floor 0", ["--method", "gflowgr-tb", "--reward-floor", "0"], None, ["--reward-floor must be in (0, 1)"]),
    ("history floor 1", ["--method", "gflowgr-tb", "--history-floor", "1"], None, ["--history-floor must be in [0, 1)"]),
    ("aug-history < 0", ["--method", "gflowgr-tb", "--aug-history", "-1"], None, ["--aug-history must be >= 0"]),
    ("K above the pool", ["--method", "gflowgr-tb", "--K", "60", "--n-candidates", "50"], None, ["--K (60) cannot exceed"]),
    ("beam < top-k", ["--beam", "5"], None, ["--beam (5) must be at least --topk (10)"]),
    ("unknown dedup order", ["--dedup", "random"], None, ["--dedup must be one of id, popularity"]),
    ("unknown CM loss", ["--cm-loss", "hinge"], None, ["--cm-loss must be one of ce, sampled, bce"]),
    ("unknown r_c mapping", ["--cm-score", "tanh"], None, ["--cm-score must be one of sigmoid, softmax, rank"]),
    ("no CM negatives", ["--cm-loss", "sampled", "--cm-negatives", "0"], None, ["--cm-negatives must be >= 1"]),
    ("unknown log Z form", ["--method", "gflowgr-tb", "--log-z", "table"], None, ["--log-z must be one of user, scalar, vargrad"]),
    ("vargrad without trajectories", ["--method", "gflowgr-tb", "--log-z", "vargrad", "--K", "0"], None,
     ["--log-z vargrad", "needs --K >= 1"]),
    ("unknown log F form", ["--method", "gflowgr-db", "--log-flow", "table"], None, ["--log-flow must be head or prefix"]),
    ("unknown candidates", ["--method", "gflowgr-tb", "--candidates", "oracle"], None, ["unknown --candidates 'oracle'"]),
    ("oracle reward off toy", ["--dataset", "beauty", "--method", "gflowgr-tb", "--oracle-reward"], None,
     ["--oracle-reward reads the toy world's true taste clusters", "use --dataset toy"]),
    ("oracle reward for SFT", ["--dataset", "toy", "--method", "sft", "--oracle-reward"], None,
     ["--oracle-reward replaces GFlowGR's reward", "got --method sft"]),
    ("unknown GFlowNet context", ["--method", "gflowgr-tb", "--gfn-context", "later"], None, ["--gfn-context must be same or next"]),
    ("next context with r_a", ["--dataset", "toy", "--gfn-context", "next"], None,
     ["--gfn-context next", "use it with --reward rc, or --gfn-context same"]),
    ("own context with r_a", ["--dataset", "toy", "--gfn-context", "own"], None,
     ["--gfn-context own", "use it with --reward rc"]),
    ("test refit off the next context", ["--dataset", "toy", "--reward", "rc", "--refit-test"], None,
     ["--refit-test fine-tunes GFlowGR a second time", "--gfn-context same", "--ft-last 0"]),
    ("test refit for SFT-continued", ["--dataset", "beauty", "--method", "sft-continued", "--refit-test"], None,
     ["--refit-test", "got --method sft-continued"]),
    ("warm refit without the refit", ["--dataset", "beauty", "--no-refit-test", "--refit-epochs", "1"], None,
     ["--refit-epochs N continues the validation model", "--refit-test off"]),
    ("init from a folder with no model", ["--dataset", "toy", "--init-from", "runs/nowhere"], None,
     ["--init-from runs/nowhere: no checkpoint.pt there", "give the folder of a finished fine-tuning run"]),
    ("init from, for SFT", ["--dataset", "toy", "--method", "sft", "--init-from", "runs/nowhere"], None,
     ["--init-from starts one fine-tuning from another run's model", "--no-refit-test"]),
    ("distillation control for DB", ["--method", "gflowgr-db", "--gfn-kd"], None,
     ["--gfn-kd is a control of GFlowGR-TB", "got --method gflowgr-db"]),
    ("policy mix without the target's draw", ["--dataset", "toy", "--policy-mix", "0.5"], None,
     ["--policy-mix is the policy's share in --target-weight's draw", "--target-weight off"]),
    ("policy mix above 1", ["--dataset", "beauty", "--policy-mix", "2"], None, ["a number in [0, 1]", "got --policy-mix 2"]),
    ("tag with a slash", ["--tag", "a/b"], None, ["--tag may hold letters, digits and '-' only"]),
    ("regime epochs 0", ["--study", "paper-regime", "--regime-epochs", "0"], None, ["--regime-epochs must be >= 1"]),
    ("eval from 0", ["--eval-from", "0"], None, ["--eval-from must be >= 1"]),
    ("malformed interactions line", ["--dataset", "yelp"], bad_yelp_line,
     [data_mod.YELP_SEQUENCES, "line 2", "expected integer ids", "Fix that line"]),
    ("malformed interactions file", ["--dataset", "beauty"], bad_beauty_interactions,
     [data_mod.BEAUTY_INTER, "cannot read", "Delete it to rebuild it"]),
    ("malformed items line", ["--dataset", "beauty"], bad_beauty_items_line,
     [data_mod.BEAUTY_ITEMS, "line 2", "letter_id, title and attributes"]),
    ("items without text", ["--dataset", "yelp"], yelp_items_without_text,
     ["2 items have no text", "item 2, 3", "add a title or attributes"]),
]


@pytest.mark.parametrize("case, argv, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_message_exit_2_and_writes_nothing(case, argv, build, words, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(data_mod.ENV_VAR, raising=False)
    data_dir = build(tmp_path / "data") if build else tmp_path / "data"
    before = files_under(data_dir)
    out = tmp_path / "runs"
    assert cli([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (case, err)
    assert not out.exists()  # no run folder, no stage cache
    assert files_under(data_dir) == before  # nothing half written beside the data either


def test_missing_data_folder_offline(tmp_path, capsys, monkeypatch):
    def offline(url, dest):
        raise data_mod.DataError(f"could not download {url}: network unreachable")

    monkeypatch.setattr(data_mod, "download", offline)
    monkeypatch.delenv(data_mod.ENV_VAR, raising=False)
    out = tmp_path / "runs"
    assert cli(["--dataset", "beauty", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and data_mod.ENV_VAR in err and data_mod.BEAUTY_REVIEWS in err
    assert not out.exists()
    assert not files_under(tmp_path / "nowhere")  # no partial download left behind


def test_users_with_fewer_than_three_interactions_are_dropped_not_fatal(tmp_path, capsys, monkeypatch):
    """Not an error: such users are dropped with a count, as the standard preprocessing does."""
    monkeypatch.delenv(data_mod.ENV_VAR, raising=False)
    root = yelp_folder(tmp_path / "data", GOOD_SEQUENCES + "4 1 2\n5 3\n", ITEMS)
    ds = data_mod.load_dataset(data_mod.DataConfig(dataset="yelp", data_dir=str(root)))
    assert "yelp: dropped 2 users with fewer than 3 interactions" in capsys.readouterr().out
    assert ds.sequences == [[0, 1, 2], [1, 2, 3], [3, 0, 1]]


def test_runs_folder_that_does_not_exist(tmp_path, capsys):
    from results import cli as results_cli

    assert results_cli(["--dataset", "toy", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "runs folder" in err and "does not exist" in err and "python train.py --dataset toy" in err
    assert not any(tmp_path.iterdir())  # nothing written
