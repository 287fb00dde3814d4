//! Flow table tests with real processes: a concurrent stress test and the
//! killed-lock-holder test.
//!
//! Children are this test binary itself, re-executed to run only
//! [`child_process_entry`] with `QPNET_FLOW_TEST_ROLE` naming their role;
//! they attach to the parent's region file like a worker would and report
//! through a result file. In a normal test run that entry finds no role and
//! returns at once.
//!
//! `stress.rs` runs several processes against one table and checks every
//! invariant after; `crash.rs` kills (or stops) a lock holder at each
//! crash point and checks that nobody else is held up and that the stripe
//! comes back whole.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::SharedRegion;

mod crash;
mod stress;

const ROLE_ENV: &str = "QPNET_FLOW_TEST_ROLE";
const CHILD_TEST: &str = "flow::multiprocess_tests::child_process_entry";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

fn attach(path: &str) -> SharedRegion {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    SharedRegion::attach_fd(file).unwrap()
}

fn spawn_child(role: &str, vars: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        CHILD_TEST,
        "--test-threads=1",
        "--nocapture",
        "-q",
    ])
    .env(ROLE_ENV, role)
    .stdout(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().expect("re-executing the test binary")
}

/// Entry point of child processes; a no-op in the parent's test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        "stress" => stress::stress_child(),
        "crash" => crash::crash_child(),
        other => panic!("unknown child role {other}"),
    }
    // End the process here, before libtest reports this test: the child's
    // results are already written and flushed.
    std::process::exit(0);
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qpnet-mp-{}-{name}", std::process::id()))
}
