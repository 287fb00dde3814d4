//! What `--stream` names: a unix socket path or a TCP address, and where
//! each queue pair's connection goes.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The peer of a stream backend, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSpec {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `tcp:HOST:PORT`, resolved when parsed.
    Tcp(SocketAddr),
}

/// Where one queue pair's connection goes (or is accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Parse the text of `--stream`: `unix:PATH` or `tcp:HOST:PORT`.
pub fn parse_stream(s: &str) -> Result<StreamSpec, String> {
    let usage =
        "expected unix:PATH or tcp:HOST:PORT, e.g. unix:/run/user/1000/passt.socket or tcp:127.0.0.1:5555";
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("--stream {s:?}: the path is empty; {usage}"));
        }
        // sun_path holds 108 bytes with the NUL; ".K" adds up to 3.
        if path.len() + 3 >= 108 {
            return Err(format!(
                "--stream {s:?}: the path is too long for a unix socket (at most 104 bytes)"
            ));
        }
        return Ok(StreamSpec::Unix(PathBuf::from(path)));
    }
    if let Some(hostport) = s.strip_prefix("tcp:") {
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("--stream {s:?}: {e}; {usage}"))?
            .next()
            .ok_or_else(|| format!("--stream {s:?}: {hostport:?} has no address"))?;
        if addr.port() == 0 {
            return Err(format!("--stream {s:?}: the port must not be 0"));
        }
        return Ok(StreamSpec::Tcp(addr));
    }
    Err(format!("--stream {s:?}: {usage}"))
}

impl StreamSpec {
    /// Queue pair `qp`'s target: `PATH.qp` or `PORT+qp` when there are
    /// `queue_pairs > 1`, the spec itself otherwise.
    pub fn target(&self, qp: u16, queue_pairs: u16) -> Result<Target, String> {
        match self {
            StreamSpec::Unix(p) if queue_pairs <= 1 => Ok(Target::Unix(p.clone())),
            StreamSpec::Unix(p) => Ok(Target::Unix(suffixed(p, qp))),
            StreamSpec::Tcp(a) => {
                let mut a = *a;
                let port = a.port().checked_add(qp).ok_or_else(|| {
                    format!(
                        "TCP port {} + queue pair {qp} is above 65535: choose a lower port",
                        a.port()
                    )
                })?;
                a.set_port(port);
                Ok(Target::Tcp(a))
            }
        }
    }

    /// One line for the log: where each queue pair connects or listens.
    pub fn describe(&self, queue_pairs: u16, listen: bool) -> String {
        let how = if listen {
            "listening on"
        } else {
            "connecting to"
        };
        match self.target(0, queue_pairs) {
            Ok(t) if queue_pairs <= 1 => format!("stream {how} {t}"),
            Ok(t) => format!(
                "streams, one connection per queue pair: queue pair 0 {how} {t}, queue pair K at {}",
                match self {
                    StreamSpec::Unix(_) => "PATH.K",
                    StreamSpec::Tcp(_) => "PORT+K",
                }
            ),
            Err(e) => e,
        }
    }

    /// The QEMU `-netdev stream` options of a peer of queue pair `qp`: it
    /// listens where we connect, and connects where we listen.
    pub fn qemu_peer(&self, qp: u16, queue_pairs: u16, listen: bool) -> Result<String, String> {
        let server = if listen { "off" } else { "on" };
        Ok(match self.target(qp, queue_pairs)? {
            Target::Unix(p) => format!(
                "-netdev stream,id=n{qp},server={server},addr.type=unix,addr.path={}",
                p.display()
            ),
            Target::Tcp(a) => format!(
                "-netdev stream,id=n{qp},server={server},addr.type=inet,addr.host={},addr.port={}",
                a.ip(),
                a.port()
            ),
        })
    }
}

fn suffixed(p: &Path, qp: u16) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{qp}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_name_each_queue_pairs_target() {
        let u = parse_stream("unix:/tmp/p.sock").unwrap();
        assert_eq!(u.target(0, 1).unwrap(), Target::Unix("/tmp/p.sock".into()));
        assert_eq!(
            u.target(2, 4).unwrap(),
            Target::Unix("/tmp/p.sock.2".into())
        );
        let t = parse_stream("tcp:127.0.0.1:5000").unwrap();
        assert_eq!(
            t.target(3, 4).unwrap(),
            Target::Tcp("127.0.0.1:5003".parse().unwrap())
        );
        let v6 = parse_stream("tcp:[::1]:7000").unwrap();
        assert_eq!(v6, StreamSpec::Tcp("[::1]:7000".parse().unwrap()));
        assert!(parse_stream("tcp:127.0.0.1:65535")
            .unwrap()
            .target(1, 2)
            .is_err());
        assert!(u
            .qemu_peer(0, 1, false)
            .unwrap()
            .contains("server=on,addr.type=unix,addr.path=/tmp/p.sock"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:127.0.0.1",
            "tcp:127.0.0.1:0",
            "udp:1.2.3.4:5",
            "/tmp/x",
        ] {
            let e = parse_stream(bad).unwrap_err();
            assert!(e.contains("--stream"), "{bad:?}: {e}");
        }
        let long = format!("unix:/{}", "x".repeat(110));
        assert!(parse_stream(&long).unwrap_err().contains("too long"));
    }
}
