//! Live migration: pre-copy that aims at a blackout target, and a handover that never loses the
//! guest and never runs it twice.
//!
//! The wire protocol (messages, framing, the sequence diagram) lives in
//! `blip_transport::protocol`. The engine is in parts that follow the migration sequence
//! (`docs/ARCHITECTURE.md` has the whole picture):
//!
//! - [`session`]: Hello and authentication, once for both roles;
//! - [`controller`]: the pure stop rule (Continue / Throttle / Stop / Abort);
//! - [`link`]: how pages move, one type per side (`SourceLink`, `DestLink`), TCP or RDMA;
//! - [`source`]: negotiate → calibrate → offer → pre-copy → stop-and-copy → commit, under a
//!   rollback guard;
//! - [`stage`]: the destination's pure state machine; [`dest`] drives it.
//!
//! Failure rules: before the source has sent Commit, any failure (peer killed, connection
//! lost, CRC error, refusal, timeout) resumes the guest on the source and the destination
//! discards everything. Once Commit is sent the source never resumes: if the destination then
//! dies, the guest is lost rather than duplicated. The window is one message.
//!
//! Every page frame over TCP carries a CRC over its data, and the destination refuses frames
//! without one: live pages are copied out of guest memory before they are sent, so the CRC is
//! over exactly the bytes sent even while the guest rewrites them (such a page is dirty again
//! and is resent). Over RDMA the NIC's ICRC covers the wire.

pub mod controller;
pub mod dest;
pub mod link;
pub mod pace;
pub mod rdma;
pub mod session;
pub mod source;
pub mod stage;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blip_transport::protocol::{self, ProtocolError};
use blip_transport::tls::Conn;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::cpu;
use crate::dirty::DirtyError;
use crate::memory::MemoryError;
use crate::persist::PersistError;
use crate::vm::VmError;

static RUNNING: AtomicBool = AtomicBool::new(false);
static CANCEL: AtomicBool = AtomicBool::new(false);
/// A blackout target set while the migration runs (ns; 0: none).
static NEW_TARGET: AtomicU64 = AtomicU64::new(0);

/// Gives the running outgoing migration of this process a new blackout target (ns, > 0): it
/// applies from the next round boundary of pre-copy, as QEMU's downtime limit may be changed
/// mid-migration (an operator who sees pre-copy not converge can accept a longer blackout
/// instead of cancelling). Returns whether one runs.
pub fn request_target(ns: u64) -> bool {
    let running = RUNNING.load(Ordering::Acquire);
    if running {
        NEW_TARGET.store(ns.max(1), Ordering::Release);
    }
    running
}

/// Asks the running outgoing migration of this process to stop (it does at the next round
/// boundary of pre-copy; once stop-and-copy began it completes). Returns whether one runs.
pub fn request_cancel() -> bool {
    let running = RUNNING.load(Ordering::Acquire);
    if running {
        CANCEL.store(true, Ordering::Release);
    }
    running
}

/// Marks an outgoing migration as running for its lifetime (cancel requests apply to it).
pub(crate) struct Running;

impl Running {
    pub(crate) fn start() -> Running {
        CANCEL.store(false, Ordering::Release);
        NEW_TARGET.store(0, Ordering::Release);
        RUNNING.store(true, Ordering::Release);
        Running
    }

    pub(crate) fn cancelled(&self) -> bool {
        CANCEL.load(Ordering::Acquire)
    }

    /// A blackout target asked for since the last call ([`request_target`]).
    pub(crate) fn new_target(&self) -> Option<u64> {
        match NEW_TARGET.swap(0, Ordering::AcqRel) {
            0 => None,
            ns => Some(ns),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
        CANCEL.store(false, Ordering::Release);
        NEW_TARGET.store(0, Ordering::Release);
    }
}

/// Pages per Pages frame (1 MiB): large enough for the syscall cost to vanish, small enough to
/// spread a round over several streams.
pub const PAGES_PER_FRAME: u64 = 256;

/// How long a peer may stay silent before the migration is abandoned.
/// (`$BLIP_PEER_TIMEOUT_MS` overrides it: a shorter one for tests, a longer one for slow links.)
pub fn peer_timeout() -> Duration {
    std::env::var("BLIP_PEER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(30), Duration::from_millis)
}

/// Reads one control or data message, the whole message within the peer timeout.
pub(crate) fn read_frame(s: &mut Conn) -> Result<protocol::Frame, ProtocolError> {
    blip_transport::tcp::read_message_within(s, peer_timeout())
}

/// How long an unauthenticated connection may take to say who it is (data streams' hello and
/// proof): short, so idle or garbage connections cannot hold up a migration.
pub(crate) const HELLO_LIMIT: Duration = Duration::from_secs(5);

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Endpoint(#[from] blip_transport::tcp::EndpointError),
    #[error(transparent)]
    Rdma(#[from] blip_transport::rdma::RdmaError),
    #[error("protocol error")]
    Protocol(#[from] ProtocolError),
    #[error("network I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
    #[error("the offer does not fit this host: {0}")]
    Incompatible(String),
    #[error("unexpected {got} message (expected {expected})")]
    Unexpected {
        expected: &'static str,
        got: protocol::MessageKind,
    },
    #[error("a data stream failed")]
    Stream(#[source] Box<MigrationError>),
    #[error("the peer sent pages outside guest memory (gpa {gpa:#x}, {count} pages)")]
    OutOfBounds { gpa: u64, count: u32 },
    #[error(
        "pre-copy did not converge within {limit:?} (--max-precopy-time): predicted blackout {} us above the target {} us, and --on-timeout is abort",
        predicted_ns / 1000,
        target_ns / 1000
    )]
    NoConvergence {
        limit: Duration,
        predicted_ns: u64,
        target_ns: u64,
    },
    #[error("memory verification failed: source digest {src:#x}, destination {dst:#x}")]
    VerifyMismatch { src: u64, dst: u64 },
    #[error("message {got:?} out of order in stage {stage:?} (expected {expected})")]
    OutOfOrder {
        stage: stage::Stage,
        got: protocol::MessageKind,
        expected: &'static str,
    },
    #[error("interrupted while waiting for a source; no guest received")]
    Interrupted,
    #[error("bad migration option: {0}")]
    Options(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("no random bytes for the handshake nonce")]
    Random(#[source] blip_transport::random::RandomError),
    #[error("cancelled; the guest keeps running on the source")]
    Cancelled,
    #[error("{0} (limit {1} simultaneous migrations per direction; set BLIP_MAX_MIGRATIONS)")]
    NoSlot(&'static str, u32),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error(transparent)]
    Key(#[from] blip_transport::auth::AuthError),
    /// Boxed: the TLS errors are large and every Result of a migration carries this enum.
    #[error(transparent)]
    Tls(Box<blip_transport::tls::TlsError>),
    #[error("connection from {0} refused: not in --allow")]
    NotAllowed(std::net::IpAddr),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("guest memory access failed")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

impl From<blip_transport::tls::TlsError> for MigrationError {
    fn from(e: blip_transport::tls::TlsError) -> Self {
        MigrationError::Tls(Box::new(e))
    }
}

impl MigrationError {
    /// Maps "peer said Refuse/Abort" protocol outcomes to their own variants.
    pub fn from_unexpected(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Refused(r) => MigrationError::Refused(r),
            ProtocolError::Aborted(r) => MigrationError::Aborted(r),
            ProtocolError::Unexpected { expected, got } => {
                MigrationError::Unexpected { expected, got }
            }
            other => MigrationError::Protocol(other),
        }
    }
}

/// What to do when pre-copy runs out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Stop and copy anyway (blackout above target).
    Go,
    /// Give up; the guest keeps running on the source.
    Abort,
}

/// Migration options (the `blip migrate` flags, carried over the control API).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// Destination, `tcp://HOST:PORT`.
    pub to: String,
    /// Blackout target in nanoseconds.
    pub max_blackout_ns: u64,
    /// Parallel TCP data streams.
    pub streams: u32,
    /// Longest pre-copy before `on_timeout` applies, in milliseconds.
    pub max_precopy_ms: u64,
    /// Go or abort when pre-copy runs out of time.
    pub on_timeout: OnTimeout,
    /// Compare a digest of source memory at pause with destination memory before resume.
    pub verify: bool,
    /// Shared key file for authentication; `None` only with `--insecure`.
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// The guest's name in the source host's registry, offered so the destination registers
    /// it under the same name (the source blip fills it in; empty = none).
    #[serde(default)]
    pub guest_name: String,
    /// How pages travel (`--transport`; default: the URL's scheme).
    #[serde(default)]
    pub transport: rdma::TransportChoice,
    /// Mutual TLS on the control connection and the data streams (`--tls-*`; TCP only).
    #[serde(default)]
    pub tls: Option<blip_transport::tls::Files>,
    /// Nice value of the migration's threads until the pause (`--precopy-nice`; 0 = as the
    /// guest's vCPUs).
    #[serde(default)]
    pub precopy_nice: u8,
    /// Pre-copy bandwidth limit of the data streams together, bytes per second
    /// (`--max-bandwidth`; 0 = none). The blackout's pages are not limited.
    #[serde(default)]
    pub max_bandwidth: u64,
}

/// One pre-copy round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    pub pages: u64,
    pub bytes: u64,
    pub duration_ns: u64,
    /// Bytes per second achieved in this round.
    pub throughput: f64,
    /// Pages dirty when the round ended (what the next round must send).
    pub dirty_after: u64,
    /// Smoothed guest dirty rate, pages per second (sum over vCPUs).
    pub dirty_rate: f64,
    /// Per-vCPU dirty rates, pages per second (dirty ring only).
    pub vcpu_dirty_rates: Vec<f64>,
    /// Blackout predicted if we stopped after this round, in nanoseconds.
    pub predicted_blackout_ns: u64,
    /// Per-vCPU throttle (percent of time held out of the guest) after this round.
    pub throttle_percent: Vec<u32>,
}

/// Where the blackout went, in nanoseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Pause requested → last vCPU out of the guest.
    pub pause: u64,
    /// Final ring/bitmap harvest.
    pub final_harvest: u64,
    /// Final dirty pages sent.
    pub final_pages: u64,
    /// vCPU and device state saved and encoded. The vCPUs start saving right after the pause,
    /// alongside the final harvest and pages; this is what remained after the pages.
    pub state_save: u64,
    /// State sent until the destination said Ready (transfer, decode, restore).
    pub transfer_restore: u64,
    /// Commit sent until the destination's first vCPU entered the guest.
    pub resume: u64,
    /// Memory digests (only with --verify).
    pub verify: u64,
}

/// The result of one migration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The migration's id, as its log lines on both hosts show it (`migration=ID`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub to: String,
    pub transport: String,
    pub streams: u32,
    pub mem_size: u64,
    pub vcpus: u32,
    /// VMM blackout: source pause request → destination's first vCPU back in the guest.
    pub blackout_ns: u64,
    /// How `blackout_ns` was measured: "shared-clock" (same host) or "rtt-corrected".
    pub blackout_method: String,
    /// Largest heartbeat gap across the migration (guest-observed), when the guest beats.
    pub guest_blackout_ns: Option<u64>,
    /// Blackout the controller predicted when it decided to stop and copy.
    pub predicted_blackout_ns: u64,
    pub phases: Phases,
    pub final_pages: u64,
    /// The last live round, sent on the control stream just before the pause.
    pub last_live_ns: u64,
    pub total_ns: u64,
    pub precopy_ns: u64,
    /// Pre-copy rounds run (the report keeps at most the first and last 32).
    pub round_count: u32,
    pub rounds: Vec<RoundReport>,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Some(true) when --verify compared digests and they matched.
    pub verified: Option<bool>,
    /// The vCPU state pieces that travelled.
    pub state_pieces: String,
    pub state_bytes: u64,
    /// Why the pre-copy stopped.
    pub stop_reason: String,
    /// How often pre-copy measured the blackout's fixed costs again because they alone kept
    /// the prediction above the target (see `source::REMEASURE_EVERY_NS`).
    #[serde(default)]
    pub fixed_remeasured: u32,
    /// The blackout target (`--max-blackout`), in nanoseconds.
    #[serde(default)]
    pub target_ns: u64,
    /// Whether the VMM blackout stayed within the target (`blip migrate` exits 5 when not).
    #[serde(default)]
    pub target_met: bool,
    /// Notes from the destination's state restore (e.g. a TSC frequency it could not match).
    #[serde(default)]
    pub restore_notes: Vec<String>,
    /// Set when Commit went out (or may have) but the destination never confirmed it runs the
    /// guest: the guest is paused here and maybe on the destination, and an operator (or a
    /// cluster manager with fencing) must resume it on exactly one side (`blip resolve`).
    /// Says what was lost.
    #[serde(default)]
    pub in_doubt: Option<String>,
    /// CLOCK_MONOTONIC (ns) on the source when the migration was asked for, when the pause was
    /// requested and (same host only, else 0) when the destination's first vCPU ran again: they
    /// place guest heartbeats inside or outside the blackout.
    #[serde(default)]
    pub t_start_ns: u64,
    #[serde(default)]
    pub t_pause_ns: u64,
    #[serde(default)]
    pub t_resume_ns: u64,
    /// How long switching dirty tracking on took on the migration thread, when it began
    /// (CLOCK_MONOTONIC ns), and the largest heartbeat gap the guest saw in the 10 ms from then
    /// (the stall of tracking start: write-protection, then a fault per first write).
    #[serde(default)]
    pub tracking_start_ns: u64,
    #[serde(default)]
    pub t_tracking_start_ns: u64,
    #[serde(default)]
    pub guest_gap_at_tracking_start_ns: Option<u64>,
    /// Largest gap between the source guest's port heartbeats from the migration's start up to
    /// the last beat before the pause (the stall the guest sees outside the blackout, source
    /// side), and where it began (ns after `t_start_ns`). None when the guest does not beat.
    #[serde(default)]
    pub guest_gap_before_pause_ns: Option<u64>,
    #[serde(default)]
    pub guest_gap_before_pause_at_ns: Option<u64>,
}

/// A fingerprint of the CPU a guest sees from this host: vendor, family/model/stepping and a
/// hash of the feature leaves blip's boot CPUID exposes (APIC IDs and the TSC leaf masked).
pub fn cpu_fingerprint(kvm: &Kvm, vcpus: u8) -> ([u8; 12], u32, u64) {
    let Ok(base) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return ([0; 12], 0, 0);
    };
    let c = cpu::cpuid_for(&base, 0, vcpus, 0);
    let mut vendor = [0u8; 12];
    let mut signature = 0;
    let mut h = crate::hash::Fnv::new();
    for e in c.as_slice() {
        match e.function {
            0 => {
                vendor[..4].copy_from_slice(&e.ebx.to_le_bytes());
                vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
                vendor[8..].copy_from_slice(&e.ecx.to_le_bytes());
            }
            1 => signature = e.eax,
            _ => {}
        }
        let (ebx, edx) = match e.function {
            1 => (e.ebx & 0x0000_ffff, e.edx),
            0xb | 0x1f => (e.ebx, 0),
            cpu::CPUID_TSC_LEAF => continue,
            _ => (e.ebx, e.edx),
        };
        for v in [e.function, e.index, e.eax, ebx, e.ecx, edx] {
            h.word(u64::from(v));
        }
    }
    (vendor, signature, h.finish())
}

/// An identifier of this host's boot (same value ⇒ same CLOCK_MONOTONIC).
pub fn host_id() -> u64 {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    crate::hash::fnv1a(id.trim().as_bytes())
}

/// Fresh random bytes (nonces, session ids) from the kernel; a failure is an error, never
/// zeros.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], MigrationError> {
    blip_transport::random::random_bytes().map_err(MigrationError::Random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_as_json() {
        let o = Options {
            to: "tcp://127.0.0.1:4000".into(),
            max_blackout_ns: 1_000_000,
            streams: 2,
            max_precopy_ms: 30_000,
            on_timeout: OnTimeout::Go,
            verify: true,
            key: None,
            guest_name: String::new(),
            transport: rdma::TransportChoice::Auto,
            tls: None,
            precopy_nice: 19,
            max_bandwidth: 4 << 20,
        };
        let j = serde_json::to_string(&o).unwrap();
        let back: Options = serde_json::from_str(&j).unwrap();
        assert_eq!(back.to, o.to);
        assert_eq!(back.on_timeout, OnTimeout::Go);
        assert_eq!(back.transport, rdma::TransportChoice::Auto);
        assert_eq!(back.precopy_nice, 19);
        assert_eq!(back.max_bandwidth, 4 << 20);
        // Clients that predate --transport still parse: the URL decides.
        let old = j.replace(",\"transport\":\"auto\"", "");
        assert!(!old.contains("transport"), "{old}");
        let back: Options = serde_json::from_str(&old).unwrap();
        assert_eq!(back.transport, rdma::TransportChoice::Url);
    }

    #[test]
    fn host_id_is_stable() {
        assert_eq!(host_id(), host_id());
        assert_ne!(random_bytes::<16>().unwrap(), random_bytes::<16>().unwrap());
    }
}
