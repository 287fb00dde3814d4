//! Who may be served as the VMM.
//!
//! The vhost-user socket qpnet listens on is made accessible to its owner
//! only (mode 0600), or to one group as well (`--socket-group`, mode 0660),
//! before any VMM can connect. Each connection's peer credentials
//! (SO_PEERCRED) are logged, and with `--allow-uid` a peer whose uid is not
//! listed is refused: the connection is closed before a single request is
//! read, and the primary waits for the next VMM.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group};

/// A connected peer's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process id.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer's uid is not in `--allow-uid`.
    #[error("{0}: uid not in --allow-uid")]
    Uid(Peer),
    /// SO_PEERCRED failed.
    #[error("its credentials cannot be read: {0}")]
    Credentials(#[source] nix::Error),
}

/// The connection policy of one instance.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Only these uids (`None`: anyone who can reach the socket).
    pub allow_uids: Option<Vec<u32>>,
}

impl Access {
    /// The peer of `stream`, if it may be served.
    pub fn admit(&self, stream: &UnixStream) -> Result<Peer, Refusal> {
        let c = getsockopt(stream, PeerCredentials).map_err(Refusal::Credentials)?;
        let peer = Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        };
        match &self.allow_uids {
            Some(list) if !list.contains(&peer.uid) => Err(Refusal::Uid(peer)),
            _ => Ok(peer),
        }
    }
}

/// The group `name` (for `--socket-group`).
pub fn group(name: &str) -> Result<Gid> {
    let g = Group::from_name(name)
        .with_context(|| format!("looking up --socket-group {name}"))?
        .with_context(|| format!("--socket-group {name}: no such group"))?;
    Ok(g.gid)
}

/// Listen on `path`, the socket file owner-only from its creation (mode
/// 0600), or 0660 with group `group`.
pub fn bind_restricted(
    path: &Path,
    group: Option<Gid>,
) -> Result<std::os::unix::net::UnixListener> {
    // Made owner-only from the start (no moment at the umask's mode), then
    // opened to the group if asked.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    restrict_socket(path, group)?;
    Ok(listener)
}

/// Restrict the socket file at `path`: mode 0600, or 0660 with group `group`.
fn restrict_socket(path: &Path, group: Option<Gid>) -> Result<()> {
    let mode = match group {
        Some(g) => {
            nix::unistd::chown(path, None, Some(g))
                .with_context(|| format!("giving {} to group {g}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_uids_are_admitted() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let open = Access::default();
        assert_eq!(open.admit(&a).unwrap().uid, me);
        let listed = Access {
            allow_uids: Some(vec![me]),
        };
        assert!(listed.admit(&a).is_ok());
        let other = Access {
            allow_uids: Some(vec![me.wrapping_add(1)]),
        };
        assert!(matches!(other.admit(&a), Err(Refusal::Uid(p)) if p.uid == me));
    }

    #[test]
    fn sockets_are_owner_only_unless_a_group_is_given() {
        let dir = std::env::temp_dir().join(format!("qpnet-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        restrict_socket(&path, None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let gid = nix::unistd::getgid();
        restrict_socket(&path, Some(gid)).unwrap();
        assert_eq!(mode(&path), 0o660);
        assert!(group("qpnet-no-such-group").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
