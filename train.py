"""The command line (paper Sec. 4, the experiments): parse the flags, run the stages, print the table.

    python train.py --dataset beauty                    SFT -> CM -> GFlowGR-TB, one table (pipeline.run)
    python train.py --dataset beauty --method sft       one run of any method (config.METHODS)
    python train.py --dataset beauty --method all --seeds 42 43 44    Table 1 with t-tests (pipeline.run_table)
    python train.py --dataset beauty --study ablation   an analysis study (experiments.py)
    python train.py --dataset beauty --study tilt       how much of its target the fine-tuning learned (tilt.py)
    python train.py --dataset beauty --study tilt-fit   can the GR hold that target at all (tilt.py)
    torchrun --standalone --nproc_per_node 2 train.py --dataset toy    the same on 2 processes (distributed.py)

Every flag is a field of config.Config (`python train.py --help`); a data set's preset fills
what the flags leave out. Where the code for each part lives: README, "Reading guide".

Usage: `python train.py --dataset toy`   (or `train.main(cfg)` in Python: the same, in-process)
"""
from __future__ import annotations

import sys

import distributed
import experiments
import pipeline
import tilt
from config import Config, finalize, parse_config
from data import DataError


def main(cfg: Config, log=print) -> dict:
    """What the command line does with cfg: a study, Table 1's runs, or one run. Returns the
    study's or table's summary, or the run's metrics (its metrics.json). Under torchrun the
    process group is joined first (distributed.py); without it nothing changes."""
    distributed.init(cfg)
    if cfg.train.study == "tilt":
        return tilt.study_tilt(cfg, log)
    if cfg.train.study == "tilt-fit":
        return tilt.study_tilt_fit(cfg, log)
    if cfg.train.study:
        return experiments.run_study(cfg, log)
    if cfg.train.method == "all" or cfg.train.seeds:
        return pipeline.run_table(finalize(cfg), log)
    return pipeline.run(cfg, log)


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_config(argv))
        distributed.close()
    except (DataError, FloatingPointError) as e:
        if distributed.is_main():  # torchrun: one message, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # An object half built when the Ctrl-C landed (a tqdm bar, say) can fail in its __del__
        # as the interrupted frames are freed, printing a traceback that is not the user's
        # concern: the process is ending, so such destructor errors are dropped from here on.
        sys.unraisablehook = lambda unraisable: None
        print("interrupted: rerun the same command to continue after the last finished epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
