//! The real node's pod sandbox process (`scripts/e2e-node.sh` packs it as the pause image): PID 1 of every pod
//! sandbox, holding its namespaces. It does what Kubernetes' pause does: waits for SIGINT or SIGTERM and exits 0,
//! and reaps any child reparented to it (SIGCHLD) so no zombie stays behind.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

fn main() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    // PID 1 gets no default signal actions: block the three and take them synchronously.
    if let Err(e) = set.thread_block() {
        eprintln!("meshcni-pause: cannot block signals: {e}");
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if st == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("meshcni-pause: sigwait: {e}");
                std::process::exit(1);
            }
        }
    }
}
