#!/usr/bin/env bash
# Validates every Kubernetes object of the kustomize base in daemonset/ offline, with `kubernetes-validate --strict`
# (PyPI; its schemas are bundled, so no network is needed once it is installed) against the Kubernetes versions in
# K8S_VERSIONS. kustomization.yaml itself is not a Kubernetes object: the files it lists are validated, and a
# manifest it does not list is an error (it would never be applied).
#
# Then the base and each repair component (daemonset/components/repair-*) are rendered with `kubectl kustomize`
# (needed: kubectl with its built-in kustomize) through a temporary overlay, validated the same way, and checked for
# what each repair mode must and must not grant (RBAC verbs, capabilities, the host's /proc).
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
# The repair modes: render base + component, validate, check the privileges each one grants.
if ! command -v kubectl >/dev/null 2>&1; then
    echo "FAIL: kubectl (with its built-in kustomize) is needed to render daemonset/components/*" >&2
    exit 1
fi
RENDER=$(mktemp -d -p "$PWD" .validate-manifests.XXXXXX)
trap 'rm -rf "$RENDER"' EXIT
modes=(repair)
for c in "$DIR"/components/repair-*/; do
    modes+=("$(basename "$c")")
done
for mode in "${modes[@]}"; do
    mkdir -p "$RENDER/$mode"
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources: [../../$DIR]"
        [ "$mode" = repair ] || echo "components: [../../$DIR/components/$mode]"
    } > "$RENDER/$mode/kustomization.yaml"
    if ! kubectl kustomize "$RENDER/$mode" > "$RENDER/$mode.yaml"; then
        echo "FAIL: $mode: kubectl kustomize failed" >&2
        status=1
        continue
    fi
    for v in $K8S_VERSIONS; do
        if ! python3 -m kubernetes_validate --strict --quiet -k "$v" "$RENDER/$mode.yaml"; then
            echo "FAIL: $mode: the rendered manifests do not validate against Kubernetes $v" >&2
            status=1
        fi
    done
    if ! python3 - "$mode" "$RENDER/$mode.yaml" <<'PY'
import sys, yaml
mode, path = sys.argv[1], sys.argv[2]
docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(path)) if d}
problems = []
def want(cond, what):
    if not cond:
        problems.append(what)
ds = docs[("DaemonSet", "istio-cni-node")]
pod = ds["spec"]["template"]["spec"]
c = next(c for c in pod["containers"] if c["name"] == "install-cni")
caps = set(c["securityContext"]["capabilities"]["add"])
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
volumes = {v["name"] for v in pod.get("volumes", [])}
data = docs[("ConfigMap", "istio-cni-config")]["data"]
role = docs.get(("ClusterRole", "istio-cni-repair"))
grants = set()
for r in (role or {}).get("rules", []):
    for res in r["resources"]:
        for verb in r["verbs"]:
            grants.add(f"{verb} {res}")
repair_only = {"SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "NET_RAW"}
in_place = mode == "repair"
want(caps == ({"DAC_OVERRIDE"} | (repair_only if in_place else set())), f"capabilities {sorted(caps)}")
want(("/host/proc" in mounts) == in_place, "the /host/proc mount")
want(not in_place or mounts["/host/proc"].get("readOnly") is True, "/host/proc read-only")
want(("cni-host-procfs" in volumes) == in_place, "the host /proc volume")
expect = {
    "repair": {"create events", "patch events"},
    "repair-delete": {"create events", "patch events", "delete pods"},
    "repair-label": {"create events", "patch events", "patch pods/status"},
    "repair-off": set(),
}[mode]
want(grants == expect, f"repair RBAC {sorted(grants)}")
want((role is None) == (mode == "repair-off"), "the repair ClusterRole")
want((("ClusterRoleBinding", "istio-cni-repair") in docs) == (mode != "repair-off"), "the repair binding")
switches = (data["REPAIR_ENABLED"], data["REPAIR_REPAIR_PODS"], data["REPAIR_DELETE_PODS"], data["REPAIR_LABEL_PODS"])
want(switches == {
    "repair": ("true", "true", "false", "false"),
    "repair-delete": ("true", "false", "true", "false"),
    "repair-label": ("true", "false", "false", "true"),
    "repair-off": ("false", "false", "false", "false"),
}[mode], f"REPAIR_* switches {switches}")
main = docs[("ClusterRole", "istio-cni")]
want(all(set(r["verbs"]) <= {"get", "list", "watch"} for r in main["rules"]), "the main role only reads")
if problems:
    print(f"FAIL: {mode}: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"ok: {mode}: {len(docs)} objects render, validate and grant only what the mode needs")
PY
    then
        status=1
    fi
done
exit $status
