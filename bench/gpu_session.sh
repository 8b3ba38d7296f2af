#!/usr/bin/env bash
# Everything a GPU session runs, most important first, sized for a 15-minute device lease (one call
# of at most 10 minutes). Each part has its own time limit, and the scripts append each result as it
# finishes, so a slow or hung part keeps the others' results.
#
#   OUT=dir bash bench/gpu_session.sh      (default OUT: bench/gpu_out)
#
# diffusers must be importable for the reference setting and toml for the trainer check. The lent
# H100 machine has neither; fetch them as wheels here first (into an ignored .whl/ folder):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata toml
#
# and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The whole script takes under 10 minutes on an H100; what it writes under $OUT is at most 8 files.
set -u
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
    timeout "${BENCH_S:-260}" python3 bench/bench_gpu.py --settings a,b,ref,bc,c,d28,d18 --profile b,bc,c \
        --out "$OUT/gpu_results.jsonl"
    timeout "${COMPILE_S:-150}" python3 bench/bench_gpu.py --settings b,a --compile --profile b \
        --out "$OUT/gpu_results.jsonl"
    timeout "${ATTENTION_S:-70}" python3 bench/bench_attention.py --out /tmp/attention.jsonl  # its lines are in bench.log
} 2>&1 | tee "$OUT/bench.log"
timeout "${CHECKS_S:-110}" python3 bench/gpu_checks.py --checks swap,fp8,trainer,compile \
    --out "$OUT/checks.jsonl" >"$OUT/checks.log" 2>&1
timeout "${TRAINER_COMPILE_S:-120}" python3 bench/gpu_checks.py --checks trainer_compile \
    --out "$OUT/checks.jsonl" >>"$OUT/checks.log" 2>&1
grep -E "^(PASS|FAIL)" "$OUT/checks.log" | cut -c1-600
