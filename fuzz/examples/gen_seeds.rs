//! Writes the synthetic seed files of the fuzz corpora (run from the repository root):
//!
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- fuzz/corpus
//!
//! The real-VM state seeds come from `dump_state`, the real guest image from
//! `blip guest-image`.

use std::io::IoSlice;
use std::path::{Path, PathBuf};

use blip_fuzz::sample_state;
use blip_transport::protocol::{
    write_message, write_page_batch, write_pages, Message, Offer, Role,
    AUTH_HMAC_SHA256, PAGE_SIZE,
};
use blip_vmm::memory::{self, Backing};
use blip_vmm::persist::{encode, HEADER_LEN};
use blip_vmm::snapshot::{write_stream, HEADER_LEN as SNAP_HEADER_LEN};
use vm_memory::{Bytes, GuestAddress};

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{:>6} {}", bytes.len(), dir.join(name).display());
}

/// The control-stream conversation of a migration, plus the messages that end one early.
fn handshake() -> Vec<u8> {
    let msgs = [
        Message::Hello {
            role: Role::Source,
            session: 0x1234_5678,
            nonce: [7; 32],
            host_id: 42,
            auth: AUTH_HMAC_SHA256,
        },
        Message::Hello {
            role: Role::Destination,
            session: 0x1234_5678,
            nonce: [9; 32],
            host_id: 42,
            auth: AUTH_HMAC_SHA256,
        },
        Message::Auth { mac: [0x5a; 32] },
        Message::Auth { mac: [0xa5; 32] },
        Message::Offer(Offer {
            mem_size: 32 << 20,
            page_size: 4096,
            vcpus: 2,
            cpu_vendor: *b"AuthenticAMD",
            cpu_signature: 0x00a2_0f12,
            cpu_features: 0xdead_beef,
            tsc_khz: 2_000_000,
            streams: 2,
            state_pieces: 0x3f,
            guest_name: "demo".into(),
            transport: blip_transport::protocol::TRANSPORT_TCP,
        }),
        Message::Accept,
        Message::StreamHello {
            session: 0x1234_5678,
            index: 1,
        },
        Message::RoundEnd { round: 0, pages: 8192 },
        Message::RoundAck { round: 0 },
        Message::State(b"BLIPSTAT\x01\x00\x00\x00".to_vec()),
        Message::EarlyState(b"BLIPERLY\x02\x00\x00\x00".to_vec()),
        Message::Ready { mem_hash: 0 },
        Message::Commit,
        Message::Resumed { t_ns: 123_456_789 },
        Message::Heartbeat {
            counter: 3,
            t_ns: 123_456_999,
        },
        Message::Refuse {
            reason: "cpu differs".into(),
        },
        Message::Abort {
            reason: "operator".into(),
        },
    ];
    let mut b = Vec::new();
    for m in &msgs {
        write_message(&mut b, m).unwrap();
    }
    b
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).expect("usage: gen_seeds CORPUS_DIR"));
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();

    // Wire protocol.
    let hs = handshake();
    let mut pages = Vec::new();
    write_pages(&mut pages, 0x10_0000, &[IoSlice::new(&page)]).unwrap();
    write_page_batch(&mut pages, &[(0x20_0000, 1)], &page).unwrap();
    write_message(&mut pages, &Message::Commit).unwrap();
    let mut live = Vec::new();
    write_pages(&mut live, 0, &[]).unwrap();
    write_page_batch(&mut live, &[], &[]).unwrap();
    write_page_batch(&mut live, &[(0x1000, 0), (0x2000, 0)], &[]).unwrap();
    let dir = root.join("protocol_decoder");
    put(&dir, "seed-handshake", &hs);
    put(&dir, "seed-pages", &pages);
    put(&dir, "seed-garbage", b"BLIP\x01\x00\x09\x00\xff\xff\xff\x03\x00\x00\x00\x00");
    let dir = root.join("handshake_sequence");
    put(&dir, "seed-handshake", &hs);
    put(&dir, "seed-live-pages", &live);

    // Saved state: mode 0 (raw envelope), 1 (payload), 2 (patches to the built-in envelope).
    let env = encode(&sample_state()).unwrap();
    let dir = root.join("state_envelope");
    put(&dir, "seed-sample-envelope", &[&[0u8][..], &env].concat());
    put(&dir, "seed-sample-payload", &[&[1u8][..], &env[HEADER_LEN..]].concat());
    // Patch: flags 3 (fix length and CRC), set byte 40 to 0xff, truncate at 300.
    let mut patch = vec![2u8, 3];
    patch.extend_from_slice(&40u32.to_le_bytes());
    patch.extend_from_slice(&[0xff, 0]);
    patch.extend_from_slice(&300u32.to_le_bytes());
    patch.extend_from_slice(&[0, 2]);
    put(&dir, "seed-sample-patch", &patch);

    // A minimal PVH ELF64: one PT_LOAD at 1 MiB, one PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY.
    let dir = root.join("elf_loader");
    put(&dir, "seed-min-pvh", &min_pvh_elf());
    let mut elf32 = min_pvh_elf();
    elf32[4] = 1;
    put(&dir, "seed-elf32", &elf32[..64]);

    // Snapshot files: mode 0 (whole file), 1 (after a generated header), 2 (frame program).
    let snap = small_snapshot(&page);
    let dir = root.join("snapshot_reader");
    put(&dir, "seed-valid", &[&[0u8][..], &snap].concat());
    put(&dir, "seed-truncated", &[&[0u8][..], &snap[..snap.len() - 20]].concat());
    let mut corrupt = snap.clone();
    corrupt[SNAP_HEADER_LEN + 100] ^= 0x40; // inside the first page batch: its CRC fails
    put(&dir, "seed-corrupt", &[&[0u8][..], &corrupt].concat());
    // Header selector 1: 2 vCPUs, 2 MiB, as small_snapshot's.
    put(&dir, "seed-after-header", &[&[1u8, 1][..], &snap[SNAP_HEADER_LEN..]].concat());
    // Cut at 77 (checked only if accepted); header 1; a batch of 2 pages at page 5 filled
    // with 0x5a; the matching state; the end marker with the right count.
    let mut prog = vec![2u8];
    prog.extend_from_slice(&77u32.to_le_bytes());
    prog.extend_from_slice(&[1, 0, 1, 2]);
    prog.extend_from_slice(&5u32.to_le_bytes());
    prog.extend_from_slice(&[2, 0x5a, 2, 0, 3, 0]);
    put(&dir, "seed-program", &prog);
}

/// A valid snapshot of a 2 MiB, 2-vCPU guest with three non-zero pages.
fn small_snapshot(page: &[u8]) -> Vec<u8> {
    let mem = memory::create(2 << 20, Backing::Anon).unwrap();
    for gpa in [0x1000u64, 0x2000, 0x1f_f000] {
        mem.write_slice(page, GuestAddress(gpa)).unwrap();
    }
    let mut st = sample_state();
    st.mem_size = 2 << 20;
    let mut out = Vec::new();
    let w = write_stream(&mut out, &mem, 2, &st).unwrap();
    assert_eq!(w.pages, 3);
    out
}

fn min_pvh_elf() -> Vec<u8> {
    const PHOFF: usize = 64;
    const NOTE_OFF: usize = PHOFF + 2 * 56;
    const CODE_OFF: usize = NOTE_OFF + 20;
    let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp .-1
    let mut b = vec![0u8; CODE_OFF + code.len()];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(PHOFF as u64).to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let mut ph = |i: usize, p_type: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        let o = PHOFF + i * 56;
        b[o..o + 4].copy_from_slice(&p_type.to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
        for (k, v) in [off, addr, addr, size, size, align].iter().enumerate() {
            b[o + 8 + 8 * k..o + 16 + 8 * k].copy_from_slice(&v.to_le_bytes());
        }
    };
    ph(0, 1, 5, CODE_OFF as u64, 0x10_0000, code.len() as u64, 1);
    ph(1, 4, 4, NOTE_OFF as u64, 0, 20, 4);
    // Note: namesz 4 ("Xen\0"), descsz 4, type 18, entry 0x100000.
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&0x10_0000u32.to_le_bytes());
    b[NOTE_OFF..CODE_OFF].copy_from_slice(&note);
    b[CODE_OFF..].copy_from_slice(&code);
    b
}
