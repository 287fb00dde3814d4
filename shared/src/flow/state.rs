//! Where a flow stands ([`FlowState`], derived from the TCP flags seen
//! each way) and how long it may stay idle in that state before expiry
//! removes it ([`FlowTimeouts`]).

use std::time::Duration;

use super::key::{protocol, tcp_flags};

/// Where a flow's TCP connection (or a connectionless flow) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FlowState {
    /// Seen one way only (TCP: no handshake completed yet).
    New = 1,
    /// Seen both ways (TCP: SYN both ways, or ACKs both ways mid-stream).
    Established = 2,
    /// TCP: a FIN was seen one way.
    Closing = 3,
    /// TCP: FIN both ways, or a RST.
    Closed = 4,
}

impl FlowState {
    /// Decode a stored state byte.
    pub fn from_u8(v: u8) -> Option<FlowState> {
        Some(match v {
            1 => FlowState::New,
            2 => FlowState::Established,
            3 => FlowState::Closing,
            4 => FlowState::Closed,
            _ => return None,
        })
    }

    /// A short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            FlowState::New => "new",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::Closed => "closed",
        }
    }

    /// The state implied by what has been seen of a flow.
    pub fn derive(protocol: u8, flags_tx: u8, flags_rx: u8, both_ways: bool) -> FlowState {
        use tcp_flags::{ACK, FIN, RST, SYN};
        if protocol != protocol::TCP {
            return if both_ways {
                FlowState::Established
            } else {
                FlowState::New
            };
        }
        let any = flags_tx | flags_rx;
        if any & RST != 0 || (flags_tx & FIN != 0 && flags_rx & FIN != 0) {
            FlowState::Closed
        } else if any & FIN != 0 {
            FlowState::Closing
        } else if (flags_tx & SYN != 0 && flags_rx & SYN != 0)
            || (both_ways && flags_tx & ACK != 0 && flags_rx & ACK != 0)
        {
            FlowState::Established
        } else {
            FlowState::New
        }
    }
}

/// Idle time after which a flow expires, per protocol and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// TCP before the handshake completed.
    pub tcp_new: Duration,
    /// TCP established (RFC 5382 asks NATs for at least 2 h 4 min).
    pub tcp_established: Duration,
    /// TCP after a FIN one way.
    pub tcp_closing: Duration,
    /// TCP after FIN both ways or a RST.
    pub tcp_closed: Duration,
    /// UDP seen one way.
    pub udp_new: Duration,
    /// UDP seen both ways.
    pub udp_established: Duration,
    /// ICMP and ICMPv6.
    pub icmp: Duration,
    /// Every other protocol.
    pub other: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_new: Duration::from_secs(60),
            tcp_established: Duration::from_secs(7440),
            tcp_closing: Duration::from_secs(240),
            tcp_closed: Duration::from_secs(10),
            udp_new: Duration::from_secs(30),
            udp_established: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(60),
        }
    }
}

impl FlowTimeouts {
    /// Every timeout set to `d` (tests, forced expiry).
    pub fn all(d: Duration) -> FlowTimeouts {
        FlowTimeouts {
            tcp_new: d,
            tcp_established: d,
            tcp_closing: d,
            tcp_closed: d,
            udp_new: d,
            udp_established: d,
            icmp: d,
            other: d,
        }
    }

    /// The idle timeout of a flow of `protocol` in `state`.
    pub fn for_flow(&self, protocol: u8, state: FlowState) -> Duration {
        match (protocol, state) {
            (protocol::TCP, FlowState::New) => self.tcp_new,
            (protocol::TCP, FlowState::Established) => self.tcp_established,
            (protocol::TCP, FlowState::Closing) => self.tcp_closing,
            (protocol::TCP, FlowState::Closed) => self.tcp_closed,
            (protocol::UDP, FlowState::New) => self.udp_new,
            (protocol::UDP, _) => self.udp_established,
            (protocol::ICMP | protocol::ICMPV6, _) => self.icmp,
            _ => self.other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_flags::{ACK, FIN, RST, SYN};

    #[test]
    fn tcp_states_follow_flags() {
        let t = protocol::TCP;
        assert_eq!(FlowState::derive(t, SYN, 0, false), FlowState::New);
        assert_eq!(
            FlowState::derive(t, SYN, SYN | ACK, true),
            FlowState::Established
        );
        assert_eq!(FlowState::derive(t, ACK, ACK, true), FlowState::Established);
        assert_eq!(
            FlowState::derive(t, SYN | FIN, SYN, true),
            FlowState::Closing
        );
        assert_eq!(FlowState::derive(t, FIN, FIN, true), FlowState::Closed);
        assert_eq!(FlowState::derive(t, 0, RST, true), FlowState::Closed);
        assert_eq!(
            FlowState::derive(protocol::UDP, 0, 0, true),
            FlowState::Established
        );
        assert_eq!(
            FlowState::derive(protocol::UDP, 0, 0, false),
            FlowState::New
        );
    }
}
