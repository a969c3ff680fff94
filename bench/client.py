"""The teacher client's CPU cost per request: ours (``TeacherClient.complete``, which posts plain
JSON on aiohttp, ``teacher.Poster``) against openai's typed ``chat.completions.create`` with the
same messages and sampling, in the same run.

Both run in this process against ``bench/instant_server.py`` (its own process, replies of 15
real-shape tasks from ``bench/scale.py``'s cached data), ``--concurrency`` in flight; only
this process's CPU time is counted, so the server's share is left out. Rounds alternate.

    python bench/client.py                     # 3,000 requests a side, 64 in flight, 2 rounds

A third figure starts all the requests at once, so that most wait for one of the client's
slots (as self-instruct's follow-ups do): its ratio to ours shows what waiting costs. A fourth
sends them from a sender process (``--client-processes 1``, ``selfinstruct/sender.py``) and
counts this process's CPU only: what the coordinator's loop still pays a request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale import InstantServer, build_data  # noqa: E402

KEY = "bench-client"
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 3072, "stop": ["\n20", "20."]}


def prompt(i: int) -> str:
    """An Alpaca-mode prompt's shape: the template's words and a few examples, ~3 KB."""
    template = (HERE.parent / "prompts" / "alpaca.txt").read_text()
    return f"{template}\n" + "".join(f"###\nInstruction: Example task {i}-{k}, with its own input and a worked "
                                     f"answer of a few sentences.\nInput: <noinput>\nOutput: {'word ' * 60}\n"
                                     for k in range(6))


async def ours(url: str, n: int, concurrency: int, queued: bool = False, senders: int = 0) -> float:
    from selfinstruct.teacher import TeacherClient

    t = TeacherClient(base_url=url, api_key=KEY, model="instant", sampling=SAMPLING, concurrency=concurrency,
                      client_processes=senders)
    # As generate's alpaca loop does: no more requests started than the client has slots. With
    # ``queued``, all n at once, as self-instruct's follow-ups queue for the client's slots.
    slots = asyncio.Semaphore(n if queued else concurrency)

    async def one(i: int):
        async with slots:
            return await t.complete(prompt(i), "tasks")

    try:
        await asyncio.gather(*(one(i) for i in range(200)))  # warm-up
        cpu = time.process_time()
        await asyncio.gather(*(one(i) for i in range(n)))
        return (time.process_time() - cpu) / n
    finally:
        await t.close()


async def typed(url: str, n: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, http_client=openai.DefaultAioHttpClient())
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with slots:
            r = await client.chat.completions.create(model="instant", messages=[{"role": "user", "content": prompt(i)}],
                                                     **SAMPLING)
            return r.choices[0].message.content

    try:
        await asyncio.gather(*(one(i) for i in range(200)))
        cpu = time.process_time()
        await asyncio.gather(*(one(i) for i in range(n)))
        return (time.process_time() - cpu) / n
    finally:
        await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="requests a side a round")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    _, replies = build_data(10_000, 1000)
    with InstantServer(replies, KEY) as server:
        for r in range(args.rounds):
            typed_s = asyncio.run(typed(server.base_url, args.requests, args.concurrency))
            ours_s = asyncio.run(ours(server.base_url, args.requests, args.concurrency))
            queued_s = asyncio.run(ours(server.base_url, args.requests, args.concurrency, queued=True))
            sent_s = asyncio.run(ours(server.base_url, args.requests, args.concurrency, senders=1))
            print(f"round {r + 1}: typed create {typed_s * 1e6:6.0f} us CPU a request, "
                  f"ours (Poster) {ours_s * 1e6:6.0f} us: typed/ours {typed_s / ours_s:.2f}x; "
                  f"ours with all {args.requests:,} started at once {queued_s * 1e6:6.0f} us: "
                  f"queued/ours {queued_s / ours_s:.2f}x; ours from a sender process (--client-processes 1) "
                  f"{sent_s * 1e6:6.0f} us in this process: ours/sent {ours_s / sent_s:.2f}x", flush=True)


if __name__ == "__main__":
    main()
