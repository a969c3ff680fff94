"""Read instruction data from a run folder or a file, and write it out for trainers.

``load_pairs`` is the one reader later stages use: it takes a run folder,
an Alpaca JSON list, or a JSONL file, and returns flat rows
``{"instruction", "input", "output"}`` (one per instance).
``read_conversations`` also takes ShareGPT and messages files (the tuning
stage reads through it), and ``export_records`` writes any of them back out
as alpaca, sharegpt, messages, jsonl, a Hugging Face dataset or parquet.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from selfinstruct.config import UserError, counted, printable
from selfinstruct.datafiles import (
    DATA_SUFFIXES,
    PARQUET_SUFFIXES,
    alpaca_row,
    check_file_name,
    check_file_target,
    check_output,
    iter_located,
    json_kind,
    json_line,
    names_folder,
    no_progress_bars,
    read_located,
    refuse_special_file,
    remove_stale_temps,
    write_atomic,
    write_lines_atomic,
)
from selfinstruct.filters import no_visible_text
from selfinstruct.records import KeptRecord, Provenance


def alpaca_rows(records) -> list[dict]:
    """KeptRecords to Alpaca rows, one per instance.

    >>> # KeptRecord(instruction="Add", instances=[{"input": "1+1", "output": "2"}]) ->
    >>> # [{"instruction": "Add", "input": "1+1", "output": "2"}]
    """
    return [
        {"instruction": r.instruction, "input": inst.input, "output": inst.output}
        for r in records
        for inst in r.instances
    ]


def run_rows(folder: Path):
    """A run folder's Alpaca rows, one per instance of each line of its kept.jsonl, read as a
    stream (the session that writes data.json checked the file when it began, and wrote the rest)."""
    from selfinstruct.datafiles import read_jsonl

    for o in read_jsonl(Path(folder) / "kept.jsonl"):
        for inst in o["instances"]:
            # An instance may leave out its input: Instance's default, "", as load_kept reads it.
            yield {"instruction": o["instruction"], "input": inst.get("input", ""), "output": inst["output"]}


def write_alpaca_json(rows, path: Path) -> int:
    r"""Alpaca rows (dicts) as one indented JSON list, written atomically a row at a time: the
    same bytes as ``json.dumps(rows, ensure_ascii=False, indent=2)`` without holding them all
    (a run's data.json is rewritten at each session's end, at millions of rows). Returns the rows.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "d.json"
    >>> write_alpaca_json([{"instruction": "Add", "input": "1+1", "output": "2"}], p), p.read_text()[:23]
    (1, '[\n  {\n    "instruction"')
    """
    import json

    from selfinstruct.datafiles import write_atomic

    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                # json.dumps indents a list's items by two spaces; a string's own newlines are escaped.
                f.write(("[\n  " if not n else ",\n  ") + json.dumps(row, ensure_ascii=False, indent=2).replace("\n", "\n  "))
                n += 1
            f.write("\n]" if n else "[]")

    write_atomic(path, write)
    return n


_row = alpaca_row  # the data layer's one Alpaca-row check


def load_pairs(path: str | Path, hint: str = "") -> list[dict]:
    """Rows of instruction/input/output from a run folder or any single-exchange dataset file
    (``hint``: what a multi-turn record's line adds, as ``to_alpaca``'s)."""
    return [to_alpaca(r, w, hint) for w, r in read_located(path)]


# ---------------------------------------------------------------------------
# Conversations: the shapes trainers read, and a reader that takes them all.
#
# Three record shapes are understood, as the trainers name them:
#   alpaca    {"instruction", "input", "output"[, "system"]}           LLaMA-Factory alpaca, axolotl alpaca
#   sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}  LLaMA-Factory sharegpt
#   messages  {"messages": [{"role": "user"|"assistant"|"system", "content"}]}  TRL, axolotl chat_template
# ---------------------------------------------------------------------------

FORMATS = ("alpaca", "sharegpt", "messages", "jsonl", "hf", "parquet")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def user_text(instruction: str, input: str = "") -> str:
    """One user turn from an Alpaca pair: the input follows the instruction after a blank line.

    >>> user_text("Add the numbers.", "1 + 1")
    'Add the numbers.\\n\\n1 + 1'
    """
    return f"{instruction}\n\n{input}" if input else instruction


def row_messages(row: dict) -> list[dict]:
    """An Alpaca row as chat messages: [system,] user, assistant."""
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    msgs.append({"role": "user", "content": user_text(row["instruction"], row.get("input") or "")})
    msgs.append({"role": "assistant", "content": row.get("output") or ""})
    return msgs


def sharegpt_row(messages: list[dict]) -> dict:
    """Chat messages as one ShareGPT record (from/value, human/gpt)."""
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def record_kind(rec, where: str) -> str:
    """Which of the three shapes a record has: 'alpaca', 'sharegpt' or 'messages'."""
    if isinstance(rec, dict):
        if "instruction" in rec:
            return "alpaca"
        if isinstance(rec.get("conversations"), list):
            return "sharegpt"
        if isinstance(rec.get("messages"), list):
            return "messages"
        for key in ("conversations", "messages"):  # there, but not a list: say so, not only which keys it has
            if key in rec:
                raise UserError(f"{where}: field '{key}': must be a list of turns, got {json_kind(rec[key])}")
    needs = "instruction and output (alpaca), conversations (sharegpt) or messages"
    if not isinstance(rec, dict):
        raise UserError(f"{where}: is {json_kind(rec)}, not a record: a record is a JSON object with {needs}")
    if not rec:  # sorted({}) said "has []"; the readers drop null fields, so {"messages": null} is here too
        raise UserError(f"{where}: has no fields ({{}}, or only null ones): a record needs {needs}")
    raise UserError(f"{where}: not an alpaca, sharegpt or messages record (has {sorted(rec)}; it needs {needs})")


def content_text(content, where: str):
    """A message's content as text: a string, or OpenAI's list of content parts, all of them
    text parts (joined by newlines); None for any other value. A part that is not text
    (an image) is one line naming it.

    >>> content_text([{"type": "text", "text": "Add 2 and 3."}, {"type": "text", "text": "Show it."}], "x")
    'Add 2 and 3.\\nShow it.'
    """
    if isinstance(content, str) or not isinstance(content, list) or not content:
        return content if isinstance(content, str) else None
    texts = []
    for k, part in enumerate(content):
        if isinstance(part, dict) and part.get("type", "text") != "text":
            raise UserError(f"{where}.content[{k}]: a '{part['type']}' part; only text parts are read")
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


def _has(turn, key: str, lacks: str) -> bool:
    """Whether a turn holds ``key`` and not ``lacks``: a turn of the other shape (from/value, role/content)."""
    return isinstance(turn, dict) and key in turn and lacks not in turn


def _system(rec: dict, where: str) -> str:
    """An Alpaca row's system prompt ("" when absent, null or blank: a blank one says nothing, and
    as a turn a chat template renders an empty system block); one not text is one line naming it."""
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: field 'system': must be a string, got {type(system).__name__}")
    return system if system and system.strip() else ""


def to_messages(rec: dict, where: str) -> list[dict]:
    """Any record as validated chat messages: roles user/assistant/system, string contents.

    A conversation's top-level ``system`` (LLaMA-Factory's sharegpt shape) is its first turn.
    A turn this cannot carry whole is refused, not trimmed: a tool call, a tool turn, an
    image part; and an empty user turn (an Alpaca row's instruction may not be empty either).
    """
    kind = record_kind(rec, where)
    if kind == "alpaca":
        return row_messages(_row(rec, where) | ({"system": system} if (system := _system(rec, where)) else {}))
    msgs = []
    if kind == "sharegpt":
        for i, m in enumerate(rec["conversations"]):
            turn = f"conversations[{i}]"
            if isinstance(m, dict) and isinstance(m.get("from"), str) and m["from"] not in SHAREGPT_ROLES:
                raise UserError(f"{where}: {turn}: from '{m['from']}': expected human, gpt or system")
            if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES or not isinstance(m.get("value"), str):
                other = ", got a messages turn (role/content)" if _has(m, "role", "from") else ""
                raise UserError(f"{where}: {turn}: expected {{'from': human|gpt|system, 'value': text}}{other}")
            msgs.append((turn, {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}))
    else:
        for i, m in enumerate(rec["messages"]):
            turn = f"messages[{i}]"
            if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in SHAREGPT_FROM:
                raise UserError(f"{where}: {turn}: role '{m['role']}': expected user, assistant or system")
            calls = next((k for k in ("tool_calls", "function_call") if isinstance(m, dict) and m.get(k)), None)
            if calls:
                raise UserError(f"{where}: {turn}: field '{calls}': tool calls are not read (nor tool turns); "
                                "leave them out of the data")
            content = content_text(m.get("content"), f"{where}: {turn}") if isinstance(m, dict) else None
            if content is None or m.get("role") is None:
                other = ", got a ShareGPT turn (from/value)" if _has(m, "from", "role") else ""
                raise UserError(f"{where}: {turn}: expected {{'role': user|assistant|system, 'content': text}}{other}")
            msgs.append((turn, {"role": m["role"], "content": content}))
    if system := _system(rec, where):  # LLaMA-Factory's sharegpt shape: the system prompt beside the turns
        if msgs and msgs[0][1]["role"] == "system" and msgs[0][1]["content"] != system:
            raise UserError(f"{where}: field 'system' and {msgs[0][0]} are two different system prompts; keep one")
        if not msgs or msgs[0][1]["role"] != "system":
            msgs.insert(0, ("system", {"role": "system", "content": system}))
    if not any(m["role"] == "user" for _, m in msgs):
        raise UserError(f"{where}: conversation has no user turn")
    if empty := next((turn for turn, m in msgs if m["role"] == "user" and not m["content"].strip()), None):
        raise UserError(f"{where}: {empty}: the user turn is empty")
    return [m for _, m in msgs]


def to_alpaca(rec: dict, where: str, hint: str = "; use --format messages or sharegpt", unanswered: bool = False) -> dict:
    """Any record as an Alpaca row; a conversation must be one exchange: [system,] user, assistant.
    ``hint`` ends the line refusing one that is not: export's flag by default, a command's own otherwise.
    ``unanswered``: a lone user turn is a row with output "" too, as an Alpaca row without its output
    reads (respond and evolve take questions to answer)."""
    if record_kind(rec, where) == "alpaca":
        row = _row(rec, where)
        if system := _system(rec, where):
            row["system"] = system
        return row
    msgs = to_messages(rec, where)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    turns = msgs[1:] if system or msgs[0]["role"] == "system" else msgs
    if unanswered and [m["role"] for m in turns] == ["user"]:
        turns = [*turns, {"role": "assistant", "content": ""}]
    if [m["role"] for m in turns] != ["user", "assistant"]:
        raise UserError(f"{where}: only a single user/assistant exchange fits alpaca (this is multi-turn or has "
                        f"no reply){hint}")
    row = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
    if system:
        row["system"] = system
    return row


def read_records(path: str | Path) -> list[dict]:
    """Raw records from a run folder, a Hugging Face dataset folder, parquet, a JSON list or JSONL."""
    return [r for _, r in read_located(path)]


def read_conversations(path: str | Path) -> list[dict]:
    """Records of any shape, each with its ``messages`` and, for Alpaca rows, the row itself (``alpaca``).

    Keeping the Alpaca row lets a model without a chat template get the
    classic instruction/input prompt instead of a flattened user turn.
    """
    out = []
    for where, rec in read_located(path):
        _check_answered(rec, where)  # tune trains on them, as on an export
        alpaca = to_alpaca(rec, where) if record_kind(rec, where) == "alpaca" else None
        out.append({"messages": to_messages(rec, where), "alpaca": alpaca})
    return out


def check_hf_folder(out: Path) -> None:
    """An hf export replaces its folder whole: only over what an export writes there (the
    saved dataset's files and the card it wrote), never a file of the user's (their own
    README.md, notes, another split). Cheap: ``run`` calls it before the source is read, and
    ``export_records`` again before it converts (a caller of its own may not have)."""
    from selfinstruct.card import MARK
    from selfinstruct.datafiles import FILTERED_MARKER, LOCK, read_text, run_lock

    if out.is_symlink():  # the folder is replaced whole, and a link cannot be: say so before the conversion
        raise UserError(f"{out}: is a symbolic link; give the folder itself (or a new one) for --format hf")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a saved dataset; choose a new folder for --format hf")
    if not out.is_dir():
        return
    try:
        here = Path.cwd().resolve()
    except OSError:  # the folder the user is in was deleted (an earlier swap of it): out is not it
        here = None
    if out.resolve() == here:
        # `--out .` was a traceback once converted (a temp named after '.'); `../here` moved the folder the
        # shell is in aside and deleted it. (A folder above it holds that folder: refused below.)
        raise UserError(f"{out}: is the folder you are in, which an hf export replaces whole (the old one moved "
                        "aside and deleted): give a new folder, such as hf/")
    if (out / LOCK).is_file():
        # A dedup or decontaminate at work in this folder holds its lock (run_lock: a flock, which the
        # kernel drops when its holder ends): refused with one line naming it. Taken and let go at once;
        # _save_dir takes it again while it swaps the folder.
        with run_lock(out, HF_EXPORT):
            pass
    others = []
    for p in sorted(out.iterdir()):
        if p.name == "README.md" and p.is_file() and MARK in read_text(p, "card"):
            continue
        # ours, no data (the lock not held: above): left by a dedup or decontaminate whose write failed
        if p.name in (LOCK, FILTERED_MARKER) and p.is_file():
            continue
        if (pid := _live_card_temp(p)) is not None:
            raise UserError(f"{out}: another export (pid {pid}) is writing its card here; wait for it to end, "
                            "then run again")
        if _CARD_TEMP.fullmatch(p.name):  # a killed export's: replaced with the folder
            continue
        if p.is_file() and (p.name in ("dataset_info.json", "state.json")
                            or (p.name.startswith("data-") and p.name.endswith(".arrow"))):
            continue
        others.append(p.name)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"{out}: holds files an export did not write ({shown}); an hf export replaces the "
                        "folder whole: choose a new folder, or move them away")


HF_EXPORT = "export --format hf"  # what the lock file of a folder being swapped says holds it
_CARD_TEMP = re.compile(r"\.README\.md\.tmp-(\d+)")  # write_atomic's temp of an export's card in its folder


def _live_card_temp(p: Path) -> int | None:
    """The pid of the export writing the card temp ``p`` if that process is alive (not this one); else None."""
    import os

    m = _CARD_TEMP.fullmatch(p.name)
    if m is None or int(m.group(1)) == os.getpid():
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return None
    except OSError:  # EPERM: alive, someone else's
        pass
    return int(m.group(1))


def _save_dir(ds, out: Path) -> None:
    """Save the dataset as the folder ``out``, replacing an earlier one whole.

    The old folder is renamed aside (the name of a temp of ``out``, so a kill's leftover is
    removed by the next write) and deleted only once the new one is in place: a stop before
    that puts it back, one after leaves the new one. Never half of one, or neither.
    """
    import contextlib
    import os

    from selfinstruct.datafiles import run_lock

    old = out.with_name(f".{out.name}.tmp-old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # this process's, stopped while it was removed after a swap

    with contextlib.ExitStack() as held:
        def save(tmp: Path) -> None:
            ds.save_to_disk(str(tmp))
            if out.exists():
                # The folder's lock, held until the new folder is in: a dedup or decontaminate that began
                # there while this export converted is refused here, not moved aside with the folder
                # (its lock file deleted under it, its result written into the dataset or lost).
                held.enter_context(run_lock(out, HF_EXPORT))
                check_hf_folder(out)  # again, under the lock: a dedup may have begun and ended meanwhile
                os.rename(out, old)

        try:
            write_atomic(out, save)
        except BaseException:
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise
    shutil.rmtree(old, ignore_errors=True)


# What each file format writes: its suffix, and its shape in words (for the refusals).
FILE_FORMATS = {"alpaca": (".json", "a JSON list"), "sharegpt": (".json", "a JSON list"),
                "messages": (".jsonl", "JSON Lines"), "jsonl": (".jsonl", "JSON Lines"),
                "parquet": (".parquet", "a parquet file")}


# Suffixes of compressed files: the writers write plain text, which a reader taking the name's word
# for it (datasets, pandas) would try to decompress (`x.jsonl.gz`: BadGzipFile).
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".tar")
# A JSON list and JSON Lines are told apart by their first character, by our readers and by
# datasets.load_dataset("json"), whatever the suffix: a messages export to train.json is fine.
_JSON_SUFFIXES = {".json", ".jsonl"}


def _refuse_unless_an_export(out: Path, who: str) -> None:
    """Refuse an existing ``out`` of no data suffix unless it holds what an export writes (JSON, parquet's
    PAR1) or nothing: `export RUN --out notes.md` wrote over the user's notes. An earlier export to the
    same name (`--out data`) is replaced as before."""
    try:
        with open(out, "rb") as f:
            head = f.read(256)
    except OSError:
        return  # unreadable: the write says what is wrong
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start or start[:1] in (b"[", b"{") or head.startswith(b"PAR1"):
        return
    first = start.decode("utf-8", "replace").splitlines()[0]
    shown = printable(first[:40] + ("..." if len(first) > 40 else ""))
    raise UserError(f"{out}: exists and holds no data export (it begins {shown!r}), which {who} would write "
                    "over: give a new name, or remove it first")


def check_suffix(out: str | Path, fmt: str, who: str = "") -> None:
    """Refuse an ``out`` whose suffix says another format than ``fmt`` writes, where a reader would take
    the name's word for it: JSON in ``x.csv`` or ``x.parquet``, a parquet file in ``x.json``, plain text
    in ``x.jsonl.gz``. A JSON list in ``x.jsonl`` or JSON Lines in ``x.json`` is taken (every JSON
    reader here tells them apart by the first character), and a name without a data suffix (``data``,
    ``data.txt``) is the user's. ``who`` names the writer (``--format fmt``).
    For ``hf``, a folder: any data suffix is refused unless typed with a trailing slash (``x.json/``),
    as dedup's folder is, or already a folder. Give ``out`` as typed.

    >>> check_suffix("out/a.csv", "alpaca")
    Traceback (most recent call last):
    selfinstruct.config.UserError: out/a.csv: a .csv name for --format alpaca, which writes a JSON list; readers take the format by the suffix: name it out/a.json
    >>> check_suffix("a.jsonl", "alpaca")  # a JSON list in a .jsonl name: read as one
    >>> check_suffix("a.jsonl.gz", "jsonl")
    Traceback (most recent call last):
    selfinstruct.config.UserError: a.jsonl.gz: a .gz name for --format jsonl, which writes plain JSON lines, not compressed; readers would try to decompress it: name it a.jsonl
    """
    given, out = str(out), Path(out)
    suffix, who = out.suffix.lower(), who or f"--format {fmt}"
    if fmt != "hf" and suffix in COMPRESSED_SUFFIXES:
        fit, shape = FILE_FORMATS[fmt]
        shape = "plain JSON lines" if fit == ".jsonl" else shape
        raise UserError(f"{out}: a {out.suffix} name for {who}, which writes {shape}, not compressed; readers "
                        f"would try to decompress it: name it {out.with_name(Path(out.stem).with_suffix(fit).name)}")
    if suffix in PARQUET_SUFFIXES:  # x.pq is parquet to every reader here, as x.parquet is
        suffix = ".parquet"
    if suffix not in DATA_SUFFIXES:
        if fmt != "hf" and out.is_file():
            _refuse_unless_an_export(out, who)
        return
    if fmt == "hf":
        if names_folder(given) or out.is_dir():  # the slash said it, or an earlier export made it
            return
        raise UserError(f"{out}: a {out.suffix} name for {who}, which writes a folder (a saved dataset), not a "
                        f"{out.suffix} file: give a folder such as {out.with_suffix('')} (or {out}/, with the "
                        "slash, for a folder of that name)")
    fit, shape = FILE_FORMATS[fmt]
    if suffix != fit and not {suffix, fit} <= _JSON_SUFFIXES:
        raise UserError(f"{out}: a {out.suffix} name for {who}, which writes {shape}; readers take the format by "
                        f"the suffix: name it {out.with_suffix(fit)}")  # in its folder


def export_records(records, fmt: str, out: str | Path, where: str = "input", left_out: dict | None = None,
                   need_answers: bool = False) -> int:
    """Write records (any shape) as ``fmt`` to ``out``; returns the number of rows written.

    ``records`` are dicts, or (where, dict) pairs from ``read_located`` so errors name file and line:
    a list, or a function giving a fresh iterator of them (``lambda quiet=False: iter_located(path,
    quiet=quiet)``, quiet on a second reading), which is read a record at a time (an hf or parquet
    export reads it twice) and never held whole.
    A record that cannot be converted stops the export with ``out`` as it was. ``left_out``
    counts, per field, the records with a field no format writes (``fields_left_out``).
    ``need_answers``: an Alpaca row without its output stops it too (``_check_answered``: the
    ``export`` command's data is for training; filter keeps the rows its judge scored, as they are).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt != "hf":  # looked at before Path drops the slash: `out/` wrote a file named out
        check_file_name(out, example=f"data{FILE_FORMATS[fmt][0]}", writes=f"--format {fmt} writes one file")
    out = Path(out)
    if isinstance(records, list) and not records:
        raise UserError(f"{where}: no records to export")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")
    if fmt == "hf":
        check_hf_folder(out)
    if fmt in ("alpaca", "jsonl", "messages", "sharegpt") and out.exists() and out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name for --format {fmt}")
    fresh = records if callable(records) else lambda quiet=False: records

    passes = 0

    def labelled(counts: dict | None = None):
        nonlocal passes
        passes, n = passes + 1, 0
        for i, r in enumerate(fresh() if passes == 1 else fresh(quiet=True)):
            rec, w = (r[1], r[0]) if isinstance(r, tuple) else (r, f"{where}: record {i}")
            if counts is not None:
                _count_left_out(rec, counts, w)
            if need_answers:
                _check_answered(rec, w)
            n += 1
            yield rec, w
        if not n:
            raise UserError(f"{where}: no records to export")

    if fmt in ("alpaca", "jsonl"):
        rows = (to_alpaca(r, w) for r, w in labelled(left_out))
    elif fmt == "sharegpt":
        rows = (sharegpt_row(to_messages(r, w)) for r, w in labelled(left_out))
    elif fmt == "messages":
        rows = ({"messages": to_messages(r, w)} for r, w in labelled(left_out))
    else:
        return _export_table(labelled, fmt, out, left_out)
    if fmt in ("alpaca", "sharegpt"):  # LLaMA-Factory's own sharegpt examples are JSON lists
        return write_alpaca_json(rows, out)
    return write_lines_atomic(out, map(json_line, rows))


def _export_table(labelled, fmt: str, out: Path, left_out: dict | None) -> int:
    """hf / parquet: a messages column for TRL, plus the Alpaca columns when every record is one
    exchange. A first pass checks every record and finds the columns; the second writes the rows
    to an Arrow file on disk, from which the dataset is saved (memory-mapped, never held)."""
    import os

    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    columns: dict[str, None] = {}
    alpaca = True
    for r, w in labelled(left_out):
        to_messages(r, w)
        if alpaca:
            try:
                columns.update(dict.fromkeys([*to_alpaca(r, w), "messages"]))
            except UserError:
                alpaca = False
    # As Dataset.from_list made them: every row gets every column, in the order the rows first
    # gave them (None where a row has none); each column is text but messages, typed as it typed them.
    columns = columns if alpaca else {"messages": None}
    sample = {k: [{"role": "user", "content": ""}] if k == "messages" else "" for k in columns}
    features = Dataset.from_list([sample]).features
    staged = out.with_name(f".{out.name}.tmp-rows-{os.getpid()}")  # removed by a later write if a kill leaves it
    n = 0
    try:
        with ArrowWriter(features=features, path=str(staged)) as writer:
            batch = []
            for r, w in labelled():
                m = to_messages(r, w)
                row = (to_alpaca(r, w) | {"messages": m}) if alpaca else {"messages": m}
                batch.append({k: row.get(k) for k in columns})
                if len(batch) == 1000:
                    writer.write_batch({k: [b[k] for b in batch] for k in columns})
                    n, batch = n + len(batch), []
            if batch:
                writer.write_batch({k: [b[k] for b in batch] for k in columns})
                n += len(batch)
            writer.finalize()
        ds = Dataset.from_file(str(staged))
        with no_progress_bars():  # "Creating parquet from Arrow format", "Saving the dataset": ours is one line
            if fmt == "parquet":
                from selfinstruct.rouge import interrupts_held

                def write(tmp: Path) -> None:
                    # Arrow's parquet writer calls our Python file object (fsspec) as it flushes a page:
                    # a KeyboardInterrupt raised there breaks its column writer, which aborts the process
                    # (a core dump, the temps left). Ctrl-C waits for the write, then stops it here.
                    with interrupts_held():
                        ds.to_parquet(str(tmp))

                write_atomic(out, write)
            else:
                _save_dir(ds, out)
    finally:
        staged.unlink(missing_ok=True)
    return n


def _check_answered(rec, where: str) -> None:
    """Refuse an Alpaca row with no answer (``output`` left out, null or blank), as export and tune
    refuse any row they cannot read whole. The data layer reads such a row's output as "" (respond
    answers instructions alone), but an export or a tune is training data: the row would train on
    an empty answer. A conversation likewise needs an assistant turn, and none of them blank."""
    if record_kind(rec, where) != "alpaca":
        msgs = to_messages(rec, where)  # the conversation's own faults first
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        # The test of an empty answer everywhere (filter, the judge): str.strip keeps a zero-width space.
        if not replies or any(no_visible_text(r) for r in replies):
            why = "has no assistant turn" if not replies else "has an empty assistant turn"
            raise UserError(f"{where}: conversation {why}; it would train on no answer (answer it first, or "
                            "leave it out)")
        return
    _row(rec, where)  # the row's own faults first (a bad instruction), as its conversion says them
    output = rec.get("output")
    if output is None or (isinstance(output, str) and no_visible_text(output)):
        why = ("missing" if output is None else "is empty" if not output.strip() else
               "shows nothing (only invisible characters, such as a zero-width space)")
        raise UserError(f"{where}: field 'output': {why}; a row without its answer would train on an empty one "
                        "(answer it first: selfinstruct respond)")


# The fields each shape's conversion reads; any other field of a record is not written. An
# Alpaca row's messages are its own exchange again, as export's hf and parquet write them.
CARRIED = {"alpaca": {"instruction", "input", "output", "system", "messages"}, "sharegpt": {"conversations", "system"},
           "messages": {"messages", "system"}}


# A run's kept task (KeptRecord) becomes one row per instance in dedup's and decontaminate's
# kept.jsonl, keeping its id, is_classification, nearest and provenance (respond's and evolve's
# runs are KeptRecords too). Those are selfinstruct's bookkeeping, not the user's data: exporting
# the run itself names none of them, and its dedup output named them as fields lost. They are
# known by the provenance selfinstruct gives every record, so a user's own id on a row without
# one is still named.
RUN_FIELDS = frozenset(KeptRecord.model_fields) - {"instruction", "instances"}
_PROVENANCE_FIELDS = frozenset(name for name, field in Provenance.model_fields.items() if field.is_required())


def selfinstruct_fields(rec: dict) -> frozenset:
    """The fields of ``rec`` that selfinstruct wrote itself (``RUN_FIELDS``, on a row of a run's
    task: one holding a run's provenance), which an export leaves out unsaid.

    >>> sorted(selfinstruct_fields({"id": "r1-0", "provenance": {k: "" for k in _PROVENANCE_FIELDS}}))
    ['id', 'is_classification', 'nearest', 'provenance']
    >>> selfinstruct_fields({"id": 7, "provenance": "my lab"})
    frozenset()
    """
    prov = rec.get("provenance")
    return RUN_FIELDS if isinstance(prov, dict) and _PROVENANCE_FIELDS <= prov.keys() else frozenset()


def _count_left_out(rec, counts: dict, where: str = "") -> None:
    """Add a record to ``counts``: its fields no format writes, by name, and the records (``None``).
    A record of no known shape (a list, a string) is one line naming it, before any is converted.
    Fields selfinstruct wrote itself (``selfinstruct_fields``) are no user's data lost: not counted."""
    kind = record_kind(rec, where)
    counts[None] = counts.get(None, 0) + 1
    for key in rec.keys() - CARRIED[kind] - selfinstruct_fields(rec):
        if rec[key] is not None:
            counts[key] = counts.get(key, 0) + 1


def fields_left_out(records) -> str:
    """The line that names the fields an export did not write, with how many records had
    each ("" when none): every format holds a record's text and roles only, so a user's
    ``id`` or ``category`` is dropped, and should be said. A null field (a column of a parquet
    or hf file that other rows fill) holds nothing to lose, nor does a field selfinstruct wrote
    itself (a run task's id and provenance, in a dedup output's rows). ``records``: records, or the counts
    ``export_records`` made of them.

    >>> print(fields_left_out([{"instruction": "a", "id": 1}, {"instruction": "b", "id": 2, "tags": [], "x": None}]))
    not written (export keeps each record's text and roles only): id (2 of 2 records), tags (1 of 2)
    """
    counts = records if isinstance(records, dict) else {}
    if not isinstance(records, dict):
        for rec in records:
            _count_left_out(rec[1] if isinstance(rec, tuple) else rec, counts)
    return not_written_line(counts, "export keeps each record's text and roles only")


def not_written_line(counts: dict, keeps: str) -> str:
    """``not written (KEEPS): id (2 of 2 records), tags (1 of 2)`` from ``counts`` (field -> records
    holding it; None -> records in all), most held first; "" when no field is left out. Export's
    line, and filter's (``judge._not_written``)."""
    total = counts.get(None, 0)
    ranked = sorted(((k, n) for k, n in counts.items() if k is not None), key=lambda kv: (-kv[1], kv[0]))
    if not ranked:
        return ""
    shown = ", ".join(f"{k} ({n} of {total}{' records' * (not i)})" for i, (k, n) in enumerate(ranked))
    return f"not written ({keeps}): {shown}"


# How to point each trainer at the file, printed after an export.
USAGE_HINTS = {
    "alpaca": "LLaMA-Factory: formatting alpaca; axolotl: type alpaca",
    "jsonl": "LLaMA-Factory: formatting alpaca; axolotl: type alpaca",
    "sharegpt": "LLaMA-Factory: formatting sharegpt (conversations, from/value); "
                "axolotl: type chat_template, field_messages conversations, role: from, content: value",
    "messages": "TRL: load_dataset('json', data_files=...); LLaMA-Factory: formatting sharegpt with "
                "messages/role/content tags; axolotl: type chat_template",
    "hf": "datasets.load_from_disk(...): a messages column, plus instruction, input and output when every "
          "record is one exchange",
    "parquet": "load_dataset('parquet', data_files=...): a messages column, plus instruction, input and output when "
               "every record is one exchange",
}


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_FILE",
                        help="A run folder, or a dataset file/folder (alpaca, sharegpt, messages, JSONL, parquet, hf; "
                        "DIR/NAME: the split NAME of a saved DatasetDict).")
    parser.add_argument("--format", dest="fmt", default="alpaca", metavar="FORMAT",
                        help=f"One of: {', '.join(FORMATS)} (default: alpaca).")
    parser.add_argument("--out", required=True, help="The file to write (a folder for --format hf).")
    parser.add_argument("--card", action="store_true",
                        help="Also write a Hugging Face dataset card, README.md, beside the output (always for --format hf, "
                             "inside its folder).")
    # Defaults of None: a card option given without a card is told apart from one left out (run).
    parser.add_argument("--license", default=None, help="The card's license field, a Hub license id (default: other).")
    parser.add_argument("--name", default=None, help="The card's title (pretty_name).")
    parser.add_argument("--language", nargs="+", default=None, metavar="CODE",
                        help="The card's language field: the data's languages as ISO 639 codes (en, fr, zh; "
                             "several as --language en fr). Not detected (default: en).")


# An ISO 639-1 or 639-3 code, maybe with a region or script (pt-BR, zh-Hans), as the Hub's card takes it.
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def check_languages(codes: list[str]) -> list[str]:
    """``--language``'s codes, each one that is not a language code refused with one line:
    ``en,fr`` (one value) would go on the card as a code the Hub does not know.

    >>> check_languages(["en", "pt-BR"])
    ['en', 'pt-BR']
    >>> check_languages(["en,fr"])
    Traceback (most recent call last):
    selfinstruct.config.UserError: --language: 'en,fr' is not a language code (ISO 639: en, fr, zh; give several as --language en fr)
    """
    for code in codes:
        if not _LANGUAGE.fullmatch(code):
            raise UserError(f"--language: {code!r} is not a language code (ISO 639: en, fr, zh; give several as "
                            "--language en fr)")
    return list(dict.fromkeys(codes))


# A Hub license id (apache-2.0, cc-by-4.0, openrail++, other): the card's YAML `license:` field is read as one.
_LICENSE = re.compile(r"[A-Za-z0-9.+-]+")


def check_card_text(flag: str, value: str | None) -> None:
    """Refuse a ``--name`` or ``--license`` with a control character or a line break in it: the card's
    title is one Markdown line (`# NAME`), and a newline there split it; the header's values are one line too.

    >>> check_card_text("--name", "Demo data")
    >>> check_card_text("--name", "Demo\\ndata")
    Traceback (most recent call last):
    selfinstruct.config.UserError: --name: 'Demo\\ndata' has a control character (U+000A): a card's field is one line of plain text
    """
    import unicodedata

    bad = next((c for c in value or "" if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise UserError(f"{flag}: {value!r} has a control character (U+{ord(bad):04X}): a card's field is one line "
                        "of plain text")


def check_license(license: str | None) -> str:
    """``--license`` as the card's `license:` field (``other`` when not given), refused with one line
    when it is not a plain license id: the Hub reads the field as an id from its list, and a value such as
    ``Apache 2.0`` or ``MIT; see LICENSE`` is no license it knows.

    >>> check_license(None), check_license("cc-by-4.0")
    ('other', 'cc-by-4.0')
    >>> check_license("Apache 2.0")
    Traceback (most recent call last):
    selfinstruct.config.UserError: --license: 'Apache 2.0' is not a license id (letters, digits, '.', '-' and '+' only, as the Hub's ids: apache-2.0, cc-by-4.0, mit, other)
    """
    if license is None:
        return "other"
    check_card_text("--license", license)
    if not _LICENSE.fullmatch(license):
        raise UserError(f"--license: {license!r} is not a license id (letters, digits, '.', '-' and '+' only, as "
                        "the Hub's ids: apache-2.0, cc-by-4.0, mit, other)")
    if license != license.lower():  # the Hub's list has "apache-2.0", and takes "Apache-2.0" for no license
        raise UserError(f"--license: {license!r} is not a license id: the Hub's ids are lower case, give "
                        f"{license.lower()!r}")
    return license


def run(args) -> int:
    from rich.console import Console

    if args.fmt not in FORMATS:
        raise UserError(f"unknown format '{args.fmt}' (choose from {', '.join(FORMATS)})")
    check_output(args.out, [args.source])
    # Before the source is read and converted; given as typed, as a trailing slash says "a folder".
    fit, shape = FILE_FORMATS.get(args.fmt, ("", ""))
    check_file_target(args.out, folder=args.fmt == "hf", example=f"data{fit}",
                      writes=f"--format {args.fmt} writes one file ({shape})")
    check_suffix(args.out, args.fmt)
    if args.fmt == "hf":
        check_hf_folder(Path(args.out))
    if not args.card and args.fmt != "hf":
        # The card's fields without the card: taken and unused, the user would look for a card never written.
        given = next((f"--{k}" for k in ("license", "name", "language") if getattr(args, k) is not None), None)
        if given:
            raise UserError(f"{given} sets a field of the dataset card, which export writes with --card (always for "
                            f"--format hf): add --card, or leave {given} out")
    languages = check_languages(args.language or ["en"])
    check_card_text("--name", args.name)
    license = check_license(args.license)
    card = None
    if args.card or args.fmt == "hf":
        from selfinstruct import card as cards

        out = Path(args.out)
        card = out / "README.md" if args.fmt == "hf" else out.parent / "README.md"
        if args.fmt != "hf" and card.resolve() == out.resolve():
            # Else the data was written there, and then the card refused as a README.md not ours.
            raise UserError(f"{args.out}: --card writes the dataset card there (README.md, beside the output): "
                            f"give the data another name, such as {out.parent / f'data{fit}'}")
        if args.fmt != "hf" and card.is_dir():
            raise UserError(f"{card}: is a folder, not a card selfinstruct wrote; export to another folder or move "
                            "it away")
        refuse_special_file(card, "--card")  # its text is read just below: a FIFO's open waits for ever
        if args.fmt != "hf" and card.exists() and cards.MARK not in card.read_text(encoding="utf-8", errors="replace"):
            raise UserError(f"{card}: exists and is not a card selfinstruct wrote; export to another folder or move it away")
        if args.fmt != "hf":
            cards.check_card_of(card, Path(args.out).name)
        facts = cards.gather(args.source)  # read before writing: a bad run folder stops here
    # A killed export's temps of what this one writes (their pid dead), before the work: a rerun
    # stopped again before its write would leave its own beside them.
    remove_stale_temps(args.out)
    if card is not None:
        remove_stale_temps(card)
    left_out: dict = {}
    source = lambda quiet=False: iter_located(args.source, quiet=quiet)  # noqa: E731
    n = export_records(source, args.fmt, args.out, str(args.source), left_out, need_answers=True)
    console = Console(stderr=True)
    # The path as typed and the input's field names are the user's text: an ESC or a newline in them
    # is shown escaped (printable), and a [tag] printed as it is, not read as markup.
    console.print(f"wrote {counted(n, 'row')} as {args.fmt} to {printable(args.out)}", highlight=False, markup=False)
    if dropped := fields_left_out(left_out):
        console.print(printable(dropped), highlight=False, markup=False, soft_wrap=True)
    if card is not None:
        data_files = "data-*.arrow" if args.fmt == "hf" else Path(args.out).name
        text = cards.render(facts, n, args.fmt, data_files, license, args.name or "", languages)
        cards.write_card(card, text, [args.source], data_files)  # checked again: another export may have written one
        console.print(f"dataset card -> {printable(card)}", highlight=False, markup=False)
    console.print(f"[dim]{USAGE_HINTS[args.fmt]}[/dim]", highlight=False)
    return 0
