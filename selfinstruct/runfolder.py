"""The run folder on disk: append-only JSONL files that survive kill -9.

Layout of ``outputs/<run>/``::

    config.yaml      the resolved config of the run
    responses.jsonl  every teacher reply, logged before it is processed (the write-ahead log)
    kept.jsonl       KeptRecord per line, appended as records are accepted
    rejected.jsonl   Rejected per line, with stage and reason
    stats.json       counts per reason, tokens, requests, errors, wall time
    session.json     this session's requests, faults and seconds so far (``SessionCounts``)
    data.json        the Alpaca export (instruction, input, output), one row per instance

Why it is crash-safe: each line is written with one ``write`` call on a file
opened for appending, then flushed and fsynced before the run goes on. A kill
can leave at most one partial last line; ``repair`` cuts it off on resume.
A Response is logged before any of its candidates is written, so a candidate
that was not written yet is processed again from the log on resume.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from selfinstruct.config import UserError
from selfinstruct.datafiles import json_line

FILES = ("responses.jsonl", "kept.jsonl", "rejected.jsonl")


class JsonlAppender:
    """Appends one JSON object per line, durably (flush + fsync per write)."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._f = open(self.path, "ab", buffering=0)
        self._unsynced: int | None = None

    def write(self, obj) -> None:
        self.write_many([obj])

    def write_many(self, objs) -> None:
        """All lines in one write: a kill leaves them all, none, or a cut last line."""
        self.write_bytes(b"".join(_dump_line(o) for o in objs))
        if self.fsync:
            self.sync()

    def write_bytes(self, data: bytes) -> None:
        """Append whole lines with one write call.

        A full disk (or a file size limit) can take part of a write and refuse the rest:
        then the part is cut off again, so a failed write leaves the file as it was.
        """
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
        except OSError as e:
            self._cut(start)
            raise UserError(f"{self.path}: cannot write ({e.strerror or e})") from None
        if self._unsynced is None:
            self._unsynced = start  # where the lines not yet fsynced begin

    def sync(self) -> None:
        """fsync; on failure the unsynced tail is cut off, so the file ends on a durable line."""
        fd = self._f.fileno()
        try:
            os.fsync(fd)
        except OSError as e:
            self._cut(self._unsynced)
            raise UserError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self._unsynced = None

    def _cut(self, size: int | None) -> None:
        if size is None:
            return
        try:
            os.ftruncate(self._f.fileno(), size)
        except OSError:
            pass  # the next resume's repair() cuts the partial line

    def close(self) -> None:
        self._f.close()


class GroupWriter:
    """Group commit: one thread writes and fsyncs the run's JSONL files, off the event loop.

    ``submit([(name, objs), ...])`` queues a reply's lines and returns a
    ``concurrent.futures.Future`` that completes once they are written and fsynced.
    The thread takes every job waiting at once and commits them together, in two
    phases, so many replies share two fsyncs instead of paying two each:

    1. the write-ahead files (``responses.jsonl``, ``errors.jsonl``): written, fsynced;
    2. the decision files (``rejected.jsonl``, then ``kept.jsonl``): written, fsynced.

    Jobs keep their submission order within each file, and a reply's log line is
    durable before any of its candidates is written, so resume's rule holds: a
    candidate not yet written is redone from the log. A failed write cuts its file
    back (``JsonlAppender.write_many``), fails that group's futures and every later
    one; the first error is the one reported.

    Why a thread and not the loop: ``write`` and ``fsync`` block, and while they
    did, the client's connections stalled (128 ``connection`` faults in one
    2,000-record run against a server that never fails). Both release the GIL.
    """

    WAL = ("responses.jsonl", "errors.jsonl")

    def __init__(self, folder: Path, names: tuple[str, ...], fsync: bool = True):
        import queue
        import threading

        self.files = {name: JsonlAppender(Path(folder) / name, fsync=False) for name in names}
        self.fsync = fsync
        self.error: BaseException | None = None
        self.groups = 0  # commits made, for the benchmark
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="selfinstruct-writer", daemon=True)
        self._thread.start()

    def submit(self, items: list[tuple[str, list]]):
        """Queue lines for several files; the future's result is None once they are durable.

        Lines are serialised here, in the caller's thread, so later changes to the
        objects cannot change what is written.
        """
        from concurrent.futures import Future

        fut: Future = Future()
        job = [(name, b"".join(_dump_line(o) for o in objs)) for name, objs in items if objs]
        self._queue.put((job, fut))
        return fut

    def _run(self) -> None:
        import queue

        stop = False
        while not stop:
            jobs = [self._queue.get()]
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if jobs[-1] is None or None in jobs:
                stop = True
                jobs = [j for j in jobs if j is not None]
            if not jobs:
                continue
            if self.error is None:
                try:
                    self._commit([job for job, _ in jobs])
                    self.groups += 1
                except BaseException as e:  # noqa: BLE001 - handed to the waiting futures
                    self.error = e
            for _, fut in jobs:
                if self.error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(self.error)

    def _commit(self, jobs: list) -> None:
        for phase in (self.WAL, None):
            touched = []
            for name, f in self.files.items():
                if (name in self.WAL) != (phase is not None):
                    continue
                data = b"".join(d for job in jobs for n, d in job if n == name)
                if data:
                    f.write_bytes(data)
                    touched.append(f)
            if self.fsync:
                for f in touched:
                    f.sync()

    def close(self) -> None:
        """Commit what is queued, then stop the thread; raises the first write error."""
        self._queue.put(None)
        self._thread.join()
        for f in self.files.values():
            f.close()
        if self.error is not None:
            raise self.error


def _dump_line(obj) -> bytes:
    return json_line(obj).encode("utf-8")


def check_regular_file(path: Path) -> None:
    """Refuse a run file that is there but is no plain file (a folder, a FIFO, a device): a folder failed
    with a traceback, and a FIFO held the run forever (an open for reading or appending waits for the
    other end; `export RUN` hung on a kept.jsonl or stats.json made one). A missing or unreadable path
    passes: to a run's reader a missing file is empty, and the open that follows names what else is wrong."""
    import stat

    try:
        mode = os.stat(path).st_mode  # stat, unlike open, never waits on a FIFO
    except OSError:
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        # Not 'the run folder': judgements of a plain data file live beside it, not in a run.
        raise UserError(f"{path}: is not a regular file (a FIFO, device or socket); selfinstruct reads and writes "
                        "this file itself: move it out of the way")


def check_run_files(folder: Path, names) -> None:
    """``check_regular_file`` for each of ``names`` in a run folder that is there, and session.json
    refused if a folder: a FIFO there is skipped and removed when the session begins, but a folder
    cannot be, and was refused only after config.yaml had been rewritten. Before a resume reads or
    writes anything."""
    for name in names:
        if (folder / name).exists():
            check_regular_file(folder / name)  # before any is read: a FIFO's open would wait forever
    if (folder / SESSION_FILE).is_dir():
        raise UserError(f"{folder / SESSION_FILE}: is a folder, not a file; the run keeps a session's counts in "
                        "this file: move it out of the run folder")


def unterminated_tail(path: Path) -> bytes:
    """The bytes after a file's last newline (a last line without its own), read from the end;
    empty when the file ends in a newline, is empty, or is missing."""
    path = Path(path)
    if not path.exists():
        return b""
    check_regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos, tail = size, b""
        while pos > 0:  # backwards in blocks: the file is never loaded whole
            start = max(0, pos - (1 << 16))
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl != -1:
                return chunk[nl + 1:] + tail
            tail, pos = chunk + tail, start
        return tail


def repair(path: Path, whole=None) -> int:
    """Cut a partial last line left by a kill; returns the bytes removed.

    ``whole(line)``: whether a last line without its newline is a whole, valid record after all
    (an editor drops a file's final newline; a kill can stop a write between a line and its
    newline): then the newline is added instead, so the record stays and the next write does not
    glue onto it.

    >>> # a file ending in b'{"a": 1}\\n{"b"' becomes b'{"a": 1}\\n'
    """
    path = Path(path)
    tail = unterminated_tail(path)
    if not tail:
        return 0
    with open(path, "rb+") as f:
        if whole is not None and whole(tail):
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            os.fsync(f.fileno())
            return 0
        f.truncate(path.stat().st_size - len(tail))
        os.fsync(f.fileno())
        return len(tail)


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


# ------------------------------------------------------------------ a session's counts

SESSION_FILE = "session.json"


class SessionCounts:
    """A session's requests, faults and wall time on disk while it runs (``session.json``).

    stats.json is written when a session ends (on Ctrl-C and SIGTERM too), and a session ended by kill -9 (or
    in respond and evolve an error before the loop) never gets there: its replies are in the log, so its tokens and records are
    counted from the files, but its requests, faults and seconds were lost. So the session
    saves them here (``keep``: every second), and the next one counts a session.json that
    stats.json has not counted yet (``begin_session``) before it starts.
    stats.json names the session it counted last (``last_session.id``), so a kill between
    writing it and removing this file counts no session twice.

    The file is replaced (a temp, then ``os.replace``) but not fsynced: it must outlive the
    process, not the machine, and an fsync would hold the event loop (``GroupWriter``).

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> s = SessionCounts(folder, started=0.0)
    >>> s.save(now=12.5, faults={"timeout": 1})
    >>> rec = SessionCounts.unfinished(folder, counted=None)
    >>> rec["id"] == s.id, rec["wall_s"], rec["faults"]
    (True, 12.5, {'timeout': 1})
    >>> SessionCounts.unfinished(folder, counted=s.id) is None  # stats.json has it already
    True
    """

    EVERY_S = 1.0  # a save costs a few hundred microseconds of the event loop

    def __init__(self, folder: Path, started: float, name: str = SESSION_FILE):
        import uuid

        self.path = Path(folder) / name  # (the judge keeps its own: judge_session.json)
        self.id = uuid.uuid4().hex
        self.started = started
        self.teacher: dict = {}  # model and base_urls, once the teacher is up

    def save(self, now: float | None = None, faults: dict | None = None, servers: dict | None = None,
             session: dict | None = None) -> None:
        """Write the session's counts so far: its id, ``wall_s`` since it began, its teacher, its
        faults and per-server counts, and (generate) the figures of ``last_session``."""
        import json
        import time

        from selfinstruct.datafiles import write_atomic

        now = time.monotonic() if now is None else now
        rec = {"id": self.id, "wall_s": round(now - self.started, 3), **self.teacher, "faults": faults or {},
               "servers": servers or {}, **({"session": session} if session else {})}
        try:
            write_atomic(self.path, json.dumps(rec), fsync=False)
        except UserError:
            # A full disk: the counts of a session that then dies are lost, as they were
            # before this file; the records are what must not be, and GroupWriter reports that.
            pass

    def teacher_up(self, model: str, base_urls: list[str]) -> None:
        """Record the teacher and save: starting a vLLM teacher takes minutes, which a kill would lose."""
        self.teacher = {"model": model, "base_urls": list(base_urls)}
        self.save()

    async def keep(self, teacher, session=None) -> None:
        """Save ``teacher``'s faults and per-server counts (and ``session()``) every EVERY_S seconds
        until cancelled: a task on the session's event loop."""
        import asyncio

        while True:
            await asyncio.sleep(self.EVERY_S)
            self.save(faults=dict(teacher.faults), servers=teacher.server_stats(), session=session() if session else None)

    @staticmethod
    def unfinished(folder: Path, counted: str | None, name: str = SESSION_FILE) -> dict | None:
        """The counts of a session that ended without writing stats.json, or None.

        ``counted``: the id of the session stats.json counted last. A file that cannot be
        read (a crash of the machine, not of the process, can leave it empty) is None too:
        its counts are lost, as they were before this file.
        """
        import json

        path = Path(folder) / name
        if not path.is_file():  # a FIFO would hold the read forever; a directory is refused where it is removed
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not _counts_ok(rec) or rec["id"] == counted:
            return None
        return rec


def _counts_ok(rec) -> bool:
    """Whether ``rec`` is a session.json stats.json can add: every figure a count or a number of
    seconds (finite, not negative), every field the type its writer gives it.

    >>> _counts_ok({"id": "a", "wall_s": 1.5, "faults": {"timeout": 1}, "servers": {"u": {"requests": 3, "faults": {}}}})
    True
    >>> _counts_ok({"id": "a", "wall_s": float("nan")}), _counts_ok({"id": "a", "wall_s": 1, "faults": {"timeout": -2}})
    (False, False)
    >>> _counts_ok({"id": "a", "wall_s": 1, "servers": {"u": {"requests": "many"}}})
    False
    """
    import math

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def counts(d) -> bool:
        return isinstance(d, dict) and all(count(v) for v in d.values())

    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        return False
    wall, servers, urls = rec.get("wall_s"), rec.get("servers", {}), rec.get("base_urls")
    return (isinstance(wall, (int, float)) and not isinstance(wall, bool) and math.isfinite(wall) and wall >= 0
            and counts(rec.get("faults", {})) and count(rec.get("rows", 0))
            and isinstance(servers, dict) and all(isinstance(s, dict) and counts(s.get("faults", {}))
                                                  and counts({k: v for k, v in s.items() if k != "faults"})
                                                  for s in servers.values())
            and (urls is None or isinstance(urls, list) and all(isinstance(u, str) for u in urls))
            and isinstance(rec.get("model") or "", str) and isinstance(rec.get("session", {}), dict))


def check_carried_counts(stats: dict, path) -> None:
    """The figures of stats.json that each session adds its own to (``wall_time_s``, ``sessions``,
    ``faults``, ``servers``): seconds finite and not negative, counts whole and not negative, else
    one line naming the file and the key. A hand-edited NaN or -3 was taken and written back, and
    a count that is text in ``servers`` was a TypeError traceback once the session's requests were spent.

    >>> check_carried_counts({"wall_time_s": 2.5, "sessions": 1, "faults": {"timeout": 1},
    ...                       "servers": {"u": {"requests": 3, "faults": {}, "prompt_tokens": 9}}}, "stats.json")
    >>> check_carried_counts({"wall_time_s": float("nan")}, "r/stats.json")
    Traceback (most recent call last):
    selfinstruct.config.UserError: r/stats.json: field 'wall_time_s': must be seconds (a finite number, 0 or more), not NaN
    >>> check_carried_counts({"servers": {"http://h/v1": {"requests": -3}}}, "r/stats.json")
    Traceback (most recent call last):
    selfinstruct.config.UserError: r/stats.json: field 'servers.http://h/v1.requests': must be a count (a whole number, 0 or more), not -3
    """
    import json
    import math

    def count(key: str, v) -> None:
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise UserError(f"{path}: field '{key}': must be a count (a whole number, 0 or more), not {json.dumps(v)[:40]}")

    def counts(key: str, d) -> None:
        if not isinstance(d, dict):
            raise UserError(f"{path}: field '{key}': must map names to counts")
        for name, v in d.items():
            count(f"{key}.{name}", v)

    wall = stats.get("wall_time_s", 0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise UserError(f"{path}: field 'wall_time_s': must be seconds (a finite number, 0 or more), not {json.dumps(wall)[:40]}")
    count("sessions", stats.get("sessions", 0))
    counts("faults", stats.get("faults", {}))
    servers = stats.get("servers") or {}
    if not isinstance(servers, dict):
        raise UserError(f"{path}: field 'servers': must map each server's URL to its counts")
    for url, figures in servers.items():
        if not isinstance(figures, dict):
            raise UserError(f"{path}: field 'servers.{url}': must map names to counts")
        counts(f"servers.{url}", {k: v for k, v in figures.items() if k != "faults"})
        counts(f"servers.{url}.faults", figures.get("faults", {}))


def begin_session(folder: Path, started: float, count) -> SessionCounts:
    """Count the session before this one if it ended without writing stats.json (kill -9), by
    ``count(rec, last_session)`` from its session.json; then start this one's, saved at once.

    ``last_session`` is what stats.json's ``last_session`` should say of it: its id, its
    figures, and ``"ended": "interrupted"``. Shared by generate, respond and evolve.
    """
    from selfinstruct.datafiles import load_stats

    stats = load_stats(folder)
    counted = (stats.get("last_session") or {}).get("id")
    rec = SessionCounts.unfinished(folder, counted)
    if rec is not None:
        # One killed before its loop saved no model, servers or rows: stats.json keeps what it said of them.
        urls = stats.get("base_url")
        was = {"model": stats.get("teacher_model"), "base_urls": urls if isinstance(urls, list) else [urls] if urls else None,
               "rows": stats.get("rows")}
        rec = {**rec, **{k: v for k, v in was.items() if v and not rec.get(k)}}
        count(rec, {**(rec.get("session") if isinstance(rec.get("session"), dict) else {}), "id": rec["id"],
                    "ended": "interrupted"})
    remove_session_file(folder)
    # A kill mid-write leaves write_atomic's temp beside the file (data.json's is as big as the
    # export, written a row at a time); under the folder's lock no one else is writing them.
    for name in ("data.json", "stats.json", SESSION_FILE):
        for tmp in Path(folder).glob(f".{name}.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    counts = SessionCounts(folder, started)
    counts.save()  # a kill before the loop still counts the session and its seconds
    return counts


def remove_session_file(folder: Path, name: str = SESSION_FILE) -> None:
    """Remove ``session.json`` once stats.json counts its session; one that cannot be (a
    directory of that name, an immutable file) is one line: else every session would count it."""
    path = Path(folder) / name
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot remove it ({e.strerror or e}); the run keeps a session's counts "
                        "in this file: move it out of the run folder") from None
