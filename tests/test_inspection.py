"""Per-user inspection (inspection.py): inspect.json of a toy GFlowGR-TB run holds Sec. 3's quantities, consistent with each other."""
import json
import math

import pytest

from losses import REWARD_FLOOR, WEIGHT_MIN_GAP


def test_inspect_json_is_consistent_with_the_reward_and_the_policy(app_runs):
    run = app_runs / "toy__gflowgr-tb__seed42"
    cfg = json.loads((run / "config.json").read_text())
    ins = json.loads((run / "inspect.json").read_text())
    assert ins["method"] == "gflowgr-tb" and ins["objective"] == "tb" and len(ins["users"]) == cfg["ft"]["inspect_users"]
    beta = cfg["ft"]["reward_beta"]
    for user in ins["users"]:
        trajs = user["trajectories"]
        assert len(trajs) == 1 + cfg["sampler"]["K"] and trajs[0]["observed"] and trajs[0]["item"] == user["target"]
        assert user["target"] not in [t["item"] for t in trajs[1:]]  # augmented items are other items
        assert user["history"] and user["user"] >= 0 and isinstance(user["log_z"], float)
        for t in trajs:
            # the policy: sum_l log P_F = log of the product of the per-step probabilities (p_f is
            # rounded to 4 decimals: each contributes up to 0.5e-4 / p to the error of the log)
            tol = sum(0.5e-4 / p for p in t["p_f"]) + 1e-4
            assert math.log(math.prod(t["p_f"])) == pytest.approx(t["log_pf_sum"], abs=tol)
            # Sec. 3.2: R = r_a + r_c + r_sim, and the target log R^beta with its floor
            assert t["R"] == pytest.approx(t["r_a"] + t["r_c"] + t["r_sim"], abs=1e-3)
            assert t["log_r"] == pytest.approx(beta * math.log(max(t["R"], REWARD_FLOOR)), abs=1e-3)
            # Eq. (8): w = 1 / max(|r_a - r_c|, 0.3)^2
            assert t["weight"] == pytest.approx(1 / max(abs(t["r_a"] - t["r_c"]), WEIGHT_MIN_GAP) ** 2, rel=1e-3)
            assert len(t["log_flow"]) == len(t["codes"]) == len(t["p_f"])
        for side in ("sft", "finetuned"):  # beam-search lists, best first
            probs = user[side]["probs"]
            assert len(user[side]["items"]) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-4
