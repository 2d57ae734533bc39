#!/usr/bin/env bash
# The project's test command (README): formatting, lints, then every test of the workspace, including the
# root-only netns, traffic and chain tests. Must run as root; it refuses to run otherwise rather than skip them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the netns, traffic and chain tests need root; run as root (sudo $0)" >&2
  exit 1
fi
for tool in iptables-legacy-restore iptables-nft-restore ip6tables-legacy-restore ip nft nsenter /usr/lib/cni/bridge /usr/lib/cni/host-local; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || {
    echo "scripts/test.sh: missing $tool: run bash scripts/ci-deps.sh (Debian packages) first" >&2
    exit 1
  }
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee "$log"
if [ -x scripts/validate-manifests.sh ]; then
  bash scripts/validate-manifests.sh
fi
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
