#!/usr/bin/env bash
# ADD latency benchmark of istio-cni (root; creates and removes its own netns only). Prints markdown tables: ADD of
# an injected pod with each backend (iptables-legacy, iptables-nft, native nftables) vs. the floor (one
# iptables-restore of the same rules into a fresh netns, measured in the same run, interleaved), ADD of a
# non-injected pod, the plugin's VERSION call (its start-up), and a burst of concurrent ADDs per backend; all of it
# twice: with the plugin's own API GET, then with the real node-agent's pod cache answering on its socket (API
# requests per pod start counted from the stub's log); then the agent's RSS with 1,000 pods cached and its CPU while
# idle. Writes the latencies as an SVG chart to docs/add-latency.svg (SVG=path to change it).
#
#   scripts/bench-add.sh [--samples N] [--burst N] [--backend legacy|nft|nftables|both|all]
#   BUILD=gnu scripts/bench-add.sh     measure the glibc build instead of the static musl one
#
# By default it measures what the image ships: istio-cni built statically for x86_64-unknown-linux-musl (as
# scripts/build-image.sh does); without that rustup target it falls back to the glibc build and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-add.sh: run as root" >&2; exit 1; }
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
MUSL=x86_64-unknown-linux-musl
BUILD=${BUILD:-musl}
if [ "$BUILD" = musl ] && ! { rustup target list --installed 2>/dev/null | grep -qx "$MUSL" && command -v musl-gcc >/dev/null; }; then
  echo "bench-add.sh: no $MUSL target or musl-gcc here; measuring the glibc build instead" >&2
  BUILD=gnu
fi
cargo build --release --locked -p cni-plugin -p node-agent -p meshcni-tests --bins >&2
if [ "$BUILD" = musl ]; then
  CC_x86_64_unknown_linux_musl=musl-gcc env -u RUSTFLAGS \
    cargo build --release --locked --target "$MUSL" -p cni-plugin --bin istio-cni >&2
  PLUGIN_DIR=$TARGET_DIR/$MUSL/release
else
  PLUGIN_DIR=$TARGET_DIR/release
fi
echo "measuring $PLUGIN_DIR/istio-cni ($BUILD build); load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
SVG=${SVG:-docs/add-latency.svg}
mkdir -p "$(dirname "$SVG")"
# The agent (and the plugin it installs) the bench starts for the socket measurements.
export MESHCNI_BIN_DIR=$TARGET_DIR/release
exec "$TARGET_DIR/release/meshcni-bench" --bin-dir "$PLUGIN_DIR" --svg "$SVG" "$@"
