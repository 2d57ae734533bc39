//! Istio's goldens (`shared/compat/istio/`): capture-iptables/ from capture-cases.json, and plugin/ from
//! plugin/cases.json through the whole pod -> redirect -> config -> render path. Compared table by table.
//!
//! The corpus is found by [`crate::compat`] (`$MESHCNI_COMPAT_DIR` or walking up). Not finding it is a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

use super::*;
use crate::pod::{decide, Decision, PodInfo};

const CASES_FILE: &str = "capture-cases.json";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// One `* table` ... `COMMIT` block: the table and the lines between.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    table: String,
    lines: Vec<String>,
}

/// Golden commands: the restore blocks in order, and the save commands after the last block.
struct Golden {
    blocks: Vec<Block>,
    trailing_saves: Vec<String>,
}

fn parse_golden(text: &str) -> Golden {
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    let mut trailing_saves = Vec::new();
    for line in text.lines() {
        if let Some(block) = current.as_mut() {
            if line == "COMMIT" {
                blocks.extend(current.take());
            } else {
                block.lines.push(line.to_string());
            }
            continue;
        }
        if let Some(table) = line.strip_prefix("* ") {
            trailing_saves.clear();
            current = Some(Block {
                table: table.to_string(),
                lines: Vec::new(),
            });
        } else if line == "iptables-save" || line == "ip6tables-save" {
            trailing_saves.push(line.to_string());
        } else if !line.is_empty() {
            panic!("unexpected golden line outside a table block: {line:?}");
        }
    }
    assert!(current.is_none(), "golden block without COMMIT");
    Golden {
        blocks,
        trailing_saves,
    }
}

/// Our payload as blocks; it must consist of blocks only, and re-render to itself.
fn parse_payload(payload: &str) -> Vec<Block> {
    let golden = parse_golden(payload);
    assert!(golden.trailing_saves.is_empty());
    let mut again = String::new();
    for b in &golden.blocks {
        again.push_str(&format!("* {}\n", b.table));
        for l in &b.lines {
            again.push_str(l);
            again.push('\n');
        }
        again.push_str("COMMIT\n");
    }
    assert_eq!(again, payload, "payload is not made of table blocks only");
    golden.blocks
}

/// Table-by-table comparison; a readable diff per mismatching table.
fn compare(expected: &[Block], actual: &[(&str, Block)]) -> Result<(), String> {
    let mut report = String::new();
    if expected.len() != actual.len() {
        report.push_str(&format!(
            "  {} table blocks expected ({}), {} rendered ({})\n",
            expected.len(),
            expected
                .iter()
                .map(|b| b.table.as_str())
                .collect::<Vec<_>>()
                .join(","),
            actual.len(),
            actual
                .iter()
                .map(|(f, b)| format!("{f}:{}", b.table))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    for (i, (exp, (family, act))) in expected.iter().zip(actual).enumerate() {
        if exp == act {
            continue;
        }
        report.push_str(&format!(
            "  block {i} ({family}): expected * {}, rendered * {}\n",
            exp.table, act.table
        ));
        let n = exp.lines.len().max(act.lines.len());
        for j in 0..n {
            let e = exp.lines.get(j);
            let a = act.lines.get(j);
            if e == a {
                report.push_str(&format!("      {}\n", e.map_or("", String::as_str)));
            } else {
                if let Some(e) = e {
                    report.push_str(&format!("    - {e}\n"));
                }
                if let Some(a) = a {
                    report.push_str(&format!("    + {a}\n"));
                }
            }
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        Err(report)
    }
}

fn rendered_blocks(rs: &Ruleset) -> Vec<(&'static str, Block)> {
    let mut out: Vec<(&str, Block)> = parse_payload(&rs.v4)
        .into_iter()
        .map(|b| ("ipv4", b))
        .collect();
    if let Some(v6) = &rs.v6 {
        out.extend(parse_payload(v6).into_iter().map(|b| ("ipv6", b)));
    }
    out
}

// --- capture-cases.json -> CaptureConfig (the JSON uses istio-iptables' string forms) ---

fn field<'a>(cfg: &'a Map<String, Value>, key: &str) -> &'a Value {
    cfg.get(key)
        .unwrap_or_else(|| panic!("capture case has no {key:?}"))
}

fn string<'a>(cfg: &'a Map<String, Value>, key: &str) -> &'a str {
    field(cfg, key)
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string"))
}

fn boolean(cfg: &Map<String, Value>, key: &str) -> bool {
    cfg.get(key)
        .map(|v| v.as_bool().unwrap_or_else(|| panic!("{key} is not a bool")))
        .unwrap_or(false)
}

fn port(cfg: &Map<String, Value>, key: &str) -> u16 {
    let n = field(cfg, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number"));
    u16::try_from(n).unwrap_or_else(|_| panic!("{key}={n} is not a port"))
}

/// istio-iptables' `config.Split`: comma-separated, empty items dropped, no trimming.
fn split(s: &str) -> Vec<&str> {
    s.split(',').filter(|x| !x.is_empty()).collect()
}

fn parsed<T: std::str::FromStr<Err: std::fmt::Display>>(key: &str, s: &str) -> Vec<T> {
    split(s)
        .into_iter()
        .map(|x| x.parse().unwrap_or_else(|e| panic!("{key}: {e}")))
        .collect()
}

fn ports(key: &str, s: &str) -> Vec<u16> {
    split(s)
        .into_iter()
        .map(|x| crate::redirect::parse_port(x).unwrap_or_else(|e| panic!("{key}: {e}")))
        .collect()
}

fn cidrs(key: &str, s: &str) -> Vec<IpNet> {
    split(s)
        .into_iter()
        .map(|x| crate::redirect::parse_cidr(x).unwrap_or_else(|e| panic!("{key}: {e}")))
        .collect()
}

fn dns_servers(cfg: &Map<String, Value>, key: &str) -> Vec<DnsServer> {
    field(cfg, key)
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{key} item is not a string"))
                .parse()
                .unwrap_or_else(|e| panic!("{key}: {e}"))
        })
        .collect()
}

fn number_string<T: std::str::FromStr>(cfg: &Map<String, Value>, key: &str) -> T {
    let s = string(cfg, key);
    s.parse()
        .unwrap_or_else(|_| panic!("{key}={s:?} is not a number"))
}

fn capture_config(cfg: &Map<String, Value>) -> CaptureConfig {
    const KNOWN: [&str; 24] = [
        "proxy_port",
        "inbound_capture_port",
        "inbound_tunnel_port",
        "proxy_uid",
        "proxy_gid",
        "inbound_tproxy_mark",
        "inbound_tproxy_route_table",
        "owner_groups_include",
        "owner_groups_exclude",
        "host_ipv4_loopback_cidr",
        "inbound_ports_include",
        "inbound_ports_exclude",
        "outbound_ip_ranges_include",
        "outbound_ip_ranges_exclude",
        "outbound_ports_include",
        "outbound_ports_exclude",
        "inbound_interception_mode",
        "enable_ipv6",
        "redirect_dns",
        "dns_servers_v4",
        "dns_servers_v6",
        "exclude_interfaces",
        "reroute_virtual_interfaces",
        "drop_invalid",
    ];
    for key in cfg.keys() {
        assert!(
            KNOWN.contains(&key.as_str()) || key == "capture_all_dns" || key == "dual_stack",
            "capture case field {key:?} is not understood by this test"
        );
    }
    let groups_include = string(cfg, "owner_groups_include");
    let inbound_include = string(cfg, "inbound_ports_include");
    let ranges_include = string(cfg, "outbound_ip_ranges_include");
    let config = CaptureConfig {
        proxy_port: port(cfg, "proxy_port"),
        inbound_capture_port: port(cfg, "inbound_capture_port"),
        inbound_tunnel_port: port(cfg, "inbound_tunnel_port"),
        proxy_uids: parsed("proxy_uid", string(cfg, "proxy_uid")),
        proxy_gids: parsed("proxy_gid", string(cfg, "proxy_gid")),
        interception_mode: string(cfg, "inbound_interception_mode")
            .parse()
            .unwrap_or_else(|e| panic!("inbound_interception_mode: {e}")),
        inbound_tproxy_mark: number_string(cfg, "inbound_tproxy_mark"),
        inbound_tproxy_route_table: number_string(cfg, "inbound_tproxy_route_table"),
        inbound_ports_include: if inbound_include == "*" {
            PortSelector::All
        } else {
            PortSelector::Only(ports("inbound_ports_include", inbound_include))
        },
        inbound_ports_exclude: ports(
            "inbound_ports_exclude",
            string(cfg, "inbound_ports_exclude"),
        ),
        owner_groups_include: if groups_include == "*" {
            OwnerGroups::All
        } else {
            OwnerGroups::Only(parsed("owner_groups_include", groups_include))
        },
        owner_groups_exclude: parsed("owner_groups_exclude", string(cfg, "owner_groups_exclude")),
        outbound_ports_include: ports(
            "outbound_ports_include",
            string(cfg, "outbound_ports_include"),
        ),
        outbound_ports_exclude: ports(
            "outbound_ports_exclude",
            string(cfg, "outbound_ports_exclude"),
        ),
        outbound_ip_ranges_include: if ranges_include == "*" {
            IpRanges::All
        } else {
            IpRanges::Only(cidrs("outbound_ip_ranges_include", ranges_include))
        },
        outbound_ip_ranges_exclude: cidrs(
            "outbound_ip_ranges_exclude",
            string(cfg, "outbound_ip_ranges_exclude"),
        ),
        reroute_virtual_interfaces: parsed(
            "reroute_virtual_interfaces",
            string(cfg, "reroute_virtual_interfaces"),
        ),
        exclude_interfaces: parsed("exclude_interfaces", string(cfg, "exclude_interfaces")),
        redirect_dns: boolean(cfg, "redirect_dns"),
        capture_all_dns: boolean(cfg, "capture_all_dns"),
        dns_servers_v4: dns_servers(cfg, "dns_servers_v4"),
        dns_servers_v6: dns_servers(cfg, "dns_servers_v6"),
        drop_invalid: boolean(cfg, "drop_invalid"),
        dual_stack: boolean(cfg, "dual_stack"),
        enable_ipv6: boolean(cfg, "enable_ipv6"),
        host_ipv4_loopback_cidr: string(cfg, "host_ipv4_loopback_cidr")
            .parse()
            .unwrap_or_else(|e| panic!("host_ipv4_loopback_cidr: {e}")),
    };
    if let Err(e) = config.validate() {
        panic!("capture case config is invalid: {e}");
    }
    config
}

#[test]
fn capture_iptables_goldens() {
    let dir = crate::compat::istio_dir();
    let cases = read_json(&dir.join(CASES_FILE));
    let base = cases["base"]
        .as_object()
        .expect("base is an object")
        .clone();
    let mut compared = 0;
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    for case in cases["cases"].as_array().expect("cases is an array") {
        let name = case["name"].as_str().expect("case name");
        assert!(names.insert(name.to_string()), "duplicate case {name}");
        let Some(golden_file) = case["iptables_golden"].as_str() else {
            continue; // nftables-only case
        };
        let mut cfg = base.clone();
        for (k, v) in case["overrides"]
            .as_object()
            .expect("overrides is an object")
        {
            cfg.insert(k.clone(), v.clone());
        }
        let config = capture_config(&cfg);
        let golden = parse_golden(&read(&dir.join("capture-iptables").join(golden_file)));
        let ruleset = render_iptables(&config);
        compared += 1;

        // The saves after the restores tell which families Istio programmed.
        let expected_saves: Vec<&str> = if config.enable_ipv6 {
            vec!["iptables-save", "ip6tables-save"]
        } else {
            vec!["iptables-save"]
        };
        if golden.trailing_saves != expected_saves {
            failures.push(format!(
                "{name}: golden ends with {:?}, expected {expected_saves:?} for enable_ipv6={}",
                golden.trailing_saves, config.enable_ipv6
            ));
        }
        assert_eq!(ruleset.v6.is_some(), config.enable_ipv6, "{name}");
        assert_eq!(ruleset.routes, config.route_setup(), "{name}");
        if let Err(diff) = compare(&golden.blocks, &rendered_blocks(&ruleset)) {
            failures.push(format!("{name} ({golden_file}):\n{diff}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} capture goldens differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(compared, 27, "number of capture-iptables goldens compared");
}

fn plugin_pod(case: &Value) -> PodInfo {
    let strings = |key: &str| -> BTreeMap<String, String> {
        match case.get(key) {
            None => BTreeMap::new(),
            Some(v) => v
                .as_object()
                .unwrap_or_else(|| panic!("{key} is not an object"))
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_string()))
                .collect(),
        }
    };
    let id = |key: &str| case.get(key).map(|v| v.as_i64().expect("integer id"));
    for key in case.as_object().expect("case is an object").keys() {
        assert!(
            [
                "name",
                "annotations",
                "proxy_env",
                "run_as_user",
                "run_as_group",
                "golden"
            ]
            .contains(&key.as_str()),
            "plugin case field {key:?} is not understood by this test"
        );
    }
    PodInfo {
        containers: ["test", "istio-proxy", "istio-validate"]
            .into_iter()
            .map(String::from)
            .collect(),
        annotations: strings("annotations"),
        proxy_env: strings("proxy_env"),
        proxy_uid: id("run_as_user"),
        proxy_gid: id("run_as_group"),
        ..Default::default()
    }
}

#[test]
fn plugin_goldens() {
    let dir = crate::compat::istio_dir().join("plugin");
    let cases = read_json(&dir.join("cases.json"));
    let mut compared = 0;
    let mut failures = Vec::new();
    for case in cases["cases"].as_array().expect("cases is an array") {
        let name = case["name"].as_str().expect("case name");
        let golden_file = case["golden"].as_str().expect("golden file");
        let pod = plugin_pod(case);
        assert_eq!(decide(&pod), Decision::Redirect, "{name}");
        let redirect = Redirect::from_pod(&pod).unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = CaptureConfig::from_redirect(&redirect, false);
        assert_eq!(config.validate(), Ok(()), "{name}");
        let ruleset = render_iptables(&config);
        assert_eq!(ruleset.v6, None, "{name}");
        let golden = parse_golden(&read(&dir.join(golden_file)));
        compared += 1;
        if let Err(diff) = compare(&golden.blocks, &rendered_blocks(&ruleset)) {
            failures.push(format!("{name} ({golden_file}):\n{diff}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} plugin goldens differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(compared, 9, "number of plugin goldens compared");
}

#[test]
fn golden_parser_reads_blocks_and_saves() {
    let g = parse_golden(
        "iptables-save\nip6tables-save\n* nat\n-N X\nCOMMIT\n* raw\nCOMMIT\niptables-save\n",
    );
    assert_eq!(
        g.blocks,
        vec![
            Block {
                table: "nat".into(),
                lines: vec!["-N X".into()]
            },
            Block {
                table: "raw".into(),
                lines: vec![]
            }
        ]
    );
    assert_eq!(g.trailing_saves, ["iptables-save"]);
    let a = Block {
        table: "nat".into(),
        lines: vec!["-A X".into()],
    };
    let b = Block {
        table: "nat".into(),
        lines: vec!["-A Y".into()],
    };
    assert!(compare(std::slice::from_ref(&a), &[("ipv4", a.clone())]).is_ok());
    let diff = compare(std::slice::from_ref(&a), &[("ipv4", b)]).unwrap_err();
    assert!(diff.contains("- -A X") && diff.contains("+ -A Y"), "{diff}");
    assert!(compare(&[a.clone(), a.clone()], &[("ipv4", a)]).is_err());
}
