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
//!
//! ## The host's netns ([`HostNetns::establish`])
//!
//! It is init's (`<proc>/1/ns/net`). Where init may not be inspected even by root (EACCES/EPERM: a sandboxed or
//! hardened init, which the plugin meets too, see `cni_plugin::netns::Netns::is_host`), it is the netns of the
//! container runtime's process that started the agent's container: the agent's nearest ancestor outside its own
//! pid namespace (containerd's shim, CRI-O's conmon), which the runtime starts in the node's netns, whatever the
//! pods' network. The agent runs in a pod netns of its own (as Istio's DaemonSet in sidecar mode) or, with
//! `hostNetwork: true`, in that very netns: both are reported. The plugin's own fallback (the process's netns)
//! does not fit here: the agent's netns is not the host's unless it is on the host's network. Before the walk,
//! `<proc>` must show this very process (`<proc>/self/ns/net` is our netns), so a `<proc>` that is not a /proc of a
//! pid namespace holding us is refused, and so is one where no ancestor is outside our pid namespace (`hostPID`,
//! or the container's own /proc mounted as the host's). When nothing establishes it, the in-place repair is
//! refused with the reason: guessing could enter the node's own netns.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use cni_plugin::apply::{self, Target};
use cni_plugin::config::BackendChoice;
use cni_plugin::netns::{Netns, NetnsId, PROCESS_NETNS_PATH};
use cni_plugin::redirect::Redirect;

use super::{RedirectError, Redirected, Redirector};

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("cannot read the host's network namespace {path} (is the host's /proc mounted there?): {source}")]
    HostNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot establish the host's network namespace: {init} may not be inspected ({init_error}), and the \
         container runtime's cannot be established instead: {reason}"
    )]
    NoHostNetns {
        init: PathBuf,
        init_error: std::io::Error,
        reason: String,
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

/// Field `n` (1-based, as proc(5) counts) of `<proc>/<pid>/stat`, from field 3 on; `None` if unreadable.
fn stat_field<T: std::str::FromStr>(proc: &Path, pid: u32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// A process's start time (clock ticks after boot, field 22 of `<proc>/<pid>/stat`); `None` if unreadable.
pub fn start_time(proc: &Path, pid: u32) -> Option<u64> {
    stat_field(proc, pid, 22)
}

/// A process's parent (field 4 of `<proc>/<pid>/stat`; 0 for a pid namespace's top); `None` if unreadable.
pub fn parent(proc: &Path, pid: u32) -> Option<u32> {
    stat_field(proc, pid, 4)
}

/// How the host's netns was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostBy {
    /// Init's, `<proc>/1/ns/net`.
    Init(PathBuf),
    /// The netns of the container runtime's process `pid` (`comm`) that started the agent's container;
    /// `agent_inside`: the agent shares it (`hostNetwork: true`).
    Runtime {
        pid: u32,
        comm: String,
        agent_inside: bool,
    },
    /// The netns at this path, as the caller said (tests, which run in the host's netns).
    Given(PathBuf),
}

impl std::fmt::Display for HostBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostBy::Init(path) => write!(f, "init's ({})", path.display()),
            HostBy::Runtime {
                pid,
                comm,
                agent_inside,
            } => write!(
                f,
                "the container runtime's, of process {pid} ({comm}) that started the agent's container ({})",
                if *agent_inside {
                    "the agent shares it: hostNetwork"
                } else {
                    "the agent is in a netns of its own"
                }
            ),
            HostBy::Given(path) => write!(f, "given ({})", path.display()),
        }
    }
}

/// The host's network namespace: never a candidate of the search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetns {
    pub id: NetnsId,
    pub by: HostBy,
}

/// The most ancestors walked from the agent up to the runtime (a container's processes are a few levels deep).
const MAX_ANCESTORS: usize = 64;

impl HostNetns {
    /// The host's netns as seen through `proc` (see the module docs): init's, or where init may not be inspected,
    /// the container runtime's.
    pub fn establish(proc: &Path) -> Result<HostNetns, SearchError> {
        let init = ns_path(proc, 1);
        match ns_id(&init) {
            Ok(id) => Ok(HostNetns {
                id,
                by: HostBy::Init(init),
            }),
            Err(init_error) if init_error.kind() == std::io::ErrorKind::PermissionDenied => {
                HostNetns::runtimes(proc).map_err(|reason| SearchError::NoHostNetns {
                    init,
                    init_error,
                    reason,
                })
            }
            Err(source) => Err(SearchError::HostNetns { path: init, source }),
        }
    }

    /// The netns at `path`, taken as the host's.
    pub fn given(path: &Path) -> Result<HostNetns, SearchError> {
        let id = ns_id(path).map_err(|source| SearchError::HostNetns {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(HostNetns {
            id,
            by: HostBy::Given(path.to_path_buf()),
        })
    }

    /// The netns of this process's nearest ancestor outside its own pid namespace (the container runtime's process
    /// that started its container, as `proc` shows them), once `proc` is verified to show this process. `Err`: why
    /// it cannot be established.
    pub fn runtimes(proc: &Path) -> Result<HostNetns, String> {
        let ours = Path::new(PROCESS_NETNS_PATH);
        let own = ns_id(ours).map_err(|e| format!("cannot read {}: {e}", ours.display()))?;
        let link = proc.join("self");
        let me: u32 = std::fs::read_link(&link)
            .ok()
            .and_then(|t| t.to_str()?.parse().ok())
            .ok_or_else(|| {
                format!(
                    "{} is not a link to this process's pid (is {} a procfs?)",
                    link.display(),
                    proc.display()
                )
            })?;
        let read = |path: PathBuf| {
            ns_id(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let seen = read(ns_path(proc, me))?;
        if seen != own {
            return Err(format!(
                "{} is {seen}, not this process's {own}: {} does not show this process",
                ns_path(proc, me).display(),
                proc.display()
            ));
        }
        let pid_ns = |pid: u32| read(proc.join(pid.to_string()).join("ns").join("pid"));
        let our_pid_ns = pid_ns(me)?;
        let mut pid = me;
        for _ in 0..MAX_ANCESTORS {
            let up = parent(proc, pid).ok_or_else(|| {
                format!(
                    "cannot read the parent of pid {pid} in {}",
                    proc.join(pid.to_string()).join("stat").display()
                )
            })?;
            if up == 0 {
                return Err(format!(
                    "no ancestor of pid {me} in {} is outside the agent's pid namespace {our_pid_ns} (is the agent \
                     run with hostPID, or {} not the host's /proc?)",
                    proc.display(),
                    proc.display()
                ));
            }
            if pid_ns(up)? != our_pid_ns {
                let comm = std::fs::read_to_string(proc.join(up.to_string()).join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                let theirs = read(ns_path(proc, up))?;
                return Ok(HostNetns {
                    id: theirs,
                    by: HostBy::Runtime {
                        pid: up,
                        comm,
                        agent_inside: theirs == own,
                    },
                });
            }
            pid = up;
        }
        Err(format!(
            "more than {MAX_ANCESTORS} ancestors of pid {me} in {}",
            proc.display()
        ))
    }
}

/// Where the search looks: the host's /proc, and the host's own netns (never a candidate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub proc: PathBuf,
    pub host: HostNetns,
}

impl Scope {
    /// `proc` with the host's netns established through it ([`HostNetns::establish`]).
    pub fn establish(proc: impl Into<PathBuf>) -> Result<Scope, SearchError> {
        let proc = proc.into();
        Ok(Scope {
            host: HostNetns::establish(&proc)?,
            proc,
        })
    }

    /// `proc`, with the netns at `host_netns` as the host's.
    pub fn with_host(proc: impl Into<PathBuf>, host_netns: &Path) -> Result<Scope, SearchError> {
        Ok(Scope {
            proc: proc.into(),
            host: HostNetns::given(host_netns)?,
        })
    }
}

/// The netns of the host's processes (but the host's own), each with its oldest process, by identity.
pub fn candidates(scope: &Scope) -> Result<BTreeMap<NetnsId, u32>, SearchError> {
    let host = scope.host.id;
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
    /// Where to search; `Err`: why the in-place repair is refused (the host's netns could not be established).
    pub scope: Result<Scope, String>,
    pub backend: BackendChoice,
}

impl HostRedirector {
    pub fn new(scope: Result<Scope, SearchError>, backend: BackendChoice) -> HostRedirector {
        HostRedirector {
            scope: scope.map_err(|e| e.to_string()),
            backend,
        }
    }

    /// Finds the pod's netns and programs `redirect` in it: exactly the plugin's programming call.
    pub fn repair(
        &self,
        ips: &[IpAddr],
        redirect: &Redirect,
    ) -> Result<(Found, apply::Programmed), RedirectError> {
        let scope = self.scope.as_ref().map_err(|e| RedirectError {
            message: format!("the in-place repair is refused: {e}"),
            retry: false,
        })?;
        let found = find_pod_netns(scope, ips).map_err(|e| e.to_string())?;
        let pinned = PathBuf::from(format!("/proc/self/fd/{}", found.netns.as_fd().as_raw_fd()));
        let programmed = apply::program(&pinned, self.backend, &Target::Redirect(redirect.clone()))
            .map_err(|e| format!("netns of pid {} ({}): {e}", found.pid, found.path.display()))?;
        if programmed.netns != found.netns.id() {
            // Unreachable: the fd pins the netns.
            return Err(format!(
                "programmed {} instead of the pod's {}",
                programmed.netns,
                found.netns.id()
            )
            .into());
        }
        Ok((found, programmed))
    }
}

impl Redirector for HostRedirector {
    fn redirect(&self, ips: &[IpAddr], redirect: &Redirect) -> Result<Redirected, RedirectError> {
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
        let e = Scope::establish("/nonexistent/proc").unwrap_err();
        assert!(matches!(e, SearchError::HostNetns { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/proc/1/ns/net"), "{e}");
    }
}
