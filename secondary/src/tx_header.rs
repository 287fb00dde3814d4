//! The virtio-net header of a TX frame, checked before the frame reaches
//! the host kernel.
//!
//! The TX path copies the header out of guest memory once
//! ([`TxHeader::read`]), checks the copy against what the driver negotiated
//! and the frame's length ([`TxHeader::check`]), and hands the kernel the
//! copy, never the guest's bytes: a guest rewriting its header after the
//! check changes nothing. A frame whose header asks for something the
//! device did not offer (a GSO type, checksum offload), or points outside
//! the frame, is dropped and counted by cause ([`HeaderFault`]).

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};

use crate::counters::LocalCounters;
use crate::iovecs::IoVecs;

/// The longest virtio-net header (with `num_buffers`).
pub const MAX_HEADER_LEN: usize = 12;

/// The TX offloads the driver negotiated: what a TX header may ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: partial checksums (NEEDS_CSUM).
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_HOST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_HOST_ECN (TSO with the ECN bit).
    pub ecn: bool,
    /// VIRTIO_NET_F_HOST_UFO.
    pub ufo: bool,
}

impl TxOffloads {
    /// From the acknowledged feature bits.
    pub fn from_features(features: u64) -> TxOffloads {
        let has = |b: u32| features & (1u64 << b) != 0;
        TxOffloads {
            csum: has(VIRTIO_NET_F_CSUM),
            tso4: has(VIRTIO_NET_F_HOST_TSO4),
            tso6: has(VIRTIO_NET_F_HOST_TSO6),
            ecn: has(VIRTIO_NET_F_HOST_ECN),
            ufo: has(VIRTIO_NET_F_HOST_UFO),
        }
    }
}

/// Why a TX header was refused; each cause has its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// Flag bits other than NEEDS_CSUM, or NEEDS_CSUM without CSUM.
    Flags(u8),
    /// A GSO type that is unknown or was not negotiated (ECN included).
    Gso(u8),
    /// A GSO type with `gso_size` 0.
    GsoSize,
    /// `hdr_len` past the end of the frame.
    HdrLen(u16),
    /// `csum_start + csum_offset` (and the 2-byte checksum) past the end.
    Csum(u16, u16),
}

impl HeaderFault {
    /// Count it in its counter.
    pub fn count(self, c: &mut LocalCounters) {
        match self {
            HeaderFault::Flags(_) => c.drop_hdr_flags += 1,
            HeaderFault::Gso(_) => c.drop_hdr_gso += 1,
            HeaderFault::GsoSize => c.drop_hdr_gso_size += 1,
            HeaderFault::HdrLen(_) => c.drop_hdr_len += 1,
            HeaderFault::Csum(..) => c.drop_hdr_csum += 1,
        }
    }
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Flags(x) => write!(f, "virtio-net header flags {x:#04x} not allowed"),
            HeaderFault::Gso(t) => write!(f, "GSO type {t:#04x} not negotiated"),
            HeaderFault::GsoSize => write!(f, "GSO frame with gso_size 0"),
            HeaderFault::HdrLen(n) => write!(f, "hdr_len {n} past the end of the frame"),
            HeaderFault::Csum(s, o) => {
                write!(f, "checksum at {s}+{o} past the end of the frame")
            }
        }
    }
}

/// A private copy of a TX frame's virtio-net header.
#[derive(Debug, Clone, Copy)]
pub struct TxHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl TxHeader {
    /// Copy the first `len` bytes (10 or 12) of `frame`; `None` when the
    /// frame is shorter.
    pub fn read(frame: &IoVecs<'_>, len: usize) -> Option<TxHeader> {
        let mut h = TxHeader {
            bytes: [0; MAX_HEADER_LEN],
            len: len.min(MAX_HEADER_LEN),
        };
        (frame.read_at(0..frame.len(), 0, &mut h.bytes[..h.len]) == h.len).then_some(h)
    }

    /// A header of `len` bytes from `bytes` (tests and fuzzing).
    pub fn from_bytes(bytes: &[u8]) -> TxHeader {
        let mut h = TxHeader {
            bytes: [0; MAX_HEADER_LEN],
            len: bytes.len().min(MAX_HEADER_LEN),
        };
        h.bytes[..h.len].copy_from_slice(&bytes[..h.len]);
        h
    }

    /// The header's bytes, for the write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// Check the copy for a frame of `frame_len` bytes after the header.
    pub fn check(&self, offloads: TxOffloads, frame_len: u64) -> Result<(), HeaderFault> {
        let (flags, gso_type) = (self.bytes[0], self.bytes[1]);
        let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        if flags & !needs_csum != 0 || (flags & needs_csum != 0 && !offloads.csum) {
            return Err(HeaderFault::Flags(flags));
        }
        let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
        let base = u32::from(gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8));
        let allowed = match base {
            VIRTIO_NET_HDR_GSO_NONE => !ecn,
            VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4 && (!ecn || offloads.ecn),
            VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6 && (!ecn || offloads.ecn),
            VIRTIO_NET_HDR_GSO_UDP => offloads.ufo && !ecn,
            _ => false,
        };
        if !allowed {
            return Err(HeaderFault::Gso(gso_type));
        }
        let (hdr_len, gso_size) = (self.u16_at(2), self.u16_at(4));
        let (csum_start, csum_offset) = (self.u16_at(6), self.u16_at(8));
        if base != VIRTIO_NET_HDR_GSO_NONE && gso_size == 0 {
            return Err(HeaderFault::GsoSize);
        }
        if u64::from(hdr_len) > frame_len {
            return Err(HeaderFault::HdrLen(hdr_len));
        }
        let csum_end = u64::from(csum_start) + u64::from(csum_offset) + 2;
        if flags & needs_csum != 0 && csum_end > frame_len {
            return Err(HeaderFault::Csum(csum_start, csum_offset));
        }
        Ok(())
    }
}

/// The body of the `tx_header` fuzz target (`fuzz/`), also replayed over
/// the kept corpus by `tests/tests/fuzz_replay.rs`. `input[0]` gives
/// the offloads (bits 0-4: csum, tso4, tso6, ecn, ufo) and bits 16-18 of the
/// frame length (bits 5-7), `input[1..3]` the frame length's low 16 bits
/// (little endian), and the rest (at most [`MAX_HEADER_LEN`] bytes, padded
/// with zeros to 10) is the header. [`TxHeader::check`] must not panic, and
/// a header it accepts must lie inside the frame: `hdr_len <= frame_len`,
/// and with NEEDS_CSUM `csum_start + csum_offset + 2 <= frame_len`. Panics
/// only when that fails.
pub fn fuzz_tx_header(input: &[u8]) {
    let Some((&[sel, lo, hi], header)) = input.split_first_chunk::<3>() else {
        return;
    };
    let bit = |b: u8| sel & (1 << b) != 0;
    let offloads = TxOffloads {
        csum: bit(0),
        tso4: bit(1),
        tso6: bit(2),
        ecn: bit(3),
        ufo: bit(4),
    };
    let frame_len = u64::from(u16::from_le_bytes([lo, hi])) | (u64::from(sel >> 5) << 16);
    let h = TxHeader::from_bytes(header);
    if h.check(offloads, frame_len).is_ok() {
        // The fields, read again here from the input itself.
        let mut raw = [0u8; MAX_HEADER_LEN];
        let n = header.len().min(MAX_HEADER_LEN);
        raw[..n].copy_from_slice(&header[..n]);
        let at = |i: usize| u64::from(u16::from_le_bytes([raw[i], raw[i + 1]]));
        let (hdr_len, csum_start, csum_offset) = (at(2), at(6), at(8));
        assert!(
            hdr_len <= frame_len,
            "accepted hdr_len {hdr_len} > frame_len {frame_len}"
        );
        if raw[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
            let end = csum_start + csum_offset + 2;
            assert!(
                end <= frame_len,
                "accepted checksum end {end} > frame_len {frame_len}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        ufo: false,
    };

    /// flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
    fn hdr(f: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> TxHeader {
        let mut b = vec![f, gso];
        for v in [hdr_len, gso_size, start, off] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[0, 0]);
        TxHeader::from_bytes(&b)
    }

    #[test]
    fn well_formed_headers_pass() {
        assert_eq!(
            hdr(0, 0, 0, 0, 0, 0).check(TxOffloads::default(), 60),
            Ok(())
        );
        // A TSO4 frame with a partial checksum at 34+16 in a 9014-byte frame.
        assert_eq!(hdr(1, 1, 54, 1448, 34, 16).check(ALL, 9014), Ok(()));
        assert_eq!(hdr(1, 4 | 0x80, 74, 1428, 54, 16).check(ALL, 9014), Ok(()));
        // The checksum's last byte is the frame's last byte.
        assert_eq!(hdr(1, 0, 0, 0, 40, 18).check(ALL, 60), Ok(()));
    }

    #[test]
    fn each_malformed_class_has_its_cause() {
        let none = TxOffloads::default();
        assert_eq!(
            hdr(4, 0, 0, 0, 0, 0).check(ALL, 60),
            Err(HeaderFault::Flags(4))
        );
        assert_eq!(
            hdr(2, 0, 0, 0, 0, 0).check(ALL, 60),
            Err(HeaderFault::Flags(2))
        );
        assert_eq!(
            hdr(1, 0, 0, 0, 0, 0).check(none, 60),
            Err(HeaderFault::Flags(1))
        );
        assert_eq!(
            hdr(0, 1, 54, 1448, 0, 0).check(none, 60),
            Err(HeaderFault::Gso(1))
        );
        assert_eq!(
            hdr(0, 3, 42, 1000, 0, 0).check(ALL, 60),
            Err(HeaderFault::Gso(3))
        );
        assert_eq!(
            hdr(0, 5, 42, 1000, 0, 0).check(ALL, 60),
            Err(HeaderFault::Gso(5))
        );
        assert_eq!(
            hdr(0, 0x80, 0, 0, 0, 0).check(ALL, 60),
            Err(HeaderFault::Gso(0x80))
        );
        let no_ecn = TxOffloads { ecn: false, ..ALL };
        assert_eq!(
            hdr(1, 0x81, 54, 1448, 34, 16).check(no_ecn, 9014),
            Err(HeaderFault::Gso(0x81))
        );
        assert_eq!(
            hdr(1, 1, 54, 0, 34, 16).check(ALL, 9014),
            Err(HeaderFault::GsoSize)
        );
        assert_eq!(
            hdr(0, 0, 61, 0, 0, 0).check(ALL, 60),
            Err(HeaderFault::HdrLen(61))
        );
        assert_eq!(
            hdr(1, 0, 0, 0, 40, 19).check(ALL, 60),
            Err(HeaderFault::Csum(40, 19))
        );
        assert_eq!(
            hdr(1, 0, 0, 0, u16::MAX, u16::MAX).check(ALL, 60),
            Err(HeaderFault::Csum(u16::MAX, u16::MAX))
        );
    }

    #[test]
    fn faults_count_by_cause() {
        let mut c = LocalCounters::default();
        for f in [
            HeaderFault::Flags(4),
            HeaderFault::Gso(3),
            HeaderFault::GsoSize,
            HeaderFault::HdrLen(9),
            HeaderFault::Csum(1, 2),
            HeaderFault::Csum(1, 2),
        ] {
            f.count(&mut c);
        }
        assert_eq!(
            (
                c.drop_hdr_flags,
                c.drop_hdr_gso,
                c.drop_hdr_gso_size,
                c.drop_hdr_len,
                c.drop_hdr_csum
            ),
            (1, 1, 1, 1, 2)
        );
    }

    #[test]
    fn offloads_follow_the_features() {
        let f = (1u64 << VIRTIO_NET_F_CSUM) | (1u64 << VIRTIO_NET_F_HOST_TSO6);
        let o = TxOffloads::from_features(f);
        assert!(o.csum && o.tso6 && !o.tso4 && !o.ecn && !o.ufo);
    }
}
