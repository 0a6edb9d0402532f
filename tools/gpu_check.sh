#!/usr/bin/env bash
# GPU check for a lent CUDA machine, in one run of under 8 minutes: parity and speed of minisd
# against diffusers on small-sd's full architecture (random weights), 512x512, 25 steps, CFG 7.5.
#
#   tools/gpu_check.sh            # on the GPU machine, from anywhere; logs under $OUT if set,
#                                 # else under .cache/gpu-check/
#
# One tools/bench.py run does both (one model build, one load per mode):
# - parity: every mode draws the same seed, so its image is compared (PSNR, dB) with diffusers
#   fp32's and minisd fp32's: minisd fp16 vs minisd fp32 and vs diffusers fp32, next to
#   diffusers fp16 vs diffusers fp32 (the reference's own half-precision error). The
#   "parity PASS/FAIL" lines at the end are the verdicts (thresholds in bench.py's docstring).
# - speed: diffusers fp32 eager, diffusers fp16 eager, and diffusers' strongest recipe, fp16
#   with fused QKV (pipe.fuse_qkv_projections()), channels_last and the UNet under
#   torch.compile(mode="reduce-overhead") (CUDA graphs); minisd fp32 eager, fp16 eager and fp16
#   compiled (compile=True). Every mode in its own process, all alternated, medians.
#   Compile times are cold (an empty inductor cache per mode) and count against the 8 minutes.
#
# Logs: $OUT/env.log (GPU, versions), $OUT/bench.log (progress and the table), $OUT/bench.json
# (every number; written as the run goes, so a run cut short still leaves what it measured).
# Exit status: bench.py's (1 when a mode fails or a parity check fails; 124 when cut at the limit).
#
# The GPU machine has no internet and no diffusers; its python3 has torch, transformers 5.17,
# huggingface_hub 1.33, tokenizers 0.23, safetensors, numpy, pillow, einops. Carry wheels in
# .whl/ (git-ignored). Fetch them once, from the repository root, on a machine with internet:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 transformers==5.24.0 regex==2026.5.9
#
# diffusers and transformers are the versions the tests pin (pure-Python wheels). regex is there
# because transformers 5.24 checks regex>=2025.10.22 when imported and the image's version is
# unknown. Nothing else is needed: diffusers' other requirements (huggingface-hub>=1.32,
# safetensors>=0.8, filelock, numpy, Pillow, requests; importlib_metadata only below Python 3.8)
# and transformers' (huggingface-hub>=1.31, tokenizers>=0.23.1,<0.24, pyyaml, packaging, tqdm,
# typer) are in the image. Then run it through the device tool with carry [".whl"] and
# timeout_s 540: the wheels are installed into /tmp/site, ahead of the image's packages.
#
# A device call carries at most 64 MiB: check `du -sh .whl` (these wheels are well under).
# Settings, as environment variables: DEVICE, SIZE, STEPS, REPEATS, MODES, BUDGET_S and
# BENCH_EXTRA (more bench.py options).
# For a smoke test on a CPU (tiny model):
#   DEVICE=cpu SIZE=64 STEPS=2 REPEATS=1 BENCH_EXTRA=--tiny OUT=/tmp/gpu-check tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-480}  # the whole script, the dependency install and model build included
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-512}
STEPS=${STEPS:-25}
REPEATS=${REPEATS:-5}  # one image per mode each; bench.py stops early when the budget runs short
HALF=$([ "$DEVICE" = cuda ] && echo fp16 || echo bf16)
MODES=${MODES:-diffusers-fp32,minisd-fp32,diffusers-$HALF,minisd-$HALF,minisd-$HALF-compiled,diffusers-$HALF-compiled}
OUT=${OUT:-$PWD/.cache/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's minisd, not installed

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "safetensors", "regex", "einops"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
} 2>&1 | tee "$OUT/env.log"
python3 -c "import diffusers, transformers, minisd" || { echo "gpu_check: a package is missing (see the header)"; exit 1; }

left=$((BUDGET_S - SECONDS - 10))  # seconds left for bench.py, 10 kept for the kill and the copy
# --time-limit keeps 75 s for the last mode started to compile, and bench.py to print its table.
timeout -k 10 "$left" python3 tools/bench.py --device "$DEVICE" --size "$SIZE" --steps "$STEPS" \
  --repeats "$REPEATS" --modes "$MODES" --time-limit $((left - 75)) --json "$OUT/bench.json" ${BENCH_EXTRA:-} \
  2>&1 | tee "$OUT/bench.log"
status=$?
[ "$status" = 124 ] && echo "gpu_check: bench.py was stopped at the ${BUDGET_S} s budget; $OUT/bench.json holds what it measured"
echo "gpu_check: done in ${SECONDS} s, exit status $status; logs in $OUT"
exit "$status"
