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


def test_logger_resumes_cut_back_to_the_checkpoint_or_restarts(tmp_path):
    from runtime import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    log.log(step=1)
    at = log.tell()
    log.log(step=2)  # written after the checkpoint: dropped on resume
    log.close()
    log = JsonlLogger(path, resume_bytes=at)
    log.log(step=3)
    log.close()
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 3}']
    log = JsonlLogger(path, resume_bytes=at)
    log.restart()
    log.log(step=1)
    log.close()
    assert path.read_text().splitlines() == ['{"step": 1}']
