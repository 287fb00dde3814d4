//! Who may connect: the listening socket is owner-only (0600) unless
//! `--socket-group` shares it with a group (0660); every VMM connection's
//! peer credentials are logged; with `--allow-uid` a connection from
//! another uid is closed before a request is read, logged, and the next
//! VMM is served as usual. A second VMM, or a flood of connections, while
//! one is served, waits in the kernel's listen queue and touches nothing.
//!
//! Needs root and `$QPNET_BIN`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Group, User};
use qpnet_tests::qpnet::Options;
use qpnet_tests::raw_vhost::{req, RawVhostUser, Reply, FLAG_VERSION};
use qpnet_tests::testbed::Testbed;
use qpnet_tests::traffic::{tx_round, Strays};
use qpnet_tests::vmm::VmmConfig;
use qpnet_tests::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(10);

fn mode(path: &Path) -> Result<(u32, u32)> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.permissions().mode() & 0o777, m.gid()))
}

/// Connect to `path` as `uid`:`gid` in a child process and wait for the
/// far end to close the connection; the child's exit status says what
/// happened (0: closed by qpnet, 2: connect failed, 3: still open after
/// 3 s, 4: could not change user).
fn connect_as(path: &Path, uid: u32, gid: u32) -> Result<(i32, i32)> {
    // Everything the child needs is prepared before the fork: it makes only
    // system calls (the test process has other threads).
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    ensure!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only makes async-signal-safe system calls on data
    // prepared above and ends with _exit; the parent waits for it.
    match unsafe { fork() }? {
        ForkResult::Child => {
            // SAFETY: plain system calls on our own stack data (see above).
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    libc::_exit(4);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                    libc::_exit(2);
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                let mut buf = [0u8; 16];
                if libc::poll(&mut pfd, 1, 3000) == 1
                    && libc::read(fd, buf.as_mut_ptr().cast(), 16) == 0
                {
                    libc::_exit(0);
                }
                libc::_exit(3);
            }
        }
        ForkResult::Parent { child } => match waitpid(child, None)? {
            WaitStatus::Exited(pid, code) => Ok((pid.as_raw(), code)),
            other => bail!("the connecting child ended as {other:?}"),
        },
    }
}

#[test]
fn the_socket_is_owner_only_and_each_vmm_is_logged_with_its_credentials() -> Result<()> {
    let mut bed = Testbed::new(1)?;
    let r = (|| -> Result<()> {
        let (m, _) = mode(bed.qpnet.socket())?;
        ensure!(m == 0o600, "socket mode {m:o}, expected 600");
        let mut vmm = bed.vmm(VmmConfig::default())?;
        tx_round(&mut vmm, &bed.tap, &[0], 0..10, Strays::Refused, TIMEOUT)?;
        let me = std::process::id();
        ensure!(
            bed.qpnet
                .stderr()
                .contains(&format!("VMM connected: pid {me} uid 0 gid 0")),
            "the connection's credentials are not in the log:\n{}",
            bed.qpnet.stderr()
        );
        Ok(())
    })();
    bed.explain(r)?;
    bed.finish()
}

#[test]
fn a_peer_outside_allow_uid_is_refused_and_the_next_vmm_is_served() -> Result<()> {
    let nobody = User::from_name("nobody")?.context("this machine has no user nobody")?;
    let group = Group::from_name("nogroup")?.context("this machine has no group nogroup")?;
    let opts = Options::args(&["--socket-group", "nogroup", "--allow-uid", "0"]);
    let mut bed = Testbed::with_options(1, &opts)?;
    let r = (|| -> Result<()> {
        let socket = bed.qpnet.socket().to_path_buf();
        // The socket is 0600 from its creation, 0660 with the group a
        // moment later (before the first VMM is served).
        let want = |(m, gid): (u32, u32)| m == 0o660 && gid == group.gid.as_raw();
        let _ = wait_for("the socket shared with the group", TIMEOUT, || {
            mode(&socket).is_ok_and(want)
        });
        let (m, gid) = mode(&socket)?;
        ensure!(
            m == 0o660 && gid == group.gid.as_raw(),
            "socket mode {m:o} group {gid}, expected 660 and nogroup ({})",
            group.gid
        );
        let (pid, code) = connect_as(&socket, nobody.uid.as_raw(), group.gid.as_raw())?;
        ensure!(
            code == 0,
            "a connection from uid {} was not closed by qpnet (child exit {code})",
            nobody.uid
        );
        let line = format!(
            "refused a VMM connection: pid {pid} uid {} gid {}: uid not in --allow-uid",
            nobody.uid, group.gid
        );
        let qpnet = &bed.qpnet;
        wait_for("the refusal in the log", TIMEOUT, || {
            qpnet.stderr().contains(&line)
        })
        .with_context(|| format!("no {line:?} in:\n{}", qpnet.stderr()))?;
        // The next VMM (root, allowed) is served as usual.
        let mut vmm = bed.vmm(VmmConfig::default())?;
        tx_round(&mut vmm, &bed.tap, &[0], 0..10, Strays::Refused, TIMEOUT)?;
        Ok(())
    })();
    bed.explain(r)?;
    bed.finish()
}

/// A connection attempt that does not wait: connected (queued in the
/// listener's backlog) or refused by the kernel when the backlog is full.
fn connect_nowait(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// A second VMM connecting while one is served waits: its request is not
/// read, and the first one keeps forwarding, until the first leaves; then
/// the second is answered. A flood of 2,000 more connections costs the
/// primary not one fd: they wait in the kernel's listen queue, or the
/// kernel refuses them once it is full.
#[test]
fn a_second_vmm_waits_and_a_flood_of_connections_costs_the_primary_no_fd() -> Result<()> {
    let mut bed = Testbed::new(2)?;
    let r = (|| -> Result<()> {
        let socket = bed.qpnet.socket().to_path_buf();
        let both = VmmConfig {
            queue_pairs: 2,
            ..VmmConfig::default()
        };
        let mut first = bed.vmm(both.clone())?;
        tx_round(
            &mut first,
            &bed.tap,
            &[0, 1],
            0..20,
            Strays::Refused,
            TIMEOUT,
        )?;
        let before = bed.qpnet.primary().fd_count()?;
        let mut second = RawVhostUser::connect(&socket, TIMEOUT)?;
        second.send(req::GET_FEATURES, FLAG_VERSION, &[], &[])?;
        let (mut flood, mut refused) = (Vec::new(), 0);
        for _ in 0..2_000 {
            match connect_nowait(&socket) {
                Ok(fd) => flood.push(fd),
                Err(_) => refused += 1,
            }
        }
        eprintln!(
            "flood: {} queued, {refused} refused by the kernel",
            flood.len()
        );
        tx_round(
            &mut first,
            &bed.tap,
            &[0, 1],
            20..60,
            Strays::Refused,
            TIMEOUT,
        )?;
        let during = bed.qpnet.primary().fd_count()?;
        ensure!(
            during == before,
            "the primary's fds went from {before} to {during} during the flood"
        );
        second.set_reply_timeout(Duration::from_millis(300));
        let early = second.recv_reply(req::GET_FEATURES)?;
        ensure!(
            early == Reply::Silent,
            "the second VMM was answered while the first is served: {early:?}"
        );
        drop(flood);
        drop(first);
        second.set_reply_timeout(TIMEOUT);
        match second.recv_reply(req::GET_FEATURES)? {
            Reply::Value(f) if f != 0 => {}
            other => bail!("the second VMM, once the first left, got {other:?}"),
        }
        drop(second);
        // The flood's dead connections drained, the next VMM is served.
        let mut next = bed.vmm(both)?;
        tx_round(
            &mut next,
            &bed.tap,
            &[0, 1],
            60..80,
            Strays::Ignored,
            TIMEOUT,
        )?;
        Ok(())
    })();
    bed.explain(r)?;
    bed.finish()
}
