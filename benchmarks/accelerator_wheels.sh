#!/usr/bin/env bash
# Prepares what benchmarks/accelerator_check.sh needs on a machine that can fetch nothing: the
# wheels its image lacks, in ./.whl, and the Fashion-MNIST IDX files, in ./.data/fashion-mnist
# (both git-ignored; carry them along with the working tree).
#
#   benchmarks/accelerator_wheels.sh [PYTHON_VERSION]   # default 3.12, the GPU image's Python
#
# The GPU image (see the developers' guide) has JAX, flax, optax, chex, orbax, absl, etils,
# scikit-learn, matplotlib, tqdm, pytest, hypothesis and torch; this adds ml-collections,
# tensorflow-datasets and what it imports, and torchattacks. Versions are those of
# requirements/lock.txt where it pins them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
PIP=${PIP:-python3 -m pip}
mkdir -p .whl .data
pin() {  # The lock file's version of $1, else none.
  local line
  line=$(grep -i -E "^$1==" requirements/lock.txt 2>/dev/null | head -1 || true)
  if [ -n "$line" ]; then echo "$line"; else echo "$1"; fi
}
PURE="ml-collections tensorflow-datasets immutabledict promise simple-parsing docstring-parser
      tensorflow-metadata googleapis-common-protos termcolor toml importlib-resources"
BINARY="array-record dm-tree"
pure=() binary=()
for name in $PURE; do pure+=("$(pin "$name")"); done
for name in $BINARY; do binary+=("$(pin "$name")"); done
# Pure-Python packages: any wheel (built here from the sdist where PyPI has no wheel: promise).
$PIP wheel -q --no-deps -w .whl "${pure[@]}" torchattacks==3.5.1
# Compiled ones: the GPU image's Python and platform.
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${binary[@]}"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p .data/fashion-mnist && cp -u /usr/share/datasets/fashion-mnist/* .data/fashion-mnist/
else
  echo "no /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist first" >&2
fi
du -sh .whl .data
echo "carry .whl and .data with the working tree (64 MiB in all on the lent GPU machines)"
