//! Runs a program as on a kernel without netfilter netlink (no `nfnetlink`, hence no nf_tables): a seccomp filter
//! makes `socket(AF_NETLINK, _, NETLINK_NETFILTER)` fail with `EPROTONOSUPPORT`, exactly what such a kernel
//! answers, and allows everything else (other netlink families, TCP, files). The filter stays across `exec` and
//! for every thread and child of the program; nothing else on the machine is affected.
//!
//! The program to run is `MESHCNI_WRAPPED` (removed from the environment before `exec`), so that the wrapper can
//! stand in for a CNI plugin binary that gets no arguments; arguments given are passed on.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// The environment variable naming the program to run.
const WRAPPED_ENV: &str = "MESHCNI_WRAPPED";

// Classic BPF opcodes (linux/filter.h), stable ABI.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

// Offsets in `struct seccomp_data`: nr, arch, instruction_pointer, args[6] (little endian: the low half first).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;
const ARG2_LOW: u32 = 32;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The filter: another architecture's syscalls, and every syscall but `socket(AF_NETLINK, _, NETLINK_NETFILTER)`,
/// are allowed.
fn filter() -> Vec<libc::sock_filter> {
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPROTONOSUPPORT as u32;
    vec![
        stmt(LD_W_ABS, ARCH),
        jeq(AUDIT_ARCH, 0, 6),
        stmt(LD_W_ABS, NR),
        jeq(libc::SYS_socket as u32, 0, 4),
        stmt(LD_W_ABS, ARG0_LOW),
        jeq(libc::AF_NETLINK as u32, 0, 2),
        stmt(LD_W_ABS, ARG2_LOW),
        jeq(libc::NETLINK_NETFILTER as u32, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, deny),
    ]
}

fn install(prog: &mut [libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; `fprog` points to a live, well-formed filter for the duration of the call (the
    // kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let Some(program) = std::env::var_os(WRAPPED_ENV) else {
        eprintln!("meshcni-no-nfnetlink: {WRAPPED_ENV} names no program to run");
        return ExitCode::from(2);
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = install(&mut filter()) {
        eprintln!("meshcni-no-nfnetlink: cannot install the seccomp filter: {e}");
        return ExitCode::from(2);
    }
    let e = Command::new(&program)
        .args(args)
        .env_remove(WRAPPED_ENV)
        .exec();
    eprintln!(
        "meshcni-no-nfnetlink: cannot run {}: {e}",
        program.to_string_lossy()
    );
    ExitCode::from(2)
}
