"""What the kernel families share: the ``LORAFUSE_<FAMILY>_IMPL`` switches, and warnings
said once per process (a fallback warns on its first call, not on every step)."""

from __future__ import annotations

import os
import warnings

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
