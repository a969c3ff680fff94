"""One client for every teacher: the ``openai`` async client against an OpenAI-compatible server.

Every retry is ours, not the openai client's (it runs with ``max_retries=0``):
one loop retries 429 (honouring Retry-After), 5xx, timeouts, dropped or cut-off
connections and replies the client cannot use (malformed JSON, no choices), up
to ``max_retries`` times with exponential backoff, and counts every failed
attempt by kind, so stats say exactly what went wrong. (The client's own retries
of timeouts and dropped connections were invisible to us, so went uncounted.)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field

from selfinstruct.records import Reply, Usage


# Sampling keys the OpenAI API lacks, sent in the request body under each server's name:
# llama.cpp reads repeat_penalty, vLLM repetition_penalty (each ignores the other's); DRY is llama.cpp's.
BODY_KEYS = {"repeat_penalty": ("repeat_penalty", "repetition_penalty"), "dry_multiplier": ("dry_multiplier",)}


class TeacherError(Exception):
    """A request that failed after every retry. ``kind`` names the fault for stats."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def fault_kind(exc: BaseException) -> str:
    """A short name for a failure, for counting: 'http_500', 'http_429', 'timeout', 'connection', ..."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return "malformed_response"
    return type(exc).__name__


@dataclass
class TeacherClient:
    base_url: str
    api_key: str
    model: str
    sampling: dict  # temperature, top_p, max_tokens, stop, seed, repeat_penalty
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 5
    faults: Counter = field(default_factory=Counter)  # every fault seen, retried or not
    requests: int = 0

    def __post_init__(self):
        import openai

        # max_retries=0: every attempt comes back to our loop, so every fault is counted.
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0,
        )
        self._slots = asyncio.Semaphore(self.concurrency)

    async def complete(self, prompt: str, purpose: str, response_format: dict | None = None,
                       prefill: str | None = None) -> Reply:
        """One chat completion. Raises TeacherError when every retry failed.

        ``prefill`` starts the assistant's reply (llama.cpp continues a final assistant
        message; vLLM does with continue_final_message). The returned text always
        begins with it: llama.cpp echoes it, vLLM does not.
        """
        import openai

        kwargs = {k: v for k, v in self.sampling.items() if v is not None and k != "seed"}
        base_seed = self.sampling.get("seed")
        extra_body = {name: kwargs[key] for key, names in BODY_KEYS.items() if key in kwargs for name in names}
        for key in BODY_KEYS:
            kwargs.pop(key, None)
        if response_format is not None:
            kwargs["response_format"] = response_format
        messages = [{"role": "user", "content": prompt}]
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
            extra_body.update(continue_final_message=True, add_generation_prompt=False)
        if extra_body:
            kwargs["extra_body"] = extra_body
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            wait = min(8.0, 0.5 * 2**attempt)
            if base_seed is not None:
                kwargs["seed"] = request_seed(base_seed, prompt, purpose, attempt)
            async with self._slots:
                self.requests += 1
                try:
                    resp = await self._client.chat.completions.create(
                        model=self.model, messages=messages, **kwargs
                    )
                    if not resp.choices:
                        raise ValueError("the reply has no choices")
                    choice = resp.choices[0]
                    text = choice.message.content
                    if text is None:
                        raise ValueError("the reply has no message content")
                    usage = Usage(
                        prompt_tokens=getattr(resp.usage, "prompt_tokens", 0) or 0,
                        completion_tokens=getattr(resp.usage, "completion_tokens", 0) or 0,
                    )
                    if prefill and not text.startswith(prefill):
                        text = prefill + text
                    return Reply(purpose=purpose, text=text, finish_reason=choice.finish_reason, usage=usage)
                except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError) as e:
                    # TypeError/AttributeError: a 200 whose JSON is not a chat completion.
                    last = e
                    self.faults["malformed_response"] += 1
                except openai.APIStatusError as e:
                    last = e
                    self.faults[fault_kind(e)] += 1
                    if e.status_code in (400, 401, 403, 404, 422):
                        # The request itself is wrong: do not loop.
                        raise TeacherError(fault_kind(e), _one_line(e)) from None
                    wait = _retry_after(e.response.headers) or wait
                except (openai.APITimeoutError, openai.APIConnectionError) as e:
                    last = e
                    self.faults[fault_kind(e)] += 1
            if attempt < self.max_retries:
                await asyncio.sleep(wait)
        raise TeacherError(fault_kind(last), _one_line(last)) from None

    async def close(self) -> None:
        await self._client.close()


def request_seed(base: int, prompt: str, purpose: str, attempt: int) -> int:
    """The sampling seed of one attempt: fixed by (base, prompt, purpose, attempt).

    One seed for every request would make a retry after a malformed reply ask for
    the very same tokens again; this keeps reruns reproducible and retries fresh.

    >>> request_seed(0, "p", "tasks", 0) == request_seed(0, "p", "tasks", 0) != request_seed(0, "p", "tasks", 1)
    True
    """
    digest = hashlib.blake2b(f"{base}\0{purpose}\0{attempt}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After in seconds, or retry-after-ms), capped at 60.

    >>> _retry_after({"retry-after": "1"}), _retry_after({"retry-after-ms": "250"}), _retry_after({})
    (1.0, 0.25, None)
    """
    for name, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return min(60.0, max(0.0, float(headers.get(name)) / scale))
        except (TypeError, ValueError):
            continue
    return None  # absent, or an HTTP date: our backoff decides


def _one_line(exc: BaseException | None) -> str:
    return " ".join(str(exc).split())[:300] if exc else "unknown error"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
