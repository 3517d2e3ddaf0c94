#!/usr/bin/env bash
# Here (CPU, with PyPI): the Python packages bench/device_check.sh needs on the GPU machine and
# that machine lacks (/work/.library/device/KINDS.md's list, 2026-11-17), ready to carry:
#   .whl/       polygraphy, jsonschema, cryptography and what they need that is not there (6 MB, one run)
#   .carry/ort/ onnxruntime-gpu 1.31.1 (CUDA 13) in 4 parts of <= 56 MiB, one part per run
#               (../shared/device/pack-wheels.sh; the engines stage needs all 4)
# Both folders are git-ignored. Usage: bash bench/device_pack.sh [SHARED_DIR]   (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl polygraphy==0.53.6 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py \
  cryptography cffi pycparser
{ git check-ignore -q .whl && git check-ignore -q .carry/ort; } || { echo "device_pack: .whl and .carry/ort must be git-ignored" >&2; exit 2; }
# pack-wheels.sh cuts 56 MiB parts, but a run carries at most 64 MiB with the working tree (21 MB:
# the trained tiny-llava is 18 MB) and .whl (6 MB): the same archive is cut again into 36 MiB parts
# (6), which its unpack.sh joins the same way (part i of n, the archive's checksum).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
bash "$shared/device/pack-wheels.sh" "$tmp/ort" onnxruntime-gpu==1.31.1
read -r _ _ sum < "$tmp/ort/part-1/index"
for d in $(ls -d "$tmp"/ort/part-* | sort -t- -k2 -n); do cat "$d/chunk"; done > "$tmp/site.tar.xz"
(cd "$tmp" && split -b 36M -d -a 2 site.tar.xz cut-)
rm -rf .carry/ort && mkdir -p .carry/ort
n=$(ls "$tmp"/cut-* | wc -l); i=0
for c in "$tmp"/cut-*; do
  i=$((i+1)); mkdir -p ".carry/ort/part-$i"; mv "$c" ".carry/ort/part-$i/chunk"
  echo "$i $n $sum" > ".carry/ort/part-$i/index"; cp "$shared/device/unpack-wheels.sh" ".carry/ort/part-$i/unpack.sh"
done
du -sh .whl .carry/ort/part-*
