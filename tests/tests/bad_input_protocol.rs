//! Hostile vhost-user messages: unknown and malformed requests, a VMM
//! that stalls mid-message or never reads its replies, vring indices out of
//! range, impossible queue sizes, kick and call fds that are not eventfds,
//! SET_VRING_ERR with a bad index, a bad fd or the wrong fd count, a
//! thousand requests carrying fds they should not.
//! qpnet refuses each one clearly (a nonzero REPLY_ACK, or the connection
//! closed) and keeps serving: after each group of cases the same qpnet must
//! serve a fresh VMM connection both ways, with its workers never restarted,
//! and stop cleanly. Shared pieces: `qpnet_tests::hostile`.
//!
//! Needs root and `$QPNET_BIN`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpnet_tests::hostile::{
    check_unharmed, ensure_refused, entries, error_eventfd, fds, guest_memory, mem_session,
    ring_error_pending, ring_start, ring_start_refused, session, testbed, valid_ring,
    wait_ring_error, QUEUE_PAIRS, RING, TIMEOUT,
};
use qpnet_tests::raw_vhost::{
    mem_table, req, u64_body, vring_addr, vring_state, RawVhostUser, Reply, FLAG_NEED_REPLY,
    FLAG_VERSION,
};
use vmm_sys_util::eventfd::EventFd;

/// A named way to send one hostile message and read what came back.
type MessageCase<'a> = (
    &'static str,
    Box<dyn Fn(&RawVhostUser) -> Result<Reply> + 'a>,
);

#[test]
fn unknown_and_malformed_messages_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let cases: Vec<MessageCase> = vec![
        (
            "unknown request code 999",
            Box::new(|raw| {
                raw.send(999, FLAG_VERSION | FLAG_NEED_REPLY, &u64_body(0), &[])?;
                raw.recv_reply(999)
            }),
        ),
        (
            "request code 0",
            Box::new(|raw| {
                raw.send(0, FLAG_VERSION | FLAG_NEED_REPLY, &[], &[])?;
                raw.recv_reply(0)
            }),
        ),
        (
            "header claiming a 64 KiB body",
            Box::new(|raw| {
                let mut h = Vec::new();
                for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 0x10000] {
                    h.extend_from_slice(&v.to_le_bytes());
                }
                raw.send_bytes(&h, &vring_state(0, 256), &[])?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
        (
            "SET_VRING_NUM with a 4-byte body",
            Box::new(|raw| raw.request(req::SET_VRING_NUM, &0u32.to_le_bytes(), &[])),
        ),
        (
            "wrong protocol version",
            Box::new(|raw| {
                raw.send(
                    req::SET_VRING_NUM,
                    0x2 | FLAG_NEED_REPLY,
                    &vring_state(0, 256),
                    &[],
                )?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
        (
            "SET_MEM_TABLE for 2 regions carrying 1 region and 1 fd",
            Box::new(|raw| {
                let mut body = mem_table(&entries(&mem)[..1]);
                body[0] = 2;
                raw.request(req::SET_MEM_TABLE, &body, &fds(&mem)[..1])
            }),
        ),
        (
            "SET_MEM_TABLE with no fd",
            Box::new(|raw| raw.request(req::SET_MEM_TABLE, &mem_table(&entries(&mem)[..1]), &[])),
        ),
        (
            "SET_MEM_TABLE with 0 regions",
            Box::new(|raw| raw.request(req::SET_MEM_TABLE, &mem_table(&[]), &[])),
        ),
        (
            "a message cut short by the VMM going away",
            Box::new(|raw| {
                let mut h = Vec::new();
                for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 8] {
                    h.extend_from_slice(&v.to_le_bytes());
                }
                raw.send_bytes(&h, &[0, 0, 0, 0], &[])?;
                raw.stream().shutdown(std::net::Shutdown::Write)?;
                raw.recv_reply(req::SET_VRING_NUM)
            }),
        ),
    ];
    for (what, case) in &cases {
        let raw = session(&bed)?;
        let r = case(&raw);
        bed.explain(r.and_then(|reply| ensure_refused(what, reply)))?;
    }
    check_unharmed(bed, &workers)
}

/// A VMM that stops in the middle of a message and keeps its socket open
/// must not freeze the primary: the connection is closed after the
/// primary's I/O timeout (2 s), and qpnet serves the next VMM.
#[test]
fn a_message_stalled_mid_body_is_cut_off() -> Result<()> {
    let (bed, workers) = testbed(QUEUE_PAIRS)?;
    let mut raw = session(&bed)?;
    raw.set_reply_timeout(Duration::from_secs(10));
    let mut h = Vec::new();
    for v in [req::SET_VRING_NUM, FLAG_VERSION | FLAG_NEED_REPLY, 8] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    let started = std::time::Instant::now();
    // The header announces an 8-byte body; none follows.
    raw.send_bytes(&h, &[], &[])?;
    let reply = raw.recv_reply(req::SET_VRING_NUM)?;
    let took = started.elapsed();
    println!("stalled connection closed after {took:?}");
    ensure!(
        matches!(reply, Reply::Closed),
        "a stalled message got {reply:?} instead of the connection closing"
    );
    ensure!(
        took < Duration::from_secs(5),
        "the stalled connection was closed only after {took:?} (timeout 2 s)"
    );
    check_unharmed(bed, &workers)
}

/// A VMM that stops in the middle of a message header must not freeze the
/// primary either (the vhost crate would wait for the rest of a header for
/// ever): the connection is closed after the primary's I/O timeout (2 s),
/// and qpnet serves the next VMM. Found while writing the `vhost_user` fuzz
/// target.
#[test]
fn a_message_stalled_mid_header_is_cut_off() -> Result<()> {
    let (bed, workers) = testbed(QUEUE_PAIRS)?;
    let mut raw = session(&bed)?;
    raw.set_reply_timeout(Duration::from_secs(10));
    let mut h = Vec::new();
    for v in [req::GET_FEATURES, FLAG_VERSION] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    let started = std::time::Instant::now();
    // 5 of the header's 12 bytes; the rest never comes.
    raw.send_bytes(&h[..5], &[], &[])?;
    let reply = raw.recv_reply(req::GET_FEATURES)?;
    let took = started.elapsed();
    println!("stalled connection closed after {took:?}");
    ensure!(
        matches!(reply, Reply::Closed),
        "a stalled header got {reply:?} instead of the connection closing"
    );
    ensure!(
        took < Duration::from_secs(5),
        "the stalled connection was closed only after {took:?} (timeout 2 s)"
    );
    check_unharmed(bed, &workers)
}

/// A VMM that keeps sending requests but never reads the replies must not
/// freeze the primary either: once a reply cannot be written for the
/// primary's I/O timeout (2 s) the connection is closed, not earlier and
/// not much later, and qpnet serves the next VMM.
///
/// The vhost crate retries a send that would block, so it is qpnet's reply
/// guard that notices the unread replies and closes the connection.
#[test]
fn a_vmm_that_never_reads_its_replies_is_dropped_after_2_s() -> Result<()> {
    let (bed, workers) = testbed(QUEUE_PAIRS)?;
    let raw = session(&bed)?;
    let stream = raw.stream();
    stream.set_nonblocking(true)?;
    // GET_FEATURES, each answered with a 20-byte reply nobody reads: the
    // primary's replies fill its socket buffer, its write blocks, it stops
    // reading, and then our requests fill ours.
    let mut request = Vec::new();
    for v in [req::GET_FEATURES, FLAG_VERSION, 0] {
        request.extend_from_slice(&v.to_le_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    let blocked_at = loop {
        match (&*stream).write(&request) {
            Ok(n) if n == request.len() => sent += 1,
            Ok(n) => bail!("a 12-byte request was written in part ({n} bytes)"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Instant::now(),
            Err(e) => return Err(e).context(format!("writing request {sent}")),
        }
        ensure!(
            Instant::now() < deadline,
            "{sent} requests sent and the primary still reads them"
        );
    };
    // Closed by the primary: our end hangs up (without reading a byte).
    let closed = wait_hangup(stream, Duration::from_secs(10))?;
    let took = closed.map(|t| t - blocked_at);
    println!(
        "{sent} unread requests; connection closed {took:?} after the primary stopped reading"
    );
    let took = took.context("the connection of a VMM that reads nothing was never closed")?;
    ensure!(
        (Duration::from_millis(1500)..=Duration::from_secs(5)).contains(&took),
        "the connection was closed {took:?} after the primary stopped reading (timeout 2 s)"
    );
    drop(raw);
    check_unharmed(bed, &workers)
}

/// When `stream`'s peer closes the connection (POLLHUP), polled without
/// reading; `None` if that does not happen within `timeout`.
fn wait_hangup(
    stream: &std::os::unix::net::UnixStream,
    timeout: Duration,
) -> Result<Option<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll");
            }
        }
        if pfd.revents & libc::POLLHUP != 0 {
            return Ok(Some(Instant::now()));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

#[test]
fn vring_index_out_of_range_is_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let (d, u, a) = valid_ring(&mem);
    let first_bad = 2 * u32::from(QUEUE_PAIRS);
    for index in [first_bad, first_bad + 1, 255, 0xffff_ffff] {
        let requests: Vec<(&str, u32, Vec<u8>)> = vec![
            (
                "SET_VRING_NUM",
                req::SET_VRING_NUM,
                vring_state(index, RING),
            ),
            ("SET_VRING_BASE", req::SET_VRING_BASE, vring_state(index, 0)),
            (
                "SET_VRING_ADDR",
                req::SET_VRING_ADDR,
                vring_addr(index, d, u, a),
            ),
            (
                "SET_VRING_ENABLE",
                req::SET_VRING_ENABLE,
                vring_state(index, 1),
            ),
        ];
        for (name, code, body) in requests {
            let raw = mem_session(&bed, &mem)?;
            let r = raw.request(code, &body, &[]);
            bed.explain(
                r.and_then(|reply| ensure_refused(&format!("{name} on vring {index}"), reply)),
            )?;
        }
        // GET_VRING_BASE has no ack: the only clear refusal is closing.
        let raw = mem_session(&bed, &mem)?;
        raw.send(
            req::GET_VRING_BASE,
            FLAG_VERSION,
            &vring_state(index, 0),
            &[],
        )?;
        let reply = raw.recv_reply(req::GET_VRING_BASE)?;
        ensure!(
            reply == Reply::Closed,
            "GET_VRING_BASE on vring {index}: expected the connection closed, got {reply:?}"
        );
    }
    for index in [first_bad, 255] {
        for (name, code) in [
            ("SET_VRING_KICK", req::SET_VRING_KICK),
            ("SET_VRING_CALL", req::SET_VRING_CALL),
        ] {
            let raw = mem_session(&bed, &mem)?;
            let efd = EventFd::new(0)?;
            let r = raw.request(code, &u64_body(u64::from(index)), &[efd.as_raw_fd()]);
            bed.explain(
                r.and_then(|reply| ensure_refused(&format!("{name} on vring {index}"), reply)),
            )?;
        }
    }
    check_unharmed(bed, &workers)
}

#[test]
fn bad_queue_sizes_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    for num in [0, 3, 100, 32769, 65536, 0xffff_ffff] {
        let raw = mem_session(&bed, &mem)?;
        let r = ring_start_refused(&raw, 1, num, valid_ring(&mem));
        let step = bed.explain(r.with_context(|| format!("queue size {num}")))?;
        eprintln!("queue size {num}: refused at {step}");
    }
    check_unharmed(bed, &workers)
}
fn not_eventfds() -> Result<Vec<(&'static str, OwnedFd)>> {
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    let memfd =
        nix::sys::memfd::memfd_create(c"not-an-eventfd", nix::sys::memfd::MFdFlags::empty())?;
    let null = OwnedFd::from(File::open("/dev/null")?);
    let (sock, _peer) = std::os::unix::net::UnixStream::pair()?;
    Ok(vec![
        ("a pipe's read end", pipe_r),
        ("a pipe's write end", pipe_w),
        ("a memfd", memfd),
        ("/dev/null", null),
        ("a unix socket", OwnedFd::from(sock)),
    ])
}

#[test]
fn kick_and_call_fds_that_are_not_eventfds_are_refused() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let (d, u, a) = valid_ring(&mem);
    for (name, code) in [
        ("SET_VRING_KICK", req::SET_VRING_KICK),
        ("SET_VRING_CALL", req::SET_VRING_CALL),
    ] {
        for (what, fd) in not_eventfds()? {
            let raw = mem_session(&bed, &mem)?;
            raw.request_ok(req::SET_VRING_NUM, &vring_state(1, RING), &[])?;
            raw.request_ok(req::SET_VRING_BASE, &vring_state(1, 0), &[])?;
            raw.request_ok(req::SET_VRING_ADDR, &vring_addr(1, d, u, a), &[])?;
            let r = raw.request(code, &u64_body(1), &[fd.as_raw_fd()]);
            bed.explain(r.and_then(|reply| ensure_refused(&format!("{name} with {what}"), reply)))?;
        }
    }
    // Malformed: an fd announced (no "invalid fd" flag) but none attached,
    // and two eventfds where one is expected.
    let raw = mem_session(&bed, &mem)?;
    let r = raw.request(req::SET_VRING_KICK, &u64_body(1), &[]);
    bed.explain(r.and_then(|reply| ensure_refused("SET_VRING_KICK without its fd", reply)))?;
    let raw = mem_session(&bed, &mem)?;
    let (e1, e2) = (EventFd::new(0)?, EventFd::new(0)?);
    let r = raw.request(
        req::SET_VRING_KICK,
        &u64_body(1),
        &[e1.as_raw_fd(), e2.as_raw_fd()],
    );
    bed.explain(r.and_then(|reply| ensure_refused("SET_VRING_KICK with two fds", reply)))?;
    check_unharmed(bed, &workers)
}

/// SET_VRING_ERR with the wrong fd count (an fd announced but missing, the
/// "no fd" flag with one attached, two fds), with a vring index out of
/// range, or with an fd that is not an eventfd, is refused. The refused
/// ones that keep the connection change nothing: ring 1 still reports its
/// fault on the error eventfd it had before them, and on none of theirs.
#[test]
fn bad_vring_err_requests_are_refused_and_change_nothing() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let mem = guest_memory()?;
    let result = (|| -> Result<()> {
        const NOFD: u64 = 0x100;
        let (e1, e2) = (EventFd::new(0)?, EventFd::new(0)?);
        let two = [e1.as_raw_fd(), e2.as_raw_fd()];
        for (what, body, fds) in [
            ("an fd announced but missing", 1, &two[..0]),
            ("the no-fd flag with an fd", 1 | NOFD, &two[..1]),
            ("two fds", 1, &two[..]),
        ] {
            let raw = mem_session(&bed, &mem)?;
            let reply = raw.request(req::SET_VRING_ERR, &u64_body(body), fds)?;
            ensure_refused(&format!("SET_VRING_ERR with {what}"), reply)?;
        }
        let raw = mem_session(&bed, &mem)?;
        let err = error_eventfd()?;
        let (kick, _call) = ring_start(&raw, 1, valid_ring(&mem), Some(&err))?;
        let first_bad = 2 * u64::from(QUEUE_PAIRS);
        let mut refused_efds = Vec::new();
        for index in [first_bad, first_bad + 1, 255] {
            let efd = error_eventfd()?;
            let reply = raw.request(req::SET_VRING_ERR, &u64_body(index), &[efd.as_raw_fd()])?;
            ensure_refused(&format!("SET_VRING_ERR on vring {index}"), reply)?;
            refused_efds.push(efd);
        }
        for (what, fd) in not_eventfds()? {
            let reply = raw.request(req::SET_VRING_ERR, &u64_body(1), &[fd.as_raw_fd()])?;
            ensure_refused(&format!("SET_VRING_ERR with {what}"), reply)?;
        }
        // The guest makes ring 1 unusable: its avail index (at the ring's
        // avail address + 2) more than a ring ahead.
        let avail_gpa = mem.regions()[0].gpa() + 4096;
        mem.write(avail_gpa + 2, &(RING as u16 + 10).to_le_bytes());
        kick.write(1)?;
        let n = wait_ring_error("ring 1's error eventfd", &err, TIMEOUT)?;
        ensure!(n == 1, "ring 1's error eventfd counted {n}, one fault");
        ensure!(
            !refused_efds.iter().any(ring_error_pending),
            "an eventfd of a refused SET_VRING_ERR was written"
        );
        Ok(())
    })();
    bed.explain(result)?;
    check_unharmed(bed, &workers)
}

/// 1,000 requests carrying fds they should not (a GET_FEATURES with two
/// eventfds; a SET_VRING_NUM with one): each is answered or refused, the
/// stray fds are closed at once, and the primary's and the workers' fd
/// counts end where they began.
#[test]
fn a_thousand_messages_with_stray_fds_leak_nothing() -> Result<()> {
    let (mut bed, workers) = testbed(QUEUE_PAIRS)?;
    let result = (|| -> Result<()> {
        let primary = bed.qpnet.primary();
        let worker_handles = bed.qpnet.workers();
        let counts = |hs: &[qpnet_tests::proc::ProcHandle]| -> Result<Vec<usize>> {
            hs.iter().map(|h| h.fd_count()).collect()
        };
        // The baseline is the state between two VMMs: after one plain
        // session has come and gone (the first connection makes the
        // primary settle what it kept from start-up).
        drop(session(&bed)?);
        let p = &primary;
        let mut primary_before = 0;
        let mut prev = usize::MAX;
        qpnet_tests::wait::wait_for(
            "the primary between two VMMs",
            Duration::from_secs(5),
            || {
                primary_before = p.fd_count().unwrap_or(usize::MAX);
                let stable = primary_before == prev;
                prev = primary_before;
                stable
            },
        )?;
        let workers_before = counts(&worker_handles)?;
        let strays = [EventFd::new(0)?, EventFd::new(0)?];
        let raw_fds: Vec<i32> = strays.iter().map(|e| e.as_raw_fd()).collect();
        let mut raw = session(&bed)?;
        let (mut answered, mut closed) = (0, 0);
        for i in 0..1000 {
            let reply = if i % 2 == 0 {
                raw.request(req::GET_FEATURES, &[], &raw_fds)?
            } else {
                raw.request(req::SET_VRING_NUM, &vring_state(0, RING), &raw_fds[..1])?
            };
            match reply {
                Reply::Closed => {
                    closed += 1;
                    raw = session(&bed)?;
                }
                _ => answered += 1,
            }
        }
        drop(raw);
        eprintln!("stray fds: {answered} requests answered, {closed} connections closed");
        let mut last = 0;
        let settled = qpnet_tests::wait::wait_for(
            "the primary's fd count back where it began",
            Duration::from_secs(5),
            || {
                last = p.fd_count().unwrap_or(usize::MAX);
                last == primary_before
            },
        );
        settled.with_context(|| format!("primary: {primary_before} fds before, {last} after"))?;
        let workers_after = counts(&worker_handles)?;
        ensure!(
            workers_after == workers_before,
            "workers' fd counts {workers_before:?} before, {workers_after:?} after"
        );
        Ok(())
    })();
    bed.explain(result)?;
    check_unharmed(bed, &workers)
}
