#!/usr/bin/env bash
# meshcni on a simulated node, end to end (root; a fresh Debian machine is enough):
#   a private "node" netns; an HTTPS API server stub inside it serving three pods; a primary conflist
#   (bridge + host-local); the node-agent installing istio-cni into that node's dirs; pods started through the real
#   CNI chain; then which pods got redirect rules, and a real connection captured by a stand-in sidecar.
# Everything lives in netns and temp dirs this script creates, and is torn down on exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }

say() { printf '%s\n' "$*"; }
step() { printf '\n\033[1m%s\033[0m\n' "$*"; }

if ! command -v iptables-nft-restore >/dev/null || [ ! -x /usr/lib/cni/bridge ] || ! command -v curl >/dev/null; then
  step "Installing the Debian packages the demo needs (iptables, iproute2, containernetworking-plugins, curl)"
  bash scripts/ci-deps.sh
fi
step "Building (release)"
cargo build --release --locked --workspace --bins 2>&1 | tail -1
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release

ID=$$
NODE=meshcni-demo-node-$ID
DEMO=$(mktemp -d /tmp/meshcni-demo.XXXXXX)
HOST=$DEMO/host
PODS=()
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  for n in "${PODS[@]}"; do ip netns del "$n" 2>/dev/null; done
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$DEMO"
}
trap cleanup EXIT
on_error() {
  say "demo.sh: failed at line $1; logs:"
  for f in "$DEMO"/*.log; do [ -s "$f" ] && { say "--- $f"; tail -20 "$f"; }; done
}
trap 'on_error $LINENO' ERR

step "1. A simulated node"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
mkdir -p "$HOST/etc/cni/net.d" "$HOST/opt/cni/bin" "$HOST/var/run/istio-cni" "$DEMO/src" "$DEMO/pods" "$DEMO/results"
for p in bridge host-local loopback; do ln -s "/usr/lib/cni/$p" "$HOST/opt/cni/bin/$p"; done
cp "$BIN/istio-cni" "$DEMO/src/istio-cni"
say "   node netns $NODE; host dirs under $HOST (etc/cni/net.d, opt/cni/bin, var/run/istio-cni)"

step "2. An API server (HTTPS stub) listening only inside the node, with three pods"
pod() { # namespace name injected(yes|no)
  if [ "$3" = yes ]; then
    cat > "$DEMO/pods/$1-$2.json" <<JSON
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$2","namespace":"$1",
 "annotations":{"sidecar.istio.io/status":"{\"containers\":[\"istio-proxy\"]}"}},
 "spec":{"containers":[{"name":"app","image":"app"},
  {"name":"istio-proxy","image":"proxyv2","args":["proxy","sidecar"],"securityContext":{"runAsUser":1337,"runAsGroup":1337}}]}}
JSON
  else
    cat > "$DEMO/pods/$1-$2.json" <<JSON
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$2","namespace":"$1"},"spec":{"containers":[{"name":"app","image":"app"}]}}
JSON
  fi
}
pod default web yes
pod default plain no
pod kube-system coredns yes
mkdir -p "$DEMO/sa"
TOKEN=demo-token-$ID
printf '%s' "$TOKEN" > "$DEMO/sa/token"
printf 'kube-system' > "$DEMO/sa/namespace"
"$BIN/meshcni-test-apiserver" --pods-dir "$DEMO/pods" --kubeconfig "$DEMO/stub-kubeconfig" --port 6443 \
  --token "$TOKEN" --ca-file "$DEMO/sa/ca.crt" --port-file "$DEMO/port" --netns "/run/netns/$NODE" \
  >"$DEMO/apiserver.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$DEMO/port" ] && break; sleep 0.05; done
[ -s "$DEMO/port" ] || { cat "$DEMO/apiserver.log"; exit 1; }
say "   https://127.0.0.1:6443 in the node netns: default/web (sidecar injected), default/plain (no sidecar),"
say "   kube-system/coredns (injected, but its namespace is excluded)"

step "3. The primary CNI configuration (what Calico/flannel/bridge would write)"
cat > "$HOST/etc/cni/net.d/10-bridge.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$DEMO/ipam"}}
  ]
}
JSON
cp "$HOST/etc/cni/net.d/10-bridge.conflist" "$DEMO/original.conflist"
say "   10-bridge.conflist: plugins = bridge (host-local IPAM)"

step "4. The node-agent installs istio-cni on the node"
ip netns exec "$NODE" env \
  MOUNTED_CNI_NET_DIR="$HOST/etc/cni/net.d" MOUNTED_CNI_BIN_DIR="$HOST/opt/cni/bin" \
  CNI_BINARIES_SOURCE_DIR="$DEMO/src" CNI_AGENT_RUN_DIR="$HOST/var/run/istio-cni" SERVICE_ACCOUNT_DIR="$DEMO/sa" \
  KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT=6443 EXCLUDE_NAMESPACES=kube-system \
  POD_NAMESPACE=kube-system HEALTH_PORT=8000 MONITORING_PORT=15014 BIND_ADDRESS=127.0.0.1 LOG_LEVEL=info \
  "$BIN/node-agent" >"$DEMO/agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
start=$(date +%s%N)
until ip netns exec "$NODE" curl -fs http://127.0.0.1:8000/readyz >/dev/null 2>&1; do
  kill -0 "$AGENT" 2>/dev/null || { say "agent exited:"; cat "$DEMO/agent.log"; exit 1; }
  [ $(( ($(date +%s%N) - start) / 1000000 )) -lt 10000 ] || { say "agent not ready after 10 s:"; cat "$DEMO/agent.log"; exit 1; }
  sleep 0.02
done
say "   ready after $(( ($(date +%s%N) - start) / 1000000 )) ms: /readyz answers 200"
say "   installed: $(ls "$HOST/opt/cni/bin" | tr '\n' ' ')"
say "   kubeconfig: $(ls "$HOST/var/run/istio-cni")"
say "   10-bridge.conflist plugins now: $(python3 -c 'import json,sys; print(" -> ".join(p["type"] for p in json.load(open(sys.argv[1]))["plugins"]))' "$HOST/etc/cni/net.d/10-bridge.conflist")"
say "   metric: $(ip netns exec "$NODE" curl -fs http://127.0.0.1:15014/metrics | grep -E '^istio_cni_install_ready' || true)"

step "5. Pods start through the real chain (the runtime runs every plugin inside the node)"
runtime() { # cmd namespace/name netns-name
  "$BIN/meshcni-runtime" "$1" --conf-dir "$HOST/etc/cni/net.d" --cni-path "$HOST/opt/cni/bin" \
    --netns "/run/netns/$3" --container-id "demo${3//-/}" --pod "$2" --node-netns "/run/netns/$NODE" \
    --result "$DEMO/results/$3.json" 2>>"$DEMO/runtime.log"
}
for p in default/web default/plain kube-system/coredns; do
  ns=meshcni-demo-${p//\//-}-$ID
  # The runtime creates the sandbox netns and brings its loopback up (containerd does), then runs the chain.
  ip netns add "$ns"; PODS+=("$ns"); ip -n "$ns" link set lo up
  result=$(runtime add "$p" "$ns")
  ip=$(printf '%s' "$result" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"])')
  rules=$( (ip netns exec "$ns" iptables-nft-save; ip netns exec "$ns" iptables-legacy-save) 2>/dev/null | grep -c -- '^-A .*ISTIO' || true)
  chains=$( (ip netns exec "$ns" iptables-nft-save; ip netns exec "$ns" iptables-legacy-save) 2>/dev/null | { grep -o '^:ISTIO_[A-Z_]*' || true; } | tr -d : | sort -u | tr '\n' ' ')
  if [ "$rules" -gt 0 ]; then
    printf '   %-22s got %s, redirect rules installed: %s rules in chains %s\n' "$p" "$ip" "$rules" "$chains"
  else
    printf '   %-22s got %s, no redirect rules\n' "$p" "$ip"
  fi
done

step "6. Real traffic: a stand-in sidecar on 15001/15006 in default/web, a service on the node at 10.88.0.1:8080"
WEB=meshcni-demo-default-web-$ID
PLAIN=meshcni-demo-default-plain-$ID
listen() { # netns addr name uid
  "$BIN/meshcni-netprobe" listen --netns "/run/netns/$1" --addr "$2" --name "$3" --uid "$4" --gid "$4" >"$DEMO/listen-$3" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q READY "$DEMO/listen-$3" 2>/dev/null && return; sleep 0.02; done
  cat "$DEMO/listen-$3"; exit 1
}
connect() { # netns addr uid
  "$BIN/meshcni-netprobe" connect --netns "/run/netns/$1" --addr "$2" --uid "$3" --gid "$3" --timeout-ms 3000
}
describe() { python3 -c '
import json,sys
r=json.loads(sys.stdin.read())
o=r.get("orig_dst")
print(("captured by the stand-in sidecar on %s, original destination %s" % (r["local"], o)) if r["name"].startswith("sidecar")
      else "reached %s directly (%s), no capture" % (r["name"], r["local"]))'; }
listen "$NODE" 10.88.0.1:8080 node-service 0
listen "$WEB" 0.0.0.0:15001 sidecar-outbound 1337
listen "$WEB" 0.0.0.0:15006 sidecar-inbound 1337
WEB_IP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ips"][0]["address"].split("/")[0])' "$DEMO/results/$WEB.json")
say "   default/web, the app (uid 1000) -> 10.88.0.1:8080:   $(connect "$WEB" 10.88.0.1:8080 1000 | describe)"
say "   default/web, the proxy (uid 1337) -> 10.88.0.1:8080: $(connect "$WEB" 10.88.0.1:8080 1337 | describe)"
say "   default/plain, the app -> 10.88.0.1:8080:             $(connect "$PLAIN" 10.88.0.1:8080 1000 | describe)"
say "   the node -> default/web $WEB_IP:9080 (inbound):     $(connect "$NODE" "$WEB_IP:9080" 0 | describe)"

step "7. Teardown"
for p in default/web default/plain kube-system/coredns; do
  runtime del "$p" "meshcni-demo-${p//\//-}-$ID" >/dev/null
done
say "   DEL ran for the three pods"
kill -TERM "$AGENT"
wait "$AGENT" && rc=0 || rc=$?
say "   node-agent stopped (SIGTERM, exit $rc): istio-cni binary $( [ -e "$HOST/opt/cni/bin/istio-cni" ] && echo 'still there!' || echo removed),"\
" kubeconfig $( [ -e "$HOST/var/run/istio-cni/istio-cni-kubeconfig" ] && echo 'still there!' || echo removed)"
if python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))==json.load(open(sys.argv[2])) else 1)' \
    "$HOST/etc/cni/net.d/10-bridge.conflist" "$DEMO/original.conflist"; then
  say "   10-bridge.conflist is back to the original (compared as JSON)"
else
  say "   10-bridge.conflist differs from the original:"; diff "$DEMO/original.conflist" "$HOST/etc/cni/net.d/10-bridge.conflist" || true
  exit 1
fi
say "   netns, processes and $DEMO are removed on exit"
