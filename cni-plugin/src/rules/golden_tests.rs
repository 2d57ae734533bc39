//! Istio's goldens (`shared/compat/istio/`): capture-iptables/ from capture-cases.json, and plugin/ from
//! plugin/cases.json through the whole pod -> redirect -> config -> render path. Compared table by table.
//!
//! The corpus is found by [`crate::compat`] (`$MESHCNI_COMPAT_DIR` or walking up). Not finding it is a failure.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::*;
use crate::pod::{decide, Decision};

use super::capture_cases::{self, CASES_FILE};

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

#[test]
fn capture_iptables_goldens() {
    let dir = crate::compat::istio_dir();
    let cases =
        capture_cases::parse(&read(&dir.join(CASES_FILE))).unwrap_or_else(|e| panic!("{e}"));
    let mut compared = 0;
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    for case in &cases {
        let name = &case.name;
        assert!(names.insert(name.clone()), "duplicate case {name}");
        let Some(golden_file) = &case.iptables_golden else {
            continue; // nftables-only case
        };
        let config = &case.config;
        let golden = parse_golden(&read(&dir.join("capture-iptables").join(golden_file)));
        let ruleset = render_iptables(config);
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

/// Line-by-line diff of a rendered nft script against its golden (equal lines shown for context).
fn line_diff(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut report = String::new();
    for j in 0..e.len().max(a.len()) {
        match (e.get(j), a.get(j)) {
            (Some(x), Some(y)) if x == y => report.push_str(&format!("      {x}\n")),
            (x, y) => {
                if let Some(x) = x {
                    report.push_str(&format!("    - {x}\n"));
                }
                if let Some(y) = y {
                    report.push_str(&format!("    + {y}\n"));
                }
            }
        }
    }
    if report.is_empty() {
        report.push_str("    (the texts differ only in line endings)\n");
    }
    Some(report)
}

#[test]
fn capture_nftables_goldens() {
    let dir = crate::compat::istio_dir();
    let cases =
        capture_cases::parse(&read(&dir.join(CASES_FILE))).unwrap_or_else(|e| panic!("{e}"));
    let mut compared = 0;
    let mut failures = Vec::new();
    for case in &cases {
        let golden_file = case
            .nftables_golden
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no nftables golden", case.name));
        let golden = read(&dir.join("capture-nftables").join(golden_file));
        let script = nftables::render(&case.config).to_string();
        compared += 1;
        if let Some(diff) = line_diff(&golden, &script) {
            failures.push(format!("{} ({golden_file}):\n{diff}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} capture-nftables goldens differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(compared, 28, "number of capture-nftables goldens compared");
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
        let pod = crate::compat::plugin_case_pod(case);
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
