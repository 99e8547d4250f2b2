//! Helpers for blip's end-to-end tests: find the real `blip` binary and run it with a hang guard.
//!
//! The binary is built by `cargo build --workspace` (the README's test command does that before
//! `cargo test`); set `BLIP_BIN` to test another build. Timeouts here only protect CI from a
//! hung guest; no test asserts on how long anything took.

pub mod netns;
pub mod prom;
pub mod relay;

use std::io::Read;
use std::path::{Path, PathBuf};
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

/// The run directory (registry and migration slots) of every blip this test process starts,
/// unless a test sets its own `BLIP_RUN_DIR`: the host-wide `/run/blip` would make two test
/// runs on one machine (a developer's and CI's) take each other's migration slots. A test
/// process cannot remove it as it exits (statics are not dropped), so each one removes those
/// its finished predecessors left (233 of them had piled up in /tmp here).
pub fn default_run_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        remove_stale_run_dirs();
        let d = std::env::temp_dir().join(format!("blip-tests-run-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// Removes `blip-tests-run-<pid>` directories whose process is gone.
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("blip-tests-run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A `Command` for the blip binary with `args`.
pub fn blip(args: &[&str]) -> Command {
    let mut c = Command::new(blip_bin());
    c.env("BLIP_RUN_DIR", default_run_dir());
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
        c.env("BLIP_RUN_DIR", default_run_dir());
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
        Bg::start_in_netns_with(dir, ns, name, args, &[])
    }

    /// [`Bg::start_in_netns`] with extra environment (`ip netns exec` passes it on).
    pub fn start_in_netns_with(
        dir: &std::path::Path,
        ns: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Bg {
        let api = dir.join(format!("{name}.sock"));
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
        let mut c = Command::new("ip");
        c.env("BLIP_RUN_DIR", default_run_dir());
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
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

    /// Its stdout so far (possibly ending in a line still being written).
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.join(format!("{}.out", self.name)))
    }

    /// Its stderr so far (possibly ending in a line still being written).
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.join(format!("{}.err", self.name)))
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

    /// Waits until stderr has a whole line (ended by '\n') containing `needle` and returns the
    /// first such line, without its newline (hang guard: 60 s). blip writes a line in pieces,
    /// so a line without its newline yet may still be growing: it is never matched.
    pub fn wait_stderr(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = complete_line(&self.stderr(), needle) {
                return line;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // It may have written the line just before exiting: look once more.
                let err = self.stderr();
                if let Some(line) = complete_line(&err, needle) {
                    return line;
                }
                panic!("{} exited early ({st}): {err}", self.name);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never said {needle:?} in a whole line: {}",
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

    /// Waits until the guest's heartbeat counter is above `floor` and returns it (hang guard:
    /// 60 s; a process that exits first fails the test with its stderr).
    pub fn heartbeat_above(&mut self, floor: u64) -> u64 {
        let start = Instant::now();
        loop {
            let h = self.last_heartbeat();
            if h > floor {
                return h;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}): {}", self.name, self.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}: heartbeats never passed {floor} (last {h}): {}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The guest still runs: waits for one heartbeat newer than the one it has now.
    pub fn assert_beating(&mut self) {
        let h0 = self.last_heartbeat();
        self.heartbeat_above(h0);
    }

    /// Has the guest check its memory (`blip check`), then expects the process to exit 0 with
    /// `check: ok` on its stdout (the embedded guest powers off after its check).
    pub fn check_and_exit(&mut self) {
        let o = blip(&["check", "--api", self.api.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "check request: {}", stderr(&o));
        assert_eq!(
            self.wait(),
            Some(0),
            "{} exit; stderr: {}",
            self.name,
            self.stderr()
        );
        assert!(
            self.stdout().contains("check: ok"),
            "{} memory check: {}",
            self.name,
            self.stdout()
        );
    }

    /// Alive, then intact: one new heartbeat, then the memory check and exit 0.
    pub fn assert_alive_then_check(&mut self) {
        self.assert_beating();
        self.check_and_exit();
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
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("blip-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A test's scratch directory: removed when the test passes, kept when it panics (its logs are
/// what a failure is read from). Thousands of runs must not fill the disk with passed tests'
/// snapshots and logs.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The first whole (newline-terminated) line of `text` containing `needle`, without its
/// newline; a last line with no newline yet is ignored.
pub fn complete_line(text: &str, needle: &str) -> Option<String> {
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .find(|l| l.contains(needle))
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
}

/// A file's text so far, or "" when it does not exist yet. Lossy, so bytes of a character still
/// being written cannot turn the whole text into an error.
fn read_lossy(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// What a receiver prints once it listens; its URL follows, then the end of the line.
pub const WAITING: &str = "waiting for an incoming migration on ";

/// A receiver's listen URL, parsed from its whole "waiting for an incoming migration on URL"
/// line only (never from a line still being written).
pub fn listen_url(b: &mut Bg) -> String {
    let line = b.wait_stderr(WAITING);
    let url = line
        .split_once(WAITING)
        .map(|(_, rest)| rest.trim())
        .unwrap_or_default();
    assert!(
        url.contains("://") && !url.contains(char::is_whitespace),
        "{}: no URL in its waiting line {line:?}",
        b.name
    );
    url.to_string()
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

/// `blip run` of [`DIRTY_GUEST`] on 2 vCPUs and 32 MiB (add `--serial` and the rest).
pub const DIRTY_RUN: [&str; 7] = [
    "run",
    "--vcpus",
    "2",
    "--mem",
    "32M",
    "--cmdline",
    DIRTY_GUEST,
];

/// Starts `blip run` with [`DIRTY_GUEST`] on 2 vCPUs and 32 MiB (COM1 to its stdout file) and
/// waits until its control API answers.
pub fn dirtying_source(dir: &std::path::Path, name: &str) -> Bg {
    dirtying_source_with(dir, name, &[])
}

/// [`dirtying_source`] with extra environment (e.g. a short `BLIP_PEER_TIMEOUT_MS`).
pub fn dirtying_source_with(dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> Bg {
    let mut args = DIRTY_RUN.to_vec();
    args.extend_from_slice(&["--serial", "stdout"]);
    let mut s = Bg::start(dir, name, &args, env);
    s.wait_api();
    s
}

/// What `blip host serve` prints once it serves; its network URL follows.
pub const HOST_SERVING: &str = " on tcp://";

/// Starts `blip host serve` on a loopback port with its own run directory `run_dir`
/// (a simulated host), receivers on `ports`, its host API at `<dir>/<name>.sock`; waits until
/// it says it serves and returns it with its network URL.
pub fn host_service(
    dir: &std::path::Path,
    name: &str,
    run_dir: &std::path::Path,
    key: &std::path::Path,
    ports: &str,
) -> (Bg, String) {
    std::fs::create_dir_all(run_dir).unwrap();
    let mut s = Bg::start(
        dir,
        name,
        &[
            "host",
            "serve",
            "--listen",
            "tcp://127.0.0.1:0",
            "--ports",
            ports,
            "--key",
            key.to_str().unwrap(),
        ],
        &[("BLIP_RUN_DIR", run_dir.to_str().unwrap())],
    );
    let line = s.wait_stderr("blip host: serving");
    let url = line
        .split_once(HOST_SERVING)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|hp| format!("tcp://{hp}"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    (s, url)
}

/// Starts `blip host serve` in network namespace `ns`, listening on `tcp://ADDR:7000` with
/// receivers on `ports`, its own run directory `run_dir` and host API at `<dir>/<name>.sock`;
/// waits until it says it serves and returns it with its network URL.
pub fn host_service_in_netns(
    dir: &std::path::Path,
    ns: &str,
    name: &str,
    run_dir: &std::path::Path,
    key: &std::path::Path,
    addr: &str,
    ports: &str,
) -> (Bg, String) {
    std::fs::create_dir_all(run_dir).unwrap();
    let url = format!("tcp://{addr}:7000");
    let mut s = Bg::start_in_netns_with(
        dir,
        ns,
        name,
        &[
            "host",
            "serve",
            "--listen",
            &url,
            "--ports",
            ports,
            "--key",
            key.to_str().unwrap(),
        ],
        &[("BLIP_RUN_DIR", run_dir.to_str().unwrap())],
    );
    let line = s.wait_stderr("blip host: serving");
    assert!(
        line.contains(&format!("{HOST_SERVING}{addr}:7000")),
        "{line}"
    );
    (s, url)
}

/// A peer of a host service that speaks the protocol but holds the wrong key. Returns what the
/// service answered (it must refuse with "authentication failed"), or why the exchange broke
/// off; every step is bounded by `limit`.
pub fn wrong_key_peer(url: &str, limit: Duration) -> Result<String, String> {
    use blip_transport::protocol::{
        self, HostRequest, Message, Role, AUTH_HMAC_SHA256, HOST_PREPARE,
    };
    let addr: std::net::SocketAddr = url
        .trim_start_matches("tcp://")
        .parse()
        .map_err(|e| format!("{url}: {e}"))?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    c.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let req = Message::HostRequest(HostRequest {
        op: HOST_PREPARE,
        name: "intruder".into(),
        mem_size: 32 << 20,
        vcpus: 1,
    });
    protocol::write_message(&mut c, &req).map_err(|e| e.to_string())?;
    protocol::write_message(
        &mut c,
        &Message::Hello {
            role: Role::Source,
            session: 7,
            nonce: [3; 32],
            host_id: 1,
            auth: AUTH_HMAC_SHA256,
        },
    )
    .map_err(|e| e.to_string())?;
    match protocol::read_message(&mut c).map(|f| f.msg) {
        Ok(Message::Hello { .. }) => {}
        other => return Err(format!("expected the service's Hello, got {other:?}")),
    }
    protocol::write_message(&mut c, &Message::Auth { mac: [0x5a; 32] })
        .map_err(|e| e.to_string())?;
    match protocol::read_message(&mut c).map(|f| f.msg) {
        Ok(Message::Refuse { reason }) => Ok(reason),
        other => Err(format!("expected a refusal, got {other:?}")),
    }
}

/// Runs `blip host ARGS` against the host API of `service` (started by [`host_service`]).
pub fn host_cmd(service: &Bg, run_dir: &std::path::Path, args: &[&str]) -> Output {
    let mut all = vec!["host", "--api", service.api.to_str().unwrap()];
    all.extend_from_slice(args);
    blip(&all).env("BLIP_RUN_DIR", run_dir).output().unwrap()
}

/// The guest the host-service tests run: dirties 2 MiB as fast as it can, beats every 1 ms,
/// and checks its own memory on `blip check`.
pub const HOST_GUEST: &str = "dirty ws=2 rate=max heartbeat period=1000";

/// The JSON a successful command printed (panics with its output otherwise).
pub fn ok_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// `blip host run NAME` on service `svc`: a 32 MiB [`HOST_GUEST`] with its console on stdout.
pub fn host_run_guest(svc: &Bg, run_dir: &std::path::Path, name: &str) {
    let o = host_cmd(
        svc,
        run_dir,
        &[
            "run",
            name,
            "--",
            "--mem",
            "32M",
            "--cmdline",
            HOST_GUEST,
            "--serial",
            "stdout",
        ],
    );
    assert!(
        o.status.success(),
        "host run {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The names of the guests service `svc` lists.
pub fn host_guest_names(svc: &Bg, run_dir: &std::path::Path) -> Vec<String> {
    let v = ok_json(&host_cmd(svc, run_dir, &["guests", "--json"]));
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `path` has a whole line containing `needle` (hang guard: 60 s).
pub fn wait_file_line(path: &std::path::Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = complete_line(&read_lossy(path), needle) {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never said {needle:?}: {}",
            path.display(),
            read_lossy(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills, when dropped, every guest registered in the given run directories: guests started
/// by a host service outlive it by design, so a test (passing or failing) must stop them.
pub struct KillGuests(pub Vec<PathBuf>);

impl Drop for KillGuests {
    fn drop(&mut self) {
        for dir in &self.0 {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let pid = std::fs::read(&p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["pid"].as_u64());
                if let Some(pid) = pid {
                    let _ = Command::new("kill").arg(pid.to_string()).status();
                }
            }
        }
        // Receivers a host service started for migrations still under way are not registered
        // yet: any process whose command line names this test's scratch directory goes too
        // (a test that failed half-way must not leave a guest running).
        let roots: Vec<String> = self
            .0
            .iter()
            .filter_map(|d| d.parent())
            .map(|p| format!("{}/", p.display()))
            .collect();
        let me = std::process::id().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().to_string();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with(&*blip_bin().to_string_lossy())
                && roots.iter().any(|r| cmd.contains(r.as_str()))
            {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
    }
}

/// Writes a test CA named `ca` and one certificate per node (subjectAltName 127.0.0.1 and
/// localhost, signed by that CA) as PEM files in `dir`; returns each node's
/// `--tls-cert FILE --tls-key FILE --tls-ca FILE` arguments.
pub fn tls_certs(dir: &std::path::Path, ca: &str, nodes: &[&str]) -> Vec<Vec<String>> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, ca);
    let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.join(format!("{ca}-ca.crt"));
    std::fs::write(&ca_file, issuer.pem()).unwrap();
    nodes
        .iter()
        .map(|n| {
            let mut p =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, *n);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{ca}-{n}.crt")),
                dir.join(format!("{ca}-{n}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            [
                ("--tls-cert", &c),
                ("--tls-key", &k),
                ("--tls-ca", &ca_file),
            ]
            .iter()
            .flat_map(|(f, p)| [f.to_string(), p.to_str().unwrap().to_string()])
            .collect()
        })
        .collect()
}

/// Gives each of `names` (guests of the host whose run directory is `run`) a blackout target
/// their pre-copy meets, as soon as each one's migration runs: the tests hold migrations in
/// pre-copy with a target none meets and an hour's limit, look at what they want to see, then
/// let them finish. In any order (a drain picks its own); hang guard 120 s.
pub fn release_migrations(run: &std::path::Path, names: &[&str]) {
    let mut left: Vec<&str> = names.to_vec();
    let start = std::time::Instant::now();
    while !left.is_empty() {
        left.retain(|n| {
            !blip(&["migrate", "--guest", n, "--set-max-blackout", "50ms"])
                .env("BLIP_RUN_DIR", run)
                .output()
                .unwrap()
                .status
                .success()
        });
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "never seen migrating: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::{complete_line, WAITING};

    #[test]
    fn a_line_still_being_written_is_not_matched() {
        let partial = format!("blip: 32 MiB pre-faulted\nblip: {WAITING}tcp");
        assert_eq!(complete_line(&partial, WAITING), None);
        let whole = format!("{partial}://127.0.0.1:4000\nmore");
        assert_eq!(
            complete_line(&whole, WAITING),
            Some(format!("blip: {WAITING}tcp://127.0.0.1:4000"))
        );
    }

    #[test]
    fn the_first_whole_line_wins_and_carriage_returns_go() {
        let text = "a x 1\r\nb x 2\n";
        assert_eq!(complete_line(text, "x"), Some("a x 1".to_string()));
        assert_eq!(complete_line(text, "y"), None);
    }
}
