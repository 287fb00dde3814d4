//! Which socket backend qpnet runs, given as qpnet was given it, and the
//! peer's side of each queue pair derived from it the way qpnet derives its
//! own (PORT+K, PATH.K with more than one queue pair).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// qpnet's host side, as passed to `qpnet run`.
#[derive(Debug, Clone)]
pub enum Spec {
    /// `--udp LOCAL,REMOTE`: qpnet binds LOCAL+K and sends to REMOTE+K.
    Udp { qpnet: SocketAddr, peer: SocketAddr },
    /// `--unix-dgram LOCAL,REMOTE`: qpnet binds LOCAL(.K), connects to REMOTE(.K).
    UnixDgram { qpnet: PathBuf, peer: PathBuf },
    /// `--stream unix:PATH`: qpnet connects to PATH(.K), where we listen.
    Stream { path: PathBuf },
}

/// One queue pair's addresses: where the peer binds (or listens) and, for
/// datagrams, qpnet's socket it talks to.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Udp { bind: SocketAddr, qpnet: SocketAddr },
    UnixDgram { bind: PathBuf, qpnet: PathBuf },
    Stream { listen: PathBuf },
}

fn pair(value: &str, what: &str) -> Result<(String, String)> {
    let (a, b) = value
        .split_once(',')
        .with_context(|| format!("{what} takes LOCAL,REMOTE (qpnet's), not '{value}'"))?;
    Ok((a.to_owned(), b.to_owned()))
}

impl Spec {
    pub fn udp(value: &str) -> Result<Spec> {
        let (a, b) = pair(value, "--qpnet-udp")?;
        Ok(Spec::Udp {
            qpnet: a.parse().with_context(|| format!("bad address '{a}'"))?,
            peer: b.parse().with_context(|| format!("bad address '{b}'"))?,
        })
    }

    pub fn unix_dgram(value: &str) -> Result<Spec> {
        let (a, b) = pair(value, "--qpnet-unix-dgram")?;
        Ok(Spec::UnixDgram {
            qpnet: a.into(),
            peer: b.into(),
        })
    }

    pub fn stream(value: &str) -> Result<Spec> {
        match value.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Spec::Stream { path: path.into() }),
            _ => bail!("--qpnet-stream takes unix:PATH, not '{value}'"),
        }
    }

    /// Queue pair `k` of `n`.
    pub fn endpoint(&self, k: usize, n: usize) -> Result<Endpoint> {
        let path = |p: &PathBuf| -> PathBuf {
            if n == 1 {
                p.clone()
            } else {
                let mut s = p.clone().into_os_string();
                s.push(format!(".{k}"));
                s.into()
            }
        };
        let port = |a: &SocketAddr| -> Result<SocketAddr> {
            let p = u16::try_from(usize::from(a.port()) + k).context("port out of range")?;
            Ok(SocketAddr::new(a.ip(), p))
        };
        Ok(match self {
            Spec::Udp { qpnet, peer } => Endpoint::Udp {
                bind: port(peer)?,
                qpnet: port(qpnet)?,
            },
            Spec::UnixDgram { qpnet, peer } => Endpoint::UnixDgram {
                bind: path(peer),
                qpnet: path(qpnet),
            },
            Spec::Stream { path: p } => Endpoint::Stream { listen: path(p) },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pairs_shift_ports_and_suffix_paths() {
        let s = Spec::udp("127.0.0.1:5000,127.0.0.1:6000").unwrap();
        match s.endpoint(1, 2).unwrap() {
            Endpoint::Udp { bind, qpnet } => {
                assert_eq!(bind.port(), 6001);
                assert_eq!(qpnet.port(), 5001);
            }
            e => panic!("{e:?}"),
        }
        let s = Spec::stream("unix:/x/s").unwrap();
        match s.endpoint(0, 1).unwrap() {
            Endpoint::Stream { listen } => assert_eq!(listen, PathBuf::from("/x/s")),
            e => panic!("{e:?}"),
        }
        match s.endpoint(1, 2).unwrap() {
            Endpoint::Stream { listen } => assert_eq!(listen, PathBuf::from("/x/s.1")),
            e => panic!("{e:?}"),
        }
        assert!(Spec::stream("tcp:1.2.3.4:5").is_err());
        assert!(Spec::unix_dgram("/a").is_err());
    }
}
