use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::*;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qpnet-stream-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Service the links until `done` or 2 s; returns the queue pairs that got
/// a connection meanwhile.
fn service_until(links: &mut StreamLinks, done: impl Fn(&StreamLinks) -> bool) -> Vec<usize> {
    let until = Instant::now() + Duration::from_secs(2);
    let mut new = Vec::new();
    while !done(links) && Instant::now() < until {
        let fds = links.poll_fds();
        let mut pfds: Vec<nix::poll::PollFd<'_>> = fds
            .iter()
            .map(|&(_, w, fd)| nix::poll::PollFd::new(fd, w.flags()))
            .collect();
        let _ = nix::poll::poll(&mut pfds, nix::poll::PollTimeout::from(10u8));
        let fired: Vec<(usize, Watch)> = fds
            .iter()
            .zip(&pfds)
            .filter(|(_, p)| Watch::fired(p))
            .map(|(&(qp, w, _), _)| (qp, w))
            .collect();
        drop(pfds);
        new.extend(links.service(&fired));
    }
    new
}

#[test]
fn a_peer_not_there_yet_is_connected_once_it_listens() {
    let d = dir("late");
    let path = d.join("peer.sock");
    let spec = StreamSpec::Unix(path.clone());
    let mut links = StreamLinks::open(&spec, false, 1).unwrap();
    assert!(links.queue(0).is_none());
    assert!(links.deadline().is_some(), "a retry is scheduled");
    let peer = UnixListener::bind(&path).unwrap();
    let new = service_until(&mut links, |l| l.queue(0).is_some());
    assert_eq!(new, vec![0]);
    let (mut conn, _) = peer.accept().unwrap();
    // The peer closes: the link sees it end and connects again.
    drop(conn.write_all(b"x"));
    drop(conn);
    service_until(&mut links, |l| l.queue(0).is_none());
    assert!(links.queue(0).is_none());
    let new = service_until(&mut links, |l| l.queue(0).is_some());
    assert_eq!(new, vec![0]);
    assert!(peer.accept().is_ok());
}

#[test]
fn each_queue_pair_connects_to_its_own_path() {
    let d = dir("multi");
    let base = d.join("p.sock");
    let peers: Vec<UnixListener> = (0..3)
        .map(|k| UnixListener::bind(format!("{}.{k}", base.display())).unwrap())
        .collect();
    let mut links = StreamLinks::open(&StreamSpec::Unix(base), false, 3).unwrap();
    for k in 0..3 {
        assert!(links.queue(k).is_some(), "queue pair {k} connected at once");
    }
    for p in &peers {
        p.set_nonblocking(true).unwrap();
        assert!(p.accept().is_ok());
    }
    assert!(links.service(&[]).is_empty());
}

#[test]
fn listening_takes_one_connection_per_queue_pair_and_refuses_a_second() {
    let d = dir("listen");
    let path = d.join("l.sock");
    let mut links = StreamLinks::open(&StreamSpec::Unix(path.clone()), true, 1).unwrap();
    assert!(links.deadline().is_none(), "a listener does not retry");
    let _first = UnixStream::connect(&path).unwrap();
    assert_eq!(service_until(&mut links, |l| l.queue(0).is_some()), vec![0]);
    let mut second = UnixStream::connect(&path).unwrap();
    service_until(&mut links, |_| false);
    let mut b = [0u8; 1];
    assert_eq!(second.read(&mut b).unwrap(), 0, "the second one is closed");
    // A path that a live listener holds is refused.
    assert!(matches!(
        StreamLinks::open(&StreamSpec::Unix(path.clone()), true, 1),
        Err(StreamError::PathExists(_))
    ));
    drop(links);
    assert!(!path.exists(), "the socket file goes with the links");
}

#[test]
fn a_reset_closes_the_connection_for_the_peer_and_makes_a_new_one() {
    let d = dir("reset");
    let path = d.join("r.sock");
    let peer = UnixListener::bind(&path).unwrap();
    let mut links = StreamLinks::open(&StreamSpec::Unix(path), false, 1).unwrap();
    let (mut conn, _) = peer.accept().unwrap();
    links.reset(0);
    assert!(links.queue(0).is_none());
    let mut b = [0u8; 1];
    assert_eq!(conn.read(&mut b).unwrap(), 0, "the peer sees the end");
    assert_eq!(service_until(&mut links, |l| l.queue(0).is_some()), vec![0]);
    assert!(peer.accept().is_ok());
}

#[test]
fn tcp_connects_to_port_plus_k() {
    let l0 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l0.local_addr().unwrap().port();
    let spec = parse_stream(&format!("tcp:127.0.0.1:{port}")).unwrap();
    let mut links = StreamLinks::open(&spec, false, 1).unwrap();
    service_until(&mut links, |l| l.queue(0).is_some());
    assert!(links.queue(0).is_some());
    assert!(l0.accept().is_ok());
}
