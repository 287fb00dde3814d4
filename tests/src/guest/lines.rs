//! What the test guest's init (`scripts/guest/init`) prints on its serial
//! console: `QPNET-RESULT <step> ok|fail key=value...` ([`ResultLine`]) and,
//! while it holds, `QPNET-HOLD seq=N ok|lost ...` ([`HoldLine`]).

use anyhow::{ensure, Context, Result};

/// `QPNET-RESULT <step> ok|fail key=value...` (anywhere in the line: kernel
/// messages may share it).
#[derive(Debug, Clone)]
pub struct ResultLine {
    pub step: String,
    /// "ok", "fail", or another word ("hold started").
    pub status: String,
    /// The line from the step on.
    pub line: String,
}

impl ResultLine {
    pub fn parse(line: &str) -> Option<ResultLine> {
        let rest = &line[line.find("QPNET-RESULT ")? + "QPNET-RESULT ".len()..];
        let mut words = rest.split_whitespace();
        let step = words.next()?.to_owned();
        let status = words.next()?.to_owned();
        Some(ResultLine {
            step,
            status,
            line: rest.to_owned(),
        })
    }

    pub fn ok(&self) -> bool {
        self.status == "ok"
    }

    pub fn failed(&self) -> bool {
        self.status == "fail"
    }

    /// The value of `key=` on the line.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// `key=` as a number of type `T`.
    fn parsed<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self
            .field(key)
            .with_context(|| format!("no {key}= in {:?}", self.line))?;
        v.parse()
            .with_context(|| format!("{key}={v} is not a number"))
    }

    pub fn number(&self, key: &str) -> Result<u64> {
        self.parsed(key)
    }

    pub fn float(&self, key: &str) -> Result<f64> {
        self.parsed(key)
    }
}

/// `line` as a result of `step`.
pub fn result_of(line: &str, step: &str) -> Option<ResultLine> {
    ResultLine::parse(line).filter(|r| r.step == step)
}

/// `line` as a result of `step`, which must be ok.
pub fn ok_result(line: &str, step: &str) -> Result<ResultLine> {
    let r = result_of(line, step).with_context(|| format!("not a {step} result: {line}"))?;
    ensure!(r.ok(), "guest step {step} failed: {}", r.line);
    Ok(r)
}

/// `QPNET-HOLD seq=N ok rtt_ms=X t=UPTIME` or `QPNET-HOLD seq=N lost t=...`.
#[derive(Debug, PartialEq)]
pub struct HoldLine {
    pub seq: u64,
    pub ok: bool,
}

pub fn hold_of(line: &str) -> Option<HoldLine> {
    let rest = &line[line.find("QPNET-HOLD ")? + "QPNET-HOLD ".len()..];
    let mut words = rest.split_whitespace();
    let seq = words.next()?.strip_prefix("seq=")?.parse().ok()?;
    let ok = match words.next()? {
        "ok" => true,
        "lost" => false,
        _ => return None,
    };
    Some(HoldLine { seq, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_result_lines_are_read() {
        let r =
            ResultLine::parse("QPNET-RESULT iperf-tx ok gbps=0.932 bytes=585760768 retransmits=0")
                .unwrap();
        assert!(r.ok());
        assert_eq!(r.step, "iperf-tx");
        assert_eq!(r.number("bytes").unwrap(), 585760768);
        assert!(r.number("gbps").is_err());
        let f = ResultLine::parse("QPNET-RESULT ping fail reason=no-reply waited_s=60").unwrap();
        assert!(!f.ok());
        assert!(ResultLine::parse("[ 3.1] virtio_net").is_none());
    }

    #[test]
    fn serial_lines_are_read() {
        let r =
            ResultLine::parse("QPNET-RESULT iperf-tx ok gbps=0.932 bytes=585760768 retransmits=3")
                .unwrap();
        assert!(r.ok() && !r.failed());
        assert_eq!(r.step, "iperf-tx");
        assert_eq!(r.number("bytes").unwrap(), 585760768);
        assert!((r.float("gbps").unwrap() - 0.932).abs() < 1e-9);
        assert_eq!(r.field("retransmits"), Some("3"));
        let f = ResultLine::parse("[ 9.1] x QPNET-RESULT iperf-tx fail reason=\"reset\"").unwrap();
        assert!(f.failed() && !f.ok());
        let h = ResultLine::parse("QPNET-RESULT hold started peer=10.77.0.1").unwrap();
        assert!(!h.ok() && !h.failed());
        assert!(result_of("QPNET-RESULT ping ok", "iperf-tx").is_none());
        assert!(ok_result("QPNET-RESULT iperf-tx fail reason=x", "iperf-tx").is_err());

        assert_eq!(
            hold_of("QPNET-HOLD seq=12 ok rtt_ms=0.812 t=33.10"),
            Some(HoldLine { seq: 12, ok: true })
        );
        assert_eq!(
            hold_of("QPNET-HOLD seq=13 lost t=35.10"),
            Some(HoldLine { seq: 13, ok: false })
        );
        assert_eq!(hold_of("QPNET-HOLD seq=x ok"), None);
        assert_eq!(hold_of("QPNET-RESULT hold started peer=10.77.0.1"), None);
    }
}
