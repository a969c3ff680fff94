"""A fingerprint of the ROUGE-L index's decisions, and its speed, on bench/scale.py's data.

Loads ``bench/scale.py``'s pool into ``RougeLIndex`` (threshold and floor 0.7), then
queries its replies' candidates in batches of 15, adding each one that is not a
duplicate, and prints how many were duplicates, a hash of every decision and
``nearest`` list, the milliseconds a candidate took, and the compiled pass's
(``rouge_jit.candidates``, bounds 3 and 5) summed over the threads a batch is split
over (with two threads it can exceed the whole). The pool's Bloom words and the
compiled code are loaded before the clock starts (``prepare``), as ``generate`` does.
Run it on two commits: an exact change to the index prints the same hash on both.

    python bench/scale.py --sizes 1000000 --skip-old   # builds the data once (cached)
    python bench/decisions.py 1000000 15000
    PYTHONPATH=/path/to/other/checkout python bench/decisions.py 1000000 15000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "scale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pool", type=int, help="pool size that bench/scale.py built (10000, 100000, 1000000)")
    parser.add_argument("candidates", type=int, help="how many of its replies' candidates to query")
    parser.add_argument("--requests", type=int, default=1000, help="the --requests its replies file was built with")
    args = parser.parse_args()

    from selfinstruct import rouge_jit
    from selfinstruct.rouge import RougeLIndex

    pool_file = CACHE / f"pool-{args.pool}-0.jsonl"
    replies_file = CACHE / f"replies-{args.pool}-{args.requests}-0.jsonl"
    if not pool_file.exists() or not replies_file.exists():
        raise SystemExit(f"no {pool_file.name} / {replies_file.name}: run bench/scale.py --sizes {args.pool} first")
    pool = [json.loads(line)["instruction"] for line in pool_file.open()]
    candidates: list[str] = []
    for line in replies_file.open():
        candidates += re.findall(r"Instruction: (.*)", json.loads(line))
    candidates = candidates[: args.candidates]

    index = RougeLIndex(0.7, floor=0.7)
    index.add_many(pool, range(len(pool)))
    index.prepare()
    compiled, kernel = [0.0], rouge_jit.candidates

    def timed(*args):  # RougeLIndex imports it at each query, so the wrapper is what it finds
        started = time.perf_counter()
        try:
            return kernel(*args)
        finally:
            compiled[0] += time.perf_counter() - started

    rouge_jit.candidates = timed
    digest, duplicates = hashlib.sha256(), 0
    t0 = time.perf_counter()
    for k in range(0, len(candidates), 15):
        batch = candidates[k : k + 15]
        for i, (text, match) in enumerate(zip(batch, index.query_many(batch, nearest=3))):
            digest.update(repr((match.duplicate, match.nearest)).encode())
            duplicates += match.duplicate
            if not match.duplicate:
                index.add(text, f"c{k + i}")
    per = (time.perf_counter() - t0) / max(1, len(candidates)) * 1e3
    print(f"pool {args.pool:,}: {duplicates} duplicates of {len(candidates):,}, "
          f"decisions {digest.hexdigest()[:16]}, {per:.2f} ms a candidate "
          f"({compiled[0] / max(1, len(candidates)) * 1e3:.2f} in the compiled pass, summed over threads)")


if __name__ == "__main__":
    main()
