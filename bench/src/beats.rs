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

/// The beat timestamps of one VMM process's serial line, filled by a reader thread.
#[derive(Clone, Default)]
pub struct Beats(Arc<Mutex<Vec<Instant>>>);

impl Beats {
    /// Reads `r` until EOF on a thread, stamping each `*`.
    pub fn start(mut r: impl Read + Send + 'static) -> Beats {
        let b = Beats::default();
        let v = b.0.clone();
        std::thread::spawn(move || {
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

#[cfg(test)]
mod tests {
    use super::*;

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
