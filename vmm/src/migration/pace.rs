//! Pre-copy bandwidth limit (`blip migrate --max-bandwidth`).
//!
//! Why: pre-copy competes with the guest and with the host's other traffic for the link and,
//! on a host with few CPUs, for the CPU: much of a TCP sender's work happens in the kernel's
//! softirq when acknowledgements arrive, which no nice value reaches. A migration that fills
//! the link sends in bursts as long as the socket's send buffer; one paced in small pieces
//! leaves the kernel only a piece's worth of work at a time. Operators of shared links expect
//! the knob too (QEMU's `max-bandwidth`).
//!
//! What: one [`Pacer`] per migration, shared by its data streams (the limit is for the whole
//! migration, not per stream). A sender asks for at most [`CHUNK`] bytes at a time and sleeps
//! until they are due on a virtual clock that advances `bytes / rate` per piece; a pacer idle
//! for a while gives no credit beyond [`BURST`], so a round that starts after a quiet spell
//! does not go out at full speed. Everything sent while the guest runs is paced, the last live
//! round (on the controller's path) included; the final pages, inside the blackout, are not.
//!
//! The convergence controller measures bandwidth from the paced rounds, so it predicts the
//! final pages at the paced rate, not the link's: with a limit it stops later than it must and
//! the blackout comes out below its prediction.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most bytes one paced write carries (and so the longest burst the kernel sees at once).
pub const CHUNK: usize = 64 << 10;

/// Credit an idle pacer keeps: how far its virtual clock may lag behind the real one.
pub const BURST: Duration = Duration::from_millis(10);

/// The bandwidth limit of one migration's data streams.
#[derive(Debug)]
pub struct Pacer {
    /// Bytes per second (> 0).
    rate: u64,
    /// When the next byte may go: the virtual clock.
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second; `None` for 0 (no limit).
    pub fn new(rate: u64) -> Option<Pacer> {
        (rate > 0).then(|| Pacer {
            rate,
            next: Mutex::new(None),
        })
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Sleeps until `bytes` may go. Call before writing them; ask for at most [`CHUNK`].
    pub fn take(&self, bytes: usize) {
        let wait = self.reserve(Instant::now(), bytes as u64);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Books `bytes` at `now` on the virtual clock and returns how long to wait before
    /// sending them (pure: the clock is the caller's).
    fn reserve(&self, now: Instant, bytes: u64) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = match *next {
            Some(t) if t > floor => t,
            _ => floor,
        };
        let cost = Duration::from_nanos(
            u64::try_from(u128::from(bytes) * 1_000_000_000 / u128::from(self.rate))
                .unwrap_or(u64::MAX),
        );
        *next = Some(start + cost);
        start.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_zero_means_no_limit() {
        assert!(Pacer::new(0).is_none());
        assert_eq!(Pacer::new(5).unwrap().rate(), 5);
    }

    #[test]
    fn pace_spreads_pieces_at_the_rate() {
        // 1 MiB/s: a 64 KiB piece costs 62.5 ms.
        let p = Pacer::new(1 << 20).unwrap();
        let t0 = Instant::now() + Duration::from_secs(1);
        // The first piece goes now (with up to BURST of credit, the clock starts BURST back).
        assert_eq!(p.reserve(t0, CHUNK as u64), Duration::ZERO);
        let piece = Duration::from_micros(62_500);
        // At the same instant the next pieces wait one, then two pieces' time (less the
        // credit).
        assert_eq!(p.reserve(t0, CHUNK as u64), piece - BURST);
        assert_eq!(p.reserve(t0, CHUNK as u64), piece * 2 - BURST);
        // Over any span the bytes booked never exceed rate * span + one piece + the credit.
        let mut booked = 3 * CHUNK as u64;
        let mut now = t0;
        for i in 0..200u64 {
            now += Duration::from_micros(i * 37 % 5_000);
            let wait = p.reserve(now, CHUNK as u64);
            booked += CHUNK as u64;
            let sent_by = (now + wait).duration_since(t0);
            let allowed = (sent_by + BURST).as_secs_f64() * (1 << 20) as f64 + CHUNK as f64;
            assert!(
                booked as f64 <= allowed + 1.0,
                "{booked} > {allowed} at {i}"
            );
        }
    }

    #[test]
    fn pace_gives_no_credit_beyond_the_burst_after_a_quiet_spell() {
        let p = Pacer::new(1 << 20).unwrap();
        let t0 = Instant::now() + Duration::from_secs(1);
        p.reserve(t0, CHUNK as u64);
        // Ten seconds idle: the next piece goes at once, the one after pays again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(later, CHUNK as u64), Duration::ZERO);
        let w = p.reserve(later, CHUNK as u64);
        assert!(w > Duration::from_millis(50), "{w:?}");
    }
}
