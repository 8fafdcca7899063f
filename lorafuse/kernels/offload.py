"""Activations kept for the backward in CPU memory: ``lorafuse::offload`` and
``lorafuse::reload`` (the partitioner's ``offload_activations`` option, partition.py).

The forward graph calls ``offload(x)`` right after x is computed; a clone of x is copied
to pinned CPU memory on a side stream, so the forward does not wait for it, and the
clone's GPU memory is handed back once the copy is done (``record_stream``), not before.
The host waits for the oldest copies when more than ``INFLIGHT_BYTES`` are in flight, so
that the offloaded memory is actually reused during the forward. The backward calls
``reload(x_cpu, device, next_cpus)`` right before x's first use: it waits for x's copy back
(issued by an earlier ``reload`` as a prefetch, on the same side stream) and starts the
copies of ``next_cpus`` not started yet, the next offloaded tensors the backward needs (one
by default; the ``offload_prefetch`` option), so each copy back runs while the backward
computes up to its first use. Both copies of a tensor go through one side stream per
device, so the copy back of x is always queued after its copy out.

The values are never changed, only moved: the reference implementation below (and the
path on CPU tensors, where there is nothing to offload) is a plain copy. The copies share
the PCIe link with nothing else of lorafuse; whether they hide behind the compute depends on
the bytes offloaded per layer against the layer's compute time. Session 6's one GPU run (before
the clone and the limit) gave wrong gradients and no lower peak; session 7's, with both,
gave the same losses bitwise and about half the memory held after the forward.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
import weakref
from collections import deque

import torch
from torch import Tensor

from ._dispatch import warn_once
from ._ops import lorafuse_op

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


# ------------------------------------------------------------- exact-size pinned buffers
# PyTorch's pinned-memory cache rounds every allocation up to a power of two. At 8B and
# 270,336 tokens a layer's offloaded input is 2.06 GiB and pins 4 GiB: 32 layers' 128 GiB do
# not fit the GPU host's 125 GiB (session 10: 262,144 tokens, exactly 2 GiB, did). Its
# pinned_max_round_threshold_mb setting is missing from older torch and, where present,
# could hand out a cached block smaller than the request (pytorch#192722). So an offload
# that rounding would inflate by more than an eighth pins a buffer of its exact size
# (anonymous mmap + cudaHostRegister), reused by later steps.
EXACT_ENV = "LORAFUSE_OFFLOAD_EXACT_PINNED"  # "0": always PyTorch's pinned allocator
EXACT_MIN_BYTES = 64 * 2**20


def rounding_waste(nbytes: int) -> float:
    """The fraction PyTorch's pinned allocator adds to ``nbytes`` (next power of two)."""
    return (1 << (nbytes - 1).bit_length()) / nbytes - 1 if nbytes > 0 else 0.0


def wants_exact(nbytes: int) -> bool:
    return (nbytes >= EXACT_MIN_BYTES and rounding_waste(nbytes) > 0.125
            and os.environ.get(EXACT_ENV, "1").strip() != "0")


class ExactPinnedPool:
    """Host buffers of exact sizes, pinned once and reused. A tensor handed out is a view of
    a buffer; the buffer returns to the free list when the tensor's storage dies (a
    finalizer on the memoryview the storage holds), views of it included.

    Reuse is safe without events because every copy into or out of these buffers runs on
    the one side stream of its device (``_side_stream``): a buffer's next copy out queues
    behind its last copy back. Buffers are kept per device for that reason. A size not in
    the free list unpins free buffers (oldest first, after that stream is drained) until as
    many bytes are freed, so changing lengths do not grow the pool without bound."""

    def __init__(self, pin, unpin, drain):
        self._pin, self._unpin, self._drain = pin, unpin, drain
        self._free: dict = {}  # device index -> [(nbytes, mmap)], oldest first
        self._lock = threading.RLock()  # a finalizer may run inside a locked section
        self.pinned_bytes = 0

    def empty(self, shape, dtype: torch.dtype, device_index: int) -> Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        mm = self._take(nbytes, device_index)
        view = memoryview(mm)[:nbytes]
        flat = torch.frombuffer(view, dtype=torch.uint8)  # the storage holds `view`
        weakref.finalize(view, self._give_back, device_index, nbytes, mm)
        del view
        return flat.view(dtype).view(shape)

    def _take(self, nbytes: int, dev: int) -> mmap.mmap:
        with self._lock:
            free = self._free.setdefault(dev, [])
            for i, (size, mm) in enumerate(free):
                if size == nbytes:
                    return free.pop(i)[1]
            dropped = 0
            if free:
                self._drain(dev)  # their last copies back may still be running
            while free and dropped < nbytes:
                size, mm = free.pop(0)
                self._release(mm, size)
                dropped += size
        mm = mmap.mmap(-1, nbytes)
        try:
            _touch(mm)
            self._pin(_address(mm), nbytes)
        except BaseException:
            try:
                mm.close()
            except BufferError:  # a traceback still holds a view: left to the collector
                pass
            raise
        with self._lock:
            self.pinned_bytes += nbytes
        return mm

    def _give_back(self, dev: int, nbytes: int, mm: mmap.mmap) -> None:
        with self._lock:
            self._free.setdefault(dev, []).append((nbytes, mm))

    def _release(self, mm: mmap.mmap, nbytes: int) -> None:
        self._unpin(_address(mm))
        mm.close()
        self.pinned_bytes -= nbytes

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for free in self._free.values() for size, _ in free)


def _touch(mm: mmap.mmap) -> None:
    """Fault every page in on all cores (torch's fill runs in parallel): the registration
    would otherwise fault them in one at a time."""
    torch.frombuffer(mm, dtype=torch.uint8).fill_(0)


def _address(mm: mmap.mmap) -> int:
    probe = torch.frombuffer(mm, dtype=torch.uint8, count=1)
    address = probe.data_ptr()
    del probe
    return address


def _cuda_pin(address: int, nbytes: int) -> None:
    # cudaHostRegisterPortable (1): pinned for every context, as cudaHostAlloc's memory is
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 1)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {int(err)})")


def _cuda_unpin(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


_exact_pool = ExactPinnedPool(_cuda_pin, _cuda_unpin,
                              lambda dev: _side_stream(torch.device("cuda", dev)).synchronize())


def _pinned_empty(x: Tensor) -> Tensor:
    nbytes = x.numel() * x.element_size()
    if wants_exact(nbytes):
        try:
            return _exact_pool.empty(x.shape, x.dtype, x.device.index)
        except Exception as e:  # pinning refused, no cudart binding: PyTorch's allocator
            warn_once(f"lorafuse: exact-size pinned buffer unavailable ({e}); using PyTorch's "
                      "pinned allocator (it rounds up to a power of two)")
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True)


def _offload_cuda(x: Tensor) -> Tensor:
    # The side stream reads a copy of x, not x: Inductor's generated code reuses a dead
    # buffer's memory for a later kernel's output without going through the allocator, so
    # x.record_stream(side) would not stop that kernel from overwriting x mid-copy (the
    # session-6 GPU test saw different losses from the second step on). The device-to-
    # device copy costs ~1 % of the trip over PCIe.
    staged = x.clone(memory_format=torch.contiguous_format)
    out = _pinned_empty(x)
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


def _reload_cuda(x: Tensor, device: torch.device, next_cpus: list[Tensor]) -> Tensor:
    entry = _prefetched.pop(x.data_ptr(), None)
    if entry is not None and entry[0] is x:
        gpu, done = entry[1], entry[2]
    else:  # the first reload of a backward (nothing prefetched it), or a stale entry
        gpu, done = _copy_back(x, device)
    torch.cuda.current_stream(device).wait_event(done)
    for nxt in next_cpus:
        held = _prefetched.get(nxt.data_ptr())
        if held is None or held[0] is not nxt:
            ngpu, ndone = _copy_back(nxt, device)
            _prefetched[nxt.data_ptr()] = (nxt, ngpu, ndone)
    return gpu


# Both ops run host-side logic every call (events, waits, the prefetch table, pinned
# buffers made per step), which a CUDA graph replay would skip. Tagged cudagraph_unsafe,
# they are where Inductor's graph partition (``graph_partition``, when the user asks for it:
# backend.py turns it off under offloading, measured slower) splits the graph: they run
# between CUDA graphs, and the rest is replayed from them.
_GRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t)


@lorafuse_op("lorafuse::offload", tags=_GRAPH_UNSAFE)
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


@lorafuse_op("lorafuse::reload", tags=_GRAPH_UNSAFE)
def reload_op(x: Tensor, device: torch.device, next_cpus: list[Tensor]) -> Tensor:
    """``x`` (an ``offload`` output) back on ``device``, and the copies of ``next_cpus``
    (the next ones the backward needs) started where no earlier reload started them."""
    device = torch.device(device)
    if device.type == "cuda" and x.is_pinned():
        return _reload_cuda(x, device, next_cpus)
    return reload_reference(x, device)


@reload_op.register_fake
def _(x, device, next_cpus):
    return torch.empty(x.shape, dtype=x.dtype, device=device)
