//! Fault-injection points for the end-to-end tests, honoured only in debug builds.
//!
//! `BLIP_FAULT=<point>:<action>[,<point>:<action>...]` where action is `kill` (SIGKILL this
//! process, as a crashed host would), `drop` (return an error: the caller closes its
//! connections), or `sleep=<ms>` (stall, as a hung peer would). Release builds compile the check
//! away, so production binaries ignore the variable.

/// What a fault point asks the caller to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    Drop,
}

/// Checks the fault point `name`.
pub fn point(name: &str) -> Fault {
    if !cfg!(debug_assertions) {
        return Fault::None;
    }
    let Ok(spec) = std::env::var("BLIP_FAULT") else {
        return Fault::None;
    };
    for item in spec.split(',') {
        let Some((p, action)) = item.split_once(':') else {
            continue;
        };
        if p != name {
            continue;
        }
        match action {
            "kill" => {
                // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            "drop" => return Fault::Drop,
            a => {
                if let Some(ms) = a.strip_prefix("sleep=").and_then(|m| m.parse().ok()) {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            }
        }
    }
    Fault::None
}
