//! Helpers for blip's end-to-end tests: find the real `blip` binary and run it with a hang guard.
//!
//! The binary is built by `cargo build --workspace` (the README's test command does that before
//! `cargo test`); set `BLIP_BIN` to test another build. Timeouts here only protect CI from a
//! hung guest; no test asserts on how long anything took.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `blip` binary under test.
pub fn blip_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BLIP_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/blip
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("blip");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace` first (or set BLIP_BIN)",
        bin.display()
    );
    bin
}

/// A `Command` for the blip binary with `args`.
pub fn blip(args: &[&str]) -> Command {
    let mut c = Command::new(blip_bin());
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child`, killing it after `limit` (a hang guard, not a timing assertion).
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let s = child.wait().expect("wait");
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "blip did not finish within {limit:?} (killed, status {s:?})\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs blip with `args` to completion (5-minute hang guard).
pub fn run_blip(args: &[&str]) -> Output {
    let child = blip(args).spawn().expect("spawn blip");
    wait_with_limit(child, Duration::from_secs(300))
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
