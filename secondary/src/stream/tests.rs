use std::os::fd::OwnedFd;

use nix::sys::socket::{setsockopt, socketpair, AddressFamily, SockFlag};

use super::*;

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

fn send(fd: &OwnedFd, bytes: &[u8]) {
    assert_eq!(nix::unistd::write(fd, bytes).unwrap(), bytes.len());
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn attached() -> (Stream, OwnedFd, SyncWord) {
    let (ours, peer) = pair();
    let sync = SyncWord::private();
    (Stream::attach(ours, sync.clone()).unwrap(), peer, sync)
}

fn would_block(r: io::Result<usize>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[test]
fn frames_sent_together_arrive_one_by_one_behind_a_zero_header() {
    let (io, peer, sync) = attached();
    let mut buf = [0xffu8; 12 + 100];
    assert!(!io.has_frame());
    assert!(would_block(io.read_into(&mut buf, 12)));
    let mut wire = framed(&[1u8; 14]);
    wire.extend(framed(&[2u8; 60]));
    send(&peer, &wire);
    assert!(io.has_frame());
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 14);
    assert_eq!(&buf[..12], &[0u8; 12]);
    assert_eq!(&buf[12..26], &[1u8; 14]);
    // The second is staged already: no byte is left in the socket.
    assert!(io.has_frame());
    assert!(!readable(io.as_fd()));
    assert_eq!(io.read_into(&mut buf, 10).unwrap(), 10 + 60);
    assert_eq!(&buf[10..70], &[2u8; 60]);
    assert!(would_block(io.read_into(&mut buf, 10)));
    assert_eq!(sync.get(), 0, "whole frames only: at a boundary");
}

#[test]
fn a_frame_sent_in_pieces_is_held_and_marked_until_whole() {
    let (io, peer, sync) = attached();
    let mut buf = [0u8; 12 + 200];
    let wire = framed(&[5u8; 150]);
    // Two bytes of the prefix, then most of the body, then the rest.
    send(&peer, &wire[..2]);
    assert!(would_block(io.read_into(&mut buf, 12)));
    assert_eq!(sync.get(), RX_PARTIAL);
    send(&peer, &wire[2..100]);
    assert!(would_block(io.read_into(&mut buf, 12)));
    assert_eq!(sync.get(), RX_PARTIAL);
    // The rest, and a whole frame after it: the held frame completes
    // without reading into the next one.
    let mut rest = wire[100..].to_vec();
    rest.extend(framed(&[6u8; 20]));
    send(&peer, &rest);
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 150);
    assert_eq!(&buf[12..162], &[5u8; 150][..]);
    assert_eq!(sync.get(), 0);
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 20);
    assert_eq!(sync.get(), 0);
}

#[test]
fn a_frame_larger_than_the_buffer_is_taken_whole_and_reported_by_length() {
    let (io, peer, _) = attached();
    let mut buf = [0u8; 12 + 50];
    let mut wire = framed(&[7u8; 1000]);
    wire.extend(framed(&[8u8; 30]));
    send(&peer, &wire);
    // Its full length says it did not fit (the caller drops it)...
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 1000);
    // ...and the stream is still in step.
    assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 30);
    assert_eq!(&buf[12..42], &[8u8; 30]);
}

#[test]
fn a_bad_length_prefix_shuts_the_connection_down() {
    for prefix in [0u32, 65_536, u32::MAX] {
        let (io, peer, _) = attached();
        let mut buf = [0u8; 200];
        let mut wire = framed(&[1u8; 20]);
        wire.extend(prefix.to_be_bytes());
        wire.extend([9u8; 30]);
        send(&peer, &wire);
        assert_eq!(io.read_into(&mut buf, 12).unwrap(), 12 + 20);
        let e = io.read_into(&mut buf, 12).unwrap_err();
        assert!(BadFraming::is(&e), "prefix {prefix}: {e}");
        assert!(io.ended());
        assert!(!io.has_frame());
        // The peer sees the connection end.
        let mut b = [0u8; 8];
        assert_eq!(nix::unistd::read(&peer, &mut b).unwrap(), 0);
    }
}

#[test]
fn the_largest_frame_passes() {
    let (io, peer, _) = attached();
    let body = vec![3u8; MAX_STREAM_FRAME];
    let wire = framed(&body);
    let writer = std::thread::spawn(move || {
        send(&peer, &wire);
        peer
    });
    let mut buf = vec![0u8; 12 + MAX_STREAM_FRAME];
    let n = loop {
        match io.read_into(&mut buf, 12) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(n, 12 + MAX_STREAM_FRAME);
    assert!(buf[12..].iter().all(|&b| b == 3));
    drop(writer.join().unwrap());
}

#[test]
fn a_closed_peer_ends_the_stream() {
    let (io, peer, _) = attached();
    drop(peer);
    let mut buf = [0u8; 64];
    let e = io.read_into(&mut buf, 12).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    assert!(io.ended());
    assert!(!io.has_frame());
}

#[test]
fn only_stream_sockets_are_taken() {
    let (ours, _peer) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::empty(),
    )
    .unwrap();
    assert!(Stream::attach(ours, SyncWord::private()).is_err());
}

#[test]
fn whole_frames_stop_at_the_first_incomplete_or_bad_one() {
    let mut wire = framed(&[1; 3]);
    wire.extend(framed(&[2; 5]));
    let two = wire.len();
    wire.extend(&framed(&[3; 9])[..6]);
    assert_eq!(whole_frames(&wire), two);
    let mut bad = framed(&[1; 3]);
    bad.extend(0u32.to_be_bytes());
    assert_eq!(whole_frames(&bad), 7);
    assert_eq!(whole_frames(&[0, 0]), 0);
}

/// A frame of `len` bytes (`fill`) behind a 12-byte header in guest memory,
/// written through `io`.
fn write_guest_frame(io: &Stream, len: usize, fill: u8) -> io::Result<usize> {
    use crate::iovecs::IoVecBuf;
    use crate::test_util::GuestMemory;
    let mem = GuestMemory::standard().unwrap();
    let map = mem.map();
    let gpa = mem.regions()[0].gpa();
    mem.write(gpa, &[0; 12]);
    mem.fill(gpa + 12, len, fill);
    let mut buf = IoVecBuf::new();
    let mut v = buf.bind(&map);
    // SAFETY: 12 + len bytes of the test's own mapping of guest memory,
    // live for the call.
    unsafe { v.push(mem.ptr(gpa, 12 + len), 12 + len) }.unwrap();
    io.write_frame(&v, 12)
}

#[test]
fn a_write_cut_short_keeps_the_rest_marked_until_it_is_out() {
    let (ours, peer) = pair();
    setsockopt(&ours, sockopt::SndBuf, &4096).unwrap();
    let sync = SyncWord::private();
    let io = Stream::attach(ours, sync.clone()).unwrap();
    let n = write_guest_frame(&io, 60_000, 0x42).unwrap();
    assert_eq!(n, 4 + 60_000, "the frame counts as written");
    assert_eq!(sync.get(), TX_MAY_BE_PARTIAL, "the rest is held");
    assert!(io.wants_writable());
    // No other frame goes out before the rest.
    assert!(would_block(write_guest_frame(&io, 100, 0x43)));
    let mut got = Vec::new();
    let mut b = vec![0u8; 70_000];
    while got.len() < 4 + 60_000 {
        let k = nix::unistd::read(&peer, &mut b).unwrap();
        got.extend_from_slice(&b[..k]);
        io.on_writable();
    }
    assert_eq!(got.len(), 4 + 60_000);
    assert_eq!(&got[..4], &60_000u32.to_be_bytes());
    assert!(got[4..].iter().all(|&x| x == 0x42));
    assert_eq!(sync.get(), 0, "at a boundary again");
    assert!(!io.wants_writable());
    assert_eq!(write_guest_frame(&io, 100, 0x43).unwrap(), 104);
    assert_eq!(nix::unistd::read(&peer, &mut b).unwrap(), 104);
    assert_eq!(&b[..4], &100u32.to_be_bytes());
}

#[test]
fn frames_too_large_for_a_stream_and_closed_peers_are_refused() {
    let (io, peer, sync) = attached();
    let e = write_guest_frame(&io, MAX_STREAM_FRAME + 1, 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    drop(peer);
    let e = write_guest_frame(&io, 100, 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    assert!(io.ended());
    assert_eq!(sync.get(), 0);
}
