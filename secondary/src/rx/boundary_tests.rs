//! Issue 13 at the unit level: the RX queue publishes only whole frames.

use super::*;
use crate::features::NetFeatures;
use crate::flows::FlowTracker;
use crate::test_util::{desc, dgram_pair, RingDriver, TestMemory, UsedElem, BUF_BASE, F_WRITE};

/// The guest's side: one-descriptor buffers posted in order, used
/// entries reassembled into frames by their num_buffers.
struct Driver {
    last_used: u16,
    posted: u64,
    partial: Option<(Vec<u8>, u16)>,
}

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

/// Issue 13, at the unit level: random frames, budgets and buffer
/// refills (so runs go short of buffers, bounce, starve and resume), and
/// after every run the guest finds only whole frames below the used
/// index, byte-exact and in order.
#[test]
fn random_runs_publish_only_whole_frames() {
    const SIZE: u16 = 64;
    const BUF: u32 = 128;
    let m = TestMemory::new();
    let mut tr = m.ring(SIZE);
    let (tap, peer) = dgram_pair();
    let mut rx = RxQueue::new(0);
    rx.install(tr.start(&m, true));
    let mut c = LocalCounters::default();
    let feats = NetFeatures {
        event_idx: true,
        mergeable_rx: true,
        header_len: 12,
        max_rx_frame: 1514,
        ..NetFeatures::default()
    };
    let mut d = Driver {
        last_used: 0,
        posted: 0,
        partial: None,
    };
    let post = |tr: &mut RingDriver, d: &mut Driver, n: u16| {
        for _ in 0..n {
            let slot = d.posted % u64::from(SIZE);
            tr.add_chain(&[desc(BUF_BASE + slot * 0x1000, BUF, F_WRITE, 0)]);
            d.posted += 1;
        }
    };
    post(&mut tr, &mut d, SIZE);
    let mut seed = 7u64;
    let mut sent: std::collections::VecDeque<Vec<u8>> = Default::default();
    let mut got = 0u64;
    for round in 0..20_000 {
        for _ in 0..lcg(&mut seed) % 4 {
            let len = 12 + 60 + (lcg(&mut seed) % 1455) as usize;
            let mut f: Vec<u8> = (0..len).map(|i| (i as u64 ^ round) as u8).collect();
            f[10] = 0xee;
            f[11] = 0xee;
            peer.send_frame(&f);
            sent.push_back(f);
        }
        let budget = 1 + (lcg(&mut seed) % 8) as usize;
        let ctx = PathCtx {
            mem: &m.map,
            io: &tap,
            features: &feats,
            counters: &mut c,
            flows: &mut FlowTracker::disabled(),
        };
        rx.run(ctx, budget).expect("rx run");
        // The driver reaps what it sees, reassembling frames.
        let used = tr.used_idx();
        while d.last_used != used {
            let UsedElem { id: head, len } = tr.used_entry(d.last_used);
            let bytes = m.read(
                BUF_BASE + u64::from(head as u16 % SIZE) * 0x1000,
                len as usize,
            );
            d.last_used = d.last_used.wrapping_add(1);
            let (mut data, left) = match d.partial.take() {
                Some((mut data, left)) => {
                    data.extend_from_slice(&bytes);
                    (data, left - 1)
                }
                None => {
                    let nb = u16::from_le_bytes([bytes[10], bytes[11]]);
                    assert!(nb >= 1, "round {round}: num_buffers 0");
                    (bytes, nb - 1)
                }
            };
            if left > 0 {
                d.partial = Some((data, left));
                continue;
            }
            let want = sent.pop_front().expect("a frame nobody sent");
            data[10] = 0xee;
            data[11] = 0xee;
            assert_eq!(data, want, "round {round}: frame {got} corrupt");
            got += 1;
        }
        assert!(
            d.partial.is_none(),
            "round {round}: used index {used} published inside a frame"
        );
        // Repost some of the reaped buffers.
        let free = SIZE - (d.posted as u16).wrapping_sub(d.last_used);
        let n = (lcg(&mut seed) % (u64::from(free) + 1)) as u16;
        post(&mut tr, &mut d, n);
        if sent.len() > 200 {
            // Let the ring drain completely now and then.
            let free = SIZE - (d.posted as u16).wrapping_sub(d.last_used);
            post(&mut tr, &mut d, free);
        }
        // The guest kicks for new buffers; a starved queue runs again.
        tr.kick();
        rx.on_kick(Some(&m.map), &mut c).expect("rx kick");
    }
    assert!(got > 10_000, "only {got} frames received");
    assert_eq!(c.drop_too_large, 0);
}
