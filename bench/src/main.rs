//! `blip-bench`: measures, never asserts. Each scenario prints a table row and the command that
//! reproduces it. These machines are shared and noisy, so compare numbers as ratios within one
//! run, not across runs.
//!
//! Scenarios so far (VMM core):
//! - `boot`: time from spawning `blip run` to the guest's first COM1 byte on our stdout, and the
//!   VMM-side share of it (VM creation: KVM VM, memory, load, vCPUs) measured in-process.
//! - `pause`: pause-all and resume-all latency for 1, 2 and 4 vCPUs while the guest dirties
//!   memory, over many cycles, in hdrhistogram histograms.

mod dirty;
mod migrate;
mod report;

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

const SCENARIOS: [&str; 4] = ["boot", "pause", "migrate", "dirty"];

#[derive(Parser, Debug)]
#[command(name = "blip-bench", about = "blip latency benchmarks")]
struct Args {
    /// Scenarios to run, comma-separated (boot, pause, migrate, dirty); default all.
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
    /// Migrations per cell of the migrate matrix.
    #[arg(long, default_value_t = 100)]
    migrations: u32,
    /// Guest memory sizes (MiB) of the migrate matrix.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    migrate_mem: Vec<u64>,
    /// vCPU counts of the migrate matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    migrate_vcpus: Vec<u32>,
    /// Workloads of the migrate matrix (idle, dirty).
    #[arg(long, value_delimiter = ',', default_value = "idle,dirty")]
    migrate_load: Vec<String>,
    /// Blackout target handed to every migration, in microseconds (blip migrate's default).
    #[arg(long, default_value_t = 1000)]
    max_blackout_us: u64,
    /// How migrations are started: the control socket directly, or the `blip migrate` CLI.
    #[arg(long, value_enum, default_value = "api")]
    via: migrate::Via,
    /// Working sets (MiB) of the dirty scenario.
    #[arg(long, value_delimiter = ',', default_value = "4,32")]
    dirty_ws: Vec<u64>,
    /// Measurement window of the dirty scenario (each of off and on), in milliseconds.
    #[arg(long, default_value_t = 1500)]
    dirty_window_ms: u64,
    /// Where latest.json and the .hlog files go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Small, fast subset (for CI smoke runs).
    #[arg(long)]
    quick: bool,
}

fn boot(n: u32) {
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
}

fn pause(vcpus: u32, cycles: u32) {
    let mut vm = Vm::create(VmConfig {
        mem_size: 64 << 20,
        vcpus,
        cmdline: "dirty ws=8 rate=max".into(),
        backing: Backing::Anon,
        image: Some(Image::embedded()),
        serial: Box::new(std::io::sink()),
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
}

fn main() {
    let a = Args::parse();
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let (cycles, boots) = if a.quick {
        (100, 3)
    } else {
        (a.cycles, a.boots)
    };
    println!(
        "blip-bench: reproduce with `cargo run --release -p blip-bench -- {}`",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    if want("boot") {
        boot(boots);
    }
    if want("pause") {
        for &v in &a.vcpus {
            pause(v, cycles);
        }
    }
}
