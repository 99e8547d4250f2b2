//! The snapshot file reader (`snapshot::Header::read`, then `snapshot::read_stream` into
//! anonymous guest memory, as `blip restore` does before it touches KVM) on hostile files.
//!
//! The first input byte picks how the rest is used:
//! - `0`: the rest is the whole file;
//! - `1`: the rest follows a valid header (1-3 vCPUs, 2/4/32 MiB picked by the next byte), so
//!   the fuzzer starts past the header CRC;
//! - `2`: the rest is a little program of frames written with valid CRCs (page batches, states,
//!   end markers, other frames, raw bytes) after a valid header, so the fuzzer reaches the
//!   reader's own checks: pages inside memory, one state that matches the header, the end
//!   marker's page count, nothing after it.
//!
//! Checks: no panic; reading makes no allocation out of proportion to the file
//! (max(1 MiB, 2 x file) + 4 KiB: the frames are bounded like in `protocol_decoder`, and the
//! state decoder (serde through bincode) preallocates a vector for the length its input claims,
//! capped by serde at 1 MiB, before it finds the elements missing); every error is one
//! of "not a snapshot", version, truncated or corrupt (a slice cannot fail to read, and a page
//! run that passed the bounds check cannot fail to write) and prints as one non-empty line,
//! alone and with its causes; an accepted file was read to its last byte, its state matches
//! its header, and any shorter prefix of it is refused as truncated.
#![no_main]

use blip_fuzz::{largest_alloc, largest_alloc_reset, sample_state, Bytes};
use blip_transport::protocol::{write_message, write_page_batch, Message};
use blip_vmm::memory::{self, Backing, PAGE_SIZE};
use blip_vmm::persist;
use blip_vmm::snapshot::{read_stream, Header, SnapshotError, END_ROUND};
use libfuzzer_sys::fuzz_target;

/// Guest memory sizes of the generated headers (small: one mapping per input).
const MEM_SIZES: [u64; 3] = [2 << 20, 4 << 20, 32 << 20];

fn header(p: &mut Bytes) -> Header {
    let b = p.u8();
    Header {
        vcpus: u32::from(b % 3) + 1,
        mem_size: MEM_SIZES[usize::from(b / 3) % MEM_SIZES.len()],
    }
}

/// A persist envelope around `payload` with the right length and CRC.
fn state_envelope(payload: &[u8]) -> Vec<u8> {
    let mut b = persist::MAGIC.to_vec();
    b.extend_from_slice(&persist::FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

thread_local! {
    /// Encoded sample states by (vCPUs, memory size): encoding one (its xsave area element by
    /// element, under coverage instrumentation) was most of an execution's time.
    static STATES: std::cell::RefCell<Vec<((usize, u64), Vec<u8>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The encoded sample state, resized to `vcpus` vCPUs and `mem_size` bytes (cached).
fn state_for(vcpus: usize, mem_size: u64) -> Vec<u8> {
    STATES.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, b)) = c.iter().find(|(k, _)| *k == (vcpus, mem_size)) {
            return b.clone();
        }
        let b = encode_state(vcpus, mem_size);
        c.push(((vcpus, mem_size), b.clone()));
        b
    })
}

/// Encodes the sample state resized to `vcpus` vCPUs and `mem_size` bytes.
fn encode_state(vcpus: usize, mem_size: u64) -> Vec<u8> {
    let mut st = sample_state();
    let one = st.vcpus[0].clone();
    st.vcpus.resize(vcpus, one);
    for (i, v) in st.vcpus.iter_mut().enumerate() {
        v.index = i as u8;
    }
    st.devices.heartbeat_hi.resize(vcpus, 0);
    st.mem_size = mem_size;
    persist::encode(&st).expect("sample state encodes")
}

/// Mode 2: a header and frames with valid CRCs, from a program in `p`.
fn program(p: &mut Bytes) -> Vec<u8> {
    let h = header(p);
    let mut out = h.encode().to_vec();
    let pages = h.mem_size / PAGE_SIZE;
    let mut counted = 0u64;
    let mut frames = 0;
    while !p.is_empty() && frames < 64 {
        frames += 1;
        match p.u8() % 8 {
            // A page batch of up to 4 runs of up to 4 pages, mostly inside memory.
            0 | 1 => {
                let mut runs = Vec::new();
                for _ in 0..usize::from(p.u8() % 5) {
                    let sel = p.u8();
                    let gpa = match sel % 4 {
                        0 => p.u64(),
                        1 => (u64::from(p.u32()) % pages) * PAGE_SIZE + u64::from(sel >> 6),
                        _ => (u64::from(p.u32()) % pages) * PAGE_SIZE,
                    };
                    let n = match sel % 8 {
                        7 => p.u32(),
                        _ => u32::from(p.u8() % 5),
                    };
                    runs.push((gpa, n));
                }
                // Huge runs go without data (they are refused before any is needed).
                let total: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
                let data = if total <= 64 {
                    vec![p.u8(); total as usize * PAGE_SIZE as usize]
                } else {
                    Vec::new()
                };
                if write_page_batch(&mut out, &runs, &data).is_ok() {
                    counted += total;
                }
            }
            // The matching state, a mismatched one, or a fuzzed payload in a valid envelope.
            2 => {
                let bytes = match p.u8() % 4 {
                    0 | 1 => state_for(h.vcpus as usize, h.mem_size),
                    2 => state_for(usize::from(p.u8() % 4), MEM_SIZES[usize::from(p.u8() % 3)]),
                    _ => {
                        let n = usize::from(p.u8());
                        let take = n.min(p.0.len());
                        let (payload, rest) = p.0.split_at(take);
                        p.0 = rest;
                        state_envelope(payload)
                    }
                };
                let _ = write_message(&mut out, &Message::State(bytes));
            }
            // The end marker with the right count, another count, or another round.
            3 | 4 => {
                let (round, pages) = match p.u8() % 4 {
                    0 | 1 => (END_ROUND, counted),
                    2 => (END_ROUND, p.u64()),
                    _ => (p.u32(), counted),
                };
                let _ = write_message(&mut out, &Message::RoundEnd { round, pages });
            }
            // A frame that has no place in a snapshot.
            5 => {
                let _ = write_message(&mut out, &Message::Commit);
            }
            // Raw bytes (trailing garbage, or a frame's worth of noise).
            6 => {
                let n = usize::from(p.u8() % 32);
                for _ in 0..n {
                    out.push(p.u8());
                }
            }
            // Cut what was written so far.
            _ => {
                let cut = p.u32() as usize;
                if out.len() > 1 {
                    out.truncate(cut % out.len());
                }
            }
        }
    }
    out
}

/// Reads `file` as `blip restore` does, up to the point where KVM would be needed.
fn read(file: &[u8]) -> Result<(Header, persist::VmState, u64, u64), SnapshotError> {
    let mut r = file;
    largest_alloc_reset();
    let h = Header::read(&mut r)?;
    let head_alloc = largest_alloc();
    // The guest memory (a mapping and its dirty bitmap) is sized by the header, which was
    // checked against MIN_MEM..=MAX_MEM; only what reading the frames allocates is bounded.
    let mem = memory::create(h.mem_size, Backing::Anon).expect("create guest memory");
    largest_alloc_reset();
    let res = read_stream(&mut r, &h, &mem);
    let largest = largest_alloc().max(head_alloc);
    let bound = (1usize << 20).max(2 * file.len()) + 4096;
    assert!(
        largest <= bound,
        "reading a {}-byte snapshot made a {largest}-byte allocation",
        file.len()
    );
    let (st, loaded) = res?;
    Ok((h, st, loaded.pages, loaded.bytes))
}

fn check_error(e: &SnapshotError) {
    assert!(
        matches!(
            e,
            SnapshotError::NotSnapshot
                | SnapshotError::Version { .. }
                | SnapshotError::Truncated(_)
                | SnapshotError::Corrupt(_)
        ),
        "unexpected error kind reading a byte slice: {e:?}"
    );
    for s in [e.to_string(), blip_vmm::cli::error_chain(e)] {
        assert!(!s.is_empty(), "empty error message: {e:?}");
        assert!(
            !s.contains('\n'),
            "error message of more than one line: {s:?}"
        );
    }
}

fn check(file: &[u8], cut: Option<u32>) {
    match read(file) {
        Err(e) => check_error(&e),
        Ok((h, st, _pages, bytes)) => {
            assert_eq!(
                bytes,
                file.len() as u64,
                "accepted without reading every byte"
            );
            assert_eq!(st.mem_size, h.mem_size);
            assert_eq!(st.vcpus.len(), h.vcpus as usize);
            if let Some(cut) = cut {
                let cut = cut as usize % file.len();
                match read(&file[..cut]) {
                    Err(SnapshotError::Truncated(_)) => {}
                    Err(e) => panic!("prefix of {cut} bytes of a valid snapshot: {e}"),
                    Ok(_) => panic!("prefix of {cut} bytes of a valid snapshot accepted"),
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(rest, None),
        1 => {
            let mut p = Bytes(rest);
            let mut file = header(&mut p).encode().to_vec();
            file.extend_from_slice(p.0);
            check(&file, None)
        }
        _ => {
            let mut p = Bytes(rest);
            let cut = p.u32();
            let file = program(&mut p);
            check(&file, Some(cut))
        }
    }
});
