"""Table 1 writer on hand-chosen numbers: mean ± std strings, bold best baseline, Welch p-values
(scipy's and worked by hand), one-seed nan, reference rows never best, collect() and write()."""
import json
import math

import numpy as np
import pytest
from scipy import stats

import results
from results import collect, run_name, summarise, to_markdown, welch_greater, write

# Three seeds per method. Best baseline by column: HR@5 PPO, HR@10 DPO, NDCG@5 SFT, NDCG@10 PPO.
# SFT-continued (a reference row) is the highest everywhere and must still never be bold.
VALUES = {
    "sft": {"hr@5": [0.0400, 0.0410, 0.0420], "hr@10": [0.0600, 0.0610, 0.0620],
            "ndcg@5": [0.0300, 0.0300, 0.0300], "ndcg@10": [0.0340, 0.0350, 0.0360]},
    "ppo": {"hr@5": [0.0420, 0.0430, 0.0440], "hr@10": [0.0610, 0.0620, 0.0630],
            "ndcg@5": [0.0280, 0.0290, 0.0300], "ndcg@10": [0.0360, 0.0370, 0.0380]},
    "dpo": {"hr@5": [0.0405, 0.0415, 0.0425], "hr@10": [0.0630, 0.0640, 0.0650],
            "ndcg@5": [0.0270, 0.0280, 0.0290], "ndcg@10": [0.0350, 0.0360, 0.0370]},
    "gflowgr-db": {"hr@5": [0.0420, 0.0440, 0.0460], "hr@10": [0.0620, 0.0640, 0.0660],
                   "ndcg@5": [0.0300, 0.0310, 0.0320], "ndcg@10": [0.0370, 0.0380, 0.0390]},
    "gflowgr-tb": {"hr@5": [0.0450, 0.0460, 0.0470], "hr@10": [0.0650, 0.0670, 0.0690],
                   "ndcg@5": [0.0290, 0.0300, 0.0310], "ndcg@10": [0.0380, 0.0390, 0.0400]},
    "sft-continued": {"hr@5": [0.0500, 0.0510, 0.0520], "hr@10": [0.0700, 0.0710, 0.0720],
                      "ndcg@5": [0.0400, 0.0410, 0.0420], "ndcg@10": [0.0450, 0.0460, 0.0470]},
}
BASE, GFN, REF = ["sft", "ppo", "dpo"], ["gflowgr-db", "gflowgr-tb"], ["sft-continued"]


@pytest.fixture
def summary():
    return summarise(VALUES, BASE, GFN, REF)


def row(md: str, name: str) -> str:
    """The first table line of a method (the main table comes before the p-value table)."""
    return next(line for line in md.splitlines() if line.startswith(f"| {name} |"))


def test_means_stds_and_best(summary):
    assert summary["rows"]["sft"]["hr@5"]["mean"] == pytest.approx(0.0410)
    assert summary["rows"]["sft"]["hr@5"]["std"] == pytest.approx(0.0010)  # ddof=1: sqrt((1e-6 + 0 + 1e-6) / 2)
    assert summary["rows"]["gflowgr-db"]["hr@5"]["std"] == pytest.approx(0.0020)
    assert summary["rows"]["sft"]["ndcg@5"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert summary["best"] == {"hr@5": "ppo", "hr@10": "dpo", "ndcg@5": "sft", "ndcg@10": "ppo"}


def test_markdown_cells_bold_and_order(summary):
    md = to_markdown(summary, "toy, backbone TIGER")
    assert md.startswith("## toy, backbone TIGER\n")
    assert row(md, "SFT") == "| SFT | 0.0410 ± 0.0010 | 0.0610 ± 0.0010 | **0.0300 ± 0.0000** | 0.0350 ± 0.0010 |"
    assert row(md, "PPO") == "| PPO | **0.0430 ± 0.0010** | 0.0620 ± 0.0010 | 0.0290 ± 0.0010 | **0.0370 ± 0.0010** |"
    assert row(md, "DPO") == "| DPO | 0.0415 ± 0.0010 | **0.0640 ± 0.0010** | 0.0280 ± 0.0010 | 0.0360 ± 0.0010 |"
    assert row(md, "GFlowGR-TB") == "| GFlowGR-TB | 0.0460 ± 0.0010 | 0.0670 ± 0.0020 | 0.0300 ± 0.0010 | 0.0390 ± 0.0010 |"
    assert row(md, "GFlowGR-DB").startswith("| GFlowGR-DB | 0.0440 ± 0.0020 |")
    # the reference row is the highest in every column but never bold, and sits under the separator
    ref = row(md, "SFT-continued")
    assert "**" not in ref and ref.startswith("| SFT-continued | 0.0510 ± 0.0010 |")
    lines = md.splitlines()
    names = [line.split(" | ")[0][2:] for line in lines[2:lines.index(ref) + 1] if line.startswith("| ") and "---" not in line]
    assert names[1:] == ["SFT", "PPO", "DPO", "GFlowGR-DB", "GFlowGR-TB", "*reference, not ranked*", "SFT-continued"]
    assert "over 3 seeds per method" in md


def test_rows_follow_the_papers_order_whatever_the_input_order():
    s = summarise(VALUES, ["dpo", "ppo", "sft"], ["gflowgr-tb", "gflowgr-db"])
    md = to_markdown(s, "t")
    starts = [md.index(f"| {n} |") for n in ("SFT", "PPO", "DPO", "GFlowGR-DB", "GFlowGR-TB")]
    assert starts == sorted(starts)


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # SFT NDCG@5 has variance 0 on purpose
def test_p_values_match_scipy(summary):
    md = to_markdown(summary, "t")
    for g in GFN:
        for k in results.METRICS:
            best = summary["best"][k]
            ref = stats.ttest_ind(VALUES[g][k], VALUES[best][k], equal_var=False, alternative="greater")
            test = summary["tests"][g][k]
            assert test["vs"] == best
            assert test["p"] == ref.pvalue and test["t"] == ref.statistic
    # the p-value table: GFlowGR-TB's HR@5 against PPO
    p_tb = stats.ttest_ind(VALUES["gflowgr-tb"]["hr@5"], VALUES["ppo"]["hr@5"], equal_var=False, alternative="greater").pvalue
    p_lines = md.split("One-sided Welch t-test")[1]
    assert row(p_lines, "GFlowGR-TB").startswith(f"| GFlowGR-TB | p = {p_tb:.4f} vs PPO | ")
    assert f"{p_tb:.4f}" == "0.0107"


def test_p_value_by_hand(summary):
    # HR@5, GFlowGR-TB [.045 .046 .047] vs PPO [.042 .043 .044]: equal n = 3 and equal
    # s^2 = 1e-6, so t = 0.003 / sqrt(2e-6 / 3) = 3.6742 and Welch's df = 2 (n - 1) = 4.
    # Student t with 4 df: F(t) = 1/2 + (3/4) u (1 - u^2 / 3), u = t / sqrt(4 + t^2).
    t = 0.003 / math.sqrt(2e-6 / 3)
    u = t / math.sqrt(4 + t * t)
    p = 1 - (0.5 + 0.75 * u * (1 - u * u / 3))
    assert summary["tests"]["gflowgr-tb"]["hr@5"]["t"] == pytest.approx(t, rel=1e-9)
    assert summary["tests"]["gflowgr-tb"]["hr@5"]["p"] == pytest.approx(p, rel=1e-6)
    assert p == pytest.approx(0.010655, abs=1e-6)
    # NDCG@5, GFlowGR-TB mean 0.0300 = SFT mean 0.0300 (SFT std 0): t = 0, p = 1/2 for any df
    assert summary["tests"]["gflowgr-tb"]["ndcg@5"]["p"] == pytest.approx(0.5, abs=1e-9)
    # Two seeds each, [3, 5] vs [1, 3]: s^2 = 2 on both sides, t = 2 / sqrt(2/2 + 2/2) = sqrt 2,
    # df = (1 + 1)^2 / (1/1 + 1/1) = 2, and with 2 df F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so p = 1/2 - sqrt(2) / 4 = 0.14645.
    t2, p2 = welch_greater([3.0, 5.0], [1.0, 3.0])
    assert t2 == pytest.approx(math.sqrt(2), rel=1e-12)
    assert p2 == pytest.approx(0.5 - math.sqrt(2) / 4, rel=1e-9)


def test_one_seed_gives_nan_std_and_p():
    one = {m: {k: v[:1] for k, v in d.items()} for m, d in VALUES.items()}
    s = summarise(one, BASE, GFN, REF)
    assert s["rows"]["sft"]["hr@5"]["n"] == 1 and math.isnan(s["rows"]["sft"]["hr@5"]["std"])
    assert all(math.isnan(s["tests"][g][k]["p"]) for g in GFN for k in results.METRICS)
    md = to_markdown(s, "t")
    assert "| GFlowGR-TB | 0.0450 ± n/a |" in md
    assert "over 1 seed per method" in md
    assert row(md.split("One-sided Welch t-test")[1], "GFlowGR-TB").startswith("| GFlowGR-TB | p = n/a vs PPO |")
    # one seed on one side only is enough to make the test undefined
    mixed = dict(VALUES, ppo={k: v[:1] for k, v in VALUES["ppo"].items()})
    s = summarise(mixed, BASE, GFN)
    assert math.isnan(s["tests"]["gflowgr-tb"]["hr@5"]["p"]) and not math.isnan(s["tests"]["gflowgr-tb"]["hr@10"]["p"])
    assert "seeds per method: SFT 3, PPO 1, DPO 3" in to_markdown(s, "t")


def test_reference_rows_never_best():
    s = summarise(VALUES, [], GFN, ["sft-continued", "sft"])
    assert s["best"] == dict.fromkeys(results.METRICS)
    assert all(s["tests"][g][k] == {"vs": None, "t": s["tests"][g][k]["t"], "p": s["tests"][g][k]["p"]}
               and math.isnan(s["tests"][g][k]["p"]) for g in GFN for k in results.METRICS)
    assert "**" not in to_markdown(s, "t")


def test_missing_method_shows_dash_and_never_wins():
    s = summarise(VALUES, BASE + ["ipa"], GFN)
    assert s["rows"]["ipa"]["hr@5"]["n"] == 0 and s["best"]["hr@5"] == "ppo"
    assert "| IPA | — | — | — | — |" in to_markdown(s, "t")


def test_run_name():
    assert run_name("beauty", "tiger", "sft", 42) == "beauty__sft__seed42"
    assert run_name("yelp", "letter", "gflowgr-tb", 43) == "yelp__letter__gflowgr-tb__seed43"


def fake_run(runs, name, test, **extra):
    d = runs / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"test": test, "valid": {k: 0.0 for k in test}, **extra}))


def metrics(v):
    return {"hr@5": v, "hr@10": 2 * v, "ndcg@5": v / 2, "ndcg@10": v}


def test_collect_reads_test_split_and_lists_missing(tmp_path):
    pop = {"test": metrics(0.001), "valid": metrics(0.002)}
    fake_run(tmp_path, "toy__sft__seed42", metrics(0.04), mostpop=pop)
    fake_run(tmp_path, "toy__sft__seed44", metrics(0.05), mostpop=pop)
    fake_run(tmp_path, "toy__gflowgr-tb__seed43", metrics(0.06), mostpop=pop, cm={"test": metrics(0.03)})
    fake_run(tmp_path, "toy__letter__sft__seed42", metrics(0.09))  # another backbone: not read for tiger
    (tmp_path / "toy__ppo__seed42").mkdir()
    (tmp_path / "toy__ppo__seed42" / "metrics.json").write_text('{"test": {"hr@5"')  # half written
    got = collect(tmp_path, "toy", "tiger", ["sft", "gflowgr-tb", "ppo", "mostpop", "cm"], [42, 43, 44])
    assert got["values"]["sft"]["hr@5"] == [0.04, 0.05] and got["seeds"]["sft"] == [42, 44]
    assert got["values"]["gflowgr-tb"]["hr@10"] == [0.12]
    assert got["values"]["ppo"]["hr@5"] == []
    assert got["values"]["mostpop"]["hr@5"] == [0.001] * 3  # from the sft, gflowgr-tb, sft runs
    assert got["values"]["cm"]["ndcg@5"] == [0.015] and got["seeds"]["cm"] == [43]
    missing = got["missing"]
    for name in ["toy__sft__seed43", "toy__gflowgr-tb__seed42", "toy__gflowgr-tb__seed44",
                 "toy__ppo__seed42", "toy__ppo__seed43", "toy__ppo__seed44"]:
        assert name in missing
    assert sum(m.startswith("cm ") for m in missing) == 2 and not any(m.startswith("mostpop") for m in missing)
    assert len(missing) == 8
    letter = collect(tmp_path, "toy", "letter", ["sft"], [42])
    assert letter["values"]["sft"]["hr@5"] == [0.09] and letter["missing"] == []


def test_write_atomic_and_strict_json(tmp_path, summary):
    one = summarise({m: {k: v[:1] for k, v in d.items()} for m, d in VALUES.items()}, BASE, GFN, REF)
    md_path, json_path = write(one, tmp_path / "results", "toy", "tiger")
    assert md_path == tmp_path / "results" / "toy_tiger.md" and json_path == tmp_path / "results" / "toy_tiger.json"
    assert md_path.read_text() == to_markdown(one, "Table 1: toy, backbone TIGER")

    def no_nan(c):
        raise ValueError(c)
    data = json.loads(json_path.read_text(), parse_constant=no_nan)  # NaN would be rejected here
    assert data["dataset"] == "toy" and data["backbone"] == "tiger"
    assert data["rows"]["sft"]["hr@5"]["std"] is None and data["tests"]["gflowgr-tb"]["hr@5"]["p"] is None
    md_path, json_path = write(summary, tmp_path / "results", "toy", "tiger")  # overwrite in place
    assert json.loads(json_path.read_text())["tests"]["gflowgr-tb"]["hr@5"]["p"] == summary["tests"]["gflowgr-tb"]["hr@5"]["p"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["toy_tiger.json", "toy_tiger.md"]


def test_cli_end_to_end(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, v in zip((42, 43), (0.04, 0.05)):
        fake_run(runs, f"toy__sft__seed{seed}", metrics(v), mostpop={"test": metrics(0.001)})
        fake_run(runs, f"toy__gflowgr-tb__seed{seed}", metrics(v + 0.01), cm={"test": metrics(0.02)})
    assert results.cli(["--dataset", "toy", "--seeds", "42", "43", "--runs", str(runs), "--out", str(tmp_path / "res")]) == 0
    md = (tmp_path / "res" / "toy_tiger.md").read_text()
    assert "| SFT | **0.0450 ± 0.0071** |" in md and "| MostPop | 0.0010 ± 0.0000 |" in md
    assert "Missing runs" in md and "`toy__ppo__seed42`" in md
    assert np.isclose(json.loads((tmp_path / "res" / "toy_tiger.json").read_text())["rows"]["cm"]["hr@5"]["mean"], 0.02)
