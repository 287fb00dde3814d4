//! vhost-user messages written byte by byte, for input the frontend won't make.
//!
//! The vhost crate's `Frontend` validates what it sends (vring index against
//! the queue count, fds it owns as EventFds), so malformed and hostile
//! messages are built here: a 12-byte header (request u32, flags u32, size
//! u32, little endian), a body, and fds in one `sendmsg` with SCM_RIGHTS.
//! Replies are read with a timeout and classified ([`Reply`]): the tests need
//! to tell a refusal (nonzero REPLY_ACK value, or the connection closed) from
//! an acceptance and from silence.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Header flag: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flag: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Front-end request codes (vhost-user spec).
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
}

/// Virtio feature bits used by the tests.
#[allow(missing_docs)]
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const MQ: u64 = 1 << 22;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// vhost-user protocol feature bits used by the tests.
#[allow(missing_docs)]
pub mod protocol {
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
}

/// What came back for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A reply carrying a u64 (a REPLY_ACK: 0 = success, else failure; or a
    /// GET_* value).
    Value(u64),
    /// A reply with some other body.
    Body(Vec<u8>),
    /// The backend closed the connection.
    Closed,
    /// Nothing within the timeout.
    Silent,
}

impl Reply {
    /// A clear refusal: a nonzero REPLY_ACK or a closed connection.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Reply::Value(v) if *v != 0) || *self == Reply::Closed
    }
}

/// One raw vhost-user connection (front-end side).
#[derive(Debug)]
pub struct RawVhostUser {
    stream: UnixStream,
    reply_timeout: Duration,
}

impl RawVhostUser {
    /// Connect to a backend listening on `path`, retrying while the socket
    /// is missing or refusing for up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<RawVhostUser> {
        Ok(RawVhostUser::from_stream(connect_unix(path, timeout)?))
    }

    /// Wrap an already connected stream (replies wait up to 10 s).
    pub fn from_stream(stream: UnixStream) -> RawVhostUser {
        RawVhostUser {
            stream,
            reply_timeout: Duration::from_secs(10),
        }
    }

    /// How long [`RawVhostUser::recv_reply`] waits.
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.reply_timeout = t;
    }

    /// Send one message: header with `flags`, the body, the fds.
    pub fn send(&self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&code.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.send_bytes(&header, body, fds)
    }

    /// Send arbitrary bytes (possibly a lying header) with fds.
    pub fn send_bytes(&self, header: &[u8], body: &[u8], fds: &[RawFd]) -> Result<()> {
        let iov = [IoSlice::new(header), IoSlice::new(body)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let n = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("sendmsg on the vhost-user socket")?;
        if n != header.len() + body.len() {
            bail!("short sendmsg: {n} bytes");
        }
        Ok(())
    }

    /// Send a request that asks for a REPLY_ACK and read the reply.
    pub fn request(&self, code: u32, body: &[u8], fds: &[RawFd]) -> Result<Reply> {
        self.send(code, FLAG_VERSION | FLAG_NEED_REPLY, body, fds)?;
        self.recv_reply(code)
    }

    /// Send a GET_* request (its reply is the value) and read the reply.
    pub fn get(&self, code: u32, body: &[u8]) -> Result<Reply> {
        self.send(code, FLAG_VERSION, body, &[])?;
        self.recv_reply(code)
    }

    /// A GET_* request whose u64 value must come back.
    pub fn get_u64(&self, code: u32) -> Result<u64> {
        match self.get(code, &[])? {
            Reply::Value(v) => Ok(v),
            other => bail!("request {code}: expected a u64 reply, got {other:?}"),
        }
    }

    /// A request that must be acknowledged with success.
    pub fn request_ok(&self, code: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
        match self.request(code, body, fds)? {
            Reply::Value(0) => Ok(()),
            other => bail!("request {code}: expected a success ack, got {other:?}"),
        }
    }

    /// Read one reply to request `code`.
    pub fn recv_reply(&self, code: u32) -> Result<Reply> {
        let deadline = Instant::now() + self.reply_timeout;
        let mut header = [0u8; 12];
        match self.read_full(&mut header, deadline)? {
            ReadOutcome::Done => {}
            ReadOutcome::Closed => return Ok(Reply::Closed),
            ReadOutcome::Timeout => return Ok(Reply::Silent),
        }
        let le32 = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let (rcode, flags, size) = (le32(0), le32(4), le32(8) as usize);
        if rcode != code || flags & FLAG_REPLY == 0 {
            bail!("reply header {rcode}/{flags:#x} does not answer request {code}");
        }
        if size > 4096 {
            bail!("reply of {size} bytes to request {code}");
        }
        let mut body = vec![0u8; size];
        match self.read_full(&mut body, deadline)? {
            ReadOutcome::Done => {}
            ReadOutcome::Closed => return Ok(Reply::Closed),
            ReadOutcome::Timeout => bail!("reply body to request {code} cut short"),
        }
        if size == 8 {
            return Ok(Reply::Value(u64::from_le_bytes(body.try_into().unwrap())));
        }
        Ok(Reply::Body(body))
    }

    fn read_full(&self, buf: &mut [u8], deadline: Instant) -> Result<ReadOutcome> {
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(ReadOutcome::Timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            match (&self.stream).read(&mut buf[done..]) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(ReadOutcome::Closed)
                }
                Err(e) => return Err(e).context("reading a vhost-user reply"),
            }
        }
        Ok(ReadOutcome::Done)
    }

    /// The usual opening: GET_FEATURES, SET_OWNER, protocol features
    /// MQ | REPLY_ACK (must be offered), SET_FEATURES with `features`
    /// (VERSION_1 | PROTOCOL_FEATURES are added). Returns the offered
    /// virtio features.
    pub fn negotiate(&self, features: u64) -> Result<u64> {
        let offered = self.get_u64(req::GET_FEATURES)?;
        self.send(req::SET_OWNER, FLAG_VERSION, &[], &[])?;
        let proto = self.get_u64(req::GET_PROTOCOL_FEATURES)?;
        let want = protocol::MQ | protocol::REPLY_ACK;
        if proto & want != want {
            bail!("backend offers protocol features {proto:#x}, missing MQ|REPLY_ACK");
        }
        // Like QEMU: no ack asked for the message that negotiates acks.
        self.send(
            req::SET_PROTOCOL_FEATURES,
            FLAG_VERSION,
            &u64_body(want),
            &[],
        )?;
        let acked = features | feature::VERSION_1 | feature::PROTOCOL_FEATURES;
        self.request_ok(req::SET_FEATURES, &u64_body(acked & offered), &[])?;
        Ok(offered)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

enum ReadOutcome {
    Done,
    Closed,
    Timeout,
}

/// Connect to a unix socket, retrying while it is missing or refusing.
pub fn connect_unix(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }
}

/// A u64 body.
pub fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A vring state body (index, num).
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// A vring address body; addresses are the VMM's virtual addresses.
pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0u64] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// One memory table entry.
#[derive(Debug, Clone, Copy)]
pub struct MemEntry {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The VMM's virtual address of the region.
    pub user_addr: u64,
    /// Offset into the fd.
    pub mmap_offset: u64,
}

/// A SET_MEM_TABLE body (num_regions, padding, entries).
pub fn mem_table(entries: &[MemEntry]) -> Vec<u8> {
    let mut b = (entries.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        for v in [e.gpa, e.size, e.user_addr, e.mmap_offset] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn messages_have_the_wire_layout_and_replies_are_classified() {
        let dir = std::env::temp_dir().join(crate::unique_name());
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let mut raw = RawVhostUser::connect(&path, Duration::from_secs(1)).unwrap();
        raw.set_reply_timeout(Duration::from_millis(100));
        let (mut peer, _) = listener.accept().unwrap();
        raw.send(
            req::SET_VRING_NUM,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_state(3, 256),
            &[],
        )
        .unwrap();
        let mut got = [0u8; 20];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(
            got,
            [8, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0]
        );
        assert_eq!(raw.recv_reply(8).unwrap(), Reply::Silent);
        use std::io::Write;
        peer.write_all(&[8, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let r = raw.recv_reply(8).unwrap();
        assert_eq!(r, Reply::Value(1));
        assert!(r.is_refusal());
        drop(peer);
        assert_eq!(raw.recv_reply(8).unwrap(), Reply::Closed);
        assert_eq!(
            mem_table(&[MemEntry {
                gpa: 1,
                size: 2,
                user_addr: 3,
                mmap_offset: 4
            }])
            .len(),
            40
        );
        assert_eq!(vring_addr(0, 1, 2, 3).len(), 40);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
