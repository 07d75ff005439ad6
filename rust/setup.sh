#!/usr/bin/env bash
# Build rust/ (the rust_onnx row) offline against Debian's packaged crates.
# Idempotent: installs missing librust-*-dev packages (as root, with apt), then
# `cargo build --release --offline`. Without cargo it prints why and exits 0 (the
# benchmark then reports the Rust row as skipped).
set -euo pipefail
cd "$(dirname "$0")"

REGISTRY=/usr/share/cargo/registry
# crate (as in Cargo.toml) -> Debian package
PACKAGES=(
  librust-anyhow-dev
  librust-clap-dev
  librust-flate2-dev
  librust-libloading-dev
  librust-rayon-dev
  librust-serde-json-dev
)
CRATES=(anyhow clap flate2 libloading rayon serde_json)

CARGO=${CARGO:-$(command -v cargo || true)}
if [ -z "$CARGO" ] && [ -x "$HOME/.cargo/bin/cargo" ]; then CARGO="$HOME/.cargo/bin/cargo"; fi
if [ -z "$CARGO" ]; then
  echo "rust/setup.sh: cargo not found: skipping the Rust build (the rust_onnx row will be reported as skipped)"
  exit 0
fi

missing=()
for i in "${!CRATES[@]}"; do
  if ! compgen -G "$REGISTRY/${CRATES[$i]}-[0-9]*" >/dev/null; then missing+=("${PACKAGES[$i]}"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "rust/setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "rust/setup.sh: missing Debian crate packages: ${missing[*]}"
    echo "rust/setup.sh: install them with: sudo apt-get install ${missing[*]}"
    echo "rust/setup.sh: skipping the Rust build (the rust_onnx row will be reported as skipped)"
    exit 0
  fi
fi

echo "rust/setup.sh: $("$CARGO" --version); building rust/target/release/totalseg-rust"
"$CARGO" build --release --offline
