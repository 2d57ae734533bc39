//! The plugin configuration: a conflist entry (JSON) into `config::PluginConfig`.
//!
//! Invariants: an accepted entry, deserialised into the typed `PluginEntry`, serialised and read again, is the same
//! entry and gives the same `PluginConfig` (parse -> serialize -> parse); a refusal names the bad value; and the
//! entry the agent writes from the same settings (`EntrySettings::entry`) is read by the plugin as those settings:
//! the agent never writes an entry the plugin reads differently.
#![no_main]

use std::path::PathBuf;

use cni_plugin::config::{ConfigError, PluginConfig, PluginEntry, DEFAULT_AGENT_RUN_DIR};
use libfuzzer_sys::fuzz_target;
use node_agent::install::conflist::EntrySettings;
use serde::Deserialize;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match PluginConfig::from_json(&value) {
        Ok(cfg) => {
            let entry = PluginEntry::deserialize(&value).expect("an accepted entry deserialises");
            let text = serde_json::to_value(&entry).expect("serialise the entry");
            let again = PluginEntry::deserialize(&text).expect("a serialised entry deserialises");
            assert_eq!(again, entry, "parse -> serialize -> parse of the entry");
            let cfg2 = PluginConfig::from_json(&text).expect("a serialised entry is accepted");
            assert_eq!(
                cfg2, cfg,
                "the same configuration from the serialised entry"
            );
            let fields: Vec<&str> = entry.fields().iter().map(|(k, _)| *k).collect();
            assert!(
                fields.iter().all(|k| PluginEntry::keys().contains(k)),
                "{fields:?}"
            );
            agent_entry_reads_back(&cfg, &entry);
        }
        Err(e) => {
            let msg = e.to_string();
            let named = match &e {
                ConfigError::LogLevel(v)
                | ConfigError::Backend(v)
                | ConfigError::BackendConflict(v) => msg.contains(&format!("{v:?}")),
                ConfigError::LookupTimeout(secs) => msg.contains(&secs.to_string()),
                ConfigError::Decode(_) => !msg.is_empty(),
            };
            assert!(named, "{msg} does not name the value");
        }
    }
});

/// The agent's entry for the settings of `cfg` is read by the plugin as the same settings.
fn agent_entry_reads_back(cfg: &PluginConfig, entry: &PluginEntry) {
    let settings = EntrySettings {
        plugin_log_level: entry
            .plugin_log_level
            .clone()
            .unwrap_or_else(|| "info".into()),
        cni_agent_run_dir: cfg.agent_run_dir.display().to_string(),
        exclude_namespaces: cfg.exclude_namespaces.clone(),
        pod_namespace: cfg.pod_namespace.clone(),
        native_nftables: cfg.native_nftables,
    };
    let written = settings.entry();
    let read = match PluginConfig::from_json(&written) {
        Ok(read) => read,
        Err(e) => panic!("the plugin refuses the agent's entry {written}: {e}"),
    };
    let run_dir = if settings.cni_agent_run_dir.is_empty() {
        PathBuf::from(DEFAULT_AGENT_RUN_DIR)
    } else {
        PathBuf::from(&settings.cni_agent_run_dir)
    };
    assert_eq!(read.agent_run_dir, run_dir);
    assert_eq!(
        read.kubeconfig,
        run_dir.join(cni_plugin::config::KUBECONFIG_NAME)
    );
    assert_eq!(read.exclude_namespaces, settings.exclude_namespaces);
    assert_eq!(read.pod_namespace, settings.pod_namespace);
    assert_eq!(read.native_nftables, settings.native_nftables);
    if entry.log_level.is_none() || entry.plugin_log_level.is_some() {
        assert_eq!(read.log_level, cfg.log_level);
    }
    assert_eq!(written["type"], "istio-cni");
}
