#!/usr/bin/env bash
# The one script for a GPU run of lorafuse (see bench/README.md for what each mode does and
# how long it takes):
#
#   bash bench/run_gpu.sh [quick|1b|8b|fp8|fp8ref|fp8bar|qwen3|rope|memory|memref|qcg|qmem|qref|context|ops|full|smoke|tests|trainer][,MODE...]
#   (default: quick)
#
# Several modes separated by commas run in that order in one call (e.g. "ops,8b").
#
#   quick  GPU tests, the op benchmark, then 1B: eager, inductor, lorafuse, 2 + 8 steps.
#          Fits a 10-minute command (BUDGET_S=570 by default).
#   1b     1B: eager, eager_gc, inductor, lorafuse, 3 + 20 steps, fp32 reference. ~8 min.
#   8b     8B: eager, inductor, lorafuse, 3 + 10 steps, fp32 reference if time is left. ~9 min.
#   fp8    8B bf16, issue 3's bar with the fp8_dx option, in one run: lorafuse:fp8cg (defaults
#          + fp8_dx + Inductor's CUDA graphs), unsloth, inductor, then lorafuse:fp8 (no CUDA
#          graphs; last: a short budget drops it first); 2 + 8 steps, no fp32 reference.
#          ~6.5 min (session 28: the first three took 381 s with Inductor's cold compile,
#          158 s warm; the budget dropped lorafuse:fp8). Session 28: fp8cg 17,804 and 17,821
#          tok/s in two processes (1.15 x unsloth, 1.29 x inductor); lorafuse:fp8 without
#          graphs spread 14,300-17,255 in session 27 (the host's pace).
#   fp8ref 8B bf16, fp8_dx's accuracy: eager and lorafuse:fp8 (VARIANTS=eager,lorafuse:fp8cg:
#          with CUDA graphs), 2 + 18 steps, the fp32 reference of each one's parameters at
#          every step 1-20. ~4 min (session 27). VARIANTS=eager,lorafuse:fp8lean: fp8cg without
#          the weight copies, with the loss pass and drop_logits (issue 5, default budget);
#          lorafuse:fp8leantk: the same with the loss op's Triton rows (the default since
#          session 31; fp8lean pins LORAFUSE_LOSS_IMPL=torch).
#   fp8bar 8B bf16, issue 3's whole bar in ONE run: eager, lorafuse:fp8cg, unsloth, inductor,
#          2 + 18 steps, the fp32 reference of eager's and fp8cg's parameters at every step
#          1-20 (speed against Unsloth and Inductor, and the loss against eager bf16's, from
#          the same run). ~525 s on a fresh machine (Inductor's cold compile: 137 s; by
#          session 28's parts), ~300 s after an fp8 run has warmed the compile caches.
#          Session 30: 507 s to the reference on a fresh machine, which then needed ≈ 90 s
#          (24 to load, 33 a variant) and was cut by the budget: run it right after an fp8
#          command on the same (warm) machine.
#   qwen3  Qwen3-8B's shape (bench_train --shape qwen3-8b: per-head q/k RMSNorms, 36 layers,
#          vocab 151,936), bf16: lorafuse:cg (default passes, CUDA graphs) against
#          lorafuse:cgnorm (+ the norm pass), Inductor and Unsloth, 2 + 8 steps, no
#          reference. Not run yet: ~9 min by the 8B runs' compile times (estimate);
#          VARIANTS=lorafuse:cg,lorafuse:cgnorm for the pass alone.
#   memory 8B bf16, issue 5's 16.7 GiB bar: lorafuse:ck (checkpoint_layers, offloading, loss
#          pass, drop_logits) and lorafuse:mem (loss pass, recompute_free, fp8 storage,
#          offloading, drop_logits) beside Unsloth with its checkpointing, 2 + 6 steps, no
#          fp32 reference. ~8 min. VARIANTS=lorafuse:ck,lorafuse:ck0,unsloth_gc: ck against
#          ck0, ck's plan before session 25 (LORAFUSE_KEEP_RESIDUAL=0), in one run.
#          VARIANTS=lorafuse:ckfp8,lorafuse:ck,unsloth_gc: ck with fp8_dx and no weight
#          copies (each weight cast every backward: the copies would not fit 16.7 GiB);
#          lorafuse:ckp2: ck with offload_prefetch 2; lorafuse:ckfp8rcg / ckfp8rrcg: ckfp8r /
#          ckfp8rr under CUDA graphs (the capturable offload ops); ckfp8rrcg2: ckfp8rrcg with
#          offload_prefetch 2; lorafuse:ckfp8cg: ckfp8 under CUDA graphs
#          (Inductor's graph partition around the offload/reload ops; not run yet).
#   memref 8B bf16, issue 5's accuracy check for the memory configurations: eager,
#          lorafuse:ck and lorafuse:mem, 2 + 18 steps, the fp32 reference of each one's
#          parameters at every step 1-20 (the loss at every step at least as close to fp32
#          as eager bf16's; with fp8 storage, how much farther). ~8 min (estimate).
#   qcg    8B QLoRA, issue 4's bars: the default passes under Inductor's CUDA graphs beside
#          Inductor and Unsloth with its checkpointing, 3 + 8 steps, no reference. ~9.5 min.
#   qmem   8B QLoRA at issue 4's project goal (<= 7 GiB): lorafuse:qck (the 4-bit pass,
#          checkpoint_layers, offloading, loss pass, drop_logits), Unsloth with its
#          checkpointing, then lorafuse:qck2 (qck with offload_prefetch 2: last, so the
#          budget cuts it first), 2 + 8 steps, then 2 profiled steps each (GPU kernels and
#          host ops: BENCH_PROFILE_HOST=1), no reference. ~8 min (two variants took 5.5).
#          lorafuse:qckcg: qck with rope and offload_prefetch 2 under CUDA graphs.
#   qref   8B QLoRA, issue 4's accuracy check and the 4-bit pass's case for a default: eager,
#          lorafuse with the default passes (4-bit linears left to Inductor) and lorafuse:q4
#          (+ dequant_matmul, loss, drop_logits), no CUDA graphs, 2 + 18 steps, the fp32
#          reference (same dequantized weights) of each one's parameters at every step 1-20.
#          ~8 min (estimate).
#   context  8B long context, issue 5's 80 GiB bar (bench_context.py, bench/README.md "Long
#          context"): continues bench/results/context_8b.json and writes the updated file to
#          $OUT/context_8b.json (copy it back before the next command). CONTEXT_ARGS picks the
#          variants, lengths and caps (default: unsloth_gc and lorafuse:ckf at 1 × 16K and
#          1 × 64K, 1 + 1 steps, then the longest length within 80 GiB). BUDGET_S applies;
#          CONTEXT_FILE names another results file to continue. `--gpus 2` in CONTEXT_ARGS on
#          nvidia-h200-x2 runs two variants side by side, one GPU each (bench/README.md).
#   ops    the kernel-family microbenchmarks (forward GEMM, 4-bit GEMM, rope / gated MLP, SDPA),
#          ≤ 100 s each; OPS="bench_fwd_gemm.py bench_nf4_gemm.py" picks some of them.
#          Not in the default list: bench_fp8_dx.py, bench_norm.py (RMSNorm and LayerNorm
#          against eager, Inductor and Liger; carry .whl for Liger), ≤ 240 and 300 s;
#          bench_loss.py (the loss op's PyTorch and Triton rows against eager, Inductor and
#          Liger's fused linear cross-entropy at the 8B head), ≤ 150 s;
#          a timeout keeps the rows logged so far (one JSON line each in the log).
#   full   tests, op benchmark, 1b and 8b with all variants: 20+ minutes, no time budget;
#          under a 10-minute limit run "quick", "1b" and "8b" as separate commands instead.
#   smoke  the tiny model on CPU, eager and lorafuse, a few steps: checks this script anywhere.
#   tests  only the GPU tests (pytest -m cuda).
#   trainer  HF Trainer through `lorafuse finetune` on the 1B shape, eager and lorafuse, 30 steps
#          (bench/bench_trainer.py; ~4 min).
#
# Environment:
#   OUT=dir        where logs, JSON and markdown go (default bench/out/<date>); the device
#                  tool sets OUT and brings that folder back
#   BUDGET_S=570   seconds this invocation may take; bench_train skips what would not fit and
#                  still prints its tables (0 = no limit; default 0 for full)
#   VARIANTS=...   override the variant list of bench_train (e.g. eager,lorafuse)
#   QLORA=1        add --qlora (bitsandbytes NF4 base; carry .whl/base.tgz for bitsandbytes)
#                  variants unsloth / unsloth_gc need .whl/uns.tgz (and base.tgz) carried
#   SKIP_TESTS=1   skip pytest and the op benchmark
#   PYTEST_ARGS=.. more pytest arguments for the GPU tests (e.g. "tests/test_cuda.py"), split
#                  on spaces (no quoting inside)
#   PYTEST_K=...   pytest's -k expression, passed as one argument (e.g. "offload or long_causal")
#   SKIP_INSTALL=1 do not pip install the repo (the bench then imports lorafuse.backend if needed)
#   EXTRA="..."    more arguments for bench_train.py (e.g. "--cold-compile"); a --variants
#                  there replaces the mode's list (as VARIANTS does)
#   CACHE=dir      where the random-init models are saved (default /tmp/lorafuse_bench)
#   BENCH_COMMIT=  the commit to print (wins over git: a copied tree can carry a stale .git)
#
# With nvidia-smi present, $OUT/gpu_clocks.csv logs the SM clock, power, clock-limit
# reasons and temperature of the (first visible) GPU every 200 ms, and bench_train prints
# each variant's medians over its timed steps.
set -u
MODE=${1:-quick}
for m in ${MODE//,/ }; do
    case "$m" in quick|1b|8b|fp8|fp8ref|fp8bar|qwen3|rope|memory|memref|qcg|qmem|qref|context|ops|full|smoke|tests|trainer) ;;
        *) echo "usage: $0 [quick|1b|8b|fp8|fp8ref|fp8bar|qwen3|rope|memory|memref|qcg|qmem|qref|context|ops|full|smoke|tests|trainer][,MODE...]" >&2
           exit 2;; esac
done
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
# The commit for the tables: BENCH_COMMIT from the caller when set (the device tool's copy
# of the tree can carry a stale .git), else git, else "unknown".
COMMIT=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export BENCH_COMMIT=$COMMIT
if [[ ",$MODE," == *,full,* ]]; then BUDGET_S=${BUDGET_S:-0}; else BUDGET_S=${BUDGET_S:-570}; fi
OUTDIR=${OUT:-bench/out/$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUTDIR"
CACHE=${CACHE:-/tmp/lorafuse_bench}
SUMMARY="$OUTDIR/summary.md"
: > "$SUMMARY"
say() { echo "[run_gpu $(date +%H:%M:%S) +${SECONDS}s] $*"; }

say "mode $MODE, output in $OUTDIR, budget ${BUDGET_S}s"
nvidia-smi -L 2>/dev/null || say "nvidia-smi not available"
# SM clock and power every 200 ms for the whole call (read only: nothing is set), so
# bench_train can say what clock its timed steps ran at (a power-capped GPU clocks down).
CLOCK_FIELDS=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active,temperature.gpu
CLOCK_GPU=${CUDA_VISIBLE_DEVICES:-0}; CLOCK_GPU=${CLOCK_GPU%%,*}  # one GPU: the first visible
if nvidia-smi -i "$CLOCK_GPU" --query-gpu=$CLOCK_FIELDS --format=csv,noheader,nounits \
        >/dev/null 2>&1; then
    nvidia-smi -i "$CLOCK_GPU" --query-gpu=$CLOCK_FIELDS --format=csv,noheader,nounits -lms 200 \
        > "$OUTDIR/gpu_clocks.csv" 2>/dev/null &
    CLOCK_PID=$!
    trap 'kill $CLOCK_PID 2>/dev/null' EXIT
    export BENCH_GPU_CLOCKS="$OUTDIR/gpu_clocks.csv"
fi
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

# bitsandbytes (and liger) for QLoRA: carried as .whl/base.tgz (shared/tools/build_peer_bundles.sh)
if ! "$PY" -c "import bitsandbytes" 2>/dev/null && [ -f .whl/base.tgz ]; then
    mkdir -p /tmp/site_base && tar xzf .whl/base.tgz -C /tmp/site_base \
        && export PYTHONPATH="/tmp/site_base${PYTHONPATH:+:$PYTHONPATH}" \
        && say "bitsandbytes from .whl/base.tgz (/tmp/site_base)"
fi
# Unsloth (variants unsloth, unsloth_gc): .whl/uns.tgz, unpacked apart and put on the path
# only inside the unsloth children (UNSLOTH_SITE), so no other variant sees its packages.
if [ -f .whl/uns.tgz ] && [ ! -d /tmp/site_uns ]; then
    mkdir -p /tmp/site_uns && tar xzf .whl/uns.tgz -C /tmp/site_uns \
        && say "unsloth bundle unpacked to /tmp/site_uns"
fi
[ -d /tmp/site_uns ] && export UNSLOTH_SITE=/tmp/site_uns
"$PY" -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null \
    || say "bitsandbytes not importable (QLoRA runs will report it)"

# Install the repo so the torch_dynamo_backends entry point exists ("lorafuse" by name). No
# network there: --no-deps --no-build-isolation. If that fails, bench_train.py imports
# lorafuse.backend from the repository and passes the callable instead.
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    say "SKIP_INSTALL=1: not installing"
elif "$PY" -m pip install --no-deps --no-build-isolation -q -e . > "$OUTDIR/pip_install.log" 2>&1; then
    say "pip install -e . done"
else
    say "pip install -e . failed (see pip_install.log); using PYTHONPATH=$PWD"
    tail -n 5 "$OUTDIR/pip_install.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c "from torch._dynamo.backends.registry import lookup_backend as l; l('lorafuse')" \
        > /dev/null 2>&1; then
    BACKEND_NOTE="backend 'lorafuse' found through its entry point"
else
    BACKEND_NOTE="backend 'lorafuse' not registered; bench_train imports lorafuse.backend"
fi
say "$BACKEND_NOTE"

# the lorafuse configurations of the memory, qcg and qmem modes
MEMORY_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "recompute_free": true,
  "activation_dtype": "fp8", "offload_activations": true, "drop_logits": true}}'
CHECKPOINT_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true}}'
# ck as before session 25: the post-attention residual recomputed (the A/B of that change)
CHECKPOINT0_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true}, "env": {"LORAFUSE_KEEP_RESIDUAL": "0"}}'
CG_CONFIG='{"options": {"inductor": {"triton.cudagraphs": true}}}'
# cg with the norm pass (qwen3 mode: Qwen3's per-head q/k norms, where the norm op alone
# beat Inductor's 1.7-2.3 x on the GPU, session 31)
CGNORM_CONFIG='{"options": {"passes": ["lora", "attention", "masked_attention", "norm"],
  "inductor": {"triton.cudagraphs": true}}}'
FP8_CONFIG='{"options": {"fp8_dx": true}}'
# ck with offload_prefetch 2 (+4.8 % for QLoRA's qck in session 27; its peak at 16.7 GiB?)
CHECKPOINTP2_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "offload_prefetch": 2}}'
# ck with fp8_dx, its weights cast every backward (fp8_copies false: 6.5 GiB of copies would
# not fit issue 5's 16.7 GiB)
CKFP8_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false}}'
# ckfp8 with the rope pass (a default since session 32; ckfp8 lists its passes), and that
# with offload_prefetch 2: the next measurements toward issue 5's 16.7 GiB bar
CKFP8R_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false}}'
CKFP8R2_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "offload_prefetch": 2}}'
# ckfp8r with the recomputed gate/up and down GEMMs in fp8 (fp8_recompute, session 32;
# session 33: the op 0.52 ms faster per gate/up group alone, the step +4.6 % in the one
# run whose two processes both ran at the host's fast pace)
CKFP8RR_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "fp8_recompute": true}}'
# ckfp8r and ckfp8rr under CUDA graphs with the capturable offload ops (session 33): the
# whole forward and backward recorded, the copies too; no host between kernels
CKFP8RCG_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "inductor": {"triton.cudagraphs": true}}}'
CKFP8RRCG_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "fp8_recompute": true, "inductor": {"triton.cudagraphs": true}}}'
# ckfp8rrcg with offload_prefetch 2 (session 33's command 3 profiled 13.5 ms a step of waits
# after the reload copies; session 34: +2.8 %, the peak unmoved, as it is in the forward)
CKFP8RRCG2_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "rope"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "fp8_recompute": true, "offload_prefetch": 2, "inductor": {"triton.cudagraphs": true}}}'
# ckfp8 under CUDA graphs with Inductor's graph partition asked for. Session 32 (the eager
# offload ops, cudagraph_unsafe, as partition boundaries): 6,737 tok/s at 21.6 GiB against
# ckfp8's 12,208 at 16.3. Since session 33 the copies are recorded (capturable ops) and the
# partition has nothing of lorafuse's to split at
CKFP8CG_CONFIG='{"options": {"passes": ["lora", "attention", "loss"], "checkpoint_layers": true,
  "offload_activations": true, "drop_logits": true, "fp8_dx": true, "fp8_copies": false,
  "inductor": {"triton.cudagraphs": true, "graph_partition": true}}}'
FP8CG_CONFIG='{"options": {"fp8_dx": true, "inductor": {"triton.cudagraphs": true}}}'
# fp8cg for issue 5's default-budget bar (peak <= 30.6 GiB): no fp8 weight copies (6.5 GiB),
# the loss pass and drop_logits (no tokens x vocab logits); the default memory budget.
# The bar's variant is fp8leantk; fp8lean is the same with the loss op's PyTorch
# rows (LORAFUSE_LOSS_IMPL=torch, ~10 passes over each chunk's fp32 logits, the default
# until session 31), fp8leantk with its Triton rows kernel (~3 passes, the default on CUDA
# since session 31: +2.9 % a step)
FP8LEAN_CONFIG='{"options": {"passes": ["lora", "attention", "masked_attention", "loss"],
  "fp8_dx": true, "fp8_copies": false, "drop_logits": true,
  "inductor": {"triton.cudagraphs": true}}, "env": {"LORAFUSE_LOSS_IMPL": "torch"}}'
FP8LEANTK_CONFIG='{"options": {"passes": ["lora", "attention", "masked_attention", "loss"],
  "fp8_dx": true, "fp8_copies": false, "drop_logits": true,
  "inductor": {"triton.cudagraphs": true}}}'
# fp8leantk with the rope pass (rope mode, session 32: the op alone was 2.1 x Inductor on
# the GPU with q/k laid out as the model's attention gives them)
FP8LEANROPE_CONFIG='{"options": {"passes": ["lora", "attention", "masked_attention", "loss", "rope"],
  "fp8_dx": true, "fp8_copies": false, "drop_logits": true,
  "inductor": {"triton.cudagraphs": true}}}'
QMEM_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "dequant_matmul"],
  "checkpoint_layers": true, "offload_activations": true, "drop_logits": true}}'
QMEM2_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "dequant_matmul"],
  "checkpoint_layers": true, "offload_activations": true, "drop_logits": true, "offload_prefetch": 2}}'
# qck under CUDA graphs with the capturable offload ops (the bf16 ckfp8rrcg2 ran 1.30 x
# Unsloth at 16.26 GiB in session 34, where the eager ck family is host-bound), with rope
# and offload_prefetch 2 as there; not run yet
QMEMCG_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "dequant_matmul", "rope"],
  "checkpoint_layers": true, "offload_activations": true, "drop_logits": true, "offload_prefetch": 2,
  "inductor": {"triton.cudagraphs": true}}}'
Q4_CONFIG='{"options": {"passes": ["lora", "attention", "loss", "dequant_matmul"], "drop_logits": true}}'
# bench_context's tags: a tag keeps its configuration for as long as its results file lives
CONTEXT_CONFIGS=(
  --lorafuse-config 'b0l={"options":{"passes":["lora","attention","loss"],"memory_budget":0.0}}'
  --lorafuse-config 'b0d={"options":{"passes":["lora","attention","loss"],"memory_budget":0.0,"drop_logits":true}}'
  --lorafuse-config 'ck={"options":{"passes":["lora","attention","loss"],"checkpoint_layers":true,"offload_activations":true,"drop_logits":true}}'
  --lorafuse-config 'ckf={"options":{"passes":["lora","attention","loss"],"checkpoint_layers":"full","offload_activations":true,"drop_logits":true}}'
  # ck's options after session 25's change (the post-attention residual kept): a new tag,
  # so that the table tells the two codes apart
  --lorafuse-config 'ck2={"options":{"passes":["lora","attention","loss"],"checkpoint_layers":true,"offload_activations":true,"drop_logits":true}}'
  --lorafuse-config 'ckft={"options":{"passes":["lora","tiled_mlp","attention","loss"],"checkpoint_layers":"full","offload_activations":true,"drop_logits":true}}'
)

budget_left() {  # seconds left for the next step, minus a reserve for the final printing
    if [ "$BUDGET_S" -gt 0 ]; then echo $(( BUDGET_S - SECONDS - 15 )); else echo 0; fi
}

run_tests() {  # run_tests [pytest-only]
    [ "${SKIP_TESTS:-0}" = 1 ] && return
    local t=${TEST_TIMEOUT:-150}
    if "$PY" -c "import pytest" 2>/dev/null; then
        say "pytest -m cuda (timeout ${t}s)"
        # SIGINT first: pytest then still prints which tests failed and why. A test stuck
        # in C code ignores SIGINT (session 7: a Triton compile that never finished) and its
        # buffered output dies with it: faulthandler dumps every thread's stack to the log
        # after 180 s in one test.
        # PYTEST_K goes to -k as one argument (session 10: "-k 'a or b'" inside PYTEST_ARGS
        # split on its spaces, and pytest ran nothing). -rP: passing tests' prints (the
        # times, paths and peaks bench/RESULTS.md records) reach the log too (session 13
        # lost them); -rs: why each skipped test skipped (session 24 could not tell which of
        # its 8 tests had); no:logging keeps torch's captured debug logs out of it.
        local select=(); [ -n "${PYTEST_K:-}" ] && select=(-k "$PYTEST_K")
        # shellcheck disable=SC2086
        timeout -s INT -k 30 "$t" "$PY" -m pytest -m cuda -q -rfEPs -p no:logging --tb=short \
            -o faulthandler_timeout=180 ${PYTEST_ARGS:-} "${select[@]}" > "$OUTDIR/pytest_cuda.log" 2>&1
        local rc=$?
        grep -E "^(FAILED|ERROR|SKIPPED) |passed|failed" "$OUTDIR/pytest_cuda.log" | tail -n 25
        case $rc in
            0) line="passed" ;;
            5) line="no cuda tests collected (exit 5)" ;;
            124|130|2) line="TIMEOUT or interrupted after ${t}s (exit $rc)" ;;
            *) line="FAILED (exit $rc)" ;;
        esac
        echo "- pytest -m cuda: $line — $(tail -n 1 "$OUTDIR/pytest_cuda.log")" >> "$SUMMARY"
    else
        echo "- pytest -m cuda: pytest not installed here" >> "$SUMMARY"
    fi
    [ "${1:-}" = pytest-only ] && return
    if [ -f bench/bench_lora_op.py ]; then
        t=${OP_TIMEOUT:-100}
        say "bench/bench_lora_op.py (timeout ${t}s)"
        timeout "$t" "$PY" bench/bench_lora_op.py > "$OUTDIR/bench_lora_op.log" 2>&1
        local rc=$?
        { echo; echo "### bench_lora_op.py (exit $rc$([ $rc = 124 ] && echo ', TIMEOUT'))";
          echo; tail -n 40 "$OUTDIR/bench_lora_op.log"; echo; } >> "$SUMMARY"
    else
        echo "- bench/bench_lora_op.py: not present" >> "$SUMMARY"
    fi
}

run_op_benches() {  # the other kernel families against cuBLAS / Inductor / Liger, 8B shapes
    local script t rc
    for script in ${OPS:-bench_fwd_gemm.py bench_nf4_gemm.py bench_elementwise.py bench_mlp_fold.py bench_attention.py bench_softcap_attention.py bench_op_host.py}; do
        t=${OP_TIMEOUT:-100}
        # the flash kernels autotune ~19 configs per shape: 100 s covered 10 of its rows
        [ "$script" = bench_softcap_attention.py ] && t=${OP_TIMEOUT:-240}
        # 12 rows of Inductor compiles at 8B sizes (estimate)
        [ "$script" = bench_fp8_dx.py ] && t=${OP_TIMEOUT:-240}
        # three norms × up to 16 rows × 4 variants, an Inductor compile per row (estimate)
        [ "$script" = bench_norm.py ] && t=${OP_TIMEOUT:-300}
        # five variants at the 8B head, an fp32 reference first (estimate)
        [ "$script" = bench_loss.py ] && t=${OP_TIMEOUT:-150}
        say "bench/$script (timeout ${t}s)"
        timeout "$t" "$PY" "bench/$script" > "$OUTDIR/${script%.py}.log" 2>&1
        rc=$?
        { echo; echo "### $script (exit $rc$([ $rc = 124 ] && echo ', TIMEOUT'))";
          echo; tail -n 30 "$OUTDIR/${script%.py}.log"; echo; } >> "$SUMMARY"
    done
}

run_train() {  # run_train NAME ARGS...
    local name=$1; shift
    local left; left=$(budget_left)
    if [ "$BUDGET_S" -gt 0 ] && [ "$left" -lt 90 ]; then
        say "skipping bench_train $name: ${left}s left"
        echo "- bench_train $name: skipped, ${left}s of the budget left" >> "$SUMMARY"
        return
    fi
    local q=""; [ "${QLORA:-0}" = 1 ] && q="--qlora" && name="${name}_qlora"
    local v=""; [ -n "${VARIANTS:-}" ] && v="--variants $VARIANTS"
    say "bench_train $name: $* $q $v ${EXTRA:-} (budget ${left}s)"
    # stdout (the tables) to .out; stderr (progress) to .log, its "[bench" lines to the console
    # shellcheck disable=SC2086
    "$PY" bench/bench_train.py "$@" $q $v --cache "$CACHE" --time-budget "$left" \
        --json "$OUTDIR/train_$name.json" --md "$OUTDIR/train_$name.md" ${EXTRA:-} \
        2>&1 > "$OUTDIR/train_$name.out" | tee "$OUTDIR/train_$name.log" \
        | grep --line-buffered -F "[bench "
    local rc=${PIPESTATUS[0]}
    if [ -s "$OUTDIR/train_$name.md" ]; then
        { echo; cat "$OUTDIR/train_$name.md"; } >> "$SUMMARY"
    else
        { echo; echo "### bench_train $name: no tables (exit $rc); last lines of its log:";
          tail -n 15 "$OUTDIR/train_$name.log"; } >> "$SUMMARY"
    fi
}

for MODE_ONE in ${MODE//,/ }; do
case "$MODE_ONE" in
    quick)
        TEST_TIMEOUT=${TEST_TIMEOUT:-120} OP_TIMEOUT=${OP_TIMEOUT:-90} run_tests
        run_train 1b --shape 1b --warmup 2 --steps 8 --ref --ref-steps 1,5,10 \
            --variants eager,inductor,lorafuse ;;
    1b)
        run_train 1b --shape 1b --ref --variants eager,eager_gc,inductor,lorafuse ;;
    8b)
        run_train 8b --shape 8b --steps 10 --ref --ref-steps 1,5,9,13 \
            --variants eager,inductor,lorafuse ;;
    fp8)
        run_train 8b_fp8 --shape 8b --warmup 2 --steps 8 --no-ref \
            --variants lorafuse:fp8cg,unsloth,inductor,lorafuse:fp8 \
            --lorafuse-config "fp8=$FP8_CONFIG" --lorafuse-config "fp8cg=$FP8CG_CONFIG" \
            --lorafuse-config "fp8lean=$FP8LEAN_CONFIG" --lorafuse-config "fp8leantk=$FP8LEANTK_CONFIG" ;;
    fp8ref)
        run_train 8b_fp8ref --shape 8b --warmup 2 --steps 18 --ref --ref-steps 1-20 \
            --ref-variants eager,lorafuse:fp8,lorafuse:fp8cg,lorafuse:fp8lean,lorafuse:fp8leantk \
            --variants eager,lorafuse:fp8 --lorafuse-config "fp8=$FP8_CONFIG" \
            --lorafuse-config "fp8cg=$FP8CG_CONFIG" --lorafuse-config "fp8lean=$FP8LEAN_CONFIG" \
            --lorafuse-config "fp8leantk=$FP8LEANTK_CONFIG" ;;
    fp8bar)
        run_train 8b_fp8bar --shape 8b --warmup 2 --steps 18 --ref --ref-steps 1-20 \
            --ref-variants eager,lorafuse:fp8cg --variants eager,lorafuse:fp8cg,unsloth,inductor \
            --lorafuse-config "fp8cg=$FP8CG_CONFIG" ;;
    qwen3)
        run_train qwen3_8b --shape qwen3-8b --warmup 2 --steps 8 --no-ref \
            --variants lorafuse:cg,lorafuse:cgnorm,inductor,unsloth \
            --lorafuse-config "cg=$CG_CONFIG" --lorafuse-config "cgnorm=$CGNORM_CONFIG" ;;
    rope)
        run_train 8b_rope --shape 8b --warmup 2 --steps 8 --no-ref \
            --variants lorafuse:fp8leantk,lorafuse:fp8leanrope \
            --lorafuse-config "fp8leantk=$FP8LEANTK_CONFIG" --lorafuse-config "fp8leanrope=$FP8LEANROPE_CONFIG" ;;
    memory)
        run_train 8b_memory --shape 8b --warmup 2 --steps 6 --no-ref \
            --variants lorafuse:ck,lorafuse:mem,unsloth_gc --lorafuse-config "mem=$MEMORY_CONFIG" \
            --lorafuse-config "ck=$CHECKPOINT_CONFIG" --lorafuse-config "ck0=$CHECKPOINT0_CONFIG" \
            --lorafuse-config "ckfp8=$CKFP8_CONFIG" --lorafuse-config "ckp2=$CHECKPOINTP2_CONFIG" \
            --lorafuse-config "ckfp8cg=$CKFP8CG_CONFIG" --lorafuse-config "ckfp8r=$CKFP8R_CONFIG" \
            --lorafuse-config "ckfp8r2=$CKFP8R2_CONFIG" --lorafuse-config "ckfp8rr=$CKFP8RR_CONFIG" \
            --lorafuse-config "ckfp8rcg=$CKFP8RCG_CONFIG" --lorafuse-config "ckfp8rrcg=$CKFP8RRCG_CONFIG" \
            --lorafuse-config "ckfp8rrcg2=$CKFP8RRCG2_CONFIG" ;;
    memref)
        run_train 8b_memref --shape 8b --warmup 2 --steps 18 --ref --ref-steps 1-20 \
            --ref-variants eager,lorafuse:ck,lorafuse:mem,lorafuse:ckfp8,lorafuse:ckfp8cg,lorafuse:ckfp8r,lorafuse:ckfp8r2,lorafuse:ckfp8rr,lorafuse:ckfp8rcg,lorafuse:ckfp8rrcg,lorafuse:ckfp8rrcg2 \
            --variants eager,lorafuse:ck,lorafuse:mem --lorafuse-config "mem=$MEMORY_CONFIG" \
            --lorafuse-config "ck=$CHECKPOINT_CONFIG" --lorafuse-config "ckfp8=$CKFP8_CONFIG" \
            --lorafuse-config "ckfp8cg=$CKFP8CG_CONFIG" --lorafuse-config "ckfp8r=$CKFP8R_CONFIG" \
            --lorafuse-config "ckfp8r2=$CKFP8R2_CONFIG" --lorafuse-config "ckfp8rr=$CKFP8RR_CONFIG" \
            --lorafuse-config "ckfp8rcg=$CKFP8RCG_CONFIG" --lorafuse-config "ckfp8rrcg=$CKFP8RRCG_CONFIG" \
            --lorafuse-config "ckfp8rrcg2=$CKFP8RRCG2_CONFIG" ;;
    qcg)
        QLORA=1 run_train 8b_cg --shape 8b --warmup 3 --steps 8 --no-ref \
            --variants lorafuse:cg,inductor,unsloth_gc --lorafuse-config "cg=$CG_CONFIG" ;;
    qmem)
        BENCH_PROFILE_HOST=1 QLORA=1 run_train 8b_qmem --shape 8b --warmup 2 --steps 8 --no-ref --profile 2 \
            --variants lorafuse:qck,unsloth_gc,lorafuse:qck2 --lorafuse-config "qck=$QMEM_CONFIG" \
            --lorafuse-config "qck2=$QMEM2_CONFIG" --lorafuse-config "qckcg=$QMEMCG_CONFIG" ;;
    qref)
        QLORA=1 run_train 8b_qref --shape 8b --warmup 2 --steps 18 --ref --ref-steps 1-20 \
            --variants eager,lorafuse,lorafuse:q4 --lorafuse-config "q4=$Q4_CONFIG" ;;
    context)
        left=$(budget_left)
        if [ "$BUDGET_S" -gt 0 ] && [ "$left" -lt 90 ]; then  # 0 would mean "no limit" there
            say "skipping bench_context: ${left}s left"
            echo "- bench_context: skipped, ${left}s of the budget left" >> "$SUMMARY"
            continue
        fi
        say "bench_context (budget ${left}s): ${CONTEXT_ARGS:=--variants unsloth_gc,lorafuse:ckf --seqs 1x16384,1x65536 --warmup 1 --steps 1 --caps 80}"
        # shellcheck disable=SC2086
        "$PY" bench/bench_context.py --shape 8b --cache "$CACHE" --time-budget "$left" \
            --resume "${CONTEXT_FILE:-bench/results/context_8b.json}" --json "$OUTDIR/context_8b.json" \
            --md "$OUTDIR/context_8b.md" --log-dir "$OUTDIR/context_8b_logs" \
            "${CONTEXT_CONFIGS[@]}" $CONTEXT_ARGS > "$OUTDIR/context_8b.out" 2>&1
        rc=$?
        grep -E "^\[context" "$OUTDIR/context_8b.out" | tail -n 20
        if [ -s "$OUTDIR/context_8b.md" ]; then { echo; cat "$OUTDIR/context_8b.md"; } >> "$SUMMARY"
        else { echo "- bench_context: no tables (exit $rc)"; tail -n 15 "$OUTDIR/context_8b.out"; } >> "$SUMMARY"; fi
        # one file for all the runs' logs: the device returns only a few files a command
        # (session 25 lost the log of lorafuse's default options at 32K that way)
        if [ -d "$OUTDIR/context_8b_logs" ]; then
            tar czf "$OUTDIR/context_8b_logs.tgz" -C "$OUTDIR" context_8b_logs && rm -rf "$OUTDIR/context_8b_logs"
        fi
        echo "- copy $OUTDIR/context_8b.json to ${CONTEXT_FILE:-bench/results/context_8b.json} before the next command" >> "$SUMMARY" ;;
    ops)
        run_op_benches ;;
    full)
        run_tests
        run_op_benches
        run_train 1b --shape 1b --ref --variants eager,eager_gc,inductor,lorafuse
        run_train 8b --shape 8b --ref --variants eager,eager_gc,inductor,lorafuse ;;
    tests)  # the whole subset took ≈ 480 s of pytest in session 18 (4-bit tests included):
        # by default pytest gets what is left of the budget, not a fixed 450 s
        TEST_TIMEOUT=${TEST_TIMEOUT:-$(budget_left)} run_tests pytest-only ;;
    trainer)
        say "bench/bench_trainer.py (1B, eager and lorafuse through lorafuse finetune)"
        "$PY" bench/bench_trainer.py --cache "$CACHE" --json "$OUTDIR/trainer.json" \
            --md "$OUTDIR/trainer.md" ${QLORA:+$([ "$QLORA" = 1 ] && echo --qlora)} \
            > "$OUTDIR/trainer.out" 2> "$OUTDIR/trainer.log"
        rc=$?
        tail -n 4 "$OUTDIR/trainer.log"
        if [ -s "$OUTDIR/trainer.md" ]; then { echo; cat "$OUTDIR/trainer.md"; } >> "$SUMMARY"
        else echo "- bench_trainer: no table (exit $rc); see trainer.log" >> "$SUMMARY"; fi
        for f in /tmp/lorafuse_bench_trainer/*.log; do
            [ -f "$f" ] && cp "$f" "$OUTDIR/trainer_$(basename "$f")"; done ;;
    smoke)
        run_train tiny --shape tiny --device cpu --warmup 1 --steps 3 --ref-steps 1,4 \
            --variants eager,lorafuse ;;
esac
done

echo
echo "================================================================ summary ($MODE)"
echo "- commit $COMMIT, $(date '+%Y-%m-%d %H:%M'), ${SECONDS}s; $BACKEND_NOTE"
cat "$SUMMARY"
