//! The primary's seccomp allow-list, installed once it is set up (TAP
//! queues open, socket bound, shared region made, capabilities cut to
//! `PRIMARY_CAPABILITIES`), on all its threads.
//!
//! A filter is inherited across fork and exec, so this one also covers
//! what a worker does before its own, tighter filter is in place: the
//! child's steps between fork and exec, the dynamic loader, and the
//! worker's sandbox set-up (user, namespaces, Landlock or an empty root,
//! capabilities).
//! Those calls are here too, marked as such. Calls never made by either
//! are refused by killing the process (`SECCOMP_RET_KILL_PROCESS`), among
//! them `ptrace`, `process_vm_readv`/`writev`, `bpf`, `io_uring_*`,
//! `perf_event_open`, `keyctl`, `add_key`, `request_key`, `userfaultfd`,
//! `open_by_handle_at`, `setns`, module and kexec calls, `reboot`,
//! `swapon`, `mknod`, `chroot`, clock and host-name setting.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::BpfProgram;

/// Every call the primary and its workers' start-up make.
const ALLOWED: &[i64] = &[
    // Serving the VMM: the socket, messages with fds, polling.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    // fds: the TAP's settings (TUNSETOFFLOAD, TUNSETVNETHDRSZ, SIOCGIFMTU,
    // SIOCOUTQ on the VMM socket), checks, copies, closing.
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_dup2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_eventfd2,
    libc::SYS_memfd_create,
    libc::SYS_pipe2,
    // The runtime directory and the socket path: the lock, the stale
    // socket, files of /proc (fd kinds, locks, status), removal at exit.
    libc::SYS_openat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_flock,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    // Workers: start (fork+exec of this binary), watch (pidfds), signal,
    // reap; its own threads.
    libc::SYS_clone,
    libc::SYS_clone3,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    // Signals (the signalfd the primary blocks its signals into).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd4,
    libc::SYS_restart_syscall,
    // Time, identity, limits, entropy.
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_uname,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_getrandom,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Connecting a stream again to a unix socket of another user, with that
    // user's file-system identity (`stream::connect_as_owner`).
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    // A worker's sandbox set-up, before its own filter (`qpnet_secondary`'s
    // sandbox): its user, capabilities, namespaces, Landlock (or an empty
    // root), filter.
    libc::SYS_setgroups,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prctl,
    libc::SYS_unshare,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chdir,
    libc::SYS_seccomp,
];

fn program() -> Result<BpfProgram, seccompiler::Error> {
    qpnet_secondary::seccomp_kill_unless_allowed(ALLOWED, BTreeMap::new())
}

/// Install the primary's filter on every thread it has.
pub fn install() -> Result<()> {
    let bpf = program().context("building the primary's seccomp filter")?;
    seccompiler::apply_filter_all_threads(&bpf).context("installing the primary's seccomp filter")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filter_compiles_for_this_architecture() {
        assert!(!super::program().expect("primary filter").is_empty());
    }
}
