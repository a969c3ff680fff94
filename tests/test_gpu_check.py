"""bench/gpu_check.py: which carried wheels the GPU machine gets, and reading pytest's closing line."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal wheel: only its METADATA matters to the plan."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_plan_installs_what_is_missing_or_too_old_and_keeps_the_rest(tmp_path):
    wheels = [wheel(tmp_path, "openai", "3.0", ["pydantic>=2", "jiter>=0.5", 'winonly; sys_platform == "win32"']),
              wheel(tmp_path, "pydantic", "2.14", ["typing-extensions>=4.16"]),
              wheel(tmp_path, "jiter", "0.9"),
              wheel(tmp_path, "typing_extensions", "4.16.0"),
              wheel(tmp_path, "rich", "15.0")]
    here = {"pydantic": "2.10", "typing-extensions": "4.12", "rich": "14.0", "jiter": "0.8"}

    install, unmet = gpu_check.plan(wheels, ["openai>=1.40", "pydantic>=2.6", "rich>=13", "trl>=1.0"],
                                    installed=lambda n: Version(here[n]) if n in here else None)

    # openai is missing; its jiter>=0.5 is met by 0.8 here; pydantic 2.10 meets the root's >=2.6 and openai's
    # >=2, so the machine's stays, and with it typing-extensions 4.12; rich 14 meets >=13.
    assert [w.name.split("-")[0] for w in install] == ["openai"]
    assert unmet == ["trl>=1.0 (here: missing)"]  # nothing carried meets it: said, not hidden

    here["pydantic"] = "2.5"  # too old for the root: the carried one comes, and then its typing-extensions
    install, unmet = gpu_check.plan(wheels, ["openai>=1.40", "pydantic>=2.6", "rich>=13"],
                                    installed=lambda n: Version(here[n]) if n in here else None)
    assert [w.name.split("-")[0] for w in install] == ["openai", "pydantic", "typing_extensions"]
    assert unmet == []


def test_root_requirements_leave_out_what_the_machine_brings():
    roots = gpu_check.root_requirements()
    names = {gpu_check.canon(r.split(">")[0].split("=")[0].split("[")[0]) for r in roots}
    assert {"openai", "pydantic", "trl", "peft", "rouge-score"} <= names
    assert not names & {"torch", "vllm", "xllamacpp"}


def test_pytest_counts_reads_the_closing_line(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("....\nSKIPPED [1] tests/test_servers.py:361: no NVIDIA GPU\n"
                   "1 passed, 1 skipped, 300 deselected in 12.5s\n")
    assert gpu_check.pytest_counts(log) == {"passed": 1, "skipped": 1, "deselected": 300}
    assert gpu_check.skip_reasons(log) == ["SKIPPED [1] tests/test_servers.py:361: no NVIDIA GPU"]
    log.write_text("1 error in 3.0s\n")
    assert gpu_check.pytest_counts(log) == {"error": 1}
    assert gpu_check.pytest_counts(tmp_path / "absent.log") == {}
