//! Snapshot and restore to a file: the migration's page stream and state envelope, written to
//! a file instead of a socket (a "file transport").
//!
//! Why: an operator wants to park a guest on disk (host maintenance, a checkpoint before a risky
//! step) and start it again later, on this host or another like it, with the same guarantees a
//! migration gives: every byte CRC-checked, and a damaged file refused before anything runs.
//!
//! `blip snapshot --api SOCK FILE [--stop]` asks the running blip to pause every vCPU, write
//! the file, then resume the guest (or, with `--stop`, exit once the file is on disk).
//! `blip restore FILE` builds a blank VM of the recorded size, reads the pages straight into
//! guest memory, restores the vCPU/device/clock state and runs the guest like `blip run`.
//!
//! # File format
//!
//! A fixed header, then frames of the migration protocol ([`blip_transport::protocol`]):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic `BLIPSNAP` |
//! | 8      | 4    | format version (u32 LE), [`FORMAT_VERSION`] |
//! | 12     | 4    | vCPUs (u32 LE) |
//! | 16     | 8    | guest memory size in bytes (u64 LE) |
//! | 24     | 4    | CRC32C of bytes 0..24 (u32 LE) |
//! | 28     | 4    | reserved, must be 0 (a reader refuses other values) |
//! | 32     | ...  | `PageBatch` frames: the non-zero pages, at most [`BATCH_PAGES`] per frame |
//! |        |      | one `State` frame: `persist::encode` of the VM state (its own envelope) |
//! |        |      | `RoundEnd { round: u32::MAX, pages: total }`: the end marker |
//!
//! The header is a layout of the transport's one framing helper ([`ENVELOPE`]), which makes
//! the magic, version and CRC checks. Every frame carries its own CRC32C. Pages that are not in the file are zero. Nothing may
//! follow the end marker. A reader refuses, with one line and before the guest runs: a file
//! that is not a snapshot, another format version, a header or frame whose CRC does not match,
//! pages outside guest memory, a missing or repeated state, a page count that disagrees with
//! the end marker, and a file that ends before the end marker (truncated).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use blip_transport::protocol::{self, read_full, Envelope, EnvelopeError, Message, ProtocolError};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::now_ns;
use crate::memory::{self, Backing, GuestMem, PAGE_SIZE};
use crate::persist::{self, PersistError, TscNote, VmState};
use crate::vm::{DirtyConfig, Vm, VmConfig, VmError, MAX_VCPUS};

/// File magic.
pub const MAGIC: [u8; 8] = *b"BLIPSNAP";
/// The one snapshot format version this code reads and writes. 2: the state (persist format
/// 2) may carry the PC platform's LAPIC, irqchip and PIT; a format-1 file is refused from its
/// header, before anything is read into memory.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Most pages in one `PageBatch` frame (4 MiB of data).
pub const BATCH_PAGES: usize = 1024;
/// `RoundEnd.round` of the end marker.
pub const END_ROUND: u32 = u32::MAX;

/// The fixed header (the table above) in the transport's one framing helper: no payload, so
/// its CRC covers the header's own bytes 0..24; vCPUs and memory size are the caller fields.
pub const ENVELOPE: Envelope = Envelope::new(&MAGIC, FORMAT_VERSION, 4)
    .with_fields(12)
    .with_reserved(RESERVED_LEN);

/// The reserved bytes at the end of the header (zero; the envelope does not check them).
const RESERVED_LEN: usize = 4;

const _: () = assert!(ENVELOPE.header_len() == HEADER_LEN);

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a blip snapshot (bad magic)")]
    NotSnapshot,
    #[error("snapshot format {found}; this blip reads {FORMAT_VERSION} (take the snapshot again with this blip)")]
    Version { found: u32 },
    #[error("snapshot is truncated: it ends {0}")]
    Truncated(String),
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot open the file")]
    Open(#[source] io::Error),
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a regular file")]
    NotAFile(PathBuf),
    #[error("cannot write the snapshot")]
    Write(#[source] io::Error),
    #[error("cannot read the snapshot")]
    Read(#[source] io::Error),
    #[error("cannot read guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot save the VM state")]
    Save(#[source] PersistError),
    #[error("cannot restore the saved state on this host")]
    Restore(#[source] PersistError),
    #[error("cannot create the VM")]
    Vm(#[from] VmError),
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub vcpus: u32,
    pub mem_size: u64,
}

impl Header {
    /// The 32 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let f = ENVELOPE.fields_mut(&mut b);
        f[..4].copy_from_slice(&self.vcpus.to_le_bytes());
        f[4..].copy_from_slice(&self.mem_size.to_le_bytes());
        ENVELOPE.write_header(&mut b, 0, 0);
        b
    }

    /// Reads and checks the header: magic first (a foreign file), then the version (so another
    /// version is named, not called corrupt), then the CRC and the values.
    pub fn read(r: &mut dyn Read) -> Result<Header, SnapshotError> {
        let mut b = [0u8; HEADER_LEN];
        ENVELOPE.read_header(r, &mut b).map_err(|e| match e {
            EnvelopeError::BadMagic => SnapshotError::NotSnapshot,
            EnvelopeError::Truncated { have: 0, .. } => {
                SnapshotError::Truncated("before its header (empty file)".into())
            }
            EnvelopeError::Truncated { have, .. } => {
                SnapshotError::Truncated(format!("inside its header, at byte {have}"))
            }
            EnvelopeError::Version { found, .. } => SnapshotError::Version { found },
            EnvelopeError::Crc { expected, actual } => SnapshotError::Corrupt(format!(
                "header CRC32C {actual:#010x}, header says {expected:#010x}"
            )),
            EnvelopeError::Io(e) => SnapshotError::Read(e),
            // No length field: neither a cap nor a payload to trail.
            e @ (EnvelopeError::TooLarge { .. } | EnvelopeError::Trailing(_)) => {
                SnapshotError::Corrupt(e.to_string())
            }
        })?;
        // The envelope's CRC covers bytes 0..24 only: the reserved bytes are checked here, so
        // no byte of the header can change unnoticed. (Files of this format have zeros there.)
        let reserved = &b[ENVELOPE.header_len() - RESERVED_LEN..];
        if reserved.iter().any(|&x| x != 0) {
            return Err(SnapshotError::Corrupt(format!(
                "reserved header bytes {}..{HEADER_LEN} are {reserved:02x?}, not zero",
                HEADER_LEN - RESERVED_LEN
            )));
        }
        let f = ENVELOPE.fields(&b);
        let h = Header {
            vcpus: u32::from_le_bytes(f[..4].try_into().unwrap_or_default()),
            mem_size: u64::from_le_bytes(f[4..].try_into().unwrap_or_default()),
        };
        if h.vcpus == 0 || h.vcpus > u32::from(MAX_VCPUS) {
            return Err(SnapshotError::Corrupt(format!("{} vCPUs", h.vcpus)));
        }
        if !(crate::memory::MIN_MEM..=crate::memory::MAX_MEM).contains(&h.mem_size)
            || h.mem_size % PAGE_SIZE != 0
        {
            return Err(SnapshotError::Corrupt(format!(
                "guest memory of {} bytes",
                h.mem_size
            )));
        }
        Ok(h)
    }
}

/// Counts the bytes that pass through (for "truncated at byte N" and sizes).
struct Counting<T> {
    inner: T,
    n: u64,
}

impl<T: Read> Read for Counting<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Counting<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What went into a snapshot stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    /// Non-zero pages written.
    pub pages: u64,
    /// Bytes written (the file size).
    pub bytes: u64,
    /// Bytes of the encoded state.
    pub state_bytes: u64,
}

fn wr(e: ProtocolError) -> SnapshotError {
    match e {
        ProtocolError::Io(e) => SnapshotError::Write(e),
        other => SnapshotError::Write(io::Error::other(other)),
    }
}

/// Writes a whole snapshot (header, non-zero pages, state, end marker) of a paused VM's memory
/// `mem` and its `state` to `w`.
pub fn write_stream(
    w: &mut dyn Write,
    mem: &GuestMem,
    vcpus: u32,
    state: &VmState,
) -> Result<Written, SnapshotError> {
    let mut w = Counting { inner: w, n: 0 };
    let mem_size = crate::memory::size(mem);
    let encoded = persist::encode(state).map_err(SnapshotError::Save)?;
    w.write_all(&Header { vcpus, mem_size }.encode())
        .map_err(SnapshotError::Write)?;
    let page = PAGE_SIZE as usize;
    let mut buf = vec![0u8; BATCH_PAGES * page];
    let mut runs: Vec<(u64, u32)> = Vec::new();
    let mut found: Vec<(usize, usize)> = Vec::new();
    let mut pages = 0u64;
    let mut gpa = 0u64;
    while gpa < mem_size {
        let len = ((mem_size - gpa) as usize).min(buf.len());
        mem.read_slice(&mut buf[..len], GuestAddress(gpa))
            .map_err(SnapshotError::Memory)?;
        // Compact the non-zero pages to the front of the buffer (they only move left).
        runs.clear();
        let mut used = 0usize;
        found.clear();
        found.extend(memory::nonzero_runs(&buf[..len], page));
        for &(first, n) in &found {
            let (src, bytes) = (first * page, n * page);
            if used != src {
                buf.copy_within(src..src + bytes, used);
            }
            used += bytes;
            // n <= BATCH_PAGES.
            runs.push((gpa + src as u64, n as u32));
        }
        if !runs.is_empty() {
            protocol::write_page_batch(&mut w, &runs, &buf[..used]).map_err(wr)?;
            pages += (used / page) as u64;
        }
        gpa += len as u64;
    }
    protocol::write_message(&mut w, &Message::State(encoded.clone())).map_err(wr)?;
    protocol::write_message(
        &mut w,
        &Message::RoundEnd {
            round: END_ROUND,
            pages,
        },
    )
    .map_err(wr)?;
    w.flush().map_err(SnapshotError::Write)?;
    Ok(Written {
        pages,
        bytes: w.n,
        state_bytes: encoded.len() as u64,
    })
}

/// What [`read_stream`] read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Loaded {
    pub pages: u64,
    pub bytes: u64,
}

fn rd(e: ProtocolError, at: u64) -> SnapshotError {
    match e {
        ProtocolError::Closed => {
            SnapshotError::Truncated(format!("at byte {at}, before its end marker"))
        }
        ProtocolError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            SnapshotError::Truncated(format!("inside the frame at byte {at}"))
        }
        ProtocolError::Io(e) => SnapshotError::Read(e),
        other => SnapshotError::Corrupt(format!(
            "frame at byte {at}: {}",
            crate::cli::error_chain(&other)
        )),
    }
}

/// Reads the frames after the header into `mem` (which must be zero and `header.mem_size`
/// long) and returns the state. Any damage is an error; `mem` is then garbage.
pub fn read_stream(
    r: &mut dyn Read,
    header: &Header,
    mem: &GuestMem,
) -> Result<(VmState, Loaded), SnapshotError> {
    let mut r = Counting {
        inner: r,
        n: HEADER_LEN as u64,
    };
    let mut pages = 0u64;
    let mut state: Option<VmState> = None;
    let mut scratch = vec![0u8; 1 << 20];
    loop {
        let at = r.n;
        let frame = protocol::read_message(&mut r).map_err(|e| rd(e, at))?;
        match frame.msg {
            Message::PageBatch { runs } => {
                let receipt = frame.pages.ok_or_else(|| {
                    SnapshotError::Corrupt(format!("frame at byte {at}: no page data"))
                })?;
                let mut lens = Vec::with_capacity(runs.len());
                for &(gpa, count) in &runs {
                    lens.push(
                        memory::check_run(mem, gpa, u64::from(count)).map_err(|e| {
                            SnapshotError::Corrupt(format!("frame at byte {at}: {e}"))
                        })?,
                    );
                    pages += u64::from(count);
                }
                // The frame's pages go through `scratch` into guest memory, CRC on the way.
                let mut crc = receipt.partial_crc;
                for (&(gpa, _), &len) in runs.iter().zip(&lens) {
                    let mut off = 0u64;
                    while off < len {
                        let n = ((len - off) as usize).min(scratch.len());
                        r.read_exact(&mut scratch[..n])
                            .map_err(|e| rd(ProtocolError::Io(e), at))?;
                        crc = protocol::crc32c_append(crc, &scratch[..n]);
                        mem.write_slice(&scratch[..n], GuestAddress(gpa + off))
                            .map_err(SnapshotError::Memory)?;
                        off += n as u64;
                    }
                }
                receipt.verify(crc).map_err(|e| rd(e, at))?;
            }
            Message::State(bytes) => {
                if state.is_some() {
                    return Err(SnapshotError::Corrupt(format!(
                        "a second state at byte {at}"
                    )));
                }
                let st = persist::decode(&bytes).map_err(|e| {
                    SnapshotError::Corrupt(format!(
                        "state at byte {at}: {}",
                        crate::cli::error_chain(&e)
                    ))
                })?;
                if st.mem_size != header.mem_size || st.vcpus.len() != header.vcpus as usize {
                    return Err(SnapshotError::Corrupt(format!(
                        "the state describes {} vCPUs and {} bytes, the header {} and {}",
                        st.vcpus.len(),
                        st.mem_size,
                        header.vcpus,
                        header.mem_size
                    )));
                }
                state = Some(st);
            }
            Message::RoundEnd {
                round: END_ROUND,
                pages: total,
            } => {
                let Some(st) = state else {
                    return Err(SnapshotError::Corrupt("it holds no VM state".into()));
                };
                if total != pages {
                    return Err(SnapshotError::Corrupt(format!(
                        "the end marker counts {total} pages but {pages} were read"
                    )));
                }
                let mut one = [0u8; 1];
                if read_full(&mut r, &mut one).map_err(SnapshotError::Read)? != 0 {
                    return Err(SnapshotError::Corrupt(format!(
                        "bytes after the end marker at byte {at}"
                    )));
                }
                return Ok((st, Loaded { pages, bytes: r.n }));
            }
            other => {
                return Err(SnapshotError::Corrupt(format!(
                    "unexpected {} frame at byte {at}",
                    other.kind()
                )))
            }
        }
    }
}

/// The temporary file a snapshot is written to before it is renamed into place:
/// `FILE.<pid>.tmp`, named after the writing process so that a writer that died (kill -9) can
/// be told from one still writing.
pub fn tmp_path(path: &Path) -> PathBuf {
    tmp_path_of(path, std::process::id())
}

fn tmp_path_of(path: &Path, pid: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{pid}.tmp"));
    PathBuf::from(s)
}

/// The writer's pid of `name` if it is a temporary file of a snapshot named `target`.
fn tmp_writer(name: &[u8], target: &[u8]) -> Option<u32> {
    let digits = name
        .strip_prefix(target)?
        .strip_prefix(b".")?
        .strip_suffix(b".tmp")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Removes the temporary files next to `path` left by writers that are gone, and one of this
/// process (pid reuse: no other live process can have written it; this process writes one
/// snapshot at a time). A file whose writer is alive is never touched, so two blips writing
/// the same target never delete each other's file; only regular files are removed.
fn remove_orphans(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Some(target) = path.file_name() else {
        return;
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = tmp_writer(e.file_name().as_bytes(), target.as_bytes()) else {
            continue;
        };
        let gone = pid == std::process::id() || !crate::registry::pid_alive(pid);
        if gone && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The result of [`save`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Saved {
    pub path: PathBuf,
    pub pages: u64,
    pub bytes: u64,
    pub state_bytes: u64,
    /// First vCPU stopped → first vCPU running again (0 with `stop`).
    pub pause_ns: u64,
    /// Asking every vCPU to stop until the last stopped.
    pub stop_ns: u64,
    /// Probing what state KVM can save (MSR list, CPUID), while paused.
    pub caps_ns: u64,
    /// Saving the vCPU, clock and device state, while paused.
    pub state_ns: u64,
    /// Writing the file (pages, state, end marker), while paused.
    pub write_ns: u64,
    /// fsync and rename (after the resume unless `stop`).
    pub sync_ns: u64,
    /// The guest was left stopped (`--stop`); the caller shuts the VM down.
    pub stopped: bool,
}

/// Pauses `vm`, writes its snapshot to `path` (through [`tmp_path`], fsynced, renamed), then
/// resumes the guest unless `stop`. On any error the guest is resumed and the partial file
/// removed. With `stop`, success means the snapshot is on disk and the VM stays paused.
pub fn save(vm: &mut Vm, path: &Path, stop: bool) -> Result<Saved, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_path(path);
    remove_orphans(path);
    // Never rename over a device, directory or socket (`blip snapshot ... /dev/full`).
    for p in [path, tmp.as_path()] {
        if std::fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(SnapshotError::NotAFile(p.to_path_buf()));
        }
    }
    // Fail on an unwritable path before the guest is paused. A new file (never through a
    // symlink planted at the name), private whatever the umask: the rename keeps its mode.
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| SnapshotError::Create {
            path: tmp.clone(),
            source,
        })?;
    let r = save_paused(vm, file, &tmp, path, stop);
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn save_paused(
    vm: &mut Vm,
    file: File,
    tmp: &Path,
    path: &Path,
    stop: bool,
) -> Result<Saved, SnapshotError> {
    let pause = vm.pause_all()?;
    let mut paused = true;
    let r = (|| {
        let t0 = now_ns();
        let caps = vm.persist_caps().map_err(SnapshotError::Save)?;
        let t1 = now_ns();
        let state = vm.save_state_with(&caps).map_err(SnapshotError::Save)?;
        let t2 = now_ns();
        let mut w = io::BufWriter::with_capacity(1 << 20, &file);
        let written = write_stream(&mut w, vm.memory(), vm.vcpu_count() as u32, &state)?;
        w.into_inner()
            .map_err(|e| SnapshotError::Write(e.into_error()))?;
        let write_ns = now_ns() - t2;
        let mut pause_ns = 0;
        if !stop {
            let t = vm.resume_all()?;
            paused = false;
            pause_ns = t.first_ns.saturating_sub(pause.first_ns);
        }
        let t = now_ns();
        file.sync_all().map_err(SnapshotError::Write)?;
        std::fs::rename(tmp, path).map_err(SnapshotError::Write)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(Saved {
            path: path.to_path_buf(),
            pages: written.pages,
            bytes: written.bytes,
            state_bytes: written.state_bytes,
            pause_ns,
            stop_ns: pause.last_ns.saturating_sub(pause.requested_ns),
            caps_ns: t1 - t0,
            state_ns: t2 - t1,
            write_ns,
            sync_ns: now_ns() - t,
            stopped: stop,
        })
    })();
    if r.is_err() && paused {
        // Report the snapshot's failure; a failed resume shows up as the vCPUs' exit.
        if let Err(e) = vm.resume_all() {
            eprintln!(
                "blip: error: cannot resume the guest after the failed snapshot: {}",
                crate::cli::error_chain(&e)
            );
        }
    }
    r
}

/// What `blip restore` needs besides the file.
pub struct RestoreConfig {
    pub backing: Backing,
    pub serial: Box<dyn Write + Send>,
    pub dirty: DirtyConfig,
}

/// Summary of a restore.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    pub pages: u64,
    pub bytes: u64,
    pub vcpus: u32,
    pub mem_size: u64,
    /// Reading the file into memory and restoring the state.
    pub load_ns: u64,
    /// vCPUs whose TSC frequency differs from the snapshot's and could not be scaled (the
    /// guest runs, its timing off by the ratio); [`load`] has printed each on stderr.
    pub notes: Vec<TscNote>,
}

/// Builds a blank VM of the recorded size and loads the snapshot at `path` into it. The VM is
/// returned paused; nothing of the guest has run. Any damage is an error and the VM is dropped.
/// Each TSC note of the restore is printed on stderr as one `blip: note: ...` line (and
/// returned in [`Restored::notes`]).
pub fn load(path: &Path, cfg: RestoreConfig) -> Result<(Vm, Restored), SnapshotError> {
    let t = now_ns();
    let file = File::open(path).map_err(SnapshotError::Open)?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let header = Header::read(&mut r)?;
    // Memory first, the VM after the state is read: the state says which platform (an
    // in-kernel irqchip and PIT or not) the VM must have, and KVM wants those before vCPUs.
    let mem = memory::create(header.mem_size, cfg.backing).map_err(VmError::from)?;
    let (state, read) = read_stream(&mut r, &header, &mem)?;
    let mut vm = Vm::create_in(
        VmConfig {
            mem_size: header.mem_size,
            vcpus: header.vcpus,
            cmdline: String::new(),
            backing: cfg.backing,
            image: None,
            serial: cfg.serial,
            platform: if state.pieces & persist::PLATFORM_PIECES != 0 {
                crate::platform::Platform::Pc
            } else {
                crate::platform::Platform::Minimal
            },
        },
        cfg.dirty,
        Some(mem),
    )?;
    // Guest time continues from the saved values: the parked time is not seen.
    let notes = vm.restore_state(&state).map_err(SnapshotError::Restore)?;
    for n in &notes {
        tracing::warn!("blip: note: {n}");
    }
    Ok((
        vm,
        Restored {
            pages: read.pages,
            bytes: read.bytes,
            vcpus: header.vcpus,
            mem_size: header.mem_size,
            load_ns: now_ns() - t,
            notes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            vcpus: 2,
            mem_size: 4 << 20,
        }
    }

    #[test]
    fn snapshot_header_round_trips() {
        let b = header().encode();
        assert_eq!(Header::read(&mut &b[..]).unwrap(), header());
        // The documented layout, byte for byte.
        let mut want = b"BLIPSNAP".to_vec();
        want.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&(4u64 << 20).to_le_bytes());
        let crc = crc32c::crc32c(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        want.extend_from_slice(&[0; 4]);
        assert_eq!(b[..], want[..]);
    }

    #[test]
    fn snapshot_header_refusals() {
        let b = header().encode();
        assert!(matches!(
            Header::read(&mut &b"#!/bin/sh\necho hi\n"[..]),
            Err(SnapshotError::NotSnapshot)
        ));
        assert!(matches!(
            Header::read(&mut &b"BL"[..]),
            Err(SnapshotError::Truncated(_))
        ));
        assert!(matches!(
            Header::read(&mut &b[..0]),
            Err(SnapshotError::Truncated(_))
        ));
        for cut in [5, 11, 12, 20, 31] {
            assert!(
                matches!(
                    Header::read(&mut &b[..cut]),
                    Err(SnapshotError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        let mut v = b;
        v[8] = 7;
        let e = Header::read(&mut &v[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot format 7; this blip reads 2 (take the snapshot again with this blip)"
        );
        let mut c = b;
        c[17] ^= 1;
        assert!(matches!(
            Header::read(&mut &c[..]),
            Err(SnapshotError::Corrupt(_))
        ));
    }

    fn state(mem_size: u64, vcpus: usize) -> VmState {
        let vcpu = |index: u8| persist::VcpuState {
            index,
            pieces: 0,
            cpuid: Vec::new(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x10_0000,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: Default::default(),
            msrs: vec![(0x10, 99)],
            xsave: None,
            xcrs: None,
            events: None,
            mp_state: 0,
            debugregs: None,
            tsc_khz: None,
            lapic: None,
        };
        VmState {
            mem_size,
            pieces: 0,
            vcpus: (0..vcpus as u8).map(vcpu).collect(),
            clock: None,
            irqchip: None,
            pit: None,
            saved_at_ns: 0,
            devices: crate::devices::DevicesState {
                serial: Default::default(),
                heartbeat_hi: vec![0; vcpus],
            },
        }
    }

    fn memory_with_pattern() -> GuestMem {
        let mem = crate::memory::create(4 << 20, Backing::Anon).unwrap();
        for (i, gpa) in [0x1000u64, 0x2000, 0x5000, 0x3f_f000].iter().enumerate() {
            mem.write_obj(0xab00_u64 + i as u64, GuestAddress(*gpa))
                .unwrap();
        }
        mem
    }

    fn snapshot_bytes() -> Vec<u8> {
        let mem = memory_with_pattern();
        let mut out = Vec::new();
        let w = write_stream(&mut out, &mem, 2, &state(4 << 20, 2)).unwrap();
        assert_eq!(w.pages, 4);
        assert_eq!(w.bytes, out.len() as u64);
        out
    }

    fn load_bytes(b: &[u8]) -> Result<(VmState, GuestMem), SnapshotError> {
        let mut r = b;
        let h = Header::read(&mut r)?;
        let mem = crate::memory::create(h.mem_size, Backing::Anon).unwrap();
        let (st, _) = read_stream(&mut r, &h, &mem)?;
        Ok((st, mem))
    }

    #[test]
    fn snapshot_stream_round_trips() {
        let b = snapshot_bytes();
        let (st, mem) = load_bytes(&b).unwrap();
        assert_eq!(st.vcpus.len(), 2);
        assert_eq!(
            crate::memory::digest(&mem),
            crate::memory::digest(&memory_with_pattern())
        );
    }

    #[test]
    fn snapshot_truncation_is_refused_everywhere() {
        let b = snapshot_bytes();
        for cut in (0..b.len()).step_by(97).chain([b.len() - 1, b.len() - 16]) {
            match load_bytes(&b[..cut]) {
                Err(SnapshotError::Truncated(_)) => {}
                other => panic!("cut at {cut}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn snapshot_damage_is_refused() {
        let b = snapshot_bytes();
        // A flipped byte anywhere after the header: a CRC (or framing) error.
        for at in (HEADER_LEN..b.len()).step_by(61) {
            let mut c = b.clone();
            c[at] ^= 0x40;
            match load_bytes(&c) {
                Err(SnapshotError::Corrupt(_)) | Err(SnapshotError::Truncated(_)) => {}
                other => panic!("flip at {at}: {:?}", other.map(|_| ())),
            }
        }
        // Trailing garbage.
        let mut t = b.clone();
        t.push(0);
        assert!(matches!(load_bytes(&t), Err(SnapshotError::Corrupt(_))));
    }

    #[test]
    fn snapshot_reserved_header_bytes_are_checked() {
        let b = header().encode();
        for at in HEADER_LEN - RESERVED_LEN..HEADER_LEN {
            let mut c = b;
            c[at] ^= 0x01;
            match Header::read(&mut &c[..]) {
                Err(SnapshotError::Corrupt(m)) => assert!(m.contains("reserved"), "{m}"),
                other => panic!("flip at {at}: {other:?}"),
            }
        }
    }

    #[test]
    fn snapshot_tmp_names_carry_the_writer() {
        let t = tmp_path_of(Path::new("/x/guest.snap"), 42);
        assert_eq!(t, Path::new("/x/guest.snap.42.tmp"));
        assert_eq!(tmp_writer(b"guest.snap.42.tmp", b"guest.snap"), Some(42));
        for other in [
            &b"guest.snap.tmp"[..],
            b"guest.snap.x42.tmp",
            b"guest.snap..tmp",
            b"guest.snapshot.42.tmp",
            b"other.snap.42.tmp",
            b"guest.snap.42.tmp.bak",
            b"guest.snap.99999999999.tmp",
        ] {
            assert_eq!(tmp_writer(other, b"guest.snap"), None, "{other:?}");
        }
    }

    #[test]
    fn snapshot_orphans_of_dead_writers_only_are_removed() {
        let d = std::env::temp_dir().join(format!("blip-snap-orphans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("g.snap");
        // A writer that is gone: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = tmp_path_of(&target, 1); // pid 1 is alive
        let orphan = tmp_path_of(&target, dead);
        let mine = tmp_path(&target);
        let unrelated = d.join("g.snap.tmp");
        for f in [&live, &orphan, &mine, &unrelated] {
            std::fs::write(f, b"x").unwrap();
        }
        remove_orphans(&target);
        assert!(live.exists(), "a live writer's file was removed");
        assert!(
            unrelated.exists(),
            "a file without a writer pid was removed"
        );
        assert!(!orphan.exists() && !mine.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn snapshot_pages_outside_memory_are_refused() {
        let mut out = Header {
            vcpus: 1,
            mem_size: 4 << 20,
        }
        .encode()
        .to_vec();
        let data = vec![1u8; 4096];
        protocol::write_page_batch(&mut out, &[(4 << 20, 1)], &data).unwrap();
        let e = load_bytes(&out).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }
}
