//! The plugin in a real CNI chain, as a runtime runs it: a private "node" netns where the runtime (and so every
//! plugin process) runs, the API stub listening only on that node's loopback, and the conflist
//! bridge + host-local (Debian's containernetworking-plugins) + istio-cni, for ADD, CHECK and DEL, in two CNI
//! versions. Then real traffic from the pod to the node's bridge address.

use std::net::{IpAddr, SocketAddr};

use meshcni_tests::apiserver::{sample_pod, ApiServer};
use meshcni_tests::chain::{make_cni_bin_dir, Attachment, Runtime};
use meshcni_tests::netns::{require_root, TestNetns};
use meshcni_tests::netprobe;
use meshcni_tests::tempdir::TempDir;
use meshcni_tests::traffic::{assert_landed, As, ListenOpts};
use serde_json::{json, Value};

struct Node {
    ns: TestNetns,
    srv: ApiServer,
    runtime: Runtime,
    _tmp: TempDir,
}

const BRIDGE_IP: &str = "10.88.0.1";

fn node(tag: &str, cni_version: &str) -> Node {
    require_root();
    let ns = TestNetns::new(&format!("node-{tag}"));
    let srv = ApiServer::builder()
        .netns(ns.path())
        .start()
        .expect("API stub in the node netns");
    let tmp = TempDir::new(&format!("chain-{tag}"));
    let run_dir = tmp.0.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    srv.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"))
        .unwrap();
    let bin_dir = make_cni_bin_dir(&tmp.0.join("bin")).unwrap();
    let conflist = json!({
        "cniVersion": cni_version,
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16", "gateway": BRIDGE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": tmp.0.join("ipam")}},
            {"type": "istio-cni", "name": "istio-cni", "cni_agent_run_dir": run_dir,
             "plugin_log_level": "debug", "exclude_namespaces": ["kube-system"], "pod_namespace": "istio-system"}
        ]
    });
    Node {
        runtime: Runtime {
            conflist,
            cni_path: vec![bin_dir],
            node_netns: Some(ns.path().to_path_buf()),
        },
        ns,
        srv,
        _tmp: tmp,
    }
}

fn attachment(pod_ns: &TestNetns, namespace: &str, name: &str) -> Attachment {
    Attachment {
        container_id: format!("ctr{}", pod_ns.name().replace('-', "")),
        netns: pod_ns.path().display().to_string(),
        ifname: "eth0".into(),
        cni_args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=x"
        ),
    }
}

/// The pod's address from the final result, and that result's shape.
fn pod_ip(result: &Value, version: &str) -> IpAddr {
    assert_eq!(result["cniVersion"], version, "{result}");
    let ip = &result["ips"][0];
    if version.starts_with("0.") {
        assert_eq!(
            ip["version"], "4",
            "0.x results keep ips[].version: {result}"
        );
    } else {
        assert!(ip.get("version").is_none(), "{result}");
    }
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names.contains(&"cni0") && names.contains(&"eth0"),
        "{result}"
    );
    ip["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn istio_rules(pod: &TestNetns) -> String {
    let mut out = String::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        out.push_str(&pod.must(save, &[]));
    }
    out.lines()
        .filter(|l| l.contains("ISTIO"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn plain_pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn run_chain(version: &str) {
    let node = node(&version.replace('.', ""), version);
    let probe = netprobe!();
    node.srv.add_pod(sample_pod("default", "web")).unwrap();
    node.srv.add_pod(plain_pod("default", "plain")).unwrap();

    let web = TestNetns::new("chain-web");
    let plain = TestNetns::new("chain-plain");
    let system = TestNetns::new("chain-sys");
    let att_web = attachment(&web, "default", "web");
    let att_plain = attachment(&plain, "default", "plain");
    let att_sys = attachment(&system, "kube-system", "coredns");

    let r_web = node
        .runtime
        .add(&att_web)
        .unwrap_or_else(|e| panic!("ADD web: {e}"));
    let r_plain = node
        .runtime
        .add(&att_plain)
        .unwrap_or_else(|e| panic!("ADD plain: {e}"));
    let r_sys = node
        .runtime
        .add(&att_sys)
        .unwrap_or_else(|e| panic!("ADD kube-system: {e}"));
    let web_ip = pod_ip(&r_web, version);
    pod_ip(&r_plain, version);
    pod_ip(&r_sys, version);
    // The address in the result is the one on the pod's eth0: the result was passed through, not invented.
    assert!(web
        .ip(&["addr", "show", "dev", "eth0"])
        .contains(&format!("{web_ip}/16")));

    // Exactly one lookup per non-excluded pod; none for the excluded namespace.
    assert_eq!(node.srv.pod_requests("default", "web"), 1);
    assert_eq!(node.srv.pod_requests("default", "plain"), 1);
    assert_eq!(node.srv.pod_requests("kube-system", "coredns"), 0);

    assert!(
        istio_rules(&web).contains("ISTIO_REDIRECT"),
        "web has no redirect rules"
    );
    assert_eq!(istio_rules(&plain), "", "a plain pod got rules");
    assert_eq!(istio_rules(&system), "", "an excluded pod got rules");
    assert_eq!(istio_rules(&node.ns), "", "the node netns got rules");

    // Real traffic: the app in the injected pod calling the node's bridge address lands on its sidecar's 15001 with
    // the original destination; the plain pod reaches the node.
    let bridge: IpAddr = BRIDGE_IP.parse().unwrap();
    let _node_l = probe.listen(&node.ns, "node", sa(bridge, 8080), ListenOpts::root());
    let _out_l = probe.listen(
        &web,
        "outbound",
        sa("0.0.0.0".parse().unwrap(), 15001),
        ListenOpts::user(1337),
    );
    let r = probe.must_connect(&web, sa(bridge, 8080), As::User(1000));
    assert_landed(&r, "outbound", Some(sa(bridge, 8080)));
    let r = probe.must_connect(&plain, sa(bridge, 8080), As::User(1000));
    assert_landed(&r, "node", None);
    // Inbound from the node to the injected pod lands on 15006.
    let _in_l = probe.listen(
        &web,
        "inbound",
        sa("0.0.0.0".parse().unwrap(), 15006),
        ListenOpts::user(1337),
    );
    let r = probe.must_connect(&node.ns, sa(web_ip, 9080), As::Root);
    assert_landed(&r, "inbound", Some(sa(web_ip, 9080)));

    if version != "0.3.1" {
        for (att, res) in [
            (&att_web, &r_web),
            (&att_plain, &r_plain),
            (&att_sys, &r_sys),
        ] {
            node.runtime
                .check(att, res)
                .unwrap_or_else(|e| panic!("CHECK: {e}"));
        }
    }
    for (att, res) in [
        (&att_web, &r_web),
        (&att_plain, &r_plain),
        (&att_sys, &r_sys),
    ] {
        node.runtime
            .del(att, Some(res))
            .unwrap_or_else(|e| panic!("DEL: {e}"));
        // Runtimes repeat DEL; it must stay a success.
        node.runtime
            .del(att, Some(res))
            .unwrap_or_else(|e| panic!("second DEL: {e}"));
    }
    // DEL after the netns is gone, with an empty CNI_NETNS, as containerd does after a sandbox is torn down.
    let gone = Attachment {
        netns: String::new(),
        ..att_web.clone()
    };
    node.runtime
        .del(&gone, Some(&r_web))
        .unwrap_or_else(|e| panic!("DEL with empty netns: {e}"));
}

#[test]
fn chain_bridge_host_local_istio_cni_v1_0_0() {
    run_chain("1.0.0");
}

#[test]
fn chain_bridge_host_local_istio_cni_v0_4_0() {
    run_chain("0.4.0");
}

#[test]
fn chain_bridge_host_local_istio_cni_v0_3_1() {
    run_chain("0.3.1");
}
