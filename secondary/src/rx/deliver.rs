//! Delivering one frame: read it from the frame I/O straight into the taken
//! guest buffers, write `num_buffers` into its header, and complete the
//! chains it filled, all together.
//!
//! A frame longer than the buffers (the frame I/O reports its full length),
//! shorter than a virtio-net header, or empty (a datagram of 0 bytes) is
//! dropped and counted; the buffers
//! stay taken for the next frame, so the guest loses nothing but that frame.

use crate::datagram::PeerFault;
use crate::features::{ETH_HLEN, NUM_BUFFERS_OFFSET};
use crate::ring::RingFault;
use crate::stream::BadFraming;
use qpnet_shared::Direction;

use super::{Received, RxRun};

impl RxRun<'_> {
    /// Read one frame into the taken chains and complete the ones it used.
    pub(super) fn receive_one(&mut self) -> Result<Received, RingFault> {
        let from = self.bufs.pending_iovecs().start;
        let header = u64::from(self.ctx.features.header_len);
        let n = match self
            .ctx
            .io
            .read_frame(&self.bufs.iov, from, header as usize)
        {
            Ok(n) => n as u64,
            Err(e) => return Ok(self.read_failed(&e)),
        };
        let capacity = self.bufs.capacity();
        if n > capacity {
            // The buffers stay taken for the next frame.
            self.ctx.counters.drop_too_large += 1;
            self.log.dropped(format_args!(
                "frame of {n} bytes cut: {capacity} bytes of guest buffers"
            ));
            return Ok(Received::Frame);
        }
        if self.refuse_short(n) {
            return Ok(Received::Frame);
        }
        self.complete_frame(n)?;
        Ok(Received::Frame)
    }

    /// A read failed: nothing waits (`Empty`), the peer is gone (counted;
    /// the next read may succeed), or the frame I/O failed (counted).
    pub(super) fn read_failed(&mut self, e: &std::io::Error) -> Received {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Received::Empty;
        }
        if BadFraming::is(e) {
            // The stream is shut down; the primary makes a new connection.
            self.ctx.counters.drop_stream_framing += 1;
            self.log
                .dropped(format_args!("the stream peer broke the framing: {e}"));
            return Received::Failed;
        }
        if PeerFault::of(e) == Some(PeerFault::Gone) {
            // A connected socket reports an earlier send's ICMP or a closed
            // unix peer once; the queue keeps reading.
            self.ctx.counters.peer_unreachable += 1;
            self.log.dropped(format_args!("the peer is not there: {e}"));
            return Received::Frame;
        }
        self.ctx.counters.drop_tap_error += 1;
        self.log.dropped(format_args!("frame I/O read failed: {e}"));
        Received::Failed
    }

    /// Drop and count a frame of `n` bytes (header included) that is no
    /// Ethernet frame: shorter than the header (a TAP never gives one), or
    /// with fewer than 14 bytes after it (a socket peer's empty or runt
    /// datagram; the guest's driver would only count it as an error).
    /// Returns whether it was dropped.
    pub(super) fn refuse_short(&mut self, n: u64) -> bool {
        let header = u64::from(self.ctx.features.header_len);
        if n < header {
            self.ctx.counters.drop_tap_error += 1;
            self.log.dropped(format_args!("TAP gave a {n}-byte frame"));
            return true;
        }
        if n < header + u64::from(ETH_HLEN) {
            self.ctx.counters.drop_rx_short += 1;
            self.log
                .dropped(format_args!("{} bytes are no Ethernet frame", n - header));
            return true;
        }
        false
    }

    /// Complete the chains a frame of `n` bytes (header included) filled,
    /// writing `num_buffers` into its header first.
    pub(super) fn complete_frame(&mut self, n: u64) -> Result<(), RingFault> {
        let header = u64::from(self.ctx.features.header_len);
        let (iov, frame) = (&self.bufs.iov, self.bufs.pending_iovecs());
        self.ctx.flows.note(Direction::Rx, n - header, |head| {
            iov.read_at(frame, header as usize, head)
        });
        let used = self.bufs.chains_for(n);
        if self.ctx.features.has_num_buffers() {
            // Chains shorter than the header were refused, so it fits.
            self.bufs.iov.write_at(
                self.bufs.first_chain_iovecs(),
                NUM_BUFFERS_OFFSET,
                &(used as u16).to_le_bytes(),
            );
        }
        // All of the frame's chains become used together: the guest never
        // sees a used index inside this frame (see ring.rs).
        self.ring
            .complete_frame(self.ctx.mem, self.bufs.frame_chains(used, n))?;
        self.bufs.consume(used);
        self.ctx.counters.rx_frames += 1;
        self.ctx.counters.rx_bytes += n - header;
        Ok(())
    }
}
