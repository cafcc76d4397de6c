#!/usr/bin/env bash
# Installs Intel MKL from PyPI (no system packages, no root) for the optional `mkl` feature, and
# prints the two variables a build and a run need. Usage:
#
#   eval "$(bash scripts/setup-mkl.sh)"        # installs once into ~/.cache/worldgrad-mkl
#   cargo bench -p rl --bench lapo --features rl/mkl
#   cargo run -p rl --release --features rl/mkl --bin train
#
# Why a feature and not the default: candle's `mkl` links MKL (a C/Fortran library, ~1 GB with
# its OpenMP runtime) where the default build is pure Rust. What it buys on the 2-core AVX-512
# machine of issue #20 is in rl/README.md ("Speed"): MKL's GEMMs are 1.3–2.3× candle's `gemm`
# crate's on ResNet18's convolution shapes, but the whole LAPO iteration gains less because the
# GEMMs are only part of it.
#
# The pip wheels ship `lib/pkgconfig/mkl-static-lp64-iomp.pc`, which intel-mkl-src (candle's
# MKL binding) finds through PKG_CONFIG_PATH; MKL is linked statically, its OpenMP runtime
# (libiomp5.so) is loaded at run time through LD_LIBRARY_PATH.
set -euo pipefail
MKL_VERSION=${WORLDGRAD_MKL_VERSION:-2026.2.0}
PREFIX=${WORLDGRAD_MKL_HOME:-$HOME/.cache/worldgrad-mkl}
if [ ! -f "$PREFIX/.installed-$MKL_VERSION" ]; then
  python3 -m venv "$PREFIX" >&2
  "$PREFIX/bin/pip" install -q "mkl-devel==$MKL_VERSION" "mkl-static==$MKL_VERSION" "mkl-include==$MKL_VERSION" >&2
  touch "$PREFIX/.installed-$MKL_VERSION"
fi
if ! ls "$PREFIX"/lib/pkgconfig/mkl-static-lp64-iomp.pc >/dev/null 2>&1; then
  echo "setup-mkl.sh: $PREFIX/lib/pkgconfig/mkl-static-lp64-iomp.pc missing after install" >&2
  exit 1
fi
echo "export PKG_CONFIG_PATH=\"$PREFIX/lib/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}\""
echo "export LD_LIBRARY_PATH=\"$PREFIX/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
