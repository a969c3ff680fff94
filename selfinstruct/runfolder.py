"""The run folder on disk: append-only JSONL files that survive kill -9.

Layout of ``outputs/<run>/``::

    config.yaml      the resolved config of the run
    responses.jsonl  every teacher reply, logged before it is processed (the write-ahead log)
    kept.jsonl       KeptRecord per line, appended as records are accepted
    rejected.jsonl   Rejected per line, with stage and reason
    stats.json       counts per reason, tokens, requests, errors, wall time
    data.json        the Alpaca export (instruction, input, output), one row per instance

Why it is crash-safe: each line is written with one ``write`` call on a file
opened for appending, then flushed and fsynced before the run goes on. A kill
can leave at most one partial last line; ``repair`` cuts it off on resume.
A Response is logged before any of its candidates is written, so a candidate
that was not written yet is processed again from the log on resume.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from selfinstruct.config import UserError

FILES = ("responses.jsonl", "kept.jsonl", "rejected.jsonl")


class JsonlAppender:
    """Appends one JSON object per line, durably (flush + fsync per write)."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._f = open(self.path, "ab", buffering=0)

    def write(self, obj) -> None:
        self.write_many([obj])

    def write_many(self, objs) -> None:
        """All lines in one write: a kill leaves them all, none, or a cut last line.

        A full disk (or a file size limit) can take part of a write and refuse the rest:
        then the part is cut off again, so a failed write leaves the file as it was.
        """
        data = b"".join(_dump_line(o) for o in objs)
        if not data:
            return
        fd = self._f.fileno()
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):  # a short write is not an error yet; the next call says why
                n = self._f.write(data[done:])
                if not n:
                    raise OSError(errno.EIO, "the write wrote nothing")
                done += n
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the next resume's repair() cuts the partial line
            raise UserError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        self._f.close()


def _dump_line(obj) -> bytes:
    if hasattr(obj, "model_dump_json"):
        text = obj.model_dump_json()
    else:
        text = json.dumps(obj, ensure_ascii=False)
    # json escapes control characters and newlines, so one record is always one line. U+2028,
    # U+2029 and U+0085 are left raw by json, yet str.splitlines() breaks lines at them: escape
    # them too (they can only occur inside JSON strings), so every line splitter sees one record.
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return text.encode("utf-8") + b"\n"


def repair(path: Path) -> int:
    """Cut a partial last line left by a kill; returns the bytes removed.

    >>> # a file ending in b'{"a": 1}\\n{"b"' becomes b'{"a": 1}\\n'
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # Read backwards in blocks to find the last newline without loading the file.
        pos = size
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == size and chunk.endswith(b"\n"):
                return 0
            nl = chunk.rfind(b"\n")
            if nl != -1:
                keep = start + nl + 1
                f.truncate(keep)
                os.fsync(f.fileno())
                return size - keep
            pos = start
        f.truncate(0)
        os.fsync(f.fileno())
        return size


# Readers, atomic writers and run-folder recognition live in the data layer; these names stay
# importable from here for a while.
from selfinstruct.datafiles import (  # noqa: E402,F401
    is_run_folder,
    load_kept,
    load_rejected,
    load_stats,
    read_jsonl,
    write_json_atomic,
)
