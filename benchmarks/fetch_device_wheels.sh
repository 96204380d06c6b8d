#!/usr/bin/env bash
# Run here, before a device call: downloads into .whl/ (git-ignored through .git/info/exclude) the wheels the
# lent GPU machine's image lacks. That image (Python 3.12) has jax 0.11 with its CUDA 13 plugin, flax, optax,
# orbax-checkpoint and torch, and transformers 5.17; it has no grain (nor grain's array-record and portpicker),
# and our torch path pins transformers 5.24. jax/jaxlib 0.10.2 with a CUDA plugin are ~270 MB, over the 64 MiB
# a call may carry, so the device run uses the image's jax. Then: device run with carry [".whl"] and
#   benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 transformers==5.24.0
du -sh .whl
