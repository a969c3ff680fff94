"""The one data layer: every command reads its records here and writes its files through here.

Reading, one policy for every file:

- **Encoding**: UTF-8; a leading byte-order mark is accepted everywhere. Anything
  else is one line naming the file (and line) and the byte (UTF-16, by its mark); a JSON string escaping half
  of a UTF-16 pair (``"\\ud800"``) is one line naming the field.
- **Shapes**: a run folder, an Alpaca JSON list or JSONL (both read as a stream), self-instruct JSONL,
  ShareGPT and messages records, parquet, a ``datasets`` folder (``read_located``; a
  ``DatasetDict``'s train split, said on stderr when it has others, or ``DIR/NAME``'s split).
- **A cut-off last line** (no newline at the end): in a run folder's own JSONL
  files it is a write a kill interrupted, never acknowledged, so readers skip it
  and resume cuts it off (``runfolder.repair``). In any other file it is data
  like any other line: if it is not valid JSON, that is an error naming file:line.
- **Errors** name file, line and field: ``data.jsonl:7: field 'output': must be a string``.

Writing: ``write_atomic`` (a temp file in the same folder, fsync, rename; the temp
is removed on any error; a full or read-only disk is one line). No command
writes into a run folder's own files except the one holding its lock
(``run_lock``), and ``check_output`` refuses an ``--out`` that would.

A run folder is recognised by ``.selfinstruct-run`` (a marker only we write, holding
the format version). Folders made before the marker (``config.yaml``,
``responses.jsonl`` and ``kept.jsonl``, all written by us) are read as run folders
too, and ``generate`` adds the marker when it resumes one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator

from pydantic import ValidationError

from selfinstruct.config import TOO_DEEP, UserError, format_validation_error, printable
from selfinstruct.filters import no_visible_text

MARKER = ".selfinstruct-run"
LOCK = ".selfinstruct-lock"
FORMAT_VERSION = 1
# Files a run folder owns: no command but the lock holder writes them, no --out may name them.
RUN_FILES = frozenset({"config.yaml", "responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl",
                       "stats.json", "data.json", "judgements.jsonl", "judge_stats.json", "judge_session.json",
                       "vllm.log", "seeds.json", "session.json", MARKER, LOCK})
RUN_JSONL = ("responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl", "judgements.jsonl")


NEWLINE = b"\n"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# --------------------------------------------------------------------------- reading


def read_text(path: str | Path, what: str = "file") -> str:
    """A whole UTF-8 file (a BOM is dropped); missing, a folder, unreadable or not UTF-8 is one line."""
    path = Path(path)
    return _decode(_opened(path, what, Path.read_bytes), str(path), whole=True)


def _opened(path: Path, what: str, read):
    """``read(path)``; a missing path, a folder, an unreadable file or one that is no regular file
    (``refuse_special_input``) is one line."""
    refuse_special_input(path, what)
    try:
        return read(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({_why(e)})") from None


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is, in words, when it is there and is neither a regular file nor a folder (a
    link followed); None otherwise. Looked at with stat, which unlike open never waits on a FIFO.

    >>> special_kind("/dev/null"), special_kind("/"), special_kind("/no/such/file")
    ('a device', None, None)
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    return "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
        else "not a regular file"


def refuse_special_input(path: str | Path, what: str = "file") -> None:
    """Refuse, before opening it, an input that is a pipe, a socket or a device: `--config` naming a
    FIFO with no writer waited forever (its open waits for one), and /dev/zero was read without end."""
    if kind := special_kind(path):
        why = " (opening a FIFO waits for a writer)" if kind.startswith("a pipe") else ""
        raise UserError(f"{path}: is {kind}, not a regular file; selfinstruct reads a {what} from a regular file "
                        f"only{why}: write it to a file and give that")


def _decode(data: bytes, where: str, whole: bool = False) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = f":{data.count(NEWLINE, 0, e.start) + 1}" if whole else ""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # what Windows tools write as "Unicode"
            raise UserError(f"{where}{line}: not UTF-8 text but UTF-16 (it starts with UTF-16's byte-order mark); "
                            "save it as UTF-8") from None
        raise UserError(f"{where}{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


# JSON may escape half of a UTF-16 pair ("\\ud800"); json.loads makes it a string that no UTF-8
# file can hold, so the first write of it would crash. Only text with such an escape is searched.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(obj, field: str = "") -> tuple[str, str] | None:
    """(field, character) of the first string in a JSON value holding a lone surrogate, or None.

    >>> _lone_surrogate({"messages": [{"content": "ok"}, {"content": "bad \\ud800"}]})
    ('messages[1].content', '\\ud800')
    """
    if isinstance(obj, str):
        m = None if obj.isascii() else _SURROGATE.search(obj)
        return (field, m.group()) if m else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        name = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key
        found = _lone_surrogate(key, name) or _lone_surrogate(value, name)
        if found:
            return found
    return None


def text_only(obj, where: str):
    """``obj``, or one line naming its field that holds a lone surrogate."""
    if found := _lone_surrogate(obj):
        field, char = found
        raise UserError(f"{where}: field '{field}': holds {char.encode('unicode_escape').decode()}, half of a "
                        "UTF-16 surrogate pair, which is not text")
    return obj


def iter_jsonl(path: str | Path, run_file: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, object) per non-blank line, read as a stream.

    ``run_file``: a run folder's own file, where a missing file is empty and an unterminated
    last line is a write still in progress (or cut by a kill): skipped, never an error.

    >>> # b'{"a": 1}\\n{"b"' as a run file yields (1, {'a': 1}) only; as a plain file, an error at :2
    """
    path = Path(path)
    for n, raw in _lines(path, run_file):
        obj = _parse_line(raw, path, n)
        if obj is not _BLANK:
            yield n, obj


_BLANK = object()


def _parse_line(raw: bytes, path: Path, n: int):
    """One JSONL line's object (``_BLANK`` for a blank line), as ``iter_jsonl`` reads it."""
    line = _decode(raw, f"{path}:{n}")
    if not line.strip():
        return _BLANK
    try:
        obj = _json_line(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: {_line_problem(e)}") from None
    except ValueError:
        raise UserError(f"{path}:{n}: not valid JSON ({_TOO_LONG})") from None
    except RecursionError:
        raise UserError(f"{path}:{n}: not valid JSON ({_TOO_DEEP})") from None
    return text_only(obj, f"{path}:{n}") if _SURROGATE_ESCAPE.search(line) else obj


def _json_line(line: str):
    """One JSONL line's value; where it is no JSON, the error is of the line without its ending: with
    it, a line cut inside a string was "Invalid control character" (the newline, inside the string),
    and one cut after a key's colon "Expecting value at column 1" (of the line after it). Read as it is
    first, so that a good line (every line of a resume at a million records) is not copied."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return json.loads(line.rstrip("\r\n"))


def _line_problem(e: json.JSONDecodeError) -> str:
    """What is wrong with a JSONL line ``_json_line`` refused, after ``file:line: ``: a line that
    ends before its JSON does is said to be cut short, any other error as json says it.

    >>> for text in ('{"id": "r1", "instruction": "Wri', '{"a": 1, "b": ', '{"a": 1 "b": 2}'):
    ...     try: _json_line(text + "\\n")
    ...     except json.JSONDecodeError as e: print(_line_problem(e))
    not complete JSON: the line is cut short (it ends inside a string begun at column 29)
    not complete JSON: the line is cut short (it ends before its JSON does)
    not valid JSON (Expecting ',' delimiter at column 9)
    """
    if e.msg.startswith("Unterminated string"):
        return f"not complete JSON: the line is cut short (it ends inside a string begun at column {e.colno})"
    if e.pos >= len(e.doc.rstrip(_JSON_WS)):
        return "not complete JSON: the line is cut short (it ends before its JSON does)"
    return f"not valid JSON ({_json_problem(e)})"


# How the json module's messages begin ("Expecting value", "Extra data", "Invalid \\escape").
_JSON_SAYS = ("Expecting", "Extra data", "Invalid")


def _json_problem(e: json.JSONDecodeError) -> str:
    r"""json's message with its column (the line is the caller's): "Expecting value" said no place in a
    long line, and "Invalid control character at" ended at "at"; and which control character it is.

    >>> for text in ('{"a": "x\ty"}', '{"a": 1 "b": 2}'):
    ...     try: json.loads(text)
    ...     except json.JSONDecodeError as e: print(_json_problem(e))
    Invalid control character at column 9 (U+0009 inside a string; JSON writes it escaped, as \t)
    Expecting ',' delimiter at column 9
    """
    msg = e.msg
    if not msg.endswith(" at"):
        # json's own messages (this module's say where in their words: "after the list's last item")
        return f"{msg} at column {e.colno}" if msg.startswith(_JSON_SAYS) else msg
    msg = f"{msg} column {e.colno}"
    char = getattr(e, "char", None)  # ``_json_list_items``'s errors say it: their pos is not in their doc
    if char is None:
        char = e.doc[e.pos] if 0 <= e.pos < len(e.doc) else ""
    if msg.startswith("Invalid control character") and char and ord(char) < 0x20:
        msg += f" (U+{ord(char):04X} inside a string; JSON writes it escaped, as {json.dumps(char)[1:-1]})"
    return msg


def _lines(path: Path, run_file: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file's lines, with ``iter_jsonl``'s policy for a missing file
    and a run file's unterminated last line."""
    if run_file:
        from selfinstruct.runfolder import check_regular_file  # runfolder imports this module

        check_regular_file(path)  # a FIFO's open waits for a writer that never comes
    else:
        refuse_special_input(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if run_file:
            return
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({_why(e)})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if run_file and not raw.endswith(b"\n"):
                return
            yield n, raw


_ID_FIRST = b'{"id":"'  # how our writer (pydantic's model_dump_json) starts a record's line


def run_file_ids(path: str | Path) -> Iterator[str]:
    r"""The ``id`` of each record of a run folder's own JSONL file, as ``read_jsonl`` gives it.

    A line that starts with its id (every line our writer makes) is not parsed further: a
    resume reads the ids of every rejected candidate, 1.5 KB of JSON each, and at a few
    hundred thousand that took seconds. Any other line is parsed whole.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "r.jsonl"
    >>> _ = p.write_text('{"id":"r1-0","raw":"x"}\n{"raw": "y", "id": "r2-0"}\n{"id":"cut')
    >>> list(run_file_ids(p))
    ['r1-0', 'r2-0']
    """
    path = Path(path)
    for n, raw in _lines(path, run_file=True):
        if raw.startswith(_ID_FIRST):
            end = raw.find(b'"', len(_ID_FIRST))
            ref = raw[len(_ID_FIRST):end]
            if end > 0 and b"\\" not in ref and ref.isascii():
                yield ref.decode("ascii")
                continue
        obj = _parse_line(raw, path, n)  # a line that is no JSON (cut short, say) is said as such
        if obj is not _BLANK:
            try:
                yield obj["id"]
            except (KeyError, TypeError, IndexError):
                raise UserError(f"{path}:{n}: not a record with an 'id'") from None


# How our writer starts a rejected record's line: its id, stage and reason, in that order. The
# stats of a run want only the stage and the reason's head (before its first colon): from
# these bytes, where they hold no escape, instead of parsing 1.5 KB of JSON a line.
_REJECTION_HEAD = re.compile(rb'\{"id":"[^"\\]*","stage":"([^"\\]*)","reason":"([^"\\:]*)[":]')


def rejection_heads(path: str | Path) -> Iterator[tuple[str, str]]:
    r"""(stage, the reason up to its first colon) of each record of a run folder's
    ``rejected.jsonl``, as ``read_jsonl``'s records give them, for its counts (``compute_stats``).
    A line our writer made is read from its first bytes; any other line is parsed whole.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "rejected.jsonl"
    >>> _ = p.write_text('{"id":"r1-0","stage":"dedup","reason":"duplicate: ROUGE-L 0.9"}\n'
    ...                  '{"reason": "too short", "stage": "filter", "id": "r1-1"}\n{"id":"cut')
    >>> list(rejection_heads(p))
    [('dedup', 'duplicate'), ('filter', 'too short')]
    """
    path = Path(path)
    for n, raw in _lines(path, run_file=True):
        if m := _REJECTION_HEAD.match(raw):
            try:
                yield m[1].decode("utf-8"), m[2].decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass  # parsed whole below, which names the line
        obj = _parse_line(raw, path, n)
        if obj is _BLANK:
            continue
        try:
            yield obj["stage"], obj["reason"].split(":", 1)[0]
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{path}:{n}: not a rejected record (with a 'stage' and a 'reason')") from None


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The objects of a run folder's JSONL file (missing = empty; a cut last line skipped)."""
    for _, obj in iter_jsonl(path, run_file=True):
        yield obj


def validated(model, obj, where: str, context: dict | None = None):
    """``obj`` as a ``model`` object; a schema error is one line naming ``where`` (file:line) and the field."""
    try:
        return model.model_validate(obj, context=context)
    except ValidationError as e:
        # A record's key its model does not have (an Instance's) is a field, as a seed file's is, not a --config option.
        raise UserError(format_validation_error(e, where, unknown="unknown field")) from None


def iter_models(path: str | Path, model, run_file: bool = True, context: dict | None = None) -> Iterator:
    """A JSONL file's lines as ``model`` objects, read as a stream; a schema error names file:line and field.

    A line is first given to pydantic's own JSON parser (``model_validate_json``: 1.6x
    json.loads and ``model_validate`` on a run's 1.5 KB rejected lines, most of what a
    resume reads). Any line it refuses (a BOM, a lone surrogate's escape, bytes that are not
    UTF-8, a schema error, a blank line) is read as ``iter_jsonl`` reads it, which gives the
    same object or names the file, line and field. ``context`` is handed to the model's
    validators (what a check needs that the line alone does not hold).
    """
    path = Path(path)
    for n, raw in _lines(path, run_file):
        try:
            rec = model.model_validate_json(raw, context=context)
        except ValidationError:
            obj = _parse_line(raw, path, n)
            if obj is _BLANK:
                continue
            rec = validated(model, obj, f"{path}:{n}", context)
        yield rec


def read_models(path: str | Path, model, run_file: bool = True) -> list:
    """``iter_models`` as a list."""
    return list(iter_models(path, model, run_file))


def read_json(path: str | Path, what: str = "file"):
    """One JSON document; broken JSON names file:line."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({_json_problem(e)})") from None
    except ValueError:
        raise UserError(f"{path}: not valid JSON ({_TOO_LONG})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON ({_TOO_DEEP})") from None


# json's decoder recurses once per level: a value nested past Python's recursion limit (about a
# thousand levels) is a RecursionError traceback; no record nests so, so it is one line instead.
_TOO_DEEP = f"{TOO_DEEP}; a record holds text, not a thousand levels of lists"
# json reads a number whole, and Python no int of over 4,300 digits: a ValueError, not a JSONDecodeError.
_TOO_LONG = f"a number of over {sys.get_int_max_str_digits():,} digits, more than Python reads"


def json_list_items(text):
    r"""(line, object) for each item of a JSON list, so an error can name the item's line.

    The standard library's decoder reads one item at a time (json.loads cannot say where
    an item began); a malformed list raises JSONDecodeError with its own line. ``text``: the
    list's text, or its pieces in order (``_text_pieces``: a file a block at a time), of which
    only the part not yet given as items is held.

    >>> list(json_list_items('[{"a": 1},\n {"b": 2}]'))
    [(1, {'a': 1}), (2, {'b': 2})]
    >>> list(json_list_items(['[{"a"', ': 1},\n {"b": 2', '}]']))
    [(1, {'a': 1}), (2, {'b': 2})]
    """
    for line, obj, _ in _json_list_items([text] if isinstance(text, str) else text):
        yield line, obj


_JSON_WS = " \t\r\n"
_PIECE = 1 << 20  # characters read at a time: a record's text is a few KB


def _json_list_items(pieces, bookmark=None) -> Iterator[tuple[int, object, bool]]:
    """``json_list_items``'s (line, object), and whether the item's text escapes half of a
    UTF-16 pair (``_SURROGATE_ESCAPE``: only such an item is searched for one, by ``text_only``).

    ``bookmark``: called, it marks where ``pieces`` has read to, and gives a function that reads
    the text on from there again (``_text_pieces``'s ``mark``). With it, a string cut by a piece's
    end is read on without holding more than ``_HELD_STRING`` of it (``_string_end``): a string
    that runs on for megabytes is either a broken one (said as soon as it breaks) or one that
    is read again from the mark once its end is found.
    """
    pieces = iter(pieces)
    decoder = json.JSONDecoder()
    buf, eof = "", False
    line, counted = 1, 0  # the line at buf[counted]: counted on from the last item, not from the start
    shifted = 0  # characters dropped from buf's front, for an error's position
    line_from = 0  # where the line at buf's front starts, counted from the start (an error's column)
    hold = None  # where the text must stay from, counted from the start (a comma an error may yet name)

    def more(at: int, past: int = -1) -> int:
        """Drop buf before ``at`` (or ``hold``) and read on: at least as much as is held, so an
        item longer than a piece is parsed again a few times, not once a piece, and at least to the
        text's position ``past`` (counted from the start). Returns at's new index."""
        nonlocal buf, eof, line, counted, shifted, line_from
        keep = at if hold is None else min(at, hold - shifted)
        line, counted = line + buf.count("\n", counted, keep), 0
        if (nl := buf.rfind("\n", 0, keep)) >= 0:
            line_from = shifted + nl + 1
        shifted += keep
        got, want = [buf[keep:]], max(_PIECE, len(buf) - keep, past + 1 - shifted - (len(buf) - keep))
        size = 0
        while size < want:
            piece = next(pieces, None)
            if piece is None:
                eof = True
                break
            got.append(piece)
            size += len(piece)
        buf = "".join(got)
        return at - keep

    def error(msg: str, pos: int) -> json.JSONDecodeError:
        e = json.JSONDecodeError(msg, buf, pos)
        nl = buf.rfind("\n", 0, pos)
        e.lineno, e.pos = line + buf.count("\n", counted, pos), pos + shifted
        e.colno = pos + 1 - (nl + 1 if nl >= 0 else line_from - shifted)
        e.char = buf[pos] if pos < len(buf) else ""  # type: ignore[attr-defined]  # e.pos is past buf
        return e

    def skip(i: int) -> int:
        """The index of the first character at or after ``i`` that is not JSON whitespace
        (len(buf) at the end of the text), reading on as needed."""
        while True:
            while i < len(buf) and buf[i] in _JSON_WS:
                i += 1
            if i < len(buf) or eof:
                return i
            i = more(i)

    i = skip(0)
    if not buf.startswith("[", i):
        raise error("Expecting '['", i)
    i += 1
    while True:
        i = skip(i)
        if buf.startswith("]", i):
            i += 1
            break
        while True:
            try:
                obj, end = decoder.raw_decode(buf, i)
            except RecursionError:
                raise error(_TOO_DEEP, i) from None
            except json.JSONDecodeError as e:
                # Broken, not cut off by the piece's end: the whole rest is here, or the error is
                # one more text cannot change. Reading on for it read the rest of the file (the
                # buffer doubles), 249 MB held for a broken item early in a 113 MB list.
                if eof or _broken_before_end(e, len(buf)):
                    raise error(e.msg, e.pos) from None
                if e.msg.startswith("Unterminated string"):
                    # Cut inside a string: find where the string ends before holding any more of
                    # it. A string that never ends held the rest of the file (80 MB for 40 MB).
                    again = bookmark() if bookmark else None
                    msg, at, read = _string_end(buf, e.pos, pieces, _HELD_STRING if again else None)
                    if msg:
                        err = error(msg, e.pos)  # on the string's line: it holds no newline up to there
                        err.colno += at - e.pos
                        err.char = buf[at] if at < len(buf) else ""  # type: ignore[attr-defined]
                        err.pos = at + shifted
                        raise err from None
                    if read is not None:  # its end is in what was read: all of it goes on buf (where
                        buf += "".join(read)  # the bookmark says the text read so far ends)
                    else:
                        pieces = again()
                        i = more(i, past=at + shifted)
                    continue
                i = more(i)
                continue
            except ValueError:  # not a JSONDecodeError (caught above): a number too long to read
                raise error(_TOO_LONG, i) from None
            # A number may go on in the next piece: "1" of "1.5e3". Three characters past it that
            # it did not take ("e+5") are enough to say that it ends here.
            if len(buf) - end >= 3 or eof:
                break
            i = more(i)
        line, counted = line + buf.count("\n", counted, i), i
        yield line, obj, bool(_SURROGATE_ESCAPE.search(buf, i, end))
        i = skip(end)
        if buf.startswith(",", i):
            comma = hold = shifted + i
            i, hold = skip(i + 1), None
            if buf.startswith("]", i):  # JavaScript's [a, b,]: json, pandas and datasets all refuse it
                raise error("a comma after the last item; JSON allows none", comma - shifted)
        elif not buf.startswith("]", i):
            raise error("Expecting ',' delimiter", i)  # where json.loads says it of the whole list
    # After the list, JSON's whitespace only: str.strip's also took a form feed, \x0b or a
    # no-break space, which json.loads, pandas and datasets all refuse after the list.
    i = skip(i)
    if i < len(buf):
        raise error("Extra data", i)


# The decoder reads left to right and stops at the first character it cannot take, so an error far
# from the text's end is the one the whole text gives, with one exception: a string the text ends
# inside is "Unterminated" at its start, however far back. A cut token's error is at most this far
# from the end ("-Infinit": 8 characters; "\\u12" of a string: 5).
_CUT_TOKEN = 16


def _broken_before_end(e: json.JSONDecodeError, end: int) -> bool:
    """Whether ``e``, raised on text cut at ``end``, is the error the whole text would give.

    >>> def err(t):
    ...     try: json.loads(t)
    ...     except json.JSONDecodeError as e: return e
    >>> broken, cut = '{"a": 1 "b": 2, "c": "xxxxxxxxxxxxxxxxxxx"}', '{"a": 1, "c": "xxxxxxxxxxxxxxxxxxxxxx'
    >>> _broken_before_end(err(broken), len(broken)), _broken_before_end(err(cut), len(cut))
    (True, False)
    >>> _broken_before_end(err('{"a": nul'), 9)  # "null" cut: read on
    False
    """
    return not e.msg.startswith("Unterminated string") and e.pos < end - _CUT_TOKEN


_HELD_STRING = 1 << 21  # characters of a cut string held while its end is looked for; past it, read again
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')  # where a JSON string's plain characters stop
_STRING_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u([0-9a-fA-F]{4}))')
_LONGEST_ESCAPE = 12  # a surrogate pair's two escapes: \ud83d\ude00


def _string_end(buf: str, start: int, pieces, cap: int | None) -> tuple[str, int, list | None]:
    r"""Read on from ``buf``, cut inside the JSON string whose quote is at ``start``, to where the
    string ends: ("", its closing quote's index, the pieces read) when it ends well, the pieces
    None where more than ``cap`` characters came (let go: read them again); (the decoder's message,
    the index it names, None) when the string breaks or the text ends inside it. Indexes go on
    past ``buf``'s end into the pieces; nothing past the string is read but the piece it ends in.

    >>> _string_end('["ab', 1, iter(['c\\n d", 1]']), None)
    ('', 9, ['c\\n d", 1]'])
    >>> _string_end('["ab', 1, iter(['c\\q d", 1]']), None)
    ('Invalid \\escape', 5, None)
    >>> _string_end('["ab', 1, iter(['c d']), 0)  # the text ends inside the string
    ('Unterminated string starting at', 1, None)
    """
    text, base, p = buf, 0, start + 1  # text[0] is buf[base] (or a piece's past it); text[p:] not yet scanned
    pair = -1  # where an escape of a surrogate pair's first half starts (what follows it is read with it)
    last = -1  # where the last escape starts (at the text's end, the decoder wants a character after one)
    read: list | None = []
    size, ended = 0, False
    while True:
        m = _STRING_STOP.search(text, p)
        q = m.start() if m else len(text)
        if m and text[q] == '"':
            return "", base + q, read
        cut = m is not None and text[q] == "\\" and not ended and len(text) - q <= _LONGEST_ESCAPE
        if m and not cut:
            if text[q] == "\\" and (esc := _STRING_ESCAPE.match(text, q)):
                pair = q if esc[1] and 0xD800 <= int(esc[1], 16) <= 0xDBFF else -1
                last, p = q, esc.end()
                if not (ended and p == len(text)):
                    continue
                q = last  # the text ends with this escape
        if m and not cut or ended:
            # Broken at q (a control character, a bad escape) or the text ends inside the string:
            # the decoder's own words for it.
            w = pair if 0 <= pair < q and pair + 6 == q else q
            try:
                json.decoder.scanstring('"' + text[w:], 1)
            except json.JSONDecodeError as e:
                if not e.msg.startswith("Unterminated string"):
                    return e.msg, base + w + e.pos - 1, None
            return "Unterminated string starting at", start, None
        keep = q  # from here on is not yet certain: an escape the piece may cut, its pair's first half
        if pair >= 0 and pair + 6 == keep:
            keep = pair
        piece = next(pieces, None)
        if piece is None:
            ended, piece = True, ""
        elif read is not None:
            size += len(piece)
            if cap is None or size <= cap:
                read.append(piece)
            else:
                read = None
        text, base, p, pair = text[keep:] + piece, base + keep, 0, -1


def _text_pieces(path: Path, what: str, mark: list | None = None, at: tuple[int, int] = (0, 0)) -> Iterator[str]:
    """A UTF-8 file's text, a block at a time (a BOM dropped); bytes that are not UTF-8 are
    one line naming the line and byte, as ``read_text`` says it.

    ``mark``: set, before each block's text is given, to where that text ends in the file (its
    byte and the newlines before it), an ``at`` to read the text on from there again.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with _opened(path, what, lambda p: open(p, "rb")) as f:
        read, lines = at  # bytes and newlines read so far
        first = not read
        f.seek(read)
        while True:
            block = f.read(_PIECE)
            held = decoder.getstate()[0]  # a character's first bytes, from the block before: never a newline
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.object: the held bytes, then this block
                start = read - len(held)
                raise UserError(f"{path}:{lines + e.object.count(NEWLINE, 0, e.start) + 1}: not UTF-8 text "
                                f"({e.reason} at byte {start + e.start})") from None
            read, lines = read + len(block), lines + block.count(NEWLINE)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                if mark is not None:
                    mark[:] = [read - len(decoder.getstate()[0]), lines]
                yield text
            if not block:
                return


def emptied_by(path: Path) -> str:
    """Why a ``kept.jsonl`` that dedup or decontaminate wrote holds nothing, from the
    ``summary.json`` beside it ("" for any other file): an empty result is the check's
    answer, not a broken file, and the user should hear which check gave it.

    >>> import json, tempfile; d = Path(tempfile.mkdtemp())
    >>> _ = (d / "summary.json").write_text(json.dumps({"input": "d.json", "method": "rougeL", "records": 2, "kept": 0, "removed": 2}))
    >>> emptied_by(d / "kept.jsonl").replace(str(d), "DIR")
    ': dedup removed all 2 records of d.json (each with its reason in DIR/removed.jsonl)'
    """
    if path.name != "kept.jsonl":
        return ""
    by, s = filtered_by(path.parent)
    if by is None or s.get("kept") != 0 or not s.get("removed"):
        return ""
    return f": {by} removed all {s['removed']} records of {s.get('input')} (each with its reason in " \
           f"{path.parent / 'removed.jsonl'})"


def filtered_by(folder: Path) -> tuple[str | None, dict]:
    """('dedup' or 'decontaminate', its summary) for a folder one of them wrote, from the
    ``summary.json`` there; (None, {}) for any other folder."""
    summary = Path(folder) / "summary.json"
    if not summary.is_file():
        return None, {}
    try:
        s = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    if not isinstance(s, dict):
        return None, {}
    by = "decontaminate" if s.get("decontamination") is True else "dedup" if "method" in s else None
    return by, (s if by else {})


def refuse_filtered_folder(path: Path) -> None:
    """Refuse, naming its kept.jsonl, a folder dedup or decontaminate wrote given as a dataset: its
    records are one of its files, not the folder (every reader of a dataset says the same)."""
    if (by := filtered_by(path)[0]) and (path / "kept.jsonl").is_file():
        raise UserError(f"{path}: is a {by} output folder, not a dataset; give {path / 'kept.jsonl'} "
                        f"(the records it kept)")


def read_json_records(path: str | Path, what: str = "file") -> list[tuple[str, object]]:
    """(where, object) for a JSON list or a JSONL file; where is ``file:line`` (``file:line: item i`` in a list)."""
    return list(iter_json_records(path, what))


def iter_json_records(path: str | Path, what: str = "file") -> Iterator[tuple[str, object]]:
    """``read_json_records`` as a stream: a JSONL file is read a line at a time, a JSON list an
    item at a time as its text comes (at a million records the whole text, its bytes and its
    records held together were three times the file)."""
    path = Path(path)
    _refuse_a_pipe(path)
    if path.name in FILTERED[:2] and (path.parent / FILTERED_MARKER).is_file():  # export, audit, dedup read them
        check_filtered_format(path.parent)
    first = _first_text_byte(path, what)
    if first is None:
        why = emptied_by(path)
        raise UserError(f"{path}: no records left{why}" if why else f"{path}: {what} is empty")
    if first == b"[":  # a JSON list, an item at a time as its text is read (Alpaca's data.json)
        mark: list = []

        def bookmark():  # where the text read so far ends; read from there again, a string's end found
            at = tuple(mark)
            return lambda: _text_pieces(path, what, mark, at)

        items = _json_list_items(_text_pieces(path, what, mark), bookmark)
        i = 0
        while True:
            try:
                line, obj, escaped = next(items)
            except StopIteration:
                return
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({_json_problem(e)})") from None
            where = f"{path}:{line}: item {i}"
            yield where, text_only(obj, where) if escaped else obj
            i += 1
    read = 0
    for n, raw in _lines(path, run_file=False):
        line = _decode(raw, f"{path}:{n}")
        if line.strip():
            try:
                obj = _json_line(line)
            except RecursionError:
                raise UserError(f"{path}:{n}: not valid JSON ({_TOO_DEEP})") from None
            except json.JSONDecodeError as e:
                whole = None if read else _whole_json(read_text(path, what))  # after a record, never one object
                if isinstance(whole, dict):  # valid JSON, spread over lines: line 1 alone was never the problem
                    # {"data": [...]}, as many exports wrap their rows: name the list that may be them.
                    lists = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
                    hint = f"; its list '{lists[0]}' may hold the records: give that list alone" if lists else ""
                    raise UserError(f"{path}: one JSON object, not a list of records nor a record a line "
                                    f"(JSONL){hint}") from None
                if not read and first not in (b"{", b"["):
                    # A CSV or text file: "not valid JSON (Expecting value at column 1)" said nothing of what it is.
                    shown = printable(line.strip()[:40] + ("..." if len(line.strip()) > 40 else ""))
                    table = path.suffix.lower() in (".csv", ".tsv")
                    kind = f"a {path.suffix} file, " if table or path.suffix.lower() == ".txt" else ""
                    how = (" (pandas: read_csv(...).to_json(out, orient='records', lines=True))" if table else "")
                    raise UserError(f"{path}: {kind}not JSON (it begins {shown!r}); selfinstruct reads JSON, JSON "
                                    f"Lines or parquet: convert it{how}") from None
                raise UserError(f"{path}:{n}: {_line_problem(e)}") from None
            except ValueError:  # not a JSONDecodeError (caught above): a number too long to read
                raise UserError(f"{path}:{n}: not valid JSON ({_TOO_LONG})") from None
            read += 1
            yield f"{path}:{n}", text_only(obj, f"{path}:{n}") if _SURROGATE_ESCAPE.search(line) else obj


def _refuse_a_pipe(path: Path) -> None:
    """Refuse a data file that is a pipe or device (`/dev/stdin`, `<(zcat x.gz)`): its first byte is
    read to tell a JSON list from JSONL and the file opened again, and the commands read their input
    more than once; it was "no records"."""
    if special_kind(path):
        raise UserError(f"{path}: is not a regular file (a pipe or device, read more than once here): write it to "
                        "a file and give that")


def _first_text_byte(path: Path, what: str) -> bytes | None:
    """The file's first byte that is not whitespace (after a BOM), or None when it has none;
    a file that cannot be read, or is not UTF-8, is one line as ``read_text`` says it."""
    with _opened(path, what, lambda p: open(p, "rb")) as f:
        head = f.read(3)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            _decode(head + f.read(), str(path), whole=True)  # says UTF-16
        if head == b"\xef\xbb\xbf":
            head = b""
        while chunk := head or f.read(1 << 16):
            head = b""
            if stripped := chunk.lstrip(b" \t\r\n"):
                return stripped[:1]
    return None


def _whole_json(text: str):
    """The whole text as one JSON value, or None."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # a JSONDecodeError, or a number too long to read
        return None


# --------------------------------------------------------------------------- the Alpaca row


def json_kind(value) -> str:
    """A parsed JSON value as a message names it, in JSON's words: a null line said "NoneType", and
    ``{}`` "has []" (its sorted keys).

    >>> [json_kind(v) for v in (None, [], [1], {}, {"a": 1}, "x", 3, 2.5, True)]
    ['null', 'an empty list []', 'a list', 'an empty object {}', 'an object', 'a string', 'a number', 'a number', 'true']
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        what = "list" if isinstance(value, list) else "object"
        return f"an empty {what} {json.dumps(value)}" if not value else f"a{'n' * (what == 'object')} {what}"
    return "a string" if isinstance(value, str) else "a number"


# What a line that is no record, or {}, is told a record is. A reader of other layouts too passes its
# own (``dedup.READS``, ``seeds.READS``): "an Alpaca record has instruction..." sent a user whose file
# was all ShareGPT conversations looking for the wrong fix.
ALPACA_RECORD = "an Alpaca record is a JSON object with instruction, input and output"


def alpaca_row(obj, where: str, strict: bool = False, record: str = ALPACA_RECORD) -> dict:
    """The one Alpaca-row check: ``{"instruction", "input", "output"}`` as strings.

    ``instruction`` must be a non-empty string; ``input`` and ``output`` strings or absent
    (absent or null is ""). ``strict`` (seed files): no other field, and a non-empty output.
    ``record``: what the reader reads, said of a line that is no object or has no fields.

    >>> alpaca_row({"instruction": "Add.", "output": "2"}, "x")
    {'instruction': 'Add.', 'input': '', 'output': '2'}
    >>> alpaca_row({"instruction": None, "input": 3, "output": [], "x": 1}, "seeds.jsonl:2", strict=True)
    Traceback (most recent call last):
    selfinstruct.config.UserError: seeds.jsonl:2: field 'x': unknown field (and 3 more)
    >>> alpaca_row({"instruction": "\u200b"}, "x")
    Traceback (most recent call last):
    selfinstruct.config.UserError: x: field 'instruction': shows nothing (only invisible characters, such as a zero-width space)
    """
    if not isinstance(obj, dict):  # a null line said "got NoneType"
        raise UserError(f"{where}: is {json_kind(obj)}, not a record: {record}")
    if not obj:
        # The data layer's readers drop null fields (a dataset's column missing from a row): not "is {}".
        raise UserError(f"{where}: has no fields ({{}}, or only null ones): {record}")
    # Every problem is counted, the first said: "(and 2 more)", as a record's pydantic error says it
    # (config.format_validation_error), so one fix does not lead to the next refusal unwarned.
    problems = [f"field '{key}': unknown field" for key in sorted(set(obj) - {"instruction", "input", "output"})] \
        if strict else []
    row = {}
    for key in ("instruction", "input", "output"):
        value = obj.get(key)
        required = key == "instruction" or (strict and key == "output")
        if value is None:
            if required:
                problems.append(f"field '{key}': missing")
                continue
            value = ""
        if not isinstance(value, str):
            problems.append(f"field '{key}': must be a string, got {type(value).__name__}")
        elif required and no_visible_text(value):  # str.strip keeps a zero-width space: filter calls it empty
            problems.append(f"field '{key}': is empty" if not value.strip() else
                            f"field '{key}': shows nothing (only invisible characters, such as a zero-width space)")
        row[key] = value
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{where}: {problems[0]}{more}")
    return row


# --------------------------------------------------------------------------- run folders


def nothing_made(folder: Path) -> bool:
    """Whether a run folder holds no reply, record or failed prompt yet: a first session that
    stopped before its first request (a server that failed the preflight, a wrong --model), so
    a rerun with other options starts it afresh instead of being refused as a changed resume."""
    return all(not (folder / name).exists() or (folder / name).stat().st_size == 0
               for name in ("responses.jsonl", "kept.jsonl", "rejected.jsonl", "errors.jsonl"))


def is_run_folder(path: str | Path) -> bool:
    """A folder with our marker, or one made before the marker (config.yaml, responses.jsonl, kept.jsonl).
    A marker of another format (``check_run_format``) is one line, for every command that looks."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        check_run_format(path)
        return True
    return is_legacy_run_folder(path)


def check_run_format(folder: str | Path) -> None:
    """Refuse a run folder whose marker says another format than ``FORMAT_VERSION`` (a newer
    selfinstruct's) or is not our marker at all: the format was written and never read, so a run
    another version made was read, resumed and written as if it were this one's.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / MARKER).write_text('{"format": 2, "tool": "selfinstruct"}')
    >>> check_run_format(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    selfinstruct.config.UserError: .../.selfinstruct-run: says the run folder is format 2 (a newer selfinstruct's?), but this version reads and writes format 1 only: use the version that made the run
    """
    _check_format(Path(folder) / MARKER, "run folder", json.dumps(_MARKER_RECORD), "use the version that made the run")


def _check_format(marker: Path, what: str, ours: str, advice: str, aside: str = "") -> None:
    """Refuse ``marker`` (of a ``what``) unless it is our JSON saying format ``FORMAT_VERSION``; ``ours``:
    what this version writes there, said when it holds anything else (``aside``: more said of it)."""
    try:
        with open(marker, "rb") as f:
            head = f.read(4096)  # ours is 40 bytes
    except OSError as e:
        raise UserError(f"{marker}: cannot read ({_why(e)})") from None
    try:
        found = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        found = None
    fmt = found.get("format") if isinstance(found, dict) and found.get("tool") == "selfinstruct" else None
    if type(fmt) is int and fmt == FORMAT_VERSION:  # type: true == 1 in Python
        return
    if type(fmt) is int:
        newer = " (a newer selfinstruct's?)" if fmt > FORMAT_VERSION else ""
        raise UserError(f"{marker}: says the {what} is format {fmt}{newer}, but this version reads and writes "
                        f"format {FORMAT_VERSION} only: {advice}")
    shown = head[:60].decode("utf-8", "replace").strip()
    raise UserError(f"{marker}: holds {json.dumps(shown)}{'...' if len(head) > 60 else ''}, not a {what}'s "
                    f"marker; this version writes {ours} there ({aside}was it edited?)")


def is_legacy_run_folder(path: Path) -> bool:
    return all((Path(path) / n).is_file() for n in ("config.yaml", "responses.jsonl", "kept.jsonl"))


def run_made_in(run: str | Path, cfg: dict) -> Path | None:
    """The folder a run was made from, found from its config.yaml's ``out`` as typed there: the
    paths config.yaml keeps as typed (--source, --seeds, --prompts...) are relative to it, not to
    the folder a later command runs in. None when ``out`` cannot tell (absolute, or with '..').

    >>> str(run_made_in("/w/a/r", {"out": "r"})), str(run_made_in("/w/a/r", {"out": "./a/r/"}))
    ('/w/a', '/w')
    >>> run_made_in("/w/a/r", {"out": "/w/a/r"}) is None, run_made_in("/w/a/r", {"out": "../a/r"}) is None
    (True, True)
    """
    out = cfg.get("out")
    if not isinstance(out, str) or not out:
        return None
    typed = Path(out).expanduser()
    if typed.is_absolute() or ".." in typed.parts or not typed.parts:
        return None
    run = Path(run).resolve()
    if run.parts[-len(typed.parts):] != typed.parts:  # a link on the way: the typed path is not the run's
        return None
    return run.parents[len(typed.parts) - 1]


def refuse_a_run_inside_a_run(out: str | Path) -> None:
    """One line when the run folder ``out`` (generate's, respond's, evolve's; dedup's and decontaminate's
    output folder too) would be inside another run's folder, a tune's or a dedup or decontaminate output
    folder: that folder's files are its command's, and a run made there is none of them (`respond run/kept.jsonl --out run/x` made one,
    where `respond run --out run/x` was refused; `respond d.json --out adapter/x` one a hub push carried)."""
    for p in Path(out).resolve().parents:
        what = "the run folder" if is_run_folder(p) else "the tune's output folder" if is_tune_folder(p) else \
            "the dedup or decontaminate output folder" if is_filtered_folder(p) else None
        if what:
            # `dedup data.jsonl --out .` makes the working folder one: say what marks it, or every run beneath
            # it stays refused with nothing to tell the user how it got so.
            why = (f" (its {FILTERED_MARKER} or {LOCK} marks it: if it holds no dedup or decontaminate output you "
                   "keep, delete those with its kept.jsonl, removed.jsonl and summary.json)"
                   if what.startswith("the dedup") else "")
            raise UserError(f"{out}: --out is inside {what} {p}; choose a folder outside it{why}")


# A tune's output folder (``sft.tune``): its checkpoints' record, and its resolved options written at its end.
TUNE_MARKS = ("checkpoints/tune.json", "tune_config.yaml")
# What a tune writes there besides what is already there (a first tune still training has saved none of it).
TUNE_WRITES = frozenset({"heldout.jsonl", ".heldout.jsonl.new", "tune_config.yaml", "log_history.json", "README.md",
                         "checkpoints", "adapter_config.json", "adapter_model.safetensors", "config.json",
                         "model.safetensors", "generation_config.json", "training_args.bin"})


def is_tune_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``tune`` saves into: one of ``TUNE_MARKS`` is there, or its
    heldout.jsonl (written first) beside a lock a tune held last (a first tune still training, or
    one a kill stopped: any other command that locks the folder names itself there)."""
    path = Path(path)
    if any((path / mark).is_file() for mark in TUNE_MARKS):
        return True
    return (path / "heldout.jsonl").is_file() and _lock_holder_command(path) == "selfinstruct tune"


def _lock_holder_command(folder: Path) -> str | None:
    """The command the folder's lock file names as its last holder (``run_lock``), or None."""
    try:
        holder = json.loads((folder / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder.get("command") if isinstance(holder, dict) else None


def refuse_a_tunes_own_file(given: str | Path, t: Path, flag: str, own: Path | None = None) -> None:
    """One line when ``t`` (resolved) is a tune's output folder or one of its files: one already there
    (its model, tokenizer, card), one it writes (``TUNE_WRITES``), or anything under its checkpoints.
    ``own``: the folder ``tune`` itself saves into (resolved), whose files are its to write."""
    home = next((p for p in (t, *t.parents) if is_tune_folder(p)), None)
    if home is None or home == own:
        return
    if t == home:
        raise UserError(f"{given}: is a tune's output folder; {flag} must not write into a tune's own files")
    first = t.relative_to(home).parts[0]
    if t.exists() or first in TUNE_WRITES:
        raise UserError(f"{given}: {t.relative_to(home)} is a tune's own file (of {home}); choose an {flag} "
                        "outside it")


def foreign_folder(path: str | Path) -> bool:
    """A folder that is not a run folder and holds something we did not write: never adopt a
    user's folder. The lock and the marker's temp are ours: a run starting in the folder (or
    killed while it wrote the marker) leaves them before the marker itself."""
    path = Path(path)
    ours = (MARKER, LOCK)
    return path.is_dir() and not is_run_folder(path) and any(
        p.name not in ours and not p.name.startswith(f".{MARKER}.tmp-") for p in path.iterdir())


def mark_run_folder(path: str | Path) -> None:
    """Write the marker that makes ``path`` a run folder."""
    write_atomic(Path(path) / MARKER, json.dumps(_MARKER_RECORD) + "\n")


_MARKER_RECORD = {"format": FORMAT_VERSION, "tool": "selfinstruct"}


def load_kept(run: str | Path):
    """The run's kept records as KeptRecord objects."""
    from selfinstruct.records import KeptRecord

    return read_models(Path(run) / "kept.jsonl", KeptRecord)


def load_rejected(run: str | Path):
    from selfinstruct.records import Rejected

    return read_models(Path(run) / "rejected.jsonl", Rejected)


def load_stats(run: str | Path) -> dict:
    """stats.json as a mapping ({} when absent); a garbled one is one line naming the file."""
    path = Path(run) / "stats.json"
    if not path.exists():
        return {}
    from selfinstruct.runfolder import check_carried_counts, check_regular_file  # runfolder imports this module

    check_regular_file(path)  # a FIFO's open waits for a writer that never comes
    stats = read_json(path)
    if not isinstance(stats, dict):
        raise UserError(f"{path}: expected a JSON object, got {json_kind(stats)}")
    for key in ("wall_time_s", "sessions"):
        if key in stats and (isinstance(stats[key], bool) or not isinstance(stats[key], (int, float))):
            raise UserError(f"{path}: field '{key}': must be a number")
    faults = stats.get("faults", {})
    if not isinstance(faults, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in faults.values()):
        raise UserError(f"{path}: field 'faults': must map fault kinds to counts")
    if not isinstance(stats.get("last_session", {}), dict):  # its id says which session.json was counted
        raise UserError(f"{path}: field 'last_session': must be a JSON object")
    # For every reader, not only generate's resume: respond and evolve add their session to these
    # figures and write them back, audit and the card state them; json reads NaN, Infinity and -3.
    check_carried_counts(stats, path)
    return stats


def _run_rows(folder: Path) -> Iterator[tuple[str, dict]]:
    from selfinstruct.records import KeptRecord

    note_if_live(folder)
    for n, rec in enumerate(iter_models(folder / "kept.jsonl", KeptRecord), 1):
        for inst in rec.instances:
            yield (f"{folder / 'kept.jsonl'}: record {n}",
                   {"instruction": rec.instruction, "input": inst.input, "output": inst.output})


def _kept_record_rows(rec, where: str) -> list[tuple[str, dict]]:
    """A run's kept record (``kept.jsonl``'s line: an instruction and its ``instances``, no output),
    given as a file, as the rows its run folder gives: one per instance. Read as a plain row, its
    output was empty and its instances dropped (an export of RUN/kept.jsonl trained on nothing).
    [] for any other record.

    >>> _kept_record_rows({"instruction": "Sort.", "instances": [{"input": "2 1", "output": "1 2"}, {"output": "x"}]}, "k:1")
    [('k:1: instance 0', {'instruction': 'Sort.', 'input': '2 1', 'output': '1 2'}), ('k:1: instance 1', {'instruction': 'Sort.', 'input': '', 'output': 'x'})]
    """
    if (insts := kept_instances(rec)) is None:
        return []
    return [(f"{where}: instance {k}", {"instruction": rec["instruction"], **i}) for k, i in enumerate(insts)]


def kept_instances(rec) -> list[dict] | None:
    """The instances ({input, output}) of a run's kept record given as a file's record, or None
    for any other record (one with an output, a conversation, ...)."""
    if not (isinstance(rec, dict) and "instruction" in rec and "output" not in rec
            and isinstance(insts := rec.get("instances"), list) and insts and all(isinstance(i, dict) for i in insts)):
        return None
    return [{"input": i.get("input") or "", "output": i.get("output") if i.get("output") is not None else ""}
            for i in insts]


_HF_OWN_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # besides its .arrow files


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def dataset_splits(path: str | Path) -> list[str] | None:
    """The split names a saved ``DatasetDict`` folder lists (its dataset_dict.json); None for any other path.

    Each split is saved as the folder ``DIR/NAME``, a ``Dataset`` of its own: that path reads one split.
    """
    listing = Path(path) / "dataset_dict.json"
    if not listing.is_file():
        return None
    info = read_json(listing)
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise UserError(f"{listing}: field 'splits': expected a list of split names")
    return splits


def split_read(splits: list[str]) -> str:
    """The split a saved ``DatasetDict`` folder DIR is read as: train, else its first.

    >>> split_read(["test", "train"]), split_read(["validation", "test"])
    ('train', 'validation')
    """
    return "train" if "train" in splits else splits[0]


def dataset_dict_of(path: str | Path) -> Path | None:
    """The saved ``DatasetDict`` folder DIR whose split the folder ``path`` is (``DIR/NAME``), resolved; else None.

    Files written inside DIR would be saved (and uploaded) with the dataset, so writers put them beside it.
    """
    path = Path(path).resolve()
    return path.parent if path.is_dir() and (path.parent / "dataset_dict.json").is_file() else None


def _dataset_rows(path: Path, quiet: bool = False) -> Iterator[tuple[str, dict]]:
    """(where, record) of a saved ``datasets`` folder; of a ``DatasetDict``, its train split (or
    its first), with one line on stderr naming the split read when it holds others."""
    from datasets import load_from_disk

    if splits := dataset_splits(path):
        split = split_read(splits)
        if len(splits) > 1 and not quiet:
            other = next(s for s in splits if s != split)
            print(f"{path}: holds the splits {', '.join(splits)}; reading {split} (give {path / other} to read "
                  "another)", file=sys.stderr)
        path = path / split
    state = path / "state.json"
    if state.is_file() and (info := read_json(state)) and isinstance(info, dict) and info.get("_data_files") == []:
        return  # a saved empty dataset: datasets itself cannot load it back (an IndexError inside)
    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
        raise UserError(f"{path}: cannot read the dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    yield from _dataset_items(ds, str(path))


def _dataset_items(ds, where: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of a ``datasets.Dataset``, a batch of rows at a time (its table stays on disk, memory-mapped).

    A column's NaN is the row's value missing, read as None (a null), as a JSON null is: pandas
    and numpy mark a missing float so, and a table written from them (pyarrow's own write, a
    float column of pandas' with ``from_pandas=False``) holds NaN where its other rows hold a
    number. Kept, it made the row unwritable (kept.jsonl is JSON), refused as NaN. A NaN where
    text is needed is then that field missing, an error naming file, row and field.

    Rows are numbered from 1 (``data.parquet: row 2``), as a JSON file's lines are: they were
    "record 0" for the first, one less than a user counting rows (or a JSONL line) looks for.
    """
    i = 1
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield f"{where}: row {i}", {c: None if isinstance(v, float) and v != v else v  # NaN != NaN
                                        for c, v in zip(columns, values)}
            i += 1


@contextlib.contextmanager
def no_progress_bars():
    """datasets' progress bars off for the block, as they were after it (a caller's own choice kept):
    a command's output is its own lines (export's writes, a parquet read: "Generating train split")."""
    from datasets.utils import logging as datasets_logging

    was = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            datasets_logging.enable_progress_bar()


def read_located(path: str | Path, empty_ok: bool = False) -> list[tuple[str, dict]]:
    """(where, record) from a run folder, a ``datasets`` folder, parquet, a JSON list or JSONL.

    Records are raw (Alpaca, ShareGPT or messages shapes); a run folder gives one Alpaca
    row per kept instance. ``where`` names the file and line (or row, from 1) for error messages.
    A saved ``DatasetDict`` gives its train split (``_dataset_rows``); ``DIR/NAME`` gives its split NAME.
    No record is one line, unless ``empty_ok``.
    """
    return list(iter_located(path, empty_ok))


PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str | Path) -> bool:
    """Whether ``path`` is a parquet file: by its suffix in any case, or, whatever its name, by the
    magic bytes every parquet file starts with. ``DATA.PARQUET`` or ``x.pq`` was read as JSON
    ("not UTF-8 text at byte 345").

    >>> is_parquet("DATA.PARQUET"), is_parquet("no/such/file.jsonl")
    (True, False)
    """
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    if not path.is_file():  # a pipe's first bytes, read here, would be gone for the JSON reader
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:  # a folder, a missing file: the caller says what it is
        return False


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a parquet file, refused in one line where it cannot be read."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError
    from datasets.utils import logging as datasets_logging

    try:
        if pq.ParquetFile(str(path)).metadata.num_rows == 0:
            # Columns and no row: datasets' builder fails on it with a traceback of its own (pandas'
            # head(0).to_parquet() writes one); it holds no record, as an empty JSON list holds none.
            return iter(())
    except (OSError, ValueError) as e:  # pyarrow's errors are both (ArrowInvalid is a ValueError)
        raise UserError(f"{path}: cannot read parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    # datasets logs a broken file's error to stderr itself before raising it: the one line is ours.
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        with no_progress_bars():  # "Generating train split" on the first read of each file
            return _dataset_items(Dataset.from_parquet(str(path)), str(path))
    except (OSError, ValueError, DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
        raise UserError(f"{path}: cannot read parquet ({type(cause).__name__}: {str(cause).splitlines()[0]})") from None
    finally:
        datasets_logging.set_verbosity(verbosity)


def iter_located(path: str | Path, empty_ok: bool = False, quiet: bool = False) -> Iterator[tuple[str, dict]]:
    """``read_located`` as a stream: a record at a time, for a command that need not hold them all
    (export). A missing path, or a file that is not what it says, is refused before the first record;
    no record at all, once the source is read through. ``quiet``: a source read again, whose
    DatasetDict split was named on stderr at the first reading."""
    path = Path(path)
    if not path.exists():
        if (splits := dataset_splits(path.parent)) is not None:  # DIR/NAME: a split DIR does not hold
            raise UserError(f"{path}: {path.parent} has no split '{path.name}' (its splits: {', '.join(splits)})")
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_run_folder(path):
            rows = _run_rows(path)
        elif _is_hf_dataset_dir(path):
            rows = _dataset_rows(path, quiet)
        else:
            refuse_filtered_folder(path)
            raise UserError(f"{path}: not a run folder (no {MARKER}) nor a saved Hugging Face dataset")
    elif is_parquet(path):
        _refuse_a_pipe(path)  # pyarrow's open of a FIFO named x.parquet waited for a writer
        rows = _parquet_rows(path)
    else:
        if path.name == "kept.jsonl" and is_run_folder(path.parent):  # a run's rows, named by their file
            note_if_live(path.parent)
        rows = iter_json_records(path)
    n = 0
    for w, r in rows:
        n += 1
        if kept_rows := _kept_record_rows(r, w):
            yield from kept_rows
            continue
        # Columns that a dataset holds for some rows only come back as None: drop them.
        yield w, {k: v for k, v in r.items() if v is not None} if isinstance(r, dict) else r
    if not n and not empty_ok:
        raise UserError(f"{path}: no records")


def read_records(path: str | Path) -> list[dict]:
    """The records of ``read_located`` without their locations."""
    return [r for _, r in read_located(path)]


# --------------------------------------------------------------------------- writing


def json_line(obj) -> str:
    """One JSON object as one line: U+2028, U+2029 and U+0085 escaped too.

    json escapes control characters and newlines, so one record is always one line; those
    three it leaves raw, yet str.splitlines() breaks lines at them (they can only occur inside
    JSON strings), so escaping them lets every line splitter see one record.
    """
    text = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], None], fsync: bool = True) -> None:
    """Write ``content`` (text, bytes, or ``write(tmp)``) to a temp name beside ``path``, fsync, rename.

    A reader never sees half a file; on any error the temp is removed and ``path`` is as it
    was; a full, read-only or missing folder is one line naming ``path``. A file replaced keeps
    its mode; a symbolic link is written through (its target replaced, the link kept). ``fsync=False``: for
    a file that must outlive the process but not the machine (``runfolder.SessionCounts``).
    """
    path = Path(path)
    if path.is_symlink():  # written through, as `>` and cp do: the file it points to is replaced, the link stays
        path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_dead_temps(path)
    try:  # a file replaced keeps its permissions: a private (0600) file must not come back world-readable
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({_why(e)})") from None
        raise


def remove_stale_temps(path: str | Path, locked: bool = False) -> None:
    """Remove what writes of ``path`` killed mid-write left (``_remove_dead_temps``), as a command
    that writes ``path`` starts: the next write would too, but a rerun stopped again before it (an
    error, another kill) added its own temps beside the first, and a file written once (a folder's
    mark) is never written again to remove them."""
    path = Path(path)
    if path.is_symlink():  # write_atomic writes through a link: its temps are beside the target
        path = path.resolve()
    _remove_dead_temps(path, locked)


def _remove_dead_temps(path: Path, locked: bool = False) -> None:
    """Remove the temps of ``path`` that a write killed before its rename left (kill -9 runs no
    cleanup): its name holds the writer's pid, and a writer that is alive is left alone.

    ``locked``: the caller holds the lock that every writer of ``path`` holds while it writes (a
    dedup or decontaminate output folder's), and has written none of its own yet: every temp there
    is a dead writer's, whatever its pid (one alive now, or this one, reused it: a container restarted).
    An earlier ``path`` that a write moved aside (``.tmp-old-``, export's hf folder) while ``path`` is
    gone is put back, not removed: it is the only copy.
    """
    import glob

    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit() or (int(pid) == os.getpid() and not locked):
            continue
        if not locked:
            try:
                os.kill(int(pid), 0)
                continue  # alive (another write of the same path, now)
            except ProcessLookupError:
                pass
            except OSError:  # EPERM: alive, someone else's
                continue
        if tmp.name.startswith(f".{path.name}.tmp-old-") and not path.exists() and not path.is_symlink():
            with contextlib.suppress(OSError):
                os.rename(tmp, path)
                continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()


FILTERED = ("kept.jsonl", "removed.jsonl", "summary.json")  # a filtering command's result in its --out
# Written by dedup and decontaminate into their --out as they write their result there: the proof that
# the three files are theirs to replace. The lock is not: filter and audit --judge of a plain file
# leave one in that file's folder too.
FILTERED_MARKER = ".selfinstruct-filtered"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def check_filtered_name(out: str | Path, command: str) -> None:
    """Refuse a filtering command's ``--out`` named as a data file (``x.json``) that is not already
    a folder: it is a folder of three files, and the user asking for a file would get a folder
    named like one, which no reader takes. Cheap, so a command calls it before reading its input.

    >>> check_filtered_name("deduped/x.json", "dedup")
    Traceback (most recent call last):
    selfinstruct.config.UserError: deduped/x.json: dedup's --out is a folder (it writes kept.jsonl, removed.jsonl and summary.json there), not a .json file: give a folder such as deduped/x/ (or deduped/x.json/, with the slash, for a folder of that name), then export deduped/x/kept.jsonl to the format you want
    >>> check_filtered_name("deduped/x.json/", "dedup")  # a trailing slash says "a folder": taken
    """
    if names_folder(out):  # the slash is the user saying "a folder", so the name is theirs
        return
    out = Path(out)
    if out.suffix.lower() in (*DATA_SUFFIXES, *PARQUET_SUFFIXES) and not out.is_dir():  # .pq is parquet here
        folder = out.with_suffix("")
        # The slash is said too: a user who wants a folder of that very name has no other way to learn it.
        raise UserError(f"{out}: {command}'s --out is a folder (it writes {', '.join(FILTERED[:2])} and "
                        f"{FILTERED[2]} there), not a {out.suffix} file: give a folder such as {folder}/ (or {out}/, "
                        f"with the slash, for a folder of that name), then export {folder / 'kept.jsonl'} to the "
                        "format you want")


@contextlib.contextmanager
def filtered_output(out: str | Path, command: str, inputs=()):
    """A filtering command's ``--out`` (dedup, decontaminate), checked, made and locked
    before the work, held until its result is written (``write_filtered``).

    Made first: a folder that cannot be made (a read-only parent) fails in a second, not
    after minutes of scoring. Locked for the whole run, not only the write: a second run
    into the same folder is refused before it does any work, not at the end. A refusal
    found in the work (decontaminate reads its benchmarks there) takes back the folders
    this call made, so it leaves none behind.
    """
    check_filtered_name(out, command)  # given as typed: a trailing slash that Path drops counts there
    out = Path(out)
    if out.exists() and not out.is_dir():
        kind = special_kind(out)  # /dev/null is a device, not a file
        raise UserError(f"{out}: exists and is {kind}, not a folder" if kind else f"{out}: exists and is not a folder")
    check_output(out, inputs, writes=FILTERED)
    refuse_a_run_inside_a_run(out)  # as respond's --out: `dedup d.json --out run/x` littered the run
    _check_filtered_folder(out, command)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the folder ({e.strerror or e})") from None
    with run_lock(out, command):
        for name in (*FILTERED, FILTERED_MARKER):  # a killed run's temps: each of our writers held this lock
            remove_stale_temps(out / name, locked=True)
        try:
            yield out
        except BaseException:
            with contextlib.suppress(OSError):
                if made and [p.name for p in out.iterdir()] == [LOCK]:  # nothing written yet
                    (out / LOCK).unlink()
            for p in made:  # one by one: "new/../out" made new and out, and "new/.." is not removed
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise


def _check_filtered_folder(out: Path, command: str) -> None:
    """Refuse an ``--out`` whose kept.jsonl, removed.jsonl or summary.json is no plain file (a folder
    failed the write with a traceback, after the work) or one a filtering command did not write (the
    user's own files, which the result would replace). Ours are known by ``FILTERED_MARKER`` or, for a
    folder made before it, by our summary.json; a run whose write a kill cut short left the marker."""
    for name in (*FILTERED, FILTERED_MARKER):
        p = out / name
        if p.is_symlink() and not p.exists():
            raise UserError(f"{p}: is a symbolic link to {os.readlink(p)}, which is not there; {command} writes "
                            f"its {name} here: remove the link, or give another --out")
        if p.exists() and not p.is_file():
            what = "a folder" if p.is_dir() else "not a regular file"
            raise UserError(f"{p}: is {what}; {command} writes its {name} here: move it away, or give another --out")
    if (out / FILTERED_MARKER).is_file():  # claim_filtered keeps a marker that is there: never written beside
        check_filtered_format(out)
    theirs = [n for n in FILTERED if (out / n).exists()]
    if theirs and not is_filtered_folder(out):
        raise UserError(f"{out}: holds {theirs[0]}, which dedup or decontaminate did not write and would replace: "
                        "choose a new folder for --out, or move it away")


def is_filtered_folder(path: str | Path) -> bool:
    """Whether dedup or decontaminate writes its result in ``path``: its marker is there, or (a folder
    made before the marker) a summary.json of theirs, or a lock they held last (one whose write a kill
    cut short before its summary.json: any other command that locks the folder names itself there)."""
    path = Path(path)
    if (path / FILTERED_MARKER).is_file():
        check_filtered_format(path)
        return True
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and {"input", "records", "kept", "removed"} <= set(summary):
        return True
    return _lock_holder_command(path) in ("selfinstruct dedup", "selfinstruct decontaminate")


def check_filtered_format(folder: str | Path) -> None:
    """Refuse a folder whose ``FILTERED_MARKER`` says another format than ``FORMAT_VERSION`` or is not ours
    (``check_run_format`` for a run's): it was written and never read, so a folder a newer version wrote was
    written into again, exported and audited as this one's."""
    _check_format(Path(folder) / FILTERED_MARKER, "dedup or decontaminate output folder", _filtered_record("dedup"),
                  "use the version that wrote it", aside='"decontaminate" for its own; ')


def _filtered_record(command: str) -> str:
    return json.dumps({"format": FORMAT_VERSION, "tool": "selfinstruct", "command": command})


def claim_filtered(out: Path, command: str) -> None:
    """Mark ``out`` as a folder ``command`` writes its result in (``FILTERED_MARKER``), before the
    first of its files is replaced: a later run may replace them, a kill in between or not."""
    if not (out / FILTERED_MARKER).is_file():
        write_atomic(out / FILTERED_MARKER, _filtered_record(command) + "\n")


def write_filtered(out: Path, command: str, kept, removed, summary: dict) -> None:
    """A filtering command's result in ``out`` (dedup, decontaminate): kept.jsonl and
    removed.jsonl (rows), then summary.json, holding the folder's lock (``run_lock``).

    One writer at a time: two runs into one folder would each replace the three files, and the
    set could end as one run's rows beside the other's summary. Each file is replaced
    atomically, the three are not: summary.json goes first and comes back last, so a kill in
    between never leaves an earlier run's summary (which export's card reads) beside new rows.
    """
    with run_lock(out, command):
        claim_filtered(out, command)
        (out / "summary.json").unlink(missing_ok=True)
        write_lines_atomic(out / "kept.jsonl", map(json_line, kept))
        write_lines_atomic(out / "removed.jsonl", map(json_line, removed))
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, text)


def write_json_atomic(path: str | Path, obj) -> None:
    """JSON, indented, written atomically."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2))


def write_jsonl_atomic(path: str | Path, rows) -> None:
    """One JSON object per line, written atomically."""
    write_lines_atomic(path, map(json_line, rows))


def write_lines_atomic(path: str | Path, pieces) -> int:
    """Texts written one after another, atomically, as they come (``pieces`` may be a
    generator: a million records are never one string); returns how many. An error in
    ``pieces`` leaves ``path`` as it was."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for piece in pieces:
                f.write(piece)
                n += 1

    write_atomic(path, write)
    return n


# --------------------------------------------------------------------------- safety


_HELD: dict[Path, list] = {}  # resolved folder -> [fd, depth]: a process may take its own lock again


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str):
    """Hold ``folder``'s lock (``fcntl.flock`` on ``.selfinstruct-lock``) for the block.

    The kernel drops the lock when the process ends, kill -9 included, so a stale lock
    file never blocks anyone. The file records the holder's pid and command; a second
    process is refused with one line naming them.
    """
    import fcntl
    import time

    key = Path(folder).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _release(key)  # the first take may have ended first (pipeline keeps generate's lock)
        return
    path = key / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{folder}: cannot lock the run folder ({_why(e)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"{folder}: in use by {holder}; wait for it to end (or stop it), then run again") from None
    try:  # who holds it: for the message above; best effort (a full disk must not stop a resume here)
        record = json.dumps({"pid": os.getpid(), "command": f"selfinstruct {command}",
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
    except OSError:
        pass
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _release(key)


def _release(key: Path) -> None:
    """One take of ``run_lock`` ended; the last, whichever it is, releases the flock."""
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        os.close(_HELD.pop(key)[0])  # releases the flock


_SAID_LIVE: set[Path] = set()  # run folders whose live writer this process has named already


def live_writer(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock now, another process (``run_lock``'s holder: "pid N (selfinstruct
    generate, since ...)"), or None: no one, this process, or a system that does not say.

    Read from Linux's /proc/locks, without touching the lock: a reader that took it for a moment,
    even shared, could make a generate starting at that instant refuse the folder as in use. A
    line there counts when it is a flock on the lock file's inode by the pid the file names
    (the pid matched too, since a device number can read differently in a container)."""
    key = Path(folder).resolve()
    if key in _HELD:
        return None
    try:
        ino = os.stat(key / LOCK).st_ino
        info = json.loads((key / LOCK).read_text(encoding="utf-8"))
        pid = int(info["pid"])
        locks = Path("/proc/locks").read_text()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    for line in locks.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[4] != str(pid):  # a waiter's line is "1: -> FLOCK ..."
            continue
        if parts[5].rpartition(":")[2] == str(ino):
            return f"pid {pid} ({printable(str(info.get('command', '?')))}, since {printable(str(info.get('since', '?')))})"
    return None


def note_if_live(run: str | Path) -> None:
    """One line on stderr when another process is writing the run folder ``run`` (a generate, a
    respond): what is read is the records it has so far, which its later state will not match
    (a dataset card then named a snapshot's rows beside the run's final counts). Once a folder."""
    key = Path(run).resolve()
    if key in _SAID_LIVE:
        return
    holder = live_writer(key)
    if holder:
        _SAID_LIVE.add(key)
        print(f"{printable(str(run))}: is being written by {holder}; reading the records it holds now "
              "(run this again when it ends for all of them)", file=sys.stderr)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def refuse_a_link_to_nothing(path: Path, flag: str = "--out") -> None:
    """One line for an output that is a symbolic link to nothing: a link is written through, and this one
    leads nowhere (a mkdir there says "File exists" of a path ls does not show)."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path}: is a symbolic link to {os.readlink(path)}, which is not there; give an {flag} "
                        "that is (or the link's target made first)")


def check_output(out: str | Path, inputs=(), writes: tuple[str, ...] = (), flag: str = "--out",
                 tuning: bool = False) -> None:
    """Refuse an output that is a run folder, a run folder's own file, a dedup or decontaminate output
    folder's own file, an input, a folder holding one, a file a run given as input reads when it
    resumes (``audit.what_the_run_reads``: its seeds, its --source, a file in its --prompts folder),
    a path inside an input's saved ``datasets`` folder, a tune's output folder or one of its files (but
    for ``tuning``: tune's own check of its folder), or a symbolic link to nothing.

    ``writes`` names the files written inside ``out`` when it is a folder written into
    (dedup's kept.jsonl...); without it ``out`` itself is written or replaced whole.
    Paths are resolved, so ``run/``, ``./run``, an absolute path and a link to it are the same place.
    """
    given = Path(out)
    refuse_a_link_to_nothing(given, flag)
    target = given.resolve()
    written = [(target / w).resolve() for w in writes]  # resolved too: a link there is written through
    ins = [(p, Path(p).resolve()) for p in inputs]
    reads, folders = _what_runs_read(inputs)
    ins += [(p, Path(p).resolve()) for p in reads if p.is_absolute() or ".." in p.parts]
    # A path a run keeps relative to a folder it does not record (``what_the_run_reads``): any output
    # ending in it may be that file, wherever this command runs.
    unplaced = [p for p in reads if not (p.is_absolute() or ".." in p.parts)]
    judged = {j.resolve(): (what, shown) for shown in inputs for j, what in judge_files(shown)}
    for t in [target, *written]:
        if t.name in (LOCK, MARKER, FILTERED_MARKER):  # in any folder: a lock written over lets a second holder in
            raise UserError(f"{given}: {t.name} is selfinstruct's own file (a folder's lock or mark); choose "
                            f"another {flag}")
        if is_run_folder(t):
            raise UserError(f"{given}: is a run folder; {flag} must not write into a run's own files")
        if t.name in RUN_FILES and is_run_folder(t.parent):
            raise UserError(f"{given}: {t.name} is a run folder's own file; choose an {flag} outside it")
        # The files `datasets` reads in a saved dataset's folder (or a DatasetDict's, or its split's):
        # `--out hf/state.json` replaced its state.json, and audit and export of it were then a TypeError
        # from load_from_disk. Other files there (its card, README.md) are not read by it.
        if ((t.name in _HF_OWN_FILES or t.suffix == ".arrow")
                and (home := next((p for p in (t.parent, t.parent.parent) if _is_hf_dataset_dir(p)), None))):
            raise UserError(f"{given}: is a file of the saved dataset {home}, which `datasets` reads; choose an "
                            f"{flag} outside it")
        # `export ... --out adapter/heldout.jsonl` replaced the rows try --heldout reads as never trained on
        refuse_a_tunes_own_file(given, t, flag, target if tuning else None)
    # dedup and decontaminate replace their own folder's files (``writes``); nothing else may: a dataset
    # card of a kept.jsonl written there would state the folder's summary.json as its counts.
    if not writes and target.name in FILTERED and is_filtered_folder(target.parent):
        raise UserError(f"{given}: {target.name} is a dedup or decontaminate output folder's own file; choose an "
                        f"{flag} outside it")
    for t in written or [target]:
        for p in unplaced:
            if t.parts[-len(p.parts):] == p.parts:
                raise UserError(f"{given}: {flag} may be the file {p} that an input run reads when it resumes (its "
                                "config.yaml keeps it relative to the folder the run was made from, which it does "
                                "not record); choose another name")
        for shown, i in ins:
            if t == i or t in i.parents:
                raise UserError(f"{given}: {flag} would overwrite the input {shown}")
            # Inside a saved dataset (or the DatasetDict a DIR/NAME split belongs to), a write
            # replaces or adds a piece of the input itself: `export dd --format hf --out dd/test`
            # replaced a split of dd. (A file put inside a run folder leaves the run's own files
            # alone, which the checks above guard.)
            home = dataset_dict_of(i) or i
            if home in t.parents and home.is_dir() and _is_hf_dataset_dir(home):
                raise UserError(f"{given}: {flag} is inside the input dataset {home}; choose a path outside it")
        for what, folder in folders:
            if Path(folder).expanduser().resolve() in t.parents:
                raise UserError(f"{given}: {flag} is inside {what} {folder}; choose a file outside it")
    for t in [target, *written]:
        if t in judged:  # the next filter or audit of the input would read what was written there
            what, shown = judged[t]
            raise UserError(f"{given}: {flag} would overwrite the {what} of the input {shown}")


def _what_runs_read(inputs) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files and folders the run folders among ``inputs`` read when resumed (``what_the_run_reads``):
    `export runS --out my_seeds.jsonl` replaced the seeds, and the next resume of runS was refused."""
    from selfinstruct.audit import what_the_run_reads  # audit imports this module: here, not at the top

    reads, folders = [], []
    for p in inputs:
        r, f = what_the_run_reads(p)
        reads += r
        folders += f
    return reads, folders


# The files the judge keeps (name, what it holds): in a run folder by these names, beside a dataset
# prefixed by its name (``judge_file``). Here, below audit and every writer that must not overwrite them.
JUDGE_FILES = (("judgements.jsonl", "judgements"), ("judge_stats.json", "judge stats"),
               ("judge_session.json", "judging session"))


def dataset_split(path: str | Path) -> tuple[Path, str] | None:
    """(DIR resolved, NAME) when ``path`` holds the split NAME of a saved DatasetDict DIR, given as DIR/NAME
    or as DIR (NAME the split it is read as); else None."""
    if (home := dataset_dict_of(path)) is not None:
        return home, Path(path).resolve().name
    if splits := dataset_splits(path):
        return Path(path).resolve(), split_read(splits)
    return None


SPLIT_JUDGE_MARK = "split-"  # before a split's judge file names: DIR.NAME.split-judgements.jsonl


def split_judge_name(name: str) -> str:
    """A split's name as its judge files spell it: with no dot, so that in ``DIR.NAME.split-<file>``
    DIR ends at the last dot (``%`` and ``.`` written as ``%25`` and ``%2E``, as in a URL).

    Written as it is, ``a.b/`` split ``c`` and ``a/`` split ``b.c`` had the same files, and one
    dataset's judgements, counts and costs were the other's. A name without either (train,
    test) is as it was.

    >>> split_judge_name("test"), split_judge_name("b.c"), split_judge_name("50%.v2")
    ('test', 'b%2Ec', '50%25%2Ev2')
    """
    return name.replace("%", "%25").replace(".", "%2E")


def judge_file(path: str | Path, name: str, is_run: bool) -> Path:
    """Where the judge keeps its file ``name`` (of ``JUDGE_FILES``) for the records at ``path``.

    In a run folder, ``name`` in it; beside a plain file or dataset folder, ``<stem>.<name>``; beside
    DIR, as ``DIR.NAME.split-<name>``, for the split DIR/NAME of a saved DatasetDict (in DIR it would
    be saved, and uploaded, with it), and for DIR itself, NAME the split it is read as: the same records,
    so the same files. A split's names never end in ``.<name>``, so no data file's can be one of them:
    as ``DIR.NAME.<name>`` they were also the files of a data file ``DIR.NAME.jsonl`` beside DIR, and
    the two datasets' counts and costs were added together. NAME is written with no dot
    (``split_judge_name``), so no two splits side by side share them either.

    >>> [judge_file(p, "judge_stats.json", run).as_posix() for p, run in (("runs/a", True), ("dd/data.jsonl", False))]
    ['runs/a/judge_stats.json', 'dd/data.judge_stats.json']
    """
    path = Path(path)
    if is_run:
        return path / name
    if (split := dataset_split(path)) is not None:
        return split[0].with_name(f"{split[0].name}.{split_judge_name(split[1])}.{SPLIT_JUDGE_MARK}{name}")
    stem = path.name if path.is_dir() else path.stem  # a dataset folder keeps its whole name
    return path.with_name(f"{stem}.{name}")


def judge_files(path: str | Path) -> list[tuple[Path, str]]:
    """(path, what it holds) for each file the judge keeps beside a dataset: its judgements, judge
    stats and judging session (``judge_file``). None for a run folder or its kept.jsonl, whose judge
    files are the run's own (RUN_FILES).

    >>> [(p.name, what) for p, what in judge_files("dd/data.jsonl")]  # doctest: +NORMALIZE_WHITESPACE
    [('data.judgements.jsonl', 'judgements'), ('data.judge_stats.json', 'judge stats'),
     ('data.judge_session.json', 'judging session')]
    """
    p = Path(path)
    if is_run_folder(p) or (p.name == "kept.jsonl" and is_run_folder(p.parent)):
        return []
    return [(judge_file(p, name, False), what) for name, what in JUDGE_FILES]


def names_folder(given: str | Path) -> bool:
    """Whether ``given``, as typed, ends in a path separator: the user saying "a folder", which
    ``Path`` drops (``Path("out/")`` is ``out``), so it is looked at before.

    >>> names_folder("expdir/"), names_folder("expdir")
    (True, False)
    """
    return str(given).endswith(tuple(s for s in (os.sep, os.altsep) if s))


def check_file_name(given: str | Path, flag: str = "--out", example: str = "data.json",
                    writes: str = "it is one file") -> None:
    """Refuse a file output typed as a folder (``--out expdir/``): ``Path`` dropped the slash and
    a file was written under the folder's name, where the user looked for a folder.

    >>> check_file_name("expdir/", example="data.jsonl", writes="--format jsonl writes one file")
    Traceback (most recent call last):
    selfinstruct.config.UserError: expdir/: --out names a folder (the trailing slash), but --format jsonl writes one file: give a file name such as expdir/data.jsonl
    """
    if names_folder(given):
        raise UserError(f"{given}: {flag} names a folder (the trailing slash), but {writes}: give a file name "
                        f"such as {Path(given) / example}")


def check_file_target(path: str | Path, flag: str = "--out", folder: bool = False, example: str = "data.json",
                      writes: str = "it is one file") -> None:
    """Refuse, before any work, a file to write that is a folder (or typed as one, ``out/``: ``check_file_name``
    with ``example`` and ``writes``), or whose folder is missing or read-only.

    The write itself comes last (after a judge pass, a whole conversion); failing there would
    throw that work away. ``folder``: ``path`` is a folder written whole (``--format hf``),
    so only its parent is checked. Give ``path`` as typed: its trailing slash counts.

    >>> check_file_target("-")
    Traceback (most recent call last):
    selfinstruct.config.UserError: -: --out is written as a file, not to standard output (it would make a file named '-'): give a file name such as data.json
    """
    if str(path) == "-":  # a Unix tool's "standard output": a file named '-' was written, rc 0
        raise UserError(f"-: {flag} is written as a file, not to standard output (it would make a file named '-'): "
                        f"give a file name such as {example}")
    if not folder:
        check_file_name(path, flag, example, writes)
    path = Path(path)
    refuse_special_file(path, flag)
    if path.is_dir() and not folder:
        raise UserError(f"{path}: is a folder; give a file name for {flag}")
    parent = path.parent
    if not parent.is_dir():
        why = f"{parent} is not a folder" if parent.exists() else f"{parent}: no such folder"
        raise UserError(f"{path}: cannot write ({why})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write ({unwritable_because(parent)})")


def unwritable_because(folder: str | Path) -> str:
    """Why a folder that ``os.access`` says cannot be written to cannot be: a read-only file system
    (a mount, a container's image), or its permissions. A read-only mount was "permission denied",
    which sent the user to chmod a folder that chmod cannot help."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{folder} is on a read-only file system" if read_only else f"permission denied on {folder}"


def refuse_special_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output that is there and is neither a regular file nor a folder (a device such as
    /dev/null, a FIFO, a socket), or a link to one, before anything is written: ``write_atomic`` ends
    by renaming its temp over the target, and `export --out /dev/null` replaced the device itself,
    for every program on the machine."""
    if special_kind(path):  # through a link: its target is what the write replaces
        raise UserError(f"{path}: is not a regular file (a device, FIFO or socket), which {flag} would replace "
                        "with its file: give a file name")
