"""The Triton LoRA kernels under the Triton interpreter, on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, and other test modules
import triton in this pytest process; so every check runs in one subprocess (this file
run as a script, with the environment set), which reports per-check results as JSON.
Each check is then one pytest test here.

Oracles: the kernel rounds once, so it is compared with the fp64 value of the same
computation (same rounded operands: h = x' Aᵀ and dy B are rounded in the compute dtype,
as the kernel's callers do) — elementwise within one ulp plus fp32 accumulation slack,
and equal to that value rounded in nearly every element.
"""

from __future__ import annotations

import os

import pytest

from conftest import CheckRecorder, assert_check_passed, run_interpreter_worker
DTYPES = ("float32", "float16", "bfloat16")

# (name, M, N, K, r, options): odd sizes around the interpreter tile (16 x 32 x 16).
GEMM_CASES = [
    ("square", 37, 45, 29, 5, {}),
    ("rank1_bias", 19, 33, 50, 1, {"bias": True}),
    ("rank16_alpha", 33, 17, 47, 16, {"alpha2": 0.37}),
    ("rank70_loops_tail", 21, 18, 13, 70, {"alpha2": 2.0, "bias": True}),
    ("b1_row_major", 23, 41, 31, 7, {"b1_kn": True}),  # GPT-2: B1 = W_kn, stride (N, 1)
    ("strided_a1", 17, 29, 35, 3, {"a1_sliced": True, "bias": True}),
    ("one_row", 1, 9, 7, 2, {}),
    ("k1_even", 18, 40, 32, 4, {"bias": True}),  # K1 % BLOCK_K == 0: unmasked k loads
]
# (name, M, N, K, r, options) for the TMA forward kernel: x (M, K), W (N, K), h (M, r),
# B (N, r), all K-contiguous; TMA needs rows of a multiple of 16 bytes (K, r, N % 8 == 0).
TMA_CASES = [
    ("partial_tiles", 37, 40, 56, 16, {}),
    ("rank8_bias", 19, 72, 48, 8, {"bias": True, "alpha2": 0.37}),
    ("rank72_loops_tail", 21, 24, 32, 72, {"alpha2": 2.0}),
    ("h_column_slice", 18, 32, 40, 8, {"h_slice": True}),  # grouped sites: h_i = h[:, a:b]
]
# (name, lead, N, K, r, options) for the LoRA forward/backward and the op.
LORA_CASES = [
    ("2d", (29,), 37, 43, 6, {"bias": True}),
    ("3d_dropout", (2, 11), 21, 35, 4, {"dropout": 0.25}),
    ("gpt2_weight_t", (3, 7), 27, 19, 9, {"weight_t": True, "bias": True, "scale": 0.5}),
    ("rank33", (13,), 18, 50, 33, {"scale": 2.0}),
]


def _check_ids():
    ids = [f"gemm-{c[0]}-{d}" for c in GEMM_CASES for d in DTYPES]
    ids += [f"lora-{c[0]}-{d}" for c in LORA_CASES for d in DTYPES]
    ids += [f"op-{c[0]}-{d}" for c in LORA_CASES for d in ("float32", "bfloat16")]
    ids += [f"tma-{c[0]}-{d}" for c in TMA_CASES for d in ("float16", "bfloat16")]
    ids += ["op-fallback-float64", "gemm-random-shapes", "tma-unsupported", "tma-forward-route",
            "gemm-int32-row-blocks"]
    return ids


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, LORAFUSE_LORA_IMPL="triton")


@pytest.mark.parametrize("check", _check_ids())
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


# --------------------------------------------------------------------------- worker side
# Everything below runs only in the subprocess (TRITON_INTERPRET=1).


def _worker():
    import warnings

    import torch

    from lorafuse.kernels import _dispatch, lora, lora_triton as lt

    assert lt._INTERPRETED, "TRITON_INTERPRET did not take effect"
    record = CheckRecorder()

    def rnd(g, *shape, dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def assert_rounded_once(got, exact, slack, what):
        """got: the kernel's output; exact: fp64 value of the same computation; slack:
        an fp64 bound of fp32 accumulation error. Within one ulp everywhere, and equal
        to the correctly rounded value almost everywhere (not rounded twice)."""
        assert got.shape == exact.shape, (what, got.shape, exact.shape)
        assert torch.isfinite(got).all(), what
        ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[got.dtype]
        err = (got.double() - exact).abs()
        bound = ulp * exact.abs() + slack + 1e-30
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{what}: error {worst:.3g} x bound"
        if got.dtype != torch.float32:
            same = (got == exact.to(got.dtype)).double().mean().item()
            assert same >= 0.9, f"{what}: only {same:.1%} correctly rounded"

    def acc_slack(*pairs):
        """fp32 accumulation error bound for sums of products: 1e-6 · Σ|a||b|."""
        total = 0
        for a, b in pairs:
            total = total + a.double().abs() @ b.double().abs()
        return 1e-6 * total

    def gemm_case(M, N, K, r, opts, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        a1 = rnd(g, M, K + 3 if opts.get("a1_sliced") else K, dtype=dtype)
        if opts.get("a1_sliced"):
            a1 = a1[:, 2:2 + K]  # row stride K + 3, offset start
        w = rnd(g, K, N, dtype=dtype) if opts.get("b1_kn") else rnd(g, N, K, dtype=dtype)
        b1 = w if opts.get("b1_kn") else w.t()
        a2 = rnd(g, M, r, dtype=dtype)
        b2 = rnd(g, N, r, dtype=dtype, std=0.5).t()
        bias = rnd(g, N, dtype=dtype) if opts.get("bias") else None
        alpha = opts.get("alpha2", 1.0)
        out = lt.lowrank_tail_gemm(a1, b1, a2, b2, bias, alpha2=alpha)
        exact = a1.double() @ b1.double() + alpha * (a2.double() @ b2.double())
        if bias is not None:
            exact = exact + bias.double()
        slack = acc_slack((a1, b1), (a2, b2 * abs(alpha)))
        assert out.dtype == dtype
        assert_rounded_once(out, exact, slack, "C")

    for name, M, N, K, r, opts in GEMM_CASES:
        for d in DTYPES:
            dtype = getattr(torch, d)
            record(f"gemm-{name}-{d}", lambda: gemm_case(M, N, K, r, opts, dtype))

    def tma_case(M, N, K, r, opts, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        x, w = rnd(g, M, K, dtype=dtype), rnd(g, N, K, dtype=dtype)
        h = rnd(g, M, r + 8, dtype=dtype)[:, 8:] if opts.get("h_slice") else rnd(g, M, r, dtype=dtype)
        B = rnd(g, N, r, dtype=dtype, std=0.5)
        bias = rnd(g, N, dtype=dtype) if opts.get("bias") else None
        alpha = opts.get("alpha2", 1.0)
        assert lt.tail_gemm_nt_tma_supported(x, w, h, B, bias)
        out = lt.tail_gemm_nt_tma(x, w, h, B, bias, alpha2=alpha)
        exact = x.double() @ w.double().t() + alpha * (h.double() @ B.double().t())
        if bias is not None:
            exact = exact + bias.double()
        assert out.dtype == dtype
        assert_rounded_once(out, exact, acc_slack((x, w.t()), (h, B.t() * abs(alpha))), "C")

    for name, M, N, K, r, opts in TMA_CASES:
        for d in ("float16", "bfloat16"):
            dtype = getattr(torch, d)
            record(f"tma-{name}-{d}", lambda: tma_case(M, N, K, r, opts, dtype))

    def tma_unsupported():
        """What TMA cannot load goes to the pointer kernel: fp32, rows not 16-byte multiples,
        a transposed weight (GPT-2), mixed dtypes."""
        bf = torch.bfloat16
        x, w, h, B = torch.randn(8, 16, dtype=bf), torch.randn(24, 16, dtype=bf), \
            torch.randn(8, 8, dtype=bf), torch.randn(24, 8, dtype=bf)
        assert lt.tail_gemm_nt_tma_supported(x, w, h, B, None)
        assert not lt.tail_gemm_nt_tma_supported(x.float(), w.float(), h.float(), B.float(), None)
        x12, w12 = torch.randn(8, 12, dtype=bf), torch.randn(24, 12, dtype=bf)
        assert not lt.tail_gemm_nt_tma_supported(x12, w12, h, B, None)  # rows of 24 bytes
        assert not lt.tail_gemm_nt_tma_supported(x, w.t().contiguous().t(), h, B, None)
        assert not lt.tail_gemm_nt_tma_supported(x, w, h, B.float(), None)
        assert not lt.tail_gemm_nt_tma_supported(x, w, h, B, torch.randn(24))

    record("tma-unsupported", tma_unsupported)

    def random_shapes():
        g = torch.Generator().manual_seed(1234)
        for i in range(10):
            M, N, K = (int(v) for v in torch.randint(1, 60, (3,), generator=g))
            r = int(torch.randint(1, 65, (1,), generator=g))
            opts = {"bias": bool(i % 2), "b1_kn": bool(i % 3 == 0), "alpha2": 0.5 + i / 7}
            gemm_case(M, N, K, r, opts, getattr(torch, DTYPES[i % 3]), seed=i)

    record("gemm-random-shapes", random_shapes)

    def int32_row_blocks():
        """Operands past int32 offsets (8B at 262,144 tokens: 262,144 × 14,336 outputs) run
        as launches over blocks of rows, with the one launch's numbers bit for bit; a
        weight past them is refused (ValueError: the callers fall back to cuBLAS)."""
        g = torch.Generator().manual_seed(7)
        bf = torch.bfloat16
        M, N, K, r = 45, 24, 20, 4
        a1, b1 = rnd(g, M, K + 2, dtype=bf)[:, 1:1 + K], rnd(g, N, K, dtype=bf).t()
        a2, b2, bias = rnd(g, M, r, dtype=bf), rnd(g, N, r, dtype=bf).t(), rnd(g, N, dtype=bf)
        whole = lt.lowrank_tail_gemm(a1, b1, a2, b2, bias, alpha2=0.5)
        launches = []
        real_limit, real_rows = lt._MAX_INDEX, lt._rows_per_launch
        lt._MAX_INDEX = 600  # b1 reaches 479, out 45 × 24 elements: 25 rows per launch
        lt._rows_per_launch = lambda *t: launches.append(real_rows(*t)) or launches[-1]
        try:
            blocks = lt.lowrank_tail_gemm(a1, b1, a2, b2, bias, alpha2=0.5)
            assert launches == [25], launches
            assert torch.equal(blocks, whole)
            lt._MAX_INDEX = 400  # now b1 itself does not fit
            try:
                lt.lowrank_tail_gemm(a1, b1, a2, b2, bias, alpha2=0.5)
            except ValueError as e:
                assert "int32" in str(e)
            else:
                raise AssertionError("a weight past int32 offsets was not refused")
        finally:
            lt._MAX_INDEX, lt._rows_per_launch = real_limit, real_rows

    record("gemm-int32-row-blocks", int32_row_blocks)

    def lora_inputs(lead, N, K, r, opts, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, *lead, K, dtype=dtype)
        w_store = rnd(g, K, N, dtype=dtype) if opts.get("weight_t") else rnd(g, N, K, dtype=dtype)
        w = w_store.t() if opts.get("weight_t") else w_store
        b = rnd(g, N, dtype=dtype) if opts.get("bias") else None
        a = rnd(g, r, K, dtype=dtype, std=K ** -0.5)
        B = rnd(g, N, r, dtype=dtype, std=0.5)
        p = opts.get("dropout", 0.0)
        xl = None
        if p:
            mask = (torch.rand(*lead, K, generator=g) >= p).to(dtype)
            xl = x * mask / (1 - p)
        dy = rnd(g, *lead, N, dtype=dtype)
        return x, w, b, a, B, opts.get("scale", 1.0), xl, dy

    def tma_forward_route():
        """LORAFUSE_LORA_FWD_KERNEL=tma sends the op's forward through the TMA kernel: same
        one-rounding result as the pointer kernel's route (bit-equal or one ulp apart)."""
        x, w, b, a, B, s, _, _ = lora_inputs((3, 11), 40, 48, 8, {"scale": 0.5}, torch.bfloat16)
        outs = {}
        for kern in ("pointer", "tma"):
            os.environ[lora.FWD_KERNEL_ENV] = kern
            calls = []
            orig = lt.tail_gemm_nt_tma
            lt.tail_gemm_nt_tma = lambda *a_, **k_: calls.append(1) or orig(*a_, **k_)
            try:
                outs[kern] = lora._forward_impl(x, w, b, a, B, s, None)[0]
            finally:
                lt.tail_gemm_nt_tma = orig
                del os.environ[lora.FWD_KERNEL_ENV]
            assert bool(calls) == (kern == "tma"), (kern, calls)
        diff = (outs["tma"].float() - outs["pointer"].float()).abs()
        ulp = outs["pointer"].float().abs() * 2.0**-7 + 1e-6
        assert (diff <= ulp).all() and (diff == 0).float().mean() > 0.9

    record("tma-forward-route", tma_forward_route)

    def lora_case(lead, N, K, r, opts, dtype):
        x, w, b, a, B, s, xl, dy = lora_inputs(lead, N, K, r, opts, dtype)
        xl_ = x if xl is None else xl
        y, h = lora._forward_impl(x, w, b, a, B, s, xl)  # routed to the kernel (env above)
        assert y.shape == (*lead, N) and h.shape == (*lead, r)
        # h is a plain GEMM in the compute dtype; y is exact on top of that rounded h.
        h_exact = xl_.double() @ a.double().t()
        assert_rounded_once(h, h_exact, acc_slack((xl_, a.t())).reshape(h.shape), "h")
        y_exact = x.double() @ w.double().t() + s * (h.double() @ B.double().t())
        if b is not None:
            y_exact = y_exact + b.double()
        slack = acc_slack((x.reshape(-1, K), w.t()), (h.reshape(-1, r), B.t() * s))
        assert_rounded_once(y, y_exact, slack.reshape(y.shape), "y")

        dx, dA, dB = lt.triton_lora_backward(dy, xl_, w, a, B, h, s)
        dy2 = dy.reshape(-1, N)
        gu = dy2 @ B  # the unscaled rounded dy B the kernel consumes, same torch op
        dx_exact = dy2.double() @ w.double() + s * (gu.double() @ a.double())
        slack = acc_slack((dy2, w), (gu, a * s))
        assert_rounded_once(dx, dx_exact.reshape(dx.shape), slack.reshape(dx.shape), "dx")
        # dA, dB: cuBLAS-side GEMMs with s as alpha, each rounded once.
        xl2 = xl_.reshape(-1, K)
        assert_rounded_once(dA, s * (gu.double().t() @ xl2.double()),
                            acc_slack((gu.t(), xl2 * s)), "dA")
        h2 = h.reshape(-1, r)
        assert_rounded_once(dB, s * (dy2.double().t() @ h2.double()),
                            acc_slack((dy2.t(), h2 * s)), "dB")
        # Without the base weight (dropout: dx' = s·(dy B) A only), the op's cuBLAS-side code.
        dxl, _, _ = lora._lora_linear_backward_cublas(dy, xl_, None, a, B, h, s)
        assert_rounded_once(dxl, (s * (gu.double() @ a.double())).reshape(dxl.shape),
                            acc_slack((gu, a * s)).reshape(dxl.shape), "dx'")

    for name, lead, N, K, r, opts in LORA_CASES:
        for d in DTYPES:
            dtype = getattr(torch, d)
            record(f"lora-{name}-{d}", lambda: lora_case(lead, N, K, r, opts, dtype))

    def op_case(lead, N, K, r, opts, dtype):
        """Through torch.ops.lorafuse.lora_linear and autograd, dispatched to Triton
        (LORAFUSE_LORA_IMPL=triton): against the fp32 reference op on the same inputs."""
        x, w, b, a, B, s, _, dy = lora_inputs(lead, N, K, r, opts, dtype)
        p = opts.get("dropout", 0.0)
        g = torch.Generator().manual_seed(7)
        mask = (torch.rand(*lead, K, generator=g) >= p).to(dtype) if p else None

        def run(impl):
            os.environ["LORAFUSE_LORA_IMPL"] = impl
            leaves = [t.detach().clone().requires_grad_() for t in (x, a, B)]
            xx, aa, BB = leaves
            xl = None if mask is None else xx * mask / (1 - p)
            y = lora.lora_linear(xx, w, b, aa, BB, s, xl)
            return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))

        lora._choice.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a silent fallback to cuBLAS would hide the kernel
            got = run("triton")
        # The forward always runs the kernel (a fallback would have warned: an error here);
        # the backward records its per-shape choice.
        used = {k[:2] for k, v in lora._choice.items() if v == "triton"}
        assert used == ({("triton", "bwd")} if not p else set()), used
        want = run("auto")  # CPU + auto: the fp32 reference
        os.environ["LORAFUSE_LORA_IMPL"] = "triton"
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        for name, gt, wt in zip(("y", "dx", "dA", "dB"), got, want):
            assert gt.dtype == wt.dtype and gt.shape == wt.shape, name
            err = ((gt.double() - wt.double()).norm() / wt.double().norm()).item()
            assert err < tol, f"{name}: relative error {err:.3g} (tolerance {tol:.3g})"

    for name, lead, N, K, r, opts in LORA_CASES:
        for d in ("float32", "bfloat16"):
            dtype = getattr(torch, d)
            record(f"op-{name}-{d}", lambda: op_case(lead, N, K, r, opts, dtype))

    def fallback():
        """fp64 is not a kernel dtype: the op warns once and uses the cuBLAS-path code."""
        lora._choice.clear()
        _dispatch.warned.clear()
        x, w, b, a, B, s, xl, _ = lora_inputs((5,), 6, 7, 2, {"bias": True}, torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = lora.lora_linear(x, w, b, a, B, s)
            y2 = lora.lora_linear(x, w, b, a, B, s)
        msgs = [str(c.message) for c in caught if "using cuBLAS" in str(c.message)]
        assert len(msgs) == 1, msgs
        want = lora.lora_linear_reference(x, w, b, a, B, s)[0]
        assert torch.allclose(y, want) and torch.equal(y, y2)

    record("op-fallback-float64", fallback)
    record.report()


if __name__ == "__main__":
    _worker()
