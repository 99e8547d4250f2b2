//! `blip-bench`: measures, never asserts. Each scenario prints a table row and the command that
//! reproduces it. These machines are shared and noisy, so compare numbers as ratios within one
//! run, not across runs.
//!
//! Scenarios (`--only a,b`; default all):
//! - `boot`: time from spawning `blip run` to the guest's first COM1 byte on our stdout, and the
//!   VMM-side share of it (VM creation: KVM VM, memory, load, vCPUs) measured in-process.
//! - `pause`: pause-all and resume-all latency for 1, 2 and 4 vCPUs while the guest dirties
//!   memory, over many cycles, in hdrhistogram histograms.
//! - `migrate`: live migrations between fresh `blip` processes over loopback TCP, a matrix of
//!   memory × vCPUs × workload, N per cell: VMM and guest-observed blackout, phase breakdown,
//!   total time, rounds, bytes (see `migrate.rs`).
//! - `dirty`: dirty ring vs dirty bitmap, in-process: guest slowdown with tracking on, harvest
//!   throughput and `take_runs` latency (see `dirty.rs`).
//! - `qemu`: the peer in the same run. The same guest and workload (1 vCPU, dirty 16 MiB at
//!   max rate, heartbeats as `*` on COM1) migrated N times by blip and by Debian's
//!   `qemu-system-x86_64 -M microvm` (QMP, at each `--qemu-downtime-ms`), guest-observed
//!   blackout timestamped the same way for both; a table of QEMU/blip ratios (see `qemu.rs`).
//!   Skipped, with a note, when QEMU is not installed.
//! - `tls`: the cost of mutual TLS: the same guest migrated plain and with TLS over loopback
//!   TCP in one run; pre-copy MB/s and blackout each way and their ratio (see `tls.rs`).
//!
//! PNG plots (`plots.rs`) go to `<--out>/*.png`: blackout CDFs (blip vs QEMU per memory size,
//! and the migrate matrix) and the blackout phase breakdown.
//!
//! Besides the tables on stdout, every figure and the environment go to
//! `<--out>/latest.json`, and each migrate cell's blackouts to `<--out>/<cell>.hlog`
//! (HdrHistogram interval log). `--quick` is the CI smoke subset (well under two minutes).

mod beats;
mod dirty;
mod floor;
mod migrate;
mod plots;
mod qemu;
mod report;
mod tls;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blip_vmm::loader::Image;
use blip_vmm::memory::Backing;
use blip_vmm::vm::{Vm, VmConfig};
use clap::Parser;
use serde_json::{json, Value};

use crate::report::{hist, summary, us};

const SCENARIOS: [&str; 7] = ["boot", "pause", "floor", "migrate", "dirty", "qemu", "tls"];

#[derive(Parser, Debug)]
#[command(name = "blip-bench", about = "blip latency benchmarks")]
struct Args {
    /// Scenarios to run, comma-separated (boot, pause, floor, migrate, dirty, qemu, tls); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Pause/resume cycles per vCPU count.
    #[arg(long, default_value_t = 1000)]
    cycles: u32,
    /// Boot measurements.
    #[arg(long, default_value_t = 10)]
    boots: u32,
    /// vCPU counts for the pause scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    vcpus: Vec<u32>,
    /// Hand-overs per shape of the blackout floor (the floor runs for every migrate cell's
    /// shape with `floor` and with `migrate`).
    #[arg(long, default_value_t = 50)]
    floor_reps: u32,
    /// Calls per ioctl in the floor scenario's ioctl cost table.
    #[arg(long, default_value_t = 200)]
    ioctl_reps: u32,
    /// Migrations per cell of the migrate matrix.
    #[arg(long, default_value_t = 100)]
    migrations: u32,
    /// Guest memory sizes (MiB) of the migrate matrix.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    migrate_mem: Vec<u64>,
    /// vCPU counts of the migrate matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    migrate_vcpus: Vec<u32>,
    /// Workloads of the migrate matrix: idle, dirty (16 MiB at full speed) or dirty:WS:RATE
    /// (WS in MiB or `all`, RATE in pages/s per vCPU or `max`), e.g. idle,dirty:4:2000,dirty:all:max.
    #[arg(long, value_delimiter = ',', default_value = "idle,dirty")]
    migrate_load: Vec<migrate::Load>,
    /// Transports of the migrate matrix (tcp, rdma). RDMA cells need an active RDMA port and
    /// --rdma-addr; on a host without RDMA they are skipped, and the output says so.
    #[arg(long, value_delimiter = ',', default_value = "tcp")]
    migrate_transport: Vec<String>,
    /// For RDMA cells: a local address on the RDMA port (every hop listens on it).
    #[arg(long)]
    rdma_addr: Option<std::net::IpAddr>,
    /// Platforms of the migrate matrix: minimal (blip's irqchip-less fast path, for guests
    /// that need no interrupts) and pc (in-kernel irqchip + PIT + kvmclock, as stock kernels
    /// need; its interrupt and clock state travels in the blackout).
    #[arg(long, value_delimiter = ',', default_value = "minimal,pc")]
    migrate_platform: Vec<String>,
    /// Thread placement of the migrate matrix: off (the kernel places every thread), on (every
    /// blip runs with --pin-vcpus on the first CPUs and --pin-vmm on the rest; cells with no CPU
    /// left for the VMM are skipped), e.g. off,on to compare them in one run.
    #[arg(long, value_delimiter = ',', default_value = "off")]
    migrate_pin: Vec<String>,
    /// Dirty trackers of the migrate matrix (ring, bitmap).
    #[arg(long, value_delimiter = ',', default_value = "ring")]
    migrate_tracker: Vec<String>,
    /// Blackout targets of the migrate matrix, in microseconds (blip migrate's default: 1000);
    /// the first one also applies to the qemu scenario's blip cells.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    max_blackout_us: Vec<u64>,
    /// How migrations are started: the control socket directly, or the `blip migrate` CLI.
    #[arg(long, value_enum, default_value = "api")]
    via: migrate::Via,
    /// `--precopy-nice` of the migrate matrix's migrations (0 to 19): the nice value of the
    /// source's migration threads until the pause and of the receivers' stream readers, so
    /// the guest's vCPUs win the CPUs they share with both.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    precopy_nice: u8,
    /// Working sets (MiB) of the dirty scenario.
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    dirty_ws: Vec<u64>,
    /// Measurement window of the dirty scenario (each of off and on), in milliseconds.
    #[arg(long, default_value_t = 1500)]
    dirty_window_ms: u64,
    /// Guest memory sizes (MiB) of the blip-vs-QEMU comparison.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    qemu_mem: Vec<u64>,
    /// Migrations per cell of the blip-vs-QEMU comparison (each VMM).
    #[arg(long, default_value_t = 20)]
    qemu_migrations: u32,
    /// QEMU `downtime-limit` values (ms; QEMU's minimum is 1, its default 300), one cell each.
    #[arg(long, value_delimiter = ',', default_value = "1,300")]
    qemu_downtime_ms: Vec<u64>,
    /// Pin both VMMs in the qemu scenario: the guest's vCPU thread alone on the host's first
    /// CPU, every other thread on the rest (blip: --pin-vcpus/--pin-vmm; QEMU: its "CPU n/KVM"
    /// threads and the others, set by the bench once QEMU answers QMP), the bench with them.
    /// The bench timestamps the serial beats, so on a 2-CPU host its readers share one CPU with
    /// both VMMs' migration threads and every gap reads longer: use it with 3 CPUs or more.
    #[arg(long)]
    qemu_pin: bool,
    /// Pre-copy time after which QEMU's downtime limit is raised to 300 ms so it finishes
    /// (counted as forced), in seconds.
    #[arg(long, default_value_t = 20)]
    qemu_precopy_s: u64,
    /// Where latest.json, the .hlog files and the plots go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Only redraw the plots from `<--out>/latest.json` (no measurement).
    #[arg(long)]
    replot: bool,
    /// Small, fast subset (for CI smoke runs).
    #[arg(long)]
    quick: bool,
}

impl Args {
    /// The first `--max-blackout-us` (the target of the non-matrix blip cells).
    fn first_target_us(&self) -> u64 {
        self.max_blackout_us.first().copied().unwrap_or(1000)
    }
}

/// The `blip` binary: `$BLIP_BIN`, else the one next to this executable, else
/// `$CARGO_TARGET_DIR` or `target/` (release, then debug). `None` when none exists.
fn find_blip() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BLIP_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        candidates.push(exe.with_file_name("blip"));
    }
    let dirs = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("target")]);
    for d in dirs {
        candidates.push(d.join("release/blip"));
        candidates.push(d.join("debug/blip"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The `blip` binary ([`find_blip`]) for the scenarios that spawn it.
fn blip_bin() -> PathBuf {
    find_blip().unwrap_or_else(|| PathBuf::from("blip"))
}

fn boot(n: u32) -> Value {
    let bin = blip_bin();
    let mut first_byte = hist();
    let mut create = hist();
    for _ in 0..n {
        let t0 = Instant::now();
        let mut child = Command::new(&bin)
            .args(["run", "--cmdline", "hello", "--mem", "64M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn blip (build it with cargo build --release first)");
        let mut b = [0u8; 1];
        let got = child
            .stdout
            .as_mut()
            .map(|o| o.read(&mut b))
            .transpose()
            .ok()
            .flatten();
        let dt = t0.elapsed().as_nanos() as u64;
        let _ = child.wait();
        if got == Some(1) {
            let _ = first_byte.record(dt);
        }
        let t1 = Instant::now();
        let vm = Vm::create(VmConfig {
            mem_size: 64 << 20,
            vcpus: 1,
            cmdline: "hello".into(),
            backing: Backing::Anon,
            image: Some(Image::embedded()),
            serial: Box::new(std::io::sink()),
            platform: Default::default(),
        })
        .expect("create VM");
        let _ = create.record(t1.elapsed().as_nanos() as u64);
        drop(vm);
    }
    println!(
        "boot   | process start -> first COM1 byte p50 {:>9.1} us p99 {:>9.1} us | VM creation (VMM side) p50 {:>8.1} us p99 {:>8.1} us | n={}",
        us(first_byte.value_at_quantile(0.5)),
        us(first_byte.value_at_quantile(0.99)),
        us(create.value_at_quantile(0.5)),
        us(create.value_at_quantile(0.99)),
        first_byte.len()
    );
    json!({
        "process_start_to_first_com1_byte_ns": summary(&first_byte),
        "vm_creation_ns": summary(&create),
    })
}

fn pause(vcpus: u32, cycles: u32) -> Value {
    let mut vm = Vm::create(VmConfig {
        mem_size: 64 << 20,
        vcpus,
        cmdline: "dirty ws=8 rate=max".into(),
        backing: Backing::Anon,
        image: Some(Image::embedded()),
        serial: Box::new(std::io::sink()),
        platform: Default::default(),
    })
    .expect("create VM");
    vm.resume_all().expect("start");
    std::thread::sleep(Duration::from_millis(200));
    let (mut p, mut r, mut first) = (hist(), hist(), hist());
    for _ in 0..cycles {
        let a = vm.pause_all().expect("pause");
        let b = vm.resume_all().expect("resume");
        let _ = p.record(a.last_ns - a.requested_ns);
        let _ = first.record(a.first_ns.saturating_sub(a.requested_ns));
        let _ = r.record(b.last_ns - b.requested_ns);
    }
    println!(
        "pause  | {vcpus} vCPU(s) | pause-all p50 {:>8.1} us p99 {:>8.1} us (first vCPU out p50 {:>7.1} us) | resume-all p50 {:>8.1} us p99 {:>8.1} us | n={cycles}",
        us(p.value_at_quantile(0.5)),
        us(p.value_at_quantile(0.99)),
        us(first.value_at_quantile(0.5)),
        us(r.value_at_quantile(0.5)),
        us(r.value_at_quantile(0.99)),
    );
    json!({
        "vcpus": vcpus,
        "cycles": cycles,
        "pause_all_ns": summary(&p),
        "first_vcpu_out_ns": summary(&first),
        "resume_all_ns": summary(&r),
    })
}

/// The migrate matrix's cells, and a note for each part of it this host cannot run.
fn migrate_cells(a: &Args) -> Result<(Vec<migrate::Cell>, Vec<String>), String> {
    let mut skipped = Vec::new();
    let mut transports = Vec::new();
    for t in &a.migrate_transport {
        match t.as_str() {
            "tcp" => transports.push(None),
            "rdma" => {
                let ports = blip_transport::rdma::active_ports();
                match a.rdma_addr {
                    _ if ports.is_empty() => skipped.push(
                        "rdma cells skipped: no RDMA device with an active port on this host"
                            .to_string(),
                    ),
                    Some(ip) => transports.push(Some(ip)),
                    None => {
                        return Err(format!(
                            "rdma cells need --rdma-addr (an address on one of {})",
                            ports.join(", ")
                        ))
                    }
                }
            }
            other => return Err(format!("--migrate-transport {other}: use tcp or rdma")),
        }
    }
    let mut platforms = Vec::new();
    for p in &a.migrate_platform {
        match p.as_str() {
            "minimal" => platforms.push(false),
            "pc" => platforms.push(true),
            other => return Err(format!("--migrate-platform {other}: use minimal or pc")),
        }
    }
    let mut pins = Vec::new();
    for p in &a.migrate_pin {
        match p.as_str() {
            "off" => pins.push(false),
            "on" => pins.push(true),
            other => return Err(format!("--migrate-pin {other}: use off or on")),
        }
    }
    let allowed = if pins.contains(&true) {
        blip_vmm::vcpu::allowed_cpus().map_err(|e| format!("cannot read this host's CPUs: {e}"))?
    } else {
        Vec::new()
    };
    let dirty = migrate::Load::Dirty {
        ws_mib: 16,
        rate: 0,
    };
    // The guest at the host's top dirtying speed (issue 18 item 5), 1 vCPU, 64 MiB, loopback.
    let full = migrate::Cell::new(
        64,
        1,
        migrate::Load::Dirty {
            ws_mib: 16,
            rate: migrate::FULL,
        },
    );
    if a.quick {
        let mut bitmap = migrate::Cell::new(64, 1, dirty);
        bitmap.bitmap = true;
        let mut pc = migrate::Cell::new(64, 1, dirty);
        pc.pc = true;
        return Ok((
            vec![
                migrate::Cell::new(64, 1, dirty),
                migrate::Cell::new(64, 2, dirty),
                bitmap,
                pc,
                full,
            ],
            skipped,
        ));
    }
    let mut v = Vec::new();
    for &mem_mib in &a.migrate_mem {
        for &vcpus in &a.migrate_vcpus {
            for &load in &a.migrate_load {
                for tracker in &a.migrate_tracker {
                    let bitmap = match tracker.as_str() {
                        "ring" => false,
                        "bitmap" => true,
                        other => {
                            return Err(format!("--migrate-tracker {other}: use ring or bitmap"))
                        }
                    };
                    for &target_us in &a.max_blackout_us {
                        for &rdma in &transports {
                            for &pc in &platforms {
                                for &pin in &pins {
                                    let mut c = migrate::Cell::new(mem_mib, vcpus, load);
                                    c.bitmap = bitmap;
                                    c.target_us = target_us;
                                    c.rdma = rdma;
                                    c.pc = pc;
                                    if pin {
                                        c.pin = true;
                                        if migrate::Pin::split(&allowed, vcpus).is_none() {
                                            let note = format!(
                                                "pinned {vcpus}-vCPU cells skipped: this host \
                                                 has {} CPUs, none left for the VMM's threads",
                                                allowed.len()
                                            );
                                            if !skipped.contains(&note) {
                                                skipped.push(note);
                                            }
                                            continue;
                                        }
                                    }
                                    v.push(c);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let same = |c: &migrate::Cell| {
        (c.mem_mib, c.vcpus, c.load, c.bitmap, c.pc, c.rdma, c.pin)
            == (64, 1, full.load, false, false, None, false)
    };
    if !v.iter().any(same) {
        v.push(full);
    }
    Ok((v, skipped))
}

/// The `qemu` scenario: blip's serial cell and the QEMU cells per memory size, then the table.
fn qemu_scenario(a: &Args, bin: &std::path::Path) -> Value {
    let target_us = a.first_target_us();
    let scratch = std::env::temp_dir().join(format!("blip-bench-q-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&scratch);
    let n = if a.quick { 2 } else { a.qemu_migrations.max(1) };
    let mems = if a.quick {
        vec![64]
    } else {
        a.qemu_mem.clone()
    };
    let s = migrate::Settings {
        bin: bin.to_path_buf(),
        scratch: scratch.clone(),
        out: a.out.clone(),
        migrations: n,
        max_blackout_ns: target_us * 1000,
        max_precopy_ms: if a.quick { 3_000 } else { 30_000 },
        via: a.via,
        precopy_nice: a.precopy_nice,
        label_width: 0,
    };
    let cells: Vec<migrate::Cell> = mems
        .iter()
        .map(|&mem_mib| {
            let mut c = migrate::Cell::new(
                mem_mib,
                1,
                migrate::Load::Dirty {
                    ws_mib: 16,
                    rate: 0,
                },
            );
            c.serial = true;
            c.target_us = target_us;
            c.pin = a.qemu_pin;
            c
        })
        .collect();
    let s = migrate::Settings {
        label_width: migrate::label_width(&cells),
        ..s
    };
    println!("qemu    | blip, the same cells as QEMU (heartbeats via serial):");
    migrate::header(s.label_width);
    let blip: Vec<Value> = cells
        .into_iter()
        .enumerate()
        .map(|(i, c)| migrate::cell(&s, c, 100 + i, None))
        .collect();
    let mut c = migrate::Cell::new(
        64,
        1,
        migrate::Load::Dirty {
            ws_mib: 16,
            rate: 0,
        },
    );
    c.serial = true;
    let cmdline = c.cmdline();
    let needs = "-M microvm (the pc machine hangs under this KVM), -accel kvm, -cpu qemu64, -smp 1 (blip's guest starts APs without INIT/SIPI), -device isa-debug-exit,iobase=0xf4,iosize=0x04, -nodefaults -no-reboot -display none, -serial stdio piped to blip-bench";
    let mut cells = Vec::new();
    let mut doc = serde_json::Map::new();
    let pin = if a.qemu_pin {
        let p = migrate::Pin::split(&blip_vmm::vcpu::allowed_cpus().unwrap_or_default(), 1);
        match &p {
            Some(p) => println!(
                "qemu    | both VMMs pinned: the vCPU thread on CPU {}, every other thread on {}",
                p.vcpus, p.vmm
            ),
            None => println!("qemu    | --qemu-pin: one CPU only, nothing pinned"),
        }
        doc.insert(
            "pinned".into(),
            p.as_ref()
                .map(|p| serde_json::json!({"vcpus": p.vcpus, "vmm": p.vmm}))
                .unwrap_or(Value::Null),
        );
        p
    } else {
        None
    };
    match qemu::find() {
        None => {
            println!("qemu    | qemu-system-x86_64 not found: skipping the QEMU peer (apt-get install qemu-system-x86)");
            doc.insert("qemu".into(), Value::Null);
            doc.insert(
                "skipped".into(),
                "qemu-system-x86_64 not found on PATH".into(),
            );
        }
        Some(q) => {
            let elf = scratch.join("guest.elf");
            match qemu::guest_image(bin, &elf) {
                Err(e) => {
                    println!(
                        "qemu    | cannot write blip's guest image: {e}: skipping the QEMU peer"
                    );
                    doc.insert("skipped".into(), e.into());
                }
                Ok(()) => {
                    doc.insert("qemu".into(), q.display().to_string().into());
                    doc.insert("qemu_version".into(), qemu::version(&q).into());
                    qemu::header();
                    for &mem_mib in &mems {
                        for &lim in &a.qemu_downtime_ms {
                            let qs = qemu::Settings {
                                qemu: q.clone(),
                                guest_elf: elf.clone(),
                                scratch: scratch.clone(),
                                mem_mib,
                                cmdline: cmdline.clone(),
                                migrations: n,
                                downtime_limit_ms: lim.max(1),
                                pin: pin.clone(),
                                precopy_limit: Duration::from_secs(if a.quick {
                                    5
                                } else {
                                    a.qemu_precopy_s
                                }),
                            };
                            if cells.is_empty() {
                                doc.insert("command_line".into(), qs.command_line().into());
                            }
                            cells.push(qemu::cell(&qs));
                        }
                    }
                }
            }
        }
    }
    let placement = match &pin {
        Some(p) => format!(
            "; both VMMs pinned (vCPU thread on CPU {}, every other thread on {})",
            p.vcpus, p.vmm
        ),
        None => String::new(),
    };
    let note = format!(
        "1 vCPU, `{cmdline}`, loopback TCP, {n} migrations per cell{placement}; QEMU needs {needs}"
    );
    let cmp = report::comparison(&blip, &cells, &note);
    doc.insert("needs".into(), needs.into());
    doc.insert("cmdline".into(), cmdline.into());
    doc.insert("blip_cells".into(), blip.into());
    doc.insert("cells".into(), cells.into());
    doc.insert("comparison".into(), cmp);
    let _ = std::fs::remove_dir_all(&scratch);
    doc.into()
}

fn main() {
    let a = Args::parse();
    let target_us = a.first_target_us();
    for o in &a.only {
        if !SCENARIOS.contains(&o.as_str()) {
            eprintln!(
                "blip-bench: error: unknown scenario {o:?} (known: {})",
                SCENARIOS.join(", ")
            );
            std::process::exit(2);
        }
    }
    // The matrix is checked (and built) once, before anything runs.
    let (cells, skipped) = match migrate_cells(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blip-bench: error: {e}");
            std::process::exit(2);
        }
    };
    if a.replot {
        let p = a.out.join("latest.json");
        let doc: Value = match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("blip-bench: error: cannot read {}: {e}", p.display());
                std::process::exit(2);
            }
        };
        for f in plots::all(&a.out, &doc["results"]) {
            println!("blip-bench: wrote {}", f.display());
        }
        return;
    }
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let (cycles, boots) = if a.quick {
        (100, 3)
    } else {
        (a.cycles, a.boots)
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reproduce = format!(
        "cargo build --release -p blip-vmm -p blip-bench && target/release/blip-bench {}",
        args.join(" ")
    );
    let reproduce = reproduce.trim_end().to_string();
    println!("blip-bench: reproduce with `{reproduce}`");
    let bin = blip_bin();
    let spawns_blip = ["boot", "migrate", "qemu", "tls"].iter().any(|s| want(s));
    if spawns_blip && !bin.is_file() {
        eprintln!(
            "blip-bench: error: no blip binary next to blip-bench or in target/{{release,debug}}: run `cargo build --release -p blip-vmm` (or set BLIP_BIN)"
        );
        std::process::exit(2);
    }
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("blip-bench: error: cannot create {}: {e}", a.out.display());
        std::process::exit(2);
    }
    let t_run = Instant::now();
    let mut results = serde_json::Map::new();
    if want("boot") {
        results.insert("boot".into(), boot(boots));
    }
    if want("pause") {
        let rows: Vec<Value> = a.vcpus.iter().map(|&v| pause(v, cycles)).collect();
        results.insert("pause".into(), rows.into());
    }
    // The floor of every migrate cell's shape, measured before the migrations so each cell
    // reports blackout / floor.
    let floors = if want("floor") || want("migrate") {
        let reps = if a.quick { 10 } else { a.floor_reps.max(1) };
        let f = floor::run(&floor::shapes(&cells), reps);
        results.insert(
            "floor".into(),
            json!({
                "reps": reps,
                "what": "pause_all -> save_state_with -> strip_early + encode -> decode + merge_early -> restore_state_after into a prepared VM given the early state before -> resume, one process, no network, no pages (blip_vmm::floor)",
                "shapes": f.iter().map(floor::Floor::json).collect::<Vec<_>>(),
            }),
        );
        f
    } else {
        Vec::new()
    };
    if want("floor") {
        let reps = if a.quick { 20 } else { a.ioctl_reps.max(1) };
        let t = floor::ioctls(reps);
        if let Some(Value::Object(m)) = results.get_mut("floor") {
            m.insert("ioctls".into(), t);
        }
    }
    if want("migrate") {
        let scratch = std::env::temp_dir().join(format!("blip-bench-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&scratch);
        let s = migrate::Settings {
            bin: bin.clone(),
            scratch: scratch.clone(),
            out: a.out.clone(),
            migrations: if a.quick { 5 } else { a.migrations.max(1) },
            max_blackout_ns: target_us * 1000,
            max_precopy_ms: if a.quick { 3_000 } else { 30_000 },
            via: a.via,
            precopy_nice: a.precopy_nice,
            label_width: migrate::label_width(&cells),
        };
        for note in &skipped {
            println!("migrate | {note}");
        }
        // What the final pages are measured against (issue 18: at least half of it).
        let loopback = dirty::loopback_tcp_bandwidth(256 << 20, 3);
        match &loopback {
            Ok(bw) => println!(
                "migrate | loopback TCP: {:.2} GB/s (one stream, best of 3 x 256 MiB); final pages: final_pages_bytes_per_s in each cell's JSON",
                bw / 1e9
            ),
            Err(e) => println!("migrate | loopback TCP bandwidth not measured: {e}"),
        }
        // The final-pages path alone, 256 pages, behind a 4096-page last live round (16 MiB,
        // the full-speed cell's working set) as before issue 18, and after its barrier.
        // Frames of the migration's own size, then one frame for the whole batch (before
        // frames, the destination idled while the source copied, and the source while it
        // checked and placed the pages) and frames of 16 pages.
        let framed = blip_vmm::migration::link::FINAL_FRAME_BYTES as u64 / 4096;
        let mut final_path = serde_json::Map::new();
        final_path.insert("frame_pages".into(), framed.into());
        let runs = [
            ("queued_behind_last_round", false, framed),
            ("after_barrier", true, framed),
            ("after_barrier_one_frame", true, 256),
            ("after_barrier_16_page_frames", true, 16),
        ];
        for (name, barrier, frame) in runs {
            let best = (0..5)
                .filter_map(|_| dirty::final_pages_path(256, 4096, barrier, frame).ok())
                .fold(0.0f64, f64::max);
            println!(
                "migrate | final pages path, 256 pages, {name} (frames of {frame}): {:.2} GB/s (best of 5)",
                best / 1e9
            );
            final_path.insert(format!("{name}_bytes_per_s"), best.into());
        }
        migrate::header(s.label_width);
        let rows: Vec<Value> = cells
            .iter()
            .enumerate()
            .map(|(i, &c)| migrate::cell(&s, c, i, floor::of(&floors, &c)))
            .collect();
        // Where the blackout goes beyond the floor, phase by phase.
        floor::excess_header(s.label_width);
        for (c, row) in cells.iter().zip(&rows) {
            floor::excess_row(s.label_width, c, &c.label(), row, floor::of(&floors, c));
        }
        results.insert(
            "migrate".into(),
            json!({
                "via": format!("{:?}", a.via).to_lowercase(),
                "max_blackout_ns": s.max_blackout_ns,
                "loopback_tcp_bytes_per_s": loopback.ok(),
                "final_pages_path": final_path,
                "skipped": skipped,
                "cells": rows,
            }),
        );
        let _ = std::fs::remove_dir_all(&scratch);
    }
    if want("dirty") {
        let (ws, window) = if a.quick {
            (vec![4], Duration::from_millis(500))
        } else {
            (a.dirty_ws.clone(), Duration::from_millis(a.dirty_window_ms))
        };
        dirty::header();
        let mut rows = Vec::new();
        for &w in &ws {
            for mode in [blip_vmm::dirty::Mode::Ring, blip_vmm::dirty::Mode::Bitmap] {
                rows.push(dirty::run(w, mode, window));
            }
        }
        results.insert("dirty".into(), rows.into());
    }
    if want("qemu") {
        results.insert("qemu".into(), qemu_scenario(&a, &bin));
    }
    if want("tls") {
        results.insert("tls".into(), tls::run(&bin, if a.quick { 1 } else { 3 }));
    }
    let results = Value::Object(results);
    let pngs = plots::all(&a.out, &results);
    let doc = json!({
        "tool": "blip-bench",
        "reproduce": reproduce,
        "args": args,
        "quick": a.quick,
        "wall_s": t_run.elapsed().as_secs_f64(),
        "environment": report::environment(),
        "note": "measured on a shared, noisy, emulated KVM host: compare as ratios within one run",
        "results": results,
        "plots": pngs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    match report::write_json(&a.out, &doc) {
        Ok(p) => println!(
            "blip-bench: results in {} (+ one .hlog per migrate cell, {} plot(s)), {:.1} s",
            p.display(),
            pngs.len(),
            t_run.elapsed().as_secs_f64()
        ),
        Err(e) => eprintln!(
            "blip-bench: cannot write {}/latest.json: {e}",
            a.out.display()
        ),
    }
}
