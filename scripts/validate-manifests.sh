#!/usr/bin/env bash
# Validates every Kubernetes object of the kustomize base in daemonset/ offline, with `kubernetes-validate --strict`
# (PyPI; its schemas are bundled, so no network is needed once it is installed) against the Kubernetes versions in
# K8S_VERSIONS. kustomization.yaml itself is not a Kubernetes object: the files it lists are validated, and a
# manifest it does not list is an error (it would never be applied).
#
# Then the base and each repair component (daemonset/components/repair-*) are rendered through a temporary overlay,
# validated the same way, and checked for what each repair mode must and must not grant (RBAC verbs, capabilities,
# the host's /proc). Components need kustomize >= v3.7: a kubectl on PATH whose built-in kustomize is that recent
# renders them (it is authoritative), and scripts/kustomize-subset.py must then render the same objects. Without
# one (Debian's kubernetes-client is kubectl 1.20 with kustomize v2.0.3), scripts/kustomize-subset.py renders
# them: it implements only what the components use and refuses anything else. scripts/test-kustomize-subset.sh
# checks those refusals.
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
RENDER=$(mktemp -d -p "$PWD" .validate-manifests.XXXXXX)
trap 'rm -rf "$RENDER"' EXIT

# Whether `kubectl kustomize` knows components: by the kustomize version kubectl prints (from kubectl 1.24), else
# (kubectl 1.20 embeds v2.0.3, 1.21-1.23 v4) by rendering a probe component and seeing its patch applied.
kubectl_has_components() {
    command -v kubectl >/dev/null 2>&1 || return 1
    local v major minor
    v=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}\([0-9]*\)\.\([0-9]*\).*$/\1 \2/p')
    if [ -n "$v" ]; then
        read -r major minor <<<"$v"
        [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 7 ]; }
        return
    fi
    mkdir -p "$RENDER/probe/overlay" "$RENDER/probe/component"
    printf '%s\n' "apiVersion: v1" "kind: ConfigMap" "metadata: {name: probe}" "data: {probe: base}" \
        > "$RENDER/probe/overlay/configmap.yaml"
    printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" \
        "resources: [configmap.yaml]" "components: [../component]" > "$RENDER/probe/overlay/kustomization.yaml"
    printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1alpha1" "kind: Component" "patches:" \
        "  - target: {kind: ConfigMap, name: probe}" \
        "    patch: '{apiVersion: v1, kind: ConfigMap, metadata: {name: probe}, data: {probe: component}}'" \
        > "$RENDER/probe/component/kustomization.yaml"
    kubectl kustomize "$RENDER/probe/overlay" 2>/dev/null | grep -qx '  probe: component'
}
if kubectl_has_components; then
    renderer=kubectl
else
    renderer=subset
    echo "no kubectl with a components-aware kustomize (>= v3.7) on PATH: rendering with scripts/kustomize-subset.py" >&2
fi
if ! bash scripts/test-kustomize-subset.sh; then
    status=1
fi
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
    if [ "$renderer" = kubectl ]; then
        if ! kubectl kustomize "$RENDER/$mode" > "$RENDER/$mode.yaml"; then
            echo "FAIL: $mode: kubectl kustomize failed" >&2
            status=1
            continue
        fi
        # The fallback must render what kustomize renders, object for object.
        if ! python3 scripts/kustomize-subset.py "$RENDER/$mode" > "$RENDER/$mode.subset.yaml"; then
            echo "FAIL: $mode: scripts/kustomize-subset.py failed where kubectl kustomize renders" >&2
            status=1
        elif ! python3 - "$mode" "$RENDER/$mode.yaml" "$RENDER/$mode.subset.yaml" <<'PY'
import sys, yaml
mode, rendered_by_kubectl, rendered_by_subset = sys.argv[1], sys.argv[2], sys.argv[3]
def objects(path):
    out = {}
    for d in yaml.safe_load_all(open(path)):
        if d:
            key = (d["apiVersion"], d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
            out.setdefault(key, []).append(d)
    return out
k, s = objects(rendered_by_kubectl), objects(rendered_by_subset)
diff = [" ".join(x for x in key if x) for key in sorted(set(k) | set(s)) if k.get(key) != s.get(key)]
if diff:
    print(f"FAIL: {mode}: scripts/kustomize-subset.py and kubectl kustomize render differently: {'; '.join(diff)}",
          file=sys.stderr)
    sys.exit(1)
print(f"ok: {mode}: scripts/kustomize-subset.py renders the same {sum(map(len, k.values()))} objects as kubectl kustomize")
PY
        then
            status=1
        fi
    elif ! python3 scripts/kustomize-subset.py "$RENDER/$mode" > "$RENDER/$mode.yaml"; then
        echo "FAIL: $mode: scripts/kustomize-subset.py failed" >&2
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
sc = c["securityContext"]
caps = set(sc["capabilities"]["add"])
want(sc.get("privileged") is False, "privileged: false")
want(sc.get("allowPrivilegeEscalation") is (None if mode == "repair" else False),
     "allowPrivilegeEscalation: false but beside the repair's SYS_ADMIN")
want(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
want(sc["capabilities"].get("drop") == ["ALL"], "capabilities: drop ALL")
want(not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), "no host namespaces")
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
# What the agent writes: the host's CNI bin and conf dirs, its run dir (kubeconfig, sockets), and, for the in-place
# repair only, /tmp: scratch for the image's iptables (their lock is the pod's netns file), a small memory emptyDir.
WRITABLE = {"/host/opt/cni/bin", "/host/etc/cni/net.d", "/var/run/istio-cni"}
volumes = {v["name"]: v for v in pod.get("volumes", [])}
if mode == "repair":
    tmp = volumes.get(mounts.get("/tmp", {}).get("name"), {}).get("emptyDir")
    want(tmp is not None and tmp.get("medium") == "Memory" and tmp.get("sizeLimit") == "1Mi",
         "the in-place repair's /tmp: a 1Mi memory emptyDir")
    WRITABLE = WRITABLE | {"/tmp"}
else:
    want("/tmp" not in mounts, "no /tmp without the in-place repair")
want(all(m.get("readOnly") is True for p, m in mounts.items() if p not in WRITABLE), "read-only mounts but the host dirs it writes")
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
want(("/tmp" in mounts) == in_place, "the /tmp mount (the in-place repair's scratch)")
want(("tmp" in volumes) == in_place, "the tmp volume")
expect = {
    "repair": {"create events"},
    "repair-delete": {"create events", "delete pods"},
    "repair-label": {"create events", "patch pods/status"},
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
want([(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in main["rules"]]
     == [([""], ["pods"], ["get", "list", "watch"])], "the main role: get, list, watch of pods only")
# The shutdown's read of the agent's own DaemonSet: one namespaced rule, `get` of that one name, bound to the
# DaemonSet's service account, and the name the agent is told to read.
ds_name, ds_ns = ds["metadata"]["name"], ds["metadata"]["namespace"]
shutdown = docs.get(("Role", "istio-cni-shutdown"))
want(shutdown is not None and shutdown["metadata"].get("namespace") == ds_ns, f"the shutdown Role in {ds_ns}")
want(shutdown is not None and shutdown["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                                                      "resourceNames": [ds_name], "verbs": ["get"]}],
     f"the shutdown Role grants exactly get daemonsets/{ds_name}")
binding = docs.get(("RoleBinding", "istio-cni-shutdown"))
want(binding is not None and binding["metadata"].get("namespace") == ds_ns
     and binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "istio-cni-shutdown"}
     and binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": ds_ns}],
     "the shutdown RoleBinding binds that Role to the DaemonSet's service account")
want(data.get("DAEMONSET_NAME") == ds_name, f"DAEMONSET_NAME {data.get('DAEMONSET_NAME')!r} names the DaemonSet {ds_name!r}")
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
