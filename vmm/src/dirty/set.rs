//! The dirty set: one bit per guest page, set lock-free from any thread, taken atomically per
//! round as sorted runs of contiguous pages (the unit the transports send).
//!
//! Marking is an atomic OR, so the same page reported by the KVM ring, the KVM bitmap and the
//! VMM's own writes is deduplicated for free. Taking swaps each 64-bit word with zero: a page
//! marked concurrently with a take lands either in this round or in the next, never nowhere.

use std::sync::atomic::{AtomicU64, Ordering};

/// A run of contiguous guest pages: `first` is a page frame number (gpa / 4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub pages: u64,
}

impl Run {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.first * crate::memory::PAGE_SIZE
    }
}

/// An atomic bitmap over all guest pages.
pub struct DirtySet {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DirtySet {
    /// A set over `pages` guest pages, all clean.
    pub fn new(pages: u64) -> Self {
        DirtySet {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks one page dirty. Out-of-range pages are ignored (and reported as `false`).
    #[inline]
    pub fn mark(&self, pfn: u64) -> bool {
        if pfn >= self.pages {
            return false;
        }
        self.words[(pfn / 64) as usize].fetch_or(1 << (pfn % 64), Ordering::Relaxed);
        true
    }

    /// ORs a 64-page bitmap word in at word index `w` (used to merge KVM's and vm-memory's
    /// bitmaps without walking bits).
    #[inline]
    pub fn mark_word(&self, w: usize, bits: u64) {
        if bits != 0 {
            if let Some(word) = self.words.get(w) {
                word.fetch_or(bits & self.valid_mask(w), Ordering::Relaxed);
            }
        }
    }

    fn valid_mask(&self, w: usize) -> u64 {
        let end = (w as u64 + 1) * 64;
        if end <= self.pages {
            u64::MAX
        } else {
            let valid = self.pages - w as u64 * 64;
            (1u64 << valid) - 1
        }
    }

    /// Marks every page dirty (the answer to an impossible ring state: resend everything).
    pub fn mark_all(&self) {
        for w in 0..self.words.len() {
            self.words[w].fetch_or(self.valid_mask(w), Ordering::Relaxed);
        }
    }

    /// Number of dirty pages right now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Takes every dirty page (clearing the set) as sorted, maximal runs.
    pub fn take_runs(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let start = bits.trailing_zeros() as u64;
                let len = (bits >> start).trailing_ones() as u64;
                let first = w as u64 * 64 + start;
                match runs.last_mut() {
                    Some(r) if r.first + r.pages == first => r.pages += len,
                    _ => runs.push(Run { first, pages: len }),
                }
                if start + len >= 64 {
                    break;
                }
                bits &= !(((1u64 << len) - 1) << start);
            }
        }
        runs
    }
}

/// Splits runs so none is longer than `max` pages (transports bound their frames).
pub fn split_runs(runs: &[Run], max: u64) -> Vec<Run> {
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        let mut first = r.first;
        let mut left = r.pages;
        while left > 0 {
            let n = left.min(max.max(1));
            out.push(Run { first, pages: n });
            first += n;
            left -= n;
        }
    }
    out
}

/// Total pages in `runs`.
pub fn run_pages(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.pages).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn runs_round_trip_random_sets() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let pages = 1 + rng.next() % 5000;
            let set = DirtySet::new(pages);
            let mut want = std::collections::BTreeSet::new();
            let n = rng.next() % (pages + 1);
            for _ in 0..n {
                // Mix single pages and bursts so runs cross word boundaries.
                let p = rng.next() % pages;
                let len = if case % 3 == 0 {
                    1 + rng.next() % 200
                } else {
                    1
                };
                for q in p..(p + len).min(pages) {
                    set.mark(q);
                    want.insert(q);
                }
            }
            assert_eq!(set.count(), want.len() as u64);
            let runs = set.take_runs();
            let got: Vec<u64> = runs
                .iter()
                .flat_map(|r| r.first..r.first + r.pages)
                .collect();
            assert_eq!(got, want.iter().copied().collect::<Vec<_>>());
            // Maximal and sorted: consecutive runs never touch.
            for w in runs.windows(2) {
                assert!(w[0].first + w[0].pages < w[1].first);
            }
            assert_eq!(set.count(), 0, "take clears the set");
            let split = split_runs(&runs, 7);
            assert!(split.iter().all(|r| r.pages <= 7 && r.pages > 0));
            assert_eq!(run_pages(&split), want.len() as u64);
        }
    }

    #[test]
    fn full_words_and_edges() {
        let set = DirtySet::new(130);
        set.mark_all();
        assert_eq!(set.count(), 130);
        assert_eq!(
            set.take_runs(),
            vec![Run {
                first: 0,
                pages: 130
            }]
        );
        assert!(!set.mark(130));
        set.mark_word(2, u64::MAX);
        assert_eq!(
            set.take_runs(),
            vec![Run {
                first: 128,
                pages: 2
            }]
        );
        set.mark(63);
        set.mark(64);
        assert_eq!(
            set.take_runs(),
            vec![Run {
                first: 63,
                pages: 2
            }]
        );
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let set = std::sync::Arc::new(DirtySet::new(1 << 16));
        let mut seen = vec![false; 1 << 16];
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let s = set.clone();
                std::thread::spawn(move || {
                    for p in (t..(1 << 16)).step_by(4) {
                        s.mark(p);
                    }
                })
            })
            .collect();
        let mut taken = 0;
        while writers.iter().any(|w| !w.is_finished()) {
            for r in set.take_runs() {
                for p in r.first..r.first + r.pages {
                    assert!(!seen[p as usize]);
                    seen[p as usize] = true;
                    taken += 1;
                }
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        for r in set.take_runs() {
            for p in r.first..r.first + r.pages {
                seen[p as usize] = true;
                taken += 1;
            }
        }
        assert_eq!(taken, 1 << 16);
        assert!(seen.iter().all(|s| *s));
    }
}
