#!/usr/bin/env bash
# Regenerates the committed seed corpus, fuzz/corpus/<target>/, from Istio's golden inputs (shared/compat/istio,
# or $MESHCNI_COMPAT_DIR) and the inputs of our own tests. Offline; needs python3. CI does not run it: it runs the
# committed files (scripts/fuzz.sh). Run it after changing an input format, then commit the corpus.
set -euo pipefail
cd "$(dirname "$0")"
compat=${MESHCNI_COMPAT_DIR:-}
if [ -z "$compat" ]; then
  for d in ../../shared/compat/istio ../shared/compat/istio; do
    [ -f "$d/capture-cases.json" ] && compat=$d && break
  done
fi
[ -f "$compat/capture-cases.json" ] || compat="$compat/istio"
[ -f "$compat/capture-cases.json" ] || { echo "fuzz/seed.sh: no Istio corpus (set MESHCNI_COMPAT_DIR)" >&2; exit 1; }
rm -rf corpus
mkdir -p corpus
python3 - "$compat" <<'PY'
import json, os, sys

compat = sys.argv[1]
def read(rel):
    with open(os.path.join(compat, rel), "rb") as f:
        return f.read()

def put(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def dumps(v):
    return json.dumps(v, separators=(",", ":"), sort_keys=True)

# --- cni_request: environment lines, NUL, stdin (our plugin_protocol and cni unit test inputs) ---
add_env = {
    "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u",
}
v1_result = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0},
            {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 0}, {"address": "10.2.0.5/16"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"]}, "x-extra": {"kept": True},
}
v03_result = {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
              "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0}],
              "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
legacy_result = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
                 "ip6": {"ip": "fd00::5/64"}, "dns": {}}
entry = json.loads(read("install/istio-cni.conf"))
def request(env, stdin):
    return ("\n".join(f"{k}={v}" for k, v in env.items()) + "\n").encode() + b"\0" + stdin
for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]:
    conf = dict(entry, cniVersion=v, name="k8s-pod-network")
    put("cni_request", f"add-{v}", request(add_env, dumps(conf).encode()))
for name, prev in [("v1", v1_result), ("v03", v03_result), ("legacy", legacy_result)]:
    conf = dict(entry, cniVersion=prev["cniVersion"], name="k8s-pod-network", prevResult=prev)
    put("cni_request", f"add-prev-{name}", request(add_env, dumps(conf).encode()))
del_env = dict(add_env, CNI_COMMAND="DEL", CNI_NETNS="")
put("cni_request", "del-no-netns", request(del_env, dumps(dict(entry, cniVersion="1.0.0", name="n")).encode()))
put("cni_request", "check", request(dict(add_env, CNI_COMMAND="CHECK"), dumps(dict(entry, cniVersion="0.4.0", name="n")).encode()))
put("cni_request", "status", request({"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, b'{"cniVersion":"1.1.0","name":"n","type":"istio-cni"}'))
put("cni_request", "version", request({"CNI_COMMAND": "VERSION"}, b""))
put("cni_request", "bad-id", request(dict(add_env, CNI_CONTAINERID="-x"), b'{"cniVersion":"1.0.0","name":"n"}'))
put("cni_request", "bad-args", request(dict(add_env, CNI_ARGS="K8S_POD_NAME"), b'{"cniVersion":"1.0.0","name":"n"}'))
put("cni_request", "bad-version", request(add_env, b'{"cniVersion":"0.5.0","name":"n"}'))

# --- plugin_config: conflist entries (Istio's install inputs, our config unit tests) ---
put("plugin_config", "istio-cni.conf", read("install/istio-cni.conf"))
put("plugin_config", "istio-cni-prefixed.conf", read("install/istio-cni-prefixed.conf"))
for f in ["list.conflist.golden", "list-with-istio.conflist.golden", "bridge.conf.golden"]:
    plugins = json.loads(read("install/" + f))["plugins"]
    put("plugin_config", f + ".entry", dumps(plugins[-1]))
for i, c in enumerate([
    {"cniVersion": "0.3.1", "name": "k8s-pod-network", "type": "istio-cni", "plugin_log_level": "debug",
     "cni_agent_run_dir": "/tmp/run", "exclude_namespaces": ["istio-system", "kube-system"], "pod_namespace": "istio-system",
     "native_nftables": False, "enablement_selectors": [{"podSelector": {}}], "some_future_key": {"ignored": True}},
    {"type": "istio-cni", "log_level": "warn", "cni_agent_run_dir": "/tmp/run", "exclude_namespaces": ["a"],
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig", "cni_bin_dir": "/opt/cni/bin", "exclude_namespaces": ["a", "b"]}},
    {"type": "istio-cni", "native_nftables": True}, {"iptables_backend": "legacy", "pod_lookup_timeout_seconds": 5},
    {"iptables_backend": "nft", "native_nftables": True}, {"plugin_log_level": "loud"},
]):
    put("plugin_config", f"unit-{i}", dumps(c))

# --- pod_redirect: Istio's plugin cases (plugin/cases.json) as pod lines, and the decision table's pods ---
def pod_lines(annotations=(), env=(), uid=None, gid=None, containers=("test", "istio-proxy", "istio-validate"),
              init=(), args=("proxy", "sidecar"), labels=(), ipv6=False):
    esc = lambda s: s.replace("\\", "\\\\").replace("\n", "\\n")
    out = ["6"] if ipv6 else []
    out += [f"a {k}={esc(v)}" for k, v in annotations]
    out += [f"l {k}={esc(v)}" for k, v in labels]
    out += [f"c {c}" for c in containers] + [f"i {c}" for c in init]
    out += [f"e {k}={esc(v)}" for k, v in env] + [f"p {a}" for a in args]
    if uid is not None:
        out.append(f"u {uid}")
    if gid is not None:
        out.append(f"g {gid}")
    return "\n".join(out) + "\n"
for case in json.loads(read("plugin/cases.json"))["cases"]:
    put("pod_redirect", case["name"], pod_lines(
        annotations=case.get("annotations", {}).items(), env=case.get("proxy_env", {}).items(),
        uid=case.get("run_as_user"), gid=case.get("run_as_group")))
status = ("sidecar.istio.io/status", "{}")
put("pod_redirect", "ipv6-dual", pod_lines([status], env=[("ISTIO_DUAL_STACK", "true"), ("ISTIO_META_DNS_CAPTURE", "true")], ipv6=True))
put("pod_redirect", "istio-init", pod_lines([status], init=["istio-init"]))
put("pod_redirect", "native-sidecar", pod_lines([status], containers=["app"], init=["istio-proxy"]))
put("pod_redirect", "router", pod_lines([status], args=("proxy", "router")))
put("pod_redirect", "inject-false", pod_lines([status, ("sidecar.istio.io/inject", "false")], labels=[("sidecar.istio.io/inject", "true")]))
put("pod_redirect", "disable-envoy", pod_lines([status], env=[("DISABLE_ENVOY", "true")]))
put("pod_redirect", "bad-ports", pod_lines([status, ("traffic.sidecar.istio.io/excludeOutboundPorts", "0100"),
                                            ("traffic.sidecar.istio.io/includeInboundPorts", "*")]))
put("pod_redirect", "everything", pod_lines([status,
    ("sidecar.istio.io/interceptionMode", "TPROXY"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8,fd00::/8"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.1.0.0/16,::1/128"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "80,443"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", " 8080 "),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "3306"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "15020,9090"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth1, net2"),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", "vnet0")],
    env=[("INVALID_DROP", "true"), ("ISTIO_META_DNS_CAPTURE", "true"), ("ISTIO_DUAL_STACK", "true")],
    uid=1000670000, gid=7, ipv6=True))

# --- prev_result: a version byte, then a prevResult (our cni unit test results) ---
for i, prev in enumerate([v1_result, v03_result, legacy_result,
                          {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "version": "6"}]}]):
    for pick in range(7):
        put("prev_result", f"r{i}-to{pick}", bytes([pick]) + dumps(prev).encode())

# --- conflist_edit: Istio's install and install-e2e inputs and goldens ---
for d in ["install", "install-e2e/pre", "install-e2e/expected"]:
    for f in sorted(os.listdir(os.path.join(compat, d))):
        if f.endswith((".conf", ".conflist", ".golden", ".expected", ".clean", "istioconfig")) and "kubeconfig" not in f.lower():
            put("conflist_edit", d.replace("/", "-") + "-" + f, read(os.path.join(d, f)))

# --- kubeconfig: protocol, host, port, trust, token (Istio's kubeconfig goldens' inputs) ---
ca, token = read("install/kube-ca.crt"), read("install/token-foo").strip()
for name, host, trust in [("tls", "10.96.0.1", ca), ("skip-tls", "10.96.0.1", b"skip"), ("newhost", "50.76.2.1", ca),
                          ("ipv6", "fd00::1", b"skip"), ("bracketed", "[fd00::1]", ca)]:
    put("kubeconfig", name, b"\0".join([b"https", host.encode(), b"443", trust, token]))
for i, t in enumerate(["true", "123", "tok\n", "", "a: b", "-x", "abc.def-ghi_j"]):
    put("kubeconfig", f"token-{i}", b"\0".join([b"https", b"h", b"6443", b"skip", t.encode()]))

# --- nftables_render: Istio's capture cases (capture-cases.json), base + overrides, one per file ---
cases = json.loads(read("capture-cases.json"))
for case in cases["cases"]:
    put("nftables_render", case["name"], dumps(dict(cases["base"], **case["overrides"])))

# --- agent_socket: scripts of our pod-cache and socket tests ---
scripts = {
    "answers-from-the-cache": "ask ns a\ninit\nlist ns a u1 injected\ndone\nask ns a\nask ns a u1\nask ns b\nraw garbage\nraw {\"v\":2,\"namespace\":\"ns\",\"name\":\"a\"}\n",
    "uid-mismatch": "init\ndone\napply default web-0 old injected\nask default web-0 new\ndelete default web-0 older\nask default web-0 old\n",
    "relist": "init\nlist ns a u1\ndone\nunsync\nask ns a\ninit\nlist ns b u2 injected\ndone\nask ns a\nask ns b u2\n",
    "late-delete": "init\ndone\napply ns a u1\napply ns a u2 injected\ndelete ns a u1\nask ns a u2\ndelete ns a -\nask ns a\n",
    "raw-requests": "init\nlist ns a u1 injected\ndone\nraw {\"v\":1,\"namespace\":\"ns\",\"name\":\"a\"}\nraw {\"v\":1,\"namespace\":\"ns\",\"name\":\"a\",\"x\":1}\nraw {\"v\":1.0,\"namespace\":\"ns\",\"name\":\"a\"}\nraw {\"v\":1,\"name\":\"a\"}\n",
    "replies": "reply {\"v\":1,\"status\":\"hit\",\"uid\":\"u\",\"pod\":{\"containers\":[],\"labels\":{},\"annotations\":{},\"proxy_type\":null,\"proxy_env\":{},\"proxy_uid\":null,\"proxy_gid\":null}}\nreply {\"v\":1,\"status\":\"miss\"}\nreply {\"v\":1,\"status\":\"unsynced\"}\nreply {\"v\":2,\"status\":\"hit\"}\nreply {\"v\":1,\"status\":\"hit\",\"uid\":\"other\",\"pod\":{}}\nreply garbage\n",
}
for name, text in scripts.items():
    put("agent_socket", name, text)

# --- what the fuzzers found (each also has a regression unit test in its crate) ---
put("kubeconfig", "found-empty-ca", b"\0".join([b"https", b"10.96.0.1", b"443", b"", token]))
put("kubeconfig", "found-del-in-token", b"\0".join([b"https", b"h", b"443", b"skip", b"a\x7fb\xc2\x85c"]))
put("nftables_render", "found-v6-dns-without-ipv6",
    dumps(dict(cases["base"], redirect_dns=True, dns_servers_v6=["fd00::53"], enable_ipv6=False)))
put("prev_result", "found-legacy-top-level-routes",
    bytes([5]) + dumps({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16"}, "routes": {"dst": "0.0.0.0/0"}}).encode())
long_number = "9999099999999999999" + "0" * 91
put("cni_request", "found-long-float", request(add_env, (
    '{"cniVersion":"1.0.0","name":"n","type":"istio-cni","enablement_selectors":[' + long_number + ']}').encode()))
put("conflist_edit", "found-float-mtu", b'{"cniVersion":"0.3.1","name":"n","plugins":[{"type":"bridge","mtu":14.0}]}')
PY
for d in corpus/*/; do echo "$(basename "$d"): $(ls "$d" | wc -l) seeds"; done
