//! What the guest's `tcphold` step prints: one line when an iperf3 run
//! starts and one when it ends (`scripts/guest/init`),
//!
//! ```text
//! QPNET-TCP seq=N start dir=tx|rx t=UPTIME
//! QPNET-TCP seq=N ok dir=tx|rx bytes=B t=UPTIME
//! QPNET-TCP seq=N fail dir=tx|rx reason="..." t=UPTIME
//! ```
//!
//! Runs are numbered from 1 and never overlap, so a run whose start line
//! was not yet printed when something happened began after it: a test that
//! notes the last started run before an event and then sees a later run end
//! ok knows that run's whole transfer came after the event.

/// How a run was reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpEvent {
    /// The run started.
    Start,
    /// It moved `bytes` (as the receiving side counted them).
    Ok { bytes: u64 },
    /// It failed (no connection, a reset, or its time bound fired).
    Fail,
}

/// One `QPNET-TCP` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpLine {
    /// The run's number.
    pub seq: u64,
    /// `tx` (guest -> host) or `rx` (host -> guest).
    pub dir: String,
    pub event: TcpEvent,
}

/// `line` as a `QPNET-TCP` line (anywhere in it: kernel messages may share
/// the console line).
pub fn tcp_of(line: &str) -> Option<TcpLine> {
    let rest = &line[line.find("QPNET-TCP ")? + "QPNET-TCP ".len()..];
    let mut words = rest.split_whitespace();
    let seq = words.next()?.strip_prefix("seq=")?.parse().ok()?;
    let status = words.next()?;
    let field = |key: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    let dir = field("dir")?.to_owned();
    let event = match status {
        "start" => TcpEvent::Start,
        "ok" => TcpEvent::Ok {
            bytes: field("bytes")?.parse().ok()?,
        },
        "fail" => TcpEvent::Fail,
        _ => return None,
    };
    Some(TcpLine { seq, dir, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_hold_lines_are_read() {
        assert_eq!(
            tcp_of("QPNET-TCP seq=3 start dir=tx t=40.12"),
            Some(TcpLine {
                seq: 3,
                dir: "tx".into(),
                event: TcpEvent::Start
            })
        );
        assert_eq!(
            tcp_of("[ 9.1] x QPNET-TCP seq=4 ok dir=rx bytes=123456 t=43.5").map(|l| l.event),
            Some(TcpEvent::Ok { bytes: 123456 })
        );
        let f = tcp_of("QPNET-TCP seq=5 fail dir=tx reason=\"unable to connect\" t=50.0").unwrap();
        assert_eq!((f.seq, f.event), (5, TcpEvent::Fail));
        assert_eq!(tcp_of("QPNET-TCP seq=5 ok dir=tx t=50.0"), None);
        assert_eq!(tcp_of("QPNET-TCP seq=x start dir=tx"), None);
        assert_eq!(tcp_of("QPNET-HOLD seq=1 ok rtt_ms=1 t=2"), None);
    }
}
