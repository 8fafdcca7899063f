"""Activations kept for the backward in CPU memory: ``lorafuse::offload`` and
``lorafuse::reload`` (the partitioner's ``offload_activations`` option, partition.py).

The forward graph calls ``offload(x)`` right after x is computed; a clone of x is copied
to pinned CPU memory on a side stream, so the forward does not wait for it, and the
clone's GPU memory is handed back once the copy is done (``record_stream``), not before.
The host waits for the oldest copies when more than ``INFLIGHT_BYTES`` are in flight, so
that the offloaded memory is actually reused during the forward. The backward calls
``reload(x_cpu, device, next_cpu)`` right before x's first use: it waits for x's copy back
(issued by the previous ``reload`` as a prefetch, on the same side stream) and starts the
copy of ``next_cpu``, the next offloaded tensor the backward needs, so each copy back runs
while the backward computes between two reloads. Both copies of a tensor go through one
side stream per device, so the copy back of x is always queued after its copy out.

The values are never changed, only moved: the reference implementation below (and the
path on CPU tensors, where there is nothing to offload) is a plain copy. The copies share
the PCIe link with nothing else of lorafuse; whether they hide behind the compute depends on
the bytes offloaded per layer against the layer's compute time. Session 6's one GPU run (before
the clone and the limit) gave wrong gradients and no lower peak; session 7's, with both,
gave the same losses bitwise and about half the memory held after the forward.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from typing import Optional

import torch
from torch import Tensor

from ._dispatch import warn_once

_streams: dict = {}  # device index -> the side stream for both copies
# Copies out still running: device index -> deque of (event after the copy, its bytes).
# The caching allocator reuses a block freed under record_stream only once the host has
# seen the side stream's event complete, and the host runs ahead of the GPU; without a
# limit every offloaded tensor stays allocated until the end of the forward, and the peak
# does not fall (session 6's GPU test: 628 against 623 MiB). Past INFLIGHT_BYTES the host
# waits for the oldest copy; the GPU still has the queued kernels to run meanwhile.
# LORAFUSE_OFFLOAD_INFLIGHT_MB sets it (more: fewer host waits, a higher peak); it is
# read when the module is first imported.
INFLIGHT_ENV = "LORAFUSE_OFFLOAD_INFLIGHT_MB"


def _inflight_bytes(text: str | None) -> int:
    try:
        nbytes = int(float(text if text is not None else 512) * 2**20)
        if nbytes <= 0:
            raise ValueError
    except (ValueError, OverflowError):
        warnings.warn(f"lorafuse: {INFLIGHT_ENV}={text!r} is not a positive number of MiB; "
                      "using 512")
        nbytes = 512 * 2**20
    return nbytes


INFLIGHT_BYTES = _inflight_bytes(os.environ.get(INFLIGHT_ENV))
_inflight: dict = {}
# data_ptr of an offloaded CPU tensor -> (that tensor, its GPU copy being filled, an event
# after the copy): prefetches started by the previous reload
_prefetched: dict = {}


# Both copies are contiguous, as the fake implementations say, whatever x's strides at run
# time (Inductor may lay out an intermediate differently from the traced strides; its
# generated code checks a custom op's output strides against the fake's).
def offload_reference(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="cpu").copy_(x)


def reload_reference(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=device).copy_(x)


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


def _offload_cuda(x: Tensor) -> Tensor:
    # The side stream reads a copy of x, not x: Inductor's generated code reuses a dead
    # buffer's memory for a later kernel's output without going through the allocator, so
    # x.record_stream(side) would not stop that kernel from overwriting x mid-copy (the
    # session-6 GPU test saw different losses from the second step on). The device-to-
    # device copy costs ~1 % of the trip over PCIe.
    staged = x.clone(memory_format=torch.contiguous_format)
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))  # the copy is complete
    with torch.cuda.stream(side):
        out.copy_(staged, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    staged.record_stream(side)  # its memory is not reused before the copy is done
    limit_inflight(_inflight.setdefault(side.device_index, deque()), done,
                   staged.numel() * staged.element_size(), INFLIGHT_BYTES)
    return out


def limit_inflight(queue: deque, done, nbytes: int, limit: int) -> None:
    """Add the copy ``done`` (an event with ``query``/``synchronize``) of ``nbytes`` to
    ``queue``, forget the copies already finished, and wait on the host for the oldest
    ones while more than ``limit`` bytes are in flight (always leaving the newest)."""
    queue.append((done, nbytes))
    while len(queue) > 1 and queue[0][0].query():
        queue.popleft()
    inflight = sum(b for _, b in queue)
    while len(queue) > 1 and inflight > limit:
        event, b = queue.popleft()
        event.synchronize()
        inflight -= b


def _copy_back(x: Tensor, device: torch.device):
    """Start the copy of ``x`` (pinned CPU) to ``device`` on the side stream: (gpu, event).

    The GPU copy is allocated on the compute stream, which uses and frees it, so its memory
    is reused in that stream's order as soon as it is freed. Allocated on the side stream,
    it would need ``record_stream``, and a block freed so returns to the pool only once the
    host sees the compute stream's event complete: the host queues the backward layers
    ahead of the GPU, so up to 12 layers' reloads (1.5 GiB at 8B, 16K tokens) were held at
    once (session 9's memory history). The side stream first waits for the compute stream,
    whose queued kernels may still read the memory this block last held."""
    side = _side_stream(device)
    gpu = torch.empty(x.shape, dtype=x.dtype, device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        gpu.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    return gpu, done


def _reload_cuda(x: Tensor, device: torch.device, next_cpu: Optional[Tensor]) -> Tensor:
    entry = _prefetched.pop(x.data_ptr(), None)
    if entry is not None and entry[0] is x:
        gpu, done = entry[1], entry[2]
    else:  # the first reload of a backward (nothing prefetched it), or a stale entry
        gpu, done = _copy_back(x, device)
    torch.cuda.current_stream(device).wait_event(done)
    if next_cpu is not None and next_cpu.data_ptr() not in _prefetched:
        ngpu, ndone = _copy_back(next_cpu, device)
        _prefetched[next_cpu.data_ptr()] = (next_cpu, ngpu, ndone)
    return gpu


@torch.library.custom_op("lorafuse::offload", mutates_args=())
def offload_op(x: Tensor) -> Tensor:
    """A CPU copy of ``x`` (pinned, filled on a side stream when x is on CUDA)."""
    if x.is_cuda:
        try:
            return _offload_cuda(x)
        except RuntimeError as e:  # pinned memory refused, say: the same copy, synchronously
            warn_once(f"lorafuse: asynchronous offload unavailable ({e}); copying synchronously")
    return offload_reference(x)


@offload_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("lorafuse::reload", mutates_args=())
def reload_op(x: Tensor, device: torch.device, next_cpu: Optional[Tensor]) -> Tensor:
    """``x`` (an ``offload`` output) back on ``device``, and the copy of ``next_cpu`` (the
    next one the backward needs) started."""
    device = torch.device(device)
    if device.type == "cuda" and x.is_pinned():
        return _reload_cuda(x, device, next_cpu)
    return reload_reference(x, device)


@reload_op.register_fake
def _(x, device, next_cpu):
    return torch.empty(x.shape, dtype=x.dtype, device=device)
