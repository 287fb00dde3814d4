//! The link between a queue pair and its worker, as a small trait: send a
//! request with its fds and wait for the reply, know the worker's pid and
//! pidfd, kill and reap it.
//!
//! The real link is a worker process (`process.rs`); the supervision tests
//! use a fake one that dies, refuses or stops answering at chosen moments.
//! A queue pair sees nothing else of its worker, so everything it does on a
//! death is tested without processes.

use std::os::fd::BorrowedFd;

use qpnet_ipc::{IpcError, Reply, Request};

/// A request got no reply: the worker closed its control socket (it died),
/// did not answer in time, or the socket failed. In every case the queue
/// pair treats the worker as dead.
#[derive(Debug, thiserror::Error)]
#[error("worker of queue pair {queue_pair} (pid {pid}) did not answer {request}")]
pub struct LinkError {
    /// The worker's queue pair.
    pub queue_pair: u16,
    /// The worker's pid.
    pub pid: u32,
    /// The request's name ([`Request::name`]).
    pub request: &'static str,
    /// What the control socket reported.
    #[source]
    pub source: IpcError,
}

/// A worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No control socket pair.
    #[error("creating a control socket for the worker of queue pair {0}")]
    Socket(u16, #[source] IpcError),
    /// fork or exec failed.
    #[error("starting the worker of queue pair {0}")]
    Spawn(u16, #[source] std::io::Error),
    /// The worker started but no pidfd could be had for it (it was killed).
    #[error("pidfd_open on the new worker of queue pair {0}")]
    Pidfd(u16, #[source] std::io::Error),
}

/// One running worker, as its queue pair sees it.
pub trait WorkerLink: Send {
    /// The worker's process id.
    fn pid(&self) -> u32;

    /// An fd that becomes readable when the worker exits.
    fn pidfd(&self) -> BorrowedFd<'_>;

    /// Send `req` with `fds` beside it and wait for the one reply.
    fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, LinkError>;

    /// If the worker has exited, reap it and say how it ended.
    fn try_reap(&mut self) -> Option<String>;

    /// Kill the worker (SIGKILL) and reap it; nothing once it is reaped.
    fn kill(&mut self);

    /// Ask the worker to exit, and reap it (killing it if it does not).
    fn shutdown(&mut self);
}

/// Starts workers.
pub trait Launch: Send {
    /// Start the worker of `queue_pair`, its control socket connected; no
    /// request has been sent yet (the queue pair says hello).
    fn launch(&self, queue_pair: u16) -> Result<Box<dyn WorkerLink>, LaunchError>;
}

/// An error and its causes on one line, for logs and death reasons.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
