"""A wheel of the project carries every module and the bundled seeds and prompts, and runs from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_carries_every_module_and_the_seeds_and_prompts(tmp_path):
    """An editable install reads seeds/ and prompts/ at the repository root; `pip install .`
    builds a wheel, which has no repository around it. Before, the wheel held neither
    them nor selfinstruct/modes/, so `generate` failed on import."""
    # From a copy: a checkout's own selfinstruct.egg-info (left by the editable install) lists
    # every file, and setuptools would pack what it lists whatever pyproject.toml says.
    src = tmp_path / "src"
    for name in ("selfinstruct", "seeds", "prompts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("selfinstruct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "selfinstruct").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    for folder in ("seeds", "prompts"):
        files = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert files and {f"selfinstruct/data/{f}" for f in files} <= names

    # Installed alone (no repository beside it), it finds its own copies.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import selfinstruct.prompts as p, selfinstruct.modes.magpie; "
            "print(p.__file__); print(p.bundled_dir('seeds')); print(p.bundled_dir('prompts'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    where, seeds, prompts = run.stdout.split()
    site = tmp_path / "site" / "selfinstruct"
    assert (Path(where), Path(seeds), Path(prompts)) == (site / "prompts.py", site / "data" / "seeds",
                                                        site / "data" / "prompts")


def test_every_flag_of_every_command_is_in_the_readme():
    """The README names every flag each command's --help lists (an on/off flag's --no- form counts as
    named with it where the README names either): a probe found 36 flags in --help and nowhere in the
    README (--timeout-s, --grad-accum, --served-model-name, ...), so a user reading the README could not
    learn them. Built from the parsers themselves, so a new flag without a line in the README fails here."""
    import argparse
    import importlib

    from selfinstruct.cli import COMMANDS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=name, add_help=False)
        (getattr(module, f"add_arguments_{name}", None) or module.add_arguments)(parser)
        for action in parser._actions:
            flags = [f for f in action.option_strings if f.startswith("--")]
            if flags and not any(f"`{f}" in readme or f"{f} " in readme or f"{f}`" in readme for f in flags):
                missing.append(f"{name} {' / '.join(flags)}")
    assert not missing, "in --help, not in README.md: " + ", ".join(missing)
