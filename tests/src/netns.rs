//! Network namespaces and multi-queue TAPs that a test creates and removes.
//!
//! Every test gets its own namespace (`ip netns add qpt-<pid>-<n>`), so its
//! TAP, addresses and qpnet instance never meet another test's. The namespace
//! is deleted on drop. Code that must run inside it either runs on a dedicated
//! thread that called `setns(CLONE_NEWNET)` ([`NetNs::run`]; setns changes
//! only the calling thread, and sockets created there stay in the namespace for
//! their whole life) or as a command under `ip netns exec` ([`NetNs::command`]).
//!
//! IPv6 is disabled in the namespace before any TAP exists, so the kernel never
//! emits router or neighbour solicitations that would land in a test's RX
//! queues.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// A network namespace owned by the test; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create a namespace with a unique name (`qpt-<pid>-<n>`), with IPv6
    /// disabled by default and `lo` up.
    pub fn new() -> Result<NetNs> {
        remove_stale_namespaces();
        let name = crate::unique_name();
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .context("creating a network namespace (needs root and iproute2)")?;
        let ns = NetNs { name };
        for key in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "1")?;
        }
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    /// `ip` execs the program in place, so the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Run `ip -n NS ARGS...` and fail with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Set a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run_checked(
            self.command("sysctl")
                .arg("-q")
                .arg("-w")
                .arg(format!("{key}={value}")),
        )
        .map(drop)
    }

    /// Run `f` on a new thread that has entered the namespace, and return its
    /// result. File descriptors `f` creates (sockets, TAP queues) belong to the
    /// namespace for their whole life and may be used from any thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let handle = File::open(Path::new(NETNS_DIR).join(&self.name))
            .with_context(|| format!("opening namespace {}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread inside namespace panicked"))?
        })
    }

    /// Create a multi-queue TAP named `tap` in the namespace, with IPv6 off,
    /// link up and, if given, an IPv4 address such as "10.77.0.1/24".
    pub fn add_tap(&self, tap: &str, address: Option<&str>) -> Result<()> {
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            tap,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ])?;
        self.sysctl(&format!("net.ipv6.conf.{tap}.disable_ipv6"), "1")?;
        self.ip(&["link", "set", tap, "up"])?;
        if let Some(addr) = address {
            self.ip(&["addr", "add", addr, "dev", tap])?;
        }
        Ok(())
    }

    /// The interface index of `ifname` inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = ifname.to_owned();
        self.run(move || {
            nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface {name} in the namespace"))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Run a command, fail with its stderr if it exits nonzero; return stdout.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out: Output = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Delete `qpt-<pid>-*` namespaces left behind by test processes that no
/// longer exist (a run killed before its drops ran).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("qpt-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_created_isolated_and_removed() {
        let ns = NetNs::new().unwrap();
        let path = Path::new(NETNS_DIR).join(ns.name());
        assert!(path.exists());
        ns.add_tap("qptap0", Some("10.77.9.1/24")).unwrap();
        // The TAP exists inside, not outside.
        assert!(ns.ifindex("qptap0").unwrap() > 0);
        assert!(nix::net::if_::if_nametoindex("qptap0").is_err());
        let links = ns.ip(&["-d", "link", "show", "qptap0"]).unwrap();
        assert!(links.contains("multi_queue"), "{links}");
        let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6");
        // Outside namespace untouched is not our business; inside must be 1.
        let inside = ns
            .run(|| {
                Ok(std::fs::read_to_string(
                    "/proc/sys/net/ipv6/conf/qptap0/disable_ipv6",
                )?)
            })
            .unwrap();
        assert_eq!(inside.trim(), "1", "outside: {v6:?}");
        drop(ns);
        assert!(!path.exists());
    }
}
