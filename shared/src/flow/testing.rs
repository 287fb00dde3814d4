//! Helpers the flow table's unit tests share: a scratch region, keys
//! numbered from 0, updates, reproducible noise.

use std::net::Ipv4Addr;

use super::key::{protocol, FlowKey};
use super::table::FlowUpdate;
use crate::SharedRegion;

pub(crate) fn tmp_region(name: &str, capacity: usize) -> (std::path::PathBuf, SharedRegion) {
    let p = std::env::temp_dir().join(format!("qpnet-flow-test-{}-{name}", std::process::id()));
    let r = SharedRegion::create_with(&p, 4, capacity).unwrap();
    (p, r)
}

pub(crate) fn key(n: u32) -> FlowKey {
    let [a, b, c, d] = n.to_be_bytes();
    FlowKey::v4(
        protocol::UDP,
        (Ipv4Addr::new(10, 77, a, b), 1000 + u16::from(c)),
        (Ipv4Addr::new(10, 78, 0, d), 53),
    )
}

pub(crate) fn tx(frames: u64) -> FlowUpdate {
    FlowUpdate {
        tx_frames: frames,
        tx_bytes: frames * 100,
        ..FlowUpdate::default()
    }
}

pub(crate) fn rx(frames: u64) -> FlowUpdate {
    FlowUpdate {
        rx_frames: frames,
        rx_bytes: frames * 100,
        ..FlowUpdate::default()
    }
}

/// A small xorshift generator: tests need reproducible noise, not quality.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
