"""The ``selfinstruct`` command: parse, call the stage, print one line on a user's error.

Each command lives in the module named for its stage, which provides
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the
command being run is imported, so ``selfinstruct --help`` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

# command -> (module, one-line help). A plain table, not a registry.
COMMANDS = {
    "generate": ("selfinstruct.generate", "Generate an instruction dataset from seed tasks with a teacher model."),
    "dedup": ("selfinstruct.dedup", "Remove near-duplicate instructions (exact ROUGE-L, fuzzy or MinHash) from any dataset."),
    "decontaminate": ("selfinstruct.decontaminate", "Remove records that share a long n-gram or a close instruction with evaluation sets."),
    "respond": ("selfinstruct.respond", "Answer every instruction of a run or dataset again with another teacher."),
    "evolve": ("selfinstruct.evolve", "Evolve a run's or dataset's instructions into harder and rarer ones (Evol-Instruct)."),
    "audit": ("selfinstruct.audit", "Summarise a run or dataset in the terminal, or as a self-contained HTML report."),
    "filter": ("selfinstruct.judge", "Keep the records whose judge score is at least --min-score."),
    "export": ("selfinstruct.export", "Write a run's data as alpaca, sharegpt, messages, jsonl, parquet or a Hugging Face dataset."),
    "tune": ("selfinstruct.sft", "Fine-tune a model on a run's data (LoRA by default) with TRL."),
    "try": ("selfinstruct.sft", "Answer instructions with a base model plus an adapter."),
    "pipeline": ("selfinstruct.pipeline", "Seeds to data to audit to adapter, in one command."),
    "serve": ("selfinstruct.servers", "Serve a teacher with vLLM on 127.0.0.1 with an API key, in the foreground."),
}

# Commands whose positionals may come after flags (`try DIR --compare "text"`): plain parse_args
# ends a `nargs="*"` positional at the first flag. Not every command: intermixed parsing drops the
# `-- FLAGS` passthrough of generate, respond, pipeline and serve.
INTERMIXED = {"try"}

# A word (a run without spaces) longer than this is cut in an error line: `--num` with 5,000 digits
# was echoed whole, a screenful, by argparse (Python reads no int of over 4,300 digits) and by our
# own lines (`--concurrency: at most 4096 ..., not 1111...`, `does not serve model 'xxx...'`,
# `unrecognized arguments: --xxx...`). A path (a deep workspace's may pass 200 characters), a URL,
# a model name or a 51-digit --seed is shorter and stays whole, to be copied from the line; what is
# cut keeps its start and its end, so two values that differ late still read differently ("this run
# was made with ..., not ...").
LONGEST_SHOWN = 1000


def shortened(line: str) -> str:
    """An error line with each over-long word cut in the middle, and its length said.

    >>> shortened("argument --num: invalid int value: '" + "1" * 5000 + "2'")
    "argument --num: invalid int value: '111111111111111111111111111111111111111...(5,003 characters)...1111111111112'"
    >>> shortened("--seed: this run was made with " + "1" * 51 + ", not " + "1" * 50 + "2")
    '--seed: this run was made with 111111111111111111111111111111111111111111111111111, not 111111111111111111111111111111111111111111111111112'
    >>> shortened("/tmp/seeds_" + "1" * 50 + ".jsonl: seed file not found")
    '/tmp/seeds_11111111111111111111111111111111111111111111111111.jsonl: seed file not found'
    """
    import re

    return re.sub(r"\S{%d,}" % (LONGEST_SHOWN + 1),
                  lambda m: f"{m.group()[:40]}...({len(m.group()):,} characters)...{m.group()[-14:]}", line)


class _Parser(argparse.ArgumentParser):
    """A command's parser whose errors are one line, as every other mistake is: argparse prints
    the whole usage first, 38 lines for generate, with the error last and easy to miss."""

    def error(self, message: str):
        from selfinstruct.config import printable

        self.exit(2, f"{self.prog}: error: {shortened(printable(message))} (see {self.prog} --help)\n")


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="selfinstruct",
        description="Seed tasks in, a clean Alpaca-style dataset (and a tuned adapter) out.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def _path_problem(e: BaseException | None) -> str | None:
    """The line for a path the user gave that no command can look at, or None for another error:
    a name over the file system's limit (255 bytes on most) or a loop of symbolic links. The first
    look at it (Path.exists, is_file, resolve) raises these, where a missing path is False.

    >>> _path_problem(OSError(errno.ELOOP, "Too many levels of symbolic links", "runs/a"))
    'runs/a: Too many levels of symbolic links'
    """
    if not isinstance(e, OSError) or e.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
        return None
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


def _interrupt_in(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that caused ``e`` (its chain)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _stopped(name: str, terms: list[int]) -> int:
    """The one line and the code of a command stopped by Ctrl-C, or by a SIGTERM or SIGHUP handled as one."""
    if terms:
        import signal

        try:  # after a SIGHUP the terminal may be gone
            print(f"selfinstruct {name}: stopped by {signal.Signals(terms[0]).name}", file=sys.stderr)
        except OSError:
            pass
        return 128 + terms[0]  # as a shell reports a process a signal ended: 143 for SIGTERM, 129 for SIGHUP
    print(f"selfinstruct {name}: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run a command; a SIGTERM or SIGHUP stops it as Ctrl-C does, with its own line and code (128 + the signal).

    Why: a scheduler stops a job with SIGTERM (SLURM's preemption and time limit, ``docker
    stop``, Kubernetes), and so does a plain ``kill``; a closed terminal or a dropped ssh
    session sends SIGHUP. By default either ends the process at once: nothing written is lost
    (kill -9 loses nothing either), but the command says nothing, its last writes wait in the
    group commit's queue, its vLLM children are left to their death signal, and stats.json
    counts the session only at the next one. Handled as a Ctrl-C, the run commits what it has,
    counts itself, stops its teacher and says so. A signal ignored when we start (``nohup``'s
    SIGHUP) stays ignored.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        return _main(argv, [])
    terms: list[int] = []

    def on_stop(signum, frame):
        terms.append(signum)
        handler = signal.getsignal(signal.SIGINT)  # asyncio's in a run's loop; interrupts_held's in a compile
        if not callable(handler):  # SIGINT ignored (a job started with & from a script): stop anyway
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    def on_unraisable(unraisable):
        """A stop raised where it cannot leave (a weakref callback or a __del__ that the garbage
        collector ran): Python printed "Exception ignored in ..." and its traceback, and the command
        ran on to its end. Raised again from a thread, it lands in the command's own code."""
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return hook(unraisable)
        import _thread
        import time

        def again():
            time.sleep(0.01)  # once this hook has returned: raised in it, the stop is lost again
            if not ended:  # the signal itself, so that a sleep or a wait of the main thread ends too
                signal.pthread_kill(threading.main_thread().ident, terms[-1] if terms else signal.SIGINT)

        # Not threading.Thread: its start() waits for the thread, which could interrupt this hook.
        # Landing in another callback, the stop comes back here and is raised again.
        _thread.start_new_thread(again, ())

    before = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGHUP)
              if signal.getsignal(s) == signal.SIG_DFL}
    hook, sys.unraisablehook = sys.unraisablehook, on_unraisable
    ended: list[bool] = []
    try:
        return _main(argv, terms)
    finally:
        ended.append(True)
        sys.unraisablehook = hook
        for s, handler in before.items():
            signal.signal(s, handler)
        if argv is None:
            # The process's own command (not a caller's, which passes its argv) has ended, said its line and
            # chosen its code: Python's teardown takes a few tenths of a second more, and a stop then (a second
            # Ctrl-C or SIGTERM, or one just after a run finished) ended the process by the signal instead
            # (-15 after the closing table), or printed a KeyboardInterrupt traceback.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)


def _main(argv: list[str] | None, terms: list[int]) -> int:
    from selfinstruct.config import UserError, expand_user_paths, named_inputs, printable, refuse_empty_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # --help, or an error naming the unknown command
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    parser = _Parser(prog=f"selfinstruct {name}", description=help_text)
    try:
        module = importlib.import_module(module_name)
        # A module serving two commands names its entry points after them (add_arguments_try, run_try).
        add = getattr(module, f"add_arguments_{name}", None) or module.add_arguments
        run = getattr(module, f"run_{name}", None) or module.run
        add(parser)
        parse = parser.parse_intermixed_args if name in INTERMIXED else parser.parse_args
        passthrough, rest = getattr(parser, "passthrough", None), None
        if passthrough and "--" in argv[1:]:  # `respond RUN --model M -- --tensor-parallel-size 4`
            cut = argv.index("--", 1)
            argv, rest = argv[:cut], argv[cut + 1:]
        args = parse(argv[1:])
        if passthrough and (stray := getattr(args, passthrough, None)):
            # The passthrough is a positional only so that --help shows it: what follows `--` was cut
            # off above, so a word here is a stray one (`generate --out zz xxx` was told that flags
            # after '--' go to 'vllm serve', with no `--` typed).
            parser.error(f"unrecognized arguments: {' '.join(stray)} (a teacher's own flags go after '--')")
        vars(args).update(expand_user_paths(vars(args)))  # `--out=~/x`: bash leaves that `~` alone
        vars(args).update(named_inputs(vars(args)))  # `audit .`: a file beside it is named after it
        refuse_empty_flags(args, parser)  # `--out ''` was the current folder, `--config ''` no file
        if rest is not None:
            setattr(args, passthrough, rest)
        return int(run(args) or 0)
    except UserError as e:
        # The message may quote a server, a seed file or teacher text: escape what a terminal would obey.
        print(f"selfinstruct {name}: error: {shortened(printable(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(name, terms)
    except SystemError as e:
        # A Ctrl-C that arrives while a compiled (numba) kernel runs is raised in the first Python
        # code run after it, numba's own as it boxes what the kernel returns; numba drops it and
        # fails as "CPUDispatcher(...) returned a result with an exception set", the
        # KeyboardInterrupt at the end of the chain. It is that Ctrl-C, not a fault.
        if not _interrupt_in(e):
            raise
        return _stopped(name, terms)
    except RuntimeError as e:
        # pathlib's resolve() (before Python 3.13) raises a loop of symbolic links as this, the OSError its context.
        if (line := _path_problem(e.__context__)) is None:
            raise
        print(f"selfinstruct {name}: error: {shortened(printable(line))}", file=sys.stderr)
        return 2
    except OSError as e:
        if (line := _path_problem(e)) is not None:
            print(f"selfinstruct {name}: error: {shortened(printable(line))}", file=sys.stderr)
            return 2
        # Out of file descriptors past the checks made before a run (connections past the limit are
        # refused then): a file opened later, a library's cache. What was written is whole (the group
        # commit), so this is the user's limit to raise, in one line, not a traceback.
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        from selfinstruct.teacher import out_of_files

        where = f" ({e.filename})" if e.filename else ""
        print(f"selfinstruct {name}: error: {out_of_files(f'{e.strerror}{where}')}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # A missing optional dependency is the user's to fix: say which extra brings it.
        extra = {"torch": "sft", "trl": "sft", "peft": "sft", "transformers": "sft", "datasets": "sft",
                 "matplotlib": "audit", "datasketch": "minhash", "vllm": "vllm"}.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"selfinstruct {name}: error: needs '{e.name}': pip install -e '.[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
