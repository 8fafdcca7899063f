"""Graph rewrites on Dynamo's torch-level FX graph, one pass per module.

Each pass exposes ``NAME`` and ``run(gm, report)``; it rewrites the sites it can
prove and records the rest in ``report.skipped`` with a reason.

``DEFAULT_PASSES`` are those measured faster than Inductor on the GPU (bench/RESULTS.md);
the others are there to be asked for with ``passes=(...)``: ``norm`` (fused RMSNorm: 2x
slower than Inductor's fused kernel at the 8B shape) and ``loss`` (chunked lm_head +
cross-entropy: 0.9 GiB less at the 8B shape, 4 % slower), and ``masked_attention``
(attention masks from the inputs checked at run time: not measured on the GPU yet), and
``dequant_matmul`` (bitsandbytes 4-bit linears + LoRA as one op: not measured on the GPU yet).
"""

from . import attention, dequant_matmul, lora, loss, masked_attention, norm

PASSES = {lora.NAME: lora.run, norm.NAME: norm.run, loss.NAME: loss.run, attention.NAME: attention.run,
          masked_attention.NAME: masked_attention.run, dequant_matmul.NAME: dequant_matmul.run}
DEFAULT_PASSES = (lora.NAME, attention.NAME)
