"""One client for every teacher: the ``openai`` async client against an OpenAI-compatible server.

Retries of 429 (honouring Retry-After), 5xx, timeouts and dropped connections
are the openai client's own (``max_retries``, exponential backoff). On top of
that we retry replies the client cannot use (malformed JSON, no choices), and
count every fault by kind, so stats can say what went wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from selfinstruct.records import Reply, Usage


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
    sampling: dict  # temperature, top_p, max_tokens, stop, seed
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 5
    faults: Counter = field(default_factory=Counter)  # every fault seen, retried or not
    requests: int = 0

    def __post_init__(self):
        import openai

        # A response hook on the HTTP client sees every attempt, so statuses that the
        # openai client retried on its own (429, 5xx) are still counted in stats.
        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._count_status]})
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries,
            http_client=http,
        )
        self._slots = asyncio.Semaphore(self.concurrency)

    async def _count_status(self, response) -> None:
        if response.status_code >= 400:
            self.faults[f"http_{response.status_code}"] += 1

    async def complete(self, prompt: str, purpose: str, response_format: dict | None = None,
                       prefill: str | None = None) -> Reply:
        """One chat completion. Raises TeacherError when every retry failed.

        ``prefill`` starts the assistant's reply (llama.cpp continues a final assistant
        message; vLLM does with continue_final_message). The returned text always
        begins with it: llama.cpp echoes it, vLLM does not.
        """
        import openai

        kwargs = {k: v for k, v in self.sampling.items() if v is not None}
        if response_format is not None:
            kwargs["response_format"] = response_format
        messages = [{"role": "user", "content": prompt}]
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
            kwargs["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        last: BaseException | None = None
        # Our own loop covers what the openai client does not retry: replies it could not parse.
        for attempt in range(max(1, self.max_retries)):
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
                    if e.status_code in (400, 401, 403, 404, 422):
                        # The client's retries are spent or the request itself is wrong: do not loop.
                        raise TeacherError(fault_kind(e), _one_line(e)) from None
                except (openai.APITimeoutError, openai.APIConnectionError) as e:
                    last = e
                    self.faults[fault_kind(e)] += 1
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        raise TeacherError(fault_kind(last), _one_line(last)) from None

    async def close(self) -> None:
        await self._client.close()


def _one_line(exc: BaseException | None) -> str:
    return " ".join(str(exc).split())[:300] if exc else "unknown error"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
