#!/usr/bin/env bash
# The ONE device call for issue 13: the GPU suite at real shapes (PaliGemma 1 3B at 224,
# random weights), JSON and log into $OUT. About 5-8 minutes on one H100/H200; no network.
#
#   here (network):   bash benchmarks/device_wheels.sh          # optional: qlora + PNGs
#   device tool run:  command "bash benchmarks/run_on_device.sh", carry [".whl"], timeout_s 590
#
# Without .whl/ the qlora case is skipped (no bitsandbytes) and predict writes no PNGs
# (no supervision); everything else runs. Files back: gpu_suite.json, gpu_suite.log,
# environment.txt (at most 8 files, 16 MiB each: well inside).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/device}"
PRESET="${PRESET:-pg1-3b-224}"   # PRESET=tiny PYTHON=.venv/bin/python: a CPU dry run of this script
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PYTHON" - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "supervision"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - a report, not a check
        print(name, "MISSING", type(error).__name__, error)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda)
PY
} > "$OUT/environment.txt" 2>&1
# 540 s hard stop inside the tool's 600 s; the suite itself skips cases that would start
# after 420 s and rewrites its JSON after every case, so a stop keeps what was measured.
timeout 540 "$PYTHON" benchmarks/gpu_suite.py --preset "$PRESET" --budget-s 420 \
  --work /tmp/gpu_suite --out "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log" | tail -c 4000
status=${PIPESTATUS[0]}
echo "gpu_suite exit status: $status" | tee -a "$OUT/gpu_suite.log"
exit "$status"
