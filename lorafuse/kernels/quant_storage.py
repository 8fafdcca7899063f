"""Quantized storage of saved activations: ``quantize_rows`` and
``dequantize_rows``.

The partitioner (``lorafuse/partition.py``, option ``activation_dtype``) traces
``quantize_rows`` to aten ops and inlines it in the forward right after an
activation the backward needs, saves its two outputs instead of the activation, and
inlines ``dequantize_rows`` in the backward before the activation's first user.
Inlined, not custom ops: Inductor compiles them with their neighbours (the row reduction
and the scaling as one kernel, or into the kernel that produces the activation; the
dequantisation into the backward kernel that reads it, where that kernel is its own),
instead of the ~10 full passes over the tensor the eager code makes.

Per-row absmax scaling, a row being the last dim (``m = max |x|`` over the row, fp32):

    int8      q = round(x / m · 127)          in [-127, 127]   x' = q / 127 · m
    fp8       q = e4m3fn(x / m · 448)         in [-448, 448]   x' = q / 448 · m

Saved: ``q`` (x's shape, int8 or float8_e4m3fn) and ``m`` (fp32, ``x.shape[:-1]``): for
rows of n elements of b bytes, (n + 4) / (n · b) of the bytes.
Dividing by m first (|x / m| ≤ 1) keeps every step finite for any finite fp32 row, huge
or subnormal; multiplying back as ``(q / qmax) · m`` likewise.

Round-trip error, per element (computed in fp32; ``x'`` is then rounded to the output dtype,
which adds that dtype's own rounding, ≤ 2^-8 |x| for bf16):

    int8      |x' − x| ≤ m / 254           (+ a few fp32 ulps of m)
    fp8       |x' − x| ≤ max(|x| / 16, m / 458752)   (3 mantissa bits; e4m3 subnormal
                                            steps of 2^-9 below 2^-6, times m / 448)

Special rows: an all-zero row stores m = 0 and comes back exactly zero. A row holding any
inf or NaN comes back all NaN (m is stored as NaN): the forward already produced a
non-finite value there, so the step's loss or gradients are non-finite anyway; the
non-finite value is never turned into a finite wrong one.

fp8 works on CPU (float8_e4m3fn conversions are implemented there in torch ≥ 2.1); it is
slower than int8 there. The code below is written with out-of-place ops only (the graphs
it is inlined into are functional). Compiled by Inductor, its float arithmetic may round
differently from eager (division on the GPU): the bounds above still hold, to a few fp32
ulps of m (tests/test_quant_storage.py checks the compiled round trip).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The storage dtypes, by the option's names, and the largest code of each.
STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_rows(x: Tensor, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(q, absmax)``: see the module docstring."""
    if qdtype not in _QMAX:
        raise ValueError(f"quantize_rows: qdtype {qdtype} is not one of {list(_QMAX)}")
    qmax = _QMAX[qdtype]
    h = x.to(torch.float32)
    absmax = h.abs().amax(dim=-1)  # NaN propagates; inf stays inf
    finite = torch.isfinite(absmax)
    scale = torch.where(finite, absmax, torch.full_like(absmax, float("nan")))
    ok = (finite & (absmax > 0)).unsqueeze(-1)
    # The divisor is 1 where the row is zero or non-finite: no 0/0 or inf/inf is formed.
    unit = h / torch.where(ok, absmax.unsqueeze(-1), torch.ones_like(h[..., :1]))
    unit = torch.where(ok, unit, torch.zeros_like(unit))
    if qdtype == torch.int8:
        q = torch.round(unit * qmax).clamp(-qmax, qmax).to(torch.int8)
    else:
        q = (unit * qmax).clamp(-qmax, qmax).to(qdtype)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``x'`` in ``out_dtype``: ``(q / qmax) · absmax``, per row."""
    qmax = _QMAX[q.dtype]
    return ((q.to(torch.float32) / qmax) * scale.unsqueeze(-1)).to(out_dtype)
