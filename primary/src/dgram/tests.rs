use super::*;

#[test]
fn udp_specs_parse() {
    let s = parse_udp("127.0.0.1:5000,127.0.0.2:6000").unwrap();
    assert_eq!(
        s,
        DgramSpec::Udp {
            local: "127.0.0.1:5000".parse().unwrap(),
            remote: "127.0.0.2:6000".parse().unwrap()
        }
    );
    assert!(
        matches!(parse_udp("[::1]:5000,[::1]:6000"), Ok(DgramSpec::Udp { local, .. }) if local.is_ipv6())
    );
    for bad in [
        "",
        "127.0.0.1:5000",
        "127.0.0.1,127.0.0.1:6000",
        "127.0.0.1:5000,host:6000",
        "127.0.0.1:5000,[::1]:6000",
        "127.0.0.1:5000,127.0.0.1:0",
        "127.0.0.1:5000,0.0.0.0:6000",
        "127.0.0.1:0,127.0.0.1:6000",
        "127.0.0.1:70000,127.0.0.1:6000",
        "::1:5000,::1:6000",
    ] {
        let e = parse_udp(bad).unwrap_err();
        assert!(e.starts_with("--udp"), "{bad:?}: {e}");
    }
}

#[test]
fn queue_pair_k_uses_port_plus_k() {
    let (l, r) = DgramSpec::udp_addrs(
        "127.0.0.1:5000".parse().unwrap(),
        "[::1]:6000".parse().unwrap(),
        3,
        Remotes::PerQueuePair,
    )
    .unwrap();
    assert_eq!(l, "127.0.0.1:5003".parse().unwrap());
    assert_eq!(r, "[::1]:6003".parse().unwrap());
    assert!(matches!(
        DgramSpec::udp_addrs(
            "127.0.0.1:65535".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            1,
            Remotes::PerQueuePair,
        ),
        Err(DgramError::PortRange { port: 65535, qp: 1 })
    ));
}

#[test]
fn the_qemu_peer_mirrors_our_addresses() {
    let udp = parse_udp("[::1]:5000,[::1]:6000").unwrap();
    assert_eq!(
        udp.qemu_peer(1, 2, Remotes::PerQueuePair).unwrap(),
        "-netdev dgram,id=peer1,local.type=inet,local.host=::1,local.port=6001,remote.type=inet,remote.host=::1,remote.port=5001"
    );
    let unix = parse_unix("/t/q,/t/p").unwrap();
    assert_eq!(
        unix.qemu_peer(0, 1, Remotes::PerQueuePair).unwrap(),
        "-netdev dgram,id=peer0,local.type=unix,local.path=/t/p,remote.type=unix,remote.path=/t/q"
    );
}

#[test]
fn unix_specs_parse_and_suffix() {
    let s = parse_unix("/tmp/a.sock,/tmp/b.sock").unwrap();
    assert_eq!(
        s,
        DgramSpec::Unix {
            local: "/tmp/a.sock".into(),
            remote: "/tmp/b.sock".into()
        }
    );
    for bad in ["", "/tmp/a", ",/tmp/b", "/tmp/a,", "/tmp/a,/tmp/a"] {
        assert!(parse_unix(bad).is_err(), "{bad:?}");
    }
    assert!(parse_unix(&format!("/{},/b", "x".repeat(110))).is_err());
    let (a, b) = (Path::new("/t/a"), Path::new("/t/b"));
    assert_eq!(
        DgramSpec::unix_paths(a, b, 0, 1, Remotes::PerQueuePair),
        (PathBuf::from("/t/a"), PathBuf::from("/t/b"))
    );
    assert_eq!(
        DgramSpec::unix_paths(a, b, 2, 4, Remotes::PerQueuePair),
        (PathBuf::from("/t/a.2"), PathBuf::from("/t/b.2"))
    );
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qpnet-dgram-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn unix_sockets_connect_to_their_peer_per_queue_pair() {
    let d = temp_dir("unix");
    let peers: Vec<UnixDatagram> = (0..2)
        .map(|k| UnixDatagram::bind(d.join(format!("peer.{k}"))).unwrap())
        .collect();
    // A stale file where qp 1 binds is removed.
    drop(UnixDatagram::bind(d.join("ours.1")).unwrap());
    let spec = DgramSpec::Unix {
        local: d.join("ours"),
        remote: d.join("peer"),
    };
    let socks = DgramSockets::open(&spec, 2, Remotes::PerQueuePair).unwrap();
    for (k, peer) in peers.iter().enumerate() {
        let fd = socks.queue(k).unwrap();
        nix::unistd::write(fd, &[k as u8; 20]).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[k as u8; 20]);
        assert_eq!(
            from.as_pathname().unwrap(),
            d.join(format!("ours.{k}")).as_path()
        );
    }
    // A path in use is refused; the bound ones go away with the sockets.
    assert!(matches!(
        DgramSockets::open(&spec, 2, Remotes::PerQueuePair),
        Err(DgramError::InUse(_))
    ));
    drop(socks);
    assert!(!d.join("ours.0").exists());
    let spec_nopeer = DgramSpec::Unix {
        local: d.join("x"),
        remote: d.join("nobody"),
    };
    assert!(matches!(
        DgramSockets::open(&spec_nopeer, 1, Remotes::PerQueuePair),
        Err(DgramError::NoPeer(_))
    ));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn udp_sockets_use_port_plus_k() {
    let peers: Vec<std::net::UdpSocket> = (0..2)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    // Two consecutive free ports are not guaranteed: only qp 0 to a random one.
    let remote = peers[0].local_addr().unwrap();
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = probe.local_addr().unwrap();
    drop(probe);
    let socks =
        DgramSockets::open(&DgramSpec::Udp { local, remote }, 1, Remotes::PerQueuePair).unwrap();
    nix::unistd::write(socks.queue(0).unwrap(), b"frame").unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = peers[0].recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"frame");
    assert_eq!(from, local);
}

#[test]
fn a_single_peer_is_the_remote_of_every_queue_pair() {
    let (l, r) = DgramSpec::udp_addrs(
        "127.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:6000".parse().unwrap(),
        3,
        Remotes::Single,
    )
    .unwrap();
    assert_eq!(l, "127.0.0.1:5003".parse().unwrap());
    assert_eq!(r, "127.0.0.1:6000".parse().unwrap());
    let (a, b) = (Path::new("/t/a"), Path::new("/t/b"));
    assert_eq!(
        DgramSpec::unix_paths(a, b, 2, 4, Remotes::Single),
        (PathBuf::from("/t/a.2"), PathBuf::from("/t/b"))
    );
    // The one QEMU peer sends to queue pair 0's address.
    let udp = parse_udp("127.0.0.1:5000,127.0.0.1:6000").unwrap();
    assert_eq!(
        udp.qemu_peer(0, 2, Remotes::Single).unwrap(),
        "-netdev dgram,id=peer0,local.type=inet,local.host=127.0.0.1,local.port=6000,remote.type=inet,remote.host=127.0.0.1,remote.port=5000"
    );
}

#[test]
fn unix_sockets_of_every_queue_pair_reach_a_single_peer() {
    let d = temp_dir("single");
    let peer = UnixDatagram::bind(d.join("peer")).unwrap();
    let spec = DgramSpec::Unix {
        local: d.join("ours"),
        remote: d.join("peer"),
    };
    let socks = DgramSockets::open(&spec, 2, Remotes::Single).unwrap();
    for k in 0..2 {
        nix::unistd::write(socks.queue(k).unwrap(), &[k as u8; 20]).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[k as u8; 20]);
        assert_eq!(
            from.as_pathname().unwrap(),
            d.join(format!("ours.{k}")).as_path()
        );
    }
    drop(socks);
    let _ = std::fs::remove_dir_all(&d);
}
