//! `blip-linux-guest`: the Linux guest's files, and the judge of its heartbeat logs.
//!
//! ```text
//! blip-linux-guest workload FILE      write the static workload executable
//! blip-linux-guest initramfs FILE     write the guest's initramfs (newc cpio, /init = workload)
//! blip-linux-guest hb-check [--max-gap-ms MS] [--min-beats N] [--from N] LOG...
//! ```
//!
//! `hb-check` reads the logs as one console (concatenated in order: a guest that moved has its
//! console on each host in turn), prints one line `hb: beats=... max_gap_ms=... ...` and exits
//! 0 when the heartbeat counter never skips, the monotonic clock only goes forward, the
//! realtime clock never goes back, no gap exceeds `--max-gap-ms` and there are at least
//! `--min-beats` beats (counting only beats numbered `--from` or later); 1 otherwise (the line
//! says why); 2 on bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use blip_linux_guest::{cpio, heartbeat, WORKLOAD};

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("usage: blip-linux-guest workload FILE | initramfs FILE | hb-check [--max-gap-ms MS] [--min-beats N] [--from N] LOG...")]
    Usage,
    #[error("bad number `{0}`")]
    Number(String),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

fn number(v: Option<String>) -> Result<u64, CliError> {
    let v = v.ok_or(CliError::Usage)?;
    v.parse().map_err(|_| CliError::Number(v))
}

fn write_file(path: PathBuf, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&path, bytes).map_err(|e| CliError::Write(path.clone(), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| CliError::Write(path, e))
}

/// Runs the command; Ok(false) = a check failed.
fn run(mut args: impl Iterator<Item = String>) -> Result<bool, CliError> {
    match args.next().as_deref() {
        Some("workload") => {
            let out = args.next().ok_or(CliError::Usage)?;
            write_file(out.into(), WORKLOAD, 0o755)?;
            Ok(true)
        }
        Some("initramfs") => {
            let out = args.next().ok_or(CliError::Usage)?;
            write_file(out.into(), &cpio::initramfs(WORKLOAD), 0o644)?;
            Ok(true)
        }
        Some("hb-check") => {
            let (mut max_gap_ms, mut min_beats, mut from, mut logs) = (None, 1, 0, Vec::new());
            while let Some(a) = args.next() {
                match a.as_str() {
                    "--max-gap-ms" => max_gap_ms = Some(number(args.next())?),
                    "--min-beats" => min_beats = number(args.next())?,
                    "--from" => from = number(args.next())?,
                    _ if a.starts_with("--") => return Err(CliError::Usage),
                    _ => logs.push(PathBuf::from(a)),
                }
            }
            if logs.is_empty() {
                return Err(CliError::Usage);
            }
            let parts = logs
                .into_iter()
                .map(|p| std::fs::read(&p).map_err(|e| CliError::Read(p, e)))
                .collect::<Result<Vec<_>, _>>()?;
            let a = heartbeat::analyze_from(&heartbeat::join_consoles(&parts), from);
            let mut why = Vec::new();
            if a.beats < min_beats {
                why.push(format!("fewer than {min_beats} beats"));
            }
            if a.missing > 0 || !a.counter_breaks.is_empty() {
                why.push(format!("counter breaks {:?}", a.counter_breaks));
            }
            if a.mono_backwards > 0 {
                why.push("monotonic clock went back".into());
            }
            if a.real_backwards > 0 {
                why.push("realtime clock went back".into());
            }
            if let Some(g) = max_gap_ms {
                if a.max_gap_ns > g * 1_000_000 {
                    why.push(format!("gap above {g} ms"));
                }
            }
            let n = |b: Option<heartbeat::Beat>| b.map_or("none".into(), |b| b.n.to_string());
            println!(
                "hb: beats={} first={} last={} missing={} garbled={} max_gap_ms={:.1} at={} mono_span_ms={:.1} mono_backwards={} real_backwards={}{}{}",
                a.beats,
                n(a.first),
                n(a.last),
                a.missing,
                a.garbled,
                a.max_gap_ns as f64 / 1e6,
                a.max_gap_at,
                a.mono_span_ns() as f64 / 1e6,
                a.mono_backwards,
                a.real_backwards,
                if why.is_empty() { " ok" } else { " FAILED: " },
                why.join(", ")
            );
            Ok(why.is_empty())
        }
        _ => Err(CliError::Usage),
    }
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("blip-linux-guest: {msg}");
            ExitCode::from(2)
        }
    }
}
