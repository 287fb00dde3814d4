//! The kernel's log (`/dev/kmsg`), read for one fact: which system call a
//! worker killed by its seccomp filter made.
//!
//! A process killed by `SECCOMP_RET_KILL_PROCESS` dies of SIGSYS, and its
//! exit status says nothing more; the kernel's audit record of the kill
//! (`type=1326 ... pid=PID ... syscall=NR`) has the call. With no audit
//! daemon the record goes to the kernel log. The log is opened at start,
//! while the primary may still open it (`CAP_SYSLOG` when
//! `kernel.dmesg_restrict` is 1), and read from its end then on. Where it
//! cannot be read, or an audit daemon takes the records, a kill is logged
//! without the call (and says where to look).

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long to wait for the record once the kill is seen: the kernel's
/// audit thread writes it a moment after the process is gone.
const RECORD_WAIT: Duration = Duration::from_millis(200);

struct KernelLog {
    file: File,
    /// Seccomp kills already read: pid -> system call number.
    seen: HashMap<u32, i64>,
}

static LOG: OnceLock<Mutex<KernelLog>> = OnceLock::new();

/// Open the kernel log at its end. Best effort: without it, kills are
/// logged without the call.
pub fn open() {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/kmsg");
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "cannot read the kernel log (/dev/kmsg: {e}): a worker killed by its seccomp \
                 filter will be logged without the system call it made"
            );
            return;
        }
    };
    use std::io::Seek;
    if let Err(e) = file.seek(std::io::SeekFrom::End(0)) {
        log::warn!("cannot seek to the end of /dev/kmsg: {e}");
        return;
    }
    let _ = LOG.set(Mutex::new(KernelLog {
        file,
        seen: HashMap::new(),
    }));
}

/// The system call whose refusal by seccomp killed process `pid`, from the
/// kernel's audit record (waiting a moment for it).
pub fn forbidden_call(pid: u32) -> Option<i64> {
    let mut log = LOG.get()?.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        log.read_new();
        if let Some(nr) = log.seen.remove(&pid) {
            return Some(nr);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl KernelLog {
    /// Read every record written since the last read.
    fn read_new(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some((pid, nr)) = parse_seccomp_kill(&String::from_utf8_lossy(&buf[..n]))
                    {
                        self.seen.insert(pid, nr);
                    }
                }
                // Records overwritten before we read them: go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

/// `(pid, system call)` of a kernel-log record of a seccomp kill
/// (`... audit: type=1326 ... pid=N ... sig=31 ... syscall=NR ...`).
fn parse_seccomp_kill(record: &str) -> Option<(u32, i64)> {
    if !record.contains("type=1326") {
        return None;
    }
    let field = |name: &str| {
        record
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    };
    // sig=0 is a logged (allowed) call, not a kill.
    if field("sig")? == "0" {
        return None;
    }
    Some((field("pid")?.parse().ok()?, field("syscall")?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pid_and_call_of_a_seccomp_kill() {
        let kill =
            "5,1234,22186413878,-;audit: type=1326 audit(1796138787.043:2): auid=4294967295 \
                    uid=65534 gid=65534 ses=4294967295 pid=28068 comm=\"qpnet\" exe=\"/x/qpnet\" \
                    sig=31 arch=c000003e syscall=41 compat=0 ip=0x7fcb4c25d829 code=0x80000000\n";
        assert_eq!(parse_seccomp_kill(kill), Some((28068, 41)));
        let logged = kill.replace("sig=31", "sig=0");
        assert_eq!(parse_seccomp_kill(&logged), None);
        assert_eq!(
            parse_seccomp_kill("6,1,2,-;qpbt: entered promiscuous mode\n"),
            None
        );
        // The pid of "ppid=" or "auid=" is not taken for the process's.
        let other = kill.replace(" pid=28068", " ppid=1");
        assert_eq!(parse_seccomp_kill(&other), None);
    }
}
