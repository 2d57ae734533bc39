#!/usr/bin/env bash
# Builds the node agent's container image without Docker: static musl binaries of `node-agent` and `istio-cni`, one
# reproducible layer (/usr/local/bin/node-agent, /opt/cni/bin/istio-cni), and an OCI image layout (oci-layout,
# index.json, blobs/sha256/...; plus a docker-style manifest.json) packed into one tar that
# `ctr -n k8s.io image import` (containerd) accepts. daemonset/daemonset.yaml runs it by name.
#
#   scripts/build-image.sh [OUT.tar]        default OUT: $CARGO_TARGET_DIR (or target)/image/meshcni-node-agent.oci.tar
#   IMAGE_NAME=registry.example/meshcni/node-agent:dev scripts/build-image.sh
#   SKIP_BUILD=1 ...                        reuse binaries already built for the musl target
#
# Needs: the rustup target x86_64-unknown-linux-musl and musl-gcc (Debian: musl-tools; installed here when missing
# and running as root), GNU tar, gzip, sha256sum.
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
    # ring (rustls) compiles C: use musl's compiler for the target; link statically (the plugin runs on the host,
    # whatever its libc).
    CC_x86_64_unknown_linux_musl=musl-gcc \
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
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

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
LAYOUT="$WORK/layout"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/opt/cni/bin" "$LAYOUT/blobs/sha256"
install -s -m 0755 "$BIN_DIR/node-agent" "$ROOTFS/usr/local/bin/node-agent"
install -s -m 0755 "$BIN_DIR/istio-cni" "$ROOTFS/opt/cni/bin/istio-cni"
chmod 0755 "$ROOTFS/usr" "$ROOTFS/usr/local" "$ROOTFS/usr/local/bin" "$ROOTFS/opt" "$ROOTFS/opt/cni" "$ROOTFS/opt/cni/bin"

# A reproducible layer: sorted names, owner root, fixed times, no pax/atime noise; gzip without name or time.
tar --create --file "$WORK/layer.tar" --directory "$ROOTFS" \
    --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' --format=ustar \
    usr opt
gzip -n -9 < "$WORK/layer.tar" > "$WORK/layer.tar.gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
blob() { # copy a file into blobs/sha256/<digest>, print the digest
    local d
    d=$(sha "$1")
    cp "$1" "$LAYOUT/blobs/sha256/$d"
    echo "$d"
}

DIFF_ID=$(sha "$WORK/layer.tar")
LAYER=$(blob "$WORK/layer.tar.gz")
LAYER_SIZE=$(size "$WORK/layer.tar.gz")

printf '%s' "{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\",\
\"config\":{\"Entrypoint\":[\"/usr/local/bin/node-agent\"],\"Env\":[\"PATH=/usr/local/bin:/usr/bin:/bin\"],\
\"Labels\":{\"org.opencontainers.image.title\":\"meshcni node agent\",\
\"org.opencontainers.image.description\":\"installs the istio-cni plugin (sidecar mode) on the node\",\
\"org.opencontainers.image.licenses\":\"Apache-2.0\"}},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$DIFF_ID\"]},\
\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"scripts/build-image.sh\"}]}" > "$WORK/config.json"
CONFIG=$(blob "$WORK/config.json")
CONFIG_SIZE=$(size "$WORK/config.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$CONFIG\",\"size\":$CONFIG_SIZE},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$LAYER\",\"size\":$LAYER_SIZE}]}" \
    > "$WORK/manifest.json"
MANIFEST=$(blob "$WORK/manifest.json")
MANIFEST_SIZE=$(size "$WORK/manifest.json")

TAG=${IMAGE_NAME##*:}
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\
\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$MANIFEST\",\
\"size\":$MANIFEST_SIZE,\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\
\"annotations\":{\"io.containerd.image.name\":\"$IMAGE_NAME\",\"org.opencontainers.image.ref.name\":\"$TAG\"}}]}" \
    > "$LAYOUT/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$LAYOUT/oci-layout"
# For `docker load` as well.
printf '%s' "[{\"Config\":\"blobs/sha256/$CONFIG\",\"RepoTags\":[\"$IMAGE_NAME\"],\"Layers\":[\"blobs/sha256/$LAYER\"]}]" \
    > "$LAYOUT/manifest.json"

mkdir -p "$(dirname "$OUT")"
tar --create --file "$OUT" --directory "$LAYOUT" \
    --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' --format=ustar \
    oci-layout index.json manifest.json blobs

echo "image:    $IMAGE_NAME"
echo "manifest: sha256:$MANIFEST"
echo "archive:  $OUT ($(size "$OUT") bytes)"
echo "import:   ctr -n k8s.io image import $OUT"
