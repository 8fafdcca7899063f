"""Host (CPU) cost per call of lorafuse's ops, beside the calls they replace: what a step
pays in Python and launches when the GPU is not the bottleneck (the QLoRA step with the
4-bit pass was host-bound in session 5, bench/RESULTS.md).

    python bench/bench_op_host.py [--m 16] [--calls 400] [--no-nf4] [--parts]

Each path is called ``--calls`` times at a small M (the GPU work per call is a few
microseconds, so the loop's wall time is the host's), as Inductor's generated code calls
the ops: ``torch.ops.lorafuse.*.default`` under no_grad. Columns: host µs per call (wall
time of the loop / calls, no synchronisation inside) and host ms per 8B step at that rate
(224 calls: 7 sites × 32 layers). There is no GPU column: CUDA events around a host-bound
loop measure the host again (session 6); the GPU time per op is in bench_lora_op.py and
bench_nf4_gemm.py, at training sizes. After the table, a cProfile breakdown of each
lorafuse op's host time by function (``--profile``), to see what to cut.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorafuse  # noqa: E402,F401  (registers the ops)
from lorafuse.kernels import lora, nf4  # noqa: E402

SITES_PER_STEP = 224


def measure(fn, calls: int) -> float:
    """Host µs per call of ``fn()`` called ``calls`` times."""
    for _ in range(5):
        fn()  # per-shape choices, JIT, autotuning
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


def with_env(name: str, value: str, fn):
    def call():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name)
            else:
                os.environ[name] = old
    return call


def lora_paths(M: int):
    N = K = 4096
    r, s = 16, 2.0
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    h = x @ A.t()
    fwd = torch.ops.lorafuse.lora_linear.default
    bwd = torch.ops.lorafuse.lora_linear_backward.default
    paths = {
        "torch.mm (one cuBLAS call: the floor)": lambda: x @ W.t(),
        "eager LoRA (linear + 2 mm + mul + add)":
            lambda: torch.nn.functional.linear(x, W) + (x @ A.t()) @ B.t() * s,
        "lorafuse::lora_linear (auto)": lambda: fwd(x, W, None, A, B, s, x),
    }
    for mode in ("pointer", "tma", "cublas"):
        paths[f"lorafuse::lora_linear ({mode})"] = with_env(
            lora.FWD_KERNEL_ENV, mode, lambda: fwd(x, W, None, A, B, s, x))
    paths["lorafuse_rt::lora_linear (the twin)"] = lambda: torch.ops.lorafuse_rt.lora_linear.default(
        x, W, None, A, B, s, x)
    paths["lorafuse::lora_linear_backward"] = lambda: bwd(dy, x, W, A, B, h, s)
    paths["lorafuse_rt::lora_linear_backward (the twin)"] = lambda: torch.ops.lorafuse_rt.\
        lora_linear_backward.default(dy, x, W, A, B, h, s)
    paths["eager LoRA backward (4 mm + add)"] = lambda: (
        dy @ W + ((dy @ B) * s) @ A, ((dy @ B) * s).t() @ x, dy.t() @ (h * s))
    return paths


def _nf4_operands(M: int):
    """A 4096 × 4096 NF4 weight (double quant, blocksize 64) with an r = 16 adapter, and
    the step's operands: ``(w, q, qs, qargs, x, A, B, dy, h)``."""
    import bitsandbytes.functional as F

    N = K = 4096
    r = 16
    g = torch.Generator("cuda").manual_seed(1)
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    kw = nf4.from_quant_state(qs)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    qargs = (q, kw["absmax"], kw.get("absmax2"), kw.get("code2"), kw.get("offset"), kw["shape"],
             kw["blocksize"], kw["quant_type"])
    return w, q, qs, qargs, x, A, B, dy, x @ A.t()


def nf4_paths(M: int):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    s = 2.0
    w, q, qs, qargs, x, A, B, dy, h = _nf4_operands(M)
    fwd = torch.ops.lorafuse.nf4_linear.default
    bwd = torch.ops.lorafuse.nf4_linear_backward.default
    return {
        "bnb.matmul_4bit (bitsandbytes' own)": lambda: bnb.matmul_4bit(x, q.t(), qs),
        "triton_dequantize_4bit": lambda: nf4.triton_dequantize_4bit(*qargs, torch.bfloat16),
        "bitsandbytes dequantize_4bit": lambda: F.dequantize_4bit(q, qs),
        "lorafuse::nf4_linear": lambda: fwd(x, *qargs, None, A, B, s, x, torch.bfloat16),
        "lorafuse::nf4_linear_backward": lambda: bwd(
            dy, *qargs, torch.bfloat16, A, B, x, h, s, True, True, True),
        "lorafuse_rt::nf4_linear_backward (the twin)": lambda: torch.ops.lorafuse_rt.
            nf4_linear_backward.default(dy, *qargs, torch.bfloat16, A, B, x, h, s, True, True,
                                        True),
    }


def _device_context(x):
    with torch.cuda.device(x.device):
        pass


def nf4_forward_parts(M: int):
    """The pieces of one ``nf4_linear`` forward with an adapter (the 8B QLoRA step's call:
    the device path, bf16 LoRA, the TMA tail kernel), each called on its own: where the
    op's host time goes, without cProfile's inflation. ``body`` is the op's Python
    function called directly (no dispatcher, no autograd wrapper)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    from lorafuse.kernels import lora_triton as lt

    N, s = 4096, 2.0
    w, q, qs, qargs, x, A, B, _, h = _nf4_operands(M)
    body = getattr(nf4.nf4_linear_op, "_init_fn", None)
    fwd = torch.ops.lorafuse.nf4_linear.default
    parts = {
        "op (torch.ops.lorafuse.nf4_linear)": lambda: fwd(x, *qargs, None, A, B, s, x,
                                                          torch.bfloat16),
        "twin (torch.ops.lorafuse_rt.nf4_linear: what compiled graphs call)":
            lambda: torch.ops.lorafuse_rt.nf4_linear.default(x, *qargs, None, A, B, s, x,
                                                             torch.bfloat16),
        "_forward_device (the op's device path)": lambda: nf4._forward_device(
            x, *qargs, None, A, B, s, x, torch.bfloat16),
        "_dequantize_fast (choice + kernel)": lambda: nf4._dequantize_fast(*qargs, torch.bfloat16),
        "triton_dequantize_4bit": lambda: nf4.triton_dequantize_4bit(*qargs, torch.bfloat16),
        "x' Aᵀ (torch.mm)": lambda: x @ A.t(),
        "base_plus_lowrank (choice + tail kernel)": lambda: lora.base_plus_lowrank(
            x, w, None, h, B, s),
        "tail_gemm_nt_tma (autotuner launch)": lambda: lt.tail_gemm_nt_tma(x, w, h, B, None, s),
        "5 × TensorDescriptor.from_tensor": lambda: [
            TensorDescriptor.from_tensor(t, [16, 16]) for t in (x, w, h, B, x)],
        "torch.empty (M, N)": lambda: torch.empty((M, N), dtype=x.dtype, device=x.device),
        "with torch.cuda.device(x.device): pass": lambda: _device_context(x),
    }
    if body is not None:
        parts["body (the op's Python function)"] = lambda: body(x, *qargs, None, A, B, s, x,
                                                                torch.bfloat16)
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=16, help="rows per call (small: host-bound)")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--no-nf4", action="store_true", help="skip the 4-bit paths")
    p.add_argument("--parts", action="store_true",
                   help="also time the pieces of one nf4_linear forward (table 2)")
    p.add_argument("--profile", default="lorafuse::", metavar="PREFIX",
                   help="after the table, where the host time of the paths whose name "
                        "starts with PREFIX goes (cProfile, top functions by own time); "
                        "'' for none")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_op_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    paths = lora_paths(args.m)
    if not args.no_nf4:
        try:
            paths.update(nf4_paths(args.m))
        except ImportError as e:
            print(f"4-bit paths skipped: {e}", file=sys.stderr)
    print(f"### Host cost per call, M = {args.m}, N = K = 4096, r = 16, bf16, "
          f"{args.calls} calls ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| path | host µs/call | host ms per 224 calls |")
    print("|---|---|---|")
    with torch.no_grad():
        for name, fn in paths.items():
            try:
                host = measure(fn, args.calls)
            except Exception as e:  # a path that cannot run here: say so, go on
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | |")
                continue
            print(f"| {name} | {host:.1f} | {host * SITES_PER_STEP / 1e3:.1f} |",
                  flush=True)
        if args.parts and not args.no_nf4:
            print(f"\n### The pieces of one nf4_linear forward, M = {args.m}\n")
            print("| piece | host µs/call |")
            print("|---|---|")
            for name, fn in nf4_forward_parts(args.m).items():
                try:
                    print(f"| {name} | {measure(fn, args.calls):.1f} |", flush=True)
                except Exception as e:
                    print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} |")
        if args.profile:
            for name, fn in paths.items():
                if name.startswith(args.profile):
                    print_profile(name, fn, args.calls)
    return 0


def print_profile(name: str, fn, calls: int, top: int = 12) -> None:
    """The functions where ``calls`` calls of ``fn`` spend their host time (own time,
    µs per call), as a table: which Python (dispatch, checks, launchers) to cut."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (cc, nc, tottime, cumtime, _)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\n#### {name}: own host time per call (cProfile, which inflates it)\n")
    print("| function | calls per call | own µs per call |")
    print("|---|---|---|")
    for (path, line, func), (_, nc, tottime, _, _) in rows:
        where = f"{Path(path).name}:{line} {func}" if line else func
        print(f"| `{where}` | {nc / calls:.0f} | {tottime / calls * 1e6:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
