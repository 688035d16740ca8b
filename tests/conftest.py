"""Shared fixtures: a tiny toy configuration and one SFT run trained into a temporary folder.

The suite runs its files on parallel workers (pytest-xdist, `-n auto --dist loadfile` in
pytest.ini; `-n 0` runs it in one process); each worker gets its share of the cores as torch
threads, so two workers on two cores do not fight over them.
"""
import os

import pytest

from data import DataConfig
from config import Config, TrainConfig, apply_preset


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The two longest files go first, longest first, so that the workers finish together: in name
# order the reliability file started last and the other worker sat idle waiting for it.
SLOW_FIRST = ("test_reliability.py", "test_experiments.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file's own order stays


def tiny_config(out, **train_overrides) -> Config:
    """The toy preset with a budget small enough for the test suite (a few seconds); method sft unless given."""
    train_overrides.setdefault("method", "sft")
    cfg = Config(data=DataConfig(dataset="toy"), train=TrainConfig(out=str(out), epochs=6, patience=3, **train_overrides))
    return apply_preset(cfg)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """(config, metrics, log lines) of one finished toy SFT run."""
    from pipeline import run as main

    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(out)
    lines = []
    metrics = main(cfg, log=lines.append)
    return cfg, metrics, lines


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory):
    """A runs folder for the app: a tiny toy GFlowGR-TB run and the SFT run it started from
    (the SFT stage and the CM cached beside them)."""
    from pipeline import run as main

    out = tmp_path_factory.mktemp("app_runs")
    cfg = tiny_config(out, method="gflowgr-tb")
    cfg.ft.ft_epochs, cfg.cm.epochs = 1, 5  # the app needs artefacts, not accuracy
    main(cfg, log=lambda *a: None)
    main(tiny_config(out), log=lambda *a: None)  # method sft: reuses the cached SFT stage
    return out
