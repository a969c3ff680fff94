"""The run's progress bar and its closing summary table (rich)."""

from __future__ import annotations

class RunProgress:
    """A bar of kept/num with rejected, prompts, faults and tokens/s beside it.

    With several teacher servers, requests/faults of each follow on the lines below (``server_line``).
    """

    def __init__(self, total: int, enabled: bool = True, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class WithServers(Progress):
            """The bar, then the servers' counts below it, wrapped at the terminal's width: on the bar's
            own line, three servers or more were cut off at 80 columns."""

            servers = ""

            def get_renderables(self):
                yield from super().get_renderables()
                if self.servers:
                    yield Text(self.servers.strip(), overflow="fold")

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress = WithServers(
            TextColumn("[bold]kept"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rejected {task.fields[rejected]}  prompts {task.fields[prompts]}  "
                       "faults {task.fields[faults]}  {task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(), console=self.console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("generate", total=total, rejected=0, prompts=0, faults=0, tps=0.0)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, kept: int, rejected: int, prompts: int, faults: int, tps: float, servers: str = "") -> None:
        # (The servers are a Text, not markup: an IPv6 host's [::1] stays as it is.)
        self.progress.servers = servers
        self.progress.update(self.task, completed=kept, rejected=rejected, prompts=prompts, faults=faults, tps=tps)

    def note(self, text: str) -> None:
        from rich.markup import escape

        from selfinstruct.config import printable

        self.console.print(f"[yellow]{escape(printable(text))}[/]")

    def summary(self, stats: dict, title: str = "selfinstruct generate") -> None:
        from rich.table import Table
        from rich.text import Text

        from selfinstruct.config import counted, printable

        t = Table(title=title, show_header=False)
        t.add_column(style="bold")
        t.add_column(justify="right")
        t.add_row("kept", str(stats["kept"]))
        t.add_row("rejected", str(stats["rejected"]))
        for reason, n in stats["rejected_by_reason"].items():
            t.add_row(f"  {printable(reason)}", str(n))
        t.add_row("prompts answered", str(stats["responses"]))
        t.add_row("failed prompts", str(stats["failed_units"]))
        # stats.json's faults: every failed attempt, retried or not (a 400 is not), by kind.
        faults = stats.get("faults") or {}
        t.add_row("faults, retried or not", str(sum(faults.values())))
        for kind, n in faults.items():
            t.add_row(f"  {printable(kind)}", str(n))
        t.add_row("tokens in / out", f"{stats['prompt_tokens']} / {stats['completion_tokens']}")
        servers = stats.get("servers") or {}
        if len(servers) > 1:
            for url, s in servers.items():
                out = f", taken out {s['taken_out']}x" if s.get("taken_out") else ""
                t.add_row(Text(f"  {url}"), f"{counted(s['requests'], 'request')}, "
                                            f"{counted(sum(s['faults'].values()), 'fault')}{out}")
        t.add_row("wall time", f"{stats['wall_time_s']:.1f} s")
        self.console.print(t)
