"""Generation-loop index benchmark: rouge.RougeLIndex against rouge.FullScanIndex, same pool, same stream.

For each pool size: build both indexes from realistic instructions (bench/real_shape.py),
then feed a stream of new candidates (fresh ones and near-repeats of the pool) in
batches of 16, as the loop does with one reply: ``query_many`` then ``add`` of the
ones that are not duplicates. Prints time per candidate (query + add), the ratio
full scan / ours, whether every answer agreed (duplicate flag, and the neighbours
above the floor), build time and peak RSS.

    python bench/index.py                           # 10k and 100k
    python bench/index.py --sizes 1000000 --stream 500 --full-sample 50
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from real_shape import instructions

from selfinstruct.rouge import FullScanIndex, Match, RougeLIndex


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(index, pool: list[str]) -> float:
    """Seconds to add the pool and answer a first query: the one-time costs (numba's import
    and compiled code, the Bloom words of the whole pool) belong to the build, not to the
    stream's per-candidate figure."""
    started = time.perf_counter()
    for i, text in enumerate(pool):
        index.add(text, f"p{i}")
    index.query(pool[0])
    return time.perf_counter() - started


def stream(index, candidates: list[str], batch: int = 16, k: int = 3) -> tuple[float, list[Match]]:
    """Seconds per candidate for query_many + add of the kept ones, and every answer."""
    answers = []
    started = time.perf_counter()
    for s in range(0, len(candidates), batch):
        texts = candidates[s : s + batch]
        matches = index.query_many(texts, nearest=k) if hasattr(index, "query_many") else [
            index.query(t, nearest=k) for t in texts]
        for j, (m, text) in enumerate(zip(matches, texts)):
            if not m.duplicate:
                index.add(text, f"c{s + j}")
        answers += matches
    return (time.perf_counter() - started) / len(candidates), answers


def above(m: Match, floor: float, k: int = 3) -> Match:
    """The full scan's answer as the floor defines it: the k best above the floor."""
    return Match(m.duplicate, [x for x in m.nearest if x[2] > floor][:k])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--stream", type=int, default=1000, help="candidates timed through our index")
    p.add_argument("--full-sample", type=int, default=300, help="candidates timed through the full scan")
    p.add_argument("--floors", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n in a.sizes:
        texts = instructions(n + a.stream, seed=a.seed)
        pool, cands = texts[:n], texts[n:]
        for floor in a.floors:
            ours = RougeLIndex(a.threshold, floor=floor)
            built = build(ours, pool)
            rss = peak_rss_mb()
            per, answers = stream(ours, cands)
            del ours
            rows.append((n, f"RougeLIndex floor {floor}", built, per, rss, answers, floor))
            print(f"done {n:,} floor {floor}: {per * 1e6:,.0f} us/candidate, load {os.getloadavg()[0]:.1f}", flush=True)
        full = FullScanIndex(a.threshold)
        built = build(full, pool)
        sample = cands[: a.full_sample]
        per, answers = stream(full, sample)
        rows.append((n, "FullScanIndex", built, per, peak_rss_mb(), answers, None))
        del full
        print(f"done {n:,} full scan: {per * 1e6:,.0f} us/candidate", flush=True)
    print("\n| pool | index | build s | us per candidate | full scan / ours | agrees with full scan | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for n, name, built, per, rss, answers, floor in rows:
        full_row = next(r for r in rows if r[0] == n and r[1] == "FullScanIndex")
        if floor is None:
            ratio, agree = "1.0", "-"
        else:
            m = len(full_row[5])
            same = all(above(f, floor) == o for f, o in zip(full_row[5], answers[:m]))
            ratio, agree = f"{full_row[3] / per:.1f}", f"{'yes' if same else 'NO'} ({m} candidates)"
        print(f"| {n:,} | {name} | {built:.1f} | {per * 1e6:,.0f} | {ratio} | {agree} | {rss:,.0f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
