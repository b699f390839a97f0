"""Starting one training process, N spawned workers, or a torchrun worker.

All communication goes through ``torch.distributed``: NCCL when CUDA is available, gloo
otherwise (CPU training with several processes works the same way). Three cases:

- ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the environment):
  this process is one worker; the group is initialized from the environment.
- ``num_processes > 1``: spawn that many workers on this machine, joined over a local TCP port.
- otherwise: call the function in this process, with no process group.

``timeout`` (``--dist-timeout``) bounds how long a process waits in a collective for the others,
in every case with a process group; a worker whose collective times out stops with an error
that names the timeout and the ranks that did not answer, instead of hanging.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["get_local_rank", "launch", "resolve_backend"]

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKENDS = ("auto", "nccl", "gloo")

# Set in each spawned worker; torchrun workers read LOCAL_RANK instead.
_LOCAL_RANK: int | None = None


def get_local_rank() -> int:
    """Rank of this process on its machine (selects its GPU); 0 in a single process."""
    if _LOCAL_RANK is not None:
        return _LOCAL_RANK
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_backend(backend: str) -> str:
    """``"auto"`` becomes ``"nccl"`` when CUDA is available, else ``"gloo"``."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend is {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _limit_cpu_threads(world_size: int) -> None:
    # N CPU workers with all-core thread pools each would oversubscribe the machine.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def _is_timeout(err: RuntimeError) -> bool:
    # gloo: "Timed out waiting 5000ms for recv operation to complete"; NCCL and the store
    # say "timeout" or "Timed out" too (DistBackendError and DistStoreError are RuntimeErrors).
    message = str(err).lower()
    return "timed out" in message or "timeout" in message


def _silent_ranks(message: str, rank: int, world_size: int) -> str:
    """Who did not answer: the other ranks the backend's message names, else the peer address
    it names, else every rank but this one."""
    named = {int(r) for r in re.findall(r"\brank\s*\[?(\d+)", message, re.IGNORECASE)}
    named = sorted(r for r in named if r != rank and r < world_size)
    if named:
        return f"rank(s) {', '.join(map(str, named))}"
    if world_size == 2:
        others = f"rank {1 - rank}"
    else:
        others = f"a process among ranks 0..{world_size - 1} other than {rank}"
    address = re.search(r"\[([^\]]+)\]:(\d+)", message)
    if address:
        return f"the peer at {address.group(1)}:{address.group(2)}, {others},"
    return others


def _run_in_group(
    main_func: Callable[..., Any],
    args: tuple,
    *,
    backend: str,
    init_method: str,
    rank: int,
    world_size: int,
    local_rank: int,
    timeout: timedelta,
) -> Any:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        _limit_cpu_threads(world_size)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        return main_func(*args)
    except RuntimeError as err:
        if not _is_timeout(err):
            raise
        seconds = f"{timeout.total_seconds():g} s"
        raise RuntimeError(
            f"rank {rank} of {world_size}: a collective timed out after {seconds} "
            f"(--dist-timeout): {_silent_ranks(str(err), rank, world_size)} did not join the "
            f"collective within {seconds}; it may be hung, stopped or far slower. "
            f"{backend} said: {err}"
        ) from err
    finally:
        dist.destroy_process_group()


def _spawned_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    init_method: str,
    backend: str,
    timeout: timedelta,
    args: tuple,
) -> None:
    global _LOCAL_RANK
    _LOCAL_RANK = local_rank
    _run_in_group(
        main_func,
        args,
        backend=backend,
        init_method=init_method,
        rank=local_rank,
        world_size=world_size,
        local_rank=local_rank,
        timeout=timeout,
    )


def launch(
    main_func: Callable[..., Any],
    num_processes: int = 1,
    *,
    dist_url: str = "auto",
    backend: str = "auto",
    timeout: timedelta = timedelta(minutes=30),
    args: tuple = (),
) -> Any:
    """Run ``main_func(*args)`` in every process of a (possibly trivial) distributed job.

    Args:
        main_func: a module-level function (spawned workers import it by name).
        num_processes: workers to spawn on this machine (``--num-gpus``); 1 runs in this
            process. Must be 1 under torchrun, which starts the workers itself.
        dist_url: where spawned workers rendezvous; ``"auto"``: a free local TCP port.
        backend: ``"auto"``, ``"nccl"`` or ``"gloo"``.
        timeout: how long a process waits in a collective (and at the rendezvous) for the
            others before it stops with an error (``--dist-timeout``); must be positive.
        args: positional arguments of ``main_func`` (picklable when spawning).

    Returns:
        What ``main_func`` returns in this process; ``None`` when workers were spawned.
    """
    backend = resolve_backend(backend)
    if timeout.total_seconds() <= 0:
        raise ValueError(
            f"timeout (--dist-timeout) is {timeout.total_seconds():g} s; expected > 0 seconds"
        )
    if num_processes < 1:
        raise ValueError(f"num_processes (--num-gpus) is {num_processes}; expected >= 1")
    under_torchrun = all(name in os.environ for name in TORCHRUN_VARIABLES)
    if under_torchrun:
        if num_processes > 1:
            raise ValueError(
                f"--num-gpus {num_processes} under torchrun: torchrun already starts the workers "
                "(use its --nproc-per-node), so pass --num-gpus 1"
            )
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size == 1:
            return main_func(*args)
        return _run_in_group(
            main_func,
            args,
            backend=backend,
            init_method="env://",
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            local_rank=int(os.environ["LOCAL_RANK"]),
            timeout=timeout,
        )
    if num_processes == 1:
        return main_func(*args)
    if backend == "nccl" and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"--num-gpus {num_processes} with the NCCL backend, but only "
            f"{torch.cuda.device_count()} CUDA devices are visible"
        )
    init_method = f"tcp://127.0.0.1:{_free_port()}" if dist_url == "auto" else dist_url
    logger.info("spawning %d %s workers (%s)", num_processes, backend, init_method)
    mp.start_processes(
        _spawned_worker,
        args=(main_func, num_processes, init_method, backend, timeout, args),
        nprocs=num_processes,
        start_method="spawn",
    )
    return None
