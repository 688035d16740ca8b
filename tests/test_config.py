"""The configuration (config.py): defaults <- preset <- flags."""
from config import parse_config


def test_parse_config_preset_then_flags():
    cfg = parse_config(["--dataset", "toy", "--epochs", "3", "--d-model", "32"])
    assert cfg.train.epochs == 3 and cfg.model.d_model == 32
    assert cfg.tok.codebook_size == 16  # from the toy preset
    assert parse_config(["--dataset", "beauty"]).tok.codebook_size == 256
