//! `blip demo`: the README's first command. Boots the embedded guest (dirtying memory and
//! sending heartbeats) in one blip process, then live-migrates it N times between fresh local
//! `blip receive` processes over loopback TCP, printing the blackout of each hop, and finally
//! has the guest check its whole memory pattern on the last host.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blip_vmm::api::{self, Request};
use blip_vmm::cli::DemoArgs;
use blip_vmm::migration::{OnTimeout, Options, Report};

use crate::{run_migration, target_missed, target_verdict, Failure};

/// A child blip, killed if the demo ends early.
struct Blip {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
}

impl Drop for Blip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_api(b: &mut Blip) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if api::call(&b.api, &Request::Status, &mut |_| {}).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = b.child.try_wait() {
            return Err(Failure(format!("a demo blip exited early ({st})")));
        }
        if Instant::now() > deadline {
            return Err(Failure("a demo blip did not come up within 60 s".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_receiver(exe: &Path, dir: &Path, i: u32, key: &Path) -> Result<(Blip, String), Failure> {
    let api = dir.join(format!("{i}.sock"));
    let serial = dir.join(format!("{i}.serial"));
    let mut child = Command::new(exe)
        .args(["receive", "--listen", "tcp://127.0.0.1:0", "--api"])
        .arg(&api)
        .arg("--serial")
        .arg(&serial)
        .arg("--key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure(format!("cannot start blip receive: {e}")))?;
    // The receiver prints the address it listens on; the rest of its stderr goes to ours.
    let mut err = BufReader::new(child.stderr.take().ok_or(Failure("no stderr".into()))?);
    let mut line = String::new();
    let _ = err.read_line(&mut line);
    forward_lines(err, i);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("tcp://"))
        .map(str::to_string)
        .ok_or_else(|| Failure(format!("blip receive did not report its address: {line:?}")))?;
    Ok((Blip { child, api, serial }, url))
}

/// Shows a child's stderr, minus the lines the demo's own table already says.
fn forward_lines<R: BufRead + Send + 'static>(r: R, i: u32) {
    std::thread::spawn(move || {
        for l in r.lines().map_while(Result::ok) {
            if !l.contains("guest received")
                && !l.contains("guest migrated")
                && !l.contains("heartbeats:")
            {
                eprintln!("  [blip {i}] {l}");
            }
        }
    });
}

fn forward_stderr(child: &mut Child, i: u32) {
    if let Some(e) = child.stderr.take() {
        forward_lines(BufReader::new(e), i);
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
}

/// Runs the demo.
pub fn demo(a: &DemoArgs, stop: &AtomicBool) -> Result<i32, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure(format!("cannot find the blip binary: {e}")))?;
    let dir = std::env::temp_dir().join(format!("blip-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure(format!("cannot create {}: {e}", dir.display())))?;
    let cmdline = "dirty ws=8 rate=max heartbeat period=1000";
    // Migrations authenticate by default: the demo makes a fresh shared key for its hosts.
    let key = dir.join("migration.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .map_err(|e| Failure(format!("cannot create {}: {e}", key.display())))?;
        let secret: [u8; 32] =
            blip_vmm::migration::random_bytes().map_err(|e| Failure(e.to_string()))?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::io::Write::write_all(&mut f, hex.as_bytes())
            .map_err(|e| Failure(format!("cannot write the key: {e}")))?;
    }
    println!(
        "blip demo: booting the embedded guest ({} vCPUs, {} MiB, \"{cmdline}\") and migrating it {} times over loopback TCP",
        a.vcpus,
        a.mem >> 20,
        a.migrations
    );
    let api0 = dir.join("0.sock");
    let serial0 = dir.join("0.serial");
    let mut child = Command::new(&exe)
        .args([
            "run",
            "--cmdline",
            cmdline,
            "--vcpus",
            &a.vcpus.to_string(),
            "--mem",
            &a.mem.to_string(),
            "--api",
        ])
        .arg(&api0)
        .arg("--serial")
        .arg(&serial0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure(format!("cannot start blip run: {e}")))?;
    forward_stderr(&mut child, 0);
    let mut cur = Blip {
        child,
        api: api0,
        serial: serial0,
    };
    wait_for_api(&mut cur)?;
    // Let the guest warm up so it is dirtying and beating when the first migration starts.
    std::thread::sleep(Duration::from_millis(300));

    println!(
        "{:>4} | {:>12} | {:>6} | {:>8} | {:>12} | {:>12} | {:>10} | {:>9} | {:>9} | {:>9} | target",
        "hop",
        "to",
        "rounds",
        "pages",
        "blackout",
        "guest gap",
        "total",
        "pause",
        "state",
        "restore"
    );
    let mut reports: Vec<Report> = Vec::new();
    for i in 1..=a.migrations {
        if stop.load(Ordering::Relaxed) {
            return Err(Failure("interrupted".into()));
        }
        let (mut next, url) = spawn_receiver(&exe, &dir, i, &key)?;
        let options = Options {
            to: url.clone(),
            max_blackout_ns: a.max_blackout,
            streams: 1,
            max_precopy_ms: 30_000,
            on_timeout: OnTimeout::Go,
            // The guest's own check at the end proves memory; digests would add ~10 ms of
            // hashing to every blackout (`blip migrate --verify` does them).
            verify: a.verify,
            key: Some(key.clone()),
            guest_name: String::new(),
            transport: Default::default(),
            tls: None,
            precopy_nice: 0,
            max_bandwidth: 0,
        };
        let r = run_migration(&cur.api, options, &mut |_| {})?;
        if a.verify && r.verified != Some(true) {
            return Err(Failure(format!(
                "hop {i}: memory digests were not verified"
            )));
        }
        // The source exits 0 once its guest lives on elsewhere.
        let st = cur
            .child
            .wait()
            .map_err(|e| Failure(format!("wait: {e}")))?;
        if !st.success() {
            return Err(Failure(format!(
                "the source blip of hop {i} exited with {st}"
            )));
        }
        wait_for_api(&mut next)?;
        println!(
            "{:>4} | {:>12} | {:>6} | {:>8} | {:>9.1} us | {:>9} | {:>7.1} ms | {:>6.1} us | {:>6.1} us | {:>6.1} us | {}",
            i,
            url.trim_start_matches("tcp://"),
            r.round_count,
            r.pages_sent + r.final_pages,
            r.blackout_ns as f64 / 1e3,
            r.guest_blackout_ns.map_or("n/a".to_string(), |g| format!("{:.1} us", g as f64 / 1e3)),
            r.total_ns as f64 / 1e6,
            r.phases.pause as f64 / 1e3,
            r.phases.state_save as f64 / 1e3,
            r.phases.transfer_restore as f64 / 1e3,
            // A missed target is shown, not fatal: the guest moved.
            target_verdict(&r).unwrap_or_else(|| "-".into()),
        );
        for n in &r.restore_notes {
            println!("     note: {n}");
        }
        reports.push(r);
        cur = next;
    }
    let mut b: Vec<u64> = reports.iter().map(|r| r.blackout_ns).collect();
    b.sort_unstable();
    let mut g: Vec<u64> = reports.iter().filter_map(|r| r.guest_blackout_ns).collect();
    g.sort_unstable();
    let known = reports.iter().filter(|r| r.target_ns > 0).count();
    let missed = reports.iter().filter(|r| target_missed(r)).count();
    println!(
        "blip demo: VMM blackout p50 {:.1} us, max {:.1} us | guest-observed p50 {:.1} us, max {:.1} us{}",
        pct(&b, 0.5),
        pct(&b, 1.0),
        pct(&g, 0.5),
        pct(&g, 1.0),
        if known > 0 {
            format!(" | target missed on {missed} of {known} hops")
        } else {
            String::new()
        }
    );

    // The guest on the last host checks the whole memory pattern it wrote across all hops.
    api::call(&cur.api, &Request::Check, &mut |_| {})?;
    let st = cur
        .child
        .wait()
        .map_err(|e| Failure(format!("wait: {e}")))?;
    let serial = std::fs::read_to_string(&cur.serial).unwrap_or_default();
    let verdict = serial
        .lines()
        .rfind(|l| l.starts_with("check: "))
        .unwrap_or("no check output")
        .to_string();
    println!(
        "blip demo: guest's own memory check after {} migrations: {verdict}",
        a.migrations
    );
    let _ = std::fs::remove_dir_all(&dir);
    if st.success() && verdict.starts_with("check: ok") {
        Ok(0)
    } else {
        Err(Failure(format!("the guest's memory check failed ({st})")))
    }
}
