//! Unit tests of the `/proc` readers: parsing, and pinned handles on
//! real processes.

use super::*;
use crate::wait::wait_for;
use std::process::Command;

#[test]
fn stat_lines_are_parsed_even_with_odd_command_names() {
    let line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                7 3 0 0 20 0 1 0 123456 1000 10 18446744073709551615";
    let s = Stat::parse(line).unwrap();
    assert_eq!(
        (s.state, s.ppid, s.pgrp, s.utime_ticks, s.stime_ticks),
        ('S', 17, 4242, 7, 3)
    );
    assert_eq!(s.start_ticks, 123456);
    assert!(!s.is_dead());
    assert!(Stat::parse("4242 (x) Z 1").is_none());
    assert!(Stat::parse("garbage").is_none());
}

#[test]
fn our_own_stat_is_read() {
    let me = ProcHandle::me().unwrap();
    let s = me.stat().unwrap();
    assert!(s.start_ticks > 0 && s.ppid > 0);
    assert!("RS".contains(s.state), "state {}", s.state);
    assert!(me.fate().is_none(), "a live process has no fate yet");
    assert!(me.fd_count().unwrap() >= 3);
    assert!(me.rss_kib().unwrap() > 0);
}

#[test]
fn a_handle_follows_its_process_and_never_another() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let h = ProcHandle::of(child.id()).unwrap();
    let me = std::process::id();
    assert!(children_of(me).contains(&child.id()));
    assert!(ProcHandle::me()
        .unwrap()
        .children()
        .iter()
        .any(|c| c.pid() == child.id()));
    assert_eq!(h.ppid(), Some(me));
    wait_for("the child to exec sleep", Duration::from_secs(5), || {
        h.cmdline().as_deref() == Some("sleep 30")
    })
    .unwrap();
    assert_eq!(h.comm().as_deref(), Some("sleep"));
    // A wrong start time is refused: that would be another process.
    assert!(ProcHandle::with_start(child.id(), h.start_ticks() + 1).is_err());
    assert!(ProcHandle::with_start(child.id(), h.start_ticks()).is_ok());
    h.signal(Signal::SIGKILL).unwrap();
    wait_for("the child to die", Duration::from_secs(5), || {
        h.has_exited()
    })
    .unwrap();
    // A zombie: exited, not reaped; its fate is read by reaping it.
    assert_eq!(h.state(), Some('Z'));
    assert!(!h.is_reaped());
    assert_eq!(h.fate().as_deref(), Some("killed by SIGKILL"));
    // Reaped: the handle refuses everything, whatever has the pid now.
    assert!(h.is_reaped());
    assert!(h.stat().is_none() && h.cmdline().is_none());
    assert!(h.signal(Signal::SIGKILL).is_err());
    assert!(h.fds().is_err());
    assert_eq!(h.fate().as_deref(), Some("gone"));
    let _ = child.wait();
    assert!(!children_of(me).contains(&child.id()));
}

#[test]
fn fds_and_cpu_time_are_read() {
    let mut busy = Command::new("sh")
        .args(["-c", "exec 7</dev/null; while :; do :; done"])
        .spawn()
        .unwrap();
    let h = ProcHandle::of(busy.id()).unwrap();
    wait_for("fd 7 to be open", Duration::from_secs(5), || {
        h.fds()
            .is_ok_and(|f| f.iter().any(|e| e.fd == 7 && e.target == "/dev/null"))
    })
    .unwrap();
    let fd7 = h.fds().unwrap().into_iter().find(|e| e.fd == 7).unwrap();
    assert!(fd7.info_field("flags").is_some(), "{}", fd7.info);
    assert!(fd7.dev_ino.is_some());
    let t0 = h.cpu_time().unwrap();
    wait_for("CPU time to grow", Duration::from_secs(5), || {
        h.cpu_time()
            .is_ok_and(|t| t >= t0 + Duration::from_millis(20))
    })
    .unwrap();
    busy.kill().unwrap();
    busy.wait().unwrap();
    assert!(h.cpu_time().is_err());
}

#[test]
fn eventfds_are_recognised_across_processes_by_id() {
    let a = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let b = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let (ia, ib) = (own_eventfd_id(&a).unwrap(), own_eventfd_id(&b).unwrap());
    assert_ne!(ia, ib);
    let me = ProcHandle::me().unwrap();
    let fds = me.fds().unwrap();
    let seen = fds
        .iter()
        .find(|f| f.fd == a.as_raw_fd())
        .and_then(|f| f.info_field("eventfd-id")?.parse::<u64>().ok());
    assert_eq!(seen, Some(ia));
}

#[test]
fn listening_sockets_are_found_in_proc_net_unix() {
    let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4711 /tmp/x/vhost.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 4712 /tmp/x/vhost.sock\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 4713 /tmp/y.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 4714\n";
    assert_eq!(listening_inodes(table, "/tmp/x/vhost.sock"), vec![4711]);
    assert!(listening_inodes(table, "/tmp/z.sock").is_empty());
    // And a real one, held by this process.
    let dir = std::env::temp_dir().join(crate::unique_name());
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("l.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert!(ProcHandle::me().unwrap().listens_on(&path));
    drop(l);
    assert!(!ProcHandle::me().unwrap().listens_on(&path));
    std::fs::remove_dir_all(dir).unwrap();
}
