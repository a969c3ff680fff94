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

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from selfinstruct.config import UserError, add_flags, load_yaml


class PipelineTuneFlags(BaseModel):
    """The tuning options the pipeline exposes as flags (the YAML ``tune:`` section takes all of them)."""

    model_config = ConfigDict(extra="forbid")

    tune_model: str | None = Field(None, description="Student model to tune (path or hub id; 'smollm2' is the offline one). Default: the tune stage's default.")
    tune_epochs: float | None = Field(None, gt=0, description="Epochs of tuning.")
    tune_max_steps: int | None = Field(None, gt=0, description="Stop tuning after this many steps.")
    tune_full: bool | None = Field(None, description="Full fine-tune instead of LoRA.")
    skip_tune: bool = Field(False, description="Stop after the audit.")


def add_arguments(parser) -> None:
    from selfinstruct.generate import GenerateOptions

    parser.add_argument("--config", help="YAML file with generate:, audit: and tune: sections (flags override it).")
    add_flags(parser, GenerateOptions, passthrough="vllm_args")
    add_flags(parser, PipelineTuneFlags)


def _sections(path: str | None) -> dict:
    data = load_yaml(path) if path else {}
    unknown = set(data) - {"generate", "audit", "tune"}
    if unknown:
        raise UserError(f"{path}: field '{sorted(unknown)[0]}': unknown section (use generate:, audit:, tune:)")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise UserError(f"{path}: field '{key}': must be a mapping of option: value")
    return data


def _layer(model, yaml_values: dict, flag_values: dict, source: str):
    """Validate yaml values overridden by the flags that were given."""
    from pydantic import ValidationError

    from selfinstruct.config import format_validation_error

    try:
        return model.model_validate({**yaml_values, **{k: v for k, v in flag_values.items() if v is not None}})
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def run(args) -> int:
    from selfinstruct.audit import AuditOptions, load_source, print_summary, summarize
    from selfinstruct.datafiles import write_text_atomic
    from selfinstruct.report import render_html
    from selfinstruct.generate import GenerateOptions, generate

    sections = _sections(args.config)
    source = args.config or "flags"
    gen = _layer(GenerateOptions, sections.get("generate", {}),
                 {k: getattr(args, k, None) for k in GenerateOptions.model_fields}, source)
    flags = _layer(PipelineTuneFlags, {}, {k: getattr(args, k, None) for k in PipelineTuneFlags.model_fields}, "flags")
    audit_opts = _layer(AuditOptions, sections.get("audit", {}), {}, source)
    tune_values = {"model": flags.tune_model, "epochs": flags.tune_epochs, "max_steps": flags.tune_max_steps,
                   "full": flags.tune_full}

    if not flags.skip_tune:
        # Check the tuning options before hours of generation, not after.
        from selfinstruct.sft import TuneOptions

        tune_opts = _layer(TuneOptions, sections.get("tune", {}), tune_values, source)

    stats = generate(gen)
    run_dir = Path(gen.out)
    if stats["kept"] == 0:
        raise UserError(f"{run_dir}: the run kept no record, so there is nothing to audit or tune on")

    from rich.console import Console

    console = Console(highlight=False)
    src = load_source(run_dir)
    summary = summarize(src, audit_opts.price_per_million, {})
    print_summary(summary, console)
    report = run_dir / "report.html"
    write_text_atomic(report, render_html(summary, src, {}, audit_opts))
    console.print(f"audit report -> {report}", markup=False)

    if flags.skip_tune:
        return 0 if stats["kept"] >= gen.num else 1
    from selfinstruct.sft import tune

    adapter = run_dir / "adapter"
    tune(run_dir, adapter, tune_opts, console=console)
    console.print(f"adapter -> {adapter}   try it: selfinstruct try {adapter} \"Give three tips for sleeping better.\"",
                  markup=False)
    return 0 if stats["kept"] >= gen.num else 1
