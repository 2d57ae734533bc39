//! The conflist edit of the agent (`install::conflist`): arbitrary JSON in, our entry in and out.
//!
//! Invariants, for a configuration the edit accepts:
//! - inserting puts exactly one entry of ours in, last, equal to the entry given; every other plugin is kept,
//!   untouched and in order; every other key of a list is kept; a single-plugin configuration becomes Istio's
//!   converted list (itself without `cniVersion`, then ours);
//! - inserting is idempotent, and removing after inserting gives back the input (the list without entries of
//!   ours; for a converted `.conf`, the converted list without ours, as Istio leaves it);
//! - the file as written (Go's JSON layout) reads back as the same value (numbers by value: Go writes 14.0 as `14`),
//!   and libcni's checks accept it;
//! - a refusal names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent::install::conflist::{
    entry, has_entry, insert_entry, loadable, parse, remove_entry, render, EntrySettings,
    CNI_VERSION, CONVERTED_LIST_NAME, PLUGIN_TYPE,
};
use serde_json::Value;

const FILE: &str = "/host/etc/cni/net.d/10-fuzz.conflist";

fn ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Equal JSON, numbers compared by value: the file is written as Go writes it, where 14.0 is `14`.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || (x.as_f64().is_some() && x.as_f64() == y.as_f64())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn plugins(v: &Value) -> &Vec<Value> {
    v["plugins"].as_array().expect("a list of plugins")
}

fuzz_target!(|data: &[u8]| {
    let settings = EntrySettings {
        plugin_log_level: "debug".into(),
        cni_agent_run_dir: "/tmp".into(),
        exclude_namespaces: if data.len().is_multiple_of(2) {
            vec!["istio-system".into()]
        } else {
            vec![]
        },
        pod_namespace: String::new(),
        native_nftables: data.len().is_multiple_of(3),
    };
    let ours_entry = settings.entry();
    let existing = match parse(FILE, data) {
        Ok(v) => v,
        Err(e) => {
            assert!(e.to_string().contains(FILE), "{e}");
            return;
        }
    };
    let inserted = match insert_entry(FILE, &existing, &ours_entry) {
        Ok(v) => v,
        Err(e) => {
            assert!(e.to_string().contains(FILE), "{e}");
            assert!(remove_entry(FILE, &existing).is_err() || existing.get("type").is_some());
            return;
        }
    };
    let list = plugins(&inserted);
    assert_eq!(list.last(), Some(&ours_entry), "our entry is last");
    assert_eq!(entry(&inserted), Some(&ours_entry));
    assert!(has_entry(&inserted));
    let others: Vec<&Value> = list[..list.len() - 1].iter().collect();
    let single = existing.get("type").is_some();
    if single {
        let mut itself = existing.as_object().expect("object").clone();
        itself.remove("cniVersion");
        assert_eq!(
            others,
            [&Value::Object(itself)],
            "a .conf becomes a list of itself and ours"
        );
        assert_eq!(inserted["cniVersion"], CNI_VERSION);
        assert_eq!(inserted["name"], CONVERTED_LIST_NAME);
    } else {
        assert!(others.iter().all(|p| !ours(p)), "exactly one entry of ours");
        let before: Vec<&Value> = plugins(&existing).iter().filter(|p| !ours(p)).collect();
        assert_eq!(
            others, before,
            "the other plugins are kept, in order, untouched"
        );
        let (mut a, mut b) = (
            existing.as_object().expect("object").clone(),
            inserted.as_object().expect("object").clone(),
        );
        a.remove("plugins");
        b.remove("plugins");
        assert_eq!(a, b, "the list's other keys are kept");
    }
    let twice = insert_entry(FILE, &inserted, &ours_entry).expect("insert into our own output");
    assert_eq!(twice, inserted, "insert is idempotent");
    let removed = remove_entry(FILE, &inserted).expect("remove from our own output");
    assert!(!has_entry(&removed));
    if single {
        let mut converted = inserted.clone();
        converted["plugins"] =
            Value::Array(others.into_iter().filter(|p| !ours(p)).cloned().collect());
        assert_eq!(
            removed, converted,
            "a converted .conf stays a list, without ours"
        );
    } else {
        assert_eq!(
            removed,
            remove_entry(FILE, &existing).expect("remove from the input")
        );
        if !has_entry(&existing) {
            assert_eq!(removed, existing, "insert then remove gives back the input");
        }
    }
    for v in [&inserted, &removed] {
        let bytes = render(v);
        let back = parse(FILE, &bytes).expect("our file reads back");
        assert!(
            same(&back, v),
            "the written file reads back as another value:\n{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    if loadable("10-fuzz.conflist", &render(&existing)).is_ok() && !single {
        if let Err(e) = loadable("10-fuzz.conflist", &render(&inserted)) {
            panic!("libcni would refuse our edit of a loadable list: {e}");
        }
    }
});
