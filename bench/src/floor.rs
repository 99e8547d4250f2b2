//! The `floor` scenario: the blackout this host allows (`blip_vmm::floor`), measured for the
//! shape of every migrate cell in the same run, and the cost of each state piece's ioctls.
//!
//! The floor is pause → state save → encode → decode → restore into a prepared VM → resume, in
//! one process with no network and no pages: what every migration pays whatever its transport
//! does. Each migrate cell then reports blackout ÷ floor (p50 and p99), and the "over the
//! floor" table shows which phase holds the rest.

use std::time::Duration;

use blip_vmm::floor::{self, Config, IoctlCost, Sample};
use blip_vmm::platform::Platform;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::migrate::{fit, Cell};
use crate::report::{hist, p50, p99, summary, us};

/// A floor's shape: what the floor of a migrate cell depends on (not the tracker, target or
/// transport: none of those is in the floor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub mem_mib: u64,
    pub vcpus: u32,
    pub pc: bool,
    pub cmdline: String,
}

impl Shape {
    pub fn of(c: &Cell) -> Shape {
        Shape {
            mem_mib: c.mem_mib,
            vcpus: c.vcpus,
            pc: c.pc,
            cmdline: c.cmdline(),
        }
    }

    fn label(&self) -> String {
        format!(
            "{}{}",
            self.cmdline.replace(" heartbeat period=1000", ""),
            if self.pc { " pc" } else { "" }
        )
    }
}

/// One shape's measured floor.
#[derive(Clone)]
pub struct Floor {
    pub shape: Shape,
    pub total: Histogram<u64>,
    pause: Histogram<u64>,
    save: Histogram<u64>,
    encode: Histogram<u64>,
    decode: Histogram<u64>,
    restore: Histogram<u64>,
    resume: Histogram<u64>,
    state_bytes: u64,
    samples: Vec<Sample>,
    pub error: Option<String>,
}

impl Floor {
    pub fn p50(&self) -> u64 {
        p50(&self.total)
    }
    pub fn p99(&self) -> u64 {
        p99(&self.total)
    }

    /// The floor's pieces, p50, laid on the migration's phases (ns): pause, final harvest,
    /// final pages, state save (save + encode), transfer+restore (decode + restore), resume.
    pub fn phases_p50(&self) -> [u64; 6] {
        [
            p50(&self.pause),
            0,
            0,
            p50(&self.save) + p50(&self.encode),
            p50(&self.decode) + p50(&self.restore),
            p50(&self.resume),
        ]
    }

    pub fn json(&self) -> Value {
        json!({
            "mem_mib": self.shape.mem_mib,
            "vcpus": self.shape.vcpus,
            "platform": if self.shape.pc { "pc" } else { "minimal" },
            "cmdline": self.shape.cmdline,
            "floor_ns": summary(&self.total),
            "pieces_ns": {
                "pause": summary(&self.pause),
                "save": summary(&self.save),
                "encode": summary(&self.encode),
                "decode": summary(&self.decode),
                "restore": summary(&self.restore),
                "resume": summary(&self.resume),
            },
            "state_bytes": self.state_bytes,
            // Steadier than the floor's p50 on a loaded host (a stall lands in one piece).
            "sum_of_piece_p50s_ns": self.phases_p50().iter().sum::<u64>(),
            "samples_columns": ["total_ns", "pause_ns", "save_ns", "encode_ns", "decode_ns", "restore_ns", "resume_ns"],
            "samples": self.samples.iter().map(|x| json!([x.total_ns, x.pause_ns, x.save_ns, x.encode_ns, x.decode_ns, x.restore_ns, x.resume_ns])).collect::<Vec<_>>(),
            "error": self.error,
        })
    }
}

/// The distinct shapes of `cells`, in order.
pub fn shapes<'a>(cells: impl IntoIterator<Item = &'a Cell>) -> Vec<Shape> {
    let mut v: Vec<Shape> = Vec::new();
    for c in cells {
        let s = Shape::of(c);
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

fn label_width(shapes: &[Shape]) -> usize {
    shapes
        .iter()
        .map(|s| s.label().len())
        .max()
        .unwrap_or(0)
        .max(5)
}

/// Measures every shape's floor (`reps` hand-overs each) and prints the floor table.
pub fn run(shapes: &[Shape], reps: u32) -> Vec<Floor> {
    let lw = label_width(shapes);
    println!(
        "floor   | {:>5} {:>4} {:<lw$} | {:>8} {:>8} {:>8} | {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} | {:>6} | {:>4}",
        "mem", "vcpu", "guest", "min", "p50", "p99", "pause", "save", "encode", "decode", "restore", "resume", "state", "n"
    );
    println!(
        "        | {:>5} {:>4} {:<lw$} | {:>26} | {:>41} | {:>6} |",
        "", "", "", "floor (us)", "pieces p50 (us)", "bytes"
    );
    let mut out = Vec::new();
    for s in shapes {
        let cfg = Config {
            mem_size: s.mem_mib << 20,
            vcpus: s.vcpus,
            platform: if s.pc {
                Platform::Pc
            } else {
                Platform::Minimal
            },
            cmdline: s.cmdline.clone(),
            reps,
            settle: Duration::from_millis(30),
        };
        let mut f = Floor {
            shape: s.clone(),
            total: hist(),
            pause: hist(),
            save: hist(),
            encode: hist(),
            decode: hist(),
            restore: hist(),
            resume: hist(),
            state_bytes: 0,
            samples: Vec::new(),
            error: None,
        };
        match floor::measure(&cfg) {
            Ok(samples) => {
                for x in &samples {
                    record(&mut f, x);
                }
            }
            Err(e) => f.error = Some(error_chain(&e)),
        }
        println!(
            "floor   | {:>4}M {:>4} {:<lw$} | {:>8} {:>8} {:>8} | {:>6} {:>6} {:>6} {:>6} {:>7} {:>6} | {:>6} | {:>4}{}",
            s.mem_mib,
            s.vcpus,
            s.label(),
            if f.total.is_empty() {
                "-".to_string()
            } else {
                fit(us(f.total.min()), 8)
            },
            fit(us(f.p50()), 8),
            fit(us(f.p99()), 8),
            fit(us(p50(&f.pause)), 6),
            fit(us(p50(&f.save)), 6),
            fit(us(p50(&f.encode)), 6),
            fit(us(p50(&f.decode)), 6),
            fit(us(p50(&f.restore)), 7),
            fit(us(p50(&f.resume)), 6),
            f.state_bytes,
            f.total.len(),
            f.error.as_ref().map(|e| format!(" FAILED: {e}")).unwrap_or_default(),
        );
        out.push(f);
    }
    out
}

fn record(f: &mut Floor, x: &Sample) {
    f.total.saturating_record(x.total_ns);
    f.pause.saturating_record(x.pause_ns);
    f.save.saturating_record(x.save_ns);
    f.encode.saturating_record(x.encode_ns);
    f.decode.saturating_record(x.decode_ns);
    f.restore.saturating_record(x.restore_ns);
    f.resume.saturating_record(x.resume_ns);
    f.state_bytes = x.state_bytes;
    f.samples.push(*x);
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// The floor measured for `c`'s shape.
pub fn of<'a>(floors: &'a [Floor], c: &Cell) -> Option<&'a Floor> {
    let s = Shape::of(c);
    floors
        .iter()
        .find(|f| f.shape == s && f.error.is_none() && !f.total.is_empty())
}

/// The ioctl cost table: every state piece's GET and SET on both platforms (64 MiB, 1 vCPU, a
/// heartbeat guest), `reps` times each; printed, and returned as JSON.
pub fn ioctls(reps: u32) -> Value {
    let mut per = Vec::new();
    for (name, platform) in [("minimal", Platform::Minimal), ("pc", Platform::Pc)] {
        let cfg = Config {
            mem_size: 64 << 20,
            vcpus: 1,
            platform,
            cmdline: "heartbeat period=1000".into(),
            reps: 0,
            settle: Duration::from_millis(100),
        };
        per.push((
            name,
            floor::ioctl_costs(&cfg, reps).map_err(|e| error_chain(&e)),
        ));
    }
    let empty = Vec::new();
    let rows_of = |i: usize| -> &Vec<IoctlCost> { per[i].1.as_ref().unwrap_or(&empty) };
    for (name, r) in &per {
        if let Err(e) = r {
            println!("ioctl   | {name}: cannot measure: {e}");
        }
    }
    let pieces: Vec<&IoctlCost> = {
        let mut v: Vec<&IoctlCost> = rows_of(1).iter().collect();
        if v.is_empty() {
            v = rows_of(0).iter().collect();
        }
        v
    };
    let cell = |s: Option<floor::Stats>| match s {
        Some(s) => format!("{:>6.1} {:>6.1}", us(s.p50_ns), us(s.p99_ns)),
        None => format!("{:>6} {:>6}", "-", "-"),
    };
    println!(
        "ioctl   | {:<18} | {:^13} | {:^13} | {:^13} | {:^13} | {:<12} | {:<8} | note",
        "piece", "minimal GET", "minimal SET", "pc GET", "pc SET", "fixed while", "in the"
    );
    println!(
        "        | {:<18} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:>6} {:>6} | {:<12} | {:<8} |",
        "", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "guest runs", "blackout"
    );
    for p in &pieces {
        let find = |i: usize| rows_of(i).iter().find(|r| r.piece == p.piece);
        let (m, c) = (find(0), find(1));
        println!(
            "ioctl   | {:<18} | {} | {} | {} | {} | {:<12} | {:<8} | {}",
            p.piece,
            cell(m.and_then(|r| r.get)),
            cell(m.and_then(|r| r.set)),
            cell(c.and_then(|r| r.get)),
            cell(c.and_then(|r| r.set)),
            p.fixed.word(),
            if p.in_blackout { "yes" } else { "no" },
            c.or(m).map(|r| r.note.as_str()).unwrap_or(""),
        );
    }
    println!("ioctl   | us per call, {reps} calls each, vCPU pieces on vCPU 0 of a paused 64 MiB 1-vCPU heartbeat guest; SET writes back what GET read");
    json!({
        "reps": reps,
        "guest": "64 MiB, 1 vCPU, `heartbeat period=1000`, paused; SET writes back what GET read",
        "minimal": per[0].1.as_ref().map(|v| json!(v)).unwrap_or_else(|e| json!({"error": e})),
        "pc": per[1].1.as_ref().map(|v| json!(v)).unwrap_or_else(|e| json!({"error": e})),
    })
}

/// The "over the floor" table: per migrate cell, each phase's p50 minus the floor's piece.
pub fn excess_header(lw: usize) {
    println!(
        "overflr | {:>5} {:>4} {:>lw$} | {:>8} {:>8} | {:>6} {:>6} {:>7} {:>6} {:>8} {:>6} {:>6} | {:>5} {:>5}",
        "mem", "vcpu", "load", "bo p50", "floor", "pause", "harv", "pages", "save", "xfer+rst", "resume", "other", "bo/fl", "p99"
    );
    println!(
        "        | {:>5} {:>4} {:>lw$} | {:>17} | {:>51} | {:>11}",
        "", "", "", "p50 (us)", "phase p50 minus the floor's piece (us)", "ratio"
    );
}

/// One row of the "over the floor" table for a migrate cell (its JSON from `migrate::cell`).
pub fn excess_row(lw: usize, c: &Cell, label: &str, row: &Value, floor: Option<&Floor>) {
    let Some(f) = floor else {
        println!(
            "overflr | {:>4}M {:>4} {:>lw$} | no floor measured for this shape",
            c.mem_mib, c.vcpus, label
        );
        return;
    };
    let h = &row["histograms"];
    let q = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let ph = |k: &str| q(&h["phases_ns"][k], "p50");
    let mig = [
        ph("pause"),
        ph("final_harvest"),
        ph("final_pages"),
        ph("state_save"),
        ph("transfer_restore"),
        ph("resume"),
    ];
    let fl = f.phases_p50();
    let d: Vec<f64> = mig
        .iter()
        .zip(fl.iter())
        .map(|(&m, &f)| (m as f64 - f as f64) / 1e3)
        .collect();
    let bo = &h["vmm_blackout_ns"];
    let r = |a: u64, b: u64| crate::migrate::floor_ratio(a, Some(b));
    println!(
        "overflr | {:>4}M {:>4} {:>lw$} | {:>8} {:>8} | {:>6} {:>6} {:>7} {:>6} {:>8} {:>6} {:>6} | {:>5} {:>5}",
        c.mem_mib,
        c.vcpus,
        label,
        fit(us(q(bo, "p50")), 8),
        fit(us(f.p50()), 8),
        fit(d[0], 6),
        fit(d[1], 6),
        fit(d[2], 7),
        fit(d[3], 6),
        fit(d[4], 8),
        fit(d[5], 6),
        fit(us(ph("unaccounted")), 6),
        r(q(bo, "p50"), f.p50()),
        r(q(bo, "p99"), f.p99()),
    );
}
