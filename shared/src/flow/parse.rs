//! Reading a flow key out of an Ethernet frame.
//!
//! [`FlowKey::parse`] reads untrusted bytes from the guest or the TAP: it
//! never indexes without a bounds check and never panics, whatever the input
//! (a unit test feeds it random and truncated frames).

use super::key::{protocol, Direction, Family, FlowKey};

/// The most bytes of a frame [`FlowKey::parse`] looks at: Ethernet, two
/// VLAN tags, an IPv6 header with a few extension headers and a TCP header
/// fit. Callers with a frame spread over buffers copy at most this much.
pub const FLOW_HEADROOM: usize = 256;

/// A key and what else one frame tells about its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedFrame {
    /// The flow.
    pub key: FlowKey,
    /// TCP flags of this segment (0 for other protocols).
    pub tcp_flags: u8,
}

/// Why a frame has no flow key. Such frames are forwarded all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The frame ends inside a header the key needs.
    #[error("frame truncated inside its headers")]
    Truncated,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    #[error("not an IP frame (ethertype {ethertype:#06x})")]
    NotIp {
        /// The (innermost) ethertype.
        ethertype: u16,
    },
    /// The IP header is malformed (wrong version, header length too small).
    #[error("malformed IP header")]
    BadIpHeader,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXTENSIONS: usize = 8;

/// Bounds-checked big-endian reads of a byte string.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&self, at: usize) -> Result<u8, ParseError> {
        self.0.get(at).copied().ok_or(ParseError::Truncated)
    }

    fn be16(&self, at: usize) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes([
            self.u8(at)?,
            self.u8(at.saturating_add(1))?,
        ]))
    }

    fn copy_to(&self, at: usize, out: &mut [u8]) -> Result<(), ParseError> {
        let end = at.checked_add(out.len()).ok_or(ParseError::Truncated)?;
        out.copy_from_slice(self.0.get(at..end).ok_or(ParseError::Truncated)?);
        Ok(())
    }

    fn has(&self, at: usize, len: usize) -> bool {
        at.checked_add(len).is_some_and(|end| end <= self.0.len())
    }
}

/// The L3 part of a frame: addresses, protocol and where L4 starts (None
/// for a non-first fragment, which carries no L4 header).
struct L3 {
    family: Family,
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    l4: Option<usize>,
}

impl FlowKey {
    /// Read the flow key of an Ethernet frame (without virtio-net header).
    /// Only the first [`FLOW_HEADROOM`] bytes matter. Never panics.
    pub fn parse(frame: &[u8], direction: Direction) -> Result<ParsedFrame, ParseError> {
        let b = Bytes(frame);
        let (ethertype, l3, vlan) = parse_ethernet(&b)?;
        let l3 = match ethertype {
            ETHERTYPE_IPV4 => parse_ipv4(&b, l3)?,
            ETHERTYPE_IPV6 => parse_ipv6(&b, l3)?,
            ethertype => return Err(ParseError::NotIp { ethertype }),
        };
        let (src_port, dst_port, tcp_flags) = match l3.l4 {
            Some(at) => parse_ports(&b, at, l3.family, l3.protocol)?,
            None => (0, 0, 0),
        };
        let key = match direction {
            Direction::Tx => FlowKey {
                family: l3.family,
                protocol: l3.protocol,
                vlan,
                guest_addr: l3.src,
                remote_addr: l3.dst,
                guest_port: src_port,
                remote_port: dst_port,
            },
            Direction::Rx => FlowKey {
                family: l3.family,
                protocol: l3.protocol,
                vlan,
                guest_addr: l3.dst,
                remote_addr: l3.src,
                guest_port: dst_port,
                remote_port: src_port,
            },
        };
        Ok(ParsedFrame {
            key: icmp_oriented(key),
            tcp_flags,
        })
    }
}

/// The body of the `flow_key` fuzz target (`fuzz/`), also replayed over
/// the kept corpus by `tests/tests/fuzz_replay.rs`: [`FlowKey::parse`] of
/// `frame` in both directions must not panic, and both directions must
/// agree on whether the frame has a key (and, if not, why).
pub fn fuzz_flow_key(frame: &[u8]) {
    let tx = FlowKey::parse(frame, Direction::Tx);
    let rx = FlowKey::parse(frame, Direction::Rx);
    match (tx, rx) {
        (Ok(t), Ok(r)) => {
            assert_eq!(t.tcp_flags, r.tcp_flags, "TX and RX disagree on TCP flags");
            assert_eq!(t.key.family, r.key.family);
            assert_eq!(t.key.protocol, r.key.protocol);
        }
        (Err(t), Err(r)) => assert_eq!(t, r, "TX and RX disagree on the error"),
        (t, r) => panic!("TX parsed {t:?} but RX parsed {r:?}"),
    }
}

/// ICMP echo keeps its identifier in `guest_port` whichever way it went
/// (parse_ports put it in both port fields).
fn icmp_oriented(mut key: FlowKey) -> FlowKey {
    if matches!(key.protocol, protocol::ICMP | protocol::ICMPV6) {
        key.remote_port = 0;
    }
    key
}

/// Returns (ethertype, offset of the L3 header, outer VLAN id).
fn parse_ethernet(b: &Bytes) -> Result<(u16, usize, u16), ParseError> {
    let mut ethertype = b.be16(12)?;
    let mut at = 14;
    let mut vlan = 0;
    for tag in 0..MAX_VLAN_TAGS {
        if !ETHERTYPE_VLAN.contains(&ethertype) {
            break;
        }
        let tci = b.be16(at)?;
        if tag == 0 {
            vlan = tci & 0x0fff;
        }
        ethertype = b.be16(at + 2)?;
        at += 4;
    }
    Ok((ethertype, at, vlan))
}

fn parse_ipv4(b: &Bytes, at: usize) -> Result<L3, ParseError> {
    let version_ihl = b.u8(at)?;
    if version_ihl >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < 20 {
        return Err(ParseError::BadIpHeader);
    }
    if !b.has(at, 20) {
        return Err(ParseError::Truncated);
    }
    let fragment_offset = b.be16(at + 6)? & 0x1fff;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    b.copy_to(at + 12, &mut src[..4])?;
    b.copy_to(at + 16, &mut dst[..4])?;
    Ok(L3 {
        family: Family::Ipv4,
        protocol: b.u8(at + 9)?,
        src,
        dst,
        l4: (fragment_offset == 0).then_some(at + header_len),
    })
}

fn parse_ipv6(b: &Bytes, at: usize) -> Result<L3, ParseError> {
    if b.u8(at)? >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    if !b.has(at, 40) {
        return Err(ParseError::Truncated);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    b.copy_to(at + 8, &mut src)?;
    b.copy_to(at + 24, &mut dst)?;
    let mut next = b.u8(at + 6)?;
    let mut l4 = Some(at + 40);
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let Some(here) = l4 else { break };
        let len = match next {
            // Hop-by-hop, routing, destination options, HIP, shim6,
            // mobility: length in 8-byte units, not counting the first 8.
            0 | 43 | 60 | 135 | 139 | 140 => (usize::from(b.u8(here + 1)?) + 1) * 8,
            // Fragment: fixed 8 bytes; only the first fragment has ports.
            44 => {
                if b.be16(here + 2)? & 0xfff8 != 0 {
                    l4 = None;
                }
                8
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => (usize::from(b.u8(here + 1)?) + 2) * 4,
            _ => break,
        };
        next = b.u8(here)?;
        l4 = l4.map(|_| here + len);
    }
    Ok(L3 {
        family: Family::Ipv6,
        protocol: next,
        src,
        dst,
        l4,
    })
}

/// Returns (source port, destination port, TCP flags) of the L4 header.
fn parse_ports(
    b: &Bytes,
    at: usize,
    family: Family,
    proto: u8,
) -> Result<(u16, u16, u8), ParseError> {
    match (proto, family) {
        (protocol::TCP, _) => Ok((b.be16(at)?, b.be16(at + 2)?, b.u8(at + 13)?)),
        (protocol::UDP, _) => Ok((b.be16(at)?, b.be16(at + 2)?, 0)),
        (protocol::ICMP, Family::Ipv4) | (protocol::ICMPV6, Family::Ipv6) => {
            let icmp_type = b.u8(at)?;
            let echo = match family {
                Family::Ipv4 => matches!(icmp_type, 0 | 8),
                Family::Ipv6 => matches!(icmp_type, 128 | 129),
            };
            if echo {
                let id = b.be16(at + 4)?;
                Ok((id, id, 0))
            } else {
                Ok((0, 0, 0))
            }
        }
        _ => Ok((0, 0, 0)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flow::tcp_flags;
    use crate::flow::testing::Rng;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn ethernet(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    pub(crate) fn tcp4_frame(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        flags: u8,
    ) -> Vec<u8> {
        let mut f = ethernet(ETHERTYPE_IPV4);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, protocol::TCP, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f
    }

    pub(crate) fn udp6_frame_with_extensions(vlan: Option<u16>) -> Vec<u8> {
        let mut f = match vlan {
            Some(v) => {
                let mut f = ethernet(0x8100);
                f.extend_from_slice(&v.to_be_bytes());
                f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                f
            }
            None => ethernet(ETHERTYPE_IPV6),
        };
        let src: Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut ip = vec![0x60, 0, 0, 0, 0, 32, 0 /* hop-by-hop */, 64];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop -> dest opts
        f.extend_from_slice(&[protocol::UDP, 0, 1, 4, 0, 0, 0, 0]); // dest opts -> UDP
        f.extend_from_slice(&[0x13, 0x88, 0x00, 0x35, 0, 8, 0, 0]); // 5000 -> 53
        f
    }

    #[test]
    fn tcp4_both_directions_give_one_key() {
        let out = tcp4_frame([10, 77, 0, 2], 40000, [10, 77, 0, 1], 80, tcp_flags::SYN);
        let back = tcp4_frame(
            [10, 77, 0, 1],
            80,
            [10, 77, 0, 2],
            40000,
            tcp_flags::SYN | tcp_flags::ACK,
        );
        let a = FlowKey::parse(&out, Direction::Tx).unwrap();
        let b = FlowKey::parse(&back, Direction::Rx).unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(
            a.key,
            FlowKey::v4(
                protocol::TCP,
                (Ipv4Addr::new(10, 77, 0, 2), 40000),
                (Ipv4Addr::new(10, 77, 0, 1), 80)
            )
        );
        assert_eq!(a.tcp_flags, tcp_flags::SYN);
        assert_eq!(b.tcp_flags, tcp_flags::SYN | tcp_flags::ACK);
        assert_eq!(a.key.to_string(), "tcp 10.77.0.2:40000 <-> 10.77.0.1:80");
    }

    #[test]
    fn udp6_through_extension_headers_and_vlan() {
        let p = FlowKey::parse(&udp6_frame_with_extensions(Some(0x2007)), Direction::Tx).unwrap();
        assert_eq!(p.key.family, Family::Ipv6);
        assert_eq!(p.key.protocol, protocol::UDP);
        assert_eq!(p.key.vlan, 7);
        assert_eq!((p.key.guest_port, p.key.remote_port), (5000, 53));
        assert_eq!(p.key.guest_ip(), "fd00::2".parse::<IpAddr>().unwrap());
        let untagged = FlowKey::parse(&udp6_frame_with_extensions(None), Direction::Tx).unwrap();
        assert_eq!(untagged.key.vlan, 0);
        assert_ne!(untagged.key, p.key);
    }

    #[test]
    fn icmp_echo_keyed_by_identifier_both_ways() {
        let mut req = tcp4_frame([10, 77, 0, 2], 0, [10, 77, 0, 1], 0, 0);
        req[23] = protocol::ICMP;
        req[34] = 8; // echo request
        req[38..40].copy_from_slice(&0x1234u16.to_be_bytes());
        let mut rep = tcp4_frame([10, 77, 0, 1], 0, [10, 77, 0, 2], 0, 0);
        rep[23] = protocol::ICMP;
        rep[34] = 0; // echo reply
        rep[38..40].copy_from_slice(&0x1234u16.to_be_bytes());
        let a = FlowKey::parse(&req, Direction::Tx).unwrap().key;
        let b = FlowKey::parse(&rep, Direction::Rx).unwrap().key;
        assert_eq!(a, b);
        assert_eq!((a.guest_port, a.remote_port), (0x1234, 0));
    }

    #[test]
    fn non_ip_fragments_and_bad_headers() {
        assert_eq!(
            FlowKey::parse(&ethernet(0x0806), Direction::Tx),
            Err(ParseError::NotIp { ethertype: 0x0806 })
        );
        let mut frag = tcp4_frame([10, 77, 0, 2], 1, [10, 77, 0, 1], 2, 0);
        frag[20] = 0x00;
        frag[21] = 0x10; // fragment offset 16: no ports
        let k = FlowKey::parse(&frag, Direction::Tx).unwrap().key;
        assert_eq!((k.guest_port, k.remote_port), (0, 0));
        let mut bad = tcp4_frame([10, 77, 0, 2], 1, [10, 77, 0, 1], 2, 0);
        bad[14] = 0x43; // IHL 3
        assert_eq!(
            FlowKey::parse(&bad, Direction::Tx),
            Err(ParseError::BadIpHeader)
        );
        let mut other = tcp4_frame([10, 77, 0, 2], 1, [10, 77, 0, 1], 2, 0);
        other[23] = 47; // GRE: by protocol and addresses only
        let k = FlowKey::parse(&other, Direction::Tx).unwrap().key;
        assert_eq!((k.protocol, k.guest_port, k.remote_port), (47, 0, 0));
    }

    #[test]
    fn random_and_truncated_frames_never_panic() {
        let samples = [
            tcp4_frame([10, 77, 0, 2], 1, [10, 77, 0, 1], 2, 0x12),
            udp6_frame_with_extensions(Some(3)),
            udp6_frame_with_extensions(None),
        ];
        for frame in &samples {
            for len in 0..=frame.len() {
                for dir in [Direction::Tx, Direction::Rx] {
                    let _ = FlowKey::parse(&frame[..len], dir);
                }
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..50_000 {
            let mut f = if round % 2 == 0 {
                samples[round % samples.len()].clone()
            } else {
                let len = rng.below(2 * FLOW_HEADROOM as u64) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            };
            // Flip a few bytes, sometimes into VLAN / IP ethertypes.
            for _ in 0..rng.below(6) {
                if f.is_empty() {
                    break;
                }
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
            if round % 7 == 0 && f.len() > 14 {
                f[12..14].copy_from_slice(&[0x81, 0x00]);
            }
            let cut = rng.below(f.len() as u64 + 1) as usize;
            let _ = FlowKey::parse(&f[..cut], Direction::Tx);
            let _ = FlowKey::parse(&f, Direction::Rx);
        }
    }
}
