#!/usr/bin/env bash
# ADD latency benchmark (issue: plugin). Release build; root; creates and removes its own netns only.
# Prints a markdown table: ADD of an injected pod vs. the floor (one iptables-restore per family of the same rules
# into a fresh netns, measured in the same run), ADD of a non-injected pod, and a burst of concurrent ADDs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-add.sh: run as root" >&2; exit 1; }
cargo build --release --locked -p cni-plugin -p meshcni-tests --bins >&2
exec target/release/meshcni-bench --bin-dir target/release "$@"
