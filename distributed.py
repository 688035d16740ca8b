"""More than one process: `torchrun` with DistributedDataParallel (DDP), Gloo on CPUs, NCCL on GPUs.

    torchrun --standalone --nproc_per_node 2 train.py --dataset toy --method gflowgr-tb

How one run is shared between N processes (ranks; rank 0 is the main one):

- Every rank runs the same pipeline on the same data and holds the same model. Each epoch's
  batches come in the same order on every rank (one generator, seeded alike), and each rank
  trains on its own slice of every global batch (`shard`): the global batch stays
  --batch-size, so the numbers mean what one process's mean.
- `ddp` wraps what one optimiser trains (the backbone, the log Z / log F heads, PPO's value
  head, the CM) in DDP: backward all-reduces (averages) the gradients, so every rank takes
  the same step. Each rank's loss is scaled by its share of the global batch (`share`), so
  the average of the ranks' gradients is the gradient of the global batch's mean loss.
- Random streams that draw per sample (dropout, the sampler's uniform candidates, the
  baselines' draws) are seeded per rank (`rank_seed`); the batch order and the CM's negatives
  are drawn for the global batch on every rank alike. Resume states keep every rank's own
  streams (`gather`, `own`), so a resumed run continues to the same numbers.
- Evaluation is sharded: rank r beam-searches chunks r, r + N, ... of the users, exactly the
  chunks one process would form, and the top-k lists are gathered (`gather_rows`). A user's
  list does not depend on which rank computes it, so metrics are those of one process,
  and validation during training costs 1/N of the time.
- Rank 0 alone writes files (cache.save, cache.atomic_write_json, runtime.JsonlLogger check
  `is_main`) and prints; stages computed once (item embeddings, semantic IDs: `main_first`)
  run on rank 0 while the others wait at a barrier, then load its cached result.
- The semantic-ID stage (RQ-VAE, LETTER) is not sharded: it takes seconds to minutes, its
  k-means initialisation reads every item at once, and every rank must hold the same IDs.

Without torchrun (no WORLD_SIZE in the environment) every function here is the identity: a
plain `python train.py` is one process exactly as before, bit for bit.

Usage: `distributed.init(cfg); mine = distributed.shard(b); loss = ddp_model(loss_fn, ...) * distributed.share(len(mine), len(b))`
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def world() -> int:
    """Number of processes of this run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun; torchrun's RANK before the group is joined)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0."""
    return rank() == 0


def launched() -> int:
    """The world size torchrun asked for (its WORLD_SIZE), before init; 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(cfg) -> None:
    """Join torchrun's process group (Gloo on CPU, NCCL on CUDA) after checking that cfg can run
    on it; a no-op without torchrun. Ranks > 0 print nothing from here on (their stdout is
    dropped; errors still reach stderr). cfg: config.Config."""
    n = launched()
    if n == 1 or dist.is_initialized():
        return
    from data import DataError  # the user's mistakes are DataErrors: one message, no traceback

    t = cfg.train
    if t.study:
        raise DataError(f"--study runs many runs in one process and is not supported under torchrun "
                        f"({n} processes): run it as `python train.py --study {t.study} ...`")
    for flag, size in (("--batch-size", t.batch_size), ("--cm-batch-size", cfg.cm.batch_size)):
        if size % n:
            raise DataError(f"{flag} {size} is not divisible by the {n} processes: each takes an equal share of every "
                            f"batch; choose a multiple of {n}, or another --nproc_per_node")
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", n))
    if cuda and torch.cuda.device_count() < local_world:
        raise DataError(f"{local_world} processes on this machine but {torch.cuda.device_count()} GPU(s): one GPU per "
                        f"process; lower --nproc_per_node or use --device cpu")
    if cuda:
        torch.cuda.set_device(local_rank)  # 'cuda' means this rank's own GPU from here on
    # rank 0 alone builds the semantic IDs while the others wait at a barrier: minutes on Yelp
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def close() -> None:
    """Leave the process group at the end of the command (a no-op without torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """fn() on rank 0, then on the others: a cached stage is computed and saved once, then loaded."""
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def rank_seed(seed: int) -> int:
    """The seed of a random stream that draws per sample: seed itself on rank 0, another one per rank."""
    return seed + 1000 * rank()


def reseed_rank_streams(seed: int) -> None:
    """Give ranks > 0 their own global torch stream (dropout) after the model is built alike on all."""
    if rank() > 0:
        torch.manual_seed(rank_seed(seed))


def key() -> list:
    """What a cached stage's or a run's key adds for a multi-process run ([] for one process:
    the keys of one-process runs are unchanged): its numbers differ from one process's in the last bits."""
    return [] if world() == 1 else [{"world": world()}]


# ------------------------------------------------------------------------------ training


def shard(b: torch.Tensor, r: int | None = None, n: int | None = None) -> torch.Tensor:
    """Rank r's rows of the global batch b (default: this rank's of this world): contiguous slices
    whose sizes differ by at most 1.

    A batch smaller than the world (an epoch's last) is trained whole by every rank: their
    identical gradients average to that batch's own.
    >>> shard(torch.arange(5), 1, 2), shard(torch.arange(5))  # rank 1 of 2; one process
    (tensor([3, 4]), tensor([0, 1, 2, 3, 4]))
    """
    r, n = rank() if r is None else r, world() if n is None else n
    if n == 1 or len(b) < n:
        return b
    return b.tensor_split(n)[r]


def share(n_mine: int, n_all: int, n: int | None = None) -> float:
    """The factor on a rank's mean loss over n_mine of the global batch's n_all samples (or
    positions) that makes DDP's average of the ranks' gradients the gradient of the global mean:
    (1/N) sum_r (N n_r / n_all) mean_r = (1/n_all) sum_i loss_i. 1 for one process, or when
    every rank trains the whole batch (`shard`). n: the world (default this one's).
    >>> share(3, 5, 2), share(2, 5, 2), share(1, 1, 2)
    (1.2, 0.8, 1.0)
    """
    return 1.0 if n_mine == n_all else (world() if n is None else n) * n_mine / n_all


def batch_mean(x: torch.Tensor, weight: float) -> torch.Tensor:
    """The global batch's mean of a rank's mean x, weighted by its `share`: for the logs.
    Collective: every rank must call it at the same step."""
    if world() == 1:
        return x
    y = x.detach().double() * weight
    dist.all_reduce(y)
    return (y / world()).to(x.dtype)


class Trainable(nn.Module):
    """What one optimiser trains, as one module for DDP; calling it computes a loss.

    The methods' losses call the backbone's own functions (model(...), model.trajectories, the
    heads), not one forward, so DDP wraps a call of the loss itself: `ddp(loss_fn, *args)`.
    """

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.extra = nn.ParameterList(params)  # parameters of no listed module (a method's heads)

    def forward(self, loss_fn, *args):
        return loss_fn(*args)


def ddp(modules: list[nn.Module], params: list[nn.Parameter] = ()):
    """compute(loss_fn, *args) -> loss_fn(*args), under DDP when there is more than one process.

    Built after every rank has set its parameters (DDP copies rank 0's to the others once).
    find_unused_parameters: a method may leave some parameters out of a loss (the log Z head
    under --log-z vargrad, log F under TB); forward_sync_buffers off: the buffers (item codes,
    the trie) are the same on every rank and never change, so DDP's copy of rank 0's at
    construction is the only sync they need.
    """
    if world() == 1:
        return lambda loss_fn, *args: loss_fn(*args)
    own = {id(p) for m in modules for p in m.parameters()}
    module = Trainable(modules, [p for p in params if id(p) not in own])
    dev = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                               find_unused_parameters=True, forward_sync_buffers=False)


# ------------------------------------------------------------------------------ gathering


def gather(obj) -> list | None:
    """Every rank's obj, in rank order (collective; pickled); None for one process."""
    if world() == 1:
        return None
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def own(state: dict, name: str):
    """This rank's entry `name` of a resume state: its own from state['ranks'] (written by more
    than one process), else the state's."""
    ranks = state.get("ranks")
    return state[name] if ranks is None else ranks[rank()][name]


def chunks(order: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    """This rank's (index, chunk) of order.split(size): chunks rank, rank + N, ... (all for one process)."""
    return [(i, c) for i, c in enumerate(order.split(size)) if i % world() == rank()]


def gather_rows(rows: dict[int, tuple]) -> dict[int, tuple]:
    """Every rank's {chunk index: tensors} merged (CPU tensors; collective). Identity for one process."""
    if world() == 1:
        return rows
    merged = {}
    for part in gather(rows):
        merged.update(part)
    return merged
