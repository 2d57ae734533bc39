# A rollout restart of the agent on the real node (issue 10: no bypass window during a restart or an upgrade).
# Sourced by scripts/e2e-node.sh after the benchmark pods and before check 5 (whose `kubectl delete` of the
# DaemonSet then proves that the agent the restart brought still uninstalls cleanly). Uses the script's helpers and
# variables: KUBECTL, pod_yaml, pod_ready, pod_ip, connect, field, istio_rules, check_installed, agent_pod,
# wait_for, pass, fail, say, step, ms_since, PIDS, PRIMARY, WORK, TARGET_IP, AGENT_SEL.
#
# During `kubectl -n kube-system rollout restart daemonset/istio-cni-node` (kubelet 1.20: the old pod goes before
# the new one is made, no surge):
#   - a watcher polls the conflist, the binary and the kubeconfig every 10 ms: none may ever be missing;
#   - an injected pod (with istio-validation, which exits 126 when the pod's traffic is not redirected) is started
#     every ~0.5 s until the new agent is Ready, and 4 more after: each must end Running with Istio rules in its
#     netns and its app's traffic captured, possibly after the plugin refused its sandbox first (counted), never
#     Running (nor even past istio-validation) without rules;
#   - three pods started before the restart are deleted during it: each deletion completes (kubelet's DEL found
#     the binary), and containerd logged no failed network teardown;
#   - the old agent's log says why it left the plugin in place, and the new agent is installed and ready.

ROLL_PODS_AFTER_READY=4
ROLL_LIMIT_S=120

roll_agent_pods() { # name=ready of every agent pod, one per line
    KUBECTL -n kube-system get pod -l "$AGENT_SEL" \
        -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
        2>/dev/null || true
}
roll_new_agent_ready() { roll_agent_pods | grep -v "^$ROLL_OLD=" | grep -q '=True$'; }
roll_refusals() { # pod: FailedCreatePodSandBox events of default/POD
    KUBECTL -n default get events --field-selector "involvedObject.name=$1,reason=FailedCreatePodSandBox" \
        -o name 2>/dev/null | grep -c . || true
}
roll_init_126() { # pod: whether istio-validation ever exited 126 (the pod started without redirection)
    KUBECTL -n default get pod "$1" \
        -o jsonpath='{.status.initContainerStatuses[0].lastState.terminated.exitCode} {.status.initContainerStatuses[0].state.terminated.exitCode}' \
        2>/dev/null | grep -qw 126
}
roll_destroy_failures() { # containerd's failed network teardowns so far
    grep -c 'failed to destroy network for sandbox' "$WORK/logs/containerd.log" 2>/dev/null || true
}

step "9. kubectl rollout restart of the DaemonSet: no bypass window, DEL works throughout (issue 10)"
ROLL_OLD=$(agent_pod)
ROLL_DELETE=(rdel-1 rdel-2 rdel-3)
for p in "${ROLL_DELETE[@]}"; do pod_yaml "$p" default injected | KUBECTL apply -f - >/dev/null; done
for p in "${ROLL_DELETE[@]}"; do
    wait_for 90 "pod default/$p Ready" pod_ready default "$p" || fail "default/$p did not start before the restart"
done
ROLL_DESTROY_BEFORE=$(roll_destroy_failures)

# The watcher: on the host (the node's dirs are $WORK/node), ends on SIGTERM, when this script is gone, or after
# 10 minutes; its PID is in PIDS, so the teardown ends it too.
python3 - "$PRIMARY" "$WORK/node/cni/bin/istio-cni" "$WORK/node/istio-cni/istio-cni-kubeconfig" \
    "$WORK/rollout-watch" "$$" <<'PY' &
import json, os, signal, sys, time
conf, binary, kubeconfig, out, parent = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
counts = {"samples": 0, "entry": 0, "binary": 0, "kubeconfig": 0}
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
deadline = time.monotonic() + 600
while not stop and time.monotonic() < deadline and os.getppid() == parent:
    counts["samples"] += 1
    try:
        with open(conf) as f:
            plugins = json.load(f)["plugins"]
        if not plugins or plugins[-1].get("type") != "istio-cni":
            counts["entry"] += 1
    except (OSError, ValueError, KeyError, TypeError):
        counts["entry"] += 1
    if not os.access(binary, os.X_OK):
        counts["binary"] += 1
    if not os.path.isfile(kubeconfig):
        counts["kubeconfig"] += 1
    time.sleep(0.01)
with open(out + ".tmp", "w") as f:
    f.write("%(samples)d %(entry)d %(binary)d %(kubeconfig)d\n" % counts)
os.rename(out + ".tmp", out)
PY
ROLL_WATCH=$!
PIDS+=("$ROLL_WATCH")
# The old agent's log, streamed until its container ends (its pod, and with it the log, is gone after).
KUBECTL -n kube-system logs -f "$ROLL_OLD" > "$WORK/logs/agent-before-restart.log" 2>&1 &
ROLL_LOGS=$!
sleep 0.3

ROLL_T0=$(date +%s%N)
KUBECTL -n kube-system rollout restart daemonset/istio-cni-node >/dev/null
ROLL_N=0
ROLL_AFTER=0
ROLL_READY_MS=""
ROLL_DEL_PIDS=()
while [ "$ROLL_AFTER" -lt "$ROLL_PODS_AFTER_READY" ]; do
    if [ "$(ms_since "$ROLL_T0")" -gt $((ROLL_LIMIT_S * 1000)) ]; then
        fail "the new agent was not Ready ${ROLL_LIMIT_S} s after the rollout restart: $(roll_agent_pods | tr '\n' ' ')"
        break
    fi
    ROLL_N=$((ROLL_N + 1))
    pod_yaml "roll-$ROLL_N" default injected | KUBECTL apply -f - >/dev/null
    # The pods to delete go one by one, early in the window.
    k=$(( (ROLL_N + 1) / 2 ))
    if [ $((ROLL_N % 2)) = 1 ] && [ "$k" -le "${#ROLL_DELETE[@]}" ]; then
        p=${ROLL_DELETE[$((k - 1))]}
        ( t=$(date +%s%N)
          KUBECTL -n default delete pod "$p" --wait=true --timeout=60s >/dev/null 2>&1
          echo "$? $(ms_since "$t")" > "$WORK/rollout-del-$p" ) &
        ROLL_DEL_PIDS+=($!)
    fi
    if [ -n "$ROLL_READY_MS" ]; then
        ROLL_AFTER=$((ROLL_AFTER + 1))
    elif roll_new_agent_ready; then
        ROLL_READY_MS=$(ms_since "$ROLL_T0")
        say "   the new agent is Ready ${ROLL_READY_MS} ms after the rollout restart ($ROLL_N pods started so far)"
    fi
    sleep 0.5
done

# Every pod started during the restart: Running and redirected (maybe after a refusal), never without rules. One
# deadline for all of them; a pod whose istio-validation exited 126 is done at once (it stays unredirected).
roll_settled() { pod_ready default "$1" || roll_init_126 "$1"; }
ROLL_REDIRECTED=0
ROLL_REFUSED=0
ROLL_BAD=()
ROLL_WAIT_END=$(( $(date +%s) + ROLL_LIMIT_S ))
for i in $(seq "$ROLL_N"); do
    p=roll-$i
    left=$(( ROLL_WAIT_END - $(date +%s) ))
    [ "$left" -ge 1 ] || left=1
    if ! wait_for "$left" "pod default/$p Ready" roll_settled "$p"; then
        ROLL_BAD+=("$p: not Ready ($(KUBECTL -n default get pod "$p" -o jsonpath='{.status.phase}' 2>/dev/null))")
        continue
    fi
    if roll_init_126 "$p"; then
        ROLL_BAD+=("$p: istio-validation exited 126 (started without redirection)")
        continue
    fi
    ip=$(pod_ip default "$p")
    n=$(istio_rules "$ip")
    if [ "$n" = no-netns ] || [ "$n" -eq 0 ]; then
        ROLL_BAD+=("$p: Running without Istio rules ($n)")
        continue
    fi
    r=$(connect default "$p" app "$TARGET_IP:9080")
    if [ "$(printf '%s' "$r" | field name)" != outbound ] || [ "$(printf '%s' "$r" | field orig_dst)" != "$TARGET_IP:9080" ]; then
        ROLL_BAD+=("$p: the app's traffic is not captured: $r")
        continue
    fi
    ROLL_REDIRECTED=$((ROLL_REDIRECTED + 1))
    [ "$(roll_refusals "$p")" -gt 0 ] && ROLL_REFUSED=$((ROLL_REFUSED + 1))
done
if [ "${#ROLL_BAD[@]}" -eq 0 ] && [ "$ROLL_N" -gt "$ROLL_PODS_AFTER_READY" ]; then
    pass "$ROLL_N injected pods started during the restart: all Running, with Istio rules and the app's traffic captured ($ROLL_REFUSED of them refused by the plugin first, then redirected)"
else
    fail "pods started during the restart ($ROLL_N): ${ROLL_BAD[*]:-too few to cover the window}"
fi

for pid in "${ROLL_DEL_PIDS[@]}"; do wait "$pid" || true; done
for p in "${ROLL_DELETE[@]}"; do
    if read -r rc took < "$WORK/rollout-del-$p" 2>/dev/null && [ "$rc" = 0 ]; then
        pass "default/$p, deleted during the restart, is gone after ${took} ms (kubelet's DEL found the plugin)"
    else
        fail "default/$p, deleted during the restart, did not go: $(cat "$WORK/rollout-del-$p" 2>/dev/null || echo 'no result')"
    fi
done
n=$(( $(roll_destroy_failures) - ROLL_DESTROY_BEFORE ))
[ "$n" = 0 ] && pass "containerd logged no failed network teardown during the restart" \
    || fail "containerd logged $n failed network teardown(s) during the restart (failed to destroy network for sandbox)"

kill -TERM "$ROLL_WATCH" 2>/dev/null || true
wait_for 10 "the watcher's counts" test -s "$WORK/rollout-watch" || true
if read -r samples no_entry no_bin no_kc < "$WORK/rollout-watch" 2>/dev/null && [ "$samples" -gt 100 ]; then
    if [ "$no_entry" = 0 ] && [ "$no_bin" = 0 ] && [ "$no_kc" = 0 ]; then
        pass "during the restart the entry, the binary and the kubeconfig were never missing ($samples samples, 10 ms apart)"
    else
        fail "during the restart, missing in $samples samples: entry $no_entry, binary $no_bin, kubeconfig $no_kc"
    fi
else
    fail "the watcher of the node's files gave no counts: $(cat "$WORK/rollout-watch" 2>/dev/null)"
fi

# The old agent said why it left everything in place, and removed nothing.
wait_for 30 "the old agent's log stream to end" bash -c "! kill -0 $ROLL_LOGS 2>/dev/null" || kill "$ROLL_LOGS" 2>/dev/null || true
old_log=$WORK/logs/agent-before-restart.log
if grep -q 'the DaemonSet is still there: a restart or an upgrade' "$old_log" && grep -q 'left in place for the next agent' "$old_log" \
    && ! grep -q 'removed istio-cni from the CNI configuration' "$old_log"; then
    pass "the old agent $ROLL_OLD read its DaemonSet and left the plugin in place: $(grep -o 'answer=[^ ]* attempts=[0-9]* millis=[0-9]*' "$old_log" | head -1)"
else
    fail "the old agent $ROLL_OLD did not leave the plugin in place as a restart: $(grep -E 'DaemonSet|left in place|removed|cleanup' "$old_log" | tail -5 | cut -c1-300)"
fi
ROLL_NEW=$(agent_pod)
[ -n "$ROLL_NEW" ] && [ "$ROLL_NEW" != "$ROLL_OLD" ] && pass "the restart replaced $ROLL_OLD with $ROLL_NEW" \
    || fail "no new agent pod after the restart (still $ROLL_NEW)"
check_installed
say "   restart: $ROLL_N pods started, new agent Ready after ${ROLL_READY_MS:-?} ms, $ROLL_REFUSED refused first"
KUBECTL -n default delete pod $(for i in $(seq "$ROLL_N"); do printf 'roll-%s ' "$i"; done) \
    --wait=true --timeout=120s >/dev/null 2>&1 || true

# The whole uninstall, last (called by scripts/e2e-node.sh before its summary): `kubectl delete -k` removes the
# service account, the roles and the DaemonSet in one go, in kubectl's order, while the agent asks about its
# DaemonSet. Whatever it sees (404, 401 once its account is gone, 403 first if the role goes first), the node must
# end clean.
rollout_uninstall_all() {
    local pod log types
    step "9b. kubectl delete -k tests/e2e/overlay: the whole uninstall leaves the node clean"
    pod=$(agent_pod)
    log=$WORK/logs/agent-uninstall.log
    KUBECTL -n kube-system logs -f "$pod" > "$log" 2>&1 &
    sleep 0.3
    KUBECTL delete -k "$REPO/tests/e2e/overlay" --wait=true > "$WORK/logs/delete-k.log" 2>&1 \
        || { fail "kubectl delete -k failed: $(tail -3 "$WORK/logs/delete-k.log")"; return; }
    if wait_pod_gone "$pod"; then
        types=$(conflist_types)
        if [ "$types" = bridge ] && [ ! -e "$WORK/node/cni/bin/istio-cni" ] && [ ! -e "$WORK/node/istio-cni/istio-cni-kubeconfig" ]; then
            pass "after kubectl delete -k: no entry ($types), no binary, no kubeconfig; the agent saw: $(grep -o 'answer=.* attempts=[0-9]*' "$log" | head -1)"
        else
            fail "after kubectl delete -k: conflist plugins '$types', binary $([ -e "$WORK/node/cni/bin/istio-cni" ] && echo present || echo gone), kubeconfig $([ -e "$WORK/node/istio-cni/istio-cni-kubeconfig" ] && echo present || echo gone); agent: $(grep -E 'answer=|left in place|cleanup' "$log" | tail -3 | cut -c1-300)"
        fi
    else
        fail "after kubectl delete -k the agent pod $pod did not go"
    fi
}
