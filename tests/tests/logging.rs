//! blip's log lines from the real binary: the human style (time, level, `[guest=NAME]`), the
//! journal style when stderr is the stream `JOURNAL_STREAM` names (syslog priority, no time),
//! and `RUST_LOG` filtering (lines others wait for pass any filter).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use blip_tests::{blip, scratch, wait_file_line, wait_with_limit};

fn read_lossy(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Starts `blip receive --name NAME` with stderr into `err` and the given environment.
fn receiver(err: &Path, name: &str, env: &[(&str, String)]) -> Child {
    let f = File::create(err).unwrap();
    let mut c = blip(&[
        "receive",
        "--listen",
        "tcp://127.0.0.1:0",
        "--insecure",
        "--name",
        name,
    ]);
    c.env_remove("RUST_LOG")
        .env_remove("BLIP_LOG")
        .env_remove("JOURNAL_STREAM");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
    c.spawn().unwrap()
}

/// SIGTERM, then its whole stderr once it exited.
fn stop(child: Child, err: &Path) -> String {
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let o = wait_with_limit(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(130), "{}", read_lossy(err));
    read_lossy(err)
}

const WAITING: &str = "blip: waiting for an incoming migration on tcp://127.0.0.1:";
const STOPPED: &str = "blip: interrupted while waiting; no guest received";

#[test]
fn human_lines_carry_time_level_and_guest() {
    let dir = scratch("log-human");
    let err = dir.join("recv.err");
    let child = receiver(&err, "loghuman", &[]);
    let line = wait_file_line(&err, WAITING);
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.contains('T') && time.ends_with('Z'), "{line}");
    assert!(
        rest.starts_with(" INFO [guest=loghuman] blip: waiting"),
        "{line}"
    );
    let all = stop(child, &err);
    let last = all.lines().last().unwrap_or("");
    assert!(
        last.ends_with(&format!(" INFO [guest=loghuman] {STOPPED}")),
        "{all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn journal_lines_carry_the_syslog_priority_and_no_time() {
    let dir = scratch("log-journal");
    let err = dir.join("recv.err");
    // The file is created here first so JOURNAL_STREAM can name its device and inode, as
    // systemd names the journal's socket.
    File::create(&err).unwrap();
    let m = std::fs::metadata(&err).unwrap();
    let stream = format!("{}:{}", m.dev(), m.ino());
    let f = std::fs::OpenOptions::new().append(true).open(&err).unwrap();
    let mut c = blip(&[
        "receive",
        "--listen",
        "tcp://127.0.0.1:0",
        "--insecure",
        "--name",
        "logjournal",
    ]);
    c.env_remove("RUST_LOG")
        .env_remove("BLIP_LOG")
        .env("JOURNAL_STREAM", &stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f);
    let child = c.spawn().unwrap();
    let line = wait_file_line(&err, WAITING);
    assert!(
        line.starts_with("<6>[guest=logjournal] blip: waiting for an incoming migration on "),
        "{line}"
    );
    let all = stop(child, &err);
    assert!(
        all.lines()
            .any(|l| l == format!("<6>[guest=logjournal] {STOPPED}")),
        "{all}"
    );
    // Another stream's numbers (a child of a unit writing to its own file): human style.
    let err2 = dir.join("other.err");
    let child = receiver(&err2, "lognotjournal", &[("JOURNAL_STREAM", stream)]);
    let line = wait_file_line(&err2, WAITING);
    assert!(line.contains(" INFO [guest=lognotjournal] "), "{line}");
    stop(child, &err2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn under_the_journal_a_failed_command_logs_its_error_at_error_priority() {
    let dir = scratch("log-journal-err");
    let err = dir.join("run.err");
    File::create(&err).unwrap();
    let m = std::fs::metadata(&err).unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&err).unwrap();
    let missing = dir.join("no-such-kernel");
    let o = blip(&["run", "--kernel", missing.to_str().unwrap()])
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .status()
        .unwrap();
    assert_eq!(o.code(), Some(2));
    let all = read_lossy(&err);
    let last = all.lines().last().unwrap_or_default();
    assert!(last.starts_with("<3>blip: error: "), "{all}");
    assert!(last.contains("no-such-kernel"), "{all}");
}

#[test]
fn rust_log_filters_but_the_waiting_line_always_shows() {
    let dir = scratch("log-filter");
    let err = dir.join("recv.err");
    let child = receiver(&err, "logwarn", &[("RUST_LOG", "warn".into())]);
    wait_file_line(&err, WAITING);
    let all = stop(child, &err);
    assert!(
        !all.contains(STOPPED),
        "an info line passed RUST_LOG=warn: {all}"
    );
    // BLIP_LOG wins over RUST_LOG; a filter that does not parse is said once and info is used.
    let child = receiver(
        &err,
        "logbad",
        &[
            ("BLIP_LOG", "blip=loud".into()),
            ("RUST_LOG", "warn".into()),
        ],
    );
    wait_file_line(&err, WAITING);
    let all = stop(child, &err);
    assert!(
        all.lines()
            .next()
            .unwrap_or("")
            .contains(" WARN blip: ignoring BLIP_LOG="),
        "{all}"
    );
    assert!(all.contains(STOPPED), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}
