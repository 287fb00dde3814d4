//! Answering the primary's control requests (`qpnet_ipc::Request`), one at
//! a time, between two runs of the packet path.
//!
//! Every request gets exactly one reply. The fds that come with it are
//! checked first, by the rules the primary follows too
//! (`Request::check_fds`); nothing but `Hello` is accepted before `Hello`; a
//! protocol version or queue pair number that does not match is answered and
//! then ends the worker. Everything else that is refused is answered with
//! `Reply::Error` and leaves the worker running, so a bad request from a
//! confused primary never takes the queue pair down. What a request changes
//! (memory, rings, the frame I/O, the stats region) is carried out by the
//! [`QueuePair`]; after it, the queue pair serves whatever the guest queued
//! meanwhile, as if kicked.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{anyhow, Context};
use log::{debug, info, warn};
use qpnet_ipc::{Channel, FrameIoKind, IpcError, MemoryRegion, Reply, Request, RingKind};
use qpnet_shared::SharedRegion;

use crate::datagram::Datagram;
use crate::events::Events;
use crate::features::NetFeatures;
use crate::frame_io::FrameIo;
use crate::guest_memory::GuestMemoryMap;
use crate::queue_pair::QueuePair;
use crate::stream::Stream;
use crate::tap::Tap;

/// What the worker does after a control request.
pub enum Flow {
    /// Go on serving.
    Continue,
    /// Exit (Shutdown, or the primary went away).
    Exit,
}

/// The worker's end of its control socket.
pub struct Control {
    queue_pair: u16,
    channel: Channel,
    greeted: bool,
}

impl Control {
    /// Serve requests for `queue_pair` arriving on `channel`.
    pub fn new(queue_pair: u16, channel: Channel) -> Control {
        Control {
            queue_pair,
            channel,
            greeted: false,
        }
    }

    /// The socket, for epoll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Receive one request, carry it out on `qp` and reply. An error ends
    /// the worker.
    pub fn handle(&mut self, qp: &mut QueuePair, events: &mut Events) -> anyhow::Result<Flow> {
        let (request, fds) = match self.channel.recv::<Request>() {
            Ok(m) => m,
            Err(IpcError::Closed) => {
                debug!("qp{}: control socket closed, exiting", self.queue_pair);
                return Ok(Flow::Exit);
            }
            Err(e @ (IpcError::Decode(_) | IpcError::Truncated)) => {
                warn!("qp{}: bad control message: {e}", self.queue_pair);
                self.reply(error_reply(format!("bad control message: {e}")))?;
                return Ok(Flow::Continue);
            }
            Err(e) => return Err(e).context("control socket receive"),
        };
        debug!(
            "qp{}: request {request:?} with {} fds",
            self.queue_pair,
            fds.len()
        );
        let name = request.name();
        let (reply, flow) = self.dispatch(request, fds, qp, events)?;
        if let Reply::Error { message } = &reply {
            warn!("qp{}: request {name} refused: {message}", self.queue_pair);
        }
        self.reply(reply)?;
        if let Flow::Exit = flow {
            return Ok(Flow::Exit);
        }
        // Work the request made possible (a started ring, a new TAP).
        qp.serve_after_control(events);
        Ok(Flow::Continue)
    }

    fn reply(&self, reply: Reply) -> anyhow::Result<()> {
        match self.channel.send(&reply, &[]) {
            Ok(()) | Err(IpcError::Closed) => Ok(()),
            Err(e) => Err(e).context("control socket send"),
        }
    }

    fn dispatch(
        &mut self,
        request: Request,
        fds: Vec<OwnedFd>,
        qp: &mut QueuePair,
        events: &mut Events,
    ) -> anyhow::Result<(Reply, Flow)> {
        // The fds' number and kind, by the rules the primary follows too;
        // on a refusal they are closed when `fds` drops, at once.
        if let Err(e) = request.check_fds(&fds) {
            return Ok((error_reply(e.to_string()), Flow::Continue));
        }
        if !self.greeted && !matches!(request, Request::Hello { .. }) {
            return Ok((error_reply("Hello must come first".into()), Flow::Continue));
        }
        let result = match request {
            Request::Hello {
                version,
                queue_pair,
            } => return self.hello(version, queue_pair),
            Request::SetFeatures {
                features,
                max_rx_frame,
                header_len,
            } => set_features(qp, features, max_rx_frame, header_len),
            Request::SetMemTable { regions } => set_mem_table(qp, &regions, fds, events),
            Request::AttachFrameIo { kind } => attach_frame_io(qp, kind, fds, events),
            Request::AttachShared { flow_tracking } => {
                qp.set_flow_tracking(flow_tracking);
                attach_shared(qp, fds)
            }
            Request::StartRing(cfg) => qp.start_ring(&cfg, fds, events),
            Request::StopRing { kind } => return Ok((stop_ring(qp, kind, events), Flow::Continue)),
            Request::Shutdown => {
                info!("qp{}: shutdown requested", self.queue_pair);
                return Ok((Reply::Ok, Flow::Exit));
            }
        };
        let reply = match result {
            Ok(()) => Reply::Ok,
            Err(message) => error_reply(message),
        };
        Ok((reply, Flow::Continue))
    }

    /// The first request: the same protocol and queue pair, or exit.
    fn hello(&mut self, version: u32, queue_pair: u16) -> anyhow::Result<(Reply, Flow)> {
        let mismatch = if version != qpnet_ipc::PROTOCOL_VERSION {
            Some(format!(
                "protocol version {version}, this worker speaks {}",
                qpnet_ipc::PROTOCOL_VERSION
            ))
        } else if queue_pair != self.queue_pair {
            Some(format!(
                "hello for queue pair {queue_pair}, this worker serves {}",
                self.queue_pair
            ))
        } else {
            None
        };
        if let Some(message) = mismatch {
            self.reply(error_reply(message.clone()))?;
            return Err(anyhow!("qp{}: {message}", self.queue_pair));
        }
        self.greeted = true;
        Ok((
            Reply::Hello {
                version: qpnet_ipc::PROTOCOL_VERSION,
                pid: std::process::id(),
            },
            Flow::Continue,
        ))
    }
}

fn set_features(
    qp: &mut QueuePair,
    features: u64,
    max_rx_frame: u32,
    header_len: u32,
) -> Result<(), String> {
    let f = NetFeatures::from_request(features, max_rx_frame, header_len)?;
    info!(
        "qp{}: features {features:#x}: event_idx {}, mergeable rx {}, header {} bytes, largest rx frame {}",
        qp.index(), f.event_idx, f.mergeable_rx, f.header_len, f.max_rx_frame
    );
    qp.set_features(f);
    Ok(())
}

/// Install a new memory map; an empty table unmaps guest memory (the
/// device was reset). Running rings keep their position if they still fit,
/// and are stopped otherwise.
fn set_mem_table(
    qp: &mut QueuePair,
    regions: &[MemoryRegion],
    fds: Vec<OwnedFd>,
    events: &mut Events,
) -> Result<(), String> {
    let mem = if regions.is_empty() {
        info!("qp{}: guest memory unmapped", qp.index());
        None
    } else {
        let m = GuestMemoryMap::map_regions(regions, fds)
            .map_err(|e| format!("memory table refused: {e}"))?;
        info!(
            "qp{}: memory table of {} regions mapped",
            qp.index(),
            m.region_count()
        );
        Some(m)
    };
    let stopped = qp.set_memory(mem, events);
    if stopped.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = stopped
        .iter()
        .map(|(kind, at)| format!("{kind:?} (stopped at {at})"))
        .collect();
    Err(format!(
        "memory table installed, but ring(s) {} lie outside it and were stopped",
        list.join(", ")
    ))
}

fn attach_frame_io(
    qp: &mut QueuePair,
    kind: FrameIoKind,
    fds: Vec<OwnedFd>,
    events: &mut Events,
) -> Result<(), String> {
    let fd = fds
        .into_iter()
        .next()
        .ok_or_else(|| "AttachFrameIo without an fd".to_string())?;
    let io: Box<dyn FrameIo> = match kind {
        FrameIoKind::Tap => Box::new(Tap::attach(fd).map_err(|e| format!("TAP fd refused: {e}"))?),
        FrameIoKind::Datagram => {
            Box::new(Datagram::attach(fd).map_err(|e| format!("datagram socket refused: {e}"))?)
        }
        FrameIoKind::Stream => Box::new(
            Stream::attach(fd, qp.sync_word())
                .map_err(|e| format!("stream socket refused: {e}"))?,
        ),
    };
    qp.attach_io(io, events)?;
    info!("qp{}: {} attached", qp.index(), kind.name());
    Ok(())
}

fn attach_shared(qp: &mut QueuePair, fds: Vec<OwnedFd>) -> Result<(), String> {
    let fd = fds
        .into_iter()
        .next()
        .ok_or_else(|| "AttachShared without an fd".to_string())?;
    let region = SharedRegion::attach_fd(std::fs::File::from(fd))
        .map_err(|e| format!("shared region refused: {e}"))?;
    qp.attach_stats(region)?;
    info!("qp{}: shared region attached", qp.index());
    Ok(())
}

fn stop_ring(qp: &mut QueuePair, kind: RingKind, events: &mut Events) -> Reply {
    match qp.stop_ring(kind, events) {
        Some(at) => Reply::RingStopped { next_avail: at },
        None => error_reply(format!("{kind:?} ring is not running")),
    }
}

fn error_reply(message: String) -> Reply {
    Reply::Error { message }
}
