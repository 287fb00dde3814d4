//! The primary's main loop: one VMM connection after another, plus worker
//! supervision and signals, all in one thread around `poll(2)`.
//!
//! While a VMM is connected the loop waits on the VMM socket, the signalfd
//! and every worker's pidfd; between VMMs, on the listening socket (or a
//! reconnect timer with `--connect`) instead of the VMM socket. These are
//! the events supervision hears of (`supervision/mod.rs`): a worker's pidfd
//! firing means it died; SIGUSR1 is `qpnet retry`; after every wake-up and
//! every VMM request the supervisor acts on deaths (including one a VMM
//! request met), due restarts and the watchdog.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::access::Access;
use crate::reply_guard::ReplyGuard;
use crate::stream::Watch;
use crate::vhost_user::{wait_for_header, Header, VhostUserDevice};

/// Longest a VMM may take to finish sending one message, or to take our
/// reply, before its connection is closed.
pub const VMM_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the VMM is.
pub enum Endpoint {
    /// We listen; the VMM connects (QEMU `-chardev socket,path=...`).
    Listen(UnixListener, PathBuf),
    /// The VMM listens; we connect, retrying.
    Connect(PathBuf),
}

/// Why [`Server::serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(Signal),
}

enum Wake {
    Ready,
    Signal(Signal),
    Timeout,
}

/// The primary's event loop.
pub struct Server {
    endpoint: Endpoint,
    access: Access,
    events: Events,
}

/// What the loop waits on besides the VMM: signals and workers.
struct Events {
    dev: Arc<Mutex<VhostUserDevice>>,
    signals: SignalFd,
}

/// Block the signals the server handles (call before any worker is
/// spawned: workers restore an empty mask before exec). SIGTERM, SIGINT and
/// SIGHUP stop the primary; SIGUSR1 (`qpnet retry`) retries failed queue
/// pairs.
pub fn block_signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGUSR1);
    set.thread_block()
        .context("blocking SIGTERM/SIGINT/SIGHUP")?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating a signalfd")
}

fn lock(dev: &Mutex<VhostUserDevice>) -> std::sync::MutexGuard<'_, VhostUserDevice> {
    // A panic while holding the lock would be a qpnet bug; keep serving
    // with whatever state is there rather than cascading the panic.
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// What became of one request on a VMM connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Answered (or refused and answered): the connection goes on.
    Next,
    /// Close the connection: the VMM left, or sent what cannot be answered.
    Close,
}

/// Serve the request waiting on a VMM connection: wait at most
/// `header_timeout` for its whole header (`fd` is a second fd of the
/// handler's socket, to peek on), apply an early SET_VRING_ENABLE, let the
/// vhost crate read, check and dispatch it to the device, then let
/// supervision act on what the request met. Every outcome is logged.
pub fn serve_request(
    handler: &mut BackendReqHandler<Mutex<VhostUserDevice>>,
    dev: &Mutex<VhostUserDevice>,
    fd: BorrowedFd<'_>,
    header_timeout: Duration,
) -> Served {
    match wait_for_header(fd, header_timeout) {
        Header::Ready => {}
        Header::Empty => return Served::Next,
        Header::Closed => {
            log::info!("VMM disconnected");
            return Served::Close;
        }
        Header::Stalled(n) => {
            log::warn!(
                "closing the VMM connection: {n} bytes of a message header, then nothing for {header_timeout:?}"
            );
            return Served::Close;
        }
    }
    lock(dev).apply_early_vring_enable(fd);
    let result = handler.handle_request();
    let reply_lost = {
        let mut d = lock(dev);
        // A worker that died during the request is replaced now, once the
        // VMM has its answer.
        let (sup, dev) = d.backend.supervision();
        sup.supervise(dev);
        std::mem::take(&mut d.reply_lost)
    };
    match result {
        Ok(()) => {}
        Err(VhostError::ReqHandlerError(_)) | Err(VhostError::InvalidOperation(_)) => {
            // Refused and already logged; REPLY_ACK told the VMM.
        }
        Err(
            e @ (VhostError::InactiveFeature(_)
            | VhostError::InactiveOperation(_)
            | VhostError::InvalidParam),
        ) => {
            // The whole message was read, so the stream is still in step.
            // QEMU, for one, sends SET_VRING_ENABLE before SET_FEATURES (at
            // realize time and when it reconnects); apply_early_vring_enable
            // above already applied it.
            log::debug!("vhost crate refused a request its state does not allow yet: {e}");
        }
        Err(
            VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_),
        ) => {
            log::info!("VMM disconnected");
            return Served::Close;
        }
        Err(e) => {
            log::warn!("closing the VMM connection: malformed or unexpected request ({e})");
            return Served::Close;
        }
    }
    if reply_lost {
        log::warn!("closing the VMM connection: a request that needs a reply failed");
        return Served::Close;
    }
    Served::Next
}

/// A VMM connection ended: stop every ring, forget what the VMM said, and
/// give failed queue pairs their retry.
pub fn end_connection(dev: &Mutex<VhostUserDevice>) {
    let mut d = lock(dev);
    d.backend.reset();
    d.reply_lost = false;
    let (sup, dev) = d.backend.supervision();
    sup.shared()
        .header()
        .vmm_connected
        .store(0, Ordering::Relaxed);
    // Failed queue pairs get their retry now.
    sup.supervise(dev);
}

impl Events {
    /// Wait on `fd` (if any), the signalfd and the worker pidfds; handle
    /// signals and dead workers; report whether `fd` became ready.
    fn wait(&mut self, fd: Option<BorrowedFd<'_>>, timeout: Option<Duration>) -> Result<Wake> {
        let mut d = lock(&self.dev);
        let deadline = d.backend.supervisor().next_supervision();
        let until_deadline =
            deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let wait_for = match (timeout, until_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = wait_for
            .map(|t| PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX))
            .unwrap_or(PollTimeout::NONE);
        let (signalled, ready, exited, host) = {
            let pidfds = d.backend.supervisor().worker_pidfds();
            let host_fds = d.backend.supervisor().host_poll_fds();
            let mut pfds: Vec<PollFd<'_>> = Vec::with_capacity(pidfds.len() + host_fds.len() + 2);
            pfds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
            pfds.extend(fd.map(|f| PollFd::new(f, PollFlags::POLLIN)));
            let first_pidfd = pfds.len();
            pfds.extend(
                pidfds
                    .iter()
                    .map(|&(_, f)| PollFd::new(f, PollFlags::POLLIN)),
            );
            let first_host = pfds.len();
            pfds.extend(
                host_fds
                    .iter()
                    .map(|&(_, watch, f)| PollFd::new(f, watch.flags())),
            );
            match poll(&mut pfds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(Wake::Timeout),
                Err(e) => return Err(e).context("poll"),
            }
            let fired = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            let exited: Vec<usize> = pidfds
                .iter()
                .zip(&pfds[first_pidfd..first_host])
                .filter(|(_, p)| fired(p))
                .map(|(&(qp, _), _)| qp)
                .collect();
            let host: Vec<(usize, Watch)> = host_fds
                .iter()
                .zip(&pfds[first_host..])
                .filter(|(_, p)| Watch::fired(p))
                .map(|(&(qp, watch, _), _)| (qp, watch))
                .collect();
            (
                fired(&pfds[0]),
                fd.is_some() && fired(&pfds[1]),
                exited,
                host,
            )
        };
        let (sup, dev) = d.backend.supervision();
        if signalled {
            if let Ok(Some(info)) = self.signals.read_signal() {
                let sig = Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
                if sig == Signal::SIGUSR1 {
                    log::info!("SIGUSR1: retrying failed queue pairs");
                    sup.retry_failed();
                } else {
                    return Ok(Wake::Signal(sig));
                }
            }
        }
        for qp in exited {
            sup.worker_exited(qp);
        }
        // Deaths first: a stream a dead worker left out of step is reset
        // before anything is attached.
        sup.supervise(dev);
        sup.host_service(&host);
        if ready {
            return Ok(Wake::Ready);
        }
        Ok(Wake::Timeout)
    }
}

impl Server {
    /// A server for `dev` on `endpoint`.
    pub fn new(
        endpoint: Endpoint,
        access: Access,
        dev: Arc<Mutex<VhostUserDevice>>,
        signals: SignalFd,
    ) -> Server {
        Server {
            endpoint,
            access,
            events: Events { dev, signals },
        }
    }

    /// `stream` if its peer may be served (logged either way).
    fn admit(&self, stream: UnixStream) -> Option<UnixStream> {
        match self.access.admit(&stream) {
            Ok(peer) => {
                log::info!("VMM connected: {peer}");
                self.connected();
                Some(stream)
            }
            Err(refusal) => {
                log::warn!("refused a VMM connection: {refusal}");
                None
            }
        }
    }

    /// Serve VMMs until a termination signal arrives.
    pub fn serve(&mut self) -> Result<Exit> {
        loop {
            let stream = match self.next_vmm()? {
                Ok(s) => s,
                Err(exit) => return Ok(exit),
            };
            let exit = self.serve_vmm(stream);
            end_connection(&self.events.dev);
            if let Some(exit) = exit? {
                return Ok(exit);
            }
            log::info!("waiting for the next VMM");
        }
    }

    /// Wait for the next VMM connection (or a signal).
    fn next_vmm(&mut self) -> Result<std::result::Result<UnixStream, Exit>> {
        let mut announced = false;
        loop {
            match &self.endpoint {
                Endpoint::Listen(listener, _) => {
                    match self.events.wait(Some(listener.as_fd()), None)? {
                        Wake::Signal(s) => return Ok(Err(Exit::Signal(s))),
                        Wake::Timeout => continue,
                        Wake::Ready => {}
                    }
                    match listener.accept() {
                        Ok((s, _)) => {
                            if let Some(s) = self.admit(s) {
                                return Ok(Ok(s));
                            }
                        }
                        Err(e) => log::warn!("accept on the vhost-user socket failed: {e}"),
                    }
                }
                Endpoint::Connect(path) => {
                    match UnixStream::connect(path) {
                        Ok(s) => {
                            log::info!("connected to the VMM at {}", path.display());
                            if let Some(s) = self.admit(s) {
                                return Ok(Ok(s));
                            }
                        }
                        Err(e) if !announced => {
                            log::info!("VMM socket {} not ready ({e}); retrying", path.display());
                            announced = true;
                        }
                        Err(_) => {}
                    }
                    if let Wake::Signal(s) =
                        self.events.wait(None, Some(Duration::from_millis(100)))?
                    {
                        return Ok(Err(Exit::Signal(s)));
                    }
                }
            }
        }
    }

    fn connected(&self) {
        let d = lock(&self.events.dev);
        let h = d.backend.supervisor().shared().header();
        h.vmm_connected.store(1, Ordering::Relaxed);
        h.vmm_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Serve one VMM until it disconnects (Ok(None)) or a signal (Ok(Some)).
    fn serve_vmm(&mut self, stream: UnixStream) -> Result<Option<Exit>> {
        // A request is read only once poll says data is there, but a VMM
        // that stops in the middle of a message (or never reads our
        // replies: see ReplyGuard) must not freeze this loop: signals, dead
        // workers and the watchdog are all served here. Past the timeout the
        // connection is closed like any malformed request.
        stream
            .set_read_timeout(Some(VMM_IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(VMM_IO_TIMEOUT)))
            .context("setting timeouts on the VMM socket")?;
        // A second fd of the same socket, to poll and peek on while the
        // vhost crate owns the stream; both are closed when this returns.
        let poll_fd = OwnedFd::from(stream.try_clone().context("duplicating the VMM socket")?);
        // Closes the connection if our replies stay unread (the vhost crate
        // would retry a blocked send for ever); stops when this returns.
        let guard_fd = OwnedFd::from(stream.try_clone().context("duplicating the VMM socket")?);
        let _guard = ReplyGuard::watch(guard_fd).context("starting the reply guard")?;
        let mut handler = BackendReqHandler::from_stream(stream, self.events.dev.clone());
        loop {
            match self.events.wait(Some(poll_fd.as_fd()), None)? {
                Wake::Signal(s) => return Ok(Some(Exit::Signal(s))),
                Wake::Timeout => continue,
                Wake::Ready => {}
            }
            let served = serve_request(
                &mut handler,
                &self.events.dev,
                poll_fd.as_fd(),
                VMM_IO_TIMEOUT,
            );
            if served == Served::Close {
                return Ok(None);
            }
        }
    }

    /// The socket path, for cleanup.
    pub fn socket_path(&self) -> &Path {
        match &self.endpoint {
            Endpoint::Listen(_, p) | Endpoint::Connect(p) => p,
        }
    }

    /// Whether we created the socket file (and so remove it).
    pub fn owns_socket(&self) -> bool {
        matches!(self.endpoint, Endpoint::Listen(..))
    }
}
