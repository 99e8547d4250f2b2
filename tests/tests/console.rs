//! `blip console`: input typed on a running guest's COM1.
//!
//! The embedded guest writes COM1 but never reads it, so what it is sent stays in the UART's
//! receive FIFO: the test fills the FIFO through the control API and sees the refusal that
//! says to try again. (A guest that reads its console, Linux, is tested in the soft-RoCE
//! harness: `ci/softroce/linux.sh` sends `check` with `blip console`.)

use blip_tests::{blip, dirtying_source, scratch, stderr, stdout, wait_with_limit};
use std::time::Duration;

fn console(api: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["console", "--api", api];
    a.extend_from_slice(args);
    wait_with_limit(blip(&a).spawn().unwrap(), Duration::from_secs(60))
}

#[test]
fn console_input_fills_the_uart_fifo_then_is_refused() {
    let dir = scratch("console");
    let mut g = dirtying_source(&dir, "g");
    let api = g.api.to_str().unwrap().to_string();

    // 6 bytes ("check" and its newline), then 58 without a newline: the 64-byte FIFO is full.
    let o = console(&api, &["--send", "check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(r#""event":"ok""#), "{}", stdout(&o));
    let fill = "x".repeat(58);
    let o = console(&api, &["--send", &fill, "--no-newline"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Full: one clear line, nothing queued, the guest keeps running.
    let o = console(&api, &["--send", "y", "--no-newline"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("room for 0 of 1 bytes") && err.contains("try again"),
        "{err}"
    );

    // Too long for one request: refused before it reaches the guest.
    let o = console(&api, &["--send", &"z".repeat(64)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("longer than 64 bytes"),
        "{}",
        stderr(&o)
    );

    assert!(g.alive(), "{}", g.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}
