//! The line formats of the targets whose input is not JSON, so that seeds can be written from Istio's golden inputs
//! and read by a person. Each parser accepts any bytes (a line it cannot read is ignored): the fuzzer mutates freely.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// `\n`, `\t`, `\r`, `\0`, `\\` and `\xHH` (a byte, as a char) resolved; anything else kept as written.
pub fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) => out.push(char::from(b)),
                    Err(_) => {
                        out.push_str("\\x");
                        out.push_str(&hex);
                    }
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The first `n - 1` NUL-separated fields, then the rest (a missing field is empty).
pub fn nul_fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |b| *b == 0).collect();
    out.resize(n, &[]);
    out
}

/// `KEY=VALUE` lines (the value may hold `=`; escapes as [`unescape`]).
pub fn env_lines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
        .collect()
}

/// A pod in lines, one fact each (values escaped as [`unescape`]):
///
/// ```text
/// a KEY=VALUE   annotation          l KEY=VALUE   label
/// c NAME        container           i NAME        init container
/// e NAME=VALUE  env of istio-proxy  f NAME        env of istio-proxy from a fieldRef (no value)
/// p ARG         an arg of istio-proxy (in order: `p proxy`, `p sidecar`)
/// u N / g N     istio-proxy's runAsUser / runAsGroup
/// ```
///
/// Returns the Pod object as the API server sends it (namespace `ns`, name `pod`).
pub fn pod_lines(text: &str) -> Value {
    let mut annotations = Map::new();
    let mut labels = Map::new();
    let mut containers = Vec::new();
    let mut init = Vec::new();
    let mut env = Vec::new();
    let mut args = Vec::new();
    let mut security = Map::new();
    for line in text.lines() {
        let Some((tag, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = unescape(rest);
        let pair = || {
            let (k, v) = rest.split_once('=').unwrap_or((&rest, ""));
            (k.to_string(), Value::String(v.to_string()))
        };
        match tag {
            "a" => {
                let (k, v) = pair();
                annotations.insert(k, v);
            }
            "l" => {
                let (k, v) = pair();
                labels.insert(k, v);
            }
            "c" => containers.push(rest),
            "i" => init.push(rest),
            "e" => {
                let (k, v) = pair();
                env.push(json!({"name": k, "value": v}));
            }
            "f" => env.push(
                json!({"name": rest, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            ),
            "p" => args.push(Value::String(rest)),
            "u" | "g" => {
                if let Ok(n) = rest.trim().parse::<i64>() {
                    let key = if tag == "u" {
                        "runAsUser"
                    } else {
                        "runAsGroup"
                    };
                    security.insert(key.to_string(), n.into());
                }
            }
            _ => {}
        }
    }
    let container = |name: &String| {
        let mut c = json!({ "name": name });
        if name == cni_plugin::pod::ISTIO_PROXY {
            c["env"] = Value::Array(env.clone());
            c["args"] = Value::Array(args.clone());
            c["securityContext"] = Value::Object(security.clone());
        }
        c
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "ns", "name": "pod", "annotations": annotations, "labels": labels},
        "spec": {
            "initContainers": init.iter().map(container).collect::<Vec<_>>(),
            "containers": containers.iter().map(container).collect::<Vec<_>>(),
        }
    })
}

/// One step of the agent-socket target's script (fields separated by single spaces; `-` is an absent UID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketOp {
    /// The watch starts a list (`init`), lists a pod (`list NS NAME UID [injected]`), ends the list (`done`).
    Init,
    List(PodFact),
    Done,
    /// A watch event (`apply NS NAME UID [injected]`, `delete NS NAME UID|-`).
    Apply(PodFact),
    Delete(PodFact),
    /// The watch broke (`unsync`).
    Unsync,
    /// The plugin asks for a pod (`ask NS NAME [UID]`), through the agent's answer and the plugin's reading of it.
    Ask {
        namespace: String,
        name: String,
        uid: Option<String>,
    },
    /// A raw request line sent to the agent (`raw TEXT`).
    Raw(String),
    /// A raw answer line the plugin reads, for pod `ns/pod` with UID `u` (`reply TEXT`).
    Reply(String),
}

/// A pod of the script: namespace, name, UID (`None`: absent), injected (`istio-proxy` + status annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFact {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub injected: bool,
}

impl PodFact {
    /// The Pod object of the watch.
    pub fn pod(&self) -> Value {
        let mut meta = json!({"namespace": self.namespace, "name": self.name});
        if let Some(uid) = &self.uid {
            meta["uid"] = uid.clone().into();
        }
        let mut containers = vec![json!({"name": "app"})];
        if self.injected {
            containers.push(json!({"name": "istio-proxy", "args": ["proxy", "sidecar"]}));
            meta["annotations"] = json!({"sidecar.istio.io/status": "{}"});
        }
        json!({"metadata": meta, "spec": {"containers": containers}})
    }
}

/// The script's steps.
pub fn socket_ops(text: &str) -> Vec<SocketOp> {
    let mut ops = Vec::new();
    for line in text.lines() {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let words: Vec<String> = rest.split(' ').map(unescape).collect();
        let uid = |w: Option<&String>| w.filter(|u| *u != "-").cloned();
        let fact = || PodFact {
            namespace: words.first().cloned().unwrap_or_default(),
            name: words.get(1).cloned().unwrap_or_default(),
            uid: uid(words.get(2)),
            injected: words.get(3).is_some_and(|w| w == "injected"),
        };
        ops.push(match verb {
            "init" => SocketOp::Init,
            "done" => SocketOp::Done,
            "unsync" => SocketOp::Unsync,
            "list" => SocketOp::List(fact()),
            "apply" => SocketOp::Apply(fact()),
            "delete" => SocketOp::Delete(fact()),
            "ask" => {
                let f = fact();
                SocketOp::Ask {
                    namespace: f.namespace,
                    name: f.name,
                    uid: f.uid,
                }
            }
            "raw" => SocketOp::Raw(unescape(rest)),
            "reply" => SocketOp::Reply(unescape(rest)),
            _ => continue,
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_fields() {
        assert_eq!(unescape(r"a\nb\x41\\c\q"), "a\nbA\\cq");
        assert_eq!(nul_fields(b"a\0b\0c\0d", 3), [&b"a"[..], b"b", b"c\0d"]);
        assert_eq!(nul_fields(b"a", 3), [&b"a"[..], b"", b""]);
        let env = env_lines("CNI_COMMAND=ADD\nCNI_ARGS=A=1;B=2\nnoise");
        assert_eq!(env.get("CNI_ARGS").map(String::as_str), Some("A=1;B=2"));
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn a_pod_in_lines() {
        let pod = pod_lines("a sidecar.istio.io/status=x=y\nc app\nc istio-proxy\ne DNS=true\nf F\np proxy\np sidecar\nu 1000\ni init\nz ignored");
        assert_eq!(
            pod["metadata"]["annotations"]["sidecar.istio.io/status"],
            "x=y"
        );
        let proxy = &pod["spec"]["containers"][1];
        assert_eq!(proxy["args"], json!(["proxy", "sidecar"]));
        assert_eq!(proxy["securityContext"]["runAsUser"], 1000);
        assert_eq!(
            proxy["env"][1]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "init");
    }

    #[test]
    fn a_socket_script() {
        let ops = socket_ops(
            "init\nlist ns a u1 injected\ndone\nask ns a u1\ndelete ns a -\nraw {\"v\":1}\nnope",
        );
        assert_eq!(ops.len(), 6);
        assert_eq!(
            ops[1],
            SocketOp::List(PodFact {
                namespace: "ns".into(),
                name: "a".into(),
                uid: Some("u1".into()),
                injected: true
            })
        );
        assert!(matches!(&ops[4], SocketOp::Delete(f) if f.uid.is_none()));
        assert_eq!(ops[5], SocketOp::Raw("{\"v\":1}".into()));
    }
}
