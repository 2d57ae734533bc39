#!/usr/bin/env bash
# Measures the node agent on a temp node layout (no cluster needed): how fast our entry is back after the primary
# CNI rewrites its conflist (half by rename, half in place), and the agent's memory (VmRSS/VmHWM from /proc).
#
#   scripts/bench-agent.sh                  # ROUNDS=100 rewrites, 300 ms apart (slower than the fight threshold)
#   AGENT_BIN=path/to/node-agent ROUNDS=300 scripts/bench-agent.sh
#   BENCH_DIR=/dev/shm scripts/bench-agent.sh   # node dirs on tmpfs: the agent's own latency, without the disk's
#                                               # fsync (each write is fsynced before its rename)
#
# Default binary: the static release build of scripts/build-image.sh, else target/release/node-agent (built when
# missing). Root is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if [ -z "${AGENT_BIN:-}" ]; then
    for c in "$TARGET_DIR/x86_64-unknown-linux-musl/release/node-agent" "$TARGET_DIR/release/node-agent"; do
        if [ -x "$c" ]; then AGENT_BIN=$c; break; fi
    done
fi
if [ -z "${AGENT_BIN:-}" ]; then
    cargo build --release -p node-agent --bin node-agent
    AGENT_BIN="$TARGET_DIR/release/node-agent"
fi
# The Istio corpus as the tests find it: MESHCNI_COMPAT_DIR (the istio dir or its parent), else beside the repo.
CORPUS=${MESHCNI_COMPAT_DIR:-$PWD/../shared/compat/istio}
[ -f "$CORPUS/capture-cases.json" ] || CORPUS="$CORPUS/istio"
export AGENT_BIN ROUNDS=${ROUNDS:-100} CORPUS BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}

exec python3 - <<'PY'
import json, os, signal, socket, subprocess, sys, tempfile, time

agent_bin, rounds, corpus = os.environ["AGENT_BIN"], int(os.environ["ROUNDS"]), os.environ["CORPUS"]
root = tempfile.mkdtemp(prefix="meshcni-bench-", dir=os.environ["BENCH_DIR"])
d = {k: os.path.join(root, v) for k, v in dict(conf="etc/cni/net.d", bin="opt/cni/bin", src="image/bin",
                                                run="var/run/istio-cni", sa="sa").items()}
for p in d.values():
    os.makedirs(p, exist_ok=True)
with open(os.path.join(d["src"], "istio-cni"), "wb") as f:
    f.write(b"#!/bin/sh\nexit 0\n")
os.chmod(os.path.join(d["src"], "istio-cni"), 0o755)
# kubelet's projected service-account layout
ts = os.path.join(d["sa"], "..2026_01_01_00_00_00.000000001")
os.makedirs(ts)
open(os.path.join(ts, "token"), "w").write("bench-token")
open(os.path.join(ts, "ca.crt"), "wb").write(open(os.path.join(corpus, "install/kube-ca.crt"), "rb").read())
os.symlink(os.path.basename(ts), os.path.join(d["sa"], "..data"))
for n in ("token", "ca.crt"):
    os.symlink("..data/" + n, os.path.join(d["sa"], n))
original = open(os.path.join(corpus, "install-e2e/pre/calico.conflist"), "rb").read()
path = os.path.join(d["conf"], "10-calico.conflist")
open(path, "wb").write(original)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

health, metrics = free_port(), free_port()
env = {"PATH": os.environ.get("PATH", ""), "MOUNTED_CNI_NET_DIR": d["conf"], "MOUNTED_CNI_BIN_DIR": d["bin"],
       "CNI_BINARIES_SOURCE_DIR": d["src"], "CNI_AGENT_RUN_DIR": d["run"], "SERVICE_ACCOUNT_DIR": d["sa"],
       "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "LOG_LEVEL": "warn",
       "HEALTH_PORT": str(health), "MONITORING_PORT": str(metrics), "BIND_ADDRESS": "127.0.0.1",
       # 10.96.0.1 is only a name in the kubeconfig: nothing may connect to it (the pod cache would, and so would
       # the shutdown's read of the DaemonSet).
       "POD_CACHE_ENABLED": "false", "REPAIR_ENABLED": "false", "DAEMONSET_NAME": ""}
log = open(os.path.join(root, "agent.log"), "wb")
agent = subprocess.Popen([agent_bin], env=env, stdout=log, stderr=log)

def get(port, p):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(f"GET {p} HTTP/1.0\r\n\r\n".encode()); data = b""
        while chunk := s.recv(65536): data += chunk
        return int(data.split()[1])
    except OSError:
        return None

def memory():
    fields = {}
    for line in open(f"/proc/{agent.pid}/status"):
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return fields["VmRSS"], fields["VmHWM"]

def has_entry():
    try:
        v = json.loads(open(path, "rb").read())
        return any(p.get("type") == "istio-cni" for p in v["plugins"])
    except (OSError, ValueError, KeyError):
        return False

try:
    deadline = time.monotonic() + 15
    while get(health, "/readyz") != 200:
        if time.monotonic() > deadline or agent.poll() is not None:
            sys.exit("agent not ready; see " + log.name)
        time.sleep(0.01)
    print(f"node dirs under {root} ({os.environ['BENCH_DIR']})")
    print(f"agent {agent_bin}: ready; memory at start VmRSS {memory()[0]}, VmHWM {memory()[1]}")
    delays = []
    for i in range(rounds):
        if i % 2 == 0:
            tmp = os.path.join(d["conf"], ".calico.new")
            open(tmp, "wb").write(original)
            t0 = time.perf_counter()
            os.rename(tmp, path)
        else:
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(original)
        while not has_entry():
            time.sleep(0.0001)
            if time.perf_counter() - t0 > 10:
                sys.exit(f"round {i}: entry not back after 10 s")
        delays.append(time.perf_counter() - t0)
        time.sleep(0.3)
    delays.sort()
    pct = lambda p: delays[min(len(delays) - 1, round((len(delays) - 1) * p))] * 1000
    print(f"flap: {rounds} rewrites (half rename, half in place): entry back after "
          f"p50 {pct(0.5):.2f} ms, p95 {pct(0.95):.2f} ms, p99 {pct(0.99):.2f} ms, max {delays[-1]*1000:.2f} ms")
    rss, hwm = memory()
    print(f"memory after the flap: VmRSS {rss}, VmHWM {hwm}")
    agent.send_signal(signal.SIGTERM)
    rc = agent.wait(timeout=15)
    clean = not any(p.get("type") == "istio-cni" for p in json.load(open(path))["plugins"])
    print(f"SIGTERM: exit {rc}, entry removed: {clean}")
    if rc != 0 or not clean:
        sys.exit(1)
finally:
    if agent.poll() is None:
        agent.kill()
    subprocess.run(["rm", "-rf", root])
PY
