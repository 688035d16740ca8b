"""The Table 1 baselines run end to end on toy from the cached SFT, and build the right training pairs."""
import json

import pytest
import torch

from test_finetune import run_from_cached_sft


@pytest.mark.parametrize("method, loss_key", [("dpo", "loss/dpo"), ("sdpo", "loss/sdpo"), ("sprec", "loss/dpo"),
                                              ("ipa", "loss/dpo"), ("grpo", "loss/grpo"), ("ppo", "loss/ppo")])
def test_baseline_runs_from_the_cached_sft_and_writes_artefacts(toy_run, method, loss_key):
    cfg, metrics, d, saved = run_from_cached_sft(toy_run, method)
    curves = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    losses = [r[loss_key] for r in curves if loss_key in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (d / "checkpoint.pt").exists()


class StubModel(torch.nn.Module):
    """Just what Baseline.start_epoch touches: a config and a train/eval mode."""

    def __init__(self):
        super().__init__()
        self.cfg = type("C", (), {"d_model": 8})()


class ItemIdCM:
    """CM stand-in: the score of item i is i / 100 for every user."""

    def score(self, hist, hist_len, items, full=None):
        return items.float() / 100


def test_sprec_rejects_the_models_top1_and_ipa_ranks_its_own_outputs_by_the_cm():
    from baselines import Baseline, BaselineConfig
    train_t = {"hist": torch.tensor([[1, 2], [3, -1], [4, 5]]), "hist_len": torch.tensor([2, 1, 2]),
               "target": torch.tensor([7, 8, 9])}
    top = torch.tensor([[7, 30, 11], [12, 8, 50], [40, 10, 20]])  # the model's own top-3 per sample
    propose = lambda m, n: top[:, :n]
    sprec = Baseline("sprec", StubModel(), None, ItemIdCM(), None, BaselineConfig(), ("ra",), 3, 3, propose)
    sprec.start_epoch(0, train_t)
    # chosen = observed; rejected = top-1, or top-2 where top-1 is the observed item (sample 0)
    assert sprec.pairs.tolist() == [[7, 30], [8, 12], [9, 40]]
    ipa = Baseline("ipa", StubModel(), None, ItemIdCM(), None, BaselineConfig(ipa_n=3), ("ra",), 3, 3, propose)
    ipa.start_epoch(0, train_t)
    # chosen = the CM's favourite among the model's outputs, rejected = its least favourite
    assert ipa.pairs.tolist() == [[30, 7], [50, 8], [40, 10]]
