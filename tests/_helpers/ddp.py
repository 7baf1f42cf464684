"""Run a function in several CPU processes joined by a gloo process group.

``run_distributed(fn, world_size=2, *args)`` forks ``world_size`` processes, initialises
``torch.distributed`` (gloo, file rendezvous) in each, calls ``fn(rank, world_size, *args)`` and
returns the per-rank results in rank order. Results travel back pickled, so return tensors, numbers
or containers of them. An exception in any rank fails the caller with that rank's traceback.

Processes are forked (not spawned) so that test-local functions and closures work and start-up stays
fast; each child runs torch with one intra-op thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["run_distributed"]


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    queue: Any,
) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, os.getpid(), pickle.dumps(result), None))
    except BaseException:
        queue.put((rank, os.getpid(), None, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 180.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        pids: dict[int, int] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                r, pid, payload, error = queue.get(timeout=timeout)
                pids[r] = pid
                if error is not None:
                    errors.append(f"rank {r} (pid {pid}) failed:\n{error}")
                else:
                    results[r] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(set(pids.values())) != world_size or os.getpid() in pids.values():
        raise AssertionError(f"expected {world_size} separate processes, got pids {pids}")
    print(f"run_distributed: {world_size} gloo processes, pids {[pids[r] for r in sorted(pids)]}")
    return [results[r] for r in range(world_size)]
