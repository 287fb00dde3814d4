//! What the driver negotiated, reduced to the few facts the packet path needs.
//!
//! The primary sends the acknowledged virtio feature bits with the header
//! length and the largest frame the TAP can deliver; this module checks them
//! once so the hot path only reads plain fields.

use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::tx_header::TxOffloads;

/// Length of an Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: u32 = 14;
/// Largest frame (without the virtio-net header) the TX path accepts: a
/// 64 KiB GSO frame plus its Ethernet header.
pub const MAX_TX_FRAME: u32 = 65535 + ETH_HLEN;
/// Largest `max_rx_frame` accepted (a GSO frame plus a VLAN tag, rounded).
pub const MAX_RX_FRAME_LIMIT: u32 = 65535 + 64;
/// Offset of `num_buffers` in the 12-byte virtio-net header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// The negotiated behaviour of this queue pair's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetFeatures {
    /// VIRTIO_RING_F_EVENT_IDX: notification suppression by event index.
    pub event_idx: bool,
    /// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several chains.
    pub mergeable_rx: bool,
    /// Length of the virtio-net header on the rings and the TAP (10 or 12).
    pub header_len: u32,
    /// Largest frame (without header) the TAP may deliver.
    pub max_rx_frame: u32,
    /// What a TX frame's virtio-net header may ask for.
    pub tx_offloads: TxOffloads,
}

impl Default for NetFeatures {
    /// VERSION_1 defaults until SetFeatures arrives: 12-byte header, no
    /// event index, one chain per frame, standard Ethernet frames.
    fn default() -> Self {
        NetFeatures {
            event_idx: false,
            mergeable_rx: false,
            header_len: 12,
            max_rx_frame: 1514,
            tx_offloads: TxOffloads::default(),
        }
    }
}

impl NetFeatures {
    /// Check and decode a SetFeatures request.
    pub fn from_request(
        features: u64,
        max_rx_frame: u32,
        header_len: u32,
    ) -> Result<NetFeatures, String> {
        if header_len != 10 && header_len != 12 {
            return Err(format!(
                "virtio-net header length {header_len} (must be 10 or 12)"
            ));
        }
        if !(ETH_HLEN..=MAX_RX_FRAME_LIMIT).contains(&max_rx_frame) {
            return Err(format!(
                "max_rx_frame {max_rx_frame} (must be {ETH_HLEN}..={MAX_RX_FRAME_LIMIT})"
            ));
        }
        let mergeable_rx = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        if mergeable_rx && header_len != 12 {
            return Err("MRG_RXBUF needs the 12-byte virtio-net header".to_string());
        }
        Ok(NetFeatures {
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            mergeable_rx,
            header_len,
            max_rx_frame,
            tx_offloads: TxOffloads::from_features(features),
        })
    }

    /// Guest buffer space one received frame may need, header included.
    pub fn rx_frame_capacity(&self) -> u64 {
        u64::from(self.header_len) + u64::from(self.max_rx_frame)
    }

    /// Whether received frames carry `num_buffers` (12-byte header).
    pub fn has_num_buffers(&self) -> bool {
        self.header_len as usize >= NUM_BUFFERS_OFFSET + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_checks() {
        let f = NetFeatures::from_request((1 << 29) | (1 << 15), 65549, 12).unwrap();
        assert!(f.event_idx && f.mergeable_rx);
        assert_eq!(f.rx_frame_capacity(), 65561);
        assert!(NetFeatures::from_request(0, 1514, 11).is_err());
        assert!(NetFeatures::from_request(0, 0, 12).is_err());
        assert!(NetFeatures::from_request(0, u32::MAX, 12).is_err());
        assert!(NetFeatures::from_request(1 << 15, 1514, 10).is_err());
        let f = NetFeatures::from_request(0, 1514, 10).unwrap();
        assert!(!f.has_num_buffers());
    }
}
