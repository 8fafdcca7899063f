"""``lorafuse.explain``: what the backend would rewrite in a model, without compiling it."""

from __future__ import annotations

import itertools

import torch

from ._torch import copy_graph
from .backend import Options, _run_passes
from .report import GraphReport, Report


def explain(model, *example_args, lorafuse_options=None, **example_kwargs) -> Report:
    """Capture ``model(*example_args, **example_kwargs)`` with Dynamo, run lorafuse's
    passes on each graph, print and return the report: per pass, the sites matched and
    those left alone with the reason. The graphs run eagerly as captured (no Inductor
    compile, not our ops), so this takes seconds; the memory plan appears in the log of a
    real compile.

    (The rewritten graph is not what runs: eagerly, the ambient autocast would reach our
    ops' implementations, which a compiled graph runs with autocast off, as AOTAutograd
    does; session 8 saw the loss op fail that way under CPU autocast.)"""
    opts = Options.parse(lorafuse_options)
    report, ids = Report(), itertools.count()

    def _explain_backend(gm, example_inputs):
        graph_report = GraphReport(next(ids))
        captured = torch.fx.GraphModule(gm, copy_graph(gm.graph))
        _run_passes(gm, opts, graph_report)
        report.graphs.append(graph_report)
        return captured.forward

    torch.compile(model, backend=_explain_backend)(*example_args, **example_kwargs)
    print(report)
    return report
