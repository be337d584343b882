#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's package `dataset-fashion-mnist` when it is missing and apt is available.
# Elsewhere: put the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and set MIPP_FASHION_MNIST to it.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -n "${MIPP_FASHION_MNIST:-}" ] || ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "Installing Fashion-MNIST from Debian's dataset-fashion-mnist ..."
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null && exit 0
fi
echo "Fashion-MNIST not found. Put the IDX files in a folder and set MIPP_FASHION_MNIST=/that/folder" >&2
echo "(files: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz is fine)." >&2
exit 1
