//! Snapshot and restore end to end: real `blip run`, `blip snapshot` and `blip restore`
//! processes on the real /dev/kvm. A snapshot of a running guest restores into a new process
//! whose guest continues (heartbeats above the snapshot's counter) and passes its memory check;
//! the original keeps running (or, with `--stop`, exits 0); a truncated, damaged, foreign or
//! other-version file is refused with one line and no guest runs; a snapshot that cannot be
//! written leaves the guest running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blip_tests::{blip, scratch, stderr, stdout, Bg};

use blip_tests::dirtying_source as source;

fn snapshot(src: &Bg, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "snapshot",
        "--api",
        src.api.to_str().unwrap(),
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    blip(&args).output().expect("blip snapshot")
}

fn restore(dir: &Path, name: &str, file: &Path) -> Bg {
    let mut r = Bg::start(
        dir,
        name,
        &["restore", file.to_str().unwrap(), "--serial", "stdout"],
        &[],
    );
    r.wait_api();
    r
}

/// `blip restore` of a bad file: exit 2, one line naming `why`, no guest ran.
fn assert_refused(dir: &Path, file: &Path, why: &str) {
    let api = dir.join("refused.sock");
    let o = blip(&[
        "restore",
        file.to_str().unwrap(),
        "--serial",
        "stdout",
        "--api",
        api.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}: {err}", file.display());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(why),
        "{}: expected {why:?} in {err}",
        file.display()
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&o).is_empty(), "a guest ran: {}", stdout(&o));
    assert!(!api.exists(), "control socket left behind");
}

#[test]
fn snapshot_restore_continues_the_guest_and_the_original_keeps_running() {
    let dir = scratch("snap-live");
    let mut src = source(&dir, "src");
    src.heartbeat_above(20);
    let before = src.last_heartbeat();
    let file = dir.join("guest.snap");
    let o = snapshot(&src, &file, &[]);
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("snapshot written to"), "{out}");
    assert!(out.contains("pages") && out.contains("paused"), "{out}");
    assert!(file.exists() && !dir.join("guest.snap.tmp").exists());
    eprintln!("{out}");

    // The original keeps running.
    let after = src.last_heartbeat();
    src.heartbeat_above(after);

    // The restored guest continues from the snapshot's counter, not from zero.
    let mut r = restore(&dir, "restored", &file);
    assert!(r.stderr().contains("guest restored from"), "{}", r.stderr());
    let first = r.heartbeat_above(0);
    assert!(
        first > before,
        "restored guest's heartbeat {first} is not above the snapshot's {before}"
    );
    r.heartbeat_above(first);
    r.check_and_exit();
    src.check_and_exit();
}

#[test]
fn snapshot_stop_exits_and_damaged_files_are_refused() {
    let dir = scratch("snap-stop");
    let mut src = source(&dir, "src");
    src.heartbeat_above(20);
    let file = dir.join("guest.snap");
    let o = snapshot(&src, &file, &["--stop"]);
    assert!(o.status.success(), "snapshot --stop: {}", stderr(&o));
    assert!(stdout(&o).contains("guest stopped"), "{}", stdout(&o));
    assert_eq!(src.wait(), Some(0), "source: {}", src.stderr());
    // The source's last heartbeat counter (it prints it as it stops).
    let err = src.stderr();
    let last: u64 = err
        .split("last counter ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat line: {err}"));

    let bytes = std::fs::read(&file).unwrap();
    let len = bytes.len();
    let bad = |name: &str, content: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    };

    // Truncated: empty, inside the header, right after it, inside a page frame, inside the
    // state, just before and inside the end marker.
    for cut in [
        0,
        5,
        20,
        32,
        40,
        1000,
        len / 2,
        len - 1000,
        len - 28,
        len - 1,
    ] {
        let p = bad(&format!("cut-{cut}.snap"), &bytes[..cut]);
        assert_refused(&dir, &p, "snapshot is truncated");
    }
    // A flipped byte in the first page frame's run table and in page data.
    for at in [32 + 16 + 6, 32 + 16 + 4 + 12 + 4096 * 3 + 7, len / 2] {
        let mut c = bytes.clone();
        c[at] ^= 0x10;
        let p = bad(&format!("flip-{at}.snap"), &c);
        assert_refused(&dir, &p, "snapshot is corrupt");
    }
    // Trailing bytes after the end marker.
    let mut t = bytes.clone();
    t.extend_from_slice(b"more");
    assert_refused(&dir, &bad("trailing.snap", &t), "snapshot is corrupt");
    // Foreign files.
    assert_refused(
        &dir,
        &bad("script.snap", b"#!/bin/sh\necho not a snapshot\n"),
        "not a blip snapshot",
    );
    let o = blip(&["guest-image", dir.join("guest.elf").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_refused(&dir, &dir.join("guest.elf"), "not a blip snapshot");
    // Another format version.
    let mut v = bytes.clone();
    v[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_refused(
        &dir,
        &bad("v1.snap", &v),
        "snapshot format 1; this blip reads 2",
    );
    // A missing file.
    assert_refused(&dir, &dir.join("nope.snap"), "cannot open");

    // The intact file still restores, continuing above the source's last heartbeat.
    let mut r = restore(&dir, "restored", &file);
    r.heartbeat_above(last);
    r.check_and_exit();
}

/// A tmpfs of 1 MiB, unmounted on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn snapshot_that_cannot_be_written_leaves_the_guest_running() {
    let dir = scratch("snap-fail");
    let mut src = source(&dir, "src");
    src.heartbeat_above(5);
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut targets = vec![
        (dir.join("no/such/dir/guest.snap"), "cannot create"),
        (fifo.clone(), "not a regular file"),
        (dir.clone(), "not a regular file"),
    ];
    // Disk full: a 1 MiB tmpfs (needs root; skipped where mounting is not allowed).
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    let _guard = mounted.then(|| SmallFs(small.clone()));
    if mounted {
        targets.push((small.join("guest.snap"), "No space left on device"));
    } else {
        eprintln!("cannot mount a tmpfs here: the disk-full case is skipped");
    }
    for (target, why) in &targets {
        let o = snapshot(&src, target, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", target.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(why),
            "{}: expected {why:?} in {err}",
            target.display()
        );
        let h = src.last_heartbeat();
        src.heartbeat_above(h);
    }
    if mounted {
        let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
        assert!(left.is_empty(), "partial snapshot left behind: {left:?}");
    }
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()),
        "the FIFO was replaced"
    );
    src.check_and_exit();
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Issue 14: under `umask 000` the snapshot, the registry entry and the run directory blip
/// creates are still private; a `FILE.<pid>.tmp` left by a writer killed with -9 is removed by
/// the next snapshot to FILE, one of a live writer is not.
#[test]
fn snapshot_and_registry_files_are_private_under_umask_000_and_orphans_go() {
    let dir = scratch("snap-umask");
    let run = dir.join("run"); // does not exist: the guest's blip creates it
    let api = dir.join("src.sock");
    let out = std::fs::File::create(dir.join("src.out")).unwrap();
    let err = std::fs::File::create(dir.join("src.err")).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(blip_tests::blip_bin())
        .args([
            "run", "--name", "private", "--mem", "32M", "--serial", "stdout",
        ])
        .args(["--cmdline", blip_tests::DIRTY_GUEST, "--api"])
        .arg(&api)
        .env("BLIP_RUN_DIR", &run)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let mut src = Bg {
        child,
        dir: dir.clone(),
        name: "src".into(),
        api,
    };
    src.wait_api();
    src.heartbeat_above(0);
    let entry = run.join("private.json");
    let start = Instant::now();
    while !entry.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never registered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode(&entry), 0o600, "registry entry");
    assert_eq!(mode(&run), 0o700, "run directory");

    let file = dir.join("guest.snap");
    // A writer that is gone (a reaped child's pid) and one that is alive (pid 1).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let orphan = dir.join(format!("guest.snap.{dead}.tmp"));
    let live = dir.join("guest.snap.1.tmp");
    std::fs::write(&orphan, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    let o = snapshot(&src, &file, &[]);
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    assert_eq!(mode(&file), 0o600, "snapshot file");
    assert!(!orphan.exists(), "the dead writer's tmp file is left");
    assert!(live.exists(), "a live writer's tmp file was removed");
    src.check_and_exit();
    assert!(!entry.exists(), "the entry outlived its blip");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14: header bytes 28..32 (reserved, outside the header CRC) are checked too: a flip
/// in any of them is refused with one line, like a flip anywhere else.
#[test]
fn snapshot_reserved_header_bytes_are_checked() {
    let dir = scratch("snap-reserved");
    let mut src = source(&dir, "src");
    src.heartbeat_above(0);
    let file = dir.join("guest.snap");
    let o = snapshot(&src, &file, &[]);
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    src.check_and_exit();
    let good = std::fs::read(&file).unwrap();
    assert_eq!(good[28..32], [0; 4]);
    for at in 28..32 {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        let p = dir.join(format!("flip-{at}.snap"));
        std::fs::write(&p, &bad).unwrap();
        assert_refused(&dir, &p, "reserved header bytes");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
