//! The worker's epoll set: the control socket, the frame I/O and the two
//! kick eventfds, each under its own token, and what one wait reported
//! ([`Wake`]).
//!
//! Level-triggered throughout: an event not handled in one loop turn (the
//! data path waits while a control request is answered) is reported again
//! in the next. The frame I/O's interest is whatever its queues wait for
//! (set by the queue pair through [`Events::watch_io`]); a change costs one
//! `epoll_ctl`, an unchanged interest none. A kick eventfd must leave the
//! set before its ring is dropped: the VMM holds the same eventfd, so
//! closing ours would not remove it, and a guest's kicks would then wake the
//! loop forever.

use std::os::fd::BorrowedFd;

use log::warn;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use qpnet_ipc::RingKind;

use crate::frame_io::FrameIo;
use crate::ring::Ring;

const TOKEN_CONTROL: u64 = 0;
const TOKEN_IO: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TX_KICK: u64 = 3;

/// What one wait reported.
#[derive(Debug, Default, Clone, Copy)]
pub struct Wake {
    /// A control request (or the primary went away).
    pub control: bool,
    /// The frame I/O has a frame.
    pub io_in: bool,
    /// The frame I/O has room again.
    pub io_out: bool,
    /// The frame I/O reported an error or hang-up.
    pub io_err: bool,
    /// The guest kicked the RX ring.
    pub rx_kick: bool,
    /// The guest kicked the TX ring.
    pub tx_kick: bool,
}

/// The worker's epoll set.
pub struct Events {
    epoll: Epoll,
    queue_pair: u16,
    /// What the frame I/O is registered for.
    io_interest: EpollFlags,
}

impl Events {
    /// A set watching the control socket `control`.
    pub fn new(queue_pair: u16, control: BorrowedFd<'_>) -> nix::Result<Events> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(control, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))?;
        Ok(Events {
            epoll,
            queue_pair,
            io_interest: EpollFlags::empty(),
        })
    }

    /// Wait up to `timeout` and sort what was reported.
    pub fn wait(&self, timeout: EpollTimeout) -> nix::Result<Wake> {
        let mut events = [EpollEvent::empty(); 8];
        let n = self.epoll.wait(&mut events, timeout)?;
        let mut wake = Wake::default();
        for ev in &events[..n] {
            let flags = ev.events();
            match ev.data() {
                TOKEN_CONTROL => wake.control = true,
                TOKEN_IO => {
                    wake.io_in |= flags.contains(EpollFlags::EPOLLIN);
                    wake.io_out |= flags.contains(EpollFlags::EPOLLOUT);
                    wake.io_err |= flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
                }
                TOKEN_RX_KICK => wake.rx_kick = true,
                TOKEN_TX_KICK => wake.tx_kick = true,
                _ => {}
            }
        }
        Ok(wake)
    }

    /// Watch `ring`'s kick eventfd.
    pub fn add_ring(&self, kind: RingKind, ring: &Ring) -> nix::Result<()> {
        let token = match kind {
            RingKind::Rx => TOKEN_RX_KICK,
            RingKind::Tx => TOKEN_TX_KICK,
        };
        self.epoll
            .add(ring.kick_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
    }

    /// Stop watching `ring`'s kick eventfd (before the ring is dropped).
    pub fn remove_ring(&self, kind: RingKind, ring: &Ring) {
        if let Err(e) = self.epoll.delete(ring.kick_fd()) {
            warn!("qp{}: epoll delete {kind:?} kick: {e}", self.queue_pair);
        }
    }

    /// Register the frame I/O, watched for nothing yet.
    pub fn add_io(&mut self, io: &dyn FrameIo) -> nix::Result<()> {
        self.io_interest = EpollFlags::empty();
        self.epoll
            .add(io.as_fd(), EpollEvent::new(EpollFlags::empty(), TOKEN_IO))
    }

    /// Deregister the frame I/O (before it is dropped).
    pub fn remove_io(&mut self, io: &dyn FrameIo) {
        let _ = self.epoll.delete(io.as_fd());
        self.io_interest = EpollFlags::empty();
    }

    /// Watch the frame I/O for frames (`readable`) and room (`writable`).
    pub fn watch_io(&mut self, io: &dyn FrameIo, readable: bool, writable: bool) {
        let mut want = EpollFlags::empty();
        if readable {
            want |= EpollFlags::EPOLLIN;
        }
        if writable {
            want |= EpollFlags::EPOLLOUT;
        }
        if want == self.io_interest {
            return;
        }
        let mut ev = EpollEvent::new(want, TOKEN_IO);
        match self.epoll.modify(io.as_fd(), &mut ev) {
            Ok(()) => self.io_interest = want,
            Err(e) => warn!("qp{}: epoll modify TAP: {e}", self.queue_pair),
        }
    }
}
