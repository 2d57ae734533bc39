#!/usr/bin/env bash
# Validates every Kubernetes object of the kustomize base in daemonset/ offline, with `kubernetes-validate --strict`
# (PyPI; its schemas are bundled, so no network is needed once it is installed) against the Kubernetes versions in
# K8S_VERSIONS. kustomization.yaml itself is not a Kubernetes object: the files it lists are validated, and a
# manifest it does not list is an error (it would never be applied).
#
#   scripts/validate-manifests.sh            # installs kubernetes-validate with pip when missing
#   K8S_VERSIONS="1.33.0" scripts/validate-manifests.sh
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=daemonset
K8S_VERSIONS=${K8S_VERSIONS:-"1.33.0 1.37.0"}

# Run as a module: a pip install under pyenv has no shim for the new command until `pyenv rehash`.
if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
    echo "installing kubernetes-validate (pip)" >&2
    python3 -m pip install --quiet kubernetes-validate
fi

# The resources listed in kustomization.yaml (the `resources:` block, one `- file` per line).
mapfile -t listed < <(awk '
    /^resources:/ { inres = 1; next }
    inres && /^[^ #-]/ { inres = 0 }
    inres && /^[[:space:]]*-[[:space:]]/ { sub(/^[[:space:]]*-[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print }
' "$DIR/kustomization.yaml")
if [ "${#listed[@]}" -eq 0 ]; then
    echo "FAIL: $DIR/kustomization.yaml lists no resources" >&2
    exit 1
fi

status=0
files=()
for f in "${listed[@]}"; do
    if [ ! -f "$DIR/$f" ]; then
        echo "FAIL: $DIR/kustomization.yaml lists $f, which does not exist" >&2
        status=1
        continue
    fi
    files+=("$DIR/$f")
done
for f in "$DIR"/*.yaml; do
    base=$(basename "$f")
    [ "$base" = kustomization.yaml ] && continue
    if ! printf '%s\n' "${listed[@]}" | grep -qxF "$base"; then
        echo "FAIL: $f is not listed in $DIR/kustomization.yaml" >&2
        status=1
    fi
done

# The DaemonSet must run the image scripts/build-image.sh builds.
image_built=$(sed -n 's/^IMAGE_NAME_DEFAULT="\(.*\)"$/\1/p' scripts/build-image.sh)
image_used=$(sed -n 's/^[[:space:]]*image:[[:space:]]*\([^[:space:]]*\).*$/\1/p' "$DIR/daemonset.yaml")
if [ -n "$image_built" ] && [ "$image_built" != "$image_used" ]; then
    echo "FAIL: daemonset.yaml runs image '$image_used' but scripts/build-image.sh builds '$image_built'" >&2
    status=1
fi

for v in $K8S_VERSIONS; do
    if ! python3 -m kubernetes_validate --strict --quiet -k "$v" "${files[@]}"; then
        echo "FAIL: manifests do not validate against Kubernetes $v" >&2
        status=1
    else
        echo "ok: ${#files[@]} manifests validate (--strict) against Kubernetes $v"
    fi
done
exit $status
