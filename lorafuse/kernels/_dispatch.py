"""What the kernel families share: the ``LORAFUSE_<FAMILY>_IMPL`` switches, warnings said
once per process (a fallback warns on its first call, not on every step), and the choice
of the fastest of several paths that compute the same numbers, timed once per shape."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings

import torch

from .._torch import gpu_spin

warned: set = set()  # messages already given (tests clear it)


def warn_once(msg: str) -> None:
    if msg not in warned:
        warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def requested_impl(env: str, choices: tuple, default: str = "auto") -> str:
    """The path asked for through ``env`` (one of ``choices``); an unknown value warns once
    and gives ``default``."""
    impl = os.environ.get(env, default).strip().lower() or default
    if impl not in choices:
        warn_once(f"lorafuse: {env}={impl!r} is not one of {choices}; using {default!r}")
        return default
    return impl


def use_triton(x, env: str) -> bool:
    """For the elementwise families (``auto|torch|triton`` in ``env``): CUDA tensors take the
    Triton kernel unless ``torch`` is asked for; CPU tensors only under the Triton
    interpreter with ``triton`` asked for (tests); everything else the PyTorch reference."""
    impl = requested_impl(env, ("auto", "torch", "triton"))
    if impl == "torch":
        return False
    if x.is_cuda:
        return True
    return impl == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def on_device(t):
    """``torch.cuda.device(t.device)`` around a Triton launch, only where ``t`` is not on
    the current device already (the usual case costs no device switch: ≈ 5 µs a launch on
    the H200's host, bench_op_host.py --parts); a CPU tensor needs none."""
    if not t.is_cuda or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


_tuned: dict = {}  # (autotuned kernel, key) -> the config its autotuner chose


def launch_autotuned(kernel, grid, args, meta: dict, key) -> None:
    """``kernel[grid](*args, **meta)`` for a ``triton.autotune``d ``kernel``. The first call
    for ``key`` tunes as usual; later ones launch the chosen config through the JIT function
    directly, as the autotuner itself does, without its per-call Python (its key rebuilt
    from every argument, three dict merges). ``key`` must fix everything the autotuner's
    own key holds (its key arguments and the tensors' dtypes)."""
    cfg = _tuned.get((kernel, key))
    if cfg is None:
        kernel[grid](*args, **meta)
        _tuned[(kernel, key)] = kernel.best_config
        return
    kw = {**meta, **cfg.all_kwargs()}
    if cfg.pre_hook is not None:
        cfg.pre_hook({**dict(zip(kernel.arg_names, args)), **kw})
    kernel.fn[grid](*args, **kw)


def triton_or_reference(x, env: str, what: str, triton_fn, reference_fn):
    """``triton_fn()`` where ``use_triton(x, env)`` says so, else ``reference_fn()``; a
    kernel that raises falls back to the reference, warned once (never crash training over
    an optional kernel)."""
    if use_triton(x, env):
        try:
            return triton_fn()
        except Exception as e:
            warn_once(f"lorafuse: Triton {what} failed ({type(e).__name__}: {e}); using PyTorch")
    return reference_fn()


# Before its timed calls the timer queues GEMMs of its own (``heat_gpu``), for two reasons:
# - the host queues every timed call before the GPU reaches them, so each pair of events
#   brackets the call's kernels alone, as in a training step whose GPU runs behind the host.
#   Timed on an idle GPU, the k/v forward's Triton path measured 0.134 ms a call against
#   cuBLAS's 0.103 because its launches set the time; behind queued work, 0.062 against 0.093.
# - the calls run at the power cap, as the step's do (session 16: every 8B step at ≈ 690 W,
#   SM clock ≈ 1,500 MHz). At a cold GPU's full clock two rankings differed from the cap's:
#   q/o forward, pointer 1.5 % ahead of TMA cold, 9 % behind at the cap; down's forward,
#   cuBLAS 2 % behind cold, 8 % at the cap. 20 ms of queued GEMMs gave the rankings of 150.
# Session 17, bench/probe_choice.py on the H200 (bench/RESULTS.md).
HEAT_MS = 20.0
HEAT_MAX_MS = 100.0
_HEAT_N, _HEAT_DTYPE = 4096, torch.float16  # 3 × 32 MiB, freed at once (the stream reuses them)
_gemm_ms: dict = {}  # device index -> ms of one heating GEMM, measured once


def heat_ms(launch_ms: float, iters: int) -> float:
    """How long to keep the GPU busy before ``iters`` timed calls whose launches take
    ``launch_ms`` each on the host: ``HEAT_MS``, or twice the host's queueing time if
    longer, at most ``HEAT_MAX_MS``."""
    return min(HEAT_MAX_MS, max(HEAT_MS, 2 * iters * launch_ms))


def heat_gpu(ms: float) -> None:
    """Queue about ``ms`` of back-to-back GEMMs on the current stream (no sync after the
    first call's calibration). Out of memory, a GPU spin holds the stream instead."""
    # random operands (constant ones draw less power), from a generator of its own: dropout
    # draws from the default one, and a choice timed at step 1 must not move its masks
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        a, b = (torch.randn(_HEAT_N, _HEAT_N, device="cuda", dtype=_HEAT_DTYPE, generator=gen)
                for _ in range(2))
        out = torch.empty_like(a)
    except torch.OutOfMemoryError:
        gpu_spin(int(ms * 2_000_000))  # ≈ 2 GHz: at a lower clock it only lasts longer
        return
    dev = torch.cuda.current_device()
    if dev not in _gemm_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.mm(a, b, out=out)
        start.record()
        for _ in range(10):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        _gemm_ms[dev] = max(start.elapsed_time(end) / 10, 1e-3)
    for _ in range(max(1, round(ms / _gemm_ms[dev]))):
        torch.mm(a, b, out=out)


def time_ms(fn, args=(), iters: int = 5) -> float:
    """Median of a few CUDA-event timings of ``fn(*args)``, after one warm-up call (JIT,
    autotuning): device time at the power cap, the calls queued behind ``heat_gpu`` for
    ``heat_ms`` of a second untimed call's host time."""
    fn(*args)
    t0 = time.perf_counter()
    fn(*args)
    heat_gpu(heat_ms((time.perf_counter() - t0) * 1e3, iters))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn(*args)
        end.record()
    events[-1][1].synchronize()  # once per shape key, at its first use
    return statistics.median(start.elapsed_time(end) for start, end in events)


# Timing rounds per choice. Session 16 (bench/probe_choice.py, H200, the 8B LoRA shapes,
# 4 fresh processes): timing each candidate fully and then the next, the picks cost 0.53
# ms a step over each process's fastest paths; three interleaved rounds, 0.11 ms.
ROUNDS = 3


def race_ms(fns: dict, timer=time_ms, rounds: int = ROUNDS) -> dict:
    """Each candidate's median ``timer(fn)`` over ``rounds`` rounds in which the candidates
    take turns (A B A B ...): a change of clocks or of other work on the GPU during the
    timing then touches every candidate, not only the ones timed after it. Errors
    propagate."""
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            times[n].append(timer(fn))
    return {n: statistics.median(t) for n, t in times.items()}


def bucket(m: int) -> int:
    """Next power of two: choices are made per bucket of a size that varies from batch to
    batch (tokens, sequence length), not per value, so a run with varying lengths times a
    few buckets, not every length."""
    return 1 << max(0, m - 1).bit_length()


def pick_fastest(cache: dict, key, candidates: dict, what: str, timer=None) -> str:
    """The name of the fastest of ``candidates`` (name -> zero-argument callable; all must
    compute the same numbers) for ``key``: each runs once, then all are timed in
    interleaved rounds (``race_ms``) at the key's first use, and the choice is cached in
    ``cache``. A candidate that raises is left out, warned once; only when none works does
    the last one's error propagate (session 10: the last, the pointer kernel, refused
    262K-token operands, so nothing was cached and every call timed the other two again).
    Inside a CUDA graph capture nothing is timed: the last candidate runs and nothing is
    cached. ``timer`` defaults to ``time_ms`` (looked up at the call: tests replace it)."""
    name = cache.get(key)
    if name in candidates:
        return name
    names = list(candidates)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return names[-1]
    working, error = {}, None
    for n in names:  # one run each first (JIT, autotuning); what raises is left out
        try:
            candidates[n]()
            working[n] = candidates[n]
        except Exception as e:
            error = e
            warn_once(f"lorafuse: {what} path {n!r} unavailable ({type(e).__name__}: {e})")
    if not working:
        raise error
    times = race_ms(working, timer or time_ms)
    cache[key] = min(times, key=times.get)
    return cache[key]
