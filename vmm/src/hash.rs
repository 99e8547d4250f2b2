//! FNV-1a, the one non-cryptographic hash blip uses for fingerprints and digests that both
//! ends of a migration compute and compare (the CPU fingerprint, the host's boot id, the
//! guest-memory digest of `--verify`).
//!
//! Why FNV-1a: it is tiny, has no dependencies and its values are fixed by its definition, so
//! two blip builds agree on them. It is not collision-resistant against an adversary; nothing
//! here needs that (authentication uses HMAC-SHA256, integrity CRC32C).
//!
//! Two step sizes exist because the callers fold different units: [`Fnv::bytes`] is the
//! classic byte-wise FNV-1a, [`Fnv::word`] folds a whole integer in one step (the CPUID
//! fingerprint folds CPUID registers, the memory digest per-MiB CRCs).
//!
//! The prime is FNV's 64-bit prime, 2^40 + 0x1b3 (checked against the published test vectors
//! below). The three copies this module replaced multiplied by `0x1000_0000_01b3` (2^44 + 0x1b3,
//! one hex digit off), so a digest or fingerprint from a build before this module differs from
//! one after it; both ends of a migration compute them with the same build.

/// FNV-1a 64-bit offset basis.
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime (2^40 + 0x1b3).
const PRIME: u64 = 0x100_0000_01b3;

/// An FNV-1a (64-bit) hasher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

impl Fnv {
    /// A hasher at the offset basis.
    pub const fn new() -> Fnv {
        Fnv(OFFSET)
    }

    /// Folds in `v` as one unit (`h = (h ^ v) * prime`).
    pub fn word(&mut self, v: u64) -> &mut Fnv {
        self.0 = (self.0 ^ v).wrapping_mul(PRIME);
        self
    }

    /// Folds in each byte of `b` (classic FNV-1a).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Fnv {
        for x in b {
            self.word(u64::from(*x));
        }
        self
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a (64-bit) of `b`.
pub fn fnv1a(b: &[u8]) -> u64 {
    Fnv::new().bytes(b).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn words_fold_in_one_step() {
        let mut h = Fnv::new();
        h.word(0x1234).word(7);
        let by_hand = [0x1234u64, 7]
            .iter()
            .fold(OFFSET, |h, v| (h ^ v).wrapping_mul(PRIME));
        assert_eq!(h.finish(), by_hand);
        // Bytes are words of one byte each.
        let mut w = Fnv::new();
        w.word(u64::from(b'a'));
        assert_eq!(w.finish(), fnv1a(b"a"));
    }
}
