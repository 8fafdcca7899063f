"""The README's workflow snippets run as written on a CPU machine (issue 6's bar).

The code blocks of the sections "With the Hugging Face Trainer and TRL's SFTTrainer",
"Fine-tune from the command line" and "Export to GGUF (llama.cpp)" are taken from README.md
itself and run in a fresh directory, in README order, each section in its own process.
Left out, and why: usage lines with ``[optional]`` arguments, llama.cpp's own tools
(``llama-quantize``), and llama-cpp-python when it is not installed (its GGUF round trip
is tests/test_export.py's). What the snippets compute is checked elsewhere
(tests/test_trainer.py, test_workflow.py, test_cli.py, test_export.py); here, that they run
and leave the files they say they write. Also: the ``options`` dicts of the "Measured"
section's at-a-glance table are accepted by the backend as written.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def section(title: str) -> str:
    """The README text under the heading ``title`` up to the next heading of its level or
    above (lines inside fenced code, such as a script's ``# comment``, are not headings)."""
    lines = README.read_text().splitlines(keepends=True)
    start = level = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"(#+) (.*)$", line.rstrip("\n"))
        if m and start is None and m.group(2) == title:
            start, level = i + 1, len(m.group(1))
        elif m and start is not None and len(m.group(1)) <= level:
            return "".join(lines[start:i])
    assert start is not None, f"README has no heading {title!r}"
    return "".join(lines[start:])


def blocks(title: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks in a section, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section(title))]


def runnable(lang: str, code: str) -> bool:
    if "[--" in code or "llama-quantize" in code:  # usage lines; llama.cpp's own tool
        return False
    if "llama_cpp" in code and importlib.util.find_spec("llama_cpp") is None:
        return False
    return lang in ("python", "bash")


def run(cmd, cwd: Path, what: str) -> str:
    # `python` and `lorafuse` in the snippets: this interpreter and its scripts
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=path,
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(README.parent))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_blocks(found: list[tuple[str, str]], cwd: Path) -> None:
    """Consecutive Python blocks run as one script (later ones use earlier names, as the
    README says); a bash block runs on its own."""
    python: list[str] = []

    def flush():
        if python:
            script = cwd / f"snippet_{len(list(cwd.glob('snippet_*')))}.py"
            script.write_text("\n".join(python))
            run([sys.executable, str(script)], cwd, f"{script.name}:\n" + "\n".join(python)[:400])
            python.clear()

    for lang, code in found:
        if not runnable(lang, code):
            continue
        if lang == "python":
            python.append(code)
        else:
            flush()
            run(["bash", "-euo", "pipefail", "-c", code], cwd, f"bash:\n{code[:400]}")
    flush()


def test_trainer_section_runs_as_written(tmp_path):
    found = blocks("With the Hugging Face `Trainer` and TRL's `SFTTrainer`")
    assert [lang for lang, _ in found].count("python") >= 6, found  # setup, Trainer, resume, SFT…
    run_blocks(found, tmp_path)
    for path in ("out/checkpoint-3", "out/checkpoint-6", "adapter/adapter_model.safetensors",
                 "merged/model.safetensors"):
        assert (tmp_path / path).exists(), path


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
def test_command_line_and_export_sections_run_as_written(tmp_path):
    cli = blocks("Fine-tune from the command line")
    make_tiny = [code for lang, code in cli if lang == "python" and "# make_tiny.py" in code]
    assert len(make_tiny) == 1, cli
    (tmp_path / "make_tiny.py").write_text(make_tiny[0])  # a later block runs `python make_tiny.py`
    run_blocks([b for b in cli if b[1] != make_tiny[0]], tmp_path)
    run_blocks(blocks("Export to GGUF (llama.cpp)"), tmp_path)
    for path in ("tiny-adapter/adapter_model.safetensors", "tiny.gguf", "tiny-f16.gguf"):
        assert (tmp_path / path).exists(), path


def test_at_a_glance_options_are_accepted_as_written():
    """The dicts in the "options" column of "Measured"'s at-a-glance table are valid
    backend options, so a user can paste them (the table would otherwise drift from
    backend.Options unnoticed)."""
    import ast

    import lorafuse

    lines = section("Measured").splitlines()
    header = next(i for i, line in enumerate(lines)
                  if line.startswith("|") and "`options`" in line)
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("`options`")
    dicts = []
    for line in lines[header + 2:]:  # after the header and its |---| row
        if not line.startswith("|"):
            break  # the table ended
        cell = [c.strip() for c in line.strip("|").split("|")][column]
        dicts += [ast.literal_eval(code) for code in re.findall(r"`([^`]*)`", cell)
                  if code.startswith("{")]
    assert len(dicts) >= 2, dicts
    for options in dicts:
        lorafuse.Options.parse(options)
