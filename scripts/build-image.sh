#!/usr/bin/env bash
# Builds the node agent's container image without Docker: static musl binaries of `node-agent` and `istio-cni` in
# one reproducible layer (/usr/local/bin/node-agent, /opt/cni/bin/istio-cni), with Debian's iptables tools for the
# in-place repair (/usr/sbin/{ip,ip6}tables-{legacy,nft}-{save,restore} and what they load: scripts/image-iptables.sh,
# cached by package version), packed by scripts/oci-pack.sh into an OCI image archive that
# `ctr -n k8s.io image import` (containerd) accepts. daemonset/daemonset.yaml runs it by name.
#
#   scripts/build-image.sh [OUT.tar]        default OUT: $CARGO_TARGET_DIR (or target)/image/meshcni-node-agent.oci.tar
#   IMAGE_NAME=registry.example/meshcni/node-agent:dev scripts/build-image.sh
#   SKIP_BUILD=1 ...                        reuse binaries already built for the musl target
#
# Needs: the rustup target x86_64-unknown-linux-musl and musl-gcc (Debian: musl-tools; installed here when missing
# and running as root), GNU tar, gzip, sha256sum; for the iptables tools apt-get, dpkg-deb and readelf (Debian).
set -euo pipefail

IMAGE_NAME_DEFAULT="localhost/meshcni/node-agent:0.1.0"
IMAGE_NAME=${IMAGE_NAME:-$IMAGE_NAME_DEFAULT}
TARGET=x86_64-unknown-linux-musl

cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${1:-$TARGET_DIR/image/meshcni-node-agent.oci.tar}

die() { echo "build-image: $*" >&2; exit 1; }

if [ -z "${SKIP_BUILD:-}" ]; then
    if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        rustup target add "$TARGET" || die "cannot add the rustup target $TARGET"
    fi
    if ! command -v musl-gcc >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get install -y -qq musl-tools >/dev/null || die "apt-get install musl-tools failed"
        else
            die "musl-gcc not found (Debian: apt-get install musl-tools)"
        fi
    fi
    # ring (rustls) compiles C: use musl's compiler for the target. The link flags (static, not PIE: the plugin
    # runs on the host, whatever its libc) are in .cargo/config.toml, which RUSTFLAGS would override.
    CC_x86_64_unknown_linux_musl=musl-gcc \
    env -u RUSTFLAGS \
        cargo build --release --locked --target "$TARGET" -p node-agent -p cni-plugin \
        --bin node-agent --bin istio-cni
fi

BIN_DIR="$TARGET_DIR/$TARGET/release"
for b in node-agent istio-cni; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing (build failed or SKIP_BUILD without a build)"
    if readelf -l "$BIN_DIR/$b" | grep -q 'INTERP'; then
        die "$BIN_DIR/$b is dynamically linked; the image needs static binaries"
    fi
done

IPTABLES_TREE=$(bash scripts/image-iptables.sh | tail -1)
[ -x "$IPTABLES_TREE/usr/sbin/xtables-nft-multi" ] || die "scripts/image-iptables.sh gave no iptables tree"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS"
cp -a "$IPTABLES_TREE/." "$ROOTFS/"
# The tools must start from the image's tree alone (its loader and libraries), not the build machine's.
if [ "$(id -u)" = 0 ]; then
    for t in iptables-legacy-restore iptables-nft-restore ip6tables-legacy-save ip6tables-nft-save; do
        chroot "$ROOTFS" "/usr/sbin/$t" --version >/dev/null || die "/usr/sbin/$t does not run from the image's tree"
    done
else
    echo "build-image: not root: the iptables tools were not run from the image's tree (chroot needs root)" >&2
fi
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/opt/cni/bin"
install -s -m 0755 "$BIN_DIR/node-agent" "$ROOTFS/usr/local/bin/node-agent"
install -s -m 0755 "$BIN_DIR/istio-cni" "$ROOTFS/opt/cni/bin/istio-cni"
chmod 0755 "$ROOTFS/usr" "$ROOTFS/usr/local" "$ROOTFS/usr/local/bin" "$ROOTFS/opt" "$ROOTFS/opt/cni" "$ROOTFS/opt/cni/bin"

bash scripts/oci-pack.sh "$ROOTFS" "$IMAGE_NAME" "$OUT" '["/usr/local/bin/node-agent"]' \
    '{"org.opencontainers.image.title":"meshcni node agent","org.opencontainers.image.description":"installs the istio-cni plugin (sidecar mode) on the node","org.opencontainers.image.licenses":"Apache-2.0"}'
echo "import:   ctr -n k8s.io image import $OUT"
