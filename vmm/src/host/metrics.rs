//! `GET /metrics`: the host service's numbers in the Prometheus text format (version 0.0.4),
//! on the host API socket and, with `--metrics-listen ADDR:PORT`, over plain HTTP.
//!
//! Outgoing migrations are counted from the service's own records (`migrations.jsonl`), not
//! from the service's memory: `blip drain` and `blip migrate` run outside the service write
//! there too, so every migration off this node shows, whoever ran it. The file is read from
//! where the last scrape stopped (records older than the service are not counted: counters
//! start at zero with the process, as Prometheus expects). When a writer rewrote the file to
//! keep it bounded, the records newer than the newest one already counted are taken.
//! Incoming migrations are counted by the service as it prepares receivers and sees their
//! guests arrive (or their receivers die).

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};

use super::Record;

/// Upper bounds of the histogram buckets, in seconds: 100 µs to 10 s.
pub const BUCKETS: [f64; 16] = [
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
    2.5, 5.0, 10.0,
];

/// A histogram of seconds.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Migrations counted one way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub in_doubt: u64,
    pub bytes: u64,
}

/// What the service folds from its records.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// Byte offset in `migrations.jsonl` up to which records are counted.
    cursor: u64,
    /// `ended_ns` of the newest record counted.
    newest_ns: u64,
    pub counts: Counts,
    pub blackout: Histogram,
    pub total: Histogram,
}

impl Outgoing {
    /// Starts counting after the records already in the file.
    pub fn from_now() -> Outgoing {
        let mut o = Outgoing::default();
        let text = std::fs::read_to_string(super::migrations_file()).unwrap_or_default();
        o.cursor = text.rfind('\n').map_or(0, |i| i as u64 + 1);
        o.newest_ns = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
            .map(|r| r.ended_ns)
            .max()
            .unwrap_or(0);
        o
    }

    fn count(&mut self, r: &Record) {
        self.newest_ns = self.newest_ns.max(r.ended_ns);
        self.counts.started += 1;
        let doubt = r.report.as_ref().is_some_and(|p| p.in_doubt.is_some());
        if doubt {
            self.counts.in_doubt += 1;
        } else if r.ok {
            self.counts.succeeded += 1;
        } else {
            self.counts.failed += 1;
        }
        if let Some(p) = &r.report {
            self.counts.bytes += p.bytes_sent;
            if !doubt {
                self.blackout.observe(p.blackout_ns as f64 / 1e9);
                self.total.observe(p.total_ns as f64 / 1e9);
            }
        }
    }

    /// Counts the records written since the last call.
    pub fn update(&mut self) {
        let Ok(mut f) = std::fs::File::open(super::migrations_file()) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut text = String::new();
        if len < self.cursor {
            // Rewritten (kept bounded): take what is newer than what was counted.
            if f.read_to_string(&mut text).is_err() {
                return;
            }
            let newest = self.newest_ns;
            let end = text.rfind('\n').map_or(0, |i| i + 1);
            for r in text[..end]
                .lines()
                .filter_map(|l| serde_json::from_str::<Record>(l).ok())
                .filter(|r| r.ended_ns > newest)
            {
                self.count(&r);
            }
            self.cursor = end as u64;
            return;
        }
        if f.seek(SeekFrom::Start(self.cursor)).is_err()
            || f.take(len - self.cursor).read_to_string(&mut text).is_err()
        {
            return;
        }
        // Whole lines only: a writer may be half-way through one.
        let end = text.rfind('\n').map_or(0, |i| i + 1);
        for r in text[..end]
            .lines()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
        {
            self.count(&r);
        }
        self.cursor += end as u64;
    }
}

/// Everything one scrape shows.
pub struct Snapshot<'a> {
    pub out: &'a Outgoing,
    /// Outgoing migrations under way now.
    pub out_running: u64,
    pub incoming: Counts,
    pub incoming_running: u64,
    pub guests: u64,
    pub drained: bool,
}

/// The Prometheus text (format 0.0.4).
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let out_started = s.out.counts.started + s.out_running;
    let counters: [(&str, &str, u64, u64); 4] = [
        (
            "blip_migrations_started_total",
            "Migrations started (out: the ones ended plus those under way).",
            out_started,
            s.incoming.started,
        ),
        (
            "blip_migrations_succeeded_total",
            "Migrations that moved their guest.",
            s.out.counts.succeeded,
            s.incoming.succeeded,
        ),
        (
            "blip_migrations_failed_total",
            "Migrations that failed (the guest stayed on the source).",
            s.out.counts.failed,
            s.incoming.failed,
        ),
        (
            "blip_migrations_in_doubt_total",
            "Handovers nobody confirmed (blip resolve).",
            s.out.counts.in_doubt,
            s.incoming.in_doubt,
        ),
    ];
    for (name, help, out, inc) in counters {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(o, "{name}{{direction=\"out\"}} {out}");
        let _ = writeln!(o, "{name}{{direction=\"in\"}} {inc}");
    }
    let _ = writeln!(
        o,
        "# HELP blip_migrations_running Migrations under way.\n# TYPE blip_migrations_running gauge"
    );
    let _ = writeln!(
        o,
        "blip_migrations_running{{direction=\"out\"}} {}",
        s.out_running
    );
    let _ = writeln!(
        o,
        "blip_migrations_running{{direction=\"in\"}} {}",
        s.incoming_running
    );
    let _ = writeln!(
        o,
        "# HELP blip_migration_bytes_total Bytes of guest memory sent by migrations off this host.\n# TYPE blip_migration_bytes_total counter"
    );
    let _ = writeln!(
        o,
        "blip_migration_bytes_total{{direction=\"out\"}} {}",
        s.out.counts.bytes
    );
    s.out.blackout.render(
        &mut o,
        "blip_migration_blackout_seconds",
        "VMM blackout of the migrations off this host.",
    );
    s.out.total.render(
        &mut o,
        "blip_migration_duration_seconds",
        "Total time of the migrations off this host.",
    );
    let _ = writeln!(
        o,
        "# HELP blip_guests_running Guests registered on this host.\n# TYPE blip_guests_running gauge\nblip_guests_running {}",
        s.guests
    );
    let _ = writeln!(
        o,
        "# HELP blip_host_drained 1 while the host is drained (takes no guests).\n# TYPE blip_host_drained gauge\nblip_host_drained {}",
        s.drained as u8
    );
    o
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [50e-6, 100e-6, 3e-3, 20.0] {
            h.observe(s);
        }
        let mut o = String::new();
        h.render(&mut o, "x", "help");
        assert!(o.contains("x_bucket{le=\"0.0001\"} 2\n"), "{o}");
        assert!(o.contains("x_bucket{le=\"0.005\"} 3\n"), "{o}");
        assert!(o.contains("x_bucket{le=\"10\"} 3\n"), "{o}");
        assert!(o.contains("x_bucket{le=\"+Inf\"} 4\n"), "{o}");
        assert!(o.contains("x_count 4\n"), "{o}");
    }
}
