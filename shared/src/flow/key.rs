//! What identifies a flow: the key, the words it is packed into in a table
//! entry, and the keyed hash that places it.
//!
//! A [`FlowKey`] is (L3 family, L4 protocol, VLAN, guest address and port,
//! remote address and port). It is oriented from the guest's point of view,
//! not by source and destination: a frame the guest sends (TX) and the
//! reply it receives (RX) give the same key, so one table entry counts both
//! directions. Ports are the TCP/UDP ports, the echo identifier for ICMP and
//! ICMPv6 echo (in `guest_port`), and zero for other ICMP messages, for
//! non-first fragments and for every other protocol (keyed by protocol and
//! addresses only).
//!
//! Reading a key out of a frame is parse.rs.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Which way a frame travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the guest (TX ring) to the TAP: the guest is the source.
    Tx,
    /// From the TAP to the guest (RX ring): the guest is the destination.
    Rx,
}

/// Layer 3 family of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Family {
    /// IPv4; addresses use the first 4 bytes of the 16-byte fields.
    Ipv4 = 4,
    /// IPv6.
    Ipv6 = 6,
}

/// IP protocol numbers the key treats specially.
pub mod protocol {
    /// ICMP (IPv4 only).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6 (IPv6 only).
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits as they appear in byte 13 of the TCP header.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The identity of a flow. Two keys are equal exactly when their packed
/// words ([`FlowKey::to_words`]) are equal: unused address bytes are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// L3 family.
    pub family: Family,
    /// IP protocol number (after IPv6 extension headers).
    pub protocol: u8,
    /// Outer VLAN id (12 bits), 0 when untagged.
    pub vlan: u16,
    /// The guest's address (IPv4 in the first 4 bytes, the rest zero).
    pub guest_addr: [u8; 16],
    /// The other end's address.
    pub remote_addr: [u8; 16],
    /// The guest's port (ICMP echo: the identifier).
    pub guest_port: u16,
    /// The other end's port.
    pub remote_port: u16,
}

/// Words a packed key takes in a table entry.
pub const KEY_WORDS: usize = 5;

impl FlowKey {
    /// An IPv4 key from the guest's point of view.
    pub fn v4(protocol: u8, guest: (Ipv4Addr, u16), remote: (Ipv4Addr, u16)) -> FlowKey {
        let mut guest_addr = [0; 16];
        let mut remote_addr = [0; 16];
        guest_addr[..4].copy_from_slice(&guest.0.octets());
        remote_addr[..4].copy_from_slice(&remote.0.octets());
        FlowKey {
            family: Family::Ipv4,
            protocol,
            vlan: 0,
            guest_addr,
            remote_addr,
            guest_port: guest.1,
            remote_port: remote.1,
        }
    }

    /// An IPv6 key from the guest's point of view.
    pub fn v6(protocol: u8, guest: (Ipv6Addr, u16), remote: (Ipv6Addr, u16)) -> FlowKey {
        FlowKey {
            family: Family::Ipv6,
            protocol,
            vlan: 0,
            guest_addr: guest.0.octets(),
            remote_addr: remote.0.octets(),
            guest_port: guest.1,
            remote_port: remote.1,
        }
    }

    /// The guest's address.
    pub fn guest_ip(&self) -> IpAddr {
        ip_of(self.family, &self.guest_addr)
    }

    /// The other end's address.
    pub fn remote_ip(&self) -> IpAddr {
        ip_of(self.family, &self.remote_addr)
    }

    /// A short protocol name ("tcp", "udp", "icmp", "icmpv6", or the number).
    pub fn protocol_name(&self) -> String {
        match self.protocol {
            protocol::TCP => "tcp".into(),
            protocol::UDP => "udp".into(),
            protocol::ICMP => "icmp".into(),
            protocol::ICMPV6 => "icmpv6".into(),
            p => format!("ip{p}"),
        }
    }

    /// The key packed into the words a table entry stores.
    pub fn to_words(&self) -> [u64; KEY_WORDS] {
        let half = |b: &[u8; 16], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let tail = u64::from(self.guest_port)
            | u64::from(self.remote_port) << 16
            | u64::from(self.vlan & 0x0fff) << 32
            | (self.family as u64) << 48
            | u64::from(self.protocol) << 56;
        [
            half(&self.guest_addr, 0),
            half(&self.guest_addr, 1),
            half(&self.remote_addr, 0),
            half(&self.remote_addr, 1),
            tail,
        ]
    }

    /// Unpack words read from shared memory. `None` unless they are a key
    /// [`FlowKey::to_words`] could have produced.
    pub fn from_words(w: &[u64; KEY_WORDS]) -> Option<FlowKey> {
        let tail = w[4];
        let family = match (tail >> 48) as u8 {
            4 => Family::Ipv4,
            6 => Family::Ipv6,
            _ => return None,
        };
        if (tail >> 44) & 0xf != 0 {
            return None;
        }
        let bytes = |lo: u64, hi: u64| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&lo.to_le_bytes());
            b[8..].copy_from_slice(&hi.to_le_bytes());
            b
        };
        let key = FlowKey {
            family,
            protocol: (tail >> 56) as u8,
            vlan: ((tail >> 32) & 0x0fff) as u16,
            guest_addr: bytes(w[0], w[1]),
            remote_addr: bytes(w[2], w[3]),
            guest_port: tail as u16,
            remote_port: (tail >> 16) as u16,
        };
        let canonical = family == Family::Ipv6
            || (key.guest_addr[4..].iter().all(|&b| b == 0)
                && key.remote_addr[4..].iter().all(|&b| b == 0));
        canonical.then_some(key)
    }

    /// The keyed hash the table places this key with. `seed` is the
    /// region's secret (random per instance), so a guest cannot choose
    /// addresses and ports that all land in one stripe.
    pub fn hash_with(&self, seed: [u64; 2]) -> u64 {
        hash_words(&self.to_words(), seed)
    }
}

fn ip_of(family: Family, b: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*b)),
    }
}

/// 64x64->128 multiply folded to 64 bits: the mixing step of the hash.
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A keyed hash of packed key words. Not cryptographic; with a secret seed
/// it keeps a guest from steering its flows into one stripe.
pub fn hash_words(w: &[u64; KEY_WORDS], seed: [u64; 2]) -> u64 {
    const C: [u64; 4] = [
        0xa076_1d64_78bd_642f,
        0xe703_7ed1_a0b4_28db,
        0x8ebc_6af0_9c88_c6e3,
        0x5899_65cc_7537_4cc3,
    ];
    let mut h = seed[0] ^ C[0];
    h = fold_mul(w[0] ^ seed[1] ^ h, w[1] ^ C[1]);
    h = fold_mul(w[2] ^ seed[1] ^ h, w[3] ^ C[2]);
    h = fold_mul(w[4] ^ seed[0] ^ h, C[3] ^ seed[1]);
    fold_mul(h ^ C[0], C[1] ^ seed[0])
}

/// A fresh secret seed for [`hash_words`] (a region's flow table, a
/// worker's flow cache). std's `RandomState` is made for exactly this job,
/// keeping an adversary from choosing keys that collide: its keys come
/// from the kernel's random source (getrandom), without an `unsafe` here.
pub(crate) fn random_seed() -> [u64; 2] {
    let r = RandomState::new();
    [r.hash_one(1u64), r.hash_one(2u64)]
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ep = |ip: IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{} {} <-> {}",
            self.protocol_name(),
            ep(self.guest_ip(), self.guest_port),
            ep(self.remote_ip(), self.remote_port)
        )?;
        if self.vlan != 0 {
            write!(f, " vlan {}", self.vlan)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::parse::tests::udp6_frame_with_extensions;
    use crate::flow::testing::Rng;

    #[test]
    fn seeds_are_fresh_and_spread_keys() {
        let (a, b) = (random_seed(), random_seed());
        assert_ne!(a, b);
        assert_ne!(a[0], a[1]);
        let k = FlowKey::v4(
            6,
            (Ipv4Addr::new(10, 0, 0, 1), 1),
            (Ipv4Addr::new(10, 0, 0, 2), 2),
        );
        assert_ne!(k.hash_with(a), k.hash_with(b));
    }

    #[test]
    fn words_round_trip_and_garbage_refused() {
        let k = FlowKey::parse(&udp6_frame_with_extensions(Some(9)), Direction::Rx)
            .unwrap()
            .key;
        assert_eq!(FlowKey::from_words(&k.to_words()), Some(k));
        let k4 = FlowKey::v4(
            17,
            (Ipv4Addr::new(1, 2, 3, 4), 5),
            (Ipv4Addr::new(6, 7, 8, 9), 10),
        );
        assert_eq!(FlowKey::from_words(&k4.to_words()), Some(k4));
        let mut w = k4.to_words();
        w[1] = 1; // bytes past an IPv4 address must be zero
        assert_eq!(FlowKey::from_words(&w), None);
        assert_eq!(FlowKey::from_words(&[0; KEY_WORDS]), None);
        let mut rng = Rng(0x1234_5678);
        for _ in 0..10_000 {
            let w = [rng.next(), rng.next(), rng.next(), rng.next(), rng.next()];
            if let Some(k) = FlowKey::from_words(&w) {
                assert_eq!(k.to_words(), w);
            }
        }
    }
}
