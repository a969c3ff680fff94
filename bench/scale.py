"""How many candidates per second one coordinator sustains, with a big pool already kept.

The whole ``selfinstruct generate`` loop, fsync on, against an instant local
OpenAI-compatible server (``bench/instant_server.py``, its own process), so only our
side is timed: request, parse, filters, exact ROUGE-L dedup against the pool, record
building, group commit. The pool is given as ``--seeds`` (a large Alpaca JSONL), so
every candidate is checked against all of it.

For each pool size the same replies go through the new pruned index and the old
full-scan one (``FullScanIndex``), each in a fresh process; the old one gets fewer
replies at large pools (it would take hours) and its rate is per candidate all the same.
Instructions are shaped like real ones (long, templated, multi-sentence ones mixed with
short ones and near-repeats; see ``real_shape``), and so are the candidates in the
replies: fresh ones and near-repeats of what the pool holds.

    python bench/scale.py                      # pools of 10K and 100K
    python bench/scale.py --sizes 1000000      # 1M (building the data takes minutes; cached)

Prints, per pool and index: candidates, loop seconds, candidates/s, startup seconds
(seeds loaded, index built), peak RSS of the generate process, the loop's CPU per
candidate over all its processes (the server's included) with the rate the machine's
cores allow at that cost, and new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "scale"
TASKS_PER_REPLY = 15


def instruction_stream(n: int, seed: int) -> list[str]:
    """n instructions of real-world shape (see bench/real_shape.py), the same for the same seed."""
    sys.path.insert(0, str(HERE))
    from real_shape import instructions

    return instructions(n, seed=seed)


def build_data(size: int, replies: int, seed: int = 0) -> tuple[Path, Path]:
    """(pool seeds file, replies file), cached: the pool's ``size`` instructions as Alpaca
    JSONL, then ``replies`` teacher replies of TASKS_PER_REPLY tasks continuing the stream."""
    CACHE.mkdir(parents=True, exist_ok=True)
    seeds = CACHE / f"pool-{size}-{seed}.jsonl"
    answers = CACHE / f"replies-{size}-{replies}-{seed}.jsonl"
    if seeds.exists() and answers.exists():
        return seeds, answers
    texts = instruction_stream(size + replies * TASKS_PER_REPLY, seed)
    rng = random.Random(seed)
    with open(seeds.with_suffix(".tmp"), "w") as f:
        for t in texts[:size]:
            f.write(json.dumps({"instruction": t, "input": "", "output": f"An answer about {t.split()[-1]}"}) + "\n")
    os.replace(seeds.with_suffix(".tmp"), seeds)
    rest = texts[size:]
    with open(answers.with_suffix(".tmp"), "w") as f:
        for r in range(replies):
            blocks = []
            for t in rest[r * TASKS_PER_REPLY : (r + 1) * TASKS_PER_REPLY]:
                inp = "<noinput>" if rng.random() < 0.6 else f"The {rng.choice(t.split())} case, seen from {r}."
                blocks.append(f"###\nInstruction: {t}\nInput: {inp}\nOutput: A worked answer for case {r}: "
                              f"{' '.join(rng.sample(t.split(), min(8, len(t.split()))))}.\n")
            f.write(json.dumps("".join(blocks)) + "\n")
    os.replace(answers.with_suffix(".tmp"), answers)
    return seeds, answers


# Self-instruct mode's follow-up prompts, told apart by a line of their templates (prompts/).
ROUTES = {"classify": "Is this a classification task? Answer Yes or No.",
          "input_first": "Write examples for the task below.",
          "output_first": "First list its possible class labels"}


def self_instruct_data(size: int, replies: int, seed: int = 0) -> tuple[Path, Path, dict[str, Path]]:
    """(pool, first replies, follow-up replies by route) for ``--mode self-instruct``: the same
    instructions as ``build_data``'s replies, as "Task N:" lists; classifications (one Yes in
    five), and instances of each kind, used in turn."""
    seeds, alpaca = build_data(size, replies, seed)
    firsts = CACHE / f"self-instruct-{size}-{replies}-{seed}.jsonl"
    follow = {name: CACHE / f"self-instruct-{name}.jsonl" for name in ROUTES}
    rng = random.Random(seed)
    with open(alpaca) as f, open(firsts.with_suffix(".tmp"), "w") as out:
        for line in f:
            tasks = [b.split("\nInput:")[0] for b in json.loads(line).split("###\nInstruction: ")[1:]]
            out.write(json.dumps("".join(f"Task {9 + k}: {t}\n" for k, t in enumerate(tasks))) + "\n")
    os.replace(firsts.with_suffix(".tmp"), firsts)
    words = [w for line in open(alpaca) for w in json.loads(line).split()[:40]]
    pick = lambda n: " ".join(rng.sample(words, n))  # noqa: E731
    rows = {"classify": ["No", "No", "Yes", "No", "No"],
            "input_first": [f"Example 1\nInput: <noinput>\nOutput: {pick(12)}.\nExample 2\nInput: {pick(6)}.\n"
                            f"Output: {pick(10)}.\n" for _ in range(50)],
            "output_first": [f"Class label: positive\nInput: {pick(9)}.\nClass label: negative\nInput: {pick(9)}.\n"
                             for _ in range(50)]}
    for name, path in follow.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return seeds, firsts, follow


class InstantServer:
    """bench/instant_server.py as a child process on 127.0.0.1."""

    def __init__(self, replies: Path, key: str, follow: dict[str, Path] | None = None):
        routes = [f"--route={ROUTES[name]}={path}" for name, path in (follow or {}).items()]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "instant_server.py"), "--port", "0", f"--key={key}", "--replies", str(replies),
             *routes],
            stdout=subprocess.PIPE, text=True,
        )
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise SystemExit(f"instant server did not start: {self.base_url!r}")

    def cpu_s(self) -> float:
        """The server's CPU seconds so far (user + system, from /proc): it shares the machine's cores."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def child(index: str, argv: list[str]) -> int:
    """Run generate in this process, with the chosen index class in the pool."""
    from selfinstruct import rouge
    from selfinstruct.cli import main

    if index == "fullscan":
        rouge.RougeLIndex = rouge.FullScanIndex  # generate's Pool looks the class up when it starts
    return main(["generate", *argv])


def run_generate(cmd: list[str], env: dict, out: Path, cwd: Path | None = None, what: str = "generate",
                 usage_out: dict | None = None) -> tuple[dict, float, float]:
    """Run a generate process to its end: its stats.json, wall seconds and peak RSS in MB (its
    error output, when it wrote no stats.json); ``usage_out`` gets its CPU seconds (user + system,
    its threads and the sender processes it waited for)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    stats_path = out / "stats.json"
    if not stats_path.exists():
        raise SystemExit(f"{what}: generate failed (status {status}):\n{err[-2000:]}")
    if usage_out is not None:
        usage_out["cpu_s"] = usage.ru_utime + usage.ru_stime
    return json.loads(stats_path.read_text()), wall, usage.ru_maxrss / 1024


def run_one(index: str, seeds: Path, server: InstantServer, key: str, requests: int, work: Path,
            mode: str = "alpaca", client_processes: int = 0) -> dict:
    out = work / f"run-{index}-{time.monotonic_ns()}"
    argv = ["--seeds", str(seeds), "--base-url", server.base_url, "--model", "instant", "--out", str(out),
            "--num", "100000000", "--max-requests", str(requests), "--tasks-per-request", str(TASKS_PER_REPLY),
            "--concurrency", "64", "--no-progress", "--nearest", "3", "--mode", mode,
            # The instant server cuts a reply at max_tokens (in words): the default 1,024 would cut
            # 41% of these 15-task replies (about 1,000 words), another workload than the one measured.
            "--max-tokens", "4096"]
    if client_processes:
        argv += ["--client-processes", str(client_processes)]
    env = {**os.environ, "SELFINSTRUCT_API_KEY": key}
    usage, server_before = {}, server.cpu_s()
    stats, wall, rss_mb = run_generate([sys.executable, __file__, "--child", index, "--", *argv], env, out, what=index,
                                       usage_out=usage)
    loop = stats["last_session"]["loop_s"]
    # CPU a candidate over every process of the loop (generate, its senders, the server): what the
    # cores must supply, so cores / this bounds candidates/s however well the work overlaps. The
    # generate process's time outside its loop (startup, the last stats and data.json) is single-
    # threaded, so it is taken out at one core a second (an estimate, said so in the table).
    server_cpu = server.cpu_s() - server_before
    loop_cpu = usage["cpu_s"] - (wall - loop) + server_cpu
    return {
        "index": index, "candidates": stats["candidates"], "kept": stats["kept"], "loop_s": loop,
        "per_s": stats["candidates"] / loop if loop else float("nan"), "process_s": wall,
        "cpu_us": 1e6 * loop_cpu / stats["candidates"] if stats["candidates"] else float("nan"),
        "server_cpu_us": 1e6 * server_cpu / stats["candidates"] if stats["candidates"] else float("nan"),
        "startup_s": stats["last_session"]["startup_s"], "rss_mb": rss_mb,
        "connection_faults": stats.get("faults", {}).get("connection", 0), "faults": sum(stats.get("faults", {}).values()),
        "commits": stats["last_session"]["commits"], "requests": sum(v["requests"] for v in stats["servers"].values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="pool sizes")
    p.add_argument("--requests", type=int, default=1000, help="replies through the new index per size (x15 candidates)")
    p.add_argument("--old-candidates", type=int, default=3000,
                   help="about this many candidates through the full-scan index per size (fewer replies at big pools)")
    p.add_argument("--skip-old", action="store_true", help="only the new index")
    p.add_argument("--mode", choices=["alpaca", "self-instruct"], default="alpaca",
                   help="self-instruct: the same instructions as \"Task N:\" lists, each kept one followed by "
                        "a classification and an instances request (the server answers each kind in turn)")
    p.add_argument("--client-processes", type=int, default=0, help="generate's --client-processes")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--child", choices=["new", "fullscan"], help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.exit(child(a.child, a.rest))

    import secrets

    key = secrets.token_urlsafe(12)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for size in a.sizes:
            t = time.monotonic()
            follow = None
            if a.mode == "self-instruct":
                seeds, replies, follow = self_instruct_data(size, a.requests)
            else:
                seeds, replies = build_data(size, a.requests)
            print(f"pool {size:,}: data ready in {time.monotonic() - t:.0f} s", flush=True)
            with InstantServer(replies, key, follow) as server:
                new = run_one("new", seeds, server, key, a.requests, Path(tmp), a.mode, a.client_processes)
                new["pool"] = size
                rows.append(new)
                print(json.dumps(new), flush=True)
                if not a.skip_old:
                    # Scale the old index's share down with the pool: its cost per candidate grows with it.
                    req = max(4, min(a.requests, a.old_candidates // TASKS_PER_REPLY))
                    old = run_one("fullscan", seeds, server, key, req, Path(tmp), a.mode)
                    old["pool"] = size
                    rows.append(old)
                    print(json.dumps(old), flush=True)
    print()
    print(f"{'pool':>10} {'index':>9} {'candidates':>10} {'requests':>9} {'loop s':>8} {'cand/s':>9} {'startup s':>9} "
          f"{'peak RSS MB':>11} {'conn faults':>11} {'CPU us/cand':>11} {'cap/s':>7}")
    cores = len(os.sched_getaffinity(0))
    for r in rows:
        print(f"{r['pool']:>10,} {r['index']:>9} {r['candidates']:>10,} {r['requests']:>9,} {r['loop_s']:>8.1f} {r['per_s']:>9,.0f} "
              f"{(r['startup_s'] or 0):>9.1f} {r['rss_mb']:>11,.0f} {r['connection_faults']:>11} {r['cpu_us']:>11,.0f} "
              f"{cores * 1e6 / r['cpu_us']:>7,.0f}")
    print(f"CPU us/cand: CPU seconds of the loop over all its processes (generate, its request senders, the server; "
          f"generate's time outside the loop taken out at one core), per candidate. cap/s: {cores} cores / that, "
          "the most candidates/s this work allows however well it overlaps.")
    for size in a.sizes:
        pair = {r["index"]: r for r in rows if r["pool"] == size}
        if "fullscan" in pair:
            print(f"pool {size:,}: new/old candidates per second = {pair['new']['per_s'] / pair['fullscan']['per_s']:.1f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
