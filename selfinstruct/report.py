"""The audit's HTML report: one self-contained page with the plots and samples.

Teacher text is data: every string from a record is HTML-escaped before it reaches the
page, and the page forbids scripts and outside URLs with a Content-Security-Policy.
"""

from __future__ import annotations

import base64
import html
import io
import math
import random
import re
import statistics
import warnings
from collections import defaultdict
from datetime import datetime, timezone

from selfinstruct.audit import (
    NO_OTHER_RECORD,
    AuditOptions,
    Item,
    Source,
    _clip,
    _fmt,
    _fmt_words,
    _judge_usage_line,
    _money,
    _pct,
    judge_score,
    percentile,
    reason_key,
    top_verb_objects,
    verb_object_pairs,
)
from selfinstruct.datafiles import write_text_atomic  # noqa: F401 (the report's writer)
from selfinstruct.records import Rejected


# --------------------------------------------------------------------------- plots

_STAGE_COLORS = {"parse": "#9c755f", "filter": "#e15759", "dedup": "#4e79a7", "validate": "#f28e2b",
                 "quota": "#76b7b2", "-": "#bab0ac"}


def _png(fig) -> str:
    """A figure as a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_reasons(reasons: list[dict]) -> str:
    from matplotlib.figure import Figure

    rows = reasons[:15][::-1]
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.0))
    ax = fig.subplots()
    labels = [_clip(f"{r['stage']}: {r['reason']}", 48) for r in rows]
    bars = ax.barh(labels, [r["count"] for r in rows], color=[_STAGE_COLORS.get(r["stage"], "#bab0ac") for r in rows])
    ax.bar_label(bars, labels=[f"{r['count']:,}  ({100 * r['share']:.0f}%)" for r in rows], padding=3, fontsize=8)
    ax.set_xlabel("rejected candidates")
    ax.margins(x=0.18)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def plot_lengths(instruction_words, output_words) -> str:
    """Histograms of the word counts of the instructions and of the outputs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 2)
    series = [("instruction", instruction_words, "#4e79a7"), ("output", output_words, "#59a14f")]
    for ax, (name, values, color) in zip(axes, series):
        cap = max(1, math.ceil(percentile(values, 99)))
        clipped = [min(v, cap) for v in values]
        low = min(clipped)
        # Word counts are whole numbers: one bar per count when the range is small, else 30 bins.
        bins = [b - 0.5 for b in range(low, cap + 2)] if cap - low <= 40 else 30
        ax.hist(clipped, bins=bins, color=color, edgecolor="white")
        ax.axvline(statistics.median(values), color="#333", linestyle="--", linewidth=1)
        ax.set_title(f"{name} length (median {statistics.median(values):g} words)", fontsize=10)
        ax.set_xlabel("words" + (f" (longer than {cap} counted at {cap})" if max(values) > cap else ""))
        ax.set_ylabel("count")
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def plot_rouge(values: list[float]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    ax.hist(values, bins=[i / 20 for i in range(21)], color="#76b7b2", edgecolor="white")
    ax.axvline(0.7, color="#e15759", linestyle=":", linewidth=1.2)
    ax.text(0.705, ax.get_ylim()[1] * 0.92, "0.7: the self-instruct\ndedup threshold", fontsize=7, color="#e15759", va="top")
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROUGE-L F1 with the most similar other instruction")
    ax.set_ylabel("instructions")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def plot_scores(counts: dict[int, int]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.8))
    ax = fig.subplots()
    bars = ax.bar([str(k) for k in counts], list(counts.values()),
                  color=["#e15759", "#f28e2b", "#edc948", "#8cd17d", "#59a14f"])
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("judge score")
    ax.set_ylabel("records")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _lighten(rgba, amount: float):
    r, g, b, _ = rgba
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount, 1.0)


def _wedge_label(ax, wedge, text: str, radius: float, min_deg: float, size: float) -> None:
    span = wedge.theta2 - wedge.theta1
    if not text or span < min_deg:
        return
    theta = math.radians((wedge.theta1 + wedge.theta2) / 2)
    deg = math.degrees(theta) % 360
    rotation = deg if deg <= 90 or deg >= 270 else deg - 180  # never upside down
    ax.text(radius * math.cos(theta), radius * math.sin(theta), text, rotation=rotation, rotation_mode="anchor",
            ha="center", va="center", fontsize=min(size, 5 + span / 2.5))


def plot_verb_objects(top: list[tuple[str, int, list[tuple[str, int]]]]) -> str:
    """The self-instruct diversity chart: root verbs inside, their top direct objects outside."""
    import matplotlib
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 9))
    ax = fig.subplots()
    ax.set_aspect("equal")
    ax.axis("off")
    cmap = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # neighbours get different hues
    base = [to_rgba(cmap(order[i % 20])) for i in range(len(top))]
    outer_sizes, outer_colors, outer_labels = [], [], []
    for color, (_, total, objects) in zip(base, top):
        for obj, c in objects:
            outer_sizes.append(c)
            outer_colors.append(_lighten(color, 0.3))
            outer_labels.append(_clip(obj, 14))
        rest = total - sum(c for _, c in objects)
        if rest:
            outer_sizes.append(rest)
            outer_colors.append(_lighten(color, 0.8))
            outer_labels.append("")
    style = dict(startangle=90, counterclock=False)
    inner, _ = ax.pie([t for _, t, _ in top], radius=0.58, colors=base,
                      wedgeprops=dict(width=0.4, edgecolor="white", linewidth=1.2), **style)
    outer, _ = ax.pie(outer_sizes, radius=1.0, colors=outer_colors,
                      wedgeprops=dict(width=0.42, edgecolor="white", linewidth=0.6), **style)
    ax.set_xlim(-1.02, 1.02)  # pie leaves a wide margin for labels we draw inside the rings
    ax.set_ylim(-1.02, 1.02)
    for w, (verb, _, _) in zip(inner, top):
        _wedge_label(ax, w, _clip(verb, 12), 0.39, 5, 11)
    for w, label in zip(outer, outer_labels):
        _wedge_label(ax, w, label, 0.79, 2.2, 9)
    return _png(fig)


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif; color:var(--ink); background:var(--bg); }
header { background:#243b53; color:#fff; padding:22px 32px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header p { margin:0; color:#bcccdc; font-size:13px; word-break:break-all; }
nav { position:sticky; top:0; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; font-size:13px; z-index:1; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; }
main { max-width:1120px; margin:0 auto; padding:20px 32px 60px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px; margin:18px 0; }
h2 { margin:0 0 12px; font-size:18px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(160px,1fr)); gap:12px; }
.card { background:var(--bg); border-radius:6px; padding:10px 14px; }
.card b { display:block; font-size:22px; font-weight:600; }
.card span { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; font-size:14px; margin:8px 0; }
th, td { padding:4px 12px 4px 0; text-align:right; border-bottom:1px solid var(--line); }
th:first-child, td:first-child, td.l, th.l { text-align:left; }
th { color:var(--muted); font-weight:500; }
img { max-width:100%; height:auto; display:block; margin:8px auto; }
.note { color:var(--muted); font-size:13px; }
.warn { color:#8d2b0b; background:#fff3c4; padding:6px 10px; border-radius:4px; font-size:13px; }
.rec { border:1px solid var(--line); border-radius:6px; padding:10px 14px; margin:10px 0; }
.rec .meta { color:var(--muted); font-size:12px; margin-bottom:4px; }
.rec .instr { font-weight:600; white-space:pre-wrap; word-break:break-word; }
.rec pre { white-space:pre-wrap; word-break:break-word; background:var(--bg); padding:6px 10px; border-radius:4px; margin:4px 0; font:13px/1.45 ui-monospace,"DejaVu Sans Mono",monospace; max-height:260px; overflow:auto; }
.tag { display:inline-block; padding:0 7px; border-radius:9px; font-size:12px; color:#fff; margin-right:6px; }
.samples { columns:2; column-gap:14px; }
.samples .rec { break-inside:avoid; margin:0 0 12px; }
@media (max-width:800px) { .samples { columns:1; } }
"""

# No scripts, no outside requests: even if escaping failed somewhere, the page could not run or fetch anything.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# What a page would hide: a browser drops NUL, draws ESC as nothing and reads CR as a line break,
# and a bidi override reverses the text after it. Shown escaped (\x00, \r, \u202e), a record
# rejected for control_characters shows the character its reason names. Tab and newline are text.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _e(text) -> str:
    r"""HTML-escaped text, its invisible control characters written out.

    >>> _e("<b>hi</b>\x1b[2J\r\n\tok")
    '&lt;b&gt;hi&lt;/b&gt;\\x1b[2J\\r\n\tok'
    """
    text = _INVISIBLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return html.escape(text, quote=True)


def _long(text: str, n: int = 1500) -> str:
    """Escaped text, cut at n characters with a note of how much was left out."""
    if len(text) <= n:
        return _e(text)
    return _e(text[:n]) + f"\n<span class='note'>… {len(text) - n:,} more characters</span>"


def _card(value, label) -> str:
    return f"<div class='card'><b>{_e(value)}</b><span>{_e(label)}</span></div>"


def _img(uri: str, alt: str) -> str:
    return f"<img src='{uri}' alt='{_e(alt)}'>"


def _kept_html(it: Item, judged: dict | None) -> str:
    tags = []
    if it.is_classification:
        tags.append("<span class='tag' style='background:#af7aa1'>classification</span>")
    if judge_score(judged) is not None:
        tags.append(f"<span class='tag' style='background:#59a14f'>judge {_e(judged['score'])}</span>")
    parts = [f"<div class='rec'><div class='meta'>{''.join(tags)}{_e(it.id)}</div>",
             f"<div class='instr'>{_long(it.instruction, 800)}</div>"]
    for inst in it.instances[:3]:
        if inst.input.strip():
            parts.append(f"<div class='meta'>input</div><pre>{_long(inst.input)}</pre>")
        parts.append(f"<div class='meta'>output</div><pre>{_long(inst.output)}</pre>")
    if len(it.instances) > 3:
        parts.append(f"<div class='note'>… and {len(it.instances) - 3} more instances</div>")
    if it.nearest is not None and it.nearest.instruction:
        parts.append(f"<div class='note'>nearest (ROUGE-L {it.nearest.rouge_l:.2f}): {_long(it.nearest.instruction, 300)}</div>")
    if judged and judged.get("reason"):
        parts.append(f"<div class='note'>judge: {_long(str(judged['reason']), 400)}</div>")
    parts.append("</div>")
    return "".join(parts)


def _rejected_html(r: Rejected) -> str:
    color = _STAGE_COLORS.get(r.stage, "#bab0ac")
    parts = [f"<div class='rec'><div class='meta'><span class='tag' style='background:{color}'>{_e(r.stage)}</span>"
             f"{_e(r.id)}</div><div><b>reason:</b> {_long(r.reason, 400)}</div>"]
    if r.instruction:
        parts.append(f"<div class='instr'>{_long(r.instruction, 800)}</div>")
        for inst in r.instances[:1]:
            parts.append(f"<pre>{_long(inst.output, 600)}</pre>")
    else:
        parts.append(f"<div class='meta'>raw teacher text</div><pre>{_long(r.raw, 800)}</pre>")
    parts.append("</div>")
    return "".join(parts)


def _stratified(rejected: list, n: int, rng: random.Random) -> list:
    """Up to n rejected records, taking from every reason in turn so rare reasons show up too."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rejected:
        groups[(r.stage, reason_key(r.reason))].append(r)
    pools = [rng.sample(g, len(g)) for _, g in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    out = []
    while len(out) < n and any(pools):
        for p in pools:
            if p and len(out) < n:
                out.append(p.pop())
    return out


def _dist_table(rows: list[tuple[str, dict]]) -> str:
    head = "<tr><th></th><th>n</th><th>min</th><th>median</th><th>p90</th><th>max</th></tr>"
    keys = ("n", "min", "median", "p90", "max")
    body = "".join(f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(_fmt_words(d[k]))}</td>" for k in keys) + "</tr>"
                   for name, d in rows)
    return f"<table>{head}{body}</table>"


# The start of every report's title: ``audit.check_report_path`` replaces a file only if it holds this.
REPORT_MARK = "<title>selfinstruct audit: "


def render_html(s: dict, src: Source, judgements: dict, opts: AuditOptions) -> str:
    """The whole report as one HTML string: CSS inline, plots as data URIs, every record string escaped."""
    import matplotlib

    rng = random.Random(opts.seed)
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font for some scripts; labels still draw
        sections = []
        cost = s["cost"]
        cards = [_card(f"{s['kept']:,}", f"kept records ({s['rows']:,} rows)")]
        if src.is_run:
            cards += [_card(f"{s['rejected']:,}", "rejected candidates"), _card(_pct(s["keep_rate"]), "keep rate")]
        alone = s["rouge_l"]["how"].startswith(NO_OTHER_RECORD)  # one record: nothing to be near, so no number
        cards += [_card(_pct(s["with_input"]["share"]), "have an input"),
                 _card(_pct(s["classification"]["share"]), "classification tasks"),
                 _card("none", "ROUGE-L to nearest: no other record") if alone
                 else _card(_fmt(s["rouge_l"]["median"]), "median ROUGE-L to nearest")]
        if s["prompt_tokens"] is not None:
            cards.append(_card(f"{s['prompt_tokens'] + s['completion_tokens']:,}", "teacher tokens (in + out)"))
        if cost:
            cards.append(_card(_money(cost["total"]), f"at ${cost['prices'][0]:g} / ${cost['prices'][1]:g} per M tokens"))
        if s["judge"] and s["judge"]["mean"] is not None:
            cards.append(_card(f"{s['judge']['mean']:.2f}", "mean judge score"))
        notes = "".join(f"<p class='warn'>{_e(n)}</p>" for n in s["notes"])
        usage = ""
        if s["prompt_tokens"] is not None:
            rows = [("requests", _fmt(s["requests"])), ("prompt tokens", _fmt(s["prompt_tokens"])),
                    ("completion tokens", _fmt(s["completion_tokens"]))]
            rows += [(f"errors: {k}", _fmt(v)) for k, v in s["errors"].items()]
            if s["wall_time_s"] is not None:
                rows.append(("wall time", f"{s['wall_time_s'] / 60:.1f} min"))
            if cost:
                rows += [("cost, input", _money(cost["input"])), ("cost, output", _money(cost["output"])),
                         ("cost per kept record", _money(cost["per_kept"]))]
            usage = ("<table>" + "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in rows) + "</table>"
                     f"<p class='note'>Tokens from {_e(s['tokens_from'])}."
                     + ("" if cost else " Give --price-per-million INPUT OUTPUT for a cost estimate.") + "</p>")
        sections.append(("summary", "Summary", f"<div class='cards'>{''.join(cards)}</div>{notes}{usage}"))

        if s["rejected_by_reason"]:
            rows = "".join(f"<tr><td class='l'>{_e(r['stage'])}</td><td class='l'>{_e(r['reason'])}</td>"
                           f"<td>{r['count']:,}</td><td>{_pct(r['share'])}</td></tr>" for r in s["rejected_by_reason"])
            body = (_img(plot_reasons(s["rejected_by_reason"]), "bar chart of reject reasons")
                    + "<table><tr><th class='l'>stage</th><th class='l'>reason</th><th>count</th><th>share</th></tr>"
                    + rows + "</table><p class='note'>Reasons are grouped by their text before the first ':', '(' or quote.</p>")
            sections.append(("rejections", "Why candidates were rejected", body))
        elif src.is_run:
            sections.append(("rejections", "Why candidates were rejected", "<p>No candidate was rejected.</p>"))

        n = len(src.kept.ids)
        if n:
            body = _img(plot_lengths(src.kept.instruction_words, src.kept.output_words),
                        "histograms of instruction and output length")
            body += _dist_table([(k, v) for k, v in s["lengths"].items()])
            body += "<p class='note'>Words split on whitespace; the input row counts only instances that have an input.</p>"
            sections.append(("lengths", "Lengths", body))

        rouge = src.rouge_values()
        if rouge:
            r = s["rouge_l"]
            body = _img(plot_rouge(rouge), "histogram of ROUGE-L to the nearest instruction")
            body += (f"<p class='note'>Nearest instruction {_e(r['how'])}; {_pct(r['at_least_0.7'] / r['n'])} of "
                     f"{r['n']:,} are at 0.7 or above, {_pct(r['at_least_0.5'] / r['n'])} at 0.5 or above.</p>")
            sections.append(("similarity", "Similarity to the nearest instruction", body))
        elif alone:
            sections.append(("similarity", "Similarity to the nearest instruction",
                             f"<p>ROUGE-L to the nearest instruction: {_e(s['rouge_l']['how'])}.</p>"))

        instructions = src.kept.instructions
        if opts.verb_sample and len(instructions) > opts.verb_sample:
            instructions = rng.sample(instructions, opts.verb_sample)
        if instructions:
            pairs, parser_label = verb_object_pairs(instructions, opts.parser)
            top = top_verb_objects(pairs)
            with_pair = sum(1 for v, o in pairs if v and o)
            body = (_img(plot_verb_objects(top), "verb and object diversity chart") if top
                    else "<p>No instruction has a verb with a direct object.</p>")
            body += (f"<p class='note'>Inner ring: the {len(top)} most common root verbs; outer ring: their 4 most "
                     f"common direct objects (pale: all other objects). {with_pair:,} of {len(pairs):,} instructions"
                     f"{' (a random sample)' if len(pairs) < n else ''} have a verb with a direct noun "
                     f"object. Parser: {_e(parser_label)}.</p>")
            body += ("<table><tr><th class='l'>first word</th><th>count</th><th>share</th></tr>"
                     + "".join(f"<tr><td>{_e(w)}</td><td>{c:,}</td><td>{_pct(sh)}</td></tr>" for w, c, sh in s["leading_verbs"])
                     + "</table>")
            sections.append(("diversity", "Verbs and objects", body))

        if s["judge"]:
            j = s["judge"]
            body = _img(plot_scores(j["counts"]), "bar chart of judge scores")
            body += (f"<p class='note'>{j['judged']:,} of {j['of']:,} kept records judged"
                     + (f", {j['unparsed']} replies without a score" if j["unparsed"] else "") + ".</p>")
            if j.get("stats"):
                model = j["stats"].get("model")
                body += (f"<p class='note'>Judge{' ' + _e(model) if model else ''}: "
                         f"{_e(_judge_usage_line(j['stats']))}.</p>")
            sections.append(("judge", "Judge scores", body))

        # Drawn as positions (rng.sample draws the same from range(n) as from the n records), then read.
        kept_sample = src.items.pick(rng.sample(range(n), min(opts.sample, n)))
        if kept_sample:
            body = "<div class='samples'>" + "".join(_kept_html(it, judgements.get(it.id)) for it in kept_sample) + "</div>"
            sections.append(("kept", f"Sample of kept records ({len(kept_sample)} of {n:,})", body))
        if src.rejected and opts.sample:
            rej_sample = src.rejected_records(_stratified(src.rejected, opts.sample, rng))
            body = "<div class='samples'>" + "".join(_rejected_html(r) for r in rej_sample) + "</div>"
            sections.append(("rejected", f"Sample of rejected records ({len(rej_sample)} of {len(src.rejected):,})", body))

    nav = "".join(f"<a href='#{sid}'>{_e(title.split(' (')[0])}</a>" for sid, title, _ in sections)
    main = "".join(f"<section id='{sid}'><h2>{_e(title)}</h2>{body}</section>" for sid, title, body in sections)
    teacher = f" · teacher {_e(s['teacher_model'])}" if s["teacher_model"] else ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"{REPORT_MARK}{_e(src.path.name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Audit of {_e(src.path.name)}</h1><p>{_e(s['source'])} ({_e(s['kind'])}){teacher} · {when}</p></header>"
        f"<nav>{nav}</nav><main>{main}</main></body></html>\n"
    )
