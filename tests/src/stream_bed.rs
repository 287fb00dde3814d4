//! A test bed for the stream backend: `qpnet run --stream` in a namespace
//! of its own connecting to listeners the bed owns (unix paths in a temp
//! directory, or loopback TCP on [`PORT`]+K), the connections it made, and
//! a test VMM on qpnet's vhost-user socket.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use qpnet_shared::QueueStats;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use crate::netns::NetNs;
use crate::qpnet::{Options, Qpnet};
use crate::stream_peer::{read_frame, write_frame, Conn, Listener, TIMEOUT};
use crate::traffic::tx_frame;
use crate::vmm::{Vmm, VmmConfig};

/// Frames per direction and queue pair in a round.
pub const FRAMES: u32 = 64;
/// Queue pair 0's TCP port (inside the bed's own namespace).
pub const PORT: u16 = 7100;

/// The peer's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A unix socket path.
    Unix,
    /// Loopback TCP.
    Tcp,
}

/// qpnet on `--stream` with `qps` queue pairs, the peers, and a VMM.
pub struct StreamBed {
    pub vmm: Vmm,
    pub qpnet: Qpnet,
    pub listeners: Vec<Listener>,
    pub conns: Vec<Box<dyn Conn>>,
    pub dir: PathBuf,
    _ns: NetNs,
}

impl StreamBed {
    /// qpnet connecting to the bed's peers of `kind`, `qps` queue pairs.
    pub fn new(kind: Kind, qps: u16) -> Result<StreamBed> {
        StreamBed::with(kind, qps, &[])
    }

    /// The same with more `qpnet run` arguments.
    pub fn with(kind: Kind, qps: u16, extra: &[&str]) -> Result<StreamBed> {
        StreamBed::build(kind, qps, extra, None)
    }

    /// `user`: run qpnet as that user (no capability).
    pub fn build(kind: Kind, qps: u16, extra: &[&str], user: Option<&str>) -> Result<StreamBed> {
        let ns = NetNs::new()?;
        let dir = std::env::temp_dir().join(format!("{}-stream", crate::unique_name()));
        std::fs::create_dir_all(&dir)?;
        let path = |k: u16| {
            if qps > 1 {
                dir.join(format!("peer.sock.{k}"))
            } else {
                dir.join("peer.sock")
            }
        };
        let listeners = (0..qps)
            .map(|k| {
                let l = match kind {
                    Kind::Unix => {
                        let l = UnixListener::bind(path(k))?;
                        l.set_nonblocking(true)?;
                        // Any user may connect (qpnet may run as one).
                        std::fs::set_permissions(
                            path(k),
                            std::os::unix::fs::PermissionsExt::from_mode(0o777),
                        )?;
                        Listener::Unix(l)
                    }
                    Kind::Tcp => ns.run(|| {
                        let l = TcpListener::bind(("127.0.0.1", PORT + k))?;
                        l.set_nonblocking(true)?;
                        Ok(Listener::Tcp(l))
                    })?,
                };
                Ok(l)
            })
            .collect::<Result<Vec<_>>>()?;
        let spec = match kind {
            Kind::Unix => format!("unix:{}", dir.join("peer.sock").display()),
            Kind::Tcp => format!("tcp:127.0.0.1:{PORT}"),
        };
        let mut opts = Options {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Options::host(&["--stream", &spec])
        };
        if let Some(u) = user {
            opts = opts.as_user(u);
        }
        let qpnet = Qpnet::start_opts(&ns, "", qps, &opts)?;
        let conns = listeners
            .iter()
            .map(Listener::accept)
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
        let vmm = Vmm::connect(
            qpnet.socket(),
            VmmConfig {
                queue_pairs: qps,
                ..VmmConfig::default()
            },
        )
        .with_context(|| format!("qpnet stderr:\n{}", qpnet.stderr()))?;
        Ok(StreamBed {
            vmm,
            qpnet,
            listeners,
            conns,
            dir,
            _ns: ns,
        })
    }

    /// qpnet's log, for an error's context.
    pub fn err(&self) -> String {
        format!("qpnet stderr:\n{}", self.qpnet.stderr())
    }

    /// TX frames `seqs` of each queue pair in `qps` reach its own peer,
    /// byte exact and in order.
    pub fn tx_round(&mut self, qps: &[usize], seqs: std::ops::Range<u32>) -> Result<()> {
        for &qp in qps {
            let frames: Vec<Vec<u8>> = seqs.clone().map(|s| tx_frame(qp as u16, s)).collect();
            self.vmm.tx[qp].send_all(&frames, TIMEOUT)?;
        }
        for &qp in qps {
            for s in seqs.clone() {
                let got = read_frame(self.conns[qp].as_mut())
                    .and_then(|f| f.context("qpnet closed the connection"))
                    .with_context(|| format!("qp{qp}: frame {s}; {}", self.err()))?;
                ensure!(got == tx_frame(qp as u16, s), "qp{qp}: frame {s} differs");
            }
        }
        Ok(())
    }

    /// Frames each peer in `qps` writes reach the RX queue of its queue
    /// pair, byte exact, in order, behind a zero header.
    pub fn rx_round(&mut self, qps: &[usize], seqs: std::ops::Range<u32>) -> Result<()> {
        for &qp in qps {
            for s in seqs.clone() {
                write_frame(self.conns[qp].as_mut(), &tx_frame(qp as u16, s))?;
            }
        }
        for &qp in qps {
            let want: Vec<Vec<u8>> = seqs.clone().map(|s| tx_frame(qp as u16, s)).collect();
            let got = self.rx_frames(qp, want.len())?;
            ensure!(
                got == want,
                "qp{qp}: RX frames differ from what its peer sent"
            );
        }
        for qp in 0..self.conns.len() {
            ensure!(
                self.vmm.rx[qp].reap()?.is_empty(),
                "qp{qp}: an RX frame arrived that its peer did not send"
            );
        }
        Ok(())
    }

    /// The next `n` frames reaped from RX queue `qp` (zero header checked).
    pub fn rx_frames(&mut self, qp: usize, n: usize) -> Result<Vec<Vec<u8>>> {
        let frames = self.vmm.rx[qp]
            .reap_until(n, TIMEOUT)
            .with_context(|| self.err())?;
        frames
            .into_iter()
            .map(|f| {
                ensure!(f.header[..10] == [0; 10], "qp{qp}: RX header not zero");
                Ok(f.data)
            })
            .collect()
    }

    /// Counter `f` of queue pair `qp`.
    pub fn counter(
        &self,
        qp: usize,
        f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64,
    ) -> Result<u64> {
        self.qpnet.counter(qp, f)
    }

    /// Wait until counter `f` of queue pair `qp` reaches `at_least`.
    pub fn wait_counter(
        &self,
        what: &str,
        qp: usize,
        at_least: u64,
        f: impl Fn(&QueueStats) -> &std::sync::atomic::AtomicU64,
    ) -> Result<()> {
        self.qpnet.wait_counter(what, qp, at_least, TIMEOUT, f)
    }

    /// The peer of `qp` expects qpnet to close its connection (at a frame
    /// boundary), then to connect again.
    pub fn expect_reconnect(&mut self, qp: usize) -> Result<()> {
        while read_frame(self.conns[qp].as_mut())?.is_some() {}
        self.expect_reconnect_now(qp)
    }

    /// The connection of `qp` ended: take qpnet's next one.
    pub fn expect_reconnect_now(&mut self, qp: usize) -> Result<()> {
        self.conns[qp] = self.listeners[qp].accept().with_context(|| self.err())?;
        Ok(())
    }

    /// The peer of `qp` closes its connection (a stand-in takes its place
    /// until [`StreamBed::expect_reconnect_now`]).
    pub fn peer_leaves(&mut self, qp: usize) -> Result<()> {
        let (stand_in, _other) = std::os::unix::net::UnixStream::pair()?;
        drop(std::mem::replace(&mut self.conns[qp], Box::new(stand_in)));
        Ok(())
    }

    /// Stop qpnet (checked) and remove the bed's files.
    pub fn finish(self) -> Result<()> {
        let err = self.qpnet.stderr();
        ensure!(
            !err.contains("SIGSYS"),
            "a worker was killed by its seccomp filter:\n{err}"
        );
        drop(self.vmm);
        self.qpnet.stop()?;
        let _ = std::fs::remove_dir_all(self.dir);
        Ok(())
    }
}
