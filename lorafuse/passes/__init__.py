"""Graph rewrites on Dynamo's torch-level FX graph, one pass per module.

Each pass exposes ``NAME`` and ``run(gm, report)``; it rewrites the sites it can
prove and records the rest in ``report.skipped`` with a reason.
"""

from . import attention, lora, loss, norm

PASSES = {lora.NAME: lora.run, norm.NAME: norm.run, loss.NAME: loss.run, attention.NAME: attention.run}
DEFAULT_PASSES = tuple(PASSES)
