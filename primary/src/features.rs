//! The virtio and vhost-user features qpnet offers, and what follows from
//! the ones a driver acknowledges (header length, TAP offloads, RX frame
//! limit).

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Virtio feature bits offered to every driver.
pub const OFFERED: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_F_NOTIFY_ON_EMPTY)
    | OFFLOADS
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The offloads among [`OFFERED`]: what a TAP does for the guest
/// (checksums, segmentation) and a socket backend cannot.
pub const OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN);

/// vhost-user protocol features offered (REPLY_ACK is added by the vhost
/// crate itself).
pub fn protocol_offered() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// Whether `features` has virtio feature bit `b`.
pub fn has(features: u64, b: u32) -> bool {
    features & bit(b) != 0
}

/// Whether the driver negotiated vhost-user protocol features (rings then
/// start disabled and need SET_VRING_ENABLE).
pub fn has_protocol_features(features: u64) -> bool {
    features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
}

/// Length of the virtio-net header for the acknowledged features: 12 with
/// VERSION_1 or MRG_RXBUF, else the legacy 10.
pub fn header_len(features: u64) -> u32 {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        12
    } else {
        10
    }
}

/// Whether the guest accepts GSO frames on its RX queues.
pub fn guest_gso(features: u64) -> bool {
    has(features, VIRTIO_NET_F_GUEST_TSO4)
        || has(features, VIRTIO_NET_F_GUEST_TSO6)
        || has(features, VIRTIO_NET_F_GUEST_UFO)
}

/// TAP offload flags (TUNSETOFFLOAD) for what the guest accepts on RX.
pub fn tap_offloads(features: u64) -> u32 {
    const TUN_F_CSUM: u32 = 0x01;
    const TUN_F_TSO4: u32 = 0x02;
    const TUN_F_TSO6: u32 = 0x04;
    const TUN_F_TSO_ECN: u32 = 0x08;
    let mut f = 0;
    if has(features, VIRTIO_NET_F_GUEST_CSUM) {
        f |= TUN_F_CSUM;
        if has(features, VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if has(features, VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if has(features, VIRTIO_NET_F_GUEST_ECN) && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            f |= TUN_F_TSO_ECN;
        }
    }
    f
}

/// Largest frame (without header) the TAP may hand to a worker.
pub fn max_rx_frame(features: u64, mtu: u32) -> u32 {
    if guest_gso(features) {
        65535 + 14 + 4
    } else {
        mtu + 14 + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_offloads_follow_features() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
            0,
            "TSO needs CSUM"
        );
        let f = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(tap_offloads(f), 0x03);
        assert_eq!(max_rx_frame(0, 1500), 1518);
        assert!(max_rx_frame(f, 1500) > 65535);
    }
}
