#!/usr/bin/env bash
# Regenerates cni-plugin/hot-text.ld, the plugin's code layout: the functions a CNI call runs, placed together at
# the start of the executable's code, the most frequent calls' first (VERSION, then an injected ADD answered by
# the agent's socket on native nftables, iptables-nft, iptables-legacy; then the same with the plugin's own API
# GET; then the rest). Why: the plugin is exec'ed once per pod start and its code comes in through page faults,
# 64 KiB at a time (the kernel's fault-around); scattered over 7 MiB of code, an ADD took ~60 of them, each about
# a microsecond, and as much again to unmap them at exit. Together, a few do. scripts/bench-add.sh prints the
# faults per ADD: when they creep up after code changes, run this again (it needs valgrind and root).
#
#   scripts/hot-text.sh        runs meshcni-bench once per backend with every plugin call under callgrind
#                              (its function list, not its timings), then writes cni-plugin/hot-text.ld
#
# The layout only changes where functions sit, never what runs; a function missing from the list (renamed,
# new) just stays in .text. Only the static musl build (the image's and the bench's) uses it: cni-plugin/build.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "hot-text.sh: run as root (the bench creates netns)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "hot-text.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
MUSL=x86_64-unknown-linux-musl
cargo build --release --locked -p cni-plugin -p node-agent -p meshcni-tests --bins >&2
CC_x86_64_unknown_linux_musl=musl-gcc env -u RUSTFLAGS \
  cargo build --release --locked --target "$MUSL" -p cni-plugin --bin istio-cni >&2
PLUGIN=$TARGET_DIR/$MUSL/release/istio-cni

WORK=$(mktemp -d /tmp/meshcni-hot-text.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin" "$WORK/out"
# The stand-in the bench runs: names each call's profile by its kind, then runs the real plugin under callgrind.
cat > "$WORK/bin/istio-cni" <<EOF
#!/bin/sh
input=\$(cat)
kind=other
case "\$CNI_COMMAND" in
VERSION) kind=version ;;
ADD)
  backend=\$(printf '%s' "\$input" | sed -n 's/.*"iptables_backend":"\\([a-z]*\\)".*/\\1/p')
  rundir=\$(printf '%s' "\$input" | sed -n 's/.*"cni_agent_run_dir":"\\([^"]*\\)".*/\\1/p')
  lookup=get; [ -S "\$rundir/pod-cache.sock" ] && lookup=socket
  case "\$CNI_ARGS" in *K8S_POD_NAME=plain*) pod=plain ;; *) pod=injected ;; esac
  kind=add-\$pod-\$lookup-\$backend ;;
esac
printf '%s' "\$input" | exec valgrind -q --tool=callgrind --demangle=no \\
  --callgrind-out-file="$WORK/out/\$kind.\$\$" "$PLUGIN" "\$@"
EOF
chmod +x "$WORK/bin/istio-cni"
for backend in nftables nft legacy; do
  # Exit 1 says targets were missed: under callgrind every one is. 2 is an error.
  rc=0
  MESHCNI_BIN_DIR=$TARGET_DIR/release "$TARGET_DIR/release/meshcni-bench" --bin-dir "$WORK/bin" \
    --samples 1 --burst 1 --backend "$backend" > "$WORK/bench-$backend.log" 2>&1 || rc=$?
  [ "$rc" -le 1 ] || { cat "$WORK/bench-$backend.log" >&2; exit 1; }
done
python3 scripts/hot-text.py "$WORK/out" > cni-plugin/hot-text.ld
echo "wrote cni-plugin/hot-text.ld: $(grep -c '^ *\*' cni-plugin/hot-text.ld) section patterns from $(ls "$WORK/out" | wc -l) plugin calls" >&2
