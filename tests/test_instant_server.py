"""bench/instant_server.py's answers, called in-process (test_multi_server.py runs it as a process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from instant_server import Replies, answer  # noqa: E402


def _ask(tmp_path, **limits):
    replies = tmp_path / "replies.jsonl"
    replies.write_text(json.dumps("one two three four five") + "\n")
    opts = SimpleNamespace(key="K", model="m", routes=[])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **limits}).encode()
    return answer("POST", "/v1/chat/completions", {"authorization": "Bearer K"}, body, opts, Replies(str(replies), 1, 0))


@pytest.mark.parametrize("limits, text, finish", [
    ({"max_completion_tokens": 2}, "one two", "length"),  # the chat API's newer name alone cuts too
    ({"max_tokens": 3, "max_completion_tokens": 2}, "one two", "length"),  # both: the smaller
    ({"max_tokens": 2, "max_completion_tokens": 4}, "one two", "length"),
    ({"max_completion_tokens": 5}, "one two three four five", "stop"),  # a reply that fits is whole
    ({}, "one two three four five", "stop"),
])
def test_a_reply_is_cut_at_max_completion_tokens_as_at_max_tokens(tmp_path, limits, text, finish):
    """A client sending max_completion_tokens (which vLLM honours) got the whole reply, never a cut one."""
    status, obj = _ask(tmp_path, **limits)
    choice = obj["choices"][0]
    assert (status, choice["message"]["content"], choice["finish_reason"]) == (200, text, finish)
    assert obj["usage"]["completion_tokens"] == len(text.split())


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True])
def test_a_max_completion_tokens_that_is_no_whole_number_of_at_least_1_is_a_400_naming_it(tmp_path, value):
    status, obj = _ask(tmp_path, max_completion_tokens=value)
    assert status == 400 and obj["error"]["message"] == f"max_completion_tokens must be at least 1, got {value!r}"
