"""Config layering shared by every command: defaults, then ``--config file.yaml``, then flags.

Each command describes its options as one Pydantic model whose fields carry
help text. ``add_flags`` turns that model into argparse flags; ``resolve``
merges the three layers and validates, so an unknown YAML key or a bad value
is a ``UserError`` naming the file and field.

Example::

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num: int = Field(100, description="How many records to keep.")

    p = argparse.ArgumentParser(); add_flags(p, Opts)
    opts = resolve(Opts, p.parse_args(["--num", "5"]))   # Opts(num=5)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel, ValidationError


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one line and exits 2."""


# C0 controls but tab, DEL, C1 controls, and the Unicode line/paragraph separators and bidi
# overrides that can reorder or hide what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def url_list(v):
    """``--base-url``'s value as a list: one URL given as a string (``base_url: URL`` in YAML, and
    run folders saved when it took one server), or none (null, as older folders saved it).

    >>> url_list("http://a/v1"), url_list(None), url_list(["http://a/v1", "http://b/v1"])
    (['http://a/v1'], [], ['http://a/v1', 'http://b/v1'])
    """
    return [v] if isinstance(v, str) else [] if v is None else v


def one_item_list(v):
    """A list option's value with one string given as that one item (a pydantic "before" validator):
    YAML's ``stop: "###"`` is what ``--stop '###'`` gives, where it was refused as "not a valid list".
    Anything else is left to the field's own check (null is refused there: it says no list at all; a
    --config file's ``stop: null`` never gets there, ``without_nulls`` takes it as the default).

    >>> one_item_list("###"), one_item_list(["###", "\\n"]), one_item_list(None)
    (['###'], ['###', '\\n'], None)
    """
    return [v] if isinstance(v, str) else v


def distinct_urls(urls) -> list[str]:
    """``--base-url``'s servers, each once: a URL given again with a trailing slash, another case of
    scheme and host, its scheme's port written out or localhost for 127.0.0.1 is the same server, which
    would otherwise get twice --concurrency.

    >>> distinct_urls(["http://a:8000/v1", "http://A:8000/v1/", "http://b:8000/v1"])
    ['http://a:8000/v1', 'http://b:8000/v1']
    """
    seen: dict[tuple, str] = {}
    for url in urls:
        seen.setdefault(server_key(url), url)
    return list(seen.values())


def server_key(url: str) -> tuple:
    """What two spellings of one server's URL share (``distinct_urls``): scheme and host in any case, the
    scheme's own port written or not, ``localhost`` for 127.0.0.1, the path without a trailing slash.

    >>> server_key("http://LOCALHOST:8000/v1/") == server_key("http://127.0.0.1:8000/v1")
    True
    >>> server_key("https://gpu1/v1") == server_key("https://gpu1:443/v1"), server_key("http://gpu1/v1") == server_key("http://gpu1:8000/v1")
    (True, False)
    """
    from urllib.parse import urlsplit

    p = urlsplit(url)
    scheme, host = p.scheme.lower(), (p.hostname or "").lower()
    try:
        port = p.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # not a port: the URL's check says so; here it is only told apart
        port = p.netloc.lower()
    # A server on 127.0.0.1 answers at localhost too (a name only resolved elsewhere, ::1 aside, is not looked up).
    host = "127.0.0.1" if host == "localhost" else host
    return scheme, p.username, p.password, host, port, p.path.rstrip("/"), p.query


# Requests in flight at once, per server (the judge's in all), for every command: twice the largest
# batch vLLM makes by default (--max-num-seqs 1024 on a large GPU), and each one held in memory.
# Without a bound, generate --concurrency 1000000 started 50,000 units at once for --num 2000 (2.4 GB).
MAX_CONCURRENCY = 4096
# Upper bounds of the teacher options every command shares, each far past any real use, so that only a typo
# (a digit too many, 10**20) reaches one, and it is one line before any teacher starts:
# tokens a reply (--max-tokens): past the longest context of any model (10M tokens). The embedded teacher
# (llama.cpp) read 10**20 as -2147483648 and refused every request, which the run retried until --max-requests.
MAX_TOKENS = 2**24
# retries of one request (--max-retries): at 8 s apart, over two hours on one request. Past 1,023 the
# backoff (0.5 s * 2**attempt) overflows a float: a traceback, hours into a run against a server that is down.
MAX_RETRIES = 1000
# the embedded teacher's CPU threads (--teacher-threads): past any machine's; 10**20 was an OverflowError traceback
MAX_TEACHER_THREADS = 4096
# the embedded teacher's slots (--teacher-parallel): each holds 2,048 tokens of context in memory
MAX_TEACHER_PARALLEL = 1024
# Why it stops there, as generate, respond and evolve say it (followed by what each request holds).
VLLM_BATCH_TWICE = ("twice the largest batch vLLM makes by default (--max-num-seqs 1024 on a large GPU), and each "
                    "one holds its ")


def check_concurrency(v: int | None, what: str = "request", per: str = " per server", holds: str = "") -> int | None:
    """A ``--concurrency`` from 1 to ``MAX_CONCURRENCY``, refused in our words (pydantic's ge=/le= said
    'Input should be greater than or equal to 1'); ``holds``: why the top is where it is, for the command.

    >>> check_concurrency(0)
    Traceback (most recent call last):
    ValueError: at least 1 request in flight per server, not 0: with none, no request would ever be sent
    """
    if v is not None and v < 1:
        raise ValueError(f"at least 1 {what} in flight{per}, not {v}: with none, no request would ever be sent")
    if v is not None and v > MAX_CONCURRENCY:
        raise ValueError(f"at most {MAX_CONCURRENCY} {what}s in flight{per}, not {v}: {holds}")
    return v


def check_urls(v):
    """``--base-url``'s URLs, each one that cannot even be parsed refused (a port that is not
    a number, a broken IPv6 address): the HTTP client raised a traceback for those. So is
    one without http:// or https://, which was only 'cannot be reached', and one with a user
    name or password in it (``user:pw@host``) or a query string or fragment (``?key=...``), which
    never worked and was saved in the run folder.

    >>> check_urls(["http://127.0.0.1:8000/v1"])
    ['http://127.0.0.1:8000/v1']
    >>> check_urls(["http://127.0.0.1:PORT/v1"])
    Traceback (most recent call last):
    ValueError: 'http://127.0.0.1:PORT/v1' is not a valid URL (Port could not be cast to integer value as 'PORT')
    >>> check_urls(["localhost:8000/v1"])
    Traceback (most recent call last):
    ValueError: 'localhost:8000/v1' is not a valid URL (want http:// or https://, then a host)
    >>> check_urls(["http://me:secret@gpu1:8000/v1"])
    Traceback (most recent call last):
    ValueError: 'http://***@gpu1:8000/v1' holds a user name or password; give the key with --api-key (or SELFINSTRUCT_API_KEY) and the URL without them
    >>> check_urls(["http://gpu1:8000/v1?key=secret"])
    Traceback (most recent call last):
    ValueError: 'http://gpu1:8000/v1?***' has a query string or fragment, which may hold a credential and would come before the paths the client appends; give the key with --api-key (or SELFINSTRUCT_API_KEY) and the URL without them
    >>> check_urls(["http://gpu1:8000/v1?"])
    Traceback (most recent call last):
    ValueError: 'http://gpu1:8000/v1?***' has a query string or fragment, which may hold a credential and would come before the paths the client appends; give the key with --api-key (or SELFINSTRUCT_API_KEY) and the URL without them
    >>> check_urls(["http://gpu1:8000/v1 http://gpu2:8000/v1"])
    Traceback (most recent call last):
    ValueError: 'http://gpu1:8000/v1 http://gpu2:8000/v1' holds 2 URLs in one string; give each its own --base-url (in YAML, a list: base_url: [URL1, URL2])
    >>> check_urls(["http://gpu1:8000/v1\\r"])
    Traceback (most recent call last):
    ValueError: 'http://gpu1:8000/v1\\r' holds U+000D, which no URL has (a line end from a file saved on Windows?)
    """
    from urllib.parse import urlsplit

    for url in [v] if isinstance(v, str) else v or []:
        # urlsplit drops a tab or a line end without a word, and the HTTP client then raised a traceback;
        # a space or comma between two URLs made one server of both ("has no .../models").
        if isinstance(url, str) and len(found := re.findall(r"(?i)\bhttps?://", url)) > 1:
            raise ValueError(f"{url!r} holds {len(found)} URLs in one string; give each its own --base-url "
                             "(in YAML, a list: base_url: [URL1, URL2])")
        if isinstance(url, str) and (bad := next((c for c in url if c.isspace() or not c.isprintable()), None)):
            why = " (a line end from a file saved on Windows?)" if bad in "\r\n" else ""
            raise ValueError(f"{url!r} holds U+{ord(bad):04X}, which no URL has{why}")
        try:
            parts = urlsplit(url)
            parts.port  # parses the host too
        except ValueError as e:
            raise ValueError(f"{url!r} is not a valid URL ({e})") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not a valid URL (want http:// or https://, then a host)")
        if parts.username is not None or parts.password is not None:
            # The HTTP client refuses credentials in a URL beside the key's Authorization header,
            # and the URL is saved in config.yaml and stats.json: the password never gets that far.
            shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
            raise ValueError(f"{shown!r} holds a user name or password; give the key with --api-key "
                             "(or SELFINSTRUCT_API_KEY) and the URL without them")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            # A query may hold a credential (?key=...), and the URL is saved in config.yaml and
            # stats.json; nor can it work: the OpenAI client appends /chat/completions after it. A
            # bare '?' or '#' (urlsplit gives an empty query) is refused too: the paths go after it.
            base = url.split("?", 1)[0].split("#", 1)[0]
            shown = base + "?***" * ("?" in url) + "#***" * ("#" in url.split("?", 1)[0] or bool(parts.fragment))
            raise ValueError(f"{shown!r} has a query string or fragment, which may hold a credential and would "
                             "come before the paths the client appends; give the key with --api-key (or "
                             "SELFINSTRUCT_API_KEY) and the URL without them")
    return v


def printable(text) -> str:
    r"""Text from a server, a seed file or a teacher made safe for a terminal, on one line.

    Each control character is shown escaped, so an escape sequence (ESC[2J clears the screen,
    OSC 0 sets the window title) prints as text and does nothing.

    >>> printable("bad \x1b[2J id\x07\nnext")
    'bad \\x1b[2J id\\x07\\nnext'
    """
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


# Every option, positional and YAML key that names a file or folder, in every command. A `~` in
# them is the user's home: bash leaves `--out=~/x` as it is (no tilde after `=`) and YAML never
# expands one, so each command made a folder named `~` in the current one.
PATH_OPTIONS = frozenset({"config", "out", "rejected", "source", "data", "path", "tuned", "seeds", "prompts", "html",
                          "against", "teacher_model", "vllm_bin", "log_dir", "model", "tune_model"})


def expand_user_paths(values: dict) -> dict:
    """``values`` with `~` expanded in each of PATH_OPTIONS, in sections (pipeline's generate:) too.

    >>> import os; home = os.path.expanduser("~")
    >>> got = expand_user_paths({"out": "~/runs/a", "seeds": ["~/s.jsonl", "b.jsonl"], "stop": ["~"],
    ...                          "generate": {"out": "~"}})
    >>> got == {"out": home + "/runs/a", "seeds": [home + "/s.jsonl", "b.jsonl"], "stop": ["~"],
    ...         "generate": {"out": home}}
    True
    """
    import os

    def expand(v):
        if isinstance(v, str) and v.startswith("~"):
            return os.path.expanduser(v)
        return [expand(x) for x in v] if isinstance(v, list) else v

    return {k: expand(v) if k in PATH_OPTIONS else expand_user_paths(v) if isinstance(v, dict) else v
            for k, v in values.items()}


# The inputs a command reads (a run folder, a data file or folder, a benchmark): named by a path whose last
# part is no name (`.`, `..`, `hf/`), they are made absolute, so that a file named beside them
# (`judgements.jsonl` of a dataset folder, a tune's default --out) has a name to be made from:
# `audit .` in a saved dataset's folder was "PosixPath('.') has an empty name", a traceback.
INPUT_OPTIONS = frozenset({"source", "data", "path", "tuned", "against"})


def named_inputs(values: dict) -> dict:
    """``values`` with each of INPUT_OPTIONS whose path ends in no name made absolute.

    >>> import os; named_inputs({"path": ".", "data": "d.jsonl", "against": ["..", "b.jsonl"], "out": "."}) == {
    ...     "path": os.getcwd(), "data": "d.jsonl", "against": [os.path.dirname(os.getcwd()), "b.jsonl"], "out": "."}
    True
    """
    import os

    def named(v):
        if isinstance(v, list):
            return [named(x) for x in v]
        if isinstance(v, str) and v.strip() and os.path.basename(os.path.normpath(v)) in ("", ".", ".."):
            return os.path.abspath(v)
        return v

    return {k: named(v) if k in INPUT_OPTIONS else v for k, v in values.items()}


# Options refused empty (or all spaces): every path, where '' was taken as the current folder
# (generate --out '' wrote the run there, serve --log-dir '' its vllm.log) or as not given
# (--config '', audit --html '' did nothing, rc 0), and export's --license ('' wrote 'other') and
# --name ('' wrote a card with no title).
NOT_EMPTY_OPTIONS = PATH_OPTIONS | {"license", "name"}


def empty_option(values: dict) -> tuple[str, int | None] | None:
    """The first of NOT_EMPTY_OPTIONS in ``values`` (in sections too, as ``section.key``) that is
    empty or all spaces, and its list item's index (None: the value itself); None when there is none.

    >>> empty_option({"out": "runs/a", "seeds": ["s.jsonl", " "]}), empty_option({"generate": {"out": ""}})
    (('seeds', 1), ('generate.out', None))
    >>> empty_option({"out": "runs/a", "stop": [""], "config": None}) is None
    True
    """
    for key, value in values.items():
        if isinstance(value, dict):
            found = empty_option(value)
            if found:
                return f"{key}.{found[0]}", found[1]
        elif key in NOT_EMPTY_OPTIONS:
            for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                if isinstance(item, str) and not item.strip():
                    return key, i
    return None


def _why_not_empty(key: str) -> str:
    last = key.rpartition(".")[2]
    if last == "license":
        return "is empty; give a Hub license id, or leave it out for 'other'"
    if last == "name":
        return "is empty; give the card's title, or leave it out for none"
    if last in ("model", "tune_model"):
        return "is empty; give a model (a name or a path), or leave it out"
    return "is empty; give a file or folder name"


def refuse_empty_in_file(values: dict, source: str) -> None:
    """A --config file's (or a pipeline section's) empty path or license is one line naming its key."""
    found = empty_option(values)
    if found:
        key, item = found
        raise UserError(f"{source}: field '{key}'{'' if item is None else f' (item {item + 1})'}: {_why_not_empty(key)}")


def refuse_empty_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A flag's or positional's empty path or license is one line naming it as the user typed it."""
    found = empty_option({k: v for k, v in vars(args).items() if not isinstance(v, dict)})
    if found:
        key, item = found
        action = next((a for a in parser._actions if a.dest == key), None)
        if action is None:
            name = _flag(key)
        elif action.option_strings:
            name = max(action.option_strings, key=len)
        else:  # a positional, as --help shows it
            name = action.metavar if isinstance(action.metavar, str) else action.dest
        raise UserError(f"{name}{'' if item is None else f' (item {item + 1})'}: {_why_not_empty(key)}")


class OneConfig(argparse.Action):
    """``--config`` that refuses a second file: argparse keeps the last, and the first, which
    the user meant as a layer under it, would go silently unused."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise UserError(f"--config given twice ({getattr(namespace, self.dest)}, {values}); give one file "
                            "(its options can be overridden by flags)")
        setattr(namespace, self.dest, values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """Unwrap ``X | None`` and ``Optional[X]`` to X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return annotation


def int_flag(text: str) -> int:
    """An integer flag's value; one written in float notation (``--num 1e6``) is told its digits, as a
    YAML file's is (``_why``), where argparse said only "invalid int value: '1e6'".

    >>> int_flag("12")
    12
    >>> int_flag("1e6")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: invalid int value: '1e6'; write 1000000
    """
    try:
        return int(text)
    except ValueError:
        whole = _whole_number(text)
        advice = "" if whole is None else f"; write {_to_write(whole)}"
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}{advice}") from None


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = (),
              passthrough: str | None = None) -> None:
    """Add one flag per field of ``model``; unset flags stay None so YAML can fill them.

    ``passthrough`` names a list field filled by everything after ``--`` instead of a flag,
    for another program's flags (``-- --max-model-len 4096`` would not parse as values).
    """
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind = _base_type(field.annotation)
        help_text = field.description or ""
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if default is not None and default != [] and kind is not bool:
            help_text += f" (default: {default})"
        if name == passthrough:
            # SUPPRESS: absent means "not given", so a YAML file's value is not overridden by [].
            parser.add_argument(name, nargs="*", default=argparse.SUPPRESS, metavar="-- FLAGS", help=help_text)
            # argparse fills it at the first positional, so after RUN_OR_FILE the `-- FLAGS` would be
            # "unrecognized": cli.main cuts them off at `--` itself and sets this field.
            parser.passthrough = name
        elif kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            # extend: `--base-url A B` and `--base-url A --base-url B` both give [A, B].
            parser.add_argument(_flag(name), dest=name, nargs="+", action="extend", default=None, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(_flag(name), dest=name, choices=choices, default=None, help=help_text)
        elif kind in (int, float):
            parser.add_argument(_flag(name), dest=name, type=int_flag if kind is int else float, default=None,
                                help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)


_COMMENT_AS_VALUE = re.compile(r"[ \t]+(#\S[^\r\n\0]*)")  # `stop: ###`: see construct_yaml_null


def _unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one silently.

    >>> import yaml
    >>> try:
    ...     yaml.load("num: 2\\nnum: 3\\n", _unique_key_loader())
    ... except yaml.YAMLError as e:
    ...     print(e.problem, "on line", e.problem_mark.line + 1)
    key 'num' given twice on line 2
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_yaml_int(self, node):
            # Python refuses to read an integer of over 4,300 digits (a ValueError yaml lets
            # through, a traceback): said as yaml's own errors are, at the value's line.
            # A 0x, 0o or 0b one is read whole, but no larger one can be printed: an option with no
            # upper bound took it, and saving config.yaml was that ValueError's traceback.
            if ":" in node.value:  # YAML 1.1 reads 1:20 as base 60 (80): a time, most likely, not a number
                raise yaml.constructor.ConstructorError(
                    None, None, f"{node.value} is a base-60 number to YAML ({super().construct_yaml_int(node)}); "
                    "write the number you mean, or quote it", node.start_mark)
            digits = node.value.lstrip("+-").replace("_", "")
            if len(digits) > 1 and digits[0] == "0" and digits.isdigit():
                # YAML 1.1 reads 010 as octal (8), and 09 as the text '09': a number with a leading
                # zero is most likely a typo, and taking it as 8 changed the run silently.
                raise yaml.constructor.ConstructorError(
                    None, None, f"{node.value} has a leading zero, which YAML reads as octal: write "
                    f"{node.value[0] if node.value[0] in '+-' else ''}{digits.lstrip('0') or '0'}", node.start_mark)
            try:
                value = super().construct_yaml_int(node)
                str(value)
                return value
            except ValueError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"an integer of {len(node.value):,} characters is too long to read",
                    node.start_mark) from None

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" then an explicit key is an override, not a duplicate
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice",
                                                                key_node.start_mark)
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class refuses it
                    pass
            return super().construct_mapping(node, deep)

        def construct_yaml_null(self, node):
            # `stop: ###` is a key with no value and a comment to YAML: the run went on with no stop
            # sequence at all (null is the default). A comment right after the colon that begins
            # with '#' and no space is taken as a value the user meant; `key:  # a note` stays a comment.
            mark = node.start_mark
            comment = _COMMENT_AS_VALUE.match(mark.buffer or "", mark.index) if node.value == "" else None
            if comment:
                meant = comment.group(1).rstrip()
                raise CommentNotValue(
                    None, None, f"{meant!r} after a space is a comment to YAML, so this value is empty: to mean "
                    f"{meant!r}, quote it ({json.dumps(meant, ensure_ascii=False)}); for no value, write null", mark)
            return super().construct_yaml_null(node)

    class CommentNotValue(yaml.constructor.ConstructorError):
        """Valid YAML that most likely says something else than its writer meant."""

    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:null", UniqueKeyLoader.construct_yaml_null)
    UniqueKeyLoader.CommentNotValue = CommentNotValue
    return UniqueKeyLoader


# Said of a data file (datafiles' _TOO_DEEP) and of a config, each in its own words after it.
TOO_DEEP = "nested too deeply to read"
TOO_DEEP_OPTION = f"{TOO_DEEP}; an option holds a value, not a thousand levels of lists"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; any problem (a key given twice included) is a UserError naming the file."""
    import yaml

    from selfinstruct.datafiles import read_text

    path = Path(path)
    text = read_text(path, "config file")  # missing, a folder, unreadable or not UTF-8: one line
    try:
        loader = _unique_key_loader()(text)
    except yaml.reader.ReaderError as e:
        # yaml's reader checks the whole text as it is made, before any parse: a NUL, or a terminal's
        # ESC pasted in, was a ReaderError traceback.
        import unicodedata

        at = e.position
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        what = "a control character" if unicodedata.category(chr(e.character)) == "Cc" else "a character"
        raise UserError(f"{path}:{line}: not valid YAML ({what}, U+{e.character:04X}, at column {column}, which "
                        "YAML allows in no file)") from None
    try:
        data = loader.get_single_data()
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: config must be a mapping of option: value")
        return expand_user_paths(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        if isinstance(e, loader.CommentNotValue):
            raise UserError(f"{path}{where}: {e.problem}") from None
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        # yaml reads nesting (and we expand it) by recursion: 3,000 levels of lists were a
        # traceback. The reader stopped within them, so its line is the place.
        raise UserError(f"{path}:{loader.line + 1}: not valid YAML ({TOO_DEEP_OPTION})") from None
    finally:
        loader.dispose()


def _why(err: dict) -> str:
    """A pydantic error's reason in our words: our own validators' as they are, Python's and
    pydantic's for an integer too long to read (YAML's 0x with 5,000 hex digits is read whole,
    and Python then refuses to print it: 'Exceeds the limit (4300 digits) for integer string
    conversion; use sys.set_int_max_str_digits()...') as one short line, and a float too large for an
    integer (``ngram: 1.0e+20``), which pydantic says in the same words, as that."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "int_parsing_size" and isinstance(err.get("input"), float):
        # YAML reads 1.0e+20 as a float, which pydantic takes as an integer only below 2**63, and says so
        # as of a string too long: it was "a number too long to read (over 4,300 digits)" of 1.0e+20.
        value = err["input"]
        return (f"{value:g} is too {'large' if value > 0 else 'far below zero'} to read as a whole number "
                f"from this notation; write it in digits{_as_digits(value)}")
    if err["type"] == "int_parsing_size" or msg.startswith("Exceeds the limit ("):
        return f"a number too long to read (over {sys.get_int_max_str_digits():,} digits)"
    whole = _whole_number(err.get("input")) if err["type"] == "int_parsing" else None
    if whole is not None:
        # YAML reads 1e3 as text (a number with an exponent needs a dot there, 1.0e+3), and pydantic
        # then said 'unable to parse string as an integer' of what reads as a number
        return f"{err['input']!r} is text to YAML; write {_to_write(whole)}"
    return msg


def _as_digits(value: float) -> str:
    """`` (100000000000000000000)``: a whole ``value`` as the digits to write, when they are few enough to read.

    >>> _as_digits(1e20), _as_digits(1.5e20), _as_digits(1e300), _as_digits(1.5)
    (' (100000000000000000000)', ' (150000000000000000000)', '', '')
    """
    whole = _whole_number(repr(value))
    return f" ({whole})" if whole is not None and _to_write(whole) != "it in digits" else ""


def _to_write(whole: int) -> str:
    """What to tell a user to write for a whole number they wrote in float notation: its digits, when few
    enough to read (30), else "it in digits"."""
    return str(whole) if len(str(abs(whole))) <= 30 else "it in digits"


def _whole_number(text) -> int | None:
    """``"1e3"`` as 1000: a string that is a whole number in float notation, else None. Read as a decimal, so
    ``"1e23"`` is 10**23 (a float would make it 99999999999999991611392).

    >>> _whole_number("1e3"), _whole_number("1e23") == 10**23, _whole_number("1.5"), _whole_number("abc")
    (1000, True, None, None)
    """
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text.strip()) if isinstance(text, str) else None
    except InvalidOperation:
        return None
    # A finite whole number of some 4,000 digits at most (Python prints no int of over 4,300): Decimal('1e999999')
    # would make one of a million.
    if value is None or not value.is_finite() or value != value.to_integral_value() or value.adjusted() > 4000:
        return None
    return int(value)


def format_validation_error(e: ValidationError, source: str, section: str = "", unknown: str = "unknown option") -> str:
    """One line: the source, the first failing field (``section.field`` in a file with sections) and why.

    ``unknown``: said of a key the model does not have (a seed file's is an "unknown field")."""
    err = e.errors()[0]
    field = ".".join([section] * bool(section) + [str(p) for p in err["loc"]]) or "(top level)"
    msg = _why(err)
    if err["type"] == "extra_forbidden":
        msg = unknown
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{source}: field '{field}': {msg}{more}"


def format_flag_error(e: ValidationError) -> str:
    """One line for a flag's bad value, named as the user typed it: ``--num: Input should be ...``.

    A list flag's item is named by its place: ``--operations (item 1): Input should be ...``.
    """
    err = e.errors()[0]
    loc = err["loc"]
    where = _flag(str(loc[0])) + "".join(f" (item {p + 1})" if isinstance(p, int) else f".{p}" for p in loc[1:])
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {_why(err)}{more}"


def validation_error(e: ValidationError, flags: set, source: str, section: str = "",
                     in_file: set | None = None) -> str:
    """The line for a failed ``model_validate`` of a file's values overridden by ``flags``:
    the flag is named when its value failed, the file (and ``section.field``) otherwise.

    ``in_file``: the keys the file gave, when known; a field it did not give is named as
    its flag (a default that another option contradicts, ``--max-words`` below ``--min-words``).
    """
    loc = e.errors()[0]["loc"]
    if loc and (loc[0] in flags or source == "flags"):  # no file: a required field no flag gave, too
        return format_flag_error(e)
    if loc and in_file is not None and loc[0] not in in_file:
        return format_flag_error(e)
    return format_validation_error(e, source, section)


def resolve(model: type[BaseModel], args: argparse.Namespace | None = None, config_path: str | Path | None = None):
    """Defaults < YAML file < flags that were given; validated by the model."""
    values: dict = {}
    given: set[str] = set()
    source = "flags"
    if config_path is None and args is not None:
        config_path = getattr(args, "config", None)
    if config_path:
        values.update(without_nulls(model, load_yaml(config_path)))
        source = str(config_path)
    in_file = set(values)
    if args is not None:
        for name in model.model_fields:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
                given.add(name)
    if config_path:  # the file's own values: one a flag overrides is not used, so not refused
        _refuse_bools_for_numbers(model, {k: v for k, v in values.items() if k not in given}, source)
        refuse_empty_in_file({k: v for k, v in values.items() if k not in given}, source)
        _refuse_a_list_written_as_one_path(model, {k: v for k, v in values.items() if k not in given}, source)
    try:
        # The validators of two options together (--max-words above --min-words) name each as given,
        # and in a run to resume wait for its own values (PAIRS_ON_RESUME).
        return model.model_validate(values, context={"given": set(values), "in_file": in_file - given,
                                                     "config_file": str(config_path) if config_path else None,
                                                     PAIRS_ON_RESUME: resumes(model, values)})
    except ValidationError as raised:
        e = _unknown_first(raised)
        line, err = validation_error(e, given, source, in_file=in_file), e.errors()[0]
        name = str(err["loc"][0]).replace("-", "_") if err["loc"] else ""
        if err["type"] == "extra_forbidden" and name in model.model_fields:  # a key spelled as its flag
            line = line.replace("unknown option", f"unknown option (write {name})", 1)
        elif err["type"] == "missing" and name in model.model_fields:  # pydantic's "--out: Field required"
            line = (f"{_flag(name)} is required: give it as a flag, or as {name}: in "
                    f"{source if config_path else 'a --config file'}")
        raise UserError(line) from None


def _refuse_a_list_written_as_one_path(model: type[BaseModel], values: dict, source: str) -> None:
    """A --config file's list of paths written as one string of several (``against: a b``, as the
    flag takes them) is one line naming the key: the string is one path (``one_item_list``), and
    its "a b: no such file or folder" named no key. A path with a space that exists is taken.

    >>> from pydantic import BaseModel
    >>> class Opts(BaseModel):
    ...     against: list[str]
    >>> try:
    ...     _refuse_a_list_written_as_one_path(Opts, {"against": "no/such-a.jsonl no/such-b.jsonl"}, "c.yaml")
    ... except UserError as e:
    ...     print(e)
    c.yaml: field 'against': 'no/such-a.jsonl no/such-b.jsonl' is one path, and there is no such file or folder; for several, write a YAML list: against: [no/such-a.jsonl, no/such-b.jsonl]
    """
    import typing

    for name, value in values.items():
        field = model.model_fields.get(name)
        if (field is None or name not in PATH_OPTIONS or typing.get_origin(field.annotation) is not list
                or not isinstance(value, str) or len(value.split()) < 2 or Path(value).exists()):
            continue
        raise UserError(f"{source}: field '{name}': {printable(value)!r} is one path, and there is no such file or "
                        f"folder; for several, write a YAML list: {name}: [{', '.join(map(printable, value.split()))}]")


class _unknown_first:
    """A ValidationError's errors with an unknown key's first: the one line names it, where a flag's bad
    value named first hid a misspelt key in the --config file behind '(and 1 more)'."""

    def __init__(self, e: ValidationError):
        self._errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")

    def errors(self) -> list:
        return self._errors


def without_nulls(model: type[BaseModel], values: dict) -> dict:
    """A --config file's (or a pipeline section's) values without its ``key: null`` ones: null says
    "the default", as leaving the key out does. Kept, it counted as an option given, so a resume took
    ``limit: null`` as the user's choice over the run's own limit. No option has a default other than
    None that null could mean instead; a required one (``out: null``) and an unknown key stay, to be refused.

    >>> from pydantic import BaseModel
    >>> class Opts(BaseModel):
    ...     out: str
    ...     num: int = 100
    ...     limit: int | None = None
    >>> without_nulls(Opts, {"num": None, "limit": None, "out": None, "bogus": None})
    {'out': None, 'bogus': None}
    """
    fields = model.model_fields
    return {k: v for k, v in values.items() if v is not None or k not in fields or fields[k].is_required()}


def _refuse_bools_for_numbers(model: type[BaseModel], values: dict, source: str, section: str = "") -> None:
    """pydantic reads YAML's ``true`` as 1 for a number field (``client_processes: true`` would
    be one sender process): a bool where a number is wanted is the user's mistake, one line."""
    import typing

    for name, value in values.items():
        field = model.model_fields.get(name)
        if field is None or not isinstance(value, bool):
            continue
        kinds = {field.annotation, *typing.get_args(field.annotation)}
        if bool not in kinds and kinds & {int, float}:
            where = f"{section}.{name}" if section else name
            raise UserError(f"{source}: field '{where}': expected a number, not {str(value).lower()}")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML, so the run folder says how it was made.

    Atomically (the data layer's writer): a crash mid-write or a full disk leaves the old
    config whole, which matters on resume, where this file is what new options are checked against.
    """
    import yaml

    from selfinstruct.datafiles import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def counted(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and its noun, singular for one: what every message that counts things says.

    >>> counted(1, "row"), counted(1234, "row"), counted(0, "reply", "replies")
    ('1 row', '1,234 rows', '0 replies')
    """
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"


# --------------------------------------------------------------------- naming a --config file's values


# A validation context's key: the command's --out is a run to resume (``resumes``), so the checks
# of a pair of options (--max-words above --min-words) wait for generate.take_the_runs_own, which
# validates again with the run's own value for each option left out. Checked here, a left-out one
# was the default: `min_words: 200` in a `--max-words 300` run was refused as "must be below
# max_words (default 150)", a value the resumed run would never use.
PAIRS_ON_RESUME = "pairs_on_resume"


def a_run_to_resume(out) -> bool:
    """Whether ``out`` (a command's --out) is a run folder with its options saved (config.yaml),
    whose own values a resume takes for the options left out (``generate.take_the_runs_own``)."""
    from selfinstruct.datafiles import is_run_folder

    if not isinstance(out, str):
        return False
    out = Path(out).expanduser()  # as the option's own validator reads it: ~/runs/a is a home path
    return (out / "config.yaml").is_file() and is_run_folder(out)


def resumes(model: type[BaseModel], values: dict) -> bool:
    """Whether options ``values`` of ``model`` (generate's, respond's, evolve's) resume a run: their
    --out is one (``a_run_to_resume``)."""
    return "out" in model.model_fields and a_run_to_resume(values.get("out"))


def pair_waits_for_the_run(info) -> bool:
    """Whether a validator of two options together is to pass for now (``PAIRS_ON_RESUME``)."""
    return bool((info.context or {}).get(PAIRS_ON_RESUME))


class FileKeys(frozenset):
    """The options a file gave (a command's ``in_file``), knowing how the file names them: a pipeline
    file's ``generate:`` section names its ``num`` ``generate.num``, a --config file ``num``. Carried
    wherever ``in_file`` goes, so every line naming a key of the file (``file_key``) names its section,
    where the pipeline's lines said ``pipe.yaml: field 'temperature'`` of its generate: section. A set
    made from it (``in_file - given``) is a plain one, without the section: pass it on as it is, and
    name another option as the file's key through ``keys_like``.

    >>> keys = FileKeys({"num"}, "generate")
    >>> "num" in keys, file_key("num", keys), file_key("num", {"num"}), said_as_given("num", 5, keys)
    (True, 'generate.num', 'num', 'generate.num: 5')
    """

    section: str = ""

    def __new__(cls, names=(), section: str = ""):
        keys = super().__new__(cls, names)
        keys.section = section
        return keys


def section_of(in_file) -> str:
    """The section of the file whose options ``in_file`` holds ('' for a --config file, a plain set)."""
    return getattr(in_file, "section", "")


def file_key(option: str, in_file) -> str:
    """``option`` as the file ``in_file`` is of names it: ``num``, or ``generate.num`` in a pipeline file's section."""
    return f"{section_of(in_file)}.{option}" if section_of(in_file) else option


def keys_like(names, in_file) -> FileKeys:
    """``names`` as keys of the same file and section as ``in_file``: a line that names an option the
    file did not give as the key to add beside one it did (``model`` beside the file's ``base_url``)."""
    return FileKeys(names, section_of(in_file))


def said_as_given(option: str, value=None, in_file: set[str] = frozenset()) -> str:
    """An option (and its value) as the user gave it: the --config file's key when the file gave
    it (``file_key``: in its section), else the flag, so a line never names a flag the user did not
    type (generate, respond, evolve).

    >>> said_as_given("max_tokens", 1024), said_as_given("max_tokens", 1024, {"max_tokens"})
    ('--max-tokens 1024', 'max_tokens: 1024')
    """
    if option in in_file:
        key = file_key(option, in_file)
        return key if value is None else f"{key}: {value}"
    return f"--{option.replace('_', '-')}" + ("" if value is None else f" {value}")


def named_file(config_file: str | None, in_file: set[str], *options: str) -> str:
    """A line's opening naming the --config file, when it gave any of ``options``.

    >>> named_file("c.yaml", {"rounds"}, "rounds"), named_file("c.yaml", {"rounds"}, "limit")
    ('c.yaml: ', '')
    """
    return f"{config_file}: " if config_file and in_file.intersection(options) else ""


def given_by_file(args: argparse.Namespace, cfg: BaseModel) -> tuple[str | None, set[str]]:
    """The --config file of ``args`` (None: none) and the options it gave that no flag overrode,
    for ``said_as_given`` and ``named_file``: what ``resolve`` read, told apart after it."""
    config_file = getattr(args, "config", None)
    if not config_file:
        return None, set()
    return str(config_file), {name for name in cfg.model_fields_set if getattr(args, name, None) is None}
