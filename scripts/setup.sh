#!/usr/bin/env bash
# Set up a fresh Debian machine for norton: system packages, then .venv with
# the package and its test extras. Safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Fashion-MNIST (the built-in demo's data) comes from Debian. Failing to get it
# is not fatal: the demo then says so and falls back to a built-in dataset.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "setup: could not install Debian's dataset-fashion-mnist; the demo will use its built-in fallback data" >&2
  fi
fi

# labelme-examples: real photographs with COCO-format annotations, read by the detection
# tests (tests/test_detection_coco.py fails, saying so, without it). Not fatal here either.
if [ ! -f /usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/annotations.json ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if ! $SUDO apt-get install -y -q labelme-examples >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q labelme-examples >/dev/null 2>&1 \
      || echo "setup: could not install Debian's labelme-examples; the detection data tests will fail until it is installed" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
stamp="$VENV/.norton-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import norton, torch, torchvision" 
  touch "$stamp"
fi
