"""Multi-process training with PyTorch's own engine: torchrun sets the environment, we join it.

``torchrun --nproc_per_node N -m nam_prune run RECIPE`` (or ``nam-prune run --nproc N``)
starts N copies; each joins the process group (nccl on CUDA, gloo on CPU), trains its
shard under DistributedDataParallel, and only rank 0 writes files or draws progress.
"""

from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from nam_prune.errors import NamPruneError

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("NAM_PRUNE_DIST_TIMEOUT", "600")))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes; a timeout turns a dead peer into an error, not a hang."""
    if dist.is_initialized() or not launched_by_torchrun():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each rank uses its own GPU; on the CPU every rank shares the host."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value on every rank (e.g. the run folder it chose)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun, the model itself otherwise."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BN running statistics (each rank saw only its own last batch)."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def average_buffers(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks (statistics each rank estimated on its shard)."""
    if not active():
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(world_size())


def state_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, to check replicas are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(model: nn.Module, what: str) -> None:
    """Every rank must hold the same model: raise on all ranks if one differs."""
    if not active():
        return
    digests = [None] * world_size()
    dist.all_gather_object(digests, state_digest(model))
    if len(set(digests)) != 1:
        raise NamPruneError(f"ranks disagree after {what}: the replicas' weights differ; rerun with one process")


def launch(nproc: int, argv: list[str]) -> None:
    """``nam-prune run --nproc N``: run the same command under torchrun (standalone) and wait.

    A failed worker has already printed its one-line error; this adds one line saying which rank.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "-m", "nam_prune", *argv]
    )
    try:
        torchrun(args)
    except ChildFailedError as error:  # its text repeats the worker's message, printed above: not chained
        failed_rank, failure = error.get_first_failure()
        raise NamPruneError(
            f"worker rank {failed_rank} failed with exit code {failure.exitcode}; its message is above"
        ) from None
