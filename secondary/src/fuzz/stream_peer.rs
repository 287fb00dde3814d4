//! The body of the `stream` fuzz target (`fuzz/fuzz_targets/stream.rs`),
//! shared with the stable replay test: a hostile stream peer. The input is
//! a script of writes (bytes the peer sends, in chunks of any size, so
//! length prefixes and frames arrive cut anywhere) and reads (the worker
//! reading one frame into a buffer of some size), played over a real unix
//! stream socket pair against [`Stream`].
//!
//! Checked against a model that parses the same bytes: every read returns
//! exactly the model's next frame (its length, and its bytes when they fit),
//! `WouldBlock` when the model has no whole frame, and the framing error
//! exactly when the model meets a length of 0 or above 65,535, after which
//! the stream has ended; after a read the published framing state says
//! "part of a frame held" exactly when the read found no whole frame but
//! bytes of an incomplete one (after a read that gave a frame, the
//! connection is at a boundary: what follows stays queued in the socket).

use std::io;
use std::os::fd::OwnedFd;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qpnet_shared::stream_sync::{LENGTH_PREFIX, MAX_STREAM_FRAME, RX_PARTIAL};

use crate::frame_io::FrameIo;
use crate::stream::{BadFraming, Stream, SyncWord};

/// The virtio-net header length the reads use.
const HEADER: usize = 12;
/// At most this many bytes are written by one input.
const MAX_WIRE: usize = 64 * 1024;

/// What the model expects from the next read.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Frame(Vec<u8>),
    Nothing,
    BadPrefix,
}

/// The peer's bytes and how far a correct reader has taken them.
#[derive(Default)]
struct Model {
    wire: Vec<u8>,
    at: usize,
    broken: bool,
}

impl Model {
    fn next(&self) -> Next {
        let rest = &self.wire[self.at..];
        let Some(prefix) = rest.first_chunk::<LENGTH_PREFIX>() else {
            return Next::Nothing;
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len == 0 || len > MAX_STREAM_FRAME {
            return Next::BadPrefix;
        }
        match rest.get(LENGTH_PREFIX..LENGTH_PREFIX + len) {
            Some(frame) => Next::Frame(frame.to_vec()),
            None => Next::Nothing,
        }
    }
}

/// Play `input` (see the module doc) and check every read.
pub fn fuzz_stream(input: &[u8]) {
    let (ours, peer): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .expect("a socket pair");
    let sync = SyncWord::Private(Default::default());
    let io = Stream::attach(ours, sync.clone()).expect("a stream socket");
    let mut model = Model::default();
    let mut rest = input;
    let mut buf = vec![0u8; HEADER + MAX_STREAM_FRAME];
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        if op < 0x80 {
            // Write the next 1..=128 bytes (or a byte pattern when short).
            let n = (usize::from(op) + 1).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            if model.broken || model.wire.len() + chunk.len() > MAX_WIRE {
                continue;
            }
            if chunk.is_empty() {
                continue;
            }
            // A full socket takes part of the chunk or none of it, as it
            // would from a real peer; the model has what it took.
            match nix::unistd::write(&peer, chunk) {
                Ok(sent) => model.wire.extend_from_slice(&chunk[..sent]),
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => panic!("the peer's write: {e}"),
            }
            continue;
        }
        // Read into a buffer of 12 + 16 * k bytes (k from the op), or all.
        let room = match op & 0x7f {
            0x7f => buf.len(),
            k => HEADER + 16 * usize::from(k),
        };
        let got = io.read_into(&mut buf[..room], HEADER);
        let blocked = matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        check_read(&mut model, got, &buf[..room]);
        if !model.broken {
            // A read that found no whole frame took the bytes of the
            // incomplete one (held, marked); one that gave a frame leaves
            // the connection at a boundary (what follows stays queued).
            let partial = blocked && model.wire.len() > model.at;
            assert_eq!(
                sync.get() & RX_PARTIAL != 0,
                partial,
                "the framing state after reading {} of {} bytes",
                model.at,
                model.wire.len()
            );
        }
    }
}

fn check_read(model: &mut Model, got: io::Result<usize>, buf: &[u8]) {
    if model.broken {
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a read after the framing error: {got:?}"
        );
        return;
    }
    match (model.next(), got) {
        (Next::Frame(frame), Ok(n)) => {
            assert_eq!(n, HEADER + frame.len(), "the frame's length");
            if n <= buf.len() {
                assert!(buf[..HEADER].iter().all(|&b| b == 0), "a zero header");
                assert_eq!(&buf[HEADER..n], &frame[..], "the frame's bytes");
            }
            model.at += LENGTH_PREFIX + frame.len();
        }
        (Next::Nothing, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
        (Next::BadPrefix, Err(e)) if BadFraming::is(&e) => model.broken = true,
        (want, got) => panic!("the model expects {want:?}, the stream gave {got:?}"),
    }
}
