#!/usr/bin/env bash
# Checks that scripts/kustomize-subset.py refuses what it does not implement, naming the file and the field, instead
# of rendering it wrong; and that it merges a patch as kustomize does where that is not covered by the repair
# components (validate-manifests.sh compares those with kubectl kustomize when a components-aware one is there).
# Each case is a component applied to the real base daemonset/ through a temporary overlay.
#
#   scripts/test-kustomize-subset.sh        # run by scripts/validate-manifests.sh
set -euo pipefail

cd "$(dirname "$0")/.."
T=$(mktemp -d -p "$PWD" .test-kustomize-subset.XXXXXX)
trap 'rm -rf "$T"' EXIT
status=0
n=0

# case NAME EXPECTED: the component's kustomization.yaml on stdin; EXPECTED is what the error must say after the
# component file's path ("" = it must render).
case_() {
    local name=$1 expected=$2 dir="$T/$1"
    mkdir -p "$dir/overlay" "$dir/component"
    cat > "$dir/component/kustomization.yaml"
    printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" \
        "resources: [../../../daemonset]" "components: [../component]" > "$dir/overlay/kustomization.yaml"
    n=$((n + 1))
    if python3 scripts/kustomize-subset.py "$dir/overlay" > "$dir/out.yaml" 2> "$dir/err"; then
        if [ -n "$expected" ]; then
            echo "FAIL: kustomize-subset: $name: rendered, but must be refused with '$expected'" >&2
            status=1
        fi
        return 0
    fi
    if [ -z "$expected" ]; then
        echo "FAIL: kustomize-subset: $name: refused: $(cat "$dir/err")" >&2
        status=1
    elif ! grep -qF -- "$dir/component/kustomization.yaml: $expected" "$dir/err"; then
        echo "FAIL: kustomize-subset: $name: refused, but not with '<component>: $expected': $(cat "$dir/err")" >&2
        status=1
    fi
}

head='apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component'
ds_patch='  - target: {kind: DaemonSet, name: istio-cni-node}
    patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: istio-cni-node
      spec:
        template:
          spec:'

case_ unknown-field "patchesStrategicMerge: not supported" <<EOF
$head
patchesStrategicMerge: [daemonset.yaml]
EOF
case_ patch-file "patches[0].path: not supported" <<EOF
$head
patches:
  - path: daemonset.yaml
    target: {kind: DaemonSet, name: istio-cni-node}
EOF
case_ label-selector "patches[0].target: " <<EOF
$head
patches:
  - target: {kind: DaemonSet, labelSelector: "k8s-app=istio-cni-node"}
    patch: '{apiVersion: apps/v1, kind: DaemonSet, metadata: {name: istio-cni-node}, spec: {minReadySeconds: 1}}'
EOF
case_ no-match "patches[0].target: DaemonSet istio-cni matches no object" <<EOF
$head
patches:
  - target: {kind: DaemonSet, name: istio-cni}
    patch: '{apiVersion: apps/v1, kind: DaemonSet, metadata: {name: istio-cni}, spec: {minReadySeconds: 1}}'
EOF
case_ untargeted-merge "patches[0]: without a target only a whole-object" <<EOF
$head
patches:
  - patch: '{apiVersion: apps/v1, kind: DaemonSet, metadata: {name: istio-cni-node}, spec: {minReadySeconds: 1}}'
EOF
case_ unknown-list "patches[0].patch: spec.template.spec.containers[0].env: a list of DaemonSet" <<EOF
$head
patches:
$ds_patch
            containers:
              - name: install-cni
                env:
                  - {name: EXTRA, value: "1"}
EOF
case_ list-replace "patches[0].patch: spec.template.spec.volumes[0]: only \`\$patch: delete\`" <<EOF
$head
patches:
$ds_patch
            volumes:
              - name: cni-host-procfs
                \$patch: replace
EOF
case_ delete-missing "patches[0].patch: spec.template.spec.volumes[0]: \$patch: delete of name='host-sys'" <<EOF
$head
patches:
$ds_patch
            volumes:
              - name: host-sys
                \$patch: delete
EOF
case_ null-field "patches[0].patch: spec.template.spec.priorityClassName: null" <<EOF
$head
patches:
$ds_patch
            priorityClassName: null
EOF
case_ directive "patches[0].patch: spec.template.spec.\$retainKeys: patch directives" <<EOF
$head
patches:
$ds_patch
            \$retainKeys: [containers]
EOF
case_ json6902-replace "patches[0].patch[0]: only \`op: add\`" <<EOF
$head
patches:
  - target: {kind: ClusterRole, name: istio-cni-repair}
    patch: '[{op: replace, path: /rules/0/verbs, value: [create]}]'
EOF
case_ json6902-index "patches[0].patch[0].path: '/rules/0/verbs/-'" <<EOF
$head
patches:
  - target: {kind: ClusterRole, name: istio-cni-repair}
    patch: '[{op: add, path: /rules/0/verbs/-, value: delete}]'
EOF
case_ nested-resources "resources: not supported in a Component" <<EOF
$head
resources: [extra.yaml]
EOF

# What it must render, as kubectl kustomize (v5.5) does: list items merged by key into their entry, new ones added,
# `$patch: delete` ones removed, the result ordered as the patch's items then the others; capabilities replaced.
case_ merge "" <<EOF
$head
patches:
$ds_patch
            containers:
              - name: install-cni
                securityContext:
                  capabilities:
                    add: [DAC_OVERRIDE, NET_ADMIN]
                volumeMounts:
                  - {mountPath: /x, name: x}
                  - {mountPath: /var/run/istio-cni, \$patch: delete}
                  - {mountPath: /host/etc/cni/net.d, readOnly: true}
              - {name: second, image: localhost/second}
            volumes:
              - {name: cni-run-dir, \$patch: delete}
              - {name: extra, emptyDir: {}}
              - {name: cni-net-dir, hostPath: {path: /z}}
EOF
if [ -f "$T/merge/out.yaml" ] && ! python3 - "$T/merge/out.yaml" <<'PY'
import sys, yaml
ds = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
c = pod["containers"][0]
problems = []
def want(got, expected, what):
    if got != expected:
        problems.append(f"{what} {got}, expected {expected}")
want([c["name"] for c in pod["containers"]], ["install-cni", "second"], "containers")
want(pod["containers"][1], {"name": "second", "image": "localhost/second"}, "the new container")
want(c["securityContext"]["capabilities"], {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "NET_ADMIN"]}, "capabilities")
want([(m["mountPath"], m["name"], m.get("readOnly")) for m in c["volumeMounts"]],
     [("/x", "x", None), ("/host/etc/cni/net.d", "cni-net-dir", True), ("/host/opt/cni/bin", "cni-bin-dir", None),
      ("/host/proc", "cni-host-procfs", True), ("/tmp", "tmp", None)], "mounts")
want([v["name"] for v in pod["volumes"]], ["extra", "cni-net-dir", "cni-bin-dir", "cni-host-procfs", "tmp"],
     "volumes")
want(pod["volumes"][1], {"name": "cni-net-dir", "hostPath": {"path": "/z", "type": "DirectoryOrCreate"}},
     "the merged volume")
if problems:
    print("FAIL: kustomize-subset: merge: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
PY
then
    status=1
fi

if [ "$status" -eq 0 ]; then
    echo "ok: kustomize-subset: $n cases: it refuses what it does not implement, naming file and field, and merges as kustomize"
fi
exit $status
