"""HF Trainer with and without lorafuse, as a user runs it: ``lorafuse finetune`` (a thin layer
over ``transformers.Trainer``) on the random-init 1B Llama shape of bench_train.py, once
eagerly (``--no-compile``) and once compiled by the lorafuse backend, each in its own process.

    python bench/bench_trainer.py [--shape 1b] [--steps 30] [--batch 4] [--seq 2048]
                                  [--json F] [--md F] [--qlora]

Each run trains on the same JSONL file of random full-length texts (so every row is
``--seq`` tokens, no padding); the table gives the CLI's own figures: tokens/s after the
first step (the first includes compiling), peak GPU memory, first and last loss.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the shapes and the saved random-init model)

DONE = re.compile(r"done: (?P<steps>\d+) steps in (?P<total>[\d.]+) s \(first step (?P<first>[\d.]+) s"
                  r".*?loss (?P<loss0>[\d.]+) → (?P<loss1>[\d.]+), (?P<tps>[\d,]+) tokens/s"
                  r".*?peak (?P<rss>RSS )?(?P<peak>[\d.]+) GiB")


def write_data(path: Path, n: int, words: int, vocab: int, seed: int) -> None:
    """``n`` lines of ``{"text": ...}``: ``words`` random tokens of the bench tokenizer each
    (word-level, one token per word), the CLI adding its own end-of-text token."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(words))})
                    + "\n")


def run_cli(name: str, model: Path, data: Path, out: Path, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lorafuse", "finetune", "--model", str(model), "--data", str(data),
           "--out", str(out / name), "--overwrite", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch), "--seq-len", str(args.seq), *extra]
    if args.qlora:
        cmd.append("--qlora")
    print(f"[bench_trainer] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    log = out / f"{name}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    match = DONE.search(proc.stdout)
    result = {"name": name, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1),
              "log": str(log)}
    if match:
        d = match.groupdict()
        result.update(steps=int(d["steps"]), first_step_s=float(d["first"]),
                      total_s=float(d["total"]), loss_first=float(d["loss0"]),
                      loss_last=float(d["loss1"]), tokens_per_s=int(d["tps"].replace(",", "")),
                      peak_gib=float(d["peak"]),
                      peak_of="CPU process RSS" if d["rss"] else "GPU max_memory_allocated")
    else:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        result["error"] = " | ".join(tail)
    print(f"[bench_trainer] {name}: {result}", file=sys.stderr, flush=True)
    return result


def render(args, commit: str, rows: list[dict]) -> str:
    lines = [f"### HF Trainer (`lorafuse finetune`), {args.shape} shape, batch {args.batch} × "
             f"{args.seq}, {args.steps} steps{', QLoRA' if args.qlora else ''} — commit `{commit}`",
             "", "| run | tokens/s after step 1 | peak GiB | first step s | loss first → last |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" in r:
            lines.append(f"| {r['name']} | {r['tokens_per_s']:,} | {r['peak_gib']:.2f} | "
                         f"{r['first_step_s']:.1f} | {r['loss_first']:.4f} → {r['loss_last']:.4f} |")
        else:
            lines.append(f"| {r['name']} | failed (exit {r['rc']}): {r.get('error', '')[:160]} | | | |")
    ok = {r["name"]: r for r in rows if "tokens_per_s" in r}
    if {"eager", "lorafuse"} <= ok.keys():
        e, f = ok["eager"], ok["lorafuse"]
        lines += ["", f"lorafuse / eager: {f['tokens_per_s'] / e['tokens_per_s']:.2f}× tokens/s, "
                      f"{f['peak_gib'] / e['peak_gib']:.2f}× peak memory"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[s for s in bench_train.SHAPES if s != "tiny"] + ["tiny"],
                   default="1b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--device", default="cuda", help="where the model is built (cuda; cpu for tiny)")
    p.add_argument("--cache", default="/tmp/lorafuse_bench")
    p.add_argument("--out", default="/tmp/lorafuse_bench_trainer")
    p.add_argument("--variants", default="eager,lorafuse")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json")
    p.add_argument("--md")
    args = p.parse_args()

    build = argparse.Namespace(shape=args.shape, cache=args.cache, seed=0, device=args.device)
    model = Path(bench_train.child_build(build)["path"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    # seq - 1 words and the CLI's end-of-text token: every row exactly --seq tokens
    write_data(data, args.steps * args.batch, args.seq - 1,
               bench_train.SHAPES[args.shape]["vocab_size"], seed=0)
    commit = bench_train.git_commit()
    rows = []
    for name in args.variants.split(","):
        extra = {"eager": ["--no-compile"], "lorafuse": []}[name]
        rows.append(run_cli(name, model, data, out, args, extra))
    md = render(args, commit, rows)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "commit": commit, "runs": rows},
                                              indent=1))
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
