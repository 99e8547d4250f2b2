//! The memory pattern the workload keeps rewriting, and its check.
//!
//! Every 4 KiB page of the region carries its own identity: word 0 is the page index, word 1
//! its generation (how many times the workload has written it), and words 2..512 a value mixed
//! from (index, generation, word). A page that a migration or a snapshot lost, tore or put in
//! the wrong place shows up as a wrong index, a stale generation or a wrong word: the check
//! says which. The workload keeps the expected generation of each page in its own (private)
//! memory, which travels with the guest like everything else.
//!
//! This module is compiled twice: into the `blip-linux-guest` library (unit tests) and into
//! the static workload executable by `build.rs` (plain `rustc`, no crates): std only.

/// Bytes per page.
pub const PAGE_BYTES: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = PAGE_BYTES / 8;

/// The value of word `w` (2..512) of page `index` at generation `gen` (splitmix64 finaliser).
pub fn word(index: u64, gen: u64, w: usize) -> u64 {
    let mut z = index
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gen.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add((w as u64).wrapping_mul(0x94d0_49bb_1331_11eb))
        .wrapping_add(0x2545_f491_4f6c_dd1d);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes page `index` at generation `gen` (`page` is its 512 words). The identity words go
/// last, so a page caught half-written never looks complete.
pub fn fill(page: &mut [u64], index: u64, gen: u64) {
    for (w, slot) in page.iter_mut().enumerate().skip(2) {
        *slot = word(index, gen, w);
    }
    page[1] = gen;
    page[0] = index;
}

/// A word that is not what the pattern says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub page: u64,
    pub word: usize,
    pub found: u64,
    pub expected: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.word {
            0 => "index",
            1 => "generation",
            _ => "data",
        };
        write!(
            f,
            "page={} word={} ({what}) found={:#x} expected={:#x}",
            self.page, self.word, self.found, self.expected
        )
    }
}

/// Which words of each page a check reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Every word.
    Full,
    /// The index, the generation, the last word and word `2 + k % 510` (a different one each
    /// round): cheap enough to run every second inside an emulated host.
    Sample(usize),
}

/// Checks page `index` (its 512 words) against generation `gen`.
pub fn verify(page: &[u64], index: u64, gen: u64, depth: Depth) -> Result<(), Mismatch> {
    let bad = |w: usize, expected: u64| Mismatch {
        page: index,
        word: w,
        found: page[w],
        expected,
    };
    if page[0] != index {
        return Err(bad(0, index));
    }
    if page[1] != gen {
        return Err(bad(1, gen));
    }
    match depth {
        Depth::Full => {
            for (w, &found) in page.iter().enumerate().skip(2) {
                let e = word(index, gen, w);
                if found != e {
                    return Err(bad(w, e));
                }
            }
        }
        Depth::Sample(k) => {
            for w in [2 + k % (PAGE_WORDS - 2), PAGE_WORDS - 1] {
                let e = word(index, gen, w);
                if page[w] != e {
                    return Err(bad(w, e));
                }
            }
        }
    }
    Ok(())
}

/// The region: its words and each page's expected generation.
pub struct Region {
    words: Vec<u64>,
    gens: Vec<u64>,
    /// The next page the writer rewrites.
    cursor: usize,
    /// Pages written since the start.
    pub writes: u64,
}

impl Region {
    /// A region of `pages` pages, each written once (generation 1).
    pub fn new(pages: usize) -> Region {
        let mut r = Region {
            words: vec![0; pages * PAGE_WORDS],
            gens: vec![0; pages],
            cursor: 0,
            writes: 0,
        };
        for _ in 0..pages {
            r.write_next();
        }
        r
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.gens.len()
    }

    /// Rewrites the next page (round robin) at its next generation.
    pub fn write_next(&mut self) {
        let i = self.cursor;
        self.gens[i] += 1;
        let gen = self.gens[i];
        fill(
            &mut self.words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS],
            i as u64,
            gen,
        );
        self.cursor = (i + 1) % self.gens.len();
        self.writes += 1;
    }

    /// Checks every page; the first mismatch.
    pub fn check(&self, depth: Depth) -> Result<(), Mismatch> {
        for (i, &gen) in self.gens.iter().enumerate() {
            verify(
                &self.words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS],
                i as u64,
                gen,
                depth,
            )?;
        }
        Ok(())
    }

    /// The highest generation (how many sweeps the writer has made).
    pub fn sweeps(&self) -> u64 {
        self.gens.first().copied().unwrap_or(0)
    }

    /// Test hook: one word of the region, for corrupting it.
    pub fn word_mut(&mut self, page: usize, w: usize) -> &mut u64 {
        &mut self.words[page * PAGE_WORDS + w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_region_checks_ok_full_and_sampled() {
        let mut r = Region::new(16);
        assert_eq!(r.sweeps(), 1);
        assert_eq!(r.check(Depth::Full), Ok(()));
        for _ in 0..40 {
            r.write_next();
            assert_eq!(r.check(Depth::Full), Ok(()));
            assert_eq!(r.check(Depth::Sample(r.writes as usize)), Ok(()));
        }
        assert_eq!(r.writes, 56);
        assert_eq!(r.sweeps(), 4);
    }

    #[test]
    fn corrupt_data_word_is_found_by_full_check() {
        let mut r = Region::new(8);
        *r.word_mut(5, 100) ^= 1;
        let m = r.check(Depth::Full).unwrap_err();
        assert_eq!((m.page, m.word), (5, 100));
        assert!(m.to_string().contains("(data)"), "{m}");
        // The sampled check reads word 100 in round 98.
        assert_eq!(r.check(Depth::Sample(98)).unwrap_err().word, 100);
        assert_eq!(r.check(Depth::Sample(0)), Ok(()));
    }

    #[test]
    fn stale_generation_and_wrong_index_are_named() {
        let mut r = Region::new(4);
        *r.word_mut(2, 1) = 0;
        let m = r.check(Depth::Sample(0)).unwrap_err();
        assert_eq!((m.page, m.word, m.expected), (2, 1, 1));
        assert!(m.to_string().contains("(generation)"));
        let mut r = Region::new(4);
        *r.word_mut(3, 0) = 1;
        assert!(r
            .check(Depth::Full)
            .unwrap_err()
            .to_string()
            .contains("page=3 word=0 (index)"));
    }

    #[test]
    fn an_all_zero_page_fails() {
        let page = [0u64; PAGE_WORDS];
        assert!(verify(&page, 0, 1, Depth::Full).is_err());
        assert!(verify(&page, 7, 1, Depth::Sample(3)).is_err());
    }

    #[test]
    fn words_differ_by_index_generation_and_position() {
        assert_ne!(word(1, 1, 2), word(2, 1, 2));
        assert_ne!(word(1, 1, 2), word(1, 2, 2));
        assert_ne!(word(1, 1, 2), word(1, 1, 3));
    }
}
