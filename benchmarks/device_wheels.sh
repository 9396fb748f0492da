#!/usr/bin/env bash
# Fetch, on a machine WITH network, the wheels the GPU machine lacks into .whl/ (git-ignored),
# for benchmarks/run_on_device.sh to install there (the device has no network).
#   bitsandbytes  the qlora case (4-bit NF4 kernels; 43 MB)
#   supervision   annotated PNGs in the predict case (+ its pure-Python needs the image lacks)
# Versions: supervision/defusedxml/pyDeprecate are the ones the CPU suite runs with; the
# device image already has torch, transformers, peft, accelerate, safetensors, sentencepiece,
# pillow, scipy, matplotlib, pyyaml, tqdm, tensorboard (see /work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "bitsandbytes==0.50.2" "supervision==0.31.2" "defusedxml==0.7.1" "pyDeprecate==0.13.0"
du -sh .whl
