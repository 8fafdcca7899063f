"""Graph rewrites on Dynamo's torch-level FX graph, one pass per module.

Each pass exposes ``NAME`` and ``run(gm, report, **options)`` (``PASS_OPTIONS``: which
backend options it reads); it rewrites the sites it can prove and records the rest in
``report.skipped`` with a reason.

``DEFAULT_PASSES`` are those measured faster than Inductor on the GPU (bench/RESULTS.md):
``lora``, ``attention``, ``masked_attention`` (masks from the inputs, checked at run
time: at the 8B shape 1.13 × without it on unpadded batches with an attention_mask, 1.00 ×
on right-padded ones, 0.99 × on left-padded ones; sessions 14-15), and ``rope`` (q and k
rotated by one op, forward and backward: 2.1 × Inductor on the GPU alone, and the 8B step
with ``fp8_dx`` under CUDA graphs 1.019 × and 1.026 × faster with it in two runs, session
32). The others are asked for with ``passes=(...)``:

- ``norm``: fused RMSNorm and LayerNorm; faster than Inductor alone, slower behind the
  residual adds of a decoder layer (session 31); a Qwen3-8B step with it 0.994 × (session
  32).
- ``loss``: chunked lm_head + cross-entropy; 0.9 GiB less at the 8B shape, 4 % slower
  (session 2); with the ``drop_logits`` option the logits are not written either (1 GiB
  less again; its GPU test passes, session 8).
- ``dequant_matmul``: bitsandbytes 4-bit linears + LoRA as one op; on the 8B QLoRA step
  host-bound (252 ms of GPU time in a 314 ms step), so slower than the default passes;
  with Inductor's CUDA graphs as fast as the default passes without them (session 6).
- ``gated_mlp``: ``act(gate) * up`` as one op, act recomputed in the backward; 0.95 ×
  Inductor on the GPU alone (session 32).
- ``tiled_mlp`` (after ``lora``): a gated MLP whose projections the lora pass fused, run a
  chunk of ``tiled_mlp_tokens`` tokens at a time, keeping only its input for the backward;
  for long context; not measured on the GPU yet.
- ``eager_attention``: Gemma2's eager attention → flash attention; 7–16 % slower than
  Inductor's fused chain with a softcap at head dim 256 (session 6).
"""

from . import (attention, dequant_matmul, eager_attention, gated_mlp, lora, loss, masked_attention,
               norm, rope, tiled_mlp)

PASSES = {lora.NAME: lora.run, norm.NAME: norm.run, loss.NAME: loss.run, attention.NAME: attention.run,
          masked_attention.NAME: masked_attention.run, dequant_matmul.NAME: dequant_matmul.run,
          rope.NAME: rope.run, gated_mlp.NAME: gated_mlp.run,
          eager_attention.NAME: eager_attention.run, tiled_mlp.NAME: tiled_mlp.run}
DEFAULT_PASSES = (lora.NAME, attention.NAME, masked_attention.NAME, rope.NAME)
# the backend options a pass reads, passed to its run() as keyword arguments
PASS_OPTIONS = {loss.NAME: ("drop_logits",), tiled_mlp.NAME: ("tiled_mlp_tokens",),
                attention.NAME: ("passes",), lora.NAME: ("fp8_dx", "fp8_copies")}
