"""More than one process (distributed.py): the sharded DDP step equals one process's step, a
2-process torchrun run matches the 1-process run, and a SIGKILLed torchrun job resumes to the
uninterrupted job's numbers. Offline, CPU, Gloo.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import distributed
from data import DataError

ROOT = Path(__file__).resolve().parent.parent
# a tiny toy GFlowGR-TB run: SFT -> CM -> fine-tuning. Dropout off (each rank draws its own masks)
# and the CM's top-N as candidates (uniform candidates are drawn per rank), so that one and two
# processes compute the same thing and differ only in floating-point rounding.
TOY = ["--dataset", "toy", "--method", "gflowgr-tb", "--epochs", "4", "--patience", "3", "--cm-epochs", "2",
       "--ft-epochs", "2", "--head-warmup", "5", "--inspect-users", "5", "--dropout", "0", "--cm-dropout", "0",
       "--candidates", "cm"]


def run_name(*extra) -> str:
    """The run folder train.py names for TOY + extra (config.variant: --candidates cm is a variant of toy)."""
    from config import parse_config, run_dir
    return run_dir(parse_config([*TOY, *extra])).name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the step, exactly


def test_shards_cover_the_batch_once_and_shares_average_to_the_batch_mean():
    b = torch.arange(7)
    parts = [distributed.shard(b, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), b) and [len(p) for p in parts] == [3, 2, 2]
    loss = torch.tensor([0.3, 1.2, 2.0, 0.1, 0.7, 1.5, 0.4], dtype=torch.float64)  # per-sample losses
    # DDP averages the ranks' gradients: (1/3) sum_r share_r * mean_r must be the batch's mean
    avg = sum(distributed.share(len(p), 7, 3) * float(loss[p].mean()) for p in parts) / 3
    assert avg == pytest.approx(float(loss.mean()), abs=1e-12)  # 6.2 / 7
    # an epoch's last batch, smaller than the world: every rank trains it whole, factor 1
    assert torch.equal(distributed.shard(torch.arange(1), 1, 2), torch.arange(1)) and distributed.share(1, 1, 2) == 1.0


def _ddp_step(rank, world, port, out):
    """One rank of a 2-process CM step through distributed.ddp / shard / share (spawned)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from config import parse_config

    distributed.init(parse_config(["--dataset", "toy"]))
    grads = _cm_gradient()
    torch.save(grads, f"{out}/rank{rank}.pt")
    distributed.close()


def _cm_gradient():
    """The gradient of the CM's loss on a 32-user batch, as the training loop computes it."""
    from collab import CollabConfig, SASRec, cm_loss, training_sequences
    from data import DataConfig, load_dataset

    ds = load_dataset(DataConfig(dataset="toy"))
    cfg = CollabConfig(max_len=20, dropout=0.0)
    seq, pos, _ = (torch.from_numpy(a) for a in training_sequences(ds, cfg.max_len))
    torch.manual_seed(0)
    model = SASRec(ds.n_items, cfg)
    compute = distributed.ddp([model])
    b = torch.arange(40, 72)
    mine = distributed.shard(b)
    s, p = seq[mine], pos[mine]
    w = distributed.share(int((p >= 0).sum()), int((pos[b] >= 0).sum()))
    loss = compute(lambda: cm_loss(model, model.encode(s), p, p >= 0, cfg, None, None, s))
    (loss * w).backward()
    return [q.grad.clone() for q in model.parameters()]


def test_two_processes_take_the_gradient_of_the_whole_batch(tmp_path):
    mp.spawn(_ddp_step, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one = _cm_gradient()  # one process, the whole batch
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for g, a, b in zip(one, r0, r1):
        assert torch.equal(a, b)  # DDP gave both ranks the same (all-reduced) gradient
        # ... the one of the whole batch, up to float32 rounding of the sums over positions
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ torchrun, end to end


def torchrun(out, *extra, log=None, n=2):
    """Run the toy job on n processes; with log, start it in the background (its own process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "train.py",
           *TOY, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if log is not None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(out) / run_name(*extra) / "metrics.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return torchrun(out)[0]


def test_torchrun_matches_one_process(two_process_run, tmp_path):
    two = two_process_run
    from config import parse_config
    from pipeline import run

    one = run(parse_config([*TOY, "--out", str(tmp_path), "--threads", "1"]), log=lambda *a: None)
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Every step's gradient is the whole batch's (test above), so the runs differ by rounding
    # alone, but Adam amplifies rounding: its first step moves a weight by ~lr * g / (|g| + 1e-8),
    # and for gradient entries near 1e-9 the last bits decide it (measured on the toy CM: the 117
    # weights that differ after one step all had |g| <= 1.4e-9). After 4 SFT epochs, 2 CM epochs
    # and 2 of fine-tuning, the top-10 lists of a few of the 400 test users differ: we allow 10.
    for part in ("sft_eval", "cm"):
        for k in ("hr@10", "ndcg@10"):
            assert abs(two[part]["test"][k] - one[part]["test"][k]) <= 10 / 400, (part, k)
    for k in ("hr@10", "ndcg@10"):
        assert abs(two["test"][k] - one["test"][k]) <= 10 / 400, k
    assert two["sft"]["best_epoch"] == one["sft"]["best_epoch"]


def _descendants(pid: int) -> list[int]:
    """pid's child processes and theirs (Linux /proc). torchrun starts each worker in its own
    session, so killing torchrun's process group would leave the workers running."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [d for k in kids for d in (k, *_descendants(k))]


def _kill_when(proc, root: Path, pattern: str, timeout=240):
    """SIGKILL the whole torchrun job, launcher and workers, as soon as a file root/pattern exists."""
    t0 = time.time()
    while not any(root.glob(pattern)):
        assert proc.poll() is None, f"the job ended before {pattern} appeared"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not any(root.glob("toy__gflowgr-tb*/metrics.json")), "the job finished before it was killed"


def test_sigkilled_torchrun_job_resumes_to_the_same_numbers(tmp_path):
    # dropout on and uniform candidates: every rank's own random streams must come back too
    streams = ["--dropout", "0.1", "--cm-dropout", "0.2", "--candidates", "random"]
    whole, _ = torchrun(tmp_path / "whole", *streams)
    out = tmp_path / "killed"
    # killed in the middle of SFT (after its first saved epoch), then of the fine-tuning
    _kill_when(torchrun(out, *streams, log=tmp_path / "1.log"), out, "toy/sft-*/resume.pt")
    _kill_when(torchrun(out, *streams, log=tmp_path / "2.log"), out, f"{run_name(*streams)}/resume.pt")
    resumed, log = torchrun(out, *streams)
    assert "[resume] SFT continues" in (tmp_path / "2.log").read_text()
    assert "[resume] gflowgr-tb continues after epoch 1" in log
    for part in ("sft_eval", "cm"):
        assert resumed[part]["test"] == whole[part]["test"], part
    assert resumed["test"] == whole["test"] and resumed["valid"] == whole["valid"]


# ------------------------------------------------------------------------------ clear errors


def test_settings_torchrun_cannot_run_are_refused_before_any_work(monkeypatch):
    from config import parse_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError, match="not divisible by the 2 processes"):
        distributed.init(parse_config(["--dataset", "toy", "--batch-size", "127"]))
    with pytest.raises(DataError, match="not supported under torchrun"):
        distributed.init(parse_config(["--dataset", "toy", "--study", "k"]))
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="GPU"):
            distributed.init(parse_config(["--dataset", "toy", "--device", "cuda"]))
    assert not torch.distributed.is_initialized()


def test_the_app_refuses_torchrun(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORLD_SIZE", "2")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert any("not under torchrun" in e.value for e in at.error)
