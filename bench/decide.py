"""How fast the generation loop's decider (``Processor.process_many``) runs alone, on bench/scale.py's data.

Everything ``take`` does to replies but the HTTP client and the writes: parsing, filters,
the exact ROUGE-L dedup against the pool, instance checks and records, in calls of
``--per-call`` replies (the loop's calls at ``--concurrency 64`` hold about 7 to 40).
Without the client and the server beside it, it is steadier than ``bench/scale.py``: run it
from two commits, interleaved; an exact change prints the same hash of every line decided.

    python bench/scale.py --sizes 100000 --skip-old --requests 2000   # builds the data once (cached)
    python bench/decide.py 100000
    python bench/decide.py 100000 --per-call 10 --hold   # as the loop calls it (Processor.feed)
    PYTHONPATH=/path/to/other/checkout python bench/decide.py 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "scale"


def decider(pool_size: int, requests: int | None = None, replies: int | None = None):
    """generate's Processor over bench/scale.py's cached pool of ``pool_size``, and its replies file's
    first ``replies`` replies as Responses (all when None); ``requests``: that file's count."""
    from itertools import islice

    from selfinstruct import generate
    from selfinstruct.prompts import load_templates
    from selfinstruct.records import Reply, Response, Usage
    from selfinstruct.seeds import load_seeds

    requests = requests or (1000 if pool_size >= 1_000_000 else 2000)
    seeds_file, replies_file = CACHE / f"pool-{pool_size}-0.jsonl", CACHE / f"replies-{pool_size}-{requests}-0.jsonl"
    if not (seeds_file.exists() and replies_file.exists()):
        raise SystemExit(f"no data for this pool: run bench/scale.py --sizes {pool_size} --requests {requests} first")
    cfg = generate.GenerateOptions(out="unused", num=10**9, nearest=3, tasks_per_request=15)
    pool = generate.Pool(load_seeds([seeds_file], compact=True), cfg.threshold, cfg.nearest_floor)
    proc = generate.Processor(cfg, pool, "instant", "http://127.0.0.1/v1", load_templates(None, "alpaca"))
    with open(replies_file) as f:
        resps = [Response(id=f"r{i}", index=i, mode="alpaca", prompt_hash="-", example_ids=[], created_at="-",
                          elapsed_s=0.0, replies=[Reply(purpose="tasks", text=json.loads(line), usage=Usage())])
                 for i, line in enumerate(islice(f, replies))]
    return proc, resps


def _as_in_the_loop():
    """The garbage collector as generate's loop has it (``generate._heap_frozen``; nothing for a
    checkout from before it, whose loop ran with Python's defaults)."""
    import contextlib

    from selfinstruct import generate

    return getattr(generate, "_heap_frozen", contextlib.nullcontext)()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pool", type=int, help="pool size bench/scale.py built (its pool-N-0.jsonl)")
    p.add_argument("--requests", type=int, default=None, help="its replies file's count (default: 2000, or 1000 at 1M)")
    p.add_argument("--per-call", type=int, default=20, help="replies per process_many call")
    p.add_argument("--hold", action="store_true",
                   help="as the loop calls it: each call's last group held back (Processor.feed), its pass run "
                        "by the index's other threads while the next call's replies are parsed")
    a = p.parse_args()

    proc, resps = decider(a.pool, a.requests)
    proc.process_many(resps[:5])  # the compiled code loaded and the pool's Bloom words made, as generate does
    digest, kept, seconds, cpu, own = hashlib.sha256(), 0, 0.0, 0.0, 0.0
    with _as_in_the_loop():
        for s in range(5, len(resps), a.per_call):
            t, c, o = time.perf_counter(), time.process_time(), time.thread_time()
            if a.hold:
                decided = proc.feed(resps[s : s + a.per_call], hold=True)
                if s + a.per_call >= len(resps):
                    decided += proc.feed([])
            else:  # process_many, which older checkouts have too
                decided = list(zip(resps[s : s + a.per_call], proc.process_many(resps[s : s + a.per_call])))
            seconds, cpu = seconds + time.perf_counter() - t, cpu + time.process_time() - c
            own += time.thread_time() - o
            for _, lines in decided:
                kept += len(lines[1][1])
                for _, records in lines:
                    for r in records:
                        digest.update(r.model_dump_json().encode())
    n = (len(resps) - 5) * 15
    print(f"pool {a.pool:,}: {kept:,} kept of {n:,}, lines {digest.hexdigest()[:16]}, "
          f"{n / seconds:,.0f} candidates/s ({1e6 * seconds / n:.0f} us each, {cpu / seconds:.2f} cores; "
          f"{1e6 * own / n:.0f} us of the calling thread's CPU each)")


if __name__ == "__main__":
    main()
