//! Results on disk: `latest.json` (every figure plus the environment) and `.hlog` interval
//! histogram logs (HdrHistogram's interval-log format, V2-encoded histograms), readable by
//! HdrHistogram's `HistogramLogProcessor` and the online log analyzers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram of nanoseconds (or counts), 1 to 60 s, 3 significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Nanoseconds as microseconds.
pub fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// A histogram's figures as JSON (same unit as recorded).
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"n": 0});
    }
    json!({
        "n": h.len(),
        "min": h.min(),
        "mean": h.mean(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// p50 (or 0 when empty).
pub fn p50(h: &Histogram<u64>) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(0.5)
    }
}

/// p99 (or 0 when empty).
pub fn p99(h: &Histogram<u64>) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(0.99)
    }
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Seconds since the epoch as an ISO-8601 UTC date (no external crate, no `date` needed).
pub fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Where and with what the numbers were taken.
pub fn environment() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let git_dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty());
    json!({
        "kernel": cmd_out("uname", &["-r"]),
        "cpu_model": cpu,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rustc": cmd_out("rustc", &["--version"]),
        "git_commit": cmd_out("git", &["rev-parse", "HEAD"]),
        "git_dirty": git_dirty,
        "date": iso8601(SystemTime::now()),
        // As probed: KVM API version, the kvm modules loaded, vCPU limit, dirty ring size, the
        // optional state pieces this KVM saves.
        "kvm": blip_vmm::floor::host_kvm(),
        "hypervisor_cpu_flag": std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor")))
            .unwrap_or(false),
    })
}

/// One tagged interval histogram of an `.hlog`.
pub struct Interval {
    /// Start, relative to the log's base time.
    pub start: Duration,
    pub duration: Duration,
    pub tag: &'static str,
    pub hist: Histogram<u64>,
}

/// Writes an interval log (values in ns; the max column in µs via the value divisor).
pub fn write_hlog(
    path: &Path,
    comment: &str,
    base: SystemTime,
    intervals: &[Interval],
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut ser = V2Serializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment(comment)
            .add_comment("values in nanoseconds; the max column is in microseconds")
            .with_start_time(base)
            .with_base_time(base)
            .with_max_value_divisor(1e3)
            .begin_log_with(&mut buf, &mut ser)?;
        for i in intervals {
            w.write_histogram(&i.hist, i.start, i.duration, Tag::new(i.tag))
                .map_err(|e| std::io::Error::other(format!("{e}")))?;
        }
    }
    std::fs::write(path, buf)
}

/// Writes `latest.json` under `dir`; returns its path.
pub fn write_json(dir: &Path, v: &Value) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("latest.json");
    let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    std::fs::write(&p, text + "\n")?;
    Ok(p)
}

/// A figure out of a cell's JSON: `histograms.<name>.<q>` (None when absent or empty).
fn fig(cell: &Value, name: &str, q: &str) -> Option<u64> {
    cell["histograms"][name][q].as_u64()
}

fn ms_str(ns: Option<u64>) -> String {
    match ns {
        Some(v) if v >= 1_000_000 => format!("{:.2} ms", v as f64 / 1e6),
        Some(v) => format!("{:.0} µs", v as f64 / 1e3),
        None => "n/a".into(),
    }
}

/// QEMU's `downtime`: it reports whole milliseconds, so its 0 (recorded as 1 ns in the
/// histogram) means "< 1 ms".
fn qemu_ms_str(ns: Option<u64>) -> String {
    match ns {
        Some(v) if v < 1_000_000 => "< 1 ms".into(),
        other => ms_str(other),
    }
}

/// QEMU/blip of a QEMU downtime: a 0 (< 1 ms) gives "< (1 ms / blip)×".
fn qemu_ratio_str(q: Option<u64>, b: Option<u64>) -> String {
    match (q, b) {
        (Some(q), Some(b)) if q < 1_000_000 && b > 0 => format!("< {:.1}×", 1e6 / b as f64),
        _ => ratio_str(ratio(q, b)),
    }
}

fn ratio(q: Option<u64>, b: Option<u64>) -> Option<f64> {
    match (q, b) {
        (Some(q), Some(b)) if b > 0 => Some(q as f64 / b as f64),
        _ => None,
    }
}

fn ratio_str(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.1}×"))
        .unwrap_or_else(|| "n/a".into())
}

/// The blip-vs-QEMU table (stdout, Markdown) and its JSON: per memory size, blip's serial cell
/// and each QEMU cell, VMM-reported blackout (blip `blackout_ns`, QEMU `downtime`) and
/// guest-observed blackout (COM1 beats, both) p50/p99, total time p50, and QEMU/blip ratios.
pub fn comparison(blip: &[Value], qemu: &[Value], qemu_note: &str) -> Value {
    let mut rows = Vec::new();
    println!();
    println!("blip vs QEMU, same guest and workload, same run ({qemu_note})");
    println!();
    println!("| mem | VMM | VMM blackout p50 / p99 | guest-observed p50 / p99 | of which handover p50 / p99 | total p50 | n | QEMU/blip: VMM p50 / p99 | guest p50 / p99 | handover p50 | total p50 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for b in blip {
        let mem = b["mem_mib"].as_u64().unwrap_or(0);
        let bv = |q| fig(b, "vmm_blackout_ns", q);
        let bg = |q| fig(b, "guest_serial_blackout_ns", q);
        let bh = |q| fig(b, "guest_serial_handover_ns", q);
        // Like QEMU's total-time: request to the guest running on the destination.
        let bt = fig(b, "to_resume_ns", "p50");
        println!(
            "| {mem} MiB | blip (target {}) | {} / {} | {} / {} | {} / {} | {} | {} | | | | |",
            ms_str(b["max_blackout_ns"].as_u64()),
            ms_str(bv("p50")),
            ms_str(bv("p99")),
            ms_str(bg("p50")),
            ms_str(bg("p99")),
            ms_str(bh("p50")),
            ms_str(bh("p99")),
            ms_str(bt),
            b["migrations_ok"],
        );
        let mut peers = Vec::new();
        for q in qemu.iter().filter(|q| q["mem_mib"] == mem) {
            let qv = |p| fig(q, "downtime_ns", p);
            let qg = |p| fig(q, "guest_serial_blackout_ns", p);
            let qh = |p| fig(q, "guest_serial_handover_ns", p);
            let qt = fig(q, "total_ns", "p50");
            let r = json!({
                "handover_p50": ratio(qh("p50"), bh("p50")),
                "vmm_p50": ratio(qv("p50"), bv("p50")),
                "vmm_p99": ratio(qv("p99"), bv("p99")),
                "guest_p50": ratio(qg("p50"), bg("p50")),
                "guest_p99": ratio(qg("p99"), bg("p99")),
                "total_p50": ratio(qt, bt),
            });
            let forced = q["migrations_forced"].as_u64().unwrap_or(0);
            println!(
                "| {mem} MiB | QEMU (downtime-limit {} ms{}) | {} / {} | {} / {} | {} / {} | {} | {} | {} / {} | {} / {} | {} | {} |",
                q["downtime_limit_ms"],
                if forced > 0 { format!(", {forced} forced") } else { String::new() },
                qemu_ms_str(qv("p50")),
                qemu_ms_str(qv("p99")),
                ms_str(qg("p50")),
                ms_str(qg("p99")),
                ms_str(qh("p50")),
                ms_str(qh("p99")),
                ms_str(qt),
                q["migrations_ok"],
                qemu_ratio_str(qv("p50"), bv("p50")),
                qemu_ratio_str(qv("p99"), bv("p99")),
                ratio_str(r["guest_p50"].as_f64()),
                ratio_str(r["guest_p99"].as_f64()),
                ratio_str(r["handover_p50"].as_f64()),
                ratio_str(r["total_p50"].as_f64()),
            );
            peers.push(json!({
                "downtime_limit_ms": q["downtime_limit_ms"],
                "downtime_ns": {"p50": qv("p50"), "p99": qv("p99")},
                "guest_serial_blackout_ns": {"p50": qg("p50"), "p99": qg("p99")},
                "guest_serial_handover_ns": {"p50": qh("p50"), "p99": qh("p99")},
                "total_ns_p50": qt,
                "migrations_ok": q["migrations_ok"],
                "migrations_forced": forced,
                "qemu_over_blip": r,
            }));
        }
        rows.push(json!({
            "mem_mib": mem,
            "vcpus": 1,
            "blip": {
                "vmm_blackout_ns": {"p50": bv("p50"), "p99": bv("p99")},
                "guest_serial_blackout_ns": {"p50": bg("p50"), "p99": bg("p99")},
                "guest_serial_handover_ns": {"p50": bh("p50"), "p99": bh("p99")},
                "total_ns_p50": bt,
                "migrations_ok": b["migrations_ok"],
            },
            "qemu": peers,
        }));
    }
    println!();
    println!("QEMU reports downtime in whole milliseconds: its 0 ms is shown as < 1 ms (and plotted at the left edge, labelled so). Guest-observed = largest gap between COM1 '*' heartbeats ({} µs period) from the migrate request to the destination's first beat, timestamped on the host for both (pre-copy stalls count); handover = last source beat to first destination beat. Totals: blip's from the migrate request to the guest running on the destination (handshake, dry runs, pre-copy, blackout: `precopy_ns + last_live_ns + blackout_ns`; its report's `total_ns` also waits for the destination's heartbeat-port report, up to 1 s with via=serial), QEMU's `total-time`.", crate::beats::PERIOD_US);
    rows.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(iso8601(t), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn hlog_round_trips() {
        use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
        let mut h = hist();
        h.record(1500).unwrap();
        h.record(2500).unwrap();
        let dir = std::env::temp_dir().join(format!("blip-bench-hlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.hlog");
        let iv = [Interval {
            start: Duration::from_millis(5),
            duration: Duration::from_millis(10),
            tag: "vmm_blackout",
            hist: h,
        }];
        write_hlog(&p, "test", UNIX_EPOCH, &iv).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let n = IntervalLogIterator::new(&bytes)
            .filter_map(Result::ok)
            .filter(|e| matches!(e, LogEntry::Interval(i) if i.tag().map(|t| t.as_str()) == Some("vmm_blackout")))
            .count();
        assert_eq!(n, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
