use std::os::fd::OwnedFd;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag};

use super::*;

fn pair(kind: SockType) -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC).unwrap()
}

fn send(fd: &OwnedFd, bytes: &[u8]) {
    nix::unistd::write(fd, bytes).unwrap();
}

#[test]
fn skipping_the_header_straddles_entries() {
    let mut a = [1u8; 4];
    let mut b = [2u8; 10];
    let list = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let mut out = Vec::new();
    assert!(skip_front(&list, 6, &mut out));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].iov_len, 8);
    assert_eq!(out[0].iov_base as usize, b.as_ptr() as usize + 2);
    assert!(skip_front(&list, 4, &mut out));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].iov_len, 10);
    assert!(skip_front(&list, 14, &mut out));
    assert!(out.is_empty());
    assert!(!skip_front(&list, 15, &mut out));
}

#[test]
fn a_datagram_arrives_behind_a_zero_header_with_its_full_length() {
    let (ours, peer) = pair(SockType::Datagram);
    let io = Datagram::attach(ours).unwrap();
    assert!(!io.has_frame());
    let mut buf = [0xffu8; 12 + 20];
    assert_eq!(
        io.read_into(&mut buf, 12).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    send(&peer, &[7u8; 14]);
    assert!(io.has_frame());
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 14);
    assert_eq!(&buf[..12], &[0u8; 12]);
    assert_eq!(&buf[12..26], &[7u8; 14]);
    // Longer than the buffer: the full length says it was cut.
    send(&peer, &[9u8; 100]);
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 100);
    // Empty: the header alone.
    send(&peer, &[]);
    assert_eq!(io.read_into(&mut buf, 10).unwrap(), 10);
    assert!(
        io.read_into(&mut buf[..4], 10).is_err(),
        "shorter than the header"
    );
}

#[test]
fn only_datagram_sockets_are_taken() {
    let (ours, _peer) = pair(SockType::Stream);
    assert!(Datagram::attach(ours).is_err());
}

#[test]
fn peer_faults_are_told_apart() {
    let of = |n| PeerFault::of(&io::Error::from_raw_os_error(n));
    assert_eq!(of(libc::ECONNREFUSED), Some(PeerFault::Gone));
    assert_eq!(of(libc::ENOTCONN), Some(PeerFault::Gone));
    assert_eq!(of(libc::ENOENT), Some(PeerFault::Gone));
    assert_eq!(of(libc::EMSGSIZE), Some(PeerFault::TooLarge));
    assert_eq!(of(libc::EIO), None);
    assert_eq!(PeerFault::of(&io::Error::other("x")), None);
}

#[test]
fn a_pending_icmp_error_is_taken_once() {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = closed.local_addr().unwrap();
    drop(closed);
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(to).unwrap();
    let io = Datagram::attach(OwnedFd::from(s)).unwrap();
    assert!(io.take_error().is_none());
    nix::unistd::write(&io.fd, b"frame").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let e = loop {
        if let Some(e) = io.take_error() {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ICMP error came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_eq!(PeerFault::of(&e), Some(PeerFault::Gone));
    assert!(io.take_error().is_none(), "taking it clears it");
}
