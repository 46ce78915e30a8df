"""Scaling of the BLSP-KD step: utterance length, batch size, DDP.

* step time against the clip length (2, 5, 10, 20 s of encoder frames; the
  transcript grows with it, about 3 LLM tokens per second of speech) at the
  demo's KD batch of 8;
* step time against the batch size (2, 4, 8, 16) at 4-s clips, as seconds
  per utterance;
* two-process DDP on this machine (gloo, one thread per process) against
  one process with two threads, at the same global batch: the speed-up a
  second process brings on a CPU.
"""

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import compare

LENGTHS = (2, 5, 10, 20)
BATCHES = (2, 4, 8, 16)


def _steps(dtype, device, batch, seconds):
    from benchmarks.train_step import Steps

    steps = Steps(dtype, device, kd_batch=batch, align_batch=2, seconds=seconds)
    words = max(1, int(seconds * 2.2))
    base = "one small word after another makes a sentence that goes on and on"
    sentence = " ".join((base.split() * (words // 13 + 1))[:words])
    steps.kd_texts = [sentence] * batch
    return steps


def _ddp_worker(rank, world, port, dtype, batch, rounds, queue):
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    steps = _steps(dtype, "cpu", batch // world, 4)
    steps.runner = DistributedDataParallel(
        steps.model, find_unused_parameters=True
    )
    steps.kd()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        steps.kd()
    dist.barrier()
    if rank == 0:
        queue.put((time.perf_counter() - start) / rounds)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_speedup(dtype, batch, rounds):
    """Seconds per global step: one process vs two (DDP), and the ratio."""
    threads = torch.get_num_threads()
    steps = _steps(dtype, "cpu", batch, 4)
    one = compare({"one": steps.kd}, rounds)["one"].best
    del steps
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), dtype, batch, rounds, queue),
        nprocs=2,
        join=True,
    )
    two = queue.get()
    torch.set_num_threads(threads)
    return one, two


def run(args):
    """Figures: ``length.<s>s.seconds``, ``batch.<b>.seconds_per_utt``,
    ``ddp.*``."""
    device, dtype = args.device, args.dtype
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    batches = BATCHES[:2] if args.quick else BATCHES
    out = {}
    for seconds in lengths:
        steps = _steps(dtype, device, args.kd_batch, seconds)
        t = compare({"kd": steps.kd}, args.rounds, device)["kd"].best
        out[f"length.{seconds}s.seconds"] = t
    for batch in batches:
        steps = _steps(dtype, device, batch, 4)
        t = compare({"kd": steps.kd}, args.rounds, device)["kd"].best
        out[f"batch.{batch}.seconds"] = t
        out[f"batch.{batch}.seconds_per_utt"] = t / batch
    if torch.device(device).type == "cpu" and not args.quick:
        one, two = ddp_speedup(dtype, args.kd_batch, args.rounds)
        out["ddp.one_process_seconds"] = one
        out["ddp.two_process_seconds"] = two
        out["ddp.speedup"] = one / two
    return out
