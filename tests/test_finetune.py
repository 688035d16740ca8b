"""Fine-tuning (finetune.py): every method runs from the cached SFT; GFlowGR's logged balance, rewards, warm-up, VarGrad."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

import data as data_mod
import finetune
from config import parse_config, run_dir
from finetune import trajectory_rewards
from pipeline import run

KEYS = {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}


def finetune_config(toy_run, method, **ft):
    cfg, _, _ = toy_run
    c = copy.deepcopy(cfg)
    c.train.method = method
    c.cm.epochs, c.cm.patience = 3, 3
    c.ft.ft_epochs, c.ft.head_warmup, c.ft.inspect_users = 1, 5, 5
    for k, v in ft.items():
        setattr(c.ft, k, v)
    return c


def run_from_cached_sft(toy_run, method):
    """A short fine-tuning run of `method` from the session's SFT: (cfg, metrics, run folder, its metrics.json)."""
    cfg = finetune_config(toy_run, method)
    lines = []
    metrics = run(cfg, log=lines.append)
    assert "[cache] SFT checkpoint" in "\n".join(lines)
    d = Path(cfg.train.out) / f"toy__{method}__seed{cfg.train.seed}"
    saved = json.loads((d / "metrics.json").read_text())
    assert saved["test"] == metrics["test"] and 0 <= saved["test"]["hr@10"] <= 1
    assert saved["sft_eval"]["test"] == toy_run[1]["test"]  # the SFT reference row is the cached SFT
    return cfg, metrics, d, saved


@pytest.mark.parametrize("method", ["gflowgr-tb", "gflowgr-db", "sft-continued"])
def test_finetuning_methods_run_from_the_cached_sft(toy_run, method):
    cfg, metrics, d, saved = run_from_cached_sft(toy_run, method)
    assert set(saved["test"]) == KEYS
    ckpt = torch.load(d / "checkpoint.pt")
    assert {"model", "model_args", "heads", "step", "config"} <= set(ckpt)
    # sft-continued gets exactly the fine-tuning budget of the GFlowGR methods
    n_batches = math.ceil(len(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False))["train"]) / cfg.train.batch_size)
    assert metrics["finetune"]["step"] == n_batches
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*curves)
    if method != "sft-continued":
        assert {"loss/gr", "loss/gfn", "gfn/log_z", "gfn/log_r_obs", "gfn/log_r_aug", "weight/mean", "sampler/cm_score",
                "gfn/residual_obs", "gfn/residual_aug", "grad/gr", "grad/gfn", "grad/total", "charts/clipped"} <= keys
        for r in (r for r in curves if "grad/total" in r):
            assert r["charts/clipped"] == float(r["grad/total"] > 1.0)
            assert r["gfn/residual_obs"] >= 0 and r["gfn/residual_aug"] >= 0
            # the two terms' gradients add up to the total (triangle inequality, both ways)
            assert abs(r["grad/gr"] - r["grad/gfn"]) - 1e-3 <= r["grad/total"] <= r["grad/gr"] + r["grad/gfn"] + 1e-3
        ins = json.loads((d / "inspect.json").read_text())
        user = ins["users"][0]
        assert len(user["trajectories"]) == 1 + cfg.sampler.K
        obs = user["trajectories"][0]
        assert obs["observed"] and obs["item"] == user["target"] and obs["r_sim"] == cfg.tok.levels and obs["r_a"] == 1
        assert len(obs["p_f"]) == 4 and all(0 < p <= 1 for p in obs["p_f"])
        assert all(1.0 <= tr["weight"] <= 1 / 0.3**2 + 1e-3 for tr in user["trajectories"])
        assert len(user["sft"]["items"]) == 10 and len(user["finetuned"]["items"]) == 10


def test_rsim_ignores_the_dedup_token_unless_asked():
    from types import SimpleNamespace

    # item 0 observed; item 1 shares only the dedup token 0; item 2 shares t_1 and the dedup token
    model = SimpleNamespace(item_codes=torch.tensor([[3, 4, 5, 0], [7, 8, 9, 0], [3, 1, 2, 0]]))
    items, r_c = torch.tensor([[0, 1, 2]]), torch.tensor([[0.5, 0.2, 0.1]])
    cfg = parse_config(["--dataset", "toy", "--levels", "3"])
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)
    assert rew["r_sim"].tolist() == [[3.0, 0.0, 1.0]]
    assert rew["R"][0].tolist() == pytest.approx([1 + 0.5 + 3, 0.2, 1.1])
    cfg = parse_config(["--dataset", "toy", "--levels", "3", "--rsim-dedup", "--reward-beta", "2"])
    rew, log_r = trajectory_rewards(model, items, r_c, cfg)
    assert rew["r_sim"].tolist() == [[4.0, 1.0, 2.0]]
    assert log_r[0].tolist() == pytest.approx([2 * math.log(5.5), 2 * math.log(1.2), 2 * math.log(2.1)])
    # --reward-floor: an item with R = 0 (r_c alone, r_c = 0) sits at beta * log floor
    cfg = parse_config(["--dataset", "toy", "--levels", "3", "--reward", "rc", "--reward-beta", "0.5", "--reward-floor", "1e-8"])
    _, log_r = trajectory_rewards(model, items, torch.tensor([[0.04, 0.0, 1e-9]]), cfg)
    assert log_r[0].tolist() == pytest.approx([0.5 * math.log(0.04), 0.5 * math.log(1e-8), 0.5 * math.log(1e-8)])


def test_history_floor_lowers_only_the_users_own_items():
    from types import SimpleNamespace

    model = SimpleNamespace(item_codes=torch.tensor([[3, 4, 5, 0], [7, 8, 9, 0], [3, 1, 2, 0], [6, 6, 6, 0]]))
    # user 0 has items 1 and 3 (padding -1); user 1 has item 2. Column 0 is the observed item.
    hist, hist_len = torch.tensor([[1, 3, -1], [2, -1, -1]]), torch.tensor([2, 1])
    items = torch.tensor([[0, 1, 2], [0, 1, 2]])
    r_c = torch.tensor([[0.001, 0.0, 0.0], [0.001, 0.0, 0.0]])  # observed below the floor, the others 0
    flags = ["--dataset", "toy", "--levels", "3", "--reward", "rc", "--reward-beta", "0.5"]
    _, log_r = trajectory_rewards(model, items, r_c, parse_config(flags + ["--history-floor", "1e-6"]), hist=hist, hist_len=hist_len)
    low, high = 0.5 * math.log(1e-6), 0.5 * math.log(0.01)  # -6.91 and -2.30 nats
    # the observed item keeps --reward-floor; item 1 is user 0's, item 2 is user 1's
    assert log_r.tolist() == [pytest.approx([high, low, high]), pytest.approx([high, high, low])]
    _, off = trajectory_rewards(model, items, r_c, parse_config(flags), hist=hist, hist_len=hist_len)
    assert off.tolist() == [pytest.approx([high] * 3)] * 2  # 0: one floor for every item


def test_warm_up_only_epochs_never_count_as_the_best_fine_tuned_model(toy_run):
    # 4 epochs, warm-up longer than 3 of them: only the last epoch trained the backbone
    cfg = finetune_config(toy_run, "gflowgr-tb", ft_epochs=4, head_warmup=10_000)
    with pytest.raises(data_mod.DataError, match="--head-warmup"):
        run(cfg, log=lambda *a: None)
    n_batches = math.ceil(len(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False))["train"]) / cfg.train.batch_size)
    cfg = finetune_config(toy_run, "gflowgr-tb", ft_epochs=2, head_warmup=n_batches + 1)
    metrics = run(cfg, log=lambda *a: None)
    assert metrics["finetune"]["best_epoch"] == 2


def test_grad_norms_measure_each_term_without_touching_the_step():
    """grad/gr and grad/gfn are the norms of each term's own gradient, and measuring them leaves .grad alone."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    l_gr, l_gfn = (w ** 2).sum() / 2, 2 * w.sum()  # gradients w = (3, 4) and (2, 2)
    got = finetune.grad_norms({"gr": l_gr, "gfn": l_gfn}, [w])
    assert got["grad/gr"] == pytest.approx(5.0) and got["grad/gfn"] == pytest.approx(8 ** 0.5)
    assert w.grad is None
    (l_gr + l_gfn).backward()  # the graph was kept: the real step still works
    assert w.grad.tolist() == [5.0, 6.0]


def test_vargrad_run_is_balanced_in_the_mean_and_trains_no_log_z(toy_run):
    """--log-z vargrad: each batch's log Z is its own weighted mean, so the residuals of a batch
    are centred by construction; no warm-up is spent on a head (the backbone trains from step 1)."""
    cfg = finetune_config(toy_run, "gflowgr-tb")
    cfg.ft.log_z, cfg.train.tag = "vargrad", "vargrad"
    metrics = run(cfg, log=lambda s: None)
    d = Path(cfg.train.out) / f"toy__gflowgr-tb+vargrad__seed{cfg.train.seed}"
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in curves if "grad/gr" in r)
    assert first["step"] == 1 and first["grad/gr"] > 0  # the backbone gets L_GR's gradient at once
    assert metrics["finetune"]["step"] >= 1 and 0 <= metrics["test"]["hr@10"] <= 1
    user = json.loads((d / "inspect.json").read_text())["users"][0]
    x = [tr["log_r"] - tr["log_pf_sum"] for tr in user["trajectories"]]
    w = [tr["weight"] for tr in user["trajectories"]]
    assert user["log_z"] == pytest.approx(sum(a * b for a, b in zip(w, x)) / sum(w), abs=1e-3)


def test_the_readme_example_adds_a_method_with_one_loss_one_class_and_one_table_entry(tmp_path):
    """README, "Adding a method", followed literally on a copy of the code: the new method trains on toy."""
    import re
    import shutil
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Adding a method"):]
    section = section[: section.index("\n## ", 5)]
    loss_code, class_code = (textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", section, re.S))
    entry = re.search(r"add the entry `(.*?)`", section).group(1)
    src = tmp_path / "src"
    src.mkdir()
    for f in root.glob("*.py"):
        shutil.copy(f, src / f.name)
    # step 1: the loss
    (src / "losses.py").write_text((src / "losses.py").read_text() + "\n\n" + loss_code)
    # step 2: its import, and the class after SFTContinued
    ft = (src / "finetune.py").read_text()
    ft = ft.replace("\nfrom losses import ", "\nfrom losses import simpo_loss, ", 1)
    ft = ft.replace("\nclass GFlowGR(Method):", "\n" + class_code + "\n\nclass GFlowGR(Method):", 1)
    # step 3: the table entry
    ft = ft.replace('    "sft-continued": SFTContinued,\n', f'    "sft-continued": SFTContinued,\n    {entry}\n', 1)
    (src / "finetune.py").write_text(ft)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "train.py", "--dataset", "toy", "--method", "simpo", "--toy-users", "150",
                           "--epochs", "2", "--patience", "2", "--cm-epochs", "2", "--cm-patience", "2", "--ft-epochs", "1",
                           "--rq-epochs", "30", "--threads", "1", "--out", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"test\s+SIMPO\s+0\.\d{4}", proc.stdout)
    run_dir = out / "toy__simpo__seed42"
    assert set(json.loads((run_dir / "metrics.json").read_text())["test"]) == KEYS
    losses = [r["loss/simpo"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/simpo" in r]
    assert losses and all(v > 0 for v in losses)  # -log sigmoid(.) > 0


def test_a_resume_state_with_the_old_optimiser_layout_is_refused_with_a_message(toy_run):
    """Before finetune.py, SFT-continued's optimiser also held the (idle) GFlowNet heads: such a
    resume state cannot be loaded into today's optimiser, so the run says so and starts afresh."""
    import cache
    from config import finalize, run_dir, run_identity

    cfg = finalize(finetune_config(toy_run, "sft-continued"))
    cfg.train.tag = "old-resume"
    d = run_dir(cfg)
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 99}\n')
    cache.save({"opt": {"state": {}, "param_groups": [{}, {}]}, "log_bytes": 13, "identity": run_identity(cfg)}, d / "resume.pt")
    lines = []
    metrics = run(cfg, log=lines.append)
    assert any("older version with another optimiser layout: sft-continued starts afresh" in line for line in lines)
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert curves[0]["step"] == 1 and metrics["finetune"]["step"] > 0 and not (d / "resume.pt").exists()


def test_last_contexts_keep_each_users_most_recent_training_samples():
    """--ft-last n: the rows kept are, for every user, the last n of their training samples (all if fewer)."""
    ds = data_mod.load_dataset(data_mod.DataConfig())
    split = data_mod.split_leave_one_out(ds)
    t = {k: torch.as_tensor(getattr(split["train"], k)) for k in ("hist", "hist_len", "target", "user")}
    assert finetune.last_contexts(t, 0) is t
    for n in (1, 2):
        kept = finetune.last_contexts(t, n)
        for u in (0, 1, int(t["user"].max())):
            rows = torch.nonzero(t["user"] == u).flatten()
            want = rows[-n:]  # stored positions ascending: the last rows are the most recent contexts
            assert torch.equal(kept["target"][kept["user"] == u], t["target"][want])
            # the most recent context holds the longest history of that user
            assert int(kept["hist_len"][kept["user"] == u][-1]) == int(t["hist_len"][rows].max())
        counts = torch.bincount(t["user"])
        assert len(kept["target"]) == int(counts.clamp_max(n).sum())


def test_crossfit_scores_every_batch_with_the_cms_that_never_saw_its_users(toy_run, monkeypatch):
    """--cm-crossfit 2: the fold CMs are trained (stages of their own), and every GFlowGR batch's rewards
    come from collab.CrossFitCM.held_out for exactly that batch's users; --ft-last 1 fine-tunes on one
    context per user."""
    import collab

    asked = []
    real = collab.CrossFitCM.held_out

    def spy(self, users):
        asked.append(users.clone())
        return real(self, users)

    monkeypatch.setattr(collab.CrossFitCM, "held_out", spy)
    cfg = finetune_config(toy_run, "gflowgr-tb")
    cfg.cm.crossfit, cfg.ft.ft_last, cfg.ft.head_warmup = 2, 1, 1  # 400 toy users: 4 steps
    lines = []
    metrics = run(cfg, log=lines.append)
    log = "\n".join(lines)
    assert "collaborative model without fold 1 of 2" in log and "collaborative model without fold 2 of 2" in log
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    n_train = len(data_mod.split_leave_one_out(ds)["train"])
    n_users = len(set(data_mod.split_leave_one_out(ds)["train"].user.tolist()))
    # one batch for the offset, then every training step; --ft-last 1: one context per user
    assert metrics["finetune"]["step"] == math.ceil(n_users / cfg.train.batch_size) < math.ceil(n_train / cfg.train.batch_size)
    assert len(asked) == 1 + metrics["finetune"]["step"]
    seen = torch.cat(asked[1:])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == n_users  # each user's one context, once


def test_gfn_context_next_balances_augmented_items_on_the_context_after_the_observed_item(toy_run, monkeypatch):
    """--gfn-context next: the sampler and the GFlowNet's trajectories see each sample's history with
    its observed item appended (the newest item of the context is the target), the pool holds no
    label out (the target is a history item there: -1 to the sampler), no trajectory is the
    observed one, and L_GR is Eq. (1) on the sample itself: with lambda 0 the step's loss is
    SFT-continued's."""
    import sampler as sampler_mod
    from batches import append_item, trim
    from losses import gr_loss

    asked, targets = [], []
    real, real_step = sampler_mod.TrajectorySampler.sample, finetune.gflowgr_step

    def spy(self, hist, hist_len, label, *args, **kw):
        asked.append((hist.clone(), hist_len.clone(), label.clone()))
        return real(self, hist, hist_len, label, *args, **kw)

    def spy_step(model, heads, cm, smp, hist, hist_len, target, *args, **kw):
        targets.append(target.clone())
        return real_step(model, heads, cm, smp, hist, hist_len, target, *args, **kw)

    monkeypatch.setattr(sampler_mod.TrajectorySampler, "sample", spy)
    monkeypatch.setattr(finetune, "gflowgr_step", spy_step)
    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc", log_z="vargrad", sft_prior=True)
    cfg.ft.ft_last = 1
    metrics = run(cfg, log=lambda *a: None)
    n_steps = metrics["finetune"]["step"]
    assert n_steps >= 1 and len(asked) > 1 + n_steps and 0 <= metrics["test"]["hr@10"] <= 1
    # the offset's batch, then every step (the inspection follows)
    for (hist, hist_len, label), target in zip(asked[: 1 + n_steps], targets[: 1 + n_steps], strict=True):
        assert torch.equal(hist[torch.arange(len(hist)), hist_len - 1], target)  # the observed item is the newest one
        assert bool((label == -1).all())  # ... and no label of the context: nothing held out of the pool
    d = run_dir(cfg)
    assert d.name == f"toy__gflowgr-tb+reward-rc+last1+ctx-next__seed{cfg.train.seed}"
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in curves if "loss/gfn" in r)
    assert first["loss/gfn"] > 0 and first["gfn/residual_aug"] > 0 and math.isnan(first["gfn/residual_obs"])
    # the inspection shows the run's view: r_a = 0 on every trajectory, the observed one included,
    # and the closed-form log Z of the augmented trajectories alone
    for user in json.loads((d / "inspect.json").read_text())["users"]:
        trajs = user["trajectories"]
        assert trajs[0]["observed"] and all(t["r_a"] == 0 for t in trajs)
        aug = trajs[1:]
        log_z = sum(t["weight"] * (t["log_r"] - t["log_pf_sum"]) for t in aug) / sum(t["weight"] for t in aug)
        assert user["log_z"] == pytest.approx(log_z, abs=2e-3 * max(1.0, abs(log_z)))

    # one step by hand, lambda 0: L_GR on the sample, the GFlowNet term on the context after it
    ds = data_mod.load_dataset(cfg.data, verbose=False)
    train = data_mod.split_leave_one_out(ds)["train"]
    hl = torch.as_tensor(train.hist_len[:16])
    hist, target = trim(torch.as_tensor(train.hist[:16]), hl), torch.as_tensor(train.target[:16])
    model = torch.load(d / "checkpoint.pt", weights_only=False)
    from gflowgr import GFlowNetHeads, GRModel
    import collab
    gr = GRModel.from_state(model["model_args"], model["model"]).eval()
    cm = next(collab.SASRec.from_state(c["model_args"], c["model"]).eval()
              for c in (torch.load(p, weights_only=False) for p in Path(cfg.train.out, "toy").glob("cm-*/checkpoint.pt")))
    cfg.ft.lam = 0.0
    smp = sampler_mod.TrajectorySampler(cm, gr.item_codes.shape[0], cfg.sampler)
    loss, parts, stats, _ = finetune.gflowgr_step(gr, GFlowNetHeads(cfg.model.d_model, "vargrad"), cm, smp, hist, hl, target,
                                                  0.0, cfg, "tb", None, append_item(hist, hl, target, cfg.data.max_his_len))
    assert loss.item() == pytest.approx(gr_loss(gr(hist, hl, target)[0]).item(), rel=1e-6)
    assert parts["loss/gfn"] > 0
    # --gfn-kd, the distillation control: the same step with the pool's cross-entropy in TB's place
    cfg.ft.gfn_kd, cfg.ft.lam = True, 1.0
    loss, parts, _, _ = finetune.gflowgr_step(gr, GFlowNetHeads(cfg.model.d_model, "vargrad"), cm, smp, hist, hl, target,
                                              0.0, cfg, "tb", None, append_item(hist, hl, target, cfg.data.max_his_len))
    assert parts["weight/mean"].item() == 1.0 and 0 < parts["loss/gfn"].item() < 50
    assert loss.item() == pytest.approx(parts["loss/gr"].item() + parts["loss/gfn"].item(), rel=1e-6)


def test_refit_contexts_are_the_test_contexts_and_own_is_the_samples_own_history(toy_run):
    """--refit-test's GFlowNet context is each user's test context (the newest training sample's
    history, its item and the validation item); --gfn-context own is the sample's own history;
    test_contexts refuses rows that are not each user's newest sample."""
    from batches import to_tensors, trim
    from data import DataError

    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc")
    splits = data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False), cfg.data.max_his_len)
    t = {k: to_tensors(splits[k], "cpu") for k in ("train", "valid", "test")}
    last = finetune.last_contexts(t["train"], 1)
    refit = finetune.test_contexts(last, t["valid"], cfg.data.max_his_len)
    row = {int(u): i for i, u in enumerate(t["valid"]["user"])}
    assert [int(v) for v in refit["after"][:5]] == [int(t["valid"]["target"][row[int(u)]]) for u in last["user"][:5]]
    m = finetune.GFlowGR.__new__(finetune.GFlowGR)
    m.cfg, m.after = cfg, refit["after"]
    idx = torch.arange(8)
    hl = last["hist_len"][idx]
    hist, hist_len = m.context(idx, trim(last["hist"][idx], hl), hl, last["target"][idx])
    test_row = torch.tensor([{int(u): i for i, u in enumerate(t["test"]["user"])}[int(u)] for u in last["user"][idx]])
    assert torch.equal(hist_len, t["test"]["hist_len"][test_row])
    assert torch.equal(hist, trim(t["test"]["hist"][test_row], hist_len))
    cfg.ft.gfn_context = "own"
    own_hist, own_len = m.context(idx, trim(last["hist"][idx], hl), hl, last["target"][idx])
    assert torch.equal(own_len, hl) and torch.equal(own_hist, trim(last["hist"][idx], hl))
    with pytest.raises(DataError, match="use it with --ft-last 1"):
        finetune.test_contexts(finetune.last_contexts(t["train"], 2), t["valid"], cfg.data.max_his_len)


def test_refit_test_keeps_the_validation_models_valid_numbers_and_refits_the_tests(toy_run):
    """--refit-test: the valid numbers and best epoch are the run without it (reused from its folder),
    the test numbers come from a second model fitted on the test contexts for that many epochs, and
    reusing the twin gives what one process running both gives."""
    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc", log_z="vargrad", sft_prior=True)
    cfg.ft.ft_last, cfg.ft.ft_epochs = 1, 2
    plain = run(copy.deepcopy(cfg), log=lambda *a: None)
    cfg.ft.refit_test = True
    lines = []
    refit = run(copy.deepcopy(cfg), log=lines.append)
    assert any("[reuse] gflowgr-tb: the validation model's numbers" in line for line in lines)
    assert refit["valid"] == plain["valid"] and refit["test"] != plain["test"]
    assert refit["finetune"]["refit"]["best_epoch"] == plain["finetune"]["best_epoch"]
    d = run_dir(cfg)
    assert d.name.endswith("+ctx-next+refit__seed42") and (d / "metrics_refit.jsonl").exists()
    assert not any("eval/valid_ndcg@10" in line for line in (d / "metrics_refit.jsonl").read_text().splitlines())
    # one process, no finished twin: the same numbers
    import shutil
    shutil.rmtree(run_dir(copy.deepcopy(cfg)))
    twin = copy.deepcopy(cfg)
    twin.ft.refit_test = False
    shutil.rmtree(run_dir(twin))
    again = run(copy.deepcopy(cfg), log=lambda *a: None)
    assert again["valid"] == plain["valid"] and again["test"] == refit["test"]


def test_a_test_refit_killed_after_an_epoch_resumes_to_the_same_numbers(toy_run, monkeypatch):
    """--refit-test's model is resumable: stopped right after its first epoch's resume state is
    written, the same run continues from it (and says so) to the uninterrupted run's test numbers."""
    import shutil

    import cache

    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc", log_z="vargrad", sft_prior=True)
    cfg.ft.ft_last, cfg.ft.ft_epochs, cfg.train.tag = 1, 2, "kill"
    run(copy.deepcopy(cfg), log=lambda *a: None)  # the twin without the refit: the validation model
    twin = run_dir(cfg)
    saved = json.loads((twin / "metrics.json").read_text())
    saved["finetune"]["best_epoch"] = 2  # the refit trains what validation chose: here 2 epochs, so one resume state
    (twin / "metrics.json").write_text(json.dumps(saved))
    cfg.ft.refit_test = True
    whole = run(copy.deepcopy(cfg), log=lambda *a: None)
    shutil.rmtree(run_dir(cfg))

    class Killed(Exception):
        pass

    real = cache.save

    def save_then_die(obj, path):
        real(obj, path)
        if Path(path).name == "resume_refit.pt":
            raise Killed

    monkeypatch.setattr(cache, "save", save_then_die)
    with pytest.raises(Killed):
        run(copy.deepcopy(cfg), log=lambda *a: None)
    monkeypatch.setattr(cache, "save", real)
    assert (run_dir(cfg) / "resume_refit.pt").exists()
    lines = []
    again = run(copy.deepcopy(cfg), log=lines.append)
    assert any(line.startswith("[resume] gflowgr-tb continues after epoch 1 of 2") for line in lines)
    assert again["test"] == whole["test"] and again["valid"] == whole["valid"]
    assert not (run_dir(cfg) / "resume_refit.pt").exists()


def starting_weights(monkeypatch):
    """Record a weight of the model each pipeline.finetune call starts from: [(refit, tensor)]."""
    import pipeline

    seen, real = [], pipeline.finetune

    def spy(model, *args, **kw):
        seen.append((kw.get("refit", False), model.head.detach().clone()))
        return real(model, *args, **kw)

    monkeypatch.setattr(pipeline, "finetune", spy)
    return seen


def saved_head(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=False)["model"]["head"]


def test_a_warm_refit_continues_the_validation_model_for_its_own_epochs(toy_run, monkeypatch):
    """--refit-epochs N: the test's model starts from the validation model (the finished twin's
    checkpoint, or the model this process just validated), not from SFT, and trains N epochs."""
    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc", log_z="vargrad", sft_prior=True)
    cfg.ft.ft_last, cfg.ft.ft_epochs, cfg.train.tag = 1, 2, "warm"
    plain = run(copy.deepcopy(cfg), log=lambda *a: None)
    twin = run_dir(cfg)
    seen = starting_weights(monkeypatch)
    cfg.ft.refit_test, cfg.ft.refit_epochs = True, 1
    warm = run(copy.deepcopy(cfg), log=lambda *a: None)
    assert [r for r, _ in seen] == [True] and torch.equal(seen[0][1], saved_head(twin))
    assert warm["valid"] == plain["valid"] and warm["finetune"]["refit"]["best_epoch"] == 1
    assert run_dir(cfg).name.endswith("+refit+refit-warm1+warm__seed42")
    rows = [json.loads(line) for line in (run_dir(cfg) / "metrics_refit.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in rows) == 1
    # without the finished twin: the validation model of this very process
    import shutil
    shutil.rmtree(run_dir(cfg))
    shutil.rmtree(twin)
    seen.clear()
    priors, real_init = [], finetune.GFlowGR.__init__

    def init(self, *a, **k):  # the frozen prior each GFlowGR model is built with
        real_init(self, *a, **k)
        priors.append(self.prior.head.detach().clone())

    monkeypatch.setattr(finetune.GFlowGR, "__init__", init)
    again = run(copy.deepcopy(cfg), log=lambda *a: None)
    assert [r for r, _ in seen] == [False, True] and not torch.equal(seen[1][1], seen[0][1])  # not SFT again
    assert again["valid"] == plain["valid"] and again["test"] == warm["test"]
    # the target's P_SFT stays the SFT model's when the model starts from the validation model
    assert len(priors) == 2 and all(torch.equal(p, seen[0][1]) for p in priors)


def test_init_from_starts_the_fine_tuning_from_that_runs_model(toy_run, monkeypatch):
    """--init-from FOLDER: the fine-tuning starts from that run's fine-tuned model, not from SFT."""
    cfg = finetune_config(toy_run, "sft-continued")
    cfg.train.tag = "src"
    run(copy.deepcopy(cfg), log=lambda *a: None)
    src = run_dir(cfg)
    seen = starting_weights(monkeypatch)
    cfg.train.tag, cfg.ft.init_from = "", str(src)
    lines = []
    run(copy.deepcopy(cfg), log=lines.append)
    assert torch.equal(seen[0][1], saved_head(src))
    assert any(line.startswith(f"[init] sft-continued starts from the model of {src}") for line in lines)
    assert "+init-" in run_dir(cfg).name


def toy_sft(cfg):
    """The toy SFT model of the session's cached stage, in eval mode."""
    from gflowgr import GRModel

    ckpt = torch.load(next(Path(cfg.train.out, "toy").glob("sft-*/checkpoint.pt")), weights_only=False)
    return GRModel.from_state(ckpt["model_args"], ckpt["model"]).eval()


def test_prior_log_p_reads_the_prior_top_n_and_decodes_only_rows_outside_it(toy_run, monkeypatch):
    """prior_log_p with the prior's own top-N (--candidates prior): the beam search's scores are the
    decoded log P_SFT of the same items (up to float rounding), and only a row holding an item
    outside the top-N is decoded."""
    from batches import to_tensors, trim

    cfg = finetune_config(toy_run, "gflowgr-tb")
    sft = toy_sft(cfg)
    t = to_tensors(data_mod.split_leave_one_out(data_mod.load_dataset(cfg.data, verbose=False), cfg.data.max_his_len)["valid"], "cpu")
    hl = t["hist_len"][:12]
    hist = trim(t["hist"][:12], hl)
    top, top_log_p = sft.beam_search(hist, hl, 10, 10)  # (12, 10) each
    items = top[:, [3, 0, 7, 1, 9]].clone()  # (12, 5): drawn from the top-10 in another order
    outside = next(i for i in range(sft.item_codes.shape[0]) if i not in top[4].tolist())
    items[4, 2] = outside  # one item of row 4 is not in its top-10
    decoded = finetune.prior_log_p(sft, hist, hl, items)
    rows, real = [], sft.trajectories

    def spy(h, *a, **k):
        rows.append(len(h))
        return real(h, *a, **k)

    monkeypatch.setattr(sft, "trajectories", spy)
    got = finetune.prior_log_p(sft, hist, hl, items, known=(top, top_log_p))
    assert rows == [1]  # row 4 alone was decoded
    assert torch.allclose(got, decoded, atol=1e-4) and not torch.equal(got[:, 0], got[:, 1])
    assert torch.allclose(got[0, :2], top_log_p[0, [3, 0]])


def test_prior_candidates_are_the_sft_models_top_n_searched_once(toy_run, monkeypatch):
    """--candidates prior: one beam search of the frozen SFT model per GFlowNet context, before the
    first epoch; every step's augmented items come from it (or are redraws of v), no step searches."""
    import sampler as sampler_mod
    from gflowgr import GRModel

    cfg = finetune_config(toy_run, "gflowgr-tb", gfn_context="next", reward="rc", log_z="vargrad", sft_prior=True)
    cfg.ft.ft_last, cfg.ft.ft_epochs = 1, 2
    cfg.sampler.candidates, cfg.sampler.sampler, cfg.sampler.n_candidates, cfg.sampler.K = "prior", "random", 10, 5
    asked, searches, tables = [], [], []
    real_sample, real_beam, real_top = (sampler_mod.TrajectorySampler.sample, GRModel.beam_search,
                                        finetune.GFlowGR.prior_top)

    def sample(self, hist, hist_len, target, *a, **kw):
        aug, r_c = real_sample(self, hist, hist_len, target, *a, **kw)
        asked.append((hist, hist_len, target, kw.get("proposals", a[4] if len(a) > 4 else None), aug))
        return aug, r_c

    def beam(self, *a, **kw):
        searches.append(len(a[0]))
        return real_beam(self, *a, **kw)

    def prior_top(self, frozen, train_t):
        out = real_top(self, frozen, train_t)
        tables.append((out, len(train_t["target"])))
        return out

    monkeypatch.setattr(sampler_mod.TrajectorySampler, "sample", sample)
    monkeypatch.setattr(GRModel, "beam_search", beam)
    monkeypatch.setattr(finetune.GFlowGR, "prior_top", prior_top)
    metrics = run(cfg, log=lambda *a: None)
    assert "+cand-prior+" in run_dir(cfg).name
    assert len(tables) == 1 and tables[0][0][0].shape == (tables[0][1], 10)
    n_steps = metrics["finetune"]["step"]
    for hist, hist_len, target, proposals, aug in asked[: 1 + n_steps]:  # the offset's batch, then every step
        assert proposals is not None and proposals.shape == (len(target), 10)
        inside = (aug[:, :, None] == proposals[:, None, :]).any(-1)  # (B, K)
        # the proposals the sampler redraws uniformly: v and (toy: no --candidates-history) the history's
        redrawn = (proposals == target[:, None]) | (proposals[:, :, None] == hist[:, None, :]).any(-1)  # (B, N)
        assert bool(((~inside).sum(1) <= redrawn.sum(1)).all()) and bool(inside.any())
    # the table is the SFT model's own top-10 of each context (the first step's rows, searched again)
    hist, hist_len, _, proposals, _ = asked[1]
    assert torch.equal(real_beam(toy_sft(cfg), hist, hist_len, 10, 10)[0], proposals)
    # the table's search is the first (one batch of every context)
    assert searches[0] == tables[0][1] and 0 < metrics["test"]["hr@10"] <= 1
