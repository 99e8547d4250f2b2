//! `migrate`: blackout, phases and total time of live migrations between real `blip` processes
//! over loopback TCP, as a matrix of guest memory × vCPUs × workload.
//!
//! Per cell: one `blip run --api` boots the guest; then, N times, a fresh
//! `blip receive --listen tcp://127.0.0.1:0` is started, the current source is told to migrate
//! to it, and the receiver becomes the next source (ping-pong across fresh processes, as an
//! operator draining nodes would). At the end the guest checks its whole memory pattern
//! (`blip check`) and the last process must exit 0. Every report goes into hdrhistogram
//! histograms; nothing is asserted.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blip_vmm::api::Request;
use blip_vmm::migration::{OnTimeout, Options, Report};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::beats::{self, Beats};
use crate::report::{self, hist, p50, p99, summary, us, Interval};

/// What the guest of a cell does besides its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Heartbeats only.
    Idle,
    /// Rewrites `ws_mib` MiB (0 = all of memory above the guest's first 8 MiB) at `rate` pages/s per
    /// vCPU (0 = as fast as it can, [`FULL`] = the guest's `rate=full`: one store per page).
    Dirty { ws_mib: u64, rate: u32 },
}

/// `rate` of [`Load::Dirty`] for the guest's `rate=full` (`dirty:WS:full`): a tight loop with
/// one store per page, the host's top dirtying speed.
pub const FULL: u32 = u32::MAX;

impl std::str::FromStr for Load {
    type Err = String;
    /// `idle`, `dirty` (16 MiB at full speed), or `dirty:WS:RATE` with WS in MiB or `all` and
    /// RATE in pages/s, `max` or `full` (e.g. `dirty:4:2000`, `dirty:all:max`, `dirty:16:full`).
    fn from_str(v: &str) -> Result<Load, String> {
        let bad = || {
            format!("workload '{v}': use idle, dirty or dirty:WS:RATE (WS MiB or all, RATE pages/s, max or full)")
        };
        match v {
            "idle" => return Ok(Load::Idle),
            "dirty" => {
                return Ok(Load::Dirty {
                    ws_mib: 16,
                    rate: 0,
                })
            }
            _ => {}
        }
        let mut it = v.split(':');
        if it.next() != Some("dirty") {
            return Err(bad());
        }
        let ws_mib = match it.next().ok_or_else(bad)? {
            "all" => 0,
            n => n.parse().map_err(|_| bad())?,
        };
        let rate = match it.next().ok_or_else(bad)? {
            "max" => 0,
            "full" => FULL,
            n => n.parse().map_err(|_| bad())?,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(Load::Dirty { ws_mib, rate })
    }
}

/// A dirty rate as the guest's cmdline and the cell names say it: `max` for 0, else the
/// pages/s followed by `unit`.
fn rate_word(rate: u32, unit: &str) -> String {
    if rate == 0 {
        "max".to_string()
    } else if rate == FULL {
        "full".to_string()
    } else {
        format!("{rate}{unit}")
    }
}

/// One cell of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub mem_mib: u64,
    pub vcpus: u32,
    pub load: Load,
    /// Dirty tracker of every blip in the cell (`ring` or `bitmap`).
    pub bitmap: bool,
    /// Blackout target handed to each migration, in microseconds.
    pub target_us: u64,
    /// RDMA cell: every blip of the cell listens on `rdma://` at this address (on an RDMA
    /// port); `None` = loopback TCP.
    pub rdma: Option<std::net::IpAddr>,
    /// Heartbeats as `*` on COM1 (`via=serial`), timestamped on the host from blip's serial
    /// pipe: the guest-observed blackout measured exactly as for the QEMU peer.
    pub serial: bool,
    /// `--platform pc` (in-kernel irqchip, PIT, kvmclock state: what a stock kernel needs)
    /// instead of the irqchip-less fast path: the state a real guest adds to the blackout.
    pub pc: bool,
    /// Every blip of the cell runs with `--pin-vcpus` and `--pin-vmm` ([`Pin::of`]: the vCPUs
    /// alone on their host CPUs, every other thread on the rest); false: threads go where the
    /// kernel puts them.
    pub pin: bool,
}

/// The CPUs the bench's reader threads (serial beats, child stderr) run on while a pinned cell
/// runs; empty: anywhere. Only the readers: threads inherit their starter's CPUs, so a pinned
/// main thread would start every blip and QEMU confined to them.
static READER_CPUS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The bench's reader threads held on some CPUs while this lives ([`place_reader`]).
pub struct BenchPlacement;

impl BenchPlacement {
    pub fn on(cpus: &str) -> BenchPlacement {
        *READER_CPUS.lock().unwrap_or_else(|e| e.into_inner()) =
            blip_vmm::affinity::parse_cpu_list(cpus).unwrap_or_default();
        BenchPlacement
    }
}

impl Drop for BenchPlacement {
    fn drop(&mut self) {
        READER_CPUS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Called first by each reader thread: in a pinned cell it runs with the VMMs' threads, off
/// the vCPUs' CPUs (a serial-beat reader wakes with every beat).
pub fn place_reader() {
    let cpus = READER_CPUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if !cpus.is_empty() {
        let _ = blip_vmm::vcpu::set_thread_affinity(0, &cpus);
    }
}

/// The host CPUs of a pinned cell (cpulists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub vcpus: String,
    pub vmm: String,
}

impl Pin {
    /// `vcpus` vCPUs on the first of `allowed`, the VMM's threads on the rest; `None` when no
    /// CPU would be left for them.
    pub fn split(allowed: &[usize], vcpus: u32) -> Option<Pin> {
        let v = vcpus as usize;
        (allowed.len() > v).then(|| Pin {
            vcpus: blip_vmm::affinity::format_cpu_list(&allowed[..v]),
            vmm: blip_vmm::affinity::format_cpu_list(&allowed[v..]),
        })
    }

    /// The placement of cell `c` on this host (`None` for an unpinned cell).
    pub fn of(c: &Cell) -> Option<Pin> {
        if !c.pin {
            return None;
        }
        Pin::split(&blip_vmm::vcpu::allowed_cpus().unwrap_or_default(), c.vcpus)
    }

    /// blip's arguments for cell `c`.
    fn args(c: &Cell) -> Vec<String> {
        match Pin::of(c) {
            Some(p) => vec!["--pin-vcpus".into(), p.vcpus, "--pin-vmm".into(), p.vmm],
            None => Vec::new(),
        }
    }
}

impl Cell {
    /// The usual cell: ring tracker, 1 ms target, heartbeats through the port.
    pub fn new(mem_mib: u64, vcpus: u32, load: Load) -> Cell {
        Cell {
            mem_mib,
            vcpus,
            load,
            bitmap: false,
            target_us: 1000,
            rdma: None,
            serial: false,
            pc: false,
            pin: false,
        }
    }

    fn ws_mib(&self) -> u64 {
        match self.load {
            Load::Idle => 0,
            // The guest's working set starts at 8 MiB (below: its image, stacks, page tables).
            Load::Dirty { ws_mib: 0, .. } => self.mem_mib.saturating_sub(8).max(1),
            Load::Dirty { ws_mib, .. } => ws_mib.min(self.mem_mib.saturating_sub(8).max(1)),
        }
    }

    fn load(&self) -> String {
        match self.load {
            Load::Idle => "idle".into(),
            Load::Dirty { rate, .. } => {
                format!("dirty {}M@{}", self.ws_mib(), rate_word(rate, "pps"))
            }
        }
    }

    pub fn cmdline(&self) -> String {
        let load = match self.load {
            Load::Idle => format!("heartbeat period={}", beats::PERIOD_US),
            Load::Dirty { rate, .. } => {
                let rate = rate_word(rate, "");
                format!(
                    "dirty ws={} rate={rate} heartbeat period={}",
                    self.ws_mib(),
                    beats::PERIOD_US
                )
            }
        };
        if self.serial {
            format!("{load} via=serial")
        } else {
            load
        }
    }

    fn tracker(&self) -> &'static str {
        if self.bitmap {
            "bitmap"
        } else {
            "ring"
        }
    }

    fn platform(&self) -> &'static str {
        if self.pc {
            "pc"
        } else {
            "minimal"
        }
    }

    fn extras(&self) -> String {
        let mut x = String::new();
        if self.rdma.is_some() {
            x.push_str(" rdma");
        }
        if self.bitmap {
            x.push_str(" bitmap");
        }
        if self.pc {
            x.push_str(" pc");
        }
        if self.pin {
            x.push_str(" pinned");
        }
        if self.target_us != 1000 {
            x.push_str(&format!(" target={}us", self.target_us));
        }
        if self.serial {
            x.push_str(" serial-beats");
        }
        x
    }

    /// The workload and what sets the cell apart (the table's load column).
    pub fn label(&self) -> String {
        format!("{}{}", self.load(), self.extras())
    }

    fn name(&self) -> String {
        format!(
            "{}M {}vcpu {}{}",
            self.mem_mib,
            self.vcpus,
            self.load(),
            self.extras()
        )
    }

    fn file_stem(&self) -> String {
        let stem = format!(
            "migrate-{}M-{}vcpu-{}{}",
            self.mem_mib,
            self.vcpus,
            self.load(),
            self.extras()
        );
        stem.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }
}

/// How the bench asks the source to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Speak the control-socket protocol (`blip migrate`'s own) and stop reading at the final
    /// `done` event.
    Api,
    /// Spawn `blip migrate --api SOCK --to URL --json` and parse its stdout. The CLI returns
    /// only when the source closes the control connection (i.e. exits).
    Cli,
}

/// Settings shared by every cell.
#[derive(Clone)]
pub struct Settings {
    pub bin: PathBuf,
    pub scratch: PathBuf,
    pub out: PathBuf,
    pub migrations: u32,
    pub max_blackout_ns: u64,
    /// `--max-precopy-time` of every migration (then `go`): a target the machine cannot meet
    /// holds pre-copy open this long, so `--quick` keeps it short.
    pub max_precopy_ms: u64,
    pub via: Via,
    /// `--precopy-nice` of every migration.
    pub precopy_nice: u8,
    /// Width of the table's load column ([`label_width`] of the cells to come).
    pub label_width: usize,
}

/// A child blip whose stderr is collected (last lines kept for error messages); killed when
/// dropped.
struct Proc {
    child: Child,
    api: PathBuf,
    name: String,
    log: Arc<Mutex<Vec<String>>>,
    /// COM1 heartbeats, when the serial line is piped to us.
    beats: Option<Beats>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
        serial: bool,
    ) -> Result<(Proc, Receiver<String>), String> {
        let api = dir.join(format!("{name}.sock"));
        let mut child = Command::new(bin)
            .args(args)
            .arg("--api")
            .arg(&api)
            .args(["--serial", if serial { "stdout" } else { "none" }])
            .stdin(Stdio::null())
            .stdout(if serial {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let beats = child.stdout.take().map(Beats::start);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                place_reader();
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = tx.send(l.clone());
                    let mut g = log.lock().unwrap_or_else(|e| e.into_inner());
                    if g.len() >= 50 {
                        g.remove(0);
                    }
                    g.push(l);
                }
            });
        }
        Ok((
            Proc {
                child,
                api,
                name: name.to_string(),
                log,
                beats,
            },
            rx,
        ))
    }

    fn stderr_tail(&self) -> String {
        let g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .rev()
            .take(3)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Waits until the control API answers (hang guard, not a timing).
    fn wait_api(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if blip_vmm::api::call(&self.api, &Request::Status, &mut |_| {}).is_ok() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited early ({st}): {}",
                    self.name,
                    self.stderr_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not answer within 60 s", self.name));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit code (hang guard `limit`; killed after it).
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = self.child.kill();
                    return None;
                }
            }
        }
    }
}

/// The shared migration key the bench's hosts use (authentication is on by default; its cost
/// is in the handshake, not in the blackout).
fn key_file(s: &Settings) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let k = s.scratch.join("migration.key");
    if !k.exists() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&k)
            .map_err(|e| format!("cannot create {}: {e}", k.display()))?;
        let secret: [u8; 32] = blip_vmm::migration::random_bytes().map_err(|e| e.to_string())?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::io::Write::write_all(&mut f, hex.as_bytes())
            .map_err(|e| format!("cannot write the key: {e}"))?;
    }
    Ok(k)
}

fn spawn_receiver(s: &Settings, name: &str, c: &Cell) -> Result<(Proc, String), String> {
    let key = key_file(s)?;
    let key = key.to_str().ok_or("non-UTF-8 scratch path")?;
    let listen = match c.rdma {
        Some(ip) => format!("rdma://{}", std::net::SocketAddr::new(ip, 0)),
        None => "tcp://127.0.0.1:0".to_string(),
    };
    let nice = s.precopy_nice.to_string();
    let pin = Pin::args(c);
    let mut args = vec![
        "receive",
        "--listen",
        &listen,
        "--key",
        key,
        "--dirty-tracking",
        c.tracker(),
        "--precopy-nice",
        &nice,
    ];
    args.extend(pin.iter().map(String::as_str));
    let (p, lines) = Proc::spawn(&s.bin, &s.scratch, name, &args, c.serial)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("waiting for an incoming migration on ") => {
                let url = l
                    .split_whitespace()
                    .find(|w| w.starts_with("tcp://") || w.starts_with("rdma://"))
                    .map(str::to_string)
                    .ok_or_else(|| format!("no URL in {l:?}"))?;
                return Ok((p, url));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "blip receive never said where it listens: {}",
                    p.stderr_tail()
                ))
            }
        }
    }
}

fn migrate_once(s: &Settings, src: &Proc, url: &str) -> Result<Report, String> {
    let options = Options {
        to: url.to_string(),
        max_blackout_ns: s.max_blackout_ns,
        streams: 1,
        max_precopy_ms: s.max_precopy_ms,
        on_timeout: OnTimeout::Go,
        // The guest's own check at the end of the cell proves memory; digests would add
        // hashing to every blackout.
        verify: false,
        key: Some(key_file(s)?),
        guest_name: String::new(),
        transport: Default::default(),
        tls: None,
        precopy_nice: s.precopy_nice,
        max_bandwidth: 0,
    };
    match s.via {
        Via::Api => {
            let mut conn = UnixStream::connect(&src.api)
                .map_err(|e| format!("cannot reach {}: {e}", src.api.display()))?;
            // Hang guard only: a migration that stays silent this long has failed.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
            let req =
                serde_json::to_string(&Request::Migrate { options }).map_err(|e| e.to_string())?;
            writeln!(conn, "{req}").map_err(|e| format!("control socket: {e}"))?;
            for line in BufReader::new(conn).lines() {
                let line = line.map_err(|e| format!("control socket: {e}"))?;
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| format!("bad reply: {e}"))?;
                match v["event"].as_str() {
                    // The guest moved: a sample, whether or not it met its target
                    // (`report.target_met`; the CLI says the same with exit code 5).
                    Some("done") => {
                        return serde_json::from_value(v["report"].clone())
                            .map_err(|e| format!("unreadable report: {e}"))
                    }
                    Some("error") => {
                        return Err(v["message"].as_str().unwrap_or("failed").to_string())
                    }
                    _ => {}
                }
            }
            Err("the source closed the control connection without a result".into())
        }
        Via::Cli => {
            let o = Command::new(&s.bin)
                .arg("migrate")
                .arg("--api")
                .arg(&src.api)
                .args(["--to", url, "--json", "--key"])
                .arg(key_file(s)?)
                .arg("--max-blackout")
                .arg(format!("{}ns", s.max_blackout_ns))
                .arg("--max-precopy-time")
                .arg(format!("{}ms", s.max_precopy_ms))
                .arg("--precopy-nice")
                .arg(s.precopy_nice.to_string())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run blip migrate: {e}"))?;
            // 5: the guest moved but the blackout target was missed; still a sample.
            if !matches!(o.status.code(), Some(0 | 5)) {
                return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
            }
            serde_json::from_slice(&o.stdout).map_err(|e| format!("unreadable report: {e}"))
        }
    }
}

/// How the controller's blackout prediction and the blackout target fared in one cell.
///
/// Per migration: `predicted_blackout_ns / blackout_ns` (1 = exact, 2 = predicted twice the
/// actual blackout, 0.5 = half of it) and whether the report says its target was met.
#[derive(Default)]
struct Prediction {
    /// predicted / actual, of each migration whose report has a nonzero blackout.
    ratios: Vec<f64>,
    /// Migrations whose report names a target (`target_ns` > 0).
    with_target: u32,
    /// Of those, the ones whose report says `target_met`.
    met: u32,
}

/// predicted / actual blackout; None when the actual blackout is 0 (nothing to compare to).
fn pred_ratio(predicted_ns: u64, actual_ns: u64) -> Option<f64> {
    (actual_ns > 0).then(|| predicted_ns as f64 / actual_ns as f64)
}

/// How far a ratio is from 1, either way: max(r, 1/r) (infinite for a prediction of 0).
fn off_by(r: f64) -> f64 {
    if r > 0.0 {
        r.max(1.0 / r)
    } else {
        f64::INFINITY
    }
}

/// A ratio for the table: two decimals (below 0.01 in scientific notation, so a far-off
/// prediction does not read as "0.00"), "n/a" when absent, "inf" when not finite.
fn ratio_cell(r: Option<f64>) -> String {
    match r {
        Some(r) if r > 0.0 && r < 0.01 => format!("{r:.1e}"),
        Some(r) if r.is_finite() && r >= 100.0 => format!("{r:.0}"),
        Some(r) if r.is_finite() => format!("{r:.2}"),
        Some(_) => "inf".into(),
        None => "n/a".into(),
    }
}

impl Prediction {
    fn record(&mut self, r: &Report) {
        if let Some(x) = pred_ratio(r.predicted_blackout_ns, r.blackout_ns) {
            self.ratios.push(x);
        }
        if r.target_ns > 0 {
            self.with_target += 1;
            if r.target_met {
                self.met += 1;
            }
        }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.ratios.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The ratio at quantile `q` (nearest rank, as hdrhistogram's `value_at_quantile`).
    fn quantile(&self, q: f64) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }

    /// The ratio farthest from 1 either way (its direction kept: 0.40 or 2.50).
    fn worst(&self) -> Option<f64> {
        self.ratios
            .iter()
            .copied()
            .max_by(|a, b| off_by(*a).total_cmp(&off_by(*b)))
    }

    /// "met 5/5", "met 3/5", or "n/a" when no report named a target.
    fn met_cell(&self) -> String {
        if self.with_target == 0 {
            "n/a".into()
        } else {
            format!("met {}/{}", self.met, self.with_target)
        }
    }

    fn json(&self) -> Value {
        let v = self.sorted();
        let within_2x = v.iter().filter(|&&r| off_by(r) <= 2.0).count();
        json!({
            "what": "predicted_blackout_ns / blackout_ns per migration (1 = exact)",
            "n": v.len(),
            "p50": self.quantile(0.5),
            "min": v.first(),
            "max": v.last(),
            "worst": self.worst(),
            // max(r, 1/r) of the worst; null when a prediction was 0 (infinitely off).
            "worst_factor": self.worst().map(off_by).filter(|f| f.is_finite()),
            "within_2x": within_2x,
        })
    }
}

/// Histograms of one cell (ns unless named otherwise).
struct Hists {
    blackout: Histogram<u64>,
    guest: Histogram<u64>,
    /// Guest-observed blackout from COM1 `*` beats (serial cells only).
    guest_serial: Histogram<u64>,
    /// Of which: last source beat to first destination beat.
    guest_handover: Histogram<u64>,
    pause: Histogram<u64>,
    final_harvest: Histogram<u64>,
    final_pages: Histogram<u64>,
    state_save: Histogram<u64>,
    transfer_restore: Histogram<u64>,
    resume: Histogram<u64>,
    verify: Histogram<u64>,
    /// Blackout not covered by any phase (blackout minus the phase sum).
    other: Histogram<u64>,
    total: Histogram<u64>,
    /// Migrate request to the guest running on the destination: pre-copy, the last live round
    /// and the blackout (`total` also waits for the destination's first heartbeat report).
    to_resume: Histogram<u64>,
    precopy: Histogram<u64>,
    rounds: Histogram<u64>,
    bytes: Histogram<u64>,
    pages: Histogram<u64>,
    final_page_count: Histogram<u64>,
    /// Final pages' bytes over the final-pages phase, bytes per second.
    final_bw: Histogram<u64>,
}

impl Hists {
    fn new() -> Self {
        Hists {
            blackout: hist(),
            guest: hist(),
            guest_serial: hist(),
            guest_handover: hist(),
            pause: hist(),
            final_harvest: hist(),
            final_pages: hist(),
            state_save: hist(),
            transfer_restore: hist(),
            resume: hist(),
            verify: hist(),
            other: hist(),
            total: hist(),
            to_resume: hist(),
            precopy: hist(),
            rounds: hist(),
            bytes: hist(),
            pages: hist(),
            final_page_count: hist(),
            final_bw: hist(),
        }
    }

    fn record(&mut self, r: &Report) {
        let p = &r.phases;
        self.blackout.saturating_record(r.blackout_ns);
        if let Some(g) = r.guest_blackout_ns {
            self.guest.saturating_record(g);
        }
        self.pause.saturating_record(p.pause);
        self.final_harvest.saturating_record(p.final_harvest);
        self.final_pages.saturating_record(p.final_pages);
        self.state_save.saturating_record(p.state_save);
        self.transfer_restore.saturating_record(p.transfer_restore);
        self.resume.saturating_record(p.resume);
        self.verify.saturating_record(p.verify);
        let sum = p.pause
            + p.final_harvest
            + p.final_pages
            + p.state_save
            + p.transfer_restore
            + p.resume
            + p.verify;
        self.other
            .saturating_record(r.blackout_ns.saturating_sub(sum));
        self.total.saturating_record(r.total_ns);
        self.to_resume
            .saturating_record(r.precopy_ns + r.last_live_ns + r.blackout_ns);
        self.precopy.saturating_record(r.precopy_ns);
        self.rounds.saturating_record(u64::from(r.round_count));
        self.bytes.saturating_record(r.bytes_sent);
        self.pages.saturating_record(r.pages_sent + r.final_pages);
        self.final_page_count.saturating_record(r.final_pages);
        if r.final_pages > 0 && p.final_pages > 0 {
            self.final_bw
                .saturating_record(r.final_pages * 4096 * 1_000_000_000 / p.final_pages);
        }
    }

    fn json(&self) -> Value {
        json!({
            "vmm_blackout_ns": summary(&self.blackout),
            "guest_blackout_ns": summary(&self.guest),
            "guest_serial_blackout_ns": summary(&self.guest_serial),
            "guest_serial_handover_ns": summary(&self.guest_handover),
            "phases_ns": {
                "pause": summary(&self.pause),
                "final_harvest": summary(&self.final_harvest),
                "final_pages": summary(&self.final_pages),
                "state_save": summary(&self.state_save),
                "transfer_restore": summary(&self.transfer_restore),
                "resume": summary(&self.resume),
                "verify": summary(&self.verify),
                "unaccounted": summary(&self.other),
            },
            "total_ns": summary(&self.total),
            "to_resume_ns": summary(&self.to_resume),
            "precopy_ns": summary(&self.precopy),
            "rounds": summary(&self.rounds),
            "bytes_sent": summary(&self.bytes),
            "pages_sent_incl_final": summary(&self.pages),
            "final_pages": summary(&self.final_page_count),
            "final_pages_bytes_per_s": summary(&self.final_bw),
        })
    }
}

/// The table header.
pub fn header(label_width: usize) {
    let (line1, line2) = header_lines(label_width);
    println!("{line1}");
    println!("{line2}");
}

/// The column groups of a row: (group title, [(column, width)]); the row format in [`cell`]
/// uses the same widths.
fn columns(label_width: usize) -> Vec<(&'static str, Vec<(&'static str, usize)>)> {
    vec![
        ("", vec![("mem", 5), ("vcpu", 4), ("load", label_width)]),
        (
            "VMM blackout (us)",
            vec![("bo p50", 8), ("bo p99", 8), ("bo max", 8)],
        ),
        ("bo / floor", vec![("p50", 5), ("p99", 5)]),
        ("guest gap (us)", vec![("gst p50", 8), ("gst p99", 8)]),
        (
            "phase p50 (us)",
            vec![
                ("pause", 6),
                ("harv", 6),
                ("pages", 7),
                ("save", 6),
                ("xfer+rst", 8),
                ("resume", 6),
                ("other", 6),
            ],
        ),
        ("p50 ms", vec![("total", 8)]),
        ("p50", vec![("rounds", 6)]),
        ("", vec![("n", 4)]),
        (
            "predicted / VMM bo",
            vec![("pred/actual p50", 15), ("worst", 6)],
        ),
        ("", vec![("target met", 11)]),
    ]
}

/// The two header lines: column names, then each group's title over its columns.
fn header_lines(label_width: usize) -> (String, String) {
    let (mut l1, mut l2) = ("migrate |".to_string(), "        |".to_string());
    for (title, cols) in columns(label_width) {
        let names: Vec<String> = cols.iter().map(|(n, w)| format!("{n:>w$}")).collect();
        let names = names.join(" ");
        l2.push_str(&format!(" {title:>w$} |", w = names.len()));
        l1.push_str(&format!(" {names} |"));
    }
    l1.push_str(" memory check");
    (l1, l2)
}

/// The load column's width: the longest cell label (workload and extras), at least 5.
pub fn label_width<'a>(cells: impl IntoIterator<Item = &'a Cell>) -> usize {
    cells
        .into_iter()
        .map(|c| c.label().len())
        .max()
        .unwrap_or(0)
        .max(5)
}

/// A one-line progress bar on stderr (redrawn in place on a terminal, a line per tenth
/// otherwise).
pub struct Progress {
    tty: bool,
    label: String,
    n: u32,
}

impl Progress {
    /// `label` is e.g. "migrate 64M 1vcpu dirty".
    pub fn new(label: String, n: u32) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            label,
            n,
        }
    }

    pub fn show(&self, done: u32, failed: u32) {
        let fail = if failed > 0 {
            format!(" ({failed} failed)")
        } else {
            String::new()
        };
        let width = 30usize;
        let filled = (done as usize * width) / (self.n.max(1) as usize);
        let bar = format!(
            "[{}{}]",
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width))
        );
        let line = format!("{} {bar} {done}/{}{fail}", self.label, self.n);
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else if done == 0 || done == self.n || done % (self.n / 10).max(1) == 0 {
            eprintln!("{line}");
        }
    }

    pub fn end(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Runs one cell; returns its JSON (never panics on a failed migration or check).
pub fn cell(s: &Settings, c: Cell, index: usize, floor: Option<&crate::floor::Floor>) -> Value {
    // In a pinned cell the bench's readers are more "other threads" on this host.
    let _placed = Pin::of(&c).map(|p| BenchPlacement::on(&p.vmm));
    let s = &Settings {
        max_blackout_ns: c.target_us * 1000,
        ..s.clone()
    };
    let n = s.migrations;
    let mut h = Hists::new();
    let mut split_h = beats::SplitHists::new();
    let mut pred = Prediction::default();
    let mut errors: Vec<String> = Vec::new();
    let mut samples: Vec<Value> = Vec::new();
    let mut intervals: Vec<Interval> = Vec::new();
    let base = SystemTime::now();
    let t_base = Instant::now();
    let progress = Progress::new(format!("migrate {}", c.name()), n);
    let started = Instant::now();
    let result = (|| -> Result<(String, u32, u32), String> {
        let prefix = format!("c{index}");
        let (vcpus, mem, cmdline) = (c.vcpus.to_string(), format!("{}M", c.mem_mib), c.cmdline());
        let pin = Pin::args(&c);
        let mut args = vec![
            "run",
            "--vcpus",
            &vcpus,
            "--mem",
            &mem,
            "--cmdline",
            &cmdline,
            "--dirty-tracking",
            c.tracker(),
            "--platform",
            c.platform(),
        ];
        args.extend(pin.iter().map(String::as_str));
        let (mut src, _) =
            Proc::spawn(&s.bin, &s.scratch, &format!("{prefix}-0"), &args, c.serial)?;
        src.wait_api()?;
        // Let the guest boot and reach its steady state (dirtying, beating).
        std::thread::sleep(Duration::from_millis(300));
        let mut retiring: Vec<Proc> = Vec::new();
        let mut source_exit_failures = 0u32;
        let (mut done, mut failed, mut in_a_row) = (0u32, 0u32, 0u32);
        let chunk = (n / 10).max(1);
        let (mut ch_vmm, mut ch_guest, mut ch_start) = (hist(), hist(), t_base.elapsed());
        progress.show(0, 0);
        let mut hop = 0u32;
        while done < n {
            hop += 1;
            let (rx, url) = spawn_receiver(s, &format!("{prefix}-{hop}"), &c)?;
            let asked = Instant::now();
            match migrate_once(s, &src, &url) {
                Ok(r) => {
                    // A report whose target was missed is a sample like any other.
                    h.record(&r);
                    pred.record(&r);
                    let serial_gap = match (&src.beats, &rx.beats) {
                        (Some(sb), Some(db)) => {
                            db.wait_beat_after(asked, Duration::from_secs(5));
                            beats::gaps(&sb.snapshot(), &db.snapshot(), asked)
                        }
                        _ => None,
                    };
                    if let Some(g) = serial_gap {
                        h.guest_serial.saturating_record(g.max_ns);
                        h.guest_handover.saturating_record(g.handover_ns);
                    } else if c.serial {
                        errors.push(format!("hop {hop}: no heartbeat on the destination's COM1"));
                    }
                    if let Some(sp) = gap_split(&r, &src, &rx) {
                        split_h.record(&sp);
                    }
                    ch_vmm.saturating_record(r.blackout_ns);
                    if let Some(g) = r.guest_blackout_ns {
                        ch_guest.saturating_record(g);
                    }
                    samples.push(json!([
                        r.blackout_ns,
                        r.guest_blackout_ns,
                        serial_gap.map(|g| g.max_ns),
                        r.total_ns,
                        r.round_count,
                        r.bytes_sent,
                        serial_gap.map(|g| g.handover_ns),
                        serial_gap.map(|g| g.max_at_ns),
                        r.predicted_blackout_ns,
                        pred_ratio(r.predicted_blackout_ns, r.blackout_ns),
                        r.target_ns,
                        r.target_met
                    ]));
                    done += 1;
                    in_a_row = 0;
                    // The old source exits by itself once its guest lives on elsewhere; it is
                    // reaped later so its shutdown does not delay the next hop.
                    retiring.push(std::mem::replace(&mut src, rx));
                    if done % chunk == 0 || done == n {
                        let now = t_base.elapsed();
                        for (tag, hh) in [
                            ("vmm_blackout", &mut ch_vmm),
                            ("guest_blackout", &mut ch_guest),
                        ] {
                            intervals.push(Interval {
                                start: ch_start,
                                duration: now - ch_start,
                                tag,
                                hist: std::mem::replace(hh, hist()),
                            });
                        }
                        ch_start = now;
                    }
                }
                Err(e) => {
                    failed += 1;
                    in_a_row += 1;
                    errors.push(format!("hop {hop}: {e}"));
                    drop(rx);
                    if in_a_row >= 3 {
                        return Err(format!("3 migrations in a row failed, last: {e}"));
                    }
                }
            }
            // Reap the sources that have exited.
            retiring.retain_mut(|p| match p.child.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() {
                        source_exit_failures += 1;
                        errors.push(format!("{} exited with {st}: {}", p.name, p.stderr_tail()));
                    }
                    false
                }
                _ => true,
            });
            progress.show(done, failed);
        }
        progress.end();
        // The guest checks its whole memory pattern; a pass powers it off (exit 0).
        let check = Command::new(&s.bin)
            .arg("check")
            .arg("--api")
            .arg(&src.api)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run blip check: {e}"))?;
        let verdict = if !check.status.success() {
            format!(
                "FAILED (blip check: {})",
                String::from_utf8_lossy(&check.stderr).trim()
            )
        } else {
            match src.wait_exit(Duration::from_secs(120)) {
                Some(0) => "ok".to_string(),
                Some(code) => format!("FAILED (exit {code})"),
                None => "FAILED (no exit within 120 s)".to_string(),
            }
        };
        for mut p in retiring {
            match p.wait_exit(Duration::from_secs(30)) {
                Some(0) => {}
                other => {
                    source_exit_failures += 1;
                    errors.push(format!("{} ended with {other:?}", p.name));
                }
            }
        }
        Ok((verdict, failed, source_exit_failures))
    })();
    progress.end();
    let (verdict, failed, source_exit_failures) = match result {
        Ok(v) => v,
        Err(e) => {
            errors.push(e.clone());
            (format!("FAILED ({e})"), errors.len() as u32, 0)
        }
    };
    let wall = started.elapsed();
    let hlog = s.out.join(format!("{}.hlog", c.file_stem()));
    let hlog_written = report::write_hlog(
        &hlog,
        &format!(
            "blip-bench migrate {}: blackout per migration, tags vmm_blackout and guest_blackout",
            c.name()
        ),
        base,
        &intervals,
    );
    if let Err(e) = &hlog_written {
        eprintln!("blip-bench: cannot write {}: {e}", hlog.display());
    }
    // Serial cells have no heartbeat-port figure: show the serial one in its place.
    let gst = if c.serial { &h.guest_serial } else { &h.guest };
    let check_short = if verdict == "ok" { "ok" } else { "FAILED" };
    println!(
        "migrate | {:>4}M {:>4} {:>lw$} | {:>8} {:>8} {:>8} | {:>5} {:>5} | {:>8} {:>8} | {:>6} {:>6} {:>7} {:>6} {:>8} {:>6} {:>6} | {:>8} | {:>6} | {:>4} | {:>15} {:>6} | {:>11} | memory check {check_short}{}",
        c.mem_mib,
        c.vcpus,
        c.label(),
        fit(us(p50(&h.blackout)), 8),
        fit(us(p99(&h.blackout)), 8),
        fit(us(h.blackout.max()), 8),
        floor_ratio(p50(&h.blackout), floor.map(|f| f.p50())),
        floor_ratio(p99(&h.blackout), floor.map(|f| f.p99())),
        opt_us(gst, 0.5),
        opt_us(gst, 0.99),
        fit(us(p50(&h.pause)), 6),
        fit(us(p50(&h.final_harvest)), 6),
        fit(us(p50(&h.final_pages)), 7),
        fit(us(p50(&h.state_save)), 6),
        fit(us(p50(&h.transfer_restore)), 8),
        fit(us(p50(&h.resume)), 6),
        fit(us(p50(&h.other)), 6),
        fit(p50(&h.total) as f64 / 1e6, 8),
        p50(&h.rounds),
        h.blackout.len(),
        ratio_cell(pred.quantile(0.5)),
        ratio_cell(pred.worst()),
        pred.met_cell(),
        if failed > 0 {
            format!(" ({failed} migration(s) failed)")
        } else {
            String::new()
        },
        lw = s.label_width,
    );
    println!("{}", split_h.line(&c.name(), beats::PERIOD_US));
    if verdict != "ok" {
        eprintln!("blip-bench: migrate {}: memory check {verdict}", c.name());
    }
    for e in errors.iter().take(5) {
        eprintln!("blip-bench: migrate {}: {e}", c.name());
    }
    json!({
        "mem_mib": c.mem_mib,
        "vcpus": c.vcpus,
        "workload": c.load(),
        "cmdline": c.cmdline(),
        "dirty_tracking": c.tracker(),
        "platform": c.platform(),
        "pinned": Pin::of(&c).map(|p| json!({"vcpus": p.vcpus, "vmm": p.vmm})),
        "transport": if c.rdma.is_some() { "rdma" } else { "tcp" },
        "target_us": c.target_us,
        "guest_blackout_method": if c.serial { "COM1 '*' beats timestamped by blip-bench (host CLOCK_MONOTONIC)" } else { "heartbeat port, timestamped by blip" },
        "max_blackout_ns": s.max_blackout_ns,
        "migrations_asked": n,
        "migrations_ok": h.blackout.len(),
        "migrations_failed": failed,
        "source_exit_failures": source_exit_failures,
        "memory_check": verdict,
        "errors": errors,
        "wall_s": wall.as_secs_f64(),
        "hlog": hlog_written.ok().map(|_| hlog.display().to_string()),
        "histograms": h.json(),
        "floor_ns": floor.map(|f| json!({"p50": f.p50(), "p99": f.p99()})),
        "blackout_over_floor": floor.map(|f| json!({
            "p50": ratio(p50(&h.blackout), f.p50()),
            "p99": ratio(p99(&h.blackout), f.p99()),
        })),
        "guest_gaps": split_h.json(beats::PERIOD_US),
        "prediction_ratio": pred.json(),
        "migrations_target_met": pred.met,
        "migrations_target_missed": pred.with_target - pred.met,
        "samples_columns": ["blackout_ns", "guest_blackout_ns", "guest_serial_blackout_ns", "total_ns", "round_count", "bytes_sent", "guest_serial_handover_ns", "guest_serial_max_gap_at_ns", "predicted_blackout_ns", "predicted_over_actual", "target_ns", "target_met"],
        "samples": samples,
    })
}

/// `a / b`, `None` when either is 0 (nothing measured).
pub fn ratio(a: u64, b: u64) -> Option<f64> {
    (a > 0 && b > 0).then(|| a as f64 / b as f64)
}

/// Blackout ÷ floor for the table ("-" without a floor).
pub fn floor_ratio(blackout: u64, floor: Option<u64>) -> String {
    match floor.and_then(|f| ratio(blackout, f)) {
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) if r >= 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.2}"),
        None => "-".into(),
    }
}

/// One migration's guest-observed gaps split around its blackout (`beats::Split`): serial
/// cells from both COM1 timelines, port cells from the report and the destination's beats.
/// Waits until the destination has beaten through its first 10 ms after resume.
fn gap_split(r: &Report, src: &Proc, rx: &Proc) -> Option<beats::Split> {
    if r.t_resume_ns == 0 {
        return None;
    }
    let w = beats::Window {
        start_ns: r.t_start_ns,
        pause_ns: r.t_pause_ns,
        resume_ns: r.t_resume_ns,
        end_ns: r.t_start_ns + r.total_ns,
    };
    let until = r.t_resume_ns + beats::AFTER_RESUME_NS + 2_000_000;
    let now = blip_vmm::devices::now_ns();
    if until > now {
        std::thread::sleep(Duration::from_nanos(until - now));
    }
    match (&src.beats, &rx.beats) {
        (Some(sb), Some(db)) => beats::split(
            &beats::mono_ns(&sb.snapshot()),
            &beats::mono_ns(&db.snapshot()),
            &w,
        ),
        _ => {
            let dst = beats::port_beats(&rx.api, r.t_resume_ns).ok()?;
            beats::split_port(
                r.guest_blackout_ns?,
                r.guest_gap_before_pause_ns.unwrap_or(0),
                &dst,
                &w,
            )
        }
    }
}

fn opt_us(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "n/a".into()
    } else {
        fit(us(h.value_at_quantile(q)), 8)
    }
}

/// `v` with one decimal, or none when that would not fit `width` (columns stay aligned).
pub fn fit(v: f64, width: usize) -> String {
    let s = format!("{v:.1}");
    if s.len() <= width {
        s
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_ratios_per_cell() {
        assert_eq!(pred_ratio(900, 600), Some(1.5));
        assert_eq!(pred_ratio(900, 0), None);
        assert_eq!(off_by(0.25), 4.0);
        assert_eq!(off_by(2.0), 2.0);
        assert!(off_by(0.0).is_infinite());
        let mut p = Prediction::default();
        assert_eq!(p.met_cell(), "n/a");
        assert_eq!(ratio_cell(p.quantile(0.5)), "n/a");
        p.ratios = vec![1.5, 0.4, 1.1, 2.2, 0.9];
        p.with_target = 5;
        p.met = 4;
        assert_eq!(p.quantile(0.5), Some(1.1));
        // 0.4 is 2.5x off, farther than 2.2: the worst keeps its direction.
        assert_eq!(p.worst(), Some(0.4));
        assert_eq!(ratio_cell(p.worst()), "0.40");
        assert_eq!(p.met_cell(), "met 4/5");
        let j = p.json();
        assert_eq!(j["min"], 0.4);
        assert_eq!(j["max"], 2.2);
        assert_eq!(j["worst_factor"], 2.5);
        assert_eq!(j["within_2x"], 3);
        assert_eq!(ratio_cell(Some(0.000_818)), "8.2e-4");
        assert_eq!(ratio_cell(Some(0.0)), "0.00");
        p.ratios.push(0.0);
        assert_eq!(ratio_cell(p.worst().map(off_by)), "inf");
        assert!(p.json()["worst_factor"].is_null());
    }

    #[test]
    fn workloads_parse_and_name_themselves() {
        assert_eq!("idle".parse::<Load>(), Ok(Load::Idle));
        assert_eq!(
            "dirty".parse::<Load>(),
            Ok(Load::Dirty {
                ws_mib: 16,
                rate: 0
            })
        );
        let l: Load = "dirty:4:2000".parse().unwrap();
        assert_eq!(
            l,
            Load::Dirty {
                ws_mib: 4,
                rate: 2000
            }
        );
        let c = Cell::new(64, 2, l);
        assert_eq!(c.cmdline(), "dirty ws=4 rate=2000 heartbeat period=100");
        let full = Cell::new(64, 1, "dirty:16:full".parse().unwrap());
        assert_eq!(full.cmdline(), "dirty ws=16 rate=full heartbeat period=100");
        assert_eq!(full.name(), "64M 1vcpu dirty 16M@full");
        assert_eq!(c.name(), "64M 2vcpu dirty 4M@2000pps");
        // `all` is all of memory above 8 MiB (the guest's image, stacks and page tables).
        let mut c = Cell::new(1024, 1, "dirty:all:max".parse().unwrap());
        c.bitmap = true;
        c.target_us = 300;
        assert_eq!(c.cmdline(), "dirty ws=1016 rate=max heartbeat period=100");
        assert_eq!(
            c.file_stem(),
            "migrate-1024M-1vcpu-dirty-1016M-max-bitmap-target-300us"
        );
        // Header lines: each group title ends where its columns end.
        let (l1, l2) = header_lines(label_width([&c]));
        let bars = |l: &str| l.match_indices('|').map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(bars(&l1), bars(&l2), "\n{l1}\n{l2}");
        let mut c = Cell::new(64, 1, Load::Idle);
        c.pc = true;
        assert_eq!(c.name(), "64M 1vcpu idle pc");
        assert_eq!(c.platform(), "pc");
        for bad in [
            "busy",
            "dirty:4",
            "dirty:x:max",
            "dirty:4:fast",
            "dirty:4:max:1",
        ] {
            assert!(bad.parse::<Load>().is_err(), "{bad}");
        }
    }
}
