"""``selfinstruct pipeline``: seeds -> data -> audit -> adapter, one stage after the other.

It is the three commands in a row, with their own option models:
``generate``'s options as flags, ``--tune-*`` flags for the tuning stage, and
a YAML file with ``generate:``, ``audit:`` and ``tune:`` sections. Rerunning it
resumes the generation, and redoes the audit and the tuning.

Example::

    selfinstruct pipeline --num 2000 --tune-model smollm2 --out outputs/all
    # outputs/all/            the run folder (kept.jsonl, data.json, ...)
    # outputs/all/report.html the audit report
    # outputs/all/adapter/    the LoRA adapter
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfinstruct.config import FileKeys, UserError, _flag, add_flags, load_yaml, printable
from selfinstruct.sft import MAX_STEPS  # tune's bound, named here as --tune-max-steps


class PipelineTuneFlags(BaseModel):
    """The tuning options the pipeline exposes as flags (the YAML ``tune:`` section takes all of them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan failed as "should be less than 1"

    tune_model: str | None = Field(None, description="Student model to tune (path or hub id; 'smollm2' is the offline one). Default: the tune stage's default.")
    tune_epochs: float | None = Field(None, gt=0, le=MAX_STEPS, description="Epochs of tuning (at most 10**8).")
    tune_max_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Stop tuning after this many steps (at most 10**8).")
    tune_full: bool | None = Field(None, description="Full fine-tune instead of LoRA.")
    skip_tune: bool = Field(False, description="Stop after the audit.")


def add_arguments(parser) -> None:
    from selfinstruct import generate

    # generate's flags as its --help shows them, the embedded teacher's defaults said
    generate.add_arguments(parser, "YAML file with generate:, audit: and tune: sections (flags override it).")
    parser.epilog = None
    add_flags(parser, PipelineTuneFlags)


def _sections(path: str | None) -> dict:
    data = load_yaml(path) if path else {}
    unknown = set(data) - {"generate", "audit", "tune"}
    if unknown:
        first = sorted(unknown, key=str)[0]  # by its text: `1:` beside `foo:` does not sort as it is
        raise UserError(f"{path}: field '{first}': unknown section (use generate:, audit:, tune:)")
    for key, value in data.items():
        if value is None:  # "audit:" with nothing under it
            data[key] = {}
        elif not isinstance(value, dict):
            raise UserError(f"{path}: field '{key}': must be a mapping of option: value")
    return data


def _layer(model, yaml_values: dict, flag_values: dict, source: str, section: str):
    """Validate yaml values overridden by the flags that were given; errors name ``section.field``."""
    from pydantic import ValidationError

    from selfinstruct.config import (PAIRS_ON_RESUME, FileKeys, _refuse_bools_for_numbers, refuse_empty_in_file,
                                     resumes, validation_error, without_nulls)

    yaml_values = without_nulls(model, yaml_values)  # `num: null` is the default, not an option given
    given = {k: v for k, v in flag_values.items() if v is not None}
    _refuse_bools_for_numbers(model, {k: v for k, v in yaml_values.items() if k not in given}, source, section)
    refuse_empty_in_file({section: {k: v for k, v in yaml_values.items() if k not in given}}, source)
    try:
        # As config.resolve's: the checks of two options together name each as given (generate's, here),
        # a key of the file in its section (FileKeys), and in a run to resume wait for its own values.
        values = {**yaml_values, **given}
        return model.model_validate(values, context={
            "given": set(yaml_values) | set(given), "in_file": FileKeys(set(yaml_values) - set(given), section),
            "config_file": source if source != "flags" else None, PAIRS_ON_RESUME: resumes(model, values)})
    except ValidationError as e:  # a flag's value is named as the flag: the file is not to blame
        err = e.errors()[0]
        if err["type"] == "missing" and err["loc"] and (name := str(err["loc"][0])) in model.model_fields:
            # As config.resolve says it (pydantic's "--out: Field required"): where it may be given.
            where = f"{source}" if source != "flags" else "a --config file"
            raise UserError(f"{_flag(name)} is required: give it as a flag, or as {name}: in the {section}: "
                            f"section of {where}") from None
        raise UserError(validation_error(e, set(given), source, section)) from None


def _check_html(html_value: str, gen, config: str | None, tune_model: str | None, source: str, skip_tune: bool) -> None:
    """Refuse, before the generation, an ``audit.html`` that would replace something the run reads or writes."""
    from selfinstruct.audit import check_report_path, what_the_run_reads
    from selfinstruct.datafiles import RUN_FILES, check_file_name, check_file_target
    from selfinstruct.sft import DEFAULT_MODEL

    try:  # as typed, before Path drops a trailing slash: `html: reports/` wrote a file named reports
        check_file_name(html_value, "audit.html", "report.html", "the report is one HTML file")
    except UserError as e:
        raise UserError(f"{source}: field 'audit.html': {e}") from None
    # The run folder may not exist yet, so its files are named here.
    html, run_dir = Path(html_value), Path(gen.out).resolve()
    target = html.resolve()
    if target == run_dir:
        raise UserError(f"{source}: field 'audit.html': {html} is the run folder; give a file name")
    if target == run_dir / "adapter" and not skip_tune:
        raise UserError(f"{source}: field 'audit.html': {html} is the folder the tune saves into; "
                        "choose another file")
    if target.parent == run_dir and html.name in RUN_FILES:
        raise UserError(f"{source}: field 'audit.html': {html} is the run's own {html.name}; choose another file")
    # Folders read whole: any file in them may be one the run reads (a template, the model's config.json;
    # the tune model named even with --skip-tune: a later run tunes it).
    folders = [("the --prompts folder", gen.prompts)]
    if isinstance(tune_model, str) and tune_model != DEFAULT_MODEL and Path(tune_model).expanduser().is_dir():
        folders.append(("the tune model's folder", tune_model))
    try:  # named as the other errors of the file are: its section and key
        seeds = [Path(s).expanduser() for s in gen.seeds]  # generate reads ~/s as a home path
        # The check `audit --html` makes too (a data suffix, the bundled seeds and prompts), and
        # what a resume of this run reads, from its folder when there is one.
        reads, was = what_the_run_reads(run_dir)
        check_report_path(html, "audit.html", [*seeds, *([config] if config else []), *reads], [*folders, *was])
        if target.parent != run_dir or run_dir.is_dir():  # else the generation makes it
            check_file_target(html, flag="audit.html")
    except UserError as e:
        raise UserError(f"{source}: field 'audit.html': {e}") from None


def run(args) -> int:
    from selfinstruct.audit import JUDGE_ONLY, AuditOptions
    from selfinstruct.generate import GenerateOptions, generate

    sections = _sections(args.config)
    source = args.config or "flags"
    gen = _layer(GenerateOptions, sections.get("generate", {}),
                 {k: getattr(args, k, None) for k in GenerateOptions.model_fields}, source, "generate")
    flags = _layer(PipelineTuneFlags, {}, {k: getattr(args, k, None) for k in PipelineTuneFlags.model_fields}, "flags", "")
    audit_opts = _layer(AuditOptions, sections.get("audit", {}), {}, source, "audit")
    for name in ("judge", *JUDGE_ONLY):  # the pipeline's audit only reads the run: it calls no judge
        if name in sections.get("audit", {}) and getattr(audit_opts, name) != AuditOptions.model_fields[name].default:
            raise UserError(f"{source}: field 'audit.{name}': the pipeline runs no judge; "
                            f"judge the run afterwards with selfinstruct audit {shlex.quote(gen.out)} --judge")
    if flags.skip_tune:
        # The --tune-* flags would do nothing (the project refuses such options, as --license without
        # --card); turned off (--no-tune-full), one is taken.
        given = next((name for name in ("tune_model", "tune_epochs", "tune_max_steps", "tune_full")
                      if getattr(flags, name) not in (None, False)), None)
        if given:
            raise UserError(f"{_flag(given)} does nothing with --skip-tune (the run stops after the audit); "
                            "leave one of them out")
    if audit_opts.html:  # checked first: it costs nothing, the tune's checks load a model's config
        tune_model = flags.tune_model or sections.get("tune", {}).get("model")
        _check_html(audit_opts.html, gen, args.config, tune_model, source, flags.skip_tune)
    report = Path(gen.out) / "report.html"  # written after the generation: a folder there failed it then
    if report.is_dir():
        raise UserError(f"{report}: is a folder, where the audit writes its report: move or delete it")
    tune_values = {"model": flags.tune_model, "epochs": flags.tune_epochs, "max_steps": flags.tune_max_steps,
                   "full": flags.tune_full}

    # Check the tuning options before hours of generation, not after. With --skip-tune the file's
    # tune: section is still checked (a bad key or value is the file's mistake, and a file shared
    # between runs may keep a valid one); only what this run's tune would read or write is not.
    from selfinstruct.sft import (DEFAULT_MODEL, TuneOptions, check_kind_options, check_max_length, check_out_folder,
                                  check_target_modules, resolve_model, smollm2_gguf, use_bf16)

    tune_opts = _layer(TuneOptions, sections.get("tune", {}), tune_values, source, "tune")

    def named(option: str) -> str:  # as given here: the pipeline has no --lora-r, only the file's tune: section
        if option == "full":
            return "--tune-full" if flags.tune_full is not None else "tune.full"
        return f"{source}: field 'tune.{option}'"

    check_kind_options(tune_opts, named)
    if not flags.skip_tune:
        check_out_folder(Path(gen.out) / "adapter", tune_opts.full, adapter_advice(gen.out))
        try:  # path checks only: the offline student's conversion and any download wait for the tune step
            smollm2_gguf() if tune_opts.model == DEFAULT_MODEL else resolve_model(tune_opts.model)
        except UserError as e:
            where = "--tune-model" if flags.tune_model else f"{source}: field 'tune.model'"
            raise UserError(f"{where}: {e}") from None
        if not tune_opts.full:  # a typo, from the model's config alone: no weight is read
            check_target_modules(tune_opts.model, tune_opts.target_modules, f"{source}: field 'tune.target_modules'")
        if "max_length" in tune_opts.model_fields_set:  # past the model's context: before generating, not after
            check_max_length(tune_opts.model, tune_opts.max_length, f"{source}: field 'tune.max_length'")
        if tune_opts.bf16:  # no GPU for it: tune's refusal came after the generation, naming a flag we lack
            try:
                use_bf16(tune_opts)
            except UserError:  # its only refusal: said as the pipeline takes it, its file's key
                raise UserError(f"{source}: field 'tune.bf16': this machine has no GPU (or TPU) that supports bf16; "
                                "leave it out") from None

    # generate's later checks name what the file's generate: section gave by the file and its key
    # (in its section: generate.num), as `generate --config` does: they named flags this command never
    # typed, then the file's keys as if they were at its top (field 'temperature').
    gen_in_file = FileKeys({k for k in sections.get("generate", {}) if getattr(args, k, None) is None}, "generate")
    # The run's lock is held from the generation to the end of the tune: another generate growing
    # the run meanwhile would leave the report and the adapter describing rows it no longer holds.
    with contextlib.ExitStack() as hold:
        stats = generate(gen, args.config, gen_in_file if args.config else set(), hold=hold, command="pipeline")
        return _after_generation(gen, stats, audit_opts, flags, tune_opts, sections, source)


def adapter_advice(run_dir: str | Path) -> str:
    """What a refused RUN/adapter is to do: tune's own advice, a new --out, would start a new run here.

    >>> adapter_advice("outputs/all")
    'move or delete what outputs/all/adapter holds (the tune saves there; a new --out would start a new run)'
    """
    return (f"move or delete what {Path(run_dir) / 'adapter'} holds (the tune saves there; "
            "a new --out would start a new run)")


def _after_generation(gen, stats: dict, audit_opts, flags, tune_opts, sections: dict, source: str) -> int:
    """The pipeline's audit and tune of the run ``generate`` made (its lock held by the caller)."""
    from selfinstruct.audit import fill_missing_nearest, load_source, print_summary, summarize
    from selfinstruct.datafiles import write_text_atomic
    from selfinstruct.report import render_html

    run_dir = Path(gen.out)
    if stats["kept"] == 0:
        raise UserError(f"{run_dir}: the run kept no record, so there is nothing to audit or tune on")

    from rich.console import Console

    console = Console(highlight=False)
    src = load_source(run_dir)
    fill_missing_nearest(src, audit_opts)
    summary = summarize(src, audit_opts.price_per_million, {})
    print_summary(summary, console)
    report = run_dir / "report.html"
    page = render_html(summary, src, {}, audit_opts)
    write_text_atomic(report, page)
    console.print(f"audit report -> {printable(report)}", markup=False)  # a folder's name reaches no terminal raw
    if audit_opts.html:
        write_text_atomic(Path(audit_opts.html), page)
        console.print(f"audit report -> {printable(audit_opts.html)}", markup=False)

    if flags.skip_tune:
        return 0 if stats["kept"] >= stats["num"] else 1  # the run's own --num when left out on resume
    from selfinstruct.sft import tune

    def as_given(option: str) -> str:  # an option that differs from the checkpoints' tune, as this command takes it
        flag = f"tune_{option}"
        if getattr(flags, flag, None) is not None:
            return _flag(flag)
        return f"{source}: field 'tune.{option}'" if option in sections.get("tune", {}) else f"tune.{option}"

    adapter = run_dir / "adapter"
    tune(run_dir, adapter, tune_opts, console=console, name=as_given, advice=adapter_advice(run_dir))
    # Quoted, and never wrapped at the terminal's width: the command is there to be pasted.
    console.print(f"adapter -> {printable(adapter)}   try it: selfinstruct try {printable(shlex.quote(str(adapter)))} "
                  '"Give three tips for sleeping better."', markup=False, soft_wrap=True)
    return 0 if stats["kept"] >= stats["num"] else 1  # the run's own --num when left out on resume
