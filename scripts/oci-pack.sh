#!/usr/bin/env bash
# Packs a root filesystem into a one-layer OCI image archive without Docker: a reproducible layer (sorted names,
# owner root, fixed times, gzip without name or time), the image config, the manifest and an OCI image layout
# (oci-layout, index.json, blobs/sha256/...; plus a docker-style manifest.json) in one tar that
# `ctr -n k8s.io image import` (containerd) and `docker load` accept. Used by scripts/build-image.sh (the agent)
# and scripts/e2e-node.sh (the real node's pause and test images).
#
#   scripts/oci-pack.sh ROOTFS IMAGE_NAME OUT.tar ENTRYPOINT_JSON [LABELS_JSON]
#     ENTRYPOINT_JSON: e.g. '["/usr/local/bin/node-agent"]'; LABELS_JSON: e.g. '{"org.opencontainers.image.title":"x"}'
set -euo pipefail

die() { echo "oci-pack: $*" >&2; exit 1; }
[ $# -ge 4 ] || die "usage: $0 ROOTFS IMAGE_NAME OUT.tar ENTRYPOINT_JSON [LABELS_JSON]"
ROOTFS=$1
IMAGE_NAME=$2
OUT=$3
ENTRYPOINT=$4
LABELS=${5:-"{}"}
[ -d "$ROOTFS" ] || die "$ROOTFS is not a directory"
case "$IMAGE_NAME" in *:*) ;; *) die "$IMAGE_NAME has no tag" ;; esac

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LAYOUT="$WORK/layout"
mkdir -p "$LAYOUT/blobs/sha256"

mapfile -t TOP < <(cd "$ROOTFS" && ls -A | LC_ALL=C sort)
[ "${#TOP[@]}" -gt 0 ] || die "$ROOTFS is empty"
tar --create --file "$WORK/layer.tar" --directory "$ROOTFS" \
    --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' --format=ustar \
    "${TOP[@]}"
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
\"config\":{\"Entrypoint\":$ENTRYPOINT,\"Env\":[\"PATH=/usr/local/bin:/usr/bin:/bin\"],\"Labels\":$LABELS},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$DIFF_ID\"]},\
\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"scripts/oci-pack.sh\"}]}" > "$WORK/config.json"
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
