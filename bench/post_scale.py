"""Wall time and peak memory of the commands a user runs on a generation's output: export (each
format), dedup (rougeL, fuzzy, minhash), decontaminate and audit (the terminal summary, and with
the HTML report), on a run-shaped dataset.

The data (cached under bench/.cache/post_scale/): N Alpaca rows whose instructions are
bench/scale.py's pool (long templated ones and short ones; made up here when the pool is
absent), inputs on a third of them, outputs of 150 to 450 words; as kept.jsonl, as data.json
(an indented list) and as a run folder. Each command runs as a child process; its peak RSS is
the kernel's (``wait4``'s ru_maxrss). Run it from two checkouts to compare:

    python bench/post_scale.py 100000
    PYTHONPATH=/path/to/other/checkout python bench/post_scale.py 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
WORDS = ("the a of to and in is that for it as with was on be by this are from or an which at have not all but "
         "model data answer step each value result list first then when time number case function table write "
         "example point order water energy light city market history method system error test simple").split()


def build(n: int, pool: Path) -> Path:
    """The cached folder holding kept.jsonl, data.json, run/ and bench.jsonl for ``n`` rows."""
    folder = CACHE / "post_scale" / str(n)
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "." for _ in range(20_000)]
    instructions = _instructions(n, pool, rng)
    from selfinstruct.records import Instance, KeptRecord, Provenance, Usage

    prov = Provenance(teacher_model="teacher", base_url="http://127.0.0.1:1/v1", mode="alpaca",
                      sampling={"temperature": 0.7}, prompt_template="alpaca", prompt_hash="h", example_ids=["s1"],
                      response_id="r", usage=Usage(), created_at="2026-01-01T00:00:00Z", elapsed_s=0.5)
    (folder / "run").mkdir()
    from selfinstruct.datafiles import mark_run_folder

    mark_run_folder(folder / "run")
    with open(folder / "kept.jsonl", "w") as jl, open(folder / "data.json", "w") as js, \
            open(folder / "run" / "kept.jsonl", "w") as run:
        js.write("[")
        for i, instruction in enumerate(instructions):
            words = rng.randint(150, 450)
            out, count = [], 0
            while count < words:
                s = rng.choice(sentences)
                out.append(s)
                count += s.count(" ") + 1
            row = {"instruction": instruction, "input": rng.choice(sentences) if i % 3 == 0 else "",
                   "output": " ".join(out)}
            jl.write(json.dumps(row, ensure_ascii=False) + "\n")
            item = json.dumps(row, ensure_ascii=False, indent=2).replace("\n", "\n  ")
            js.write(("\n  " if not i else ",\n  ") + item)
            rec = KeptRecord(id=f"r{i}-0", instruction=instruction,
                             instances=[Instance(input=row["input"], output=row["output"])], provenance=prov)
            run.write(rec.model_dump_json() + "\n")
        js.write("\n]")
    with open(folder / "bench.jsonl", "w") as f:  # a small benchmark, a few of its questions copied into the data
        for i in range(2000):
            q = instructions[i * 37 % n] if i % 100 == 0 else " ".join(rng.choices(WORDS, k=30))
            f.write(json.dumps({"question": q, "answer": "x"}) + "\n")
    (folder / "done").write_text("")
    return folder


def _instructions(n: int, pool: Path, rng: random.Random) -> list[str]:
    """``n`` instructions: the pool's first ``n`` (unique, long and short), or made up."""
    out = []
    if pool.is_file():
        with open(pool) as f:
            for line in f:
                out.append(json.loads(line)["instruction"])
                if len(out) == n:
                    return out
    while len(out) < n:
        out.append(f"Task {len(out)}: " + " ".join(rng.choices(WORDS, k=rng.choice((8, 12, 40, 90)))))
    return out


def measure(cmd: list[str], limit: float, cwd: Path) -> tuple[float, float, float, int]:
    """(wall seconds, peak RSS in MB, peak anonymous RSS in MB, exit status) of one child process,
    stopped after ``limit`` seconds. The anonymous part (sampled from /proc every 0.1 s) leaves out
    the pages of a memory-mapped file, which RSS counts though the kernel may drop them at will."""
    import tempfile
    import threading

    t = time.perf_counter()
    err_file = tempfile.TemporaryFile()  # not a pipe: a child's progress bars would fill it and block
    # Not run from a checkout: `python -m` puts the working folder before PYTHONPATH.
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, cwd=cwd)
    timer = threading.Timer(limit, p.kill)  # fuzzy dedup compares every pair: hours at 100,000
    timer.start()
    anon = [0]

    def sample() -> None:
        while p.returncode is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("RssAnon:"):
                        anon[0] = max(anon[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    _, status, usage = os.wait4(p.pid, 0)
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    err_file.seek(0)
    err = err_file.read().decode(errors="replace").strip().splitlines()
    if p.returncode:
        print(f"  failed: {err[-1] if err else p.returncode}", file=sys.stderr)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, anon[0] / 1024, p.returncode


COMMANDS = {
    "export alpaca": ["export", "{src}", "--format", "alpaca", "--out", "{tmp}/o.json"],
    "export sharegpt": ["export", "{src}", "--format", "sharegpt", "--out", "{tmp}/o.json"],
    "export messages": ["export", "{src}", "--format", "messages", "--out", "{tmp}/o.jsonl"],
    "export jsonl": ["export", "{src}", "--format", "jsonl", "--out", "{tmp}/o.jsonl"],
    "export parquet": ["export", "{src}", "--format", "parquet", "--out", "{tmp}/o.parquet"],
    "export hf": ["export", "{src}", "--format", "hf", "--out", "{tmp}/hf"],
    "dedup rougeL": ["dedup", "{src}", "--out", "{tmp}/d"],
    "dedup fuzzy": ["dedup", "{src}", "--method", "fuzzy", "--out", "{tmp}/d"],
    "dedup minhash": ["dedup", "{src}", "--method", "minhash", "--out", "{tmp}/d"],
    "decontaminate": ["decontaminate", "{src}", "--against", "{bench}", "--out", "{tmp}/c"],
    "audit": ["audit", "{src}"],
    "audit html": ["audit", "{src}", "--html", "{tmp}/r.html", "--parser", "heuristic"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", type=int, help="rows (100000, 1000000)")
    p.add_argument("--source", choices=("kept.jsonl", "data.json", "run"), default="kept.jsonl")
    p.add_argument("--only", nargs="+", default=None, help="commands to run (default: all): 'export jsonl' ...")
    p.add_argument("--pool", type=Path, default=CACHE / "scale" / "pool-1000000-0.jsonl",
                   help="bench/scale.py's pool to take instructions from")
    p.add_argument("--limit", type=float, default=300, help="seconds a command may run (default: 300)")
    a = p.parse_args()
    folder = build(a.n, a.pool)
    src = folder / a.source
    size = sum(f.stat().st_size for f in src.rglob("*")) if src.is_dir() else src.stat().st_size
    print(f"{a.n:,} rows, {a.source} {size / 2**20:,.0f} MB; selfinstruct from "
          f"{os.environ.get('PYTHONPATH') or 'this checkout'}")
    tmp = CACHE / "post_scale" / f"out-{os.getpid()}"
    for name, args in COMMANDS.items():
        if a.only and name not in a.only:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cmd = [sys.executable, "-m", "selfinstruct.cli",
               *(x.format(src=src, tmp=tmp, bench=folder / "bench.jsonl") for x in args)]
        wall, rss, anon, rc = measure(cmd, a.limit, tmp)
        end = "" if not rc else "  (stopped)" if rc == -9 else f"  (exit {rc})"
        print(f"  {name:16} {wall:8.1f} s  {rss:8,.0f} MB peak RSS ({anon:,.0f} MB anonymous){end}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
