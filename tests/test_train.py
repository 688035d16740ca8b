"""The command line (train.py): bad fine-tuning flags end with one error line."""
import pytest

from train import cli


@pytest.mark.parametrize("argv, message", [
    (["--reward", "ra,foo"], "--reward must be"),
    (["--candidates", "beam"], "unknown --candidates 'beam'"),
    (["--reward-beta", "0"], "--reward-beta must be > 0"),
    (["--sampler", "greedy"], "unknown sampler"),
])
def test_cli_bad_finetune_flags(argv, message, capsys):
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
