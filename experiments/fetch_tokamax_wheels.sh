#!/usr/bin/env bash
# Download tokamax and the dependencies the H200 image lacks into wheels/ (git-ignored, 5.8 MiB),
# for the device stage `tokamax` (run it with carry=["wheels"]). Needs the package registry
# (this machine, not the device). Pinned to the versions first measured with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d wheels tokamax==0.0.17 qwix==0.1.8 einshape==1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated_types==0.8.0 typing_inspection==0.4.5 immutabledict==4.3.1 typing_extensions==4.16.0 \
  absl_py==2.5.1
ls -la wheels
