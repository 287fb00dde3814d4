//! Test frames that can be checked byte for byte.
//!
//! A test frame is a pure function of its [`FrameSpec`] (queue, sequence
//! number, length, kind). The spec is written into the frame's payload, so a
//! receiver reads it back, rebuilds the frame it must be, and compares every
//! byte ([`verify`]). Two kinds:
//!
//! - [`FrameKind::Experimental`]: ethertype 0x88B5 (IEEE local experimental),
//!   nothing in the kernel reacts to it; used guest -> TAP.
//! - [`FrameKind::Udp`]: IPv4/UDP between test addresses 10.77.0.1 ->
//!   10.77.0.2 with a source port per flow, so the tun driver's flow hash
//!   spreads frames over its queues; used TAP -> guest.
//!
//! Payload header (16 bytes, after the Ethernet or IPv4/UDP headers):
//! magic "QPT1", queue u16, reserved u16, seq u32, total length u16, flow u16
//! (all big endian), then a pattern derived from (queue, seq, offset).

use anyhow::{bail, Result};

/// The ethertype of [`FrameKind::Experimental`] frames.
pub const ETHERTYPE_TEST: u16 = 0x88B5;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Smallest frame a test sends (an Ethernet minimum without FCS).
pub const MIN_FRAME: usize = 60;
/// Largest frame a test sends (1500-byte MTU plus the Ethernet header).
pub const MAX_FRAME: usize = 1514;

const MAGIC: [u8; 4] = *b"QPT1";
const ETH_HEADER: usize = 14;
const IP_UDP_HEADERS: usize = 28;
const PAYLOAD_HEADER: usize = 16;
/// Destination MAC of test frames (locally administered).
pub const DST_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
/// Source MAC of test frames (locally administered).
pub const SRC_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
/// UDP destination port of [`FrameKind::Udp`] frames.
pub const UDP_PORT: u16 = 5555;

/// Which stream a frame belongs to and its position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameId {
    /// The queue (or stream) the frame was sent on.
    pub queue: u16,
    /// Sequence number within that queue.
    pub seq: u32,
}

/// The encapsulation of a test frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Ethertype 0x88B5, payload right after the Ethernet header.
    Experimental,
    /// IPv4/UDP; `flow` selects the UDP source port (40000 + flow).
    Udp {
        /// Flow number, so that different flows hash to different queues.
        flow: u16,
    },
}

/// Everything a test frame is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    /// Stream and sequence number.
    pub id: FrameId,
    /// Total frame length in bytes, Ethernet header included.
    pub len: usize,
    /// Encapsulation.
    pub kind: FrameKind,
}

/// A frame length in [`MIN_FRAME`]..=[`MAX_FRAME`] that varies with `seq`
/// (deterministic), hitting both ends regularly.
pub fn mixed_len(seq: u32) -> usize {
    match seq % 16 {
        0 => MIN_FRAME,
        1 => MAX_FRAME,
        _ => {
            let x = seq.wrapping_mul(2_654_435_761).rotate_left(7);
            MIN_FRAME + (x as usize % (MAX_FRAME - MIN_FRAME + 1))
        }
    }
}

fn payload_offset(kind: FrameKind) -> usize {
    match kind {
        FrameKind::Experimental => ETH_HEADER,
        FrameKind::Udp { .. } => ETH_HEADER + IP_UDP_HEADERS,
    }
}

fn pattern_byte(id: FrameId, offset: usize) -> u8 {
    (id.seq as usize)
        .wrapping_mul(31)
        .wrapping_add(offset.wrapping_mul(7))
        .wrapping_add(id.queue as usize * 13) as u8
}

/// Build the frame described by `spec`.
///
/// # Panics
/// If `spec.len` is outside [`MIN_FRAME`]..=65535 (a test bug).
pub fn build(spec: &FrameSpec) -> Vec<u8> {
    assert!(
        (MIN_FRAME..=65535).contains(&spec.len),
        "bad test frame length {}",
        spec.len
    );
    let mut f = Vec::with_capacity(spec.len);
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    let flow = match spec.kind {
        FrameKind::Experimental => {
            f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
            0
        }
        FrameKind::Udp { flow } => {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            push_ipv4_udp(&mut f, spec, flow);
            flow
        }
    };
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&spec.id.queue.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&spec.id.seq.to_be_bytes());
    f.extend_from_slice(&(spec.len as u16).to_be_bytes());
    f.extend_from_slice(&flow.to_be_bytes());
    while f.len() < spec.len {
        let off = f.len();
        f.push(pattern_byte(spec.id, off));
    }
    f
}

fn push_ipv4_udp(f: &mut Vec<u8>, spec: &FrameSpec, flow: u16) {
    let ip_len = (spec.len - ETH_HEADER) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&(spec.id.seq as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    let udp_len = ip_len - 20;
    f.extend_from_slice(&(40000u16.wrapping_add(flow)).to_be_bytes());
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
}

fn ipv4_checksum(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Read the spec back from a frame, if it is a test frame at all.
pub fn parse(frame: &[u8]) -> Option<FrameSpec> {
    if frame.len() < ETH_HEADER {
        return None;
    }
    let kind = match u16::from_be_bytes([frame[12], frame[13]]) {
        ETHERTYPE_TEST => FrameKind::Experimental,
        ETHERTYPE_IPV4 => FrameKind::Udp { flow: 0 },
        _ => return None,
    };
    let p = payload_offset(kind);
    let h = frame.get(p..p + PAYLOAD_HEADER)?;
    if h[0..4] != MAGIC {
        return None;
    }
    let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let id = FrameId {
        queue: be16(4),
        seq: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
    };
    let kind = match kind {
        FrameKind::Udp { .. } => FrameKind::Udp { flow: be16(14) },
        k => k,
    };
    Some(FrameSpec {
        id,
        len: usize::from(be16(12)),
        kind,
    })
}

/// Check a received frame byte for byte against the frame its embedded spec
/// describes; return its id, or say exactly what is wrong.
pub fn verify(frame: &[u8]) -> Result<FrameId> {
    let Some(spec) = parse(frame) else {
        bail!(
            "not a test frame ({} bytes, starts {:02x?})",
            frame.len(),
            &frame[..frame.len().min(32)]
        );
    };
    if spec.len < MIN_FRAME {
        bail!(
            "{:?}: embedded length {} is below the minimum",
            spec.id,
            spec.len
        );
    }
    let expected = build(&spec);
    if frame.len() != expected.len() {
        bail!(
            "{:?}: {} bytes received, {} expected",
            spec.id,
            frame.len(),
            expected.len()
        );
    }
    if let Some(i) = frame.iter().zip(&expected).position(|(a, b)| a != b) {
        bail!(
            "{:?}: byte {i} is {:#04x}, expected {:#04x}",
            spec.id,
            frame[i],
            expected[i]
        );
    }
    Ok(spec.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_found() {
        for kind in [FrameKind::Experimental, FrameKind::Udp { flow: 9 }] {
            for seq in 0..200 {
                let spec = FrameSpec {
                    id: FrameId { queue: 2, seq },
                    len: mixed_len(seq),
                    kind,
                };
                let mut f = build(&spec);
                assert_eq!(f.len(), spec.len);
                assert_eq!(parse(&f), Some(spec));
                assert_eq!(verify(&f).unwrap(), spec.id);
                let last = f.len() - 1;
                f[last] ^= 1;
                assert!(verify(&f).is_err());
                f[last] ^= 1;
                f.pop();
                assert!(verify(&f).is_err());
            }
        }
        assert!((0..1000)
            .map(mixed_len)
            .all(|l| (MIN_FRAME..=MAX_FRAME).contains(&l)));
        assert!((0..1000).map(mixed_len).any(|l| l == MAX_FRAME));
    }

    #[test]
    fn ipv4_header_checksum_is_valid() {
        let spec = FrameSpec {
            id: FrameId {
                queue: 0,
                seq: 1234,
            },
            len: 100,
            kind: FrameKind::Udp { flow: 1 },
        };
        let f = build(&spec);
        let ip: [u8; 20] = f[14..34].try_into().unwrap();
        // Summing a header with its checksum in place gives 0xffff -> !0.
        assert_eq!(ipv4_checksum(&ip), 0);
    }
}
