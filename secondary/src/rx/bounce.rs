//! The short-of-buffers path (MRG_RXBUF): one frame read into a private
//! buffer when the guest's buffers may not hold the largest frame, copied
//! into them if they are enough, or held until the guest posts more.
//!
//! A held frame survives the end of its run (the queue then waits for the
//! guest's kick) and is delivered before any new frame is read, so frames
//! keep their order. It is dropped, and counted as too large, when it cannot
//! fit even once the guest has made its whole ring available, or when a bad
//! chain blocks the buffers it needs; and forgotten when its ring is stopped
//! or replaced. This is the only path that copies frame data.

use crate::ring::RingFault;

use super::{Received, RxRun};

/// The bounce buffer and the frame it may hold.
#[derive(Debug, Default)]
pub(super) struct Bounce {
    buf: Vec<u8>,
    /// Length of the frame held in `buf`, if any.
    held: Option<usize>,
}

impl Bounce {
    /// Length of the held frame.
    pub(super) fn held(&self) -> Option<usize> {
        self.held
    }

    /// Forget a held frame (its ring is stopped or replaced).
    pub(super) fn reset(&mut self) {
        self.held = None;
    }
}

impl RxRun<'_> {
    /// Read one frame into the bounce buffer and hold it.
    pub(super) fn read_bounce(&mut self) -> Received {
        let features = self.ctx.features;
        let size = features.rx_frame_capacity() as usize;
        let bounce = &mut *self.bounce;
        if bounce.buf.len() != size {
            // Only on the first bounce after a feature change.
            bounce.buf.resize(size, 0);
        }
        let n = match self
            .ctx
            .io
            .read_into(&mut bounce.buf, features.header_len as usize)
        {
            Ok(n) => n,
            Err(e) => return self.read_failed(&e),
        };
        if n > size {
            self.ctx.counters.drop_too_large += 1;
            self.log
                .dropped(format_args!("frame of {n} bytes, the limit is {size}"));
            return Received::Frame;
        }
        if self.refuse_short(n as u64) {
            return Received::Frame;
        }
        self.bounce.held = Some(n);
        Received::Bounced
    }

    /// Copy the held frame of `len` bytes into the taken chains (they are
    /// enough) and complete it.
    pub(super) fn deliver_held(&mut self, len: usize) -> Result<Received, RingFault> {
        let frame = self.bufs.pending_iovecs();
        self.bufs.iov.write_at(frame, 0, &self.bounce.buf[..len]);
        self.bounce.held = None;
        self.complete_frame(len as u64)?;
        Ok(Received::Frame)
    }

    /// Drop the held frame, saying why.
    pub(super) fn drop_held(&mut self, why: &str) {
        if let Some(len) = self.bounce.held.take() {
            self.ctx.counters.drop_too_large += 1;
            self.log
                .dropped(format_args!("held frame of {len} bytes: {why}"));
        }
    }
}
