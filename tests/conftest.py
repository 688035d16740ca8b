"""Shared fixtures: a tiny toy configuration and one SFT run trained into a temporary folder."""
import pytest

from data import DataConfig
from train import Config, TrainConfig, apply_preset


def tiny_config(out, **train_overrides) -> Config:
    """The toy preset with a budget small enough for the test suite (a few seconds)."""
    cfg = Config(data=DataConfig(dataset="toy"), train=TrainConfig(out=str(out), epochs=6, patience=3, **train_overrides))
    return apply_preset(cfg)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """(config, metrics, log lines) of one finished toy SFT run."""
    from train import main

    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(out)
    lines = []
    metrics = main(cfg, log=lines.append)
    return cfg, metrics, lines
