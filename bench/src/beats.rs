//! Guest-observed blackout from serial heartbeats, the same way for every VMM.
//!
//! The embedded guest with `heartbeat period=<µs> via=serial` writes one `*` byte to COM1 per
//! beat. The VMM under test sends COM1 to a pipe; a thread here reads it and stamps every `*`
//! with the host's monotonic clock (`Instant`, CLOCK_MONOTONIC) as it arrives. A migration's
//! guest-observed blackout is then the largest gap between consecutive beats of the source and
//! destination streams merged, from the moment the migration was asked for to the destination's
//! first beat. Pipe and reader-thread delays are in the figure for both VMMs alike.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Heartbeat period of the bench's guests (µs), blip's and QEMU's alike.
pub const PERIOD_US: u64 = 100;

/// The beat timestamps of one VMM process's serial line, filled by a reader thread.
#[derive(Clone, Default)]
pub struct Beats(Arc<Mutex<Vec<Instant>>>);

impl Beats {
    /// Reads `r` until EOF on a thread, stamping each `*`.
    pub fn start(mut r: impl Read + Send + 'static) -> Beats {
        let b = Beats::default();
        let v = b.0.clone();
        std::thread::spawn(move || {
            crate::migrate::place_reader();
            let mut buf = [0u8; 256];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let now = Instant::now();
                        let k = buf[..n].iter().filter(|&&c| c == b'*').count();
                        if k > 0 {
                            let mut g = v.lock().unwrap_or_else(|e| e.into_inner());
                            g.extend(std::iter::repeat_n(now, k));
                        }
                    }
                }
            }
        });
        b
    }

    /// A copy of the timestamps so far.
    pub fn snapshot(&self) -> Vec<Instant> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many beats so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits (hang guard `limit`, not a timing) for a first beat at or after `after`.
    pub fn wait_beat_after(&self, after: Instant, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last()
                .is_some_and(|&t| t >= after)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A migration's beat gaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gaps {
    /// The guest-observed blackout: the largest gap between consecutive beats of the source and
    /// destination merged, from the last source beat before the migration was asked for (or
    /// that moment itself) up to the destination's first beat. Pre-copy stalls count.
    pub max_ns: u64,
    /// Last source beat to the destination's first beat: the handover alone.
    pub handover_ns: u64,
    /// Where the largest gap began, from the migrate request (negative: before it).
    pub max_at_ns: i64,
}

/// The gaps of one migration asked for at `start`; None when the destination never beat.
pub fn gaps(src: &[Instant], dst: &[Instant], start: Instant) -> Option<Gaps> {
    let first_dst = *dst.first()?;
    let mut ts: Vec<Instant> = Vec::with_capacity(src.len() + 2);
    ts.push(
        src.iter()
            .rev()
            .find(|&&t| t < start)
            .copied()
            .unwrap_or(start),
    );
    ts.extend(
        src.iter()
            .copied()
            .filter(|&t| t >= start && t <= first_dst),
    );
    ts.push(first_dst);
    ts.sort();
    let (max_ns, at) = ts
        .windows(2)
        .map(|w| (w[1].duration_since(w[0]).as_nanos() as u64, w[0]))
        .max_by_key(|&(g, _)| g)?;
    let max_at_ns = if at >= start {
        at.duration_since(start).as_nanos() as i64
    } else {
        -(start.duration_since(at).as_nanos() as i64)
    };
    let last_src = ts[ts.len() - 2];
    Some(Gaps {
        max_ns,
        handover_ns: first_dst.saturating_duration_since(last_src).as_nanos() as u64,
        max_at_ns,
    })
}

/// Where a migration's instants lie on CLOCK_MONOTONIC (ns): asked for, source paused (0 when
/// the VMM does not say), destination resumed (from the source's report), and the report
/// received.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start_ns: u64,
    pub pause_ns: u64,
    pub resume_ns: u64,
    pub end_ns: u64,
}

/// How long after the resume counts as "right after resume" (the destination rebuilding its
/// mappings).
pub const AFTER_RESUME_NS: u64 = 10_000_000;

/// One migration's guest-observed gaps at full resolution, split by where they lie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// (a) The gap across the blackout: last source beat to first destination beat.
    pub inside_ns: u64,
    /// (b) The largest gap outside it while the migration ran: from the request to the last
    /// source beat, and from the first destination beat to the report.
    pub outside_ns: u64,
    /// (c) The largest gap between destination beats in the first 10 ms after resume.
    pub after_resume_ns: u64,
    /// (a) in parts, where the pause is known: the last source beat → the pause request
    /// (the guest's own beat spacing; none of it is blackout) ...
    pub beat_to_pause_ns: Option<u64>,
    /// ... and the destination's resume → its first beat (the guest running again, faulting
    /// in its mappings, up to its next beat).
    pub resume_to_beat_ns: u64,
}

/// The largest gap between consecutive `times` (sorted) whose later beat lies in `lo..=hi`.
pub fn largest_gap_in(times: &[u64], lo: u64, hi: u64) -> u64 {
    times
        .windows(2)
        .filter(|w| (lo..=hi).contains(&w[1]))
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0)
}

/// Splits the gaps of full beat timelines (source and destination, CLOCK_MONOTONIC ns, sorted)
/// around `w`. None when either side has no beat where one is needed.
pub fn split(src: &[u64], dst: &[u64], w: &Window) -> Option<Split> {
    // The source guest never runs after the pause (a serial beat may be stamped after it: the
    // pipe delivers late), so its last beat up to the report is the one before the blackout.
    let last_src = *src.iter().rfind(|&&t| t <= w.end_ns)?;
    let first_dst = *dst.iter().find(|&&t| t >= w.resume_ns)?;
    let dst_after = largest_gap_in(dst, first_dst + 1, w.end_ns.max(first_dst));
    Some(Split {
        inside_ns: first_dst.saturating_sub(last_src),
        outside_ns: largest_gap_in(src, w.start_ns, last_src).max(dst_after),
        after_resume_ns: largest_gap_in(dst, first_dst + 1, w.resume_ns + AFTER_RESUME_NS),
        beat_to_pause_ns: (w.pause_ns > 0).then(|| w.pause_ns.saturating_sub(last_src)),
        resume_to_beat_ns: first_dst - w.resume_ns,
    })
}

/// The same split for port heartbeats: the source side comes from blip's report (its last beat
/// before the pause is in `guest_blackout_ns`, its largest gap before in
/// `guest_gap_before_pause_ns`), the destination side from its beat timestamps.
pub fn split_port(inside_ns: u64, before_pause_ns: u64, dst: &[u64], w: &Window) -> Option<Split> {
    let first_dst = *dst.iter().find(|&&t| t >= w.resume_ns)?;
    let dst_after = largest_gap_in(dst, first_dst + 1, w.end_ns.max(first_dst));
    let last_src = first_dst.saturating_sub(inside_ns);
    Some(Split {
        inside_ns,
        outside_ns: before_pause_ns.max(dst_after),
        after_resume_ns: largest_gap_in(dst, first_dst + 1, w.resume_ns + AFTER_RESUME_NS),
        beat_to_pause_ns: (w.pause_ns > 0).then(|| w.pause_ns.saturating_sub(last_src)),
        resume_to_beat_ns: first_dst - w.resume_ns,
    })
}

/// `Instant`s (CLOCK_MONOTONIC on Linux) as CLOCK_MONOTONIC ns, the clock of blip's reports.
pub fn mono_ns(ts: &[Instant]) -> Vec<u64> {
    let (i0, n0) = (Instant::now(), blip_vmm::devices::now_ns());
    ts.iter()
        .map(|&t| {
            if t <= i0 {
                n0.saturating_sub(i0.duration_since(t).as_nanos() as u64)
            } else {
                n0 + t.duration_since(i0).as_nanos() as u64
            }
        })
        .collect()
}

/// The heartbeat timestamps a running blip keeps (its API's `heartbeats` request).
pub fn port_beats(api: &std::path::Path, since_ns: u64) -> Result<Vec<u64>, String> {
    use blip_vmm::api::{call, Reply, Request};
    match call(api, &Request::Heartbeats { since_ns }, &mut |_| {}) {
        Ok(Reply::Heartbeats { t_ns }) => Ok(t_ns),
        Ok(other) => Err(format!("unexpected reply to heartbeats: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Per-cell histograms of [`Split`] (ns).
pub struct SplitHists {
    pub inside: hdrhistogram::Histogram<u64>,
    pub outside: hdrhistogram::Histogram<u64>,
    pub after_resume: hdrhistogram::Histogram<u64>,
    pub beat_to_pause: hdrhistogram::Histogram<u64>,
    pub resume_to_beat: hdrhistogram::Histogram<u64>,
}

impl SplitHists {
    pub fn new() -> Self {
        SplitHists {
            inside: crate::report::hist(),
            outside: crate::report::hist(),
            after_resume: crate::report::hist(),
            beat_to_pause: crate::report::hist(),
            resume_to_beat: crate::report::hist(),
        }
    }

    pub fn record(&mut self, s: &Split) {
        self.inside.saturating_record(s.inside_ns);
        self.outside.saturating_record(s.outside_ns);
        self.after_resume.saturating_record(s.after_resume_ns);
        if let Some(b) = s.beat_to_pause_ns {
            self.beat_to_pause.saturating_record(b);
        }
        self.resume_to_beat.saturating_record(s.resume_to_beat_ns);
    }

    pub fn json(&self, period_us: u64) -> serde_json::Value {
        use crate::report::summary;
        serde_json::json!({
            "heartbeat_period_us": period_us,
            "inside_blackout_ns": summary(&self.inside),
            "outside_blackout_ns": summary(&self.outside),
            "first_10ms_after_resume_ns": summary(&self.after_resume),
            "inside_last_beat_to_pause_ns": summary(&self.beat_to_pause),
            "inside_resume_to_first_beat_ns": summary(&self.resume_to_beat),
        })
    }

    /// One line under the cell's row: p50 / max of each, in µs.
    pub fn line(&self, what: &str, period_us: u64) -> String {
        if self.inside.is_empty() {
            return format!("  gaps  | {what}: no beat timeline");
        }
        let pm = |h: &hdrhistogram::Histogram<u64>| {
            format!(
                "{:.0}/{:.0}",
                crate::report::us(h.value_at_quantile(0.5)),
                crate::report::us(h.max())
            )
        };
        let parts = if self.beat_to_pause.is_empty() {
            format!("resume to first beat {}", pm(&self.resume_to_beat))
        } else {
            format!(
                "last beat to pause {}, resume to first beat {}",
                pm(&self.beat_to_pause),
                pm(&self.resume_to_beat)
            )
        };
        format!(
            "  gaps  | {what} beat {period_us} us, p50/max us: inside blackout {} ({parts}) | outside {} | first 10 ms after resume {}",
            pm(&self.inside),
            pm(&self.outside),
            pm(&self.after_resume)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_places_gaps_around_the_blackout() {
        let us = |u: u64| u * 1000;
        // Beats every 100 us; a 400 us stall at 1000 (tracking start), pause at 3000,
        // resume at 3500, a 300 us gap at 3800 on the destination, report at 4500.
        let src: Vec<u64> = (0..=10).chain(14..=29).map(|i| us(i * 100)).collect();
        let dst: Vec<u64> = [
            3520, 3600, 3700, 3800, 4100, 4200, 4300, 4400, 4500, 20000, 30000,
        ]
        .map(us)
        .to_vec();
        let w = Window {
            start_ns: us(500),
            pause_ns: us(3000),
            resume_ns: us(3500),
            end_ns: us(4500),
        };
        let s = split(&src, &dst, &w).unwrap();
        assert_eq!(
            s,
            Split {
                inside_ns: us(3520 - 2900),
                outside_ns: us(400),
                after_resume_ns: us(300),
                beat_to_pause_ns: Some(us(100)),
                resume_to_beat_ns: us(20),
            }
        );
        let unknown = Window { pause_ns: 0, ..w };
        assert_eq!(split(&src, &dst, &unknown).unwrap().beat_to_pause_ns, None);
        // The 10 ms window ends at 13500: the 15500 us gap to 20000 is outside it.
        assert_eq!(split(&src, &[], &w), None);
        let p = split_port(us(620), us(400), &dst, &w).unwrap();
        assert_eq!(p, s);
        assert_eq!(largest_gap_in(&[1, 5, 6], 0, 10), 4);
        assert_eq!(largest_gap_in(&[1], 0, 10), 0);
    }

    #[test]
    fn largest_gap_spans_the_handover() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let src = [ms(0), ms(1), ms(2), ms(3), ms(4), ms(10), ms(11)];
        let dst = [ms(30), ms(31)];
        // Asked at 3 ms: beats 2 (last before), 3, 4, 10, 11, then 30 on the destination.
        assert_eq!(
            gaps(&src, &dst, ms(3) - Duration::from_micros(500)),
            Some(Gaps {
                max_ns: 19_000_000,
                handover_ns: 19_000_000,
                max_at_ns: 8_500_000
            })
        );
        assert_eq!(gaps(&src, &[], ms(3)), None);
        // A long pre-copy stall counts too; the handover is only the last hop.
        let src = [ms(0), ms(1), ms(50), ms(51)];
        assert_eq!(
            gaps(&src, &[ms(53)], ms(0) + Duration::from_micros(10)),
            Some(Gaps {
                max_ns: 49_000_000,
                handover_ns: 2_000_000,
                max_at_ns: 990_000
            })
        );
    }

    #[test]
    fn reader_stamps_each_star() {
        let b = Beats::start(std::io::Cursor::new(b"**x*\n".to_vec()));
        let t = Instant::now() + Duration::from_secs(5);
        while b.len() < 3 && Instant::now() < t {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(b.len(), 3);
    }
}
