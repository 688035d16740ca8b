"""Table 1 of the paper (GFlowGR, arXiv 2506.16114, Sec. 4.2): every method on one data set
and one backbone (TIGER or LETTER), mean ± sample std over seeds, with a significance test.

The paper compares SFT, PPO, GRPO, DPO, S-DPO, SPRec, IPA, GFlowGR-DB and GFlowGR-TB on
HR@5 (the paper's R@5), HR@10, NDCG@5 and NDCG@10 of the test split. This file reads the
finished runs (`runs/<run_name>/metrics.json`, key "test"), and for each metric:

- mean and sample std over seeds (ddof=1; with one seed the std is nan, not 0, so a
  one-seed row never looks more precise than a three-seed one);
- the best baseline: the highest mean among the baselines. Reference rows (SFT-continued,
  CM (SASRec), MostPop) are shown under a separator and never compete: SFT-continued is a
  control for the extra training steps, the CM and MostPop are not generative recommenders;
- a one-sided Welch t-test of each GFlowGR variant against the best baseline's per-seed
  values, H1: mean_GFlowGR > mean_best,
      t = (m_1 - m_2) / sqrt(s_1^2/n_1 + s_2^2/n_2),
      df = (s_1^2/n_1 + s_2^2/n_2)^2 / ((s_1^2/n_1)^2/(n_1-1) + (s_2^2/n_2)^2/(n_2-1)),
      p = P(T_df > t)   (scipy.stats.ttest_ind, equal_var=False, alternative="greater"),
  nan when either side has fewer than 2 seeds. Welch, not Student: the methods' seed
  variances differ (RL baselines vary far more than SFT). Unpaired: seed 42 of PPO and
  seed 42 of GFlowGR share only the SFT start, not the fine-tuning noise.

Writes `results/<dataset>_<backbone>.md` (the table) and `.json` (all numbers).

Usage: `python results.py --dataset beauty --backbone tiger --seeds 42 43 44`
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
COLUMN = {"hr@5": "HR@5", "hr@10": "HR@10", "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}
BASELINES = ("sft", "ppo", "grpo", "dpo", "sdpo", "sprec", "ipa")  # the paper's row order
GFLOWGR = ("gflowgr-db", "gflowgr-tb")
REFERENCE = ("sft-continued", "cm", "mostpop")
DISPLAY = {"sft": "SFT", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "sdpo": "S-DPO", "sprec": "SPRec",
           "ipa": "IPA", "gflowgr-db": "GFlowGR-DB", "gflowgr-tb": "GFlowGR-TB",
           "sft-continued": "SFT-continued", "cm": "CM (SASRec)", "mostpop": "MostPop"}
# Rows that have no run folder of their own: every run's metrics.json carries MostPop under
# "mostpop" and every fine-tuning run the collaborative model under "cm", as {"test": {...}}.
# For these, collect() reads the first run of that seed that has the key.
DERIVED = {"mostpop": "mostpop", "cm": "cm"}
HOSTS = ("sft", *GFLOWGR, *BASELINES[1:], "sft-continued")


def display(method: str) -> str:
    return DISPLAY.get(method, method)


def run_name(dataset: str, backbone: str, method: str, seed: int, variant: str = "") -> str:
    """Run folder name. TIGER is the default backbone and keeps the plain name that
    train.py has always written; other backbones get their name in the middle. A study
    variant (train.variant: the settings that differ from the full model) follows the
    method after a '+', so an ablation never overwrites the full model's run.

    >>> run_name("beauty", "tiger", "sft", 42), run_name("beauty", "letter", "gflowgr-tb", 43)
    ('beauty__sft__seed42', 'beauty__letter__gflowgr-tb__seed43')
    >>> run_name("beauty", "tiger", "gflowgr-tb", 42, "K1")
    'beauty__gflowgr-tb+K1__seed42'
    """
    if variant:
        method = f"{method}+{variant}"
    if backbone == "tiger":
        return f"{dataset}__{method}__seed{seed}"
    return f"{dataset}__{backbone}__{method}__seed{seed}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or being written by a run that crashed
        return None


def collect(runs_dir, dataset: str, backbone: str, methods, seeds, variant: str = "") -> dict:
    """Read the test metrics of every (method, seed) run under runs_dir.

    Returns {"values": {method: {metric: [value per found seed, in seeds order]}},
             "seeds": {method: [seeds found]}, "missing": [run names not found]}.
    A missing or unreadable run is listed in "missing" and skipped, never fatal: a table of
    the finished runs is still worth printing while the others train.
    `mostpop` and `cm` are read from another run of the same seed (see DERIVED). variant: the
    runs' common name part ('history-out' for a --filter-seen table).
    """
    runs_dir = Path(runs_dir)
    values = {m: {k: [] for k in METRICS} for m in methods}
    found = {m: [] for m in methods}
    missing = []
    for method in methods:
        for seed in seeds:
            if method in DERIVED:
                key, test = DERIVED[method], None
                for host in HOSTS:
                    m = _read(runs_dir / run_name(dataset, backbone, host, seed, variant) / "metrics.json")
                    if m and isinstance(m.get(key), dict) and "test" in m[key]:
                        test = m[key]["test"]
                        break
                name = f"{method} (from any run of {run_name(dataset, backbone, '*', seed)})"
            else:
                name = run_name(dataset, backbone, method, seed, variant)
                m = _read(runs_dir / name / "metrics.json")
                test = m.get("test") if m else None
            if not test or any(k not in test for k in METRICS):
                missing.append(name)
                continue
            found[method].append(seed)
            for k in METRICS:
                values[method][k].append(float(test[k]))
    return {"values": values, "seeds": found, "missing": missing}


def welch_greater(x, y) -> tuple[float, float]:
    """(t, p) of the one-sided Welch t-test, H1: mean(x) > mean(y); (nan, nan) when either
    side has fewer than 2 values (no sample variance, so no test)."""
    from scipy import stats  # imported here: scipy.stats costs ~1.5 s, and only this function needs it

    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        # A deterministic method (same value every seed) has variance 0: a valid input that
        # scipy flags as "catastrophic cancellation"; the test itself is still well defined.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = stats.ttest_ind(x, y, equal_var=False, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def seed_stats(v: list[float]) -> dict:
    """Mean, sample std (nan below 2 values), count and the values themselves, over seeds."""
    n = len(v)
    mean = float(np.mean(v)) if n else math.nan
    std = float(np.std(v, ddof=1)) if n >= 2 else math.nan  # ddof=1: sample std; undefined for n = 1
    return {"mean": mean, "std": std, "n": n, "values": [float(x) for x in v]}


def summarise(values: dict, baselines, gflowgr, reference=()) -> dict:
    """Means, stds, best baseline per metric and the GFlowGR-vs-best Welch tests.

    values: {method: {metric: [per-seed values]}} (collect()["values"]); a method absent
    from values gets n = 0 and nan everywhere.
    Returns {"metrics", "baselines", "gflowgr", "reference": the method lists,
             "rows": {method: {metric: {"mean", "std", "n", "values"}}},
             "best": {metric: best baseline or None},
             "tests": {gflowgr method: {metric: {"vs": best, "t": t, "p": p}}}}.
    Ties go to the baseline listed first. std is nan with one seed, p nan with < 2 seeds.
    """
    baselines, gflowgr, reference = list(baselines), list(gflowgr), list(reference)
    rows = {m: {k: seed_stats(values.get(m, {}).get(k, [])) for k in METRICS} for m in baselines + gflowgr + reference}
    best = {}
    for k in METRICS:
        ranked = [m for m in baselines if rows[m][k]["n"] > 0]  # reference rows never compete
        best[k] = max(ranked, key=lambda m: rows[m][k]["mean"]) if ranked else None  # max keeps the first of ties
    tests = {}
    for g in gflowgr:
        tests[g] = {}
        for k in METRICS:
            b = best[k]
            t, p = welch_greater(rows[g][k]["values"], rows[b][k]["values"] if b else [])
            tests[g][k] = {"vs": b, "t": t, "p": p}
    return {"metrics": list(METRICS), "baselines": baselines, "gflowgr": gflowgr, "reference": reference,
            "rows": rows, "best": best, "tests": tests}


def _order(methods) -> list[str]:
    """The paper's row order for known methods, then any others in the order given."""
    paper = BASELINES + GFLOWGR
    return sorted(methods, key=lambda m: (paper.index(m) if m in paper else len(paper), list(methods).index(m)))


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return "—"
    std = "n/a" if math.isnan(s["std"]) else f"{s['std']:.4f}"
    return f"{s['mean']:.4f} ± {std}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def to_markdown(summary: dict, title: str) -> str:
    """The paper's Table 1 as markdown: one row per method, `mean ± std` cells, the best
    baseline per column in bold, reference rows under a separator row, then a footnote
    table with the GFlowGR p-values and a line with the number of seeds."""
    rows, best = summary["rows"], summary["best"]
    cols = [COLUMN[k] for k in summary["metrics"]]
    head = ["| Method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def line(m):
        cells = [_cell(rows[m][k]) for k in summary["metrics"]]
        cells = [f"**{c}**" if best[k] == m else c for c, k in zip(cells, summary["metrics"])]
        return f"| {display(m)} | " + " | ".join(cells) + " |"

    out = [f"## {title}", "", *head]
    out += [line(m) for m in _order(summary["baselines"]) + _order(summary["gflowgr"])]
    if summary["reference"]:
        out.append("| *reference, not ranked* |" + " |" * len(cols))
        out += [line(m) for m in summary["reference"]]

    ns = {m: rows[m][summary["metrics"][0]]["n"] for m in rows}
    present = sorted({n for n in ns.values() if n > 0})
    if len(present) == 1:
        seeds = f"{present[0]} seed{'s' if present[0] != 1 else ''} per method"
    else:
        seeds = "seeds per method: " + ", ".join(f"{display(m)} {n}" for m, n in ns.items())
    out += ["", f"Test split, mean ± sample std (ddof=1) over {seeds}; std n/a with one seed. "
                "Bold: best baseline per column (reference rows never compete)."]

    if summary["gflowgr"]:
        out += ["", "One-sided Welch t-test of each GFlowGR variant against the column's best baseline "
                    "(H1: GFlowGR mean > baseline mean; `scipy.stats.ttest_ind(equal_var=False, "
                    "alternative=\"greater\")`; n/a with fewer than 2 seeds on either side):", "", *head]
        for g in _order(summary["gflowgr"]):
            cells = []
            for k in summary["metrics"]:
                t = summary["tests"][g][k]
                cells.append(f"p = {_p(t['p'])} vs {display(t['vs'])}" if t["vs"] else "n/a")
            out.append(f"| {display(g)} | " + " | ".join(cells) + " |")

    if summary.get("missing"):  # optional: the caller may copy collect()["missing"] here
        out += ["", f"Missing runs ({len(summary['missing'])}): " + ", ".join(f"`{r}`" for r in summary["missing"])]
    return "\n".join(out) + "\n"


def _jsonable(x):
    """nan -> null: JSON has no NaN, and a strict reader would reject the file."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader (the app) never sees a half-written table


def write(summary: dict, out_dir, dataset: str, backbone: str, variant: str = "") -> tuple[Path, Path]:
    """Write `<out_dir>/<dataset>_<backbone>[_<variant>].md` and `.json` (nan as null), each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dataset}_{backbone}" + (f"_{variant}" if variant else "")
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    title = f"Table 1: {dataset}, backbone {backbone.upper()}" + (f" ({variant}: history items left out of every list)" if variant else "")
    _atomic_write(to_markdown(summary, title), md_path)
    _atomic_write(json.dumps(_jsonable({"dataset": dataset, "backbone": backbone, **summary}), indent=2), json_path)
    return md_path, json_path


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write Table 1 (results/<dataset>_<backbone>.md and .json) from finished runs.")
    p.add_argument("--dataset", default="beauty", help="data set name as in the run folders")
    p.add_argument("--backbone", default="tiger", help="tiger | letter")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds to read (the paper: 42 43 44)")
    p.add_argument("--runs", default="runs", help="folder holding the run folders")
    p.add_argument("--out", default="results", help="folder for the table files")
    p.add_argument("--variant", default="", help="the runs' common name part: history-out for runs of train.py --filter-seen")
    a = p.parse_args(argv)
    if not Path(a.runs).is_dir():
        print(f"error: the runs folder {a.runs} does not exist: train first (python train.py --dataset {a.dataset} "
              f"--method all --seeds {' '.join(map(str, a.seeds))}) or point --runs at the folder that holds the runs",
              file=sys.stderr)
        return 2
    got = collect(a.runs, a.dataset, a.backbone, BASELINES + GFLOWGR + REFERENCE, a.seeds, a.variant)
    summary = summarise(got["values"], BASELINES, GFLOWGR, REFERENCE)
    summary["missing"] = got["missing"]
    md, js = write(summary, a.out, a.dataset, a.backbone, a.variant)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
