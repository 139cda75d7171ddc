"""Run a function on W gloo workers inside pytest, with a timeout that fails instead of hanging."""

import io
import os
import queue
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _to_bytes(value) -> bytes:
    # Tensors put on a queue travel as file descriptors that die with the worker; bytes outlive it.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank, world_size, rendezvous, fn, args, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
        results.put((rank, _to_bytes(fn(rank, world_size, *args))))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # report it to the test instead of dying silently
        results.put((rank, RuntimeError(traceback.format_exc())))


# Workers fork from a server that imported these once for the whole run (a spawned worker would
# import them again: seconds each); the server has run no threads, so forking it is safe.
mp.set_forkserver_preload(["torch", "fairseq", "fairseq.metrics", "fairseq_base", "fairseq_base.layer"])


def run_workers(fn, world_size, *args, timeout=120):
    """fn(rank, world_size, *args) on each worker; returns the results by rank. The workers meet
    at a file of their own (a TCP port could be taken by another test's workers between its choice
    and its bind)."""
    ctx = mp.get_context("forkserver")
    results = ctx.Queue()
    folder = tempfile.mkdtemp(prefix="rendezvous-")
    procs = [ctx.Process(target=_worker, args=(r, world_size, os.path.join(folder, "store"), fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            try:
                rank, value = results.get(timeout=1)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise RuntimeError(f"worker(s) {dead} died without a result")
                if time.monotonic() > deadline:
                    raise  # a worker hung: the test fails instead of waiting forever
                continue
            if isinstance(value, Exception):
                raise value
            collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    return [collected[r] for r in range(world_size)]
