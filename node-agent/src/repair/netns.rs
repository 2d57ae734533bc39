//! Finding a running pod's network namespace through the host's /proc, and repairing it with the plugin's own
//! programming path.
//!
//! There is no reliable name for a pod's netns on the host (runtimes bind-mount it in different places), so, as
//! Istio's repair does (`getPodNetNs`), we look at the processes: the pod's netns is the one with an interface
//! address equal to the pod's IP. Unlike Istio, which enters the netns of every process of the node, each netns is
//! entered once (processes are grouped by the netns's identity, its nsfs (dev, inode), read with a `stat`), and the
//! host's own netns (`<proc>/1/ns/net`) is never entered at all. Of the processes in the matching netns the
//! oldest is reported (the sandbox's pause process: the failing init container comes and goes). Two netns with the
//! pod's IP is an error, not a guess.
//!
//! The netns found stays open (its fd pins it) until it is programmed: [`HostRedirector`] passes
//! `/proc/self/fd/<fd>` to `cni_plugin::apply::program`, so a process that exits, or a pid reused, between the
//! search and the programming cannot redirect anything else.
//!
//! In the agent's container `<proc>` is the host's /proc mounted read-only (`/host/proc`); reading another
//! process's `ns/net` needs CAP_SYS_PTRACE, entering it CAP_SYS_ADMIN.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use cni_plugin::apply::{self, Target};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::{Netns, NetnsId};
use cni_plugin::redirect::Redirect;

use super::{Redirected, Redirector};

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("cannot read the host's network namespace {path} (is the host's /proc mounted there?): {source}")]
    HostNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list the processes in {path}: {source}")]
    ListProcs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no network namespace of the host's processes has the pod's address {ips:?} (searched {searched} namespaces in {proc})")]
    NotFound {
        ips: Vec<IpAddr>,
        searched: usize,
        proc: PathBuf,
    },
    #[error("{} network namespaces have the pod's address {ips:?} (pids {pids:?}): refusing to guess", pids.len())]
    Ambiguous { ips: Vec<IpAddr>, pids: Vec<u32> },
}

/// A pod's netns, open.
#[derive(Debug)]
pub struct Found {
    /// The oldest process in it.
    pub pid: u32,
    /// `<proc>/<pid>/ns/net`, for logs.
    pub path: PathBuf,
    pub netns: Netns,
}

fn ns_path(proc: &Path, pid: u32) -> PathBuf {
    proc.join(pid.to_string()).join("ns").join("net")
}

fn ns_id(path: &Path) -> std::io::Result<NetnsId> {
    let st = nix::sys::stat::stat(path)?;
    Ok(NetnsId {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// A process's start time (clock ticks after boot, field 22 of `<proc>/<pid>/stat`); `None` if unreadable.
pub fn start_time(proc: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Where the search looks: the host's /proc, and the host's own netns file (never a candidate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub proc: PathBuf,
    /// `<proc>/1/ns/net` (init's), unless told otherwise (tests running where init may not be inspected).
    pub host_netns: PathBuf,
}

impl Scope {
    pub fn new(proc: impl Into<PathBuf>) -> Scope {
        let proc = proc.into();
        Scope {
            host_netns: ns_path(&proc, 1),
            proc,
        }
    }

    /// The identity of the host's netns.
    pub fn host(&self) -> Result<NetnsId, SearchError> {
        ns_id(&self.host_netns).map_err(|source| SearchError::HostNetns {
            path: self.host_netns.clone(),
            source,
        })
    }
}

/// The netns of the host's processes (but the host's own), each with its oldest process, by identity.
pub fn candidates(scope: &Scope) -> Result<BTreeMap<NetnsId, u32>, SearchError> {
    let host = scope.host()?;
    let proc = scope.proc.as_path();
    let entries = std::fs::read_dir(proc).map_err(|source| SearchError::ListProcs {
        path: proc.to_path_buf(),
        source,
    })?;
    // netns -> (start time, pid) of its oldest process; an unreadable start time sorts last.
    let mut oldest: BTreeMap<NetnsId, (u64, u32)> = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exited, or one we may not inspect: not a candidate.
        let Ok(id) = ns_id(&ns_path(proc, pid)) else {
            continue;
        };
        if id == host {
            continue;
        }
        let key = (start_time(proc, pid).unwrap_or(u64::MAX), pid);
        oldest
            .entry(id)
            .and_modify(|best| *best = (*best).min(key))
            .or_insert(key);
    }
    Ok(oldest.into_iter().map(|(id, (_, pid))| (id, pid)).collect())
}

/// Finds the netns whose interfaces carry one of `ips`, among the processes of `proc`.
pub fn find_pod_netns(scope: &Scope, ips: &[IpAddr]) -> Result<Found, SearchError> {
    let candidates = candidates(scope)?;
    let proc = scope.proc.as_path();
    let searched = candidates.len();
    let mut matches = Vec::new();
    for (id, pid) in candidates {
        let path = ns_path(proc, pid);
        let netns = match Netns::open(&path) {
            Ok(n) if n.id() == id => n,
            // Exited, or its pid now names another process.
            Ok(_) | Err(_) => continue,
        };
        let addrs = netns.run(apply::addresses);
        match addrs {
            Ok(Ok(addrs)) if addrs.iter().any(|a| ips.contains(a)) => {
                matches.push(Found { pid, path, netns })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(pid, error = %e, "cannot list the addresses of a netns"),
            Err(e) => tracing::debug!(pid, error = %e, "cannot enter a netns"),
        }
    }
    match matches.len() {
        0 => Err(SearchError::NotFound {
            ips: ips.to_vec(),
            searched,
            proc: proc.to_path_buf(),
        }),
        1 => Ok(matches.remove(0)),
        _ => Err(SearchError::Ambiguous {
            ips: ips.to_vec(),
            pids: matches.iter().map(|m| m.pid).collect(),
        }),
    }
}

/// The repair of the agent: the netns search in the host's /proc, then `cni_plugin::apply::program` with the
/// backend the plugin uses on this node.
#[derive(Debug, Clone)]
pub struct HostRedirector {
    pub scope: Scope,
    pub backend: BackendChoice,
}

impl HostRedirector {
    /// Finds the pod's netns and programs `redirect` in it: exactly the plugin's programming call.
    pub fn repair(
        &self,
        ips: &[IpAddr],
        redirect: &Redirect,
    ) -> Result<(Found, apply::Programmed), String> {
        let found = find_pod_netns(&self.scope, ips).map_err(|e| e.to_string())?;
        let pinned = PathBuf::from(format!("/proc/self/fd/{}", found.netns.as_fd().as_raw_fd()));
        let programmed = apply::program(&pinned, self.backend, &Target::Redirect(redirect.clone()))
            .map_err(|e| format!("netns of pid {} ({}): {e}", found.pid, found.path.display()))?;
        if programmed.netns != found.netns.id() {
            // Unreachable: the fd pins the netns.
            return Err(format!(
                "programmed {} instead of the pod's {}",
                programmed.netns,
                found.netns.id()
            ));
        }
        Ok((found, programmed))
    }
}

impl Redirector for HostRedirector {
    fn redirect(&self, ips: &[IpAddr], redirect: &Redirect) -> Result<Redirected, String> {
        let (found, programmed) = self.repair(ips, redirect)?;
        Ok(Redirected {
            pid: found.pid,
            netns: format!("{} {}", found.path.display(), found.netns.id()),
            backend: programmed.backend.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let dir = std::env::temp_dir().join(format!("meshcni-stat-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("42")).unwrap();
        // Field 22 is 777; the name contains ') ' and digits to mislead a naive split.
        let fields: Vec<String> = (4..=52)
            .map(|i| if i == 22 { "777".into() } else { i.to_string() })
            .collect();
        std::fs::write(
            dir.join("42/stat"),
            format!("42 (evil) 1 2 3) S {}", fields.join(" ")),
        )
        .unwrap();
        assert_eq!(start_time(&dir, 42), Some(777));
        assert_eq!(start_time(&dir, 43), None);
        // Our own process, from the real /proc: a number.
        assert!(start_time(Path::new("/proc"), std::process::id()).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_proc_without_the_host_netns_is_an_error_naming_it() {
        let e = find_pod_netns(&Scope::new("/nonexistent/proc"), &[]).unwrap_err();
        assert!(matches!(e, SearchError::HostNetns { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/proc/1/ns/net"), "{e}");
    }
}
