"""The ``fp8_dx`` option's pieces against their alternatives, at the 8B sites.

    python bench/bench_fp8_dx.py [--rep MS] [--variants eager,inductor,lorafuse] [--json PATH]
    python bench/bench_fp8_dx.py --device cpu --small    # smoke test of this script
    OPS=bench_fp8_dx.py bash bench/run_gpu.sh ops        # on the GPU machine

The project uses a kernel only where it beats eager PyTorch and Inductor for its op; this
measures that for the two Triton kernels of kernels/fp8_dx.py, and what the whole e4m3
dy W costs against the bf16 GEMM it replaces.

Sites (bf16, Llama-3.1-8B, M = 4096 tokens), as the lora pass groups them:
  qkv   dy (M, 4096 + 1024 + 1024), W (6144, 4096)      o     dy (M, 4096), W (4096, 4096)
  gate_up  dy (M, 2 × 14336), W (28672, 4096)          down  dy (M, 4096), W (4096, 14336)
Rows per site:
  quantise dy  one power-of-two scale per row across the sites' dy, scale and cast to e4m3
               into the concatenated operand. lorafuse: the Triton kernel (one launch), in
               the configuration it picks, then in each of QUANTISE_CONFIGS ("1-pass w16":
               the row held in registers, 16 warps; "2-pass": read twice, CUDA only);
               eager: the module's PyTorch path (row maxima per site, the scale's ops, a
               multiply and cast per site); inductor: torch.compile of that same function.
  cast W       fp8_copies=False: W · inv cast to e4m3 and transposed into (K, ΣN).
               lorafuse: the Triton kernel (a launch per weight); eager / inductor: the
               module's PyTorch path, plain and compiled.
  dy W         bf16: cuBLAS on the concatenated dy and W (what fp8_dx replaces); fp8:
               ``fp8_dx`` with the kept copy (quantise dy + the e4m3 GEMM); fp8 no copy:
               ``fp8_dx(copies=False)`` (+ the cast of W).
Time, three ways, because at these sizes a kernel's memory traffic takes ≈ 10-150 µs
and the host's call (allocations, Python, the launch; Dynamo's guards for Inductor) can
take as long (session 28: the same 4096 × 4096 quantisation measured 0.036 and 0.050 ms
at two sites):
  call ms   median of triton.testing.do_bench: calls timed one after another, the host's
            time included wherever it is longer than the GPU's (a perf_counter median on
            CPU). What a step without CUDA graphs pays.
  GPU ms    triton.testing.do_bench_cudagraph: the calls recorded in a CUDA graph and
            replayed, so the GPU's time alone; what a step under CUDA graphs pays, and
            the per-kernel verdict. CUDA only ("—" on CPU, or if recording fails).
  host µs   the host's time per call, 50 calls queued without waiting for the GPU.
The memory-bound rows also give GB/s over the bytes they must move (dy or W read once in
bf16, written once in e4m3) and their fraction of the H200's 4182 GB/s; the GEMM rows
TFLOP/s; both from GPU ms where there is one, else from call ms. Every variant's bytes
are checked equal to lorafuse's. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafuse.kernels import fp8_dx as fp8  # noqa: E402

PEAK_GBPS = 4182.0
M_8B = 4096
SITES = {  # name: (N per site, K)
    "qkv": ((4096, 1024, 1024), 4096),
    "o": ((4096,), 4096),
    "gate_up": ((14336, 14336), 4096),
    "down": ((4096,), 14336),
}
SMALL = {"qkv": ((32, 16, 16), 48), "down": ((32,), 80)}
VARIANTS = ("eager", "inductor", "lorafuse")


def log(msg: str) -> None:
    print(f"[bench_fp8_dx] {msg}", file=sys.stderr, flush=True)


def timed_ms(fn, device, rep_ms: int) -> float:
    """Call ms (module docstring)."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, rep=rep_ms)
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, device, rep_ms: int):
    """GPU ms (module docstring), or None on CPU or when the calls cannot be recorded."""
    if device.type != "cuda":
        return None
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception as e:  # a call that syncs or allocates on the host cannot be recorded
        log(f"  (not recorded in a CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None


def host_us(fn, device, calls: int = 50) -> float:
    """Host µs per call (module docstring): the GPU is not waited for inside the window."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def quantize_eager(dys):
    q = torch.empty(dys[0].shape[0], sum(d.shape[1] for d in dys), dtype=fp8.E4M3,
                    device=dys[0].device)
    return q, fp8.quantize_dy_pytorch(dys, q)


def cast_eager(ws, inv):
    out = torch.empty(ws[0].shape[1], sum(w.shape[0] for w in ws), dtype=fp8.E4M3,
                      device=ws[0].device)
    return fp8.cast_weights_t_pytorch(ws, inv, out)


# the Triton quantisation's configurations timed beside the one it picks (the "lorafuse"
# row: fp8_dx.quantise_config): (one pass?, num_warps)
QUANTISE_CONFIGS = ((False, 8), (False, 16), (True, 8), (True, 16), (True, 32))


def quantise_with(dys, one_pass, warps):
    q = torch.empty(dys[0].shape[0], sum(d.shape[1] for d in dys), dtype=fp8.E4M3,
                    device=dys[0].device)
    s = torch.empty(dys[0].shape[0], dtype=torch.float32, device=q.device)
    fp8.quantize_rows_into(dys, q, s, one_pass=one_pass, num_warps=warps)
    return q, s.reshape(-1, 1)


def same_bytes(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def bench_site(name, ns, K, M, device, variants, rep_ms) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    dys = [torch.randn(M, n, device=device, generator=g).bfloat16() for n in ns]
    ws = [(torch.randn(n, K, device=device, generator=g) / K ** 0.5).bfloat16() for n in ns]
    sb = fp8.weight_scales(ws)
    inv = (1.0 / sb).reshape(-1)
    N = sum(ns)
    rows = []

    def measure(op, variant, fn, bytes_=None, flops=None, check=None):
        try:
            ok = check(fn()) if check else True
            times = {"ms": timed_ms(fn, device, rep_ms), "gpu_ms": gpu_ms(fn, device, rep_ms),
                     "host_us": host_us(fn, device)}
        except Exception as e:  # Inductor's fp8 support varies (CPU: a promotion error)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append({"site": name, "op": op, "variant": variant, "ms": None,
                         "bytes_equal": None, "error": msg})
            log(f"{name} {op} {variant}: failed ({msg})")
            return
        row(op, variant, times, bytes_, flops, ok)

    def row(op, variant, times, bytes_=None, flops=None, ok=True):
        r = {"site": name, "op": op, "variant": variant, **times, "bytes_equal": ok}
        ms = r["gpu_ms"] or r["ms"]  # rates from the GPU's time where there is one
        if bytes_:
            r["gbps"] = bytes_ / ms / 1e6
            r["peak_frac"] = r["gbps"] / PEAK_GBPS
        if flops:
            r["tflops"] = flops / ms / 1e9
        rows.append(r)
        gpu = "—" if r["gpu_ms"] is None else f"{r['gpu_ms']:.3f}"
        log(f"{name} {op} {variant}: call {r['ms']:.3f} ms, GPU {gpu} ms, host "
            f"{r['host_us']:.0f} µs" + (f", {r['gbps']:.0f} GB/s" if bytes_ else "")
            + (f", {r['tflops']:.0f} TFLOP/s" if flops else "") + ("" if ok else ", BYTES DIFFER"))

    # quantise dy: 2 bytes read + 1 written an element (the scales are M floats)
    want_q, want_s = fp8.quantize_dy(dys)
    fns = {"lorafuse": lambda: fp8.quantize_dy(dys), "eager": lambda: quantize_eager(dys)}
    if "inductor" in variants:
        fns["inductor"] = torch.compile(lambda: quantize_eager(dys), dynamic=False)
    for v in variants:
        measure("quantise dy", v, fns[v], 3 * M * N,
                check=lambda out: same_bytes(out[0], want_q) and torch.equal(out[1], want_s))
    if "lorafuse" in variants and fp8._kernel_takes(dys):  # the kernel's configurations
        for one_pass, warps in QUANTISE_CONFIGS:
            measure("quantise dy", f"lorafuse {'1' if one_pass else '2'}-pass w{warps}",
                    functools.partial(quantise_with, dys, one_pass, warps), 3 * M * N,
                    check=lambda out: same_bytes(out[0], want_q) and torch.equal(out[1], want_s))
    # cast W (fp8_copies=False): 2 read + 1 written an element
    want_w = fp8.cast_weights_t(ws, inv)
    fns = {"lorafuse": lambda: fp8.cast_weights_t(ws, inv),
           "eager": lambda: cast_eager(ws, inv)}
    if "inductor" in variants:
        fns["inductor"] = torch.compile(lambda: cast_eager(ws, inv), dynamic=False)
    for v in variants:
        measure("cast W", v, fns[v], 3 * N * K, check=lambda out: same_bytes(out, want_w))
    # dy W: the bf16 GEMM it replaces, and the whole fp8 path with and without the copy
    dy_cat, w_cat = torch.cat(dys, 1), torch.cat(ws, 0)
    flops = 2 * M * N * K
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()
    gemms = {"bf16 cuBLAS": lambda: dy_cat @ w_cat,
             "fp8": lambda: fp8.fp8_dx(dys, ws),
             "fp8 no copy": lambda: fp8.fp8_dx(dys, ws, copies=False)}
    for v, fn in gemms.items():
        measure("dy W", v, fn, flops=flops)
    for cache in (fp8.weight_cache, fp8.scale_cache):
        with warnings.catch_warnings():  # GPU ms recorded graphs that read the entries...
            warnings.simplefilter("ignore")
            cache.clear()
        cache.release_graph_held()  # ...and are gone now (do_bench_cudagraph's own)
    return rows


def table(rows) -> str:
    lines = ["| site | op | variant | call ms | GPU ms | host µs | GB/s (% of 4182) | TFLOP/s "
             "| bytes = lorafuse's |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"| {r['site']} | {r['op']} | {r['variant']} | failed: {r['error']} "
                         "| | | | | |")
            continue
        gpu = "—" if r["gpu_ms"] is None else f"{r['gpu_ms']:.3f}"
        bw = f"{r['gbps']:,.0f} ({100 * r['peak_frac']:.0f} %)" if "gbps" in r else ""
        tf = f"{r['tflops']:,.0f}" if "tflops" in r else ""
        ok = "" if r["op"] == "dy W" else ("yes" if r["bytes_equal"] else "**no**")
        lines.append(f"| {r['site']} | {r['op']} | {r['variant']} | {r['ms']:.3f} | {gpu} | "
                     f"{r['host_us']:.0f} | {bw} | {tf} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms) per row")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    sites, M = (SMALL, 32) if args.small else (SITES, M_8B)
    if device.type == "cuda" and not fp8.supported(M, 16, 16, torch.bfloat16, device):
        log("fp8_dx does not run on this GPU (it needs sm90+): nothing to measure")
        return 0
    rows = []
    for name, (ns, K) in sites.items():
        rows += bench_site(name, ns, K, M, device, variants, args.rep)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    print(table(rows))
    return 0 if all(r["bytes_equal"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
