//! The worker's seccomp allow-list: exactly the system calls a running
//! worker makes, found by tracing workers (`strace -f`) through the
//! `data_path` tests, then checked by running the whole suite with the
//! filter in log mode (no call outside it was logged); kept here in one
//! list. Any other call kills the
//! process (`SECCOMP_RET_KILL_PROCESS`); the kernel logs it (an audit
//! record with the PID and the call's number) and the primary, seeing its
//! worker killed by SIGSYS, logs the call and supervises it like any other
//! crash.
//!
//! Installed last, once namespaces, user and capabilities are set: none of
//! the calls that set them is allowed afterwards. Not allowed, among
//! others: opening or creating anything (`openat`, `socket`, `memfd_create`,
//! `eventfd2`, `pipe2`; fds arrive only on the control socket), `ioctl`,
//! `execve`, `clone`/`fork` (a worker has one thread), `ptrace`,
//! `process_vm_*`, `kill` of others, namespace and mount calls, `bpf`,
//! `io_uring_*`, `keyctl`, `perf_event_open`, `userfaultfd`. Memory may not
//! be made executable (`mmap`, `mprotect` without `PROT_EXEC`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;

/// The calls a worker may make with any arguments.
const ALLOWED: &[i64] = &[
    // The data path: frames, kicks, calls, the control channel.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_ppoll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    // The fds that arrive: their flags, their kind and size, closing them.
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getsockopt,
    // A stream peer that broke the framing: its connection is shut down.
    libc::SYS_shutdown,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // Memory: guest memory regions, the shared region, the allocator.
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // The flow table's process-shared locks.
    libc::SYS_futex,
    // Time, identity and entropy (std's hash maps, the log's lines).
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getrandom,
    // Signals, and leaving.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A rule that holds when argument `arg` has no bit of `mask` set.
fn without_bits(arg: u8, mask: u64) -> Result<SeccompRule, seccompiler::Error> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?;
    Ok(SeccompRule::new(vec![cond])?)
}

/// A rule that holds when argument `arg` equals `value`.
fn equal(arg: u8, value: u64) -> Result<SeccompRule, seccompiler::Error> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)?;
    Ok(SeccompRule::new(vec![cond])?)
}

/// A filter for this architecture that allows the calls in `allowed` with
/// any arguments, those in `rules` when one of their rules holds, and kills
/// the process on any other (`SECCOMP_RET_KILL_PROCESS`): the form of both
/// the worker's filter and the primary's.
pub fn kill_unless_allowed(
    allowed: &[i64],
    mut rules: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<BpfProgram, seccompiler::Error> {
    for &nr in allowed {
        rules.entry(nr).or_default();
    }
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}

/// The worker's filter, as BPF for this architecture.
fn program() -> Result<BpfProgram, seccompiler::Error> {
    let exec = libc::PROT_EXEC as u64;
    // abort(): a signal to this process only.
    let me = std::process::id() as u64;
    let rules = BTreeMap::from([
        (libc::SYS_mmap, vec![without_bits(2, exec)?]),
        (libc::SYS_mprotect, vec![without_bits(2, exec)?]),
        (libc::SYS_tgkill, vec![equal(0, me)?]),
    ]);
    kill_unless_allowed(ALLOWED, rules)
}

/// Build and install the filter on this (the worker's only) thread.
pub(super) fn install() -> Result<(), SandboxError> {
    let bpf = program().map_err(SandboxError::Seccomp)?;
    seccompiler::apply_filter(&bpf).map_err(SandboxError::Seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_architecture() {
        let bpf = program().expect("worker filter");
        assert!(!bpf.is_empty());
    }
}
