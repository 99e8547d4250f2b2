//! `qemu`: the peer in the same run. Debian's `qemu-system-x86_64` boots blip's own embedded
//! guest (`blip guest-image`) as a PVH ELF on `-M microvm` under KVM and live-migrates it over
//! loopback TCP between fresh QEMU processes, ping-pong, N times per cell, driven through QMP
//! (`migrate-set-parameters downtime-limit`, `migrate`, `query-migrate`).
//!
//! Per migration: QEMU's own `downtime` (ms, QEMU's VMM-side blackout), `total-time`,
//! `setup-time` and `ram.transferred`; and the guest-observed blackout from COM1 `*` heartbeats
//! (`heartbeat ... via=serial`) read from both QEMUs' serial pipes and timestamped here, exactly
//! as for blip's serial cell (see `beats.rs`), so the two compare like for like.
//!
//! What QEMU needs here (see [`QEMU_ARGS`]): `-M microvm` (the `pc` machine hangs under this
//! KVM), `-accel kvm`, `-cpu qemu64`, 1 vCPU (blip's guest brings its APs up without
//! INIT/SIPI, which QEMU does not emulate that way), and `isa-debug-exit` moved to blip's exit
//! port 0xf4.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::beats::{self, Beats};
use crate::migrate::Progress;
use crate::report::{hist, p50, p99, summary, us};

/// The QEMU arguments every instance gets, besides `-m`, `-kernel`, `-append`, `-qmp` and
/// `-incoming`.
pub const QEMU_ARGS: [&str; 16] = [
    "-M",
    "microvm",
    "-accel",
    "kvm",
    "-cpu",
    "qemu64",
    "-smp",
    "1",
    "-nodefaults",
    "-no-reboot",
    "-display",
    "none",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-serial",
    "stdio",
];

/// Where `qemu-system-x86_64` is on `$PATH` (`$QEMU` overrides).
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QEMU") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// One QEMU cell.
pub struct Settings {
    pub qemu: PathBuf,
    pub guest_elf: PathBuf,
    pub scratch: PathBuf,
    pub mem_mib: u64,
    pub cmdline: String,
    pub migrations: u32,
    /// QMP `downtime-limit` in ms (QEMU's minimum is 1; its default 300).
    pub downtime_limit_ms: u64,
    /// After this much pre-copy the limit is raised to QEMU's default so the migration ends
    /// (blip's `--on-timeout go` equivalent); such migrations are counted as forced.
    pub precopy_limit: Duration,
    /// Every QEMU's vCPU threads on `vcpus`, its other threads on `vmm` (as blip's pinned cells).
    pub pin: Option<crate::migrate::Pin>,
}

impl Settings {
    /// The full command line of a source instance, for the report.
    pub fn command_line(&self) -> String {
        let mut v = vec![self.qemu.display().to_string()];
        v.extend(QEMU_ARGS.iter().map(|s| s.to_string()));
        v.extend([
            "-m".into(),
            format!("{}M", self.mem_mib),
            "-kernel".into(),
            self.guest_elf.display().to_string(),
            "-append".into(),
            format!("'{}'", self.cmdline),
            "-qmp".into(),
            "unix:SOCK,server=on,wait=off".into(),
            "[-incoming tcp:127.0.0.1:PORT]".into(),
        ]);
        if self.pin.is_some() {
            v.extend(["-name".into(), "blip-bench,debug-threads=on".into()]);
        }
        v.join(" ")
    }
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU starts; hang guard 30 s), reads the greeting and enters
    /// command mode.
    fn connect(sock: &Path, child: &mut Child) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(format!("QEMU exited early ({st})"));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("no QMP on {}: {e}", sock.display()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let w = stream.try_clone().map_err(|e| format!("QMP: {e}"))?;
        let mut q = Qmp {
            r: BufReader::new(stream),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)
            .map_err(|e| format!("QMP greeting: {e}"))?;
        if !greeting.contains("QMP") {
            return Err(format!("unexpected QMP greeting {greeting:?}"));
        }
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    fn cmd(&mut self, execute: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut m = json!({ "execute": execute });
        if let Some(a) = arguments {
            m["arguments"] = a;
        }
        writeln!(self.w, "{m}").map_err(|e| format!("QMP {execute}: {e}"))?;
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .map_err(|e| format!("QMP {execute}: {e}"))?;
            if n == 0 {
                return Err(format!("QMP {execute}: connection closed"));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP {execute}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {execute}: {}", e["desc"]));
            }
        }
    }
}

/// A QEMU instance: killed when dropped.
struct Qemu {
    child: Child,
    qmp: Qmp,
    beats: Beats,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn spawn(s: &Settings, name: &str, incoming: Option<u16>) -> Result<Qemu, String> {
        let sock = s.scratch.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(&s.qemu);
        cmd.args(QEMU_ARGS)
            .arg("-m")
            .arg(format!("{}M", s.mem_mib))
            .arg("-kernel")
            .arg(&s.guest_elf)
            .arg("-append")
            .arg(&s.cmdline)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        if s.pin.is_some() {
            // Thread names, so the vCPU thread can be told apart ([`pin_threads`]).
            cmd.args(["-name", "blip-bench,debug-threads=on"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.qemu.display()))?;
        let beats = child.stdout.take().map(Beats::start).unwrap_or_default();
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                crate::migrate::place_reader();
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut g = log.lock().unwrap_or_else(|e| e.into_inner());
                    if g.len() >= 20 {
                        g.remove(0);
                    }
                    g.push(l);
                }
            });
        }
        let qmp = match Qmp::connect(&sock, &mut child) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = log.lock().unwrap_or_else(|e| e.into_inner()).join(" | ");
                return Err(format!("{e}: {tail}"));
            }
        };
        if let Some(p) = &s.pin {
            if let Err(e) = pin_threads(child.id(), p) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        Ok(Qemu {
            child,
            qmp,
            beats,
            log,
        })
    }

    fn stderr_tail(&self) -> String {
        let g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .filter(|l| !l.contains("host doesn't support requested feature"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// A free loopback TCP port (bound and released: a tiny race, fine on one host).
/// Pins QEMU's threads as blip pins its own: the vCPU threads (`CPU n/KVM`, there once QMP
/// answers) on `p.vcpus`, every other on `p.vmm`; threads QEMU starts later (its migration
/// thread) inherit the main thread's.
fn pin_threads(pid: u32, p: &crate::migrate::Pin) -> Result<(), String> {
    use blip_vmm::affinity::parse_cpu_list;
    let (vcpus, vmm) = (parse_cpu_list(&p.vcpus)?, parse_cpu_list(&p.vmm)?);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot list QEMU's threads: {e}"))?;
    let mut seen_vcpu = false;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let is_vcpu = comm.starts_with("CPU ") && comm.trim_end().ends_with("/KVM");
        seen_vcpu |= is_vcpu;
        blip_vmm::vcpu::set_thread_affinity(tid, if is_vcpu { &vcpus } else { &vmm })
            .map_err(|e| format!("cannot pin QEMU thread {tid} ({}): {e}", comm.trim()))?;
    }
    if !seen_vcpu {
        return Err("no QEMU vCPU thread (CPU n/KVM) to pin".into());
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// One migration's figures.
struct Sample {
    downtime_ns: u64,
    guest: Option<beats::Gaps>,
    split: Option<beats::Split>,
    total_ns: u64,
    setup_ns: u64,
    transferred: u64,
    forced: bool,
}

fn migrate_once(s: &Settings, src: &mut Qemu, dst: &Qemu, port: u16) -> Result<Sample, String> {
    src.qmp.cmd(
        "migrate-set-parameters",
        Some(json!({ "downtime-limit": s.downtime_limit_ms })),
    )?;
    let asked = Instant::now();
    src.qmp.cmd(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )?;
    let mut forced = false;
    let r = loop {
        let r = src.qmp.cmd("query-migrate", None)?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => {
                return Err(format!(
                    "QEMU migration {}: {}",
                    r["status"],
                    r["error-desc"].as_str().unwrap_or("")
                ))
            }
            _ => {}
        }
        let t = asked.elapsed();
        if !forced && t > s.precopy_limit {
            forced = true;
            src.qmp.cmd(
                "migrate-set-parameters",
                Some(json!({ "downtime-limit": 300 })),
            )?;
        }
        if t > s.precopy_limit + Duration::from_secs(60) {
            let _ = src.qmp.cmd("migrate_cancel", None);
            return Err("QEMU migration did not complete (hang guard)".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let completed = blip_vmm::devices::now_ns();
    dst.beats.wait_beat_after(asked, Duration::from_secs(5));
    let guest = beats::gaps(&src.beats.snapshot(), &dst.beats.snapshot(), asked);
    let split = gap_split(&src.beats, &dst.beats, asked, completed);
    let ms = |k: &str| r[k].as_u64().unwrap_or(0) * 1_000_000;
    Ok(Sample {
        downtime_ns: ms("downtime"),
        guest,
        split,
        total_ns: ms("total-time"),
        setup_ns: ms("setup-time"),
        transferred: r["ram"]["transferred"].as_u64().unwrap_or(0),
        forced,
    })
}

/// The guest gaps split as for blip (`beats::Split`). QEMU reports no resume instant: the
/// first destination beat stands for it, so (a) is the handover gap (last source beat to first
/// destination beat), and (c) counts from the first destination beat.
fn gap_split(src: &Beats, dst: &Beats, asked: Instant, completed: u64) -> Option<beats::Split> {
    std::thread::sleep(Duration::from_nanos(beats::AFTER_RESUME_NS + 2_000_000));
    let start_ns = *beats::mono_ns(&[asked]).first()?;
    let (s, d) = (
        beats::mono_ns(&src.snapshot()),
        beats::mono_ns(&dst.snapshot()),
    );
    let first_dst = *d.iter().find(|&&t| t >= start_ns)?;
    // No pause instant either: (a) is not split for QEMU.
    let w = beats::Window {
        start_ns,
        pause_ns: 0,
        resume_ns: first_dst,
        end_ns: completed.max(first_dst),
    };
    beats::split(&s, &d, &w)
}

/// The row header of QEMU cells (printed by the caller before the first cell).
pub fn header() {
    println!(
        "qemu    | {:>5} {:>7} | {:>8} {:>8} | {:>8} {:>8} | {:>8} | {:>9} | {:>6} | {:>4}",
        "mem",
        "dt-lim",
        "dt p50",
        "dt p99",
        "gst p50",
        "gst p99",
        "total",
        "MiB sent",
        "forced",
        "n"
    );
    println!(
        "        | {:>13} | {:>17} | {:>17} | {:>8} | {:>9} | {:>6} | {:>4}",
        "", "QEMU downtime (us)", "guest gap (us)", "p50 ms", "p50", "", ""
    );
}

/// Runs one QEMU cell; returns its JSON (never panics on a failed migration).
pub fn cell(s: &Settings) -> Value {
    // Off the vCPU's CPU, as in blip's pinned cells.
    let _placed = s
        .pin
        .as_ref()
        .map(|p| crate::migrate::BenchPlacement::on(&p.vmm));
    let n = s.migrations;
    let label = format!(
        "qemu {}M downtime-limit {} ms",
        s.mem_mib, s.downtime_limit_ms
    );
    let progress = Progress::new(label.clone(), n);
    let (mut downtime, mut guest, mut total, mut setup, mut sent) =
        (hist(), hist(), hist(), hist(), hist());
    let mut handover = hist();
    let mut split_h = beats::SplitHists::new();
    let mut samples = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let (mut failed, mut forced) = (0u32, 0u32);
    let started = Instant::now();
    let prefix = format!("q{}-{}", s.mem_mib, s.downtime_limit_ms);
    let result = (|| -> Result<(), String> {
        let mut src = Qemu::spawn(s, &format!("{prefix}-0"), None)?;
        // Let the guest boot and reach its steady state (dirtying, beating), as for blip.
        std::thread::sleep(Duration::from_millis(300));
        if src.beats.len() == 0 && !src.beats.wait_beat_after(started, Duration::from_secs(10)) {
            return Err(format!(
                "the guest never beat on COM1 under QEMU: {}",
                src.stderr_tail()
            ));
        }
        progress.show(0, 0);
        let (mut done, mut hop, mut in_a_row) = (0u32, 0u32, 0u32);
        while done < n {
            hop += 1;
            let port = free_port()?;
            let dst = Qemu::spawn(s, &format!("{prefix}-{hop}"), Some(port))?;
            match migrate_once(s, &mut src, &dst, port) {
                Ok(m) => {
                    downtime.saturating_record(m.downtime_ns.max(1));
                    if let Some(g) = m.guest {
                        guest.saturating_record(g.max_ns);
                        handover.saturating_record(g.handover_ns);
                    } else {
                        errors.push(format!("hop {hop}: no heartbeat on the destination's COM1"));
                    }
                    if let Some(sp) = &m.split {
                        split_h.record(sp);
                    }
                    total.saturating_record(m.total_ns.max(1));
                    setup.saturating_record(m.setup_ns.max(1));
                    sent.saturating_record(m.transferred.max(1));
                    forced += u32::from(m.forced);
                    samples.push(json!([
                        m.downtime_ns,
                        m.guest.map(|g| g.max_ns),
                        m.total_ns,
                        m.transferred,
                        m.forced,
                        m.guest.map(|g| g.handover_ns),
                        m.guest.map(|g| g.max_at_ns)
                    ]));
                    done += 1;
                    in_a_row = 0;
                    // The old source sits in "postmigrate": stop it, the destination takes over.
                    let _ = src.qmp.cmd("quit", None);
                    src = dst;
                }
                Err(e) => {
                    failed += 1;
                    in_a_row += 1;
                    errors.push(format!("hop {hop}: {e}: {}", dst.stderr_tail()));
                    if in_a_row >= 3 {
                        return Err(format!("3 migrations in a row failed, last: {e}"));
                    }
                }
            }
            progress.show(done, failed);
        }
        let _ = src.qmp.cmd("quit", None);
        Ok(())
    })();
    progress.end();
    if let Err(e) = result {
        errors.push(e);
    }
    let mib = |h: &Histogram<u64>| p50(h) as f64 / (1 << 20) as f64;
    println!(
        "qemu    | {:>4}M {:>4} ms | {:>8} {:>8} | {:>8} {:>8} | {:>8.1} | {:>9.1} | {:>6} | {:>4}{}",
        s.mem_mib,
        s.downtime_limit_ms,
        downtime_us(p50(&downtime), downtime.is_empty()),
        downtime_us(p99(&downtime), downtime.is_empty()),
        opt_us(&guest, 0.5),
        opt_us(&guest, 0.99),
        p50(&total) as f64 / 1e6,
        mib(&sent),
        forced,
        downtime.len(),
        if failed > 0 {
            format!(" ({failed} migration(s) failed)")
        } else {
            String::new()
        }
    );
    println!("{}", split_h.line(&label, beats::PERIOD_US));
    for e in errors.iter().take(5) {
        eprintln!("blip-bench: {label}: {e}");
    }
    json!({
        "mem_mib": s.mem_mib,
        "vcpus": 1,
        "workload": "dirty",
        "cmdline": s.cmdline,
        "downtime_limit_ms": s.downtime_limit_ms,
        "precopy_limit_s": s.precopy_limit.as_secs_f64(),
        "migrations_asked": n,
        "migrations_ok": downtime.len(),
        "migrations_failed": failed,
        "migrations_forced": forced,
        "errors": errors,
        "wall_s": started.elapsed().as_secs_f64(),
        "command_line": s.command_line(),
        "guest_blackout_method": "COM1 '*' beats timestamped by blip-bench (host CLOCK_MONOTONIC)",
        "histograms": {
            "downtime_ns": summary(&downtime),
            "guest_serial_blackout_ns": summary(&guest),
            "guest_serial_handover_ns": summary(&handover),
            "total_ns": summary(&total),
            "setup_ns": summary(&setup),
            "bytes_sent": summary(&sent),
        },
        "guest_gaps": split_h.json(beats::PERIOD_US),
        "downtime_resolution_ns": 1_000_000,
        "samples_columns": ["downtime_ns", "guest_serial_blackout_ns", "total_ns", "bytes_sent", "forced", "guest_serial_handover_ns", "guest_serial_max_gap_at_ns"],
        "samples": samples,
    })
}

fn opt_us(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "n/a".into()
    } else {
        format!("{:.1}", us(h.value_at_quantile(q)))
    }
}

/// Writes blip's embedded guest as a PVH ELF for QEMU (`blip guest-image FILE`).
pub fn guest_image(bin: &Path, to: &Path) -> Result<(), String> {
    let o = Command::new(bin)
        .arg("guest-image")
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run blip guest-image: {e}"))?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    let mut f = std::fs::File::open(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|e| format!("{}: {e}", to.display()))?;
    if &magic != b"\x7fELF" {
        return Err(format!("{} is not an ELF file", to.display()));
    }
    Ok(())
}

/// A QEMU downtime in µs for the table: QEMU reports whole milliseconds, so below 1 ms it
/// said 0, shown as "< 1000".
fn downtime_us(ns: u64, empty: bool) -> String {
    if empty {
        "n/a".into()
    } else if ns < 1_000_000 {
        "< 1000".into()
    } else {
        format!("{:.1}", us(ns))
    }
}
