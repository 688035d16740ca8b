"""Run plumbing (runtime.py): a non-finite loss or gradient stops the run naming the step and the term."""
import pytest
import torch

from runtime import check_finite


def test_non_finite_loss_or_gradient_stops_with_step_and_term():
    nan = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 5: loss/gfn"):
        check_finite(5, nan, {"loss/gr": torch.tensor(1.0), "loss/gfn": nan}, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 7"):
        check_finite(7, torch.tensor(2.0), {}, torch.tensor(float("inf")))
    check_finite(8, torch.tensor(2.0), {"loss/gr": torch.tensor(2.0)}, torch.tensor(3.0))  # finite: no error
