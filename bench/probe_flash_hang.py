"""Which flash-attention backward tile config gets stuck on the GPU (session 7: the GPU test
of ``kernels/flash_attention.py`` at head dim 256, softcap 50, sat > 200 s in the
autotuner's benchmark of the backward, compiling: Triton's ``make_llir``).

Each (dtype, kernel, config) runs in its own child process with a time limit: the child
pins that kernel to the one config (the autotuner then runs it without benchmarking), runs
forward and backward once on the test's case (B 2, 4 query heads on 2 K/V heads, 333 × 333,
causal), synchronises, and prints its time, compile included. A child that does not
finish within the limit is stuck (compiling or running).

    python bench/probe_flash_hang.py [--d 256] [--softcap 50] [--limit 40]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def child(dtype_name: str, which: str, index: int, d: int, softcap: float) -> None:
    import torch

    from lorafuse.kernels import flash_attention as fa

    dtype = getattr(torch, dtype_name)
    tuned = {"fwd": (fa._fwd_tuned, fa.FWD_CONFIGS), "dq": (fa._dq_tuned, fa.DQ_CONFIGS),
             "dkdv": (fa._dkdv_tuned, fa.DKDV_CONFIGS)}
    for name, (kernel, configs) in tuned.items():  # the others on their last (small) config
        kernel.configs = [configs[index] if name == which else configs[-1]]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 333, d, device="cuda", generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(2, 2, 333, d, device="cuda", generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, 2, 333, d, device="cuda", generator=g, dtype=dtype).requires_grad_()
    start = time.perf_counter()
    out = fa.flash_attention(q, k, v, causal=True, softcap=softcap)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(f"ok {time.perf_counter() - start:.1f} s (compile included); "
          f"finite {all(torch.isfinite(t).all().item() for t in (out, q.grad, k.grad, v.grad))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--limit", type=float, default=40.0, help="seconds per child")
    p.add_argument("--kernels", default="dq,dkdv")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--indices", default="0,-1", help="which configs of each list (the GPU "
                   "test's two by default)")
    p.add_argument("--child", nargs=3, metavar=("DTYPE", "KERNEL", "INDEX"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.d, args.softcap)
        return
    from lorafuse.kernels import flash_attention as fa

    lists = {"fwd": fa.FWD_CONFIGS, "dq": fa.DQ_CONFIGS, "dkdv": fa.DKDV_CONFIGS}
    for dtype in args.dtypes.split(","):
        for which in args.kernels.split(","):
            for i in (int(x) % len(lists[which]) for x in args.indices.split(",")):
                cfg = lists[which][i]
                kw = cfg.kwargs
                tag = (f"{dtype} {which} BLOCK_M {kw['BLOCK_M']} BLOCK_N {kw['BLOCK_N']} "
                       f"warps {cfg.num_warps} stages {cfg.num_stages}")
                try:
                    r = subprocess.run([sys.executable, __file__, "--d", str(args.d), "--softcap",
                                        str(args.softcap), "--child", dtype, which, str(i)],
                                       capture_output=True, text=True, timeout=args.limit)
                    lines = (r.stdout + r.stderr).strip().splitlines()
                    print(f"{tag}: {lines[-1][:160] if lines else r.returncode}", flush=True)
                except subprocess.TimeoutExpired:
                    print(f"{tag}: HANG (> {args.limit:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
