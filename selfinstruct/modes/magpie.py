"""Magpie mode (Xu et al. 2024): the teacher writes the user's query itself, then answers it.

An aligned chat model given only the opening of a user turn in its own chat template (the
"pre-query", e.g. ``<|im_start|>user\\n`` for ChatML) through the raw completions endpoint
continues with a plausible user query; that query is then answered through chat. No seeds
or prompt templates are needed: the pre-query comes from the model's chat template
(``find_pre_query``), or ``--magpie-prefix``.

One unit is one query and its answer. The Response logs both replies (purposes ``query`` and
``answer``, or ``failed`` when the answer failed after every retry); ``candidates`` re-derives
the one candidate from them, so a resume decides it the same way.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfinstruct.config import UserError
from selfinstruct.filters import no_visible_text
from selfinstruct.modes import instruction_verdict, one_line
from selfinstruct.prompts import Template, degenerate
from selfinstruct.records import Instance, Reply, Response
from selfinstruct.teacher import FATAL_KINDS, TeacherError, now_iso

TEMPLATES: dict = {}  # the pre-query replaces prompt templates

# A message no chat template contains, rendered in place of the user's words and cut at.
SENTINEL = "SELFINSTRUCTMAGPIESENTINEL7F3A"

# End-of-turn tokens of common templates (ChatML, Llama 3, Phi-3, Llama 2/Mistral, Gemma, and
# DeepSeek's full-width ones, whose template ends a user turn with no token of its own, only the
# assistant's opening), used as stop strings besides the template's own: a query ends where its
# turn does. A server stops at the model's end-of-generation token anyway; these catch one that
# comes out as text.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>",
                     "<｜end▁of▁sentence｜>", "<｜Assistant｜>", "<｜User｜>")
# Three newlines in a row end a query too: a query may have paragraphs, but a run of blank
# lines is a small model that has finished asking and is about to ramble or answer itself.
BLANK_RUN = "\n\n\n"

# Chat-template tokens a query is cut at: the model went on to write the next turn's markup, or
# an end-of-text token as text (Gemma's "<eos>"), or, in a template of plain words
# ("USER: ... ASSISTANT: ..."), a line opening the assistant's turn, as Magpie stops at "assistant".
# DeepSeek's tokens are written with full-width bars: <｜Assistant｜>, <｜end▁of▁sentence｜>.
_TEMPLATE_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>|</?s>|<(?:eos|bos|unk|pad)>|\[/?INST\]"
                             r"|<(?:start|end)_of_turn>"
                             r"|^[ \t]*(?i:assistant)[ \t]*:", re.MULTILINE)
_ROLES = {"user", "assistant", "system", "human", "gpt", "model"}


@dataclass
class PreQuery(Template):
    """The pre-query text as the run's one "template": its name and sha256 go in each record's provenance."""

    stop: list[str] = field(default_factory=list)  # where the query ends
    source: str = ""  # where it came from, for messages


def pre_query_of(chat_template: str, eos_token: str = "", where: str = "the teacher's chat template") -> tuple[str, str]:
    r"""(the text that opens a user turn, the turn's end-of-turn token) of a Jinja chat template.

    The template is rendered on one user message whose content is SENTINEL, with no
    generation prompt, and cut at the sentinel. A default system prompt the template inserts
    stays in the pre-query: the model is used to seeing it there. ``bos_token`` is rendered
    empty: a server adds BOS itself when it tokenizes a raw prompt, so writing it would double it.

    >>> pre_query_of("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    ('<|im_start|>user\n', '<|im_end|>')
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    # The environment transformers renders chat templates in (trim_blocks, lstrip_blocks, loop controls).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))
    try:
        text = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": SENTINEL}], add_generation_prompt=False,
            bos_token="", eos_token=eos_token)
    except Exception as e:  # the template is code from a file or a server: any error in it is its own (1/0, a huge range)
        raise UserError(f"{where} does not render ({type(e).__name__}: {e}); pass --magpie-prefix") from None
    at = text.find(SENTINEL)
    if at < 0:
        raise UserError(f"{where} does not show a user message; pass --magpie-prefix")
    after = text[at + len(SENTINEL):].split()
    return text[:at], after[0] if after else ""


def unescape_prefix(text: str) -> str:
    r"""--magpie-prefix as meant: ``\n`` is a newline and ``\\`` one backslash, as a shell passes
    them in single quotes (a pre-query without its newline is another text); any other
    backslash stays as typed.

    >>> [unescape_prefix(t) for t in (r"<|user|>\n", r"a\\n", r"a\\\n", r"C:\temp")]
    ['<|user|>\n', 'a\\n', 'a\\\n', 'C:\\temp']
    """
    return re.sub(r"\\([\\n])", lambda m: "\n" if m.group(1) == "n" else "\\", text)


def find_pre_query(cfg, base_urls: list[str] | None = None, api_key: str | None = None) -> PreQuery:
    """The pre-query: --magpie-prefix, else the chat template of the first of ``base_urls`` that
    serves one (llama.cpp's ``GET /props``; a server that is down is put aside, as the run does),
    else of the local model folder --model names (its tokenizer_config.json, as vLLM and
    transformers read it). One clear line when none is found."""
    eot = ""
    if cfg.magpie_prefix:
        text, source = unescape_prefix(cfg.magpie_prefix), "--magpie-prefix"
    else:
        tried, refused, found = [], [], None
        for base_url in base_urls or []:
            found = _template_from_server(base_url, api_key, tried, refused)
            if found is not None:
                break
        if found is None and cfg.model:
            found = _template_from_folder(Path(cfg.model), tried)
        if found is None and refused:
            # The key, not the template, is what is missing: --magpie-prefix would only meet the
            # same refusal at the first request. Said as the check of GET /models says it.
            raise UserError(f"{refused[0]}: the API key is wrong (--api-key, SELFINSTRUCT_API_KEY or OPENAI_API_KEY)")
        if found is None:
            raise UserError(f"cannot find the teacher's chat template ({'; '.join(tried) or 'no server or model folder to ask'}); "
                            "pass --magpie-prefix TEXT, the text that opens a user turn (e.g. '<|im_start|>user\\n')")
        (template, eos), source = found
        text, eot = pre_query_of(template, eos, f"{source}: the chat template")
    if not text.strip():
        raise UserError(f"the pre-query from {source} is empty; pass --magpie-prefix TEXT")
    stop = list(dict.fromkeys(s for s in (eot, *KNOWN_END_OF_TURN, BLANK_RUN, *cfg.stop) if s))
    # The name is the pre-query itself: provenance's prompt_template then records the text, prompt_hash its sha256.
    return PreQuery(name=text, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), stop=stop, source=source)


def _template_from_server(base_url: str, api_key: str | None, tried: list[str], refused: list[str]):
    """(chat_template, eos_token), source from llama.cpp's GET <server root>/props; None (and why in ``tried``) if not
    there, and a line in ``refused`` when the server refused the key (llama.cpp asks for it at /props)."""
    import httpx

    root = re.sub(r"/v1/?$", "", base_url.rstrip("/"))
    url = f"{root}/props"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=30)
        props = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as e:
        tried.append(f"GET {url}: {type(e).__name__}")
        return None
    if r.status_code in (401, 403):
        refused.append(f"the teacher at {base_url} refused the request (http_{r.status_code}, GET {url})")
    if not isinstance(props, dict) or not isinstance(props.get("chat_template"), str) or not props["chat_template"]:
        tried.append(f"GET {url}: {'HTTP ' + str(r.status_code) if props is None else 'no chat_template'}")
        return None
    return (props["chat_template"], _token(props.get("eos_token"))), f"{url}"


def _template_from_folder(folder: Path, tried: list[str]):
    """(chat_template, eos_token), source from a local model folder; None when it is not one or has none."""
    import json

    if not folder.is_dir():
        return None  # a hub id or a server's model name: nothing local to read
    config = folder / "tokenizer_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{config}: not a JSON object ({type(data).__name__})")
    template, source, missing = data.get("chat_template"), config, "no chat_template"
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise UserError(f"{config}: chat_template is a list, but not of {{\"name\": ..., \"template\": \"...\"}}")
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
        missing = "no chat_template named 'default'"
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config}: chat_template must be a string or a list of named templates, not {type(template).__name__}")
    jinja = folder / "chat_template.jinja"
    if not template and jinja.is_file():  # where newer transformers save it
        try:
            template, source = jinja.read_text(encoding="utf-8"), jinja
        except (OSError, ValueError) as e:
            raise UserError(f"{jinja}: cannot be read as UTF-8 text ({e})") from None
    if not template:
        tried.append(f"{config}: {missing}")
        return None
    return (template, _token(data.get("eos_token"))), str(source)


def _token(value) -> str:
    """A special token as tokenizer configs write it: a string or {"content": ...}."""
    return value.get("content", "") if isinstance(value, dict) else value if isinstance(value, str) else ""


# ------------------------------------------------------------ the request side


async def unit(index: int, cfg, teacher, templates, pool) -> Response:
    """The pre-query through /v1/completions gives a query; a query that could be kept is answered through chat."""
    pre = templates["pre_query"]
    t0 = time.monotonic()
    query = await teacher.complete_raw(pre.text, "query", stop=pre.stop)
    replies = [query]
    instruction, error = read_query(query.text, query.finish_reason)
    if error is None and echoes_pre_query(instruction, pre.text):
        # Logged, so that a resume, which has the reply and not the pre-query, rejects it alike.
        replies.append(Reply(purpose=ECHO, text="the query is the pre-query's own text"))
    # Only spend an answer on a query that passes the filters and is not a duplicate now; the
    # pool only grows, so a duplicate now is still one when the candidate is decided.
    elif error is None and instruction_verdict(one_line(instruction), cfg) is True \
            and not pool.index.query(instruction_text(instruction), nearest=0).duplicate:
        try:
            replies.append(await teacher.complete(instruction, "answer"))
        except TeacherError as e:
            if e.kind in FATAL_KINDS:
                raise
            replies.append(Reply(purpose="failed", text=f"{e.kind}: {e}"))
    return Response(id=f"r{index:06d}", index=index, mode="magpie", prompt_hash=pre.sha256, example_ids=[],
                    replies=replies, created_at=now_iso(), elapsed_s=round(time.monotonic() - t0, 3))


# The reply a unit logs in place of an answer when its query repeats the pre-query (``echoes_pre_query``).
ECHO = "echo"


def echoes_pre_query(query: str, pre_query: str) -> bool:
    r"""Whether the query is only words of the pre-query: a model that writes its template's default
    system prompt back as the user's query (its case, spacing and punctuation aside) wrote no user's words.

    >>> pre = "<|im_start|>system\nYou are SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
    >>> echoes_pre_query("you are SmolLM,  trained by Hugging Face.", pre), echoes_pre_query("Who trained SmolLM?", pre)
    (True, False)
    """
    def words(text: str) -> str:
        return " ".join(re.findall(r"\w+", _TEMPLATE_TOKEN.sub(" ", text).lower()))

    found = words(query)
    return bool(found) and f" {found} " in f" {words(pre_query)} "


# -------------------------------------------------------------- the parse side


def instruction_text(query: str) -> str:
    """The query as the teacher was asked it: its paragraphs and code blocks are part of it, and
    the answer was written for them (the other modes put an instruction on one line)."""
    return query.strip()


def read_query(text: str, finish_reason: str | None) -> tuple[str, str | None]:
    r"""(the query, why it cannot be used or None) from the raw completion after the pre-query.

    The query ends at the first chat-template token (the model went on to write the next turn).

    >>> read_query("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4", "stop")
    ('What is 2 + 2?', None)
    >>> read_query("<|im_start|>assistant\n", "stop")[1]
    "template_only: the query is only chat-template text ('<|im_start|>assistant')"
    """
    m = _TEMPLATE_TOKEN.search(text)
    query = (text[:m.start()] if m else text).strip()
    if no_visible_text(query):  # a zero-width space or a BOM alone is no query either (str.strip keeps them)
        if m:
            return "", f"template_only: the query is only chat-template text ({text.strip()[:60]!r})"
        return "", "empty_query: the teacher wrote no query"
    if query.lower().rstrip(":") in _ROLES:
        return "", f"template_only: the query is only a role name ({query[:20]!r})"
    if why := degenerate(query, "query"):  # the same line three times, or one long line of "a a a ..."
        return query, why
    if finish_reason == "length" and not m:
        return query, "truncated: the query was cut at max_tokens"
    return query, None


def candidates(resp: Response, cfg) -> list[dict]:
    """The unit's one candidate: the query as the instruction, the answer as its one instance's output."""
    query = resp.replies[0]
    instruction, error = read_query(query.text, query.finish_reason)
    cand = {"raw": query.text, "instruction": instruction, "instances": [], "is_classification": None, "error": error}
    rest = {r.purpose: r for r in resp.replies[1:]}
    if error is None and ECHO in rest:
        cand["error"] = "prompt_echo: the query repeats the pre-query's own text (the chat template's system prompt), not a user's"
    elif error is None and "failed" in rest:
        cand.update(error=f"teacher_error: the answer request failed after every retry ({rest['failed'].text})",
                    stage="teacher")
    elif error is None and "answer" in rest:
        answer = rest["answer"]
        cand["raw"] += "\n\n" + answer.text
        if why := degenerate(answer.text, "answer"):  # magpie kept one 200 KB line of "a a a ..."
            cand["error"] = why
        elif answer.finish_reason == "length":
            cand["error"] = "truncated: the answer was cut at max_tokens"
        else:
            cand["instances"] = [Instance(input="", output=answer.text.strip())]
    # No answer and no error: the query failed the filters or was a duplicate when the unit ran,
    # and is rejected for that again when decided.
    return [cand]
