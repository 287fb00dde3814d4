//! The host side of the instance: a multi-queue TAP, or one datagram socket
//! or stream connection per queue pair. Either way one fd per queue pair goes to its worker
//! (`AttachFrameIo`, with the [`FrameIoKind`] that tells it whether frames
//! carry the virtio-net header); this is the one place that knows which
//! features and settings each side has.

use std::os::fd::OwnedFd;

use qpnet_ipc::FrameIoKind;

use crate::dgram::DgramSockets;
use crate::features;
use crate::stream::StreamLinks;
use crate::tap::{Tap, TapError};

/// MTU of a socket backend: nothing on the host says otherwise, so the
/// Ethernet default (an RX datagram longer than MTU + 18 bytes is dropped
/// and counted when the guest's buffers are no larger).
pub const SOCKET_MTU: u32 = 1500;

/// The host side: what carries the frames of every queue pair.
pub enum HostSide {
    /// A multi-queue TAP, one queue per queue pair.
    Tap(Tap),
    /// One connected datagram socket per queue pair.
    Datagram(DgramSockets),
    /// One stream connection per queue pair, made (and made again) by the
    /// primary; a queue pair may be without one for a while.
    Stream(StreamLinks),
}

impl HostSide {
    /// What a worker is told its fd is.
    pub fn kind(&self) -> FrameIoKind {
        match self {
            HostSide::Tap(_) => FrameIoKind::Tap,
            HostSide::Datagram(_) => FrameIoKind::Datagram,
            HostSide::Stream(_) => FrameIoKind::Stream,
        }
    }

    /// The fd of queue pair `qp`.
    pub fn queue(&self, qp: usize) -> Option<&OwnedFd> {
        match self {
            HostSide::Tap(t) => t.queue(qp),
            HostSide::Datagram(d) => d.queue(qp),
            HostSide::Stream(s) => s.queue(qp),
        }
    }

    /// The MTU: the TAP's, or [`SOCKET_MTU`].
    pub fn mtu(&self) -> u32 {
        match self {
            HostSide::Tap(t) => t.mtu().unwrap_or(1500),
            HostSide::Datagram(_) | HostSide::Stream(_) => SOCKET_MTU,
        }
    }

    /// Queue pair `qp` was failed by the crash-loop guard (`serving`
    /// false) or gets a worker again: a TAP steers frames only to queues
    /// of queue pairs that are served (see `Tap::set_queue_attached`).
    pub fn set_serving(&self, qp: usize, serving: bool) {
        let HostSide::Tap(t) = self else {
            return;
        };
        match t.set_queue_attached(qp, serving) {
            Ok(true) if serving => {
                log::info!("queue pair {qp}: its TAP queue is in the TAP's choice again")
            }
            Ok(true) => log::info!(
                "queue pair {qp}: its TAP queue is out of the TAP's choice: frames for the guest go to the other queue pairs"
            ),
            Ok(false) => {}
            Err(e) => log::warn!("queue pair {qp}: {e}"),
        }
    }

    /// The virtio features offered to drivers.
    pub fn offered_features(&self) -> u64 {
        offered_features(self.kind())
    }

    /// Follow the features a driver acknowledged: the TAP's vnet header
    /// length and offloads. A socket has neither.
    pub fn apply_features(&self, f: u64) -> Result<(), TapError> {
        match self {
            HostSide::Tap(t) => t
                .set_header_len(features::header_len(f))
                .and_then(|()| t.set_offloads(features::tap_offloads(f))),
            HostSide::Datagram(_) | HostSide::Stream(_) => Ok(()),
        }
    }
}

/// The virtio features offered with a host side of `kind`: everything for a
/// TAP, no offload for a socket (its frames carry no virtio-net header, so
/// the worker would have to complete checksums and segment GSO frames
/// itself, see ARCHITECTURE.md).
pub fn offered_features(kind: FrameIoKind) -> u64 {
    if kind.carries_vnet_header() {
        features::OFFERED
    } else {
        features::OFFERED & !features::OFFLOADS
    }
}
