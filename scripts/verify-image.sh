#!/usr/bin/env bash
# Proves the archive of scripts/build-image.sh is a real image: a private containerd (temp root, state and socket;
# CRI disabled; nothing shared with a containerd the machine may run) imports it with `ctr image import`, then runs
# the agent (`--version`), the plugin (CNI VERSION) and the iptables tools (`--version`) from it. Root; installs
# Debian's containerd and runc when missing.
#
#   scripts/verify-image.sh [ARCHIVE.tar]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
ARCHIVE=${1:-$TARGET_DIR/image/meshcni-node-agent.oci.tar}
IMAGE=$(sed -n 's/^IMAGE_NAME_DEFAULT="\(.*\)"$/\1/p' scripts/build-image.sh)
IMAGE=${IMAGE_NAME:-$IMAGE}

[ "$(id -u)" = 0 ] || { echo "verify-image: needs root" >&2; exit 1; }
[ -f "$ARCHIVE" ] || { echo "verify-image: $ARCHIVE missing (run scripts/build-image.sh)" >&2; exit 1; }
if ! command -v containerd >/dev/null || ! command -v runc >/dev/null; then
    apt-get install -y -qq containerd runc >/dev/null
fi

T=$(mktemp -d /tmp/meshcni-ctrd-XXXXXX)
PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
cat > "$T/config.toml" <<EOF
version = 2
root = "$T/root"
state = "$T/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$T/containerd.sock"
[ttrpc]
  address = "$T/containerd-ttrpc.sock"
EOF
containerd --config "$T/config.toml" > "$T/containerd.log" 2>&1 &
PID=$!
for _ in $(seq 100); do
    [ -S "$T/containerd.sock" ] && break
    sleep 0.1
done
CTR=(ctr -a "$T/containerd.sock" -n k8s.io)
"${CTR[@]}" image import "$ARCHIVE"
"${CTR[@]}" image ls -q | grep -qxF "$IMAGE" || { echo "FAIL: $IMAGE not listed after import" >&2; exit 1; }
out=$(timeout 60 "${CTR[@]}" run --rm "$IMAGE" "meshcni-verify-$$" /usr/local/bin/node-agent --version)
echo "agent in the image: $out"
timeout 60 "${CTR[@]}" run --rm --env CNI_COMMAND=VERSION "$IMAGE" "meshcni-verify-plugin-$$" /opt/cni/bin/istio-cni \
    </dev/null >/dev/null || { echo "FAIL: the plugin does not run from the image" >&2; exit 1; }
# The in-place repair's iptables tools (scripts/image-iptables.sh), both flavours, from the image's own tree.
for t in iptables-legacy-restore iptables-nft-save; do
    v=$(timeout 60 "${CTR[@]}" run --rm "$IMAGE" "meshcni-verify-$t-$$" "/usr/sbin/$t" --version) \
        || { echo "FAIL: /usr/sbin/$t does not run from the image" >&2; exit 1; }
    echo "$t in the image: $v"
done
echo "ok: $ARCHIVE imports into containerd as $IMAGE and runs"
