//! The saved-state envelope (`persist::decode` / `decode_from`) on hostile input.
//!
//! The first input byte picks how the rest is used:
//! - `0`: the raw bytes go to `decode` and `decode_from`;
//! - `1`: the bytes are a bincode payload, wrapped in an envelope with the right length and CRC
//!   so the fuzzer gets past the CRC and into the state decoder;
//! - `2`: (offset, value) patches applied to a valid envelope built at start-up, CRC fixed
//!   afterwards or not.
//!
//! The same bytes also go to `decode_early` (the early-state envelope, `BLIPERLY`): whatever
//! decodes re-encodes stably and merges into a state of its shape without a panic.
//!
//! Checks: no panic; `decode` and `decode_from` agree; whatever decodes re-encodes to an
//! envelope that decodes to the same encoding (kvm-bindings accepts short or long byte blobs
//! for its structs, so the first re-encoding may differ from the input, the second may not).
#![no_main]

use std::sync::OnceLock;

use blip_fuzz::{sample_state, Bytes};
use blip_vmm::persist::{
    decode, decode_early, decode_from, encode, encode_early, PersistError, FORMAT_VERSION,
    HEADER_LEN, MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn valid_envelope() -> &'static [u8] {
    static ENV: OnceLock<Vec<u8>> = OnceLock::new();
    ENV.get_or_init(|| encode(&sample_state()).expect("sample state encodes"))
}

fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn fix_crc(b: &mut [u8]) {
    if b.len() >= HEADER_LEN {
        let crc = crc32c::crc32c(&b[HEADER_LEN..]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The early-state decoder on the same bytes.
fn check_early(bytes: &[u8]) {
    let Ok(early) = decode_early(bytes) else {
        return;
    };
    let once = encode_early(&early).expect("decoded early state does not encode");
    let back = decode_early(&once).expect("re-encoded early state does not decode");
    assert_eq!(back, early, "early state changed in a round trip");
    // A merge needs a state of the same shape: build one for a plausible vCPU count.
    if early.vcpus.len() > 256 {
        return;
    }
    let mut st = sample_state();
    st.vcpus = early
        .vcpus
        .iter()
        .map(|_| st.vcpus[0].clone())
        .collect();
    for (i, v) in st.vcpus.iter_mut().enumerate() {
        v.index = i as u8;
    }
    if early.check(st.vcpus.len()).is_ok() {
        st.merge_early(&early).expect("a checked early state merges");
    }
}

fn check(bytes: &[u8]) {
    check_early(bytes);
    let a = decode(bytes);
    let b = decode_from(&mut &bytes[..]);
    if let Err(e) = &a {
        let _ = e.to_string();
    }
    if let Err(e) = &b {
        let _ = e.to_string();
    }
    match (&a, &b) {
        (Ok(_), Err(e)) => panic!("decode accepted what decode_from refused: {e}"),
        // decode_from reads one envelope and leaves what follows; decode refuses it.
        (Err(PersistError::Trailing(_)), _) | (Err(_), Err(_)) => {}
        (Err(e), Ok(_)) => panic!("decode_from accepted what decode refused: {e}"),
        (Ok(_), Ok(_)) => {}
    }
    let Ok(st) = a else { return };
    let once = match encode(&st) {
        Ok(b) => b,
        // Padding short kvm-bindings blobs can push a near-limit state over the cap.
        Err(PersistError::TooLarge { .. }) => return,
        Err(e) => panic!("decoded state does not encode: {e}"),
    };
    let back = decode(&once).expect("re-encoded state does not decode");
    let twice = encode(&back).expect("state decoded twice does not encode");
    assert_eq!(once, twice, "state encoding is not stable after one round trip");
    assert_eq!(back.vcpus.len(), st.vcpus.len());
    assert_eq!(back.mem_size, st.mem_size);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(rest),
        1 => check(&envelope(rest)),
        _ => {
            let mut b = valid_envelope().to_vec();
            let mut p = Bytes(rest);
            let flags = p.u8();
            while !p.is_empty() {
                let at = p.u32() as usize;
                let v = p.u8();
                if b.is_empty() {
                    break;
                }
                let at = at % b.len();
                match p.u8() % 4 {
                    0 => b[at] = v,
                    1 => b[at] ^= v,
                    2 => b.truncate(at),
                    _ => b.splice(at..at, std::iter::repeat_n(v, usize::from(v % 16) + 1))
                        .for_each(drop),
                }
            }
            if flags & 1 != 0 && b.len() >= HEADER_LEN {
                let len = (b.len() - HEADER_LEN) as u64;
                b[12..20].copy_from_slice(&len.to_le_bytes());
            }
            if flags & 2 != 0 {
                fix_crc(&mut b);
            }
            check(&b);
        }
    }
});
