# The repair controller on the real node, in each of its modes (issue 9). Sourced by scripts/e2e-node.sh once the
# node runs the agent (it uses that script's helpers and state: KUBECTL, NET, pass/fail, pod_yaml, istio_rules,
# check_captured, agent_pod, TARGET_IP...); leaves the agent running as tests/e2e/overlay deploys it.
#
# First the overlay variants the node applies (kustomize v2 syntax: kubectl 1.20 knows no components) are checked
# against the base with its components (daemonset/components/repair-*, rendered by scripts/kustomize-subset.py):
# same repair settings, RBAC, capabilities and mounts. Then, for each mode (delete, label, repair in place):
#   - the agent is removed (the node's conflist is back to the primary CNI alone);
#   - an injected pod with the istio-validation init container starts (delete: owned by a ReplicaSet, which
#     recreates it) and its validation fails with 126 (not redirected);
#   - the agent is deployed in that mode and must
#       delete: delete the pod, whose replacement starts redirected (validation passes at once, rules, capture);
#       label:  label it cni.istio.io/uninitialized=true;
#       repair: program the rules into the running pod's netns; its validation passes on its next restart, the
#               pod runs, and its app's traffic is captured;
#   - in every mode: one Event on the pod (reason, source cni-repair), istio_cni_repair_pods_repaired_total
#     {type=<mode>,result="success"} 1 and no other result on /metrics, and still exactly once after the pod
#     changed again (label: after its next failed restart).
# The repair mode runs last, with tests/e2e/overlay itself: the agent is left as the rest of the script expects.

REPAIR_LABEL_KEY=cni.istio.io/uninitialized

step "8a. Repair: the real node's overlay variants grant what the base's components grant"
repair_render_subset() { # out component...: the base with these components, by scripts/kustomize-subset.py
    local out=$1 dir c
    shift
    dir=$(mktemp -d "$WORK/kustomize.XXXXXX")
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources: [$REPO/daemonset]"
        [ $# -gt 0 ] && echo "components: [$(for c in "$@"; do printf '%s,' "$REPO/daemonset/components/$c"; done | sed 's/,$//')]"
    } > "$dir/kustomization.yaml"
    python3 "$REPO/scripts/kustomize-subset.py" "$dir" > "$out"
}
for mode in repair repair-delete repair-label; do
    variant=$REPO/tests/e2e/$mode
    [ "$mode" = repair ] && variant=$REPO/tests/e2e/overlay
    if ! "$KBIN/kubectl" kustomize "$variant" > "$WORK/$mode.node.yaml" 2> "$WORK/logs/kustomize-$mode.log"; then
        fail "repair: kubectl $("$KBIN/kubectl" version --client --short 2>/dev/null) cannot render ${variant#"$REPO"/}: $(cat "$WORK/logs/kustomize-$mode.log")"
        continue
    fi
    components=()
    [ "$mode" = repair ] || components=("$mode")
    if ! repair_render_subset "$WORK/$mode.base.yaml" "${components[@]}" 2> "$WORK/logs/kustomize-$mode.log"; then
        fail "repair: scripts/kustomize-subset.py cannot render the base with ${components[*]:-no component}: $(cat "$WORK/logs/kustomize-$mode.log")"
        continue
    fi
    if diff=$(python3 - "$WORK/$mode.node.yaml" "$WORK/$mode.base.yaml" <<'PY'
import sys, yaml

def facts(path):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(path)) if d}
    pod = docs[("DaemonSet", "istio-cni-node")]["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "install-cni")
    data = docs[("ConfigMap", "istio-cni-config")]["data"]
    role = docs.get(("ClusterRole", "istio-cni-repair"), {})
    return {
        "settings": {k: v for k, v in sorted(data.items()) if k.startswith("REPAIR_")},
        "capabilities": sorted(c["securityContext"]["capabilities"]["add"]),
        "mounts": sorted(m["name"] for m in c.get("volumeMounts", [])),
        "volumes": sorted(v["name"] for v in pod.get("volumes", [])),
        "repair RBAC": sorted(f"{verb} {res}" for r in role.get("rules", []) for res in r["resources"]
                              for verb in r["verbs"]),
        "repair binding": ("ClusterRoleBinding", "istio-cni-repair") in docs,
    }

node, base = facts(sys.argv[1]), facts(sys.argv[2])
diff = [f"{k}: {node[k]} on the node, {base[k]} in the base" for k in node if node[k] != base[k]]
print("; ".join(diff) if diff else f"{base['repair RBAC']}, capabilities {base['capabilities']}")
sys.exit(1 if diff else 0)
PY
    ); then
        pass "repair: ${variant#"$REPO"/} (kubectl 1.20) = the base${components:+ with components/${components[*]}}: $diff"
    else
        fail "repair: ${variant#"$REPO"/} differs from the base${components:+ with components/${components[*]}}: $diff"
    fi
done

# --- helpers --------------------------------------------------------------------------------------------------
repair_remove_agent() { # the DaemonSet deleted, its pod gone, the conflist back to the primary CNI alone
    local pod
    pod=$(agent_pod || true)
    KUBECTL -n kube-system delete daemonset istio-cni-node --wait=true >/dev/null 2>&1 || true
    repair_conflist_plain() { [ "$(conflist_types)" = bridge ]; }
    { [ -z "$pod" ] || wait_pod_gone "$pod"; } && wait_for 30 "the conflist without istio-cni" repair_conflist_plain
}
repair_deploy() { # kustomize dir: applied, the agent Ready
    KUBECTL apply -k "$1" > "$WORK/logs/apply-repair.log" 2>&1 || { cat "$WORK/logs/apply-repair.log"; return 1; }
    wait_for 120 "istio-cni-node Ready (${1#"$REPO"/})" agent_ready
}
repair_pod_field() { KUBECTL -n default get pod "$1" -o jsonpath="$2" 2>/dev/null || true; }
repair_last_exit() { repair_pod_field "$1" '{.status.initContainerStatuses[0].lastState.terminated.exitCode}'; }
repair_failed_126() { [ "$(repair_last_exit "$1")" = 126 ]; }
repair_uid() { repair_pod_field "$1" '{.metadata.uid}'; }
repair_events() { # uid reason -> "component count" per Event
    KUBECTL -n default get events --field-selector "involvedObject.uid=$1,reason=$2" \
        -o jsonpath='{range .items[*]}{.source.component} {.count}{"\n"}{end}' 2>/dev/null
}
repair_has_event() { [ -n "$(repair_events "$1" "$2")" ]; }
repair_metrics() { # the agent's istio_cni_repair_pods_repaired_total lines
    local ip
    ip=$(pod_ip kube-system "$(agent_pod)")
    NET curl -fsS "http://$ip:15014/metrics" | grep '^istio_cni_repair_pods_repaired_total' || true
}
repair_once() { # label uid reason type: one Event from cni-repair, count 1; the metric 1 for success, nothing else
    local label=$1 uid=$2 reason=$3 type=$4 events metrics want
    events=$(repair_events "$uid" "$reason")
    metrics=$(repair_metrics)
    want="istio_cni_repair_pods_repaired_total{type=\"$type\",result=\"success\"} 1"
    if [ "$events" = "cni-repair 1" ]; then
        pass "$label: one $reason Event on the pod, from cni-repair"
    else
        fail "$label: $reason Events on the pod (component count): '${events//$'\n'/; }', expected 'cni-repair 1'"
    fi
    if [ "$metrics" = "$want" ]; then
        pass "$label: /metrics: $metrics (and no other result)"
    else
        fail "$label: /metrics: '${metrics//$'\n'/; }', expected only '$want'"
    fi
}
repair_wait_broken() { # pod: its istio-validation last terminated with 126, and its netns has no rules
    local n
    wait_for 60 "the validation of default/$1 to fail" repair_failed_126 "$1" || return 1
    n=$(istio_rules "$(pod_ip default "$1")")
    [ "$n" = 0 ] || { say "default/$1 has $n ISTIO rules before the agent runs"; return 1; }
}
repair_rs_pod() { # replicaset: the name of its pod that is not being deleted
    KUBECTL -n default get pod -l "app=$1" \
        -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}' 2>/dev/null \
        | awk 'NF == 1 {print $1; exit}'
}
# label dir make find: the agent removed, the workload made (`make`), its pod (the name `find` prints) broken,
# then the agent deployed from the kustomization `dir`. Sets POD and POD_UID; false, with the failure counted,
# when a step fails.
repair_start() {
    local label=$1 dir=$2 make=$3 find=$4
    POD=""
    POD_UID=""
    repair_remove_agent || { fail "$label: the agent did not go away"; return 1; }
    "$make"
    repair_found() { POD=$("$find"); [ -n "$POD" ]; }
    if ! wait_for 60 "the pod of $label" repair_found || ! repair_wait_broken "$POD"; then
        fail "$label: default/${POD:-?} did not fail its validation with 126 without the plugin"
        return 1
    fi
    POD_UID=$(repair_uid "$POD")
    pass "$label: default/$POD, started without the plugin: istio-validation exited 126, no rules"
    REPAIR_T0=$(date +%s%N)
    repair_deploy "$dir" && return 0
    fail "$label: the agent did not become Ready: $(KUBECTL -n kube-system describe pod -l "$AGENT_SEL" | tail -10)"
    return 1
}
repair_captured() { # label pod: the app's connection to the target pod is captured
    if [ -n "${TARGET_IP:-}" ]; then
        check_captured "$1" default "$2" "$TARGET_IP"
    else
        fail "$1: no target pod to connect to (section 2 did not start default/target)"
    fi
}
repair_make_pod() { pod_yaml "$NAME" default injected | KUBECTL apply -f - >/dev/null; }
repair_name() { echo "$NAME"; }
repair_took() { echo "$(( $(ms_since "$REPAIR_T0") / 100 ))" | sed 's/\(.\)$/.\1/;s/^\./0./'; } # s since kubectl apply

# --- delete ---------------------------------------------------------------------------------------------------
step "8b. Repair mode delete (tests/e2e/repair-delete): a broken pod of a ReplicaSet is recreated redirected"
NAME=repair-del
repair_make_rs() { # a ReplicaSet of one pod, pod_yaml's
    pod_yaml "$NAME" default injected | python3 -c '
import json, sys, yaml
pod = yaml.safe_load(sys.stdin)
meta = pod["metadata"]
print(json.dumps({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                  "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": meta["name"]}},
                           "template": {"metadata": {"labels": meta["labels"], "annotations": meta["annotations"]},
                                        "spec": pod["spec"]}}}))' | KUBECTL apply -f - >/dev/null
}
repair_rs_of_name() { repair_rs_pod "$NAME"; }
if repair_start "repair delete" "$REPO/tests/e2e/repair-delete" repair_make_rs repair_rs_of_name; then
    OLD=$POD
    repair_old_gone() { [ "$(repair_uid "$OLD")" != "$POD_UID" ]; }
    repair_new_ready() { local p; p=$(repair_rs_pod "$NAME"); [ -n "$p" ] && [ "$p" != "$OLD" ] && pod_ready default "$p"; }
    if wait_for 60 "default/$OLD to be deleted" repair_old_gone; then
        say "   default/$OLD deleted $(repair_took) s after kubectl apply"
    fi
    if [ "$(repair_uid "$OLD")" != "$POD_UID" ] && wait_for 90 "its replacement Ready" repair_new_ready; then
        NEW=$(repair_rs_pod "$NAME")
        say "   its replacement Ready $(repair_took) s after kubectl apply"
        restarts=$(repair_pod_field "$NEW" '{.status.initContainerStatuses[0].restartCount}')
        code=$(repair_pod_field "$NEW" '{.status.initContainerStatuses[0].state.terminated.exitCode}')
        n=$(istio_rules "$(pod_ip default "$NEW")")
        if [ "$restarts" = 0 ] && [ "$code" = 0 ] && [ "$n" -gt 0 ] 2>/dev/null; then
            pass "repair delete: default/$OLD deleted; its replacement default/$NEW started redirected (istio-validation exited 0 at its first run, $n ISTIO rules)"
        else
            fail "repair delete: replacement default/$NEW: validation restarts $restarts, exit code '$code', $n ISTIO rules"
        fi
        repair_captured "repair delete: default/$NEW" "$NEW"
        sleep 3
        repair_once "repair delete" "$POD_UID" DeleteBrokenPod delete
    else
        fail "repair delete: default/$OLD was not replaced by a Ready pod: $(KUBECTL -n default get pods -l "app=$NAME" -o wide 2>&1 | tail -3)"
    fi
fi
KUBECTL -n default delete replicaset "$NAME" --wait=true --timeout=60s >/dev/null 2>&1 || true

# --- label ----------------------------------------------------------------------------------------------------
step "8c. Repair mode label (tests/e2e/repair-label): a broken pod gets $REPAIR_LABEL_KEY=true, once"
NAME=repair-lbl
if repair_start "repair label" "$REPO/tests/e2e/repair-label" repair_make_pod repair_name; then
    repair_labelled() { [ "$(repair_pod_field "$POD" "{.metadata.labels.${REPAIR_LABEL_KEY//./\\.}}")" = true ]; }
    if wait_for 60 "the label $REPAIR_LABEL_KEY on default/$POD" repair_labelled; then
        pass "repair label: default/$POD carries $REPAIR_LABEL_KEY=true ($(repair_took) s after kubectl apply)"
        # Once: after its next failed restart (a new pod event the controller sees), nothing more.
        finished=$(repair_pod_field "$POD" '{.status.initContainerStatuses[0].lastState.terminated.finishedAt}')
        repair_failed_again() {
            local f
            f=$(repair_pod_field "$POD" '{.status.initContainerStatuses[0].lastState.terminated.finishedAt}')
            [ -n "$f" ] && [ "$f" != "$finished" ]
        }
        if wait_for 90 "default/$POD to fail its validation again" repair_failed_again; then
            sleep 2
            repair_once "repair label (after another failed restart)" "$POD_UID" LabelBrokenPod label
        else
            fail "repair label: default/$POD did not restart its validation within 90 s"
        fi
    else
        fail "repair label: default/$POD has no label $REPAIR_LABEL_KEY=true: $(repair_pod_field "$POD" '{.metadata.labels}')"
    fi
fi
KUBECTL -n default delete pod "$POD" --wait=true --timeout=60s >/dev/null 2>&1 || true

# --- repair in place --------------------------------------------------------------------------------------------
step "8d. Repair mode repair (tests/e2e/overlay, the base's default): a broken pod is repaired in place"
NAME=repair-fix
if repair_start "repair" "$REPO/tests/e2e/overlay" repair_make_pod repair_name; then
    host=$(KUBECTL -n kube-system logs "$(agent_pod)" 2>/dev/null | grep -m1 'host network namespace established' || true)
    if [ -n "$host" ]; then
        pass "repair: the agent established the host's netns: $(printf '%s' "$host" | grep -o 'by=.*' | cut -c1-160)"
    else
        fail "repair: the agent did not establish the host's netns: $(KUBECTL -n kube-system logs "$(agent_pod)" 2>&1 | grep -i -m2 'repair' | cut -c1-300)"
    fi
    if wait_for 60 "a RepairBrokenPod Event on default/$POD" repair_has_event "$POD_UID" RepairBrokenPod; then
        msg=$(KUBECTL -n default get events --field-selector "involvedObject.uid=$POD_UID,reason=RepairBrokenPod" \
            -o jsonpath='{.items[0].message}')
        n=$(istio_rules "$(pod_ip default "$POD")")
        if [ "$n" -gt 0 ] 2>/dev/null && printf '%s' "$msg" | grep -q 'repaired: rules programmed with'; then
            pass "repair: $n ISTIO rules in the running pod's netns ($(repair_took) s after kubectl apply); event: $msg"
        else
            fail "repair: $n ISTIO rules in default/$POD's netns; event: $msg"
        fi
        # The crash-looping validation's next run passes: the pod starts.
        if wait_for 120 "default/$POD Ready" pod_ready default "$POD"; then
            restarts=$(repair_pod_field "$POD" '{.status.initContainerStatuses[0].restartCount}')
            code=$(repair_pod_field "$POD" '{.status.initContainerStatuses[0].state.terminated.exitCode}')
            phase=$(repair_pod_field "$POD" '{.status.phase}')
            if [ "$code" = 0 ] && [ "$phase" = Running ] && [ "${restarts:-0}" -ge 1 ]; then
                pass "repair: istio-validation of default/$POD passed on its restart $restarts (exit 0); the pod is $phase ($(repair_took) s after kubectl apply)"
            else
                fail "repair: default/$POD: validation exit '$code' after $restarts restarts, phase $phase"
            fi
            repair_captured "repair: default/$POD" "$POD"
            sleep 3
            repair_once "repair (the pod running)" "$POD_UID" RepairBrokenPod repair
        else
            fail "repair: default/$POD did not become Ready: $(KUBECTL -n default describe pod "$POD" | tail -8)"
        fi
    else
        fail "repair: no RepairBrokenPod Event on default/$POD: $(KUBECTL -n kube-system logs "$(agent_pod)" 2>&1 | grep -i 'repair' | tail -3 | cut -c1-400)"
    fi
fi
KUBECTL -n default delete pod "$POD" --wait=true --timeout=60s >/dev/null 2>&1 || true
