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

/// A blip process running in the background, its stdout and stderr going to files.
pub struct Bg {
    pub child: Child,
    pub dir: PathBuf,
    pub name: String,
    pub api: PathBuf,
}

impl Bg {
    /// Starts `blip args...` with `--api <dir>/<name>.sock` appended.
    pub fn start(dir: &std::path::Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Bg {
        let api = dir.join(format!("{name}.sock"));
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
        let mut c = Command::new(blip_bin());
        c.args(args)
            .arg("--api")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            c.env(k, v);
        }
        Bg {
            child: c.spawn().expect("spawn blip"),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            api,
        }
    }

    /// Starts `blip args...` under `ip netns exec <ns>`.
    pub fn start_in_netns(dir: &std::path::Path, ns: &str, name: &str, args: &[&str]) -> Bg {
        let api = dir.join(format!("{name}.sock"));
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(blip_bin())
            .args(args)
            .arg("--api")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ip netns exec blip");
        Bg {
            child,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            api,
        }
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.out", self.name))).unwrap_or_default()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.err", self.name))).unwrap_or_default()
    }

    /// `blip status` as JSON, or None when it does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = blip(&["status", "--api", self.api.to_str().unwrap()])
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Waits until the control API answers (hang guard: 60 s).
    pub fn wait_api(&mut self) {
        let start = Instant::now();
        while self.status().is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited early ({st}): {}", self.name, self.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never answered",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stderr contains `needle` (hang guard: 60 s).
    pub fn wait_stderr(&mut self, needle: &str) {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited early ({st}): {}", self.name, self.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never said {needle:?}: {}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The heartbeat counter the guest last sent.
    pub fn last_heartbeat(&self) -> u64 {
        self.status()
            .and_then(|s| s["last_heartbeat"].as_u64())
            .unwrap_or(0)
    }

    /// Waits for the process to end (hang guard: 120 s) and returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("{} did not exit: {}", self.name, self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Is it still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blip-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A receiver's listen URL, read from its "waiting" line.
pub fn listen_url(b: &mut Bg) -> String {
    b.wait_stderr("waiting for an incoming migration on ");
    b.stderr()
        .split_whitespace()
        .find(|w| w.starts_with("tcp://"))
        .expect("url")
        .to_string()
}

/// Writes a fresh shared migration key (mode 0600) into `dir` and returns its path.
pub fn key_file(dir: &std::path::Path, name: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut secret)
        .unwrap();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(hex.as_bytes()).unwrap();
    p
}

/// The dirtying, heartbeating guest the migration and snapshot tests move around.
pub const DIRTY_GUEST: &str = "dirty ws=4 rate=max heartbeat period=500";

/// Starts `blip run` with [`DIRTY_GUEST`] on 2 vCPUs and 32 MiB (COM1 to its stdout file) and
/// waits until its control API answers.
pub fn dirtying_source(dir: &std::path::Path, name: &str) -> Bg {
    let mut s = Bg::start(
        dir,
        name,
        &[
            "run",
            "--vcpus",
            "2",
            "--mem",
            "32M",
            "--cmdline",
            DIRTY_GUEST,
            "--serial",
            "stdout",
        ],
        &[],
    );
    s.wait_api();
    s
}
