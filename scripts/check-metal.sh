#!/usr/bin/env bash
# Type-checks the workspace for Apple silicon with `--features metal`, from Linux.
#
# Metal only builds for Apple targets. Everything in the tree is Rust except `ring` (the TLS
# crypto under hf-hub's HTTPS client), whose build script compiles C for the target. Without an
# Apple SDK we compile it freestanding with clang: ring's C only needs <stdint.h>/<stddef.h>
# (clang ships those), <assert.h>, <string.h> and Apple's <TargetConditionals.h>, which we stub with macOS
# values; -nostdlibinc keeps the host's glibc headers out.
# Needs: `rustup target add aarch64-apple-darwin`, and clang + llvm-ar (Debian: clang llvm).
# On a Mac none of this is needed: `cargo check --features metal` works natively.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx aarch64-apple-darwin || rustup target add aarch64-apple-darwin
command -v clang >/dev/null && command -v llvm-ar >/dev/null || {
  echo "needs clang and llvm-ar (Debian/Ubuntu: apt-get install clang llvm)" >&2
  exit 1
}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/apple-check}
stub="$CARGO_TARGET_DIR/apple-stub-include"
mkdir -p "$stub"
cat > "$stub/TargetConditionals.h" <<'H'
/* Minimal stand-in for the Apple SDK header: macOS on Apple silicon. */
#pragma once
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
#define TARGET_CPU_ARM64 1
H
cat > "$stub/assert.h" <<'H'
/* Type-checking only: assertions compile to nothing. */
#pragma once
#define assert(x) ((void)0)
H
cat > "$stub/string.h" <<'H'
/* Declarations of the few libc routines ring calls. */
#pragma once
#include <stddef.h>
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
H
export CC_aarch64_apple_darwin=clang AR_aarch64_apple_darwin=llvm-ar
export CFLAGS_aarch64_apple_darwin="-ffreestanding -nostdlibinc -I$(realpath "$stub")"
cargo check --workspace --target aarch64-apple-darwin --features metal "$@"
