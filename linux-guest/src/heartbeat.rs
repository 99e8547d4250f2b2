//! The heartbeat line the workload prints and the analysis of a console log full of them.
//!
//! Every period (100 ms by default) the workload prints `HB <n> mono=<ns> real=<ns>`:
//! a counter that goes up by one per line and the guest's CLOCK_MONOTONIC and CLOCK_REALTIME.
//! From a console log (several logs of one guest that moved between hosts, concatenated in
//! order) [`analyze`] finds: lost lines (a counter that skips), the largest step of the
//! monotonic clock between consecutive lines (the guest-observed pause: a blackout shows up
//! there), and clocks that went backwards. Console lines may carry a `\r` or kernel messages
//! in front: the parser looks for the `HB ` token anywhere in the line.
//!
//! Compiled into the library (unit tests, the `hb-check` command) and into the workload.

/// One heartbeat line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub n: u64,
    pub mono_ns: u64,
    pub real_ns: u64,
}

/// The line for `beat`, without the newline.
pub fn format(beat: &Beat) -> String {
    format!("HB {} mono={} real={}", beat.n, beat.mono_ns, beat.real_ns)
}

/// The heartbeat in `line`, if it holds a whole one.
pub fn parse(line: &str) -> Option<Beat> {
    let at = line.find("HB ")?;
    let mut it = line[at + 3..].split_ascii_whitespace();
    let n = it.next()?.parse().ok()?;
    let mono_ns = it.next()?.strip_prefix("mono=")?.parse().ok()?;
    let real_ns = it.next()?.strip_prefix("real=")?.parse().ok()?;
    Some(Beat {
        n,
        mono_ns,
        real_ns,
    })
}

/// The consoles of one guest that moved between hosts, as the one stream its serial port wrote:
/// byte after byte, in order, with nothing put between them. A line the guest was writing when
/// it paused starts in one host's log and ends in the next (`HB` on the source, ` 1243 mono=…`
/// on the destination); a newline put between the logs cut that beat in two and it counted as
/// lost (soft-RoCE `linux-migrate-tcp`, 2026-12-02).
pub fn join_consoles(parts: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&parts.concat()).into_owned()
}

/// The counter of a cut heartbeat line (`HB <n> ` followed by anything but a whole beat).
fn fragment(line: &str) -> Option<u64> {
    let at = line.find("HB ")?;
    let rest = &line[at + 3..];
    let end = rest.find(' ')?;
    rest[..end].parse().ok()
}

/// What a log of heartbeats shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Analysis {
    /// Heartbeat lines found.
    pub beats: u64,
    pub first: Option<Beat>,
    pub last: Option<Beat>,
    /// Counter values missing between consecutive lines (sum over all skips), not counting
    /// beats whose line was cut (see `garbled`).
    pub missing: u64,
    /// Beats whose line was cut by other console output (a kernel message printed in the
    /// middle of it): `HB <n> ` is there but not the whole line. They were printed, so they
    /// are not missing; their clocks are unknown, so the gap around them spans two periods.
    pub garbled: u64,
    /// Places where the counter did not go up by exactly one: (previous n, next n).
    pub counter_breaks: Vec<(u64, u64)>,
    /// The largest CLOCK_MONOTONIC step between consecutive lines, and the counter after it.
    pub max_gap_ns: u64,
    pub max_gap_at: u64,
    /// Consecutive lines whose monotonic clock did not increase.
    pub mono_backwards: u64,
    /// Consecutive lines whose realtime clock went backwards.
    pub real_backwards: u64,
}

impl Analysis {
    /// Monotonic time from the first to the last beat.
    pub fn mono_span_ns(&self) -> u64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.mono_ns.saturating_sub(a.mono_ns),
            _ => 0,
        }
    }
}

/// Analyses the heartbeats of `log`, in order.
pub fn analyze(log: &str) -> Analysis {
    analyze_from(log, 0)
}

/// Analyses the heartbeats of `log` whose counter is at least `from` (the part of a run after
/// some event, e.g. from the last beat before a migration started).
pub fn analyze_from(log: &str, from: u64) -> Analysis {
    let mut a = Analysis::default();
    let mut prev: Option<Beat> = None;
    let mut cut = std::collections::BTreeSet::new();
    for line in log.lines().filter(|l| parse(l).is_none()) {
        if let Some(n) = fragment(line) {
            cut.insert(n);
        }
    }
    for beat in log.lines().filter_map(parse).filter(|b| b.n >= from) {
        a.beats += 1;
        if a.first.is_none() {
            a.first = Some(beat);
        }
        if let Some(p) = prev {
            if beat.n != p.n + 1 {
                let lost = (p.n + 1..beat.n).filter(|n| !cut.contains(n)).count() as u64;
                a.garbled += beat.n.saturating_sub(p.n + 1) - lost;
                if lost > 0 || beat.n <= p.n {
                    a.counter_breaks.push((p.n, beat.n));
                }
                a.missing += lost;
            }
            if beat.mono_ns <= p.mono_ns {
                a.mono_backwards += 1;
            } else if beat.mono_ns - p.mono_ns > a.max_gap_ns {
                a.max_gap_ns = beat.mono_ns - p.mono_ns;
                a.max_gap_at = beat.n;
            }
            // A realtime value with fewer digits than the one before is a line cut inside
            // its last number (the rest went to the next line), not a clock going back.
            let digits = |v: u64| v.checked_ilog10().unwrap_or(0);
            if beat.real_ns < p.real_ns && digits(beat.real_ns) == digits(p.real_ns) {
                a.real_backwards += 1;
            }
        }
        prev = Some(beat);
    }
    a.last = prev;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u64, mono_ms: u64) -> String {
        format(&Beat {
            n,
            mono_ns: mono_ms * 1_000_000,
            real_ns: 1_700_000_000_000_000_000 + mono_ms * 1_000_000,
        })
    }

    #[test]
    fn format_parses_back_even_behind_noise() {
        let beat = Beat {
            n: 42,
            mono_ns: 1_234_567_890,
            real_ns: 1_700_000_000_123_456_789,
        };
        let line = format(&beat);
        assert_eq!(line, "HB 42 mono=1234567890 real=1700000000123456789");
        assert_eq!(parse(&line), Some(beat));
        assert_eq!(parse(&format!("[   3.1] rcu: x{line}\r")), Some(beat));
        assert_eq!(parse("HB 42 mono=12"), None);
        assert_eq!(parse("CHECK OK 3"), None);
    }

    #[test]
    fn steady_beats_have_one_period_gaps() {
        let log: Vec<String> = (0..20).map(|n| b(n, 1000 + n * 100)).collect();
        let a = analyze(&log.join("\n"));
        assert_eq!(a.beats, 20);
        assert_eq!(a.max_gap_ns, 100_000_000);
        assert_eq!(a.missing, 0);
        assert!(a.counter_breaks.is_empty());
        assert_eq!(a.mono_span_ns(), 1_900_000_000);
        assert_eq!((a.mono_backwards, a.real_backwards), (0, 0));
    }

    #[test]
    fn a_blackout_is_the_largest_gap_and_logs_concatenate() {
        // Source log up to beat 9, destination log from beat 10 after a 450 ms pause.
        let src: Vec<String> = (0..10).map(|n| b(n, n * 100)).collect();
        let dst: Vec<String> = (10..15).map(|n| b(n, 900 + 550 + (n - 10) * 100)).collect();
        let log = format!(
            "{}\nWORKLOAD UP vcpus=1\n{}\nCHECK OK 3\n",
            src.join("\n"),
            dst.join("\r\n")
        );
        let a = analyze(&log);
        assert_eq!(a.beats, 15);
        assert_eq!(a.max_gap_ns, 550_000_000);
        assert_eq!(a.max_gap_at, 10);
        assert!(a.counter_breaks.is_empty());
    }

    #[test]
    fn a_beat_cut_by_the_move_joins_across_the_logs() {
        let src = format!("{}\n{}\nHB", b(1, 100), b(2, 200)).into_bytes();
        let dst = format!(" 3 mono=900000000 real=900000000\n{}\n", b(4, 1000)).into_bytes();
        let a = analyze(&join_consoles(&[src, dst]));
        assert_eq!(a.beats, 4);
        assert_eq!((a.missing, a.garbled), (0, 0));
        assert!(a.counter_breaks.is_empty());
        assert_eq!(a.max_gap_ns, 700_000_000);
    }

    #[test]
    fn lost_lines_and_backward_clocks_are_counted() {
        let log = [b(1, 100), b(2, 200), b(5, 500), b(6, 450), b(7, 600)].join("\n");
        let a = analyze(&log);
        assert_eq!(a.counter_breaks, vec![(2, 5)]);
        assert_eq!(a.missing, 2);
        assert_eq!(a.mono_backwards, 1);
        assert_eq!(a.real_backwards, 1);
        assert_eq!(a.max_gap_ns, 300_000_000);
        assert_eq!(a.max_gap_at, 5);
    }

    #[test]
    fn a_line_cut_by_a_kernel_message_is_not_lost() {
        let log = format!(
            "{}\nHB 2 mono=2000\n[ 33.2] clocksource: Long readout interval\n00000 real=5\n{}\n",
            b(1, 100),
            b(3, 300)
        );
        let a = analyze(&log);
        assert_eq!((a.beats, a.missing, a.garbled), (2, 0, 1));
        assert!(a.counter_breaks.is_empty());
        assert_eq!(a.max_gap_ns, 200_000_000);
        // Cut inside its realtime value: parsed, but the clock did not go back.
        let log = format!(
            "{}\nHB 2 mono=200000000 real=17\n00\n{}",
            b(1, 100),
            b(3, 300)
        );
        let a = analyze(&log);
        assert_eq!((a.beats, a.real_backwards, a.missing), (3, 0, 0));
        // A beat with no trace at all is lost.
        let a = analyze(&[b(1, 100), b(3, 300)].join("\n"));
        assert_eq!((a.missing, a.garbled, a.counter_breaks.len()), (1, 0, 1));
    }

    #[test]
    fn from_skips_the_start() {
        // A slow start (beat 1 came 5 s after beat 0), then steady beats.
        let log = [b(0, 0), b(1, 5000), b(2, 5100), b(3, 5200)].join("\n");
        assert_eq!(analyze(&log).max_gap_ns, 5_000_000_000);
        let a = analyze_from(&log, 1);
        assert_eq!((a.beats, a.max_gap_ns), (3, 100_000_000));
        assert_eq!(a.first.unwrap().n, 1);
    }

    #[test]
    fn empty_log() {
        let a = analyze("no heartbeats here\n");
        assert_eq!(a.beats, 0);
        assert_eq!(a.mono_span_ns(), 0);
    }
}
