//! The far end of qpnet's stream backend, as a test plays it: a listener
//! qpnet connects to, or a connection to qpnet listening, and frames behind
//! their 4-byte big-endian length, read strictly (the wire format of QEMU's
//! `-netdev stream` and passt).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

/// How long the peer waits for qpnet.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A stream connection of either kind.
pub trait Conn: Read + Write + Send {
    /// Set the read timeout.
    fn set_timeout(&self, t: Duration) -> std::io::Result<()>;
}
impl Conn for UnixStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}
impl Conn for TcpStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

/// The test's listening end of one queue pair (qpnet connects to it).
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// The next connection qpnet makes, within `TIMEOUT`.
    pub fn accept(&self) -> Result<Box<dyn Conn>> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got: std::io::Result<Box<dyn Conn>> = match self {
                Listener::Unix(l) => l.accept().map(|(c, _)| Box::new(c) as Box<dyn Conn>),
                Listener::Tcp(l) => l.accept().map(|(c, _)| Box::new(c) as Box<dyn Conn>),
            };
            match got {
                Ok(c) => {
                    c.set_timeout(TIMEOUT)?;
                    return Ok(c);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accept"),
            }
            ensure!(
                Instant::now() < deadline,
                "qpnet did not connect within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Write `frame` behind its length.
pub fn write_frame(c: &mut dyn Conn, frame: &[u8]) -> Result<()> {
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(frame);
    c.write_all(&wire).context("peer write")
}

/// Read one frame strictly: `Ok(None)` when qpnet closed the connection
/// (a frame cut by the end of the connection is discarded, as QEMU and
/// passt do; a reset after a worker died in the middle of a write ends the
/// connection so).
pub fn read_frame(c: &mut dyn Conn) -> Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    match c.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("peer read"),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    ensure!(
        (14..=65_535).contains(&len),
        "the peer read a length prefix of {len}: a torn frame"
    );
    let mut frame = vec![0u8; len];
    match c.read_exact(&mut frame) {
        Ok(()) => Ok(Some(frame)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e).context("peer read"),
    }
}

/// Connect to `path` once qpnet listens there.
pub fn connect_when_there(path: &std::path::Path) -> Result<Box<dyn Conn>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(c) => {
                c.set_timeout(TIMEOUT)?;
                return Ok(Box::new(c));
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connecting to {}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
