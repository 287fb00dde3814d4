//! The vhost-user protocol: the vhost crate's backend handler trait mapped
//! onto the [`Backend`] (the device state and its queue pairs). Every
//! refusal is logged here with the request it answers; with REPLY_ACK the
//! VMM gets a failure code.
//!
//! Requests whose answer is a reply (GET_*) cannot carry a failure code: the
//! vhost crate sends nothing when the handler fails. Those set
//! [`VhostUserDevice::reply_lost`], and the connection loop closes the
//! connection rather than leave the VMM waiting for an answer.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{
    Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use crate::backend::Backend;
use crate::device::DevResult;
use crate::features;

/// The device as seen by the vhost-user connection.
pub struct VhostUserDevice {
    /// The device and its queue pairs.
    pub backend: Backend,
    /// Set when a request that needs a reply failed (no reply was sent).
    pub reply_lost: bool,
}

/// If the next message on `fd` is a well-formed SET_VRING_ENABLE, its ring
/// index and state, without taking it off the socket.
fn peek_vring_enable(fd: BorrowedFd<'_>) -> Option<(u32, bool)> {
    const SET_VRING_ENABLE: u32 = 18;
    // Header (request, flags, size) and body (index, num), little-endian.
    let mut msg = [0u8; 20];
    // MSG_PEEK leaves the message in the socket for the vhost crate.
    let n = recv(
        fd.as_raw_fd(),
        &mut msg,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    if n != msg.len() {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    if word(0) != SET_VRING_ENABLE || word(8) != 8 || word(16) > 1 {
        return None;
    }
    Some((word(12), word(16) == 1))
}

/// Bytes of a vhost-user message header (request, flags, size).
const HEADER_LEN: usize = 12;

/// Whether a whole message header waits on a VMM connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// All of it: the vhost crate can read the message.
    Ready,
    /// Nothing (a spurious wake-up).
    Empty,
    /// The VMM closed the connection (before or inside a header).
    Closed,
    /// Only this many bytes of it, and no more came in time.
    Stalled(usize),
}

/// Wait at most `timeout` until a whole message header is in the socket
/// `fd` (peeked at, not taken off). The vhost crate reads a header by
/// retrying until all of it is in, for ever while the VMM keeps the
/// connection open (the socket's read timeout only makes it retry), so a
/// VMM that sends part of a header and stops would freeze the primary's
/// loop: the crate only gets a header once it is complete.
pub fn wait_for_header(fd: BorrowedFd<'_>, timeout: Duration) -> Header {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; HEADER_LEN];
    loop {
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        let n = match recv(fd.as_raw_fd(), &mut buf, flags) {
            Ok(0) => return Header::Closed,
            Ok(n) if n >= HEADER_LEN => return Header::Ready,
            Ok(n) => n,
            Err(Errno::EAGAIN) => return Header::Empty,
            Err(Errno::EINTR) => continue,
            // Let the vhost crate meet the error and report it.
            Err(_) => return Header::Ready,
        };
        // POLLHUP: the VMM closed its end (a VMM that only shut down
        // writing runs into the timeout).
        let mut pfd = [PollFd::new(fd, PollFlags::empty())];
        let hung_up = matches!(poll(&mut pfd, PollTimeout::ZERO), Ok(1))
            && pfd[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP));
        if hung_up {
            // The rest can never come.
            return Header::Closed;
        }
        let now = Instant::now();
        if now >= deadline {
            return Header::Stalled(n);
        }
        // Data is there, so poll(2) would not wait for more: sleep a little.
        std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
    }
}

fn answer<T>(request: &str, r: DevResult<T>) -> VhostResult<T> {
    r.map_err(|e| {
        log::warn!("refused {request}: {e}");
        VhostError::ReqHandlerError(std::io::Error::other(e.0))
    })
}

fn unsupported<T>(request: &'static str) -> VhostResult<T> {
    log::warn!("refused {request}: not supported by qpnet");
    Err(VhostError::InvalidOperation(request))
}

impl VhostUserDevice {
    /// QEMU (7.2 at least), when it reconnects, restores each queue pair's
    /// ring enable state *before* that queue pair's SET_FEATURES. The vhost
    /// crate drops a SET_VRING_ENABLE that arrives before PROTOCOL_FEATURES
    /// is acknowledged without telling the backend, so those rings would stay
    /// disabled forever. Before each request, peek at it: if it is such an
    /// early SET_VRING_ENABLE, apply it to the device here (the crate then
    /// refuses it as before; QEMU asks for no reply to it).
    pub fn apply_early_vring_enable(&mut self, fd: BorrowedFd<'_>) {
        if self.backend.protocol_features_acked() {
            return;
        }
        let Some((index, enable)) = peek_vring_enable(fd) else {
            return;
        };
        log::debug!("vring {index}: SET_VRING_ENABLE({enable}) before SET_FEATURES: applied");
        if let Err(e) = self.backend.set_vring_enable(index, enable) {
            log::warn!("refused early SET_VRING_ENABLE: {e}");
        }
    }

    fn answer_reply<T>(&mut self, request: &str, r: DevResult<T>) -> VhostResult<T> {
        if r.is_err() {
            self.reply_lost = true;
        }
        answer(request, r)
    }
}

impl VhostUserBackendReqHandlerMut for VhostUserDevice {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.backend.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.backend.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.backend.offered_features())
    }

    fn set_features(&mut self, f: u64) -> VhostResult<()> {
        log::info!("driver features {f:#x}");
        answer("SET_FEATURES", self.backend.set_features(f))
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        answer("SET_MEM_TABLE", self.backend.set_mem_table(ctx, files)).map(|_| None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        answer("SET_VRING_NUM", self.backend.set_vring_num(index, num))
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        answer(
            "SET_VRING_ADDR",
            self.backend
                .set_vring_addr(index, descriptor, used, available),
        )
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        answer("SET_VRING_BASE", self.backend.set_vring_base(index, base))
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let r = self.backend.get_vring_base(index);
        let base = self.answer_reply("GET_VRING_BASE", r)?;
        Ok(VhostUserVringState::new(index, base as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        answer("SET_VRING_KICK", self.backend.set_vring_kick(index, fd))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        answer("SET_VRING_CALL", self.backend.set_vring_call(index, fd))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        answer("SET_VRING_ERR", self.backend.set_vring_err(index, fd))
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(features::protocol_offered())
    }

    fn set_protocol_features(&mut self, f: u64) -> VhostResult<()> {
        answer(
            "SET_PROTOCOL_FEATURES",
            self.backend.set_protocol_features(f),
        )
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.backend.queue_pairs() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        answer(
            "SET_VRING_ENABLE",
            self.backend.set_vring_enable(index, enable),
        )
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        // The vhost crate answers a failed GET_CONFIG with an empty payload,
        // which the VMM understands as an error.
        answer("GET_CONFIG", self.backend.get_config(offset, size))
    }

    fn set_config(&mut self, _o: u32, _b: &[u8], _f: VhostUserConfigFlags) -> VhostResult<()> {
        unsupported("SET_CONFIG (the config space is read-only)")
    }

    fn set_gpu_socket(&mut self, _g: GpuBackend) -> VhostResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _u: VhostUserSharedMsg) -> VhostResult<File> {
        self.reply_lost = true;
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        _i: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        self.reply_lost = true;
        unsupported("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _f: File) -> VhostResult<()> {
        unsupported("SET_INFLIGHT_FD")
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        self.reply_lost = true;
        unsupported("GET_MAX_MEM_SLOTS")
    }

    fn add_mem_region(
        &mut self,
        _r: &VhostUserSingleMemoryRegion,
        _f: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("ADD_MEM_REG")
    }

    fn remove_mem_region(&mut self, _r: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        unsupported("REM_MEM_REG")
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _f: File,
    ) -> VhostResult<Option<File>> {
        unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        self.reply_lost = true;
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, _l: &VhostUserLog, _f: File) -> VhostResult<()> {
        unsupported("SET_LOG_BASE")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_a_whole_header_goes_to_the_vhost_crate() {
        let t = Duration::from_millis(30);
        let (mut vmm, ours) = UnixStream::pair().unwrap();
        assert_eq!(wait_for_header(ours.as_fd(), t), Header::Empty);
        vmm.write_all(&[1, 0, 0, 0, 1]).unwrap();
        let started = Instant::now();
        assert_eq!(wait_for_header(ours.as_fd(), t), Header::Stalled(5));
        assert!(started.elapsed() >= t, "waited for the rest");
        vmm.write_all(&[0; 7]).unwrap();
        assert_eq!(wait_for_header(ours.as_fd(), t), Header::Ready);
        drop(vmm);
        assert_eq!(
            wait_for_header(ours.as_fd(), Duration::from_secs(10)),
            Header::Ready,
            "a whole header is read even after the VMM left"
        );
        let (mut vmm, ours) = UnixStream::pair().unwrap();
        vmm.write_all(&[1, 0, 0]).unwrap();
        drop(vmm);
        let started = Instant::now();
        assert_eq!(
            wait_for_header(ours.as_fd(), Duration::from_secs(10)),
            Header::Closed
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no wait once closed"
        );
        let (vmm, ours) = UnixStream::pair().unwrap();
        drop(vmm);
        assert_eq!(wait_for_header(ours.as_fd(), t), Header::Closed);
    }
}
