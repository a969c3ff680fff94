"""What resuming a big run folder costs: startup seconds and peak RSS of a session that picks
up a run of hundreds of thousands of candidates, against a fresh session in the same sitting.

A run is made once (cached under bench/.cache/resume/): ``generate`` against bench/scale.py's
instant server (its real-shape replies, 15 tasks each, served in turn) with the repository's
seed tasks, ``--requests`` replies. Most candidates are then duplicates of ones kept before
(the replies repeat every 2,000), so rejected.jsonl is the big file, as in a long real run.
Then, each in a fresh process on a fresh copy of the run: a resume with ``--num 1`` (it checks
every file, reloads the pool and the index, replays the log, writes stats.json and data.json,
and stops), and a fresh session into an empty folder with the same seeds (``--num 1``).

    python bench/resume.py                    # 20,000 replies: 300,000 candidates (builds in ~2 min)
    python bench/resume.py --requests 60000   # 900,000
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from scale import InstantServer, build_data, run_generate  # noqa: E402


def session(out: Path, server: InstantServer, key: str, extra: list[str]) -> dict:
    """One ``generate`` process; its stats' last session, wall seconds and peak RSS."""
    cmd = [sys.executable, "-m", "selfinstruct.cli", "generate", "--seeds", str(ROOT / "seeds" / "seed_tasks.jsonl"),
           "--base-url", server.base_url, "--model", "instant", "--out", str(out), "--tasks-per-request", "15",
           "--concurrency", "64", "--no-progress", "--nearest", "3",
           "--max-tokens", "4096",  # the instant server cuts at max_tokens: 1,024 would cut 15-task replies
           *extra]
    # Run from beside the run folder: ``-m`` puts the working directory first on the path, and
    # PYTHONPATH=/other/checkout must choose which selfinstruct is measured.
    stats, wall, rss_mb = run_generate(cmd, {**os.environ, "SELFINSTRUCT_API_KEY": key}, out, cwd=out.parent)
    return {"wall_s": wall, "startup_s": stats["last_session"]["startup_s"], "rss_mb": rss_mb,
            "kept": stats["kept"], "candidates": stats["candidates"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000, help="replies in the run (x15 candidates)")
    a = p.parse_args()
    _, replies = build_data(100_000, 2000)
    key = secrets.token_urlsafe(12)
    cached = HERE / ".cache" / "resume" / f"run-{a.requests}"
    with InstantServer(replies, key) as server, tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        if not (cached / "stats.json").exists():
            shutil.rmtree(cached, ignore_errors=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            print(f"making a run of {a.requests:,} replies (once) ...", flush=True)
            session(cached, server, key, ["--num", "1000000000", "--max-requests", str(a.requests)])
        size = sum(f.stat().st_size for f in cached.iterdir()) / 2**20
        run = Path(tmp) / "run"
        shutil.copytree(cached, run)
        resumed = session(run, server, key, ["--num", "1"])
        fresh = session(Path(tmp) / "fresh", server, key, ["--num", "1"])
    n = resumed["candidates"]
    print(f"run: {n:,} candidates ({resumed['kept']:,} kept), {size:,.0f} MB of files")
    print(f"{'session':>8} {'startup s':>10} {'wall s':>8} {'peak RSS MB':>12}")
    for name, r in (("fresh", fresh), ("resume", resumed)):
        print(f"{name:>8} {r['startup_s']:>10.1f} {r['wall_s']:>8.1f} {r['rss_mb']:>12,.0f}")
    extra_s, extra_mb = resumed["startup_s"] - fresh["startup_s"], resumed["rss_mb"] - fresh["rss_mb"]
    print(f"resume / fresh: startup {resumed['startup_s'] / fresh['startup_s']:.1f}x, peak RSS "
          f"{resumed['rss_mb'] / fresh['rss_mb']:.1f}x; per candidate on disk: {1e6 * extra_s / n:.0f} us "
          f"and {2**20 * extra_mb / n:,.0f} bytes more")


if __name__ == "__main__":
    main()
