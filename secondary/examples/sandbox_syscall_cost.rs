//! What the worker's sandbox costs each system call on the packet path:
//! nanoseconds per `write` + `read` pair on an eventfd (the shape of a
//! kick or a call), 2,000,000 pairs, five batches, before and after this
//! process enters the very sandbox a worker enters (`enter_sandbox`:
//! namespaces, Landlock, no capabilities, the worker's seccomp filter).
//!
//! Run as root (the sandbox takes the user `nobody`):
//! `cargo run --release -p qpnet-secondary --example sandbox_syscall_cost`

use std::os::fd::AsFd;
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};

const PAIRS: u32 = 2_000_000;

/// Median ns per write+read pair over five batches.
fn measure(efd: &EventFd) -> f64 {
    let mut batches: Vec<f64> = (0..5)
        .map(|_| {
            let began = Instant::now();
            for _ in 0..PAIRS {
                nix::unistd::write(efd.as_fd(), &1u64.to_ne_bytes()).expect("write");
                let mut buf = [0u8; 8];
                nix::unistd::read(efd.as_fd(), &mut buf).expect("read");
            }
            began.elapsed().as_secs_f64() * 1e9 / f64::from(PAIRS)
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[2]
}

fn main() {
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd");
    let before = measure(&efd);
    let nobody = qpnet_secondary::RunAs {
        uid: 65534,
        gid: 65534,
    };
    let how = qpnet_secondary::enter_sandbox(Some(nobody)).expect("entering the sandbox");
    let after = measure(&efd);
    println!("{how}");
    println!(
        "write+read pair on an eventfd: {before:.1} ns outside the sandbox, {after:.1} ns inside \
         ({:+.1} %)",
        (after / before - 1.0) * 100.0
    );
}
