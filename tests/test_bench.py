"""The throughput benchmark (bench.py): runs on toy, skips the app when asked, refuses bad counts in one line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "bench.py", "--dataset", "toy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_app_users_0_skips_the_app_and_still_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    # batch 16: the token-level reference costs seconds a step at the default 256, and this test
    # checks that the figures are written, not what they are
    proc = bench("--steps", "2", "--ref-steps", "1", "--batch-size", "16", "--eval-users", "32", "--app-users", "0",
                 "--threads", "1", "--bf16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "app: not timed (--app-users 0)" in proc.stdout
    res = json.loads(out.read_text())
    assert res["train_samples_per_s/ours"] > 0 and res["beam_users_per_s"] > 0 and res["train_samples_per_s/ours_bf16"] > 0
    assert "app_user_switch_s" not in res and res["batch_size"] == 16


def test_bad_counts_end_with_one_error_line():
    proc = bench("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1 (got 0)" in proc.stderr and "Traceback" not in proc.stderr
