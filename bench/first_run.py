"""The README's first command on the embedded teacher: today's defaults against the previous ones.

Runs ``selfinstruct generate --num N`` twice, one after the other on the same machine and
the bundled seeds: once with the embedded teacher's defaults (EMBEDDED_DEFAULTS), once
with the previous table given as flags. Prints wall time, prompts, kept, rejected and the
top reject reasons of each, and the time ratio previous/now. Each run has a time limit, so
a slow configuration ends as "stopped" with what it had kept.

    python bench/first_run.py                 # --num 20, as the README
    python bench/first_run.py --num 5 --limit 600
    python bench/first_run.py --structured --seeds 0 1 2   # --structured, once per --seed

With ``--structured`` it runs ``generate --structured`` on today's defaults once per
``--seed`` instead (the small model's yield varies from seed to seed) and prints the kept
per prompt of each run and of all together.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The embedded teacher's defaults before issue 13's second pass (2 tasks a prompt, 3+1
# examples, 320 tokens, one stop), with the two options it added turned off.
PREVIOUS = ["--tasks-per-request", "2", "--seed-examples", "3", "--machine-examples", "1", "--max-tokens", "320",
            "--stop", "###\n###", "--no-lead-word", "--no-continue-output"]


def run(label: str, out: Path, num: int, limit: float, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "selfinstruct.cli", "generate", "--num", str(num), "--out", str(out),
           "--no-progress", *flags]
    t0 = time.monotonic()
    try:
        subprocess.run(cmd, capture_output=True, timeout=limit, check=False)
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
    wall = time.monotonic() - t0

    def rows(name):
        path = out / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    reasons = collections.Counter(r["reason"].split(":")[0] for r in rows("rejected.jsonl"))
    return {"label": label, "wall_s": wall, "stopped": stopped, "prompts": len(rows("responses.jsonl")),
            "kept": len(rows("kept.jsonl")), "rejected": sum(reasons.values()), "top": reasons.most_common(3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=20, help="tasks to keep (default: 20, as the README)")
    p.add_argument("--limit", type=float, default=1800, help="seconds each run may take (default: 1800)")
    p.add_argument("--structured", action="store_true", help="measure --structured, once per --seeds value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --structured: the --seed of each run")
    args = p.parse_args(argv)
    if args.structured:
        return structured(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run("now", Path(tmp) / "now", args.num, args.limit, []),
                   run("previous", Path(tmp) / "previous", args.num, args.limit, PREVIOUS)]
    for r in results:
        top = ", ".join(f"{k} {v}" for k, v in r["top"])
        print(f"{r['label']:>9}: {r['wall_s']:6.0f} s{' (stopped)' if r['stopped'] else ''}  "
              f"prompts {r['prompts']:3d}  kept {r['kept']:3d}  rejected {r['rejected']:3d}  top: {top}")
    now, prev = results
    # A run stopped at --limit had not finished: its time is a lower bound, and so is the ratio.
    at_least = "at least " if prev["stopped"] and not now["stopped"] else ""
    print(f"previous/now wall time: {at_least}{prev['wall_s'] / now['wall_s']:.1f}x; kept a prompt: "
          f"{now['kept'] / max(1, now['prompts']):.2f} now, {prev['kept'] / max(1, prev['prompts']):.2f} previous")
    return 0


def structured(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(f"seed {s}", Path(tmp) / f"s{s}", args.num, args.limit, ["--structured", "--seed", str(s)])
                   for s in args.seeds]
    for r in results:
        top = ", ".join(f"{k} {v}" for k, v in r["top"])
        print(f"{r['label']:>9}: {r['wall_s']:6.0f} s{' (stopped)' if r['stopped'] else ''}  prompts {r['prompts']:3d}  "
              f"kept {r['kept']:3d}  kept a prompt {r['kept'] / max(1, r['prompts']):.2f}  top: {top}")
    kept, prompts = sum(r["kept"] for r in results), sum(r["prompts"] for r in results)
    print(f"--structured, all runs: {kept} kept of {prompts} prompts, {kept / max(1, prompts):.2f} a prompt; "
          f"lowest run {min(r['kept'] / max(1, r['prompts']) for r in results):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
