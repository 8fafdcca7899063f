"""The README's first command, ``python -m lorafuse.demo``, runs and reports."""

import pytest

from lorafuse import demo


def test_corpus_is_deterministic_text():
    a, b = demo.make_corpus(500, seed=1), demo.make_corpus(500, seed=1)
    assert a == b and len(a) == 500 and a.decode().count(". ") > 5


@pytest.mark.slow
def test_demo_runs_and_losses_agree(capsys):
    assert demo.main(["--steps", "4", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert "lora: 14 matched" in cap.err  # the match report (verbose, on stderr)
    assert "tokens/s" in out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) >= 3
    for step, eager, fused, _ in rows:  # fp32 on CPU: the two runs agree tightly
        assert abs(float(eager) - float(fused)) < 1e-4, (step, eager, fused)
    assert float(rows[-1][1]) < float(rows[0][1])  # and it learns
