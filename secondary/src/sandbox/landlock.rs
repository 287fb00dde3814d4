//! No file-system access, through Landlock: a ruleset that handles every
//! file-system right the running kernel knows and has no rule granting
//! any, so no path can be opened, created, removed, renamed, linked or
//! executed, not even `/proc`. It also handles TCP bind and connect
//! (Landlock ABI 4) and scopes abstract UNIX sockets and signals to the
//! worker's own domain (ABI 6), where the kernel has them.
//!
//! Best effort by kernel: an older Landlock enforces the rights it knows
//! (from 5.13 on, those cover every way to reach a file). Where Landlock is
//! missing or disabled, [`deny_files`] says so and the worker makes an
//! empty root of its own instead (`namespaces::empty_root`), at a higher
//! cost at start and exit.

use landlock::{
    Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError,
    RulesetStatus, Scope, ABI,
};

/// The newest Landlock ABI whose rights are asked for.
const ABI_WANTED: ABI = ABI::V6;

/// Close every path to this thread (a worker has one); `Ok(false)` when
/// the kernel enforces nothing of it.
pub(super) fn deny_files() -> Result<bool, RulesetError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_WANTED))?
        .handle_access(AccessNet::from_all(ABI_WANTED))?
        .scope(Scope::from_all(ABI_WANTED))?
        .create()?
        .no_new_privs(true)
        .restrict_self()?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a thread of its own (Landlock restricts the calling thread): after
    /// `deny_files`, a file that opened before cannot be opened.
    #[test]
    fn no_file_can_be_opened_once_files_are_denied() {
        let path = "/proc/self/status";
        std::fs::File::open(path).expect("open before");
        let r = std::thread::spawn(move || {
            let enforced = deny_files().expect("the Landlock ruleset");
            (enforced, std::fs::File::open(path).map(drop))
        })
        .join()
        .expect("the restricted thread");
        match r {
            (true, Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}"),
            (true, Ok(())) => panic!("{path} opened under the Landlock ruleset"),
            (false, _) => panic!(
                "this kernel enforces no Landlock ruleset: the suite needs Landlock \
                 (CONFIG_SECURITY_LANDLOCK, and landlock in the lsm= list)"
            ),
        }
    }
}
