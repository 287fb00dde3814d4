//! The frames the source sends: Ethernet + IPv4 + UDP, padded to the size
//! asked for (a whole frame without FCS, as testpmd's `--txpkts`), with the
//! IPv4 source address moving through 256 values from frame to frame so
//! qpnet's flow tracking sees many flows, as it does with the TAP
//! reference's multi-flow generator.

/// Smallest and largest frame the source makes.
pub const MIN_FRAME: usize = 60;
pub const MAX_FRAME: usize = 1514;

const ETH: usize = 14;
const IP_SRC: usize = ETH + 12;
const IP_CSUM: usize = ETH + 10;

/// One frame of `size` bytes for flow 0.
pub fn frame(size: usize) -> Vec<u8> {
    assert!((MIN_FRAME..=MAX_FRAME).contains(&size));
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = u16::try_from(size - ETH).expect("frame size checked");
    let ip = &mut f[ETH..ETH + 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 19, 0, 1]);
    let udp = &mut f[ETH + 20..ETH + 28];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    set_flow(&mut f, 0);
    f
}

/// Make `f` (a frame from [`frame`]) one of flow `flow`: the third byte of
/// the IPv4 source, and the header checksum to match.
pub fn set_flow(f: &mut [u8], flow: u8) {
    f[IP_SRC + 2] = flow;
    f[IP_CSUM..IP_CSUM + 2].fill(0);
    let sum = checksum(&f[ETH..ETH + 20]);
    f[IP_CSUM..IP_CSUM + 2].copy_from_slice(&sum.to_be_bytes());
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_size_and_a_valid_header_checksum() {
        for size in [60, 64, 1500, 1514] {
            let mut f = frame(size);
            assert_eq!(f.len(), size);
            for flow in [0, 7, 255] {
                set_flow(&mut f, flow);
                assert_eq!(f[IP_SRC + 2], flow);
                assert_eq!(checksum(&f[ETH..ETH + 20]), 0, "a valid header sums to 0");
            }
        }
    }
}
