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


def _inflight_bytes(text: str | None, default_mib: int = 512) -> int:
    try:
        nbytes = int(float(text if text is not None else default_mib) * 2**20)
        if nbytes <= 0:
            raise ValueError
    except (ValueError, OverflowError):
        warnings.warn(f"lorafuse: {INFLIGHT_ENV}={text!r} is not a positive number of MiB; "
                      f"using {default_mib}")
        nbytes = default_mib * 2**20
    return nbytes


INFLIGHT_BYTES = _inflight_bytes(os.environ.get(INFLIGHT_ENV))
# The capturable ops' limit (the section "under CUDA graphs"): there the compute stream waits
# on the GPU, not the host, so a small limit costs next to nothing. A copy out takes ~0.7 ms
# for an 8B layer input, a layer's forward ~3 ms, so the oldest of the clones kept is
# copied already when the wait comes. With 512 MiB, session 34's 8B step held 16 clones at
# its peak, in the loss after the last layer; 64 MiB keeps two, and the peak fell 0.44 GiB.
STAGED_BYTES = _inflight_bytes(os.environ.get(INFLIGHT_ENV), 64)
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


# ------------------------------------------------------------------ under CUDA graphs
# Inductor's CUDA graphs (``triton.cudagraphs``) record a graph once and replay it with no
# Python, and skip every graph that holds a CPU tensor. The ops above cannot be recorded:
# they return CPU tensors, wait on the host, and pick pinned buffers per call. The three
# ops below can, and partition.offload_saved uses them when the backend compiles for CUDA
# graphs (session 32's alternative, Inductor's graph partition around the ops above, ran
# the 8B step 1.8 x slower). Each part of the design answers one constraint of a recording:
#
# - no CPU tensors: ``offload_capturable(x)`` returns a token, a one-byte CUDA tensor, and
#   ``reload_capturable(token, ...)`` finds x's pinned copy through it (``_held``: the
#   token's address -> the buffer). A recorded graph's outputs keep their addresses in
#   every replay, so the backward recorded later finds the buffers the forward's
#   recording wrote;
# - the buffers are fixed: a recording's copies write and read the same pinned memory in
#   every replay, so a buffer taken while recording is never given back (the graph owns
#   it); buffers taken by calls run as they come (Inductor's eager warm-up, or a graph that
#   CUDA graphs skipped) return to a free list at their reload or when their token dies.
#   Both come from that list, so a recording normally reuses its warm-up's buffers;
# - no host waits: the side stream copies out a clone of x (Inductor reuses x's memory for
#   later kernels without the allocator knowing, as the eager op's comment explains); past
#   ``STAGED_BYTES`` of clones held, the compute stream waits on the GPU for the oldest
#   clone's copy out, then frees it, so its memory is reused in the compute stream's order
#   (inside a recording too, which defers ``record_stream``'s frees to its end);
# - pinned buffers come from ``cudaHostRegister`` (PyTorch's pinned allocator records an
#   event on each copy, a call a recording may not make) and are pinned only outside a
#   recording (the warm-up run that precedes each one pins them);
# - a recording must join every stream it forked: ``offload_join(tokens)`` at the end of
#   the forward makes the compute stream wait for the copies out, and its tokens are the
#   ones the backward gets. The backward's copies back are joined where they are used.
#
# The token's bytes are never read. One side stream per device carries every copy, so a
# pinned buffer's next copy out queues behind its last copy back.

class _Held:
    """A pinned copy of an offloaded tensor: its buffer, and whether a recorded graph owns
    it (never given back) or it returns to the free list (``_give_back``)."""

    __slots__ = ("buffer", "key", "recorded", "done")

    def __init__(self, device: torch.device, nbytes: int, recorded: bool):
        self.key = (device.type, device.index, nbytes)  # its free list
        self.buffer = _take_pinned(device, nbytes, recorded)
        self.recorded, self.done = recorded, False


_held: dict = {}  # a live token's data_ptr -> _Held
_free_pinned: dict = {}  # (device type, index, nbytes) -> [flat uint8 pinned buffers]
# device index -> deque of (staged copy, event after its copy out, bytes, recorded?)
_staged: dict = {}
_token_prefetched: dict = {}  # token data_ptr -> (_Held, GPU flat copy, event or None)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _take_pinned(device: torch.device, nbytes: int, recording: bool) -> Tensor:
    """A flat uint8 host buffer of ``nbytes`` for an offload to ``device``: from the free
    list, else pinned now with ``cudaHostRegister`` (not PyTorch's pinned allocator,
    whose copies record an event on the block, a call a recording may not make)."""
    free = _free_pinned.get((device.type, device.index, nbytes))
    if free:
        return free.pop()
    if device.type != "cuda":  # CPU tensors (tests): the same bookkeeping, plain memory
        return torch.empty(nbytes, dtype=torch.uint8)
    if recording:  # pinning is not a call a recording may make
        raise RuntimeError(
            "lorafuse: offload_activations under CUDA graphs needs a pinned buffer of "
            f"{nbytes} bytes while a graph is recorded, and none is free: the warm-up run "
            "that precedes each recording pins them. Two forwards of one graph before its "
            "backward are not supported under CUDA graphs with offloading")
    mm = mmap.mmap(-1, nbytes)
    _touch(mm)
    _cuda_pin(_address(mm), nbytes)  # kept pinned for the process: recorded graphs read it
    return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps mm alive


def _give_back(ptr: int, held: _Held) -> None:
    """Return an eager call's buffer to the free list, once (its reload, or its token's
    death when no reload came: a forward whose backward never ran)."""
    if _held.get(ptr) is held:
        del _held[ptr]
    if not held.recorded and not held.done:
        held.done = True
        _free_pinned.setdefault(held.key, []).append(held.buffer)


def _register(token: Tensor, held: _Held) -> None:
    ptr = token.data_ptr()
    _held[ptr] = held
    if not held.recorded:  # a recorded token's tensor dies after the step; its graph lives on
        weakref.finalize(token, _give_back, ptr, held)


def _retire_staged(index: int, limit: int) -> None:
    """Drop the oldest staged copies while more than ``limit`` bytes are held (always
    keeping the newest), each after the compute stream waits, on the GPU, for its copy
    out: its memory is then reused in the compute stream's order, inside a recording too
    (no ``record_stream``, whose frees a recording defers to its end)."""
    queue = _staged.get(index)
    held = sum(entry[2] for entry in queue) if queue else 0
    capturing = torch.cuda.is_current_stream_capturing()
    while queue and len(queue) > 1 and held > limit:
        _, done, nbytes, recorded = queue.popleft()
        # (an entry from the other mode, left by a forward that raised before its join,
        # cannot be waited on here: recorded events exist only in their graph)
        if recorded == capturing:
            torch.cuda.current_stream(index).wait_event(done)
        held -= nbytes


def _copy_out(x: Tensor, held: _Held) -> None:
    """x's bytes into ``held``'s pinned buffer on the side stream, from a staged clone."""
    # A copy of x, not x: Inductor reuses x's memory for later kernels without the
    # allocator knowing (the eager op's comment). Allocated and freed on the compute stream.
    staged = x.clone(memory_format=torch.contiguous_format)
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))  # the staging copy is complete
    with torch.cuda.stream(side):
        held.buffer.copy_(staged.reshape(-1).view(torch.uint8), non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    _staged.setdefault(x.device.index, deque()).append(
        (staged, done, held.buffer.numel(), held.recorded))
    _retire_staged(x.device.index, STAGED_BYTES)


@lorafuse_op("lorafuse::offload_capturable")
def offload_capturable_op(x: Tensor) -> Tensor:
    """x's bytes copied to pinned CPU memory on a side stream, in a way a CUDA graph can
    record (the section's comment); returns the token ``reload_capturable`` takes."""
    held = _Held(x.device, x.numel() * x.element_size(), _capturing(x.device))
    if x.is_cuda:
        _copy_out(x, held)
    else:  # CPU tensors (tests): the same bookkeeping, a plain copy
        held.buffer.view(x.dtype).view(x.shape).copy_(x)
    token = torch.empty(1, dtype=torch.uint8, device=x.device)
    _register(token, held)
    return token


@offload_capturable_op.register_fake
def _(x):
    return torch.empty(1, dtype=torch.uint8, device=x.device)


@lorafuse_op("lorafuse::offload_join")
def offload_join_op(tokens: list[Tensor]) -> list[Tensor]:
    """The end of a forward that offloaded: the compute stream waits for every copy out,
    and each token is handed on as a new one (the values the backward gets)."""
    devices = {t.device.index for t in tokens if t.is_cuda}
    for index in devices:
        torch.cuda.current_stream(index).wait_stream(_side_stream(torch.device("cuda", index)))
        _staged.pop(index, None)  # every copy out is done in the compute stream's order
    out = []
    for t in tokens:
        held = _held.pop(t.data_ptr(), None)
        if held is None:
            raise RuntimeError("lorafuse: offload_join got a token no offload_capturable made")
        new = torch.empty(1, dtype=torch.uint8, device=t.device)
        _register(new, held)
        out.append(new)
    return out


@offload_join_op.register_fake
def _(tokens):
    return [torch.empty(1, dtype=torch.uint8, device=t.device) for t in tokens]


def _lookup(token: Tensor) -> _Held:
    held = _held.get(token.data_ptr())
    if held is None:
        raise RuntimeError("lorafuse: reload_capturable got a token whose forward copy is "
                           "unknown (its forward ran in another process, or was freed)")
    return held


def _copy_back_flat(held: _Held, device: torch.device):
    """Start the copy of ``held``'s bytes to ``device``: (flat GPU tensor, event or None)."""
    gpu = torch.empty(held.buffer.numel(), dtype=torch.uint8, device=device)
    if device.type != "cuda":
        return gpu.copy_(held.buffer), None
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # reads of this block's last use
    with torch.cuda.stream(side):
        gpu.copy_(held.buffer, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    return gpu, done


@lorafuse_op("lorafuse::reload_capturable")
def reload_capturable_op(token: Tensor, shape: list[int], dtype: torch.dtype,
                         next_tokens: list[Tensor]) -> Tensor:
    """The tensor ``offload_capturable`` copied out (found through ``token``), back on
    token's device with ``shape`` and ``dtype``, contiguous; the copies of ``next_tokens``'
    tensors are started here (prefetch), in a way a CUDA graph can record."""
    device = token.device
    held = _lookup(token)
    if _capturing(device):  # a recorded copy back reads this buffer in every replay
        held.recorded = True
    entry = _token_prefetched.pop(token.data_ptr(), None)
    if entry is not None and entry[0] is held:
        gpu, done = entry[1], entry[2]
    else:  # the first reload of a backward, or a stale entry
        gpu, done = _copy_back_flat(held, device)
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    for nxt in next_tokens:
        nheld = _lookup(nxt)
        cur = _token_prefetched.get(nxt.data_ptr())
        if cur is None or cur[0] is not nheld:
            _token_prefetched[nxt.data_ptr()] = (nheld, *_copy_back_flat(nheld, device))
    if not held.recorded:
        _give_back(token.data_ptr(), held)  # the copy back queues before any reuse
    return gpu.view(dtype).view(shape)


@reload_capturable_op.register_fake
def _(token, shape, dtype, next_tokens):
    return torch.empty(shape, dtype=dtype, device=token.device)
