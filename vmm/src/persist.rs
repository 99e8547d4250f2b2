//! Saving and restoring the state of a paused VM: every vCPU's architectural state, the KVM
//! clock and the devices.
//!
//! Why: live migration moves guest memory page by page while the guest runs, but the CPU and
//! device state can only be taken once the vCPUs are paused, inside the blackout. That state is
//! what this module carries (snapshots will carry it too). Memory is not part of it: it travels
//! separately, straight into the destination's guest RAM.
//!
//! What: only state that KVM reports. Each optional piece (XSAVE, XCRs, vCPU events, debug
//! registers, TSC frequency, KVM clock) is saved only when this host's KVM has the capability,
//! and [`VcpuState::pieces`] / [`Caps::pieces`] say which pieces travel so the migration handshake
//! can refuse a destination that lacks one. A VM with an in-kernel irqchip and PIT (the PC
//! platform) also carries each vCPU's local APIC, the PIC/IOAPIC state and the PIT
//! ([`crate::platform_state`]); a VM without them carries and times none of it. There is no
//! nested state (`KVM_CAP_NESTED_STATE` is 0 on our hosts). MSRs are the ones in
//! `KVM_GET_MSR_INDEX_LIST` that KVM can read and write back on a VM of the same platform,
//! probed once per VM ([`Vm::persist_caps`]) so the blackout path asks only for those.
//!
//! Time: the KVM clock and every vCPU's TSC continue from their saved values. A migration of a
//! PC-platform guest ([`ClockPolicy::Advance`]) moves both forward by the time that passed on
//! the destination since the state arrived (the state's transit and restore), so the guest's
//! clocks neither stall nor jump; a snapshot restore continues from the saved values (the
//! parked time is not seen).
//!
//! Early state: a migration sends what a running guest cannot change or changes only at boot
//! ([`EarlyState`]: CPUID, TSC frequency, XCRs, most MSRs) before the pause, and the
//! destination applies it then ([`Vm::apply_early`]). The blackout's state is the whole state
//! minus what is still equal to its early value ([`VmState::strip_early`]), so anything the
//! guest changed in between travels again and wins ([`VmState::merge_early`],
//! [`restore_vcpu_after`]). Snapshots always hold the whole state.
//!
//! Format: the whole [`VmState`] is bincode (fixed-int, little-endian) inside one envelope
//! ([`ENVELOPE`]: a layout of the transport's one framing helper, which does every check):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic `BLIPSTAT` |
//! | 8      | 4    | format version (u32 LE), [`FORMAT_VERSION`] — not the crate version |
//! | 12     | 8    | payload length (u64 LE), at most [`MAX_STATE_SIZE`] |
//! | 20     | 4    | CRC32C of the payload (u32 LE) |
//! | 24     | len  | payload |
//!
//! There is one format version; a reader rejects any other with a clear error rather than
//! guessing. The size cap is checked before anything is allocated, and bincode is given the
//! same limit, so a hostile length inside the payload cannot allocate without bound.

use std::io::Read;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bincode::Options;
use blip_transport::protocol::{Envelope, EnvelopeError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::{DevicesError, DevicesState};
use crate::platform_state::{self, IrqchipState, PlatformStateError, Presence};
use crate::vm::{Vm, VmError};

/// Envelope magic.
pub const MAGIC: [u8; 8] = *b"BLIPSTAT";
/// The one format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// Envelope header size.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted (and produced).
pub const MAX_STATE_SIZE: u64 = 64 << 20;

/// The state envelope (the table above) in the transport's one framing helper.
pub const ENVELOPE: Envelope = Envelope::new(&MAGIC, FORMAT_VERSION, 4).with_len(8, MAX_STATE_SIZE);

const _: () = assert!(ENVELOPE.header_len() == HEADER_LEN);

/// Optional state pieces (bits of [`VcpuState::pieces`], [`VmState::pieces`], [`Caps::pieces`]).
/// CPUID, regs, sregs, FPU, MSRs and MP state always travel.
pub const PIECE_XSAVE: u64 = 1 << 0;
/// Extended control registers (KVM_CAP_XCRS).
pub const PIECE_XCRS: u64 = 1 << 1;
/// Pending exceptions, NMI, interrupt shadow (KVM_CAP_VCPU_EVENTS).
pub const PIECE_VCPU_EVENTS: u64 = 1 << 2;
/// Debug registers (KVM_CAP_DEBUGREGS).
pub const PIECE_DEBUGREGS: u64 = 1 << 3;
/// vCPU TSC frequency (KVM_CAP_GET_TSC_KHZ).
pub const PIECE_TSC_KHZ: u64 = 1 << 4;
/// KVM clock (KVM_CAP_ADJUST_CLOCK, VM-wide).
pub const PIECE_CLOCK: u64 = 1 << 5;
/// Each vCPU's local APIC (the VM has an in-kernel irqchip).
pub const PIECE_LAPIC: u64 = 1 << 6;
/// PIC master, PIC slave and IOAPIC (the VM has an in-kernel irqchip).
pub const PIECE_IRQCHIP: u64 = 1 << 7;
/// The in-kernel PIT's channels and flags.
pub const PIECE_PIT: u64 = 1 << 8;
/// The pieces only a PC-platform VM (irqchip, PIT) carries: a destination must build that
/// platform to take them.
pub const PLATFORM_PIECES: u64 = PIECE_LAPIC | PIECE_IRQCHIP | PIECE_PIT;
/// Every piece this code knows.
pub const ALL_PIECES: u64 = (1 << 9) - 1;

const PIECE_NAMES: [(u64, &str); 9] = [
    (PIECE_XSAVE, "xsave"),
    (PIECE_XCRS, "xcrs"),
    (PIECE_VCPU_EVENTS, "vcpu-events"),
    (PIECE_DEBUGREGS, "debugregs"),
    (PIECE_TSC_KHZ, "tsc-khz"),
    (PIECE_CLOCK, "clock"),
    (PIECE_LAPIC, "lapic"),
    (PIECE_IRQCHIP, "irqchip"),
    (PIECE_PIT, "pit"),
];

/// Names of the pieces in `pieces`, comma-separated (unknown bits as hex).
pub fn piece_names(pieces: u64) -> String {
    let mut names: Vec<String> = PIECE_NAMES
        .iter()
        .filter(|(bit, _)| pieces & bit != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    if pieces & !ALL_PIECES != 0 {
        names.push(format!("unknown {:#x}", pieces & !ALL_PIECES));
    }
    names.join(",")
}

/// Errors saving, restoring, encoding or decoding VM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("KVM could not {what} on vCPU {vcpu}")]
    Kvm {
        what: &'static str,
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM could not {what} for the VM")]
    VmKvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot open /dev/kvm to list MSRs")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("vCPU {vcpu}: KVM read only {read} of {total} MSRs (MSR {index:#x} failed)")]
    MsrRead {
        vcpu: u8,
        read: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {vcpu}: KVM accepted only {set} of {total} MSRs (MSR {index:#x} refused)")]
    MsrWrite {
        vcpu: u8,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {vcpu}: {count} {what} entries exceed KVM's limit of {max}")]
    TooManyEntries {
        vcpu: u8,
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("vCPU {vcpu}: saved XSAVE area is {bytes} bytes, this host's KVM takes {max}")]
    XsaveTooLarge { vcpu: u8, bytes: usize, max: usize },
    #[error("saved state needs pieces this host's KVM lacks: {0}")]
    MissingPieces(String),
    #[error("saved state carries {0} but this VM has no in-kernel irqchip and PIT (it needs the PC platform)")]
    NeedsPlatform(String),
    #[error(transparent)]
    Platform(#[from] PlatformStateError),
    #[error("saved state has {saved} vCPUs but this VM has {here}")]
    VcpuCount { saved: usize, here: usize },
    #[error("saved state has {saved} bytes of guest memory but this VM has {here}")]
    MemSize { saved: u64, here: u64 },
    #[error("saved state for vCPU {index} is the state of vCPU {saved}")]
    VcpuOrder { index: usize, saved: u8 },
    #[error("cannot reach a vCPU thread")]
    Vm(#[source] VmError),
    #[error("vCPU {0} did not return its state")]
    NoReply(u8),
    #[error("cannot restore device state")]
    Devices(#[source] DevicesError),
    #[error("not a blip state (bad magic)")]
    NotBlipState,
    #[error("unsupported blip state format version {found} (this blip reads {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("blip state is truncated: {have} of {need} bytes")]
    Truncated { need: u64, have: u64 },
    #[error("blip state has {0} bytes after its payload")]
    Trailing(u64),
    #[error("blip state is corrupt: CRC32C {actual:#010x}, header says {expected:#010x}")]
    Crc { expected: u32, actual: u32 },
    #[error("blip state payload of {size} bytes exceeds the {MAX_STATE_SIZE}-byte limit")]
    TooLarge { size: u64 },
    #[error("blip state payload cannot be decoded")]
    Undecodable(#[source] bincode::Error),
    #[error("cannot encode blip state")]
    Encode(#[source] bincode::Error),
    #[error("cannot read blip state")]
    Io(#[source] std::io::Error),
    #[error("early state of vCPU {0} lists its MSRs out of order")]
    EarlyMsrOrder(u8),
}

/// `kvm_fpu` mirrored for serde (kvm-bindings gives it no serde impl).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The KVM clock (`kvm_clock_data`), VM-wide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// kvmclock nanoseconds when saved.
    pub clock: u64,
    /// Flags KVM returned (KVM_CLOCK_TSC_STABLE, _REALTIME, _HOST_TSC).
    pub flags: u32,
    /// Host CLOCK_REALTIME ns when saved (if KVM_CLOCK_REALTIME).
    pub realtime: u64,
    /// Host TSC when saved (if KVM_CLOCK_HOST_TSC).
    pub host_tsc: u64,
}

/// One vCPU's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (APIC ID).
    pub index: u8,
    /// Optional pieces present (`PIECE_*`).
    pub pieces: u64,
    /// CPUID the vCPU runs with: a blank destination vCPU needs it before any other state.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// (index, value) of every readable MSR.
    pub msrs: Vec<(u32, u64)>,
    /// The XSAVE area as 32-bit words (4096 bytes, more with KVM_CAP_XSAVE2).
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<kvm_xcrs>,
    pub events: Option<kvm_vcpu_events>,
    pub mp_state: u32,
    pub debugregs: Option<kvm_debugregs>,
    pub tsc_khz: Option<u32>,
    /// Local APIC registers (`PIECE_LAPIC`).
    pub lapic: Option<kvm_lapic_state>,
}

/// The whole VM's state (guest memory excluded: it travels separately).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory size in bytes; the destination must have the same.
    pub mem_size: u64,
    /// Optional pieces present (`PIECE_*`, union of the vCPUs' and the VM's).
    pub pieces: u64,
    pub vcpus: Vec<VcpuState>,
    pub clock: Option<ClockState>,
    /// PIC master, PIC slave, IOAPIC (`PIECE_IRQCHIP`).
    pub irqchip: Option<IrqchipState>,
    /// The PIT (`PIECE_PIT`).
    pub pit: Option<kvm_pit_state2>,
    /// Host CLOCK_REALTIME (ns) when PC-platform state was saved (0 otherwise). For the
    /// record only: a restore does not trust another host's wall clock (see
    /// [`ClockPolicy::Advance`]).
    pub saved_at_ns: u64,
    pub devices: DevicesState,
}

/// What a restore does with guest time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockPolicy {
    /// The KVM clock and TSCs continue from their saved values (snapshot restore: the guest
    /// does not see the time it was parked).
    Continue,
    /// A PC-platform state's KVM clock and TSCs move forward by the time since `since_ns`
    /// (this host's CLOCK_MONOTONIC, `devices::now_ns`, when the state arrived), at most
    /// [`MAX_ADVANCE_NS`]; minimal-platform state continues. The source reads the KVM clock
    /// while its vCPUs are paused and the clock keeps running there until the save, so what
    /// the guest would miss is the state's transit and restore: measured here, on one clock.
    /// Not the two hosts' CLOCK_REALTIME (`saved_at_ns`): those disagree by up to a second
    /// (an RTC read at boot has whole seconds), and the guest's time would jump forward on
    /// one hop and stall on the next by that much. What is not counted (the source's encode,
    /// µs, and the one-way network latency) the guest sees as a stall of that length.
    Advance { since_ns: u64 },
}

/// Largest forward step a migration gives guest time: more means the two hosts' clocks
/// disagree, and the guest is better off with a stall than a leap.
pub const MAX_ADVANCE_NS: u64 = 10_000_000_000;

/// MSR_IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSR_IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// What this host's KVM lets a VM save and restore; computed once per VM, before any blackout.
#[derive(Clone, Debug, Default)]
pub struct Caps {
    /// Optional pieces this KVM supports (`PIECE_*`).
    pub pieces: u64,
    /// MSRs `KVM_GET_MSRS` reads on this host (a subset of the KVM MSR index list). Empty when
    /// computed for a restore, which sets exactly the MSRs that were saved.
    pub msr_indices: Vec<u32>,
    /// Size in bytes of the XSAVE area (KVM_CAP_XSAVE2, or 4096 without it).
    pub xsave_size: usize,
    /// KVM can change a vCPU's TSC frequency (KVM_CAP_TSC_CONTROL).
    pub tsc_control: bool,
    /// Per-vCPU CPUID, read once before the blackout (it never changes while a guest runs),
    /// so the blackout path skips that ioctl. Empty: read it during the save.
    pub cpuid: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    /// Per-vCPU TSC frequency (kHz), read once before the blackout: only the VMM sets it, so
    /// the blackout path skips `KVM_GET_TSC_KHZ`. Empty: read it during the save.
    pub tsc_khz: Vec<u32>,
}

impl Caps {
    /// The optional pieces and XSAVE size KVM reports for `vm` (no MSR list), the platform
    /// pieces included (two probing ioctls).
    pub fn of_vm(vm: &VmFd) -> Caps {
        Self::of_vm_probing(vm, true)
    }

    /// [`Caps::of_vm`], probing for an irqchip and PIT only when `platform` (a restore of
    /// minimal-platform state skips the probe: its blackout pays nothing for the PC platform).
    pub fn of_vm_probing(vm: &VmFd, platform: bool) -> Caps {
        let mut pieces = 0;
        let here = if platform {
            Presence::of_vm(vm)
        } else {
            Presence::default()
        };
        if here.irqchip {
            pieces |= PIECE_LAPIC | PIECE_IRQCHIP;
        }
        if here.pit {
            pieces |= PIECE_PIT;
        }
        for (cap, bit) in [
            (Cap::Xsave, PIECE_XSAVE),
            (Cap::Xcrs, PIECE_XCRS),
            (Cap::VcpuEvents, PIECE_VCPU_EVENTS),
            (Cap::Debugregs, PIECE_DEBUGREGS),
            (Cap::GetTscKhz, PIECE_TSC_KHZ),
            (Cap::AdjustClock, PIECE_CLOCK),
        ] {
            if vm.check_extension(cap) {
                pieces |= bit;
            }
        }
        let legacy = std::mem::size_of::<kvm_xsave>();
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(legacy);
        Caps {
            pieces,
            msr_indices: Vec::new(),
            xsave_size,
            tsc_control: vm.check_extension(Cap::TscControl),
            cpuid: Vec::new(),
            tsc_khz: Vec::new(),
        }
    }
}

/// [`restorable_msrs_for`] a VM without an in-kernel irqchip.
pub fn restorable_msrs() -> Result<Vec<u32>, PersistError> {
    restorable_msrs_for(false)
}

/// The MSRs worth saving on this host: those in KVM's MSR index list that KVM can both read
/// and write back. The list names some MSRs KVM reads but refuses to set in a VM without an
/// in-kernel LAPIC (`MSR_KVM_ASYNC_PF_INT`, for one); saving those would make every restore
/// fail, while a VM with an irqchip (`irqchip`) must carry them. Writability is probed on a
/// throwaway VM of the same platform so the guest's own vCPUs are not touched.
pub fn restorable_msrs_for(irqchip: bool) -> Result<Vec<u32>, PersistError> {
    // The Vm keeps its Kvm handle private; opening /dev/kvm again is cheap.
    let kvm = Kvm::new().map_err(PersistError::OpenKvm)?;
    let vm_kvm = |what| move |source| PersistError::VmKvm { what, source };
    let list = kvm
        .get_msr_index_list()
        .map_err(vm_kvm("list MSRs"))?
        .as_slice()
        .to_vec();
    let vm = kvm
        .create_vm()
        .map_err(vm_kvm("create a VM to probe MSRs"))?;
    if irqchip {
        platform_state::create_pc(&vm)?;
    }
    let vcpu = vm
        .create_vcpu(0)
        .map_err(vm_kvm("create a vCPU to probe MSRs"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(vm_kvm("report supported CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(vm_kvm("set CPUID on the MSR probe vCPU"))?;

    let mut ok = Vec::with_capacity(list.len());
    let mut rest = &list[..];
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msrs_of(0, &msr_entries(chunk))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(vm_kvm("read MSRs on the probe vCPU"))?
            .min(chunk.len());
        let mut written = 0;
        if read > 0 {
            let back = msrs_of(0, &msrs.as_slice()[..read])?;
            written = vcpu
                .set_msrs(&back)
                .map_err(vm_kvm("write MSRs on the probe vCPU"))?
                .min(read);
            ok.extend_from_slice(&chunk[..written]);
        }
        // KVM stops at the first MSR it cannot read (or write): skip that one and go on.
        let consumed = if written == chunk.len() {
            written
        } else {
            written + 1
        };
        rest = &rest[consumed..];
    }
    Ok(ok)
}

fn kvm(what: &'static str, vcpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Kvm { what, vcpu, source }
}

fn msrs_of(vcpu: u8, entries: &[kvm_msr_entry]) -> Result<Msrs, PersistError> {
    Msrs::from_entries(entries).map_err(|_| PersistError::TooManyEntries {
        vcpu,
        what: "MSR",
        count: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Entries that ask KVM to read `indices`.
pub(crate) fn msr_entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

/// Entries that ask KVM to write `(index, value)` pairs.
pub(crate) fn msr_writes(pairs: &[(u32, u64)]) -> Vec<kvm_msr_entry> {
    pairs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// Those of `candidates` that `KVM_GET_MSRS` reads on `fd`. KVM stops at the first MSR it
/// cannot read and returns how many it read, so each call skips one unreadable MSR.
pub fn readable_msrs(fd: &VcpuFd, vcpu: u8, candidates: &[u32]) -> Result<Vec<u32>, PersistError> {
    let mut readable = Vec::with_capacity(candidates.len());
    let mut rest = candidates;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msrs_of(vcpu, &msr_entries(chunk))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm("read MSRs (probe)", vcpu))?
            .min(chunk.len());
        readable.extend_from_slice(&chunk[..n]);
        // A short count means chunk[n] stopped KVM: skip it.
        let consumed = if n == chunk.len() { n } else { n + 1 };
        rest = &rest[consumed..];
    }
    Ok(readable)
}

/// Saves vCPU `index`'s state from its fd (the vCPU must be paused).
pub fn save_vcpu(fd: &VcpuFd, index: u8, caps: &Caps) -> Result<VcpuState, PersistError> {
    let cpuid = match caps.cpuid.get(index as usize) {
        Some(c) => c.clone(),
        None => fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read CPUID", index))?
            .as_slice()
            .to_vec(),
    };
    let regs = fd.get_regs().map_err(kvm("read registers", index))?;
    let sregs = fd
        .get_sregs()
        .map_err(kvm("read segment registers", index))?;
    // The XSAVE area holds the x87/SSE state too: with XSAVE, KVM_GET_FPU would only cost the
    // blackout another ioctl. `fpu` then stays at its default and is not restored.
    let fpu = if caps.pieces & PIECE_XSAVE != 0 {
        FpuState::default()
    } else {
        FpuState::from(&fd.get_fpu().map_err(kvm("read FPU state", index))?)
    };

    let mut msrs = Vec::with_capacity(caps.msr_indices.len());
    for chunk in caps.msr_indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut m = msrs_of(index, &msr_entries(chunk))?;
        let n = fd.get_msrs(&mut m).map_err(kvm("read MSRs", index))?;
        if n != chunk.len() {
            return Err(PersistError::MsrRead {
                vcpu: index,
                read: msrs.len() + n,
                total: caps.msr_indices.len(),
                index: chunk[n.min(chunk.len() - 1)],
            });
        }
        msrs.extend(m.as_slice().iter().map(|e| (e.index, e.data)));
    }

    // Each optional piece is read only where this VM's KVM has it, and marked as travelling.
    let mut pieces = 0;
    let mut piece = |flag: u64| {
        let has = caps.pieces & flag != 0;
        if has {
            pieces |= flag;
        }
        has
    };
    let xsave = piece(PIECE_XSAVE)
        .then(|| get_xsave(fd, index, caps.xsave_size))
        .transpose()?;
    let xcrs = piece(PIECE_XCRS)
        .then(|| fd.get_xcrs().map_err(kvm("read XCRs", index)))
        .transpose()?;
    let events = piece(PIECE_VCPU_EVENTS)
        .then(|| fd.get_vcpu_events().map_err(kvm("read vCPU events", index)))
        .transpose()?;
    let mp_state = fd
        .get_mp_state()
        .map_err(kvm("read MP state", index))?
        .mp_state;
    let debugregs = piece(PIECE_DEBUGREGS)
        .then(|| {
            fd.get_debug_regs()
                .map_err(kvm("read debug registers", index))
        })
        .transpose()?;
    let tsc_khz = piece(PIECE_TSC_KHZ)
        .then(|| match caps.tsc_khz.get(index as usize) {
            Some(&khz) => Ok(khz),
            None => fd
                .get_tsc_khz()
                .map_err(kvm("read the TSC frequency", index)),
        })
        .transpose()?;
    let lapic = piece(PIECE_LAPIC)
        .then(|| platform_state::save_lapic(fd, index))
        .transpose()?;
    Ok(VcpuState {
        index,
        pieces,
        cpuid,
        regs,
        sregs,
        fpu,
        msrs,
        xsave,
        xcrs,
        events,
        mp_state,
        debugregs,
        tsc_khz,
        lapic,
    })
}

pub(crate) fn get_xsave(fd: &VcpuFd, index: u8, size: usize) -> Result<Vec<u32>, PersistError> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    if size <= legacy {
        let x = fd.get_xsave().map_err(kvm("read XSAVE state", index))?;
        return Ok(x.region.to_vec());
    }
    let fam = (size - legacy).div_ceil(std::mem::size_of::<u32>());
    let mut x = Xsave::new(fam).map_err(|_| PersistError::XsaveTooLarge {
        vcpu: index,
        bytes: size,
        max: legacy,
    })?;
    // SAFETY: `x` holds `size` bytes, the XSAVE size KVM reported (KVM_CAP_XSAVE2) for this VM;
    // blip never enables XSTATE features dynamically, so KVM writes at most that much.
    unsafe { fd.get_xsave2(&mut x) }.map_err(kvm("read XSAVE state", index))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

pub(crate) fn set_xsave(
    fd: &VcpuFd,
    index: u8,
    words: &[u32],
    size: usize,
) -> Result<(), PersistError> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    let max = size.max(legacy);
    if words.len() * 4 > max {
        return Err(PersistError::XsaveTooLarge {
            vcpu: index,
            bytes: words.len() * 4,
            max,
        });
    }
    let region_len = legacy / 4;
    if max <= legacy {
        let mut x = kvm_xsave::default();
        x.region[..words.len()].copy_from_slice(words);
        // SAFETY: this host's XSAVE size (KVM_CAP_XSAVE2, or none) is at most
        // size_of::<kvm_xsave>(), so KVM reads no further than the struct we pass.
        return unsafe { fd.set_xsave(&x) }.map_err(kvm("set XSAVE state", index));
    }
    let fam = (max - legacy).div_ceil(4);
    let mut x = Xsave::new(fam).map_err(|_| PersistError::XsaveTooLarge {
        vcpu: index,
        bytes: words.len() * 4,
        max: legacy,
    })?;
    let head = words.len().min(region_len);
    // SAFETY: only plain data is written into the FAM struct's fixed part.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..head].copy_from_slice(&words[..head]);
    if words.len() > region_len {
        x.as_mut_slice()[..words.len() - region_len].copy_from_slice(&words[region_len..]);
    }
    // SAFETY: `x` holds `max` bytes, the XSAVE size KVM reported for this VM.
    unsafe { fd.set_xsave2(&x) }.map_err(kvm("set XSAVE state", index))
}

/// A vCPU whose TSC frequency could not be made what it was on the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TscNote {
    pub vcpu: u8,
    /// kHz when saved.
    pub saved_khz: u32,
    /// kHz the vCPU runs at here.
    pub here_khz: u32,
    /// Why it was not scaled.
    pub reason: String,
}

impl std::fmt::Display for TscNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {}: TSC runs at {} kHz here, {} kHz when saved ({}); guest timing is off by \
             that ratio",
            self.vcpu, self.here_khz, self.saved_khz, self.reason
        )
    }
}

/// System-segment types of a 64-bit TSS.
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// Whether this host's CPU is AMD's (KVM runs on SVM).
fn host_is_amd() -> bool {
    // CPUID leaf 0 exists on every x86-64 CPU and has no side effects.
    let r = std::arch::x86_64::__cpuid(0);
    (r.ebx, r.edx, r.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
}

/// Restores `st` into a blank, paused vCPU, in the order KVM needs: CPUID first, then TSC
/// frequency (before the TSC MSR is written), sregs (with the APIC base) before regs, FPU,
/// the local APIC (after the APIC base, which picks xAPIC or x2APIC; before the MSRs, because
/// KVM drops a TSC-deadline write unless the LAPIC timer is already in that mode), MSRs, XSAVE,
/// XCRs, events, MP state, debug registers. `tsc_advance_ns` moves the saved TSC forward by
/// that much guest time. Returns a note when the TSC frequency differs and KVM could not scale
/// it (the guest still runs).
pub fn restore_vcpu(
    fd: &VcpuFd,
    st: &VcpuState,
    caps: &Caps,
    tsc_advance_ns: u64,
) -> Result<Option<TscNote>, PersistError> {
    restore_vcpu_after(fd, st, caps, tsc_advance_ns, None)
}

/// [`restore_vcpu`] into a vCPU that got its early state before the blackout. `applied` is
/// what [`apply_early_vcpu`] set: a piece equal to it is not set again (CPUID, TSC frequency,
/// XCRs, each MSR by value), one that differs is (the newer value wins).
pub fn restore_vcpu_after(
    fd: &VcpuFd,
    st: &VcpuState,
    caps: &Caps,
    tsc_advance_ns: u64,
    applied: Option<&EarlyVcpu>,
) -> Result<Option<TscNote>, PersistError> {
    let i = st.index;
    if applied.is_none_or(|a| a.cpuid != st.cpuid) {
        set_cpuid(fd, i, &st.cpuid)?;
    }
    let mut note = None;
    if let Some(saved) = st.tsc_khz {
        if applied.is_none_or(|a| a.tsc_khz != Some(saved)) {
            note = set_tsc_khz(fd, i, saved, caps)?;
        }
    }

    let mut sregs = st.sregs;
    if sregs.tr.type_ == TSS_BUSY && host_is_amd() {
        // KVM on AMD reports TR as busy (it adds the bit; the VMCB holds the available type,
        // as the CPU's own LTR leaves it) and writes back what it is given. QEMU's emulated
        // SVM (the soft-RoCE hosts) then refuses every I/O-bitmap access of the restored guest
        // with #GP (it wants an available TSS): give back what the VMCB held.
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    fd.set_sregs(&sregs)
        .map_err(kvm("set segment registers", i))?;
    fd.set_regs(&st.regs).map_err(kvm("set registers", i))?;
    if st.xsave.is_none() {
        fd.set_fpu(&kvm_fpu::from(&st.fpu))
            .map_err(kvm("set FPU state", i))?;
    }

    if let Some(lapic) = &st.lapic {
        platform_state::restore_lapic(fd, i, lapic)?;
    }

    let tsc_step = match (tsc_advance_ns, st.tsc_khz) {
        (0, _) | (_, None) => 0,
        (ns, Some(khz)) => platform_state::tsc_ticks(ns, khz),
    };
    // The TSC deadline goes last, after the TSC it is measured against (KVM arms the LAPIC
    // timer from the guest TSC at the moment of the write).
    // Only a vCPU with a LAPIC has a deadline to order: the minimal platform's blackout
    // does not pay for the copy.
    let mut ordered = std::borrow::Cow::Borrowed(&st.msrs[..]);
    if let Some(a) = applied {
        // Those set before the blackout with the same value stay as they are.
        ordered = std::borrow::Cow::Owned(
            st.msrs
                .iter()
                .filter(|&&(m, v)| a.msr(m) != Some(v))
                .copied()
                .collect(),
        );
    }
    if st.lapic.is_some() {
        if let Some(at) = ordered
            .iter()
            .position(|&(m, _)| m == MSR_IA32_TSC_DEADLINE)
        {
            let o = ordered.to_mut();
            let d = o.remove(at);
            o.push(d);
        }
    }
    let mut done = 0;
    for chunk in ordered.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data: if index == MSR_IA32_TSC {
                    data.wrapping_add(tsc_step)
                } else {
                    data
                },
                ..Default::default()
            })
            .collect();
        let n = fd
            .set_msrs(&msrs_of(i, &entries)?)
            .map_err(kvm("set MSRs", i))?;
        if n != chunk.len() {
            return Err(PersistError::MsrWrite {
                vcpu: i,
                set: done + n,
                total: st.msrs.len(),
                index: chunk[n.min(chunk.len() - 1)].0,
            });
        }
        done += n;
    }

    if let Some(words) = &st.xsave {
        set_xsave(fd, i, words, caps.xsave_size)?;
    }
    if let Some(xcrs) = &st.xcrs {
        if applied.is_none_or(|a| a.xcrs.as_ref() != Some(xcrs)) {
            fd.set_xcrs(xcrs).map_err(kvm("set XCRs", i))?;
        }
    }
    if let Some(events) = &st.events {
        let mut ev = *events;
        // GET does not mark the NMI fields valid; SET ignores them unless told.
        ev.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
        fd.set_vcpu_events(&ev).map_err(kvm("set vCPU events", i))?;
    }
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: st.mp_state,
    })
    .map_err(kvm("set MP state", i))?;
    if let Some(d) = &st.debugregs {
        fd.set_debug_regs(d)
            .map_err(kvm("set debug registers", i))?;
    }
    // A restored guest was stopped: tell its kvmclock (PVCLOCK_GUEST_STOPPED), so Linux's
    // soft-lockup and RCU-stall watchdogs do not count the blackout or the parked time as a
    // hung CPU. KVM refuses (EINVAL) where the guest never enabled kvmclock: nothing to tell.
    let _ = fd.kvmclock_ctrl();
    Ok(note)
}

fn set_cpuid(fd: &VcpuFd, i: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), PersistError> {
    let cpuid = CpuId::from_entries(entries).map_err(|_| PersistError::TooManyEntries {
        vcpu: i,
        what: "CPUID",
        count: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID", i))
}

/// Makes vCPU `i` run its TSC at `saved` kHz where KVM can; a note where it cannot.
fn set_tsc_khz(
    fd: &VcpuFd,
    i: u8,
    saved: u32,
    caps: &Caps,
) -> Result<Option<TscNote>, PersistError> {
    let here = fd.get_tsc_khz().map_err(kvm("read the TSC frequency", i))?;
    if here == saved {
        return Ok(None);
    }
    let reason = if !caps.tsc_control {
        Some("KVM_CAP_TSC_CONTROL is absent".to_string())
    } else {
        fd.set_tsc_khz(saved)
            .err()
            .map(|e| format!("KVM_SET_TSC_KHZ failed: {e}"))
    };
    Ok(reason.map(|reason| TscNote {
        vcpu: i,
        saved_khz: saved,
        here_khz: here,
        reason,
    }))
}

// ---- Early state: what travels before the pause ----

/// MSRs that never travel early, whatever their value: the TSC and its deadline and adjust
/// (they change all the time, the deadline needs the LAPIC restored first, and the TSC is
/// advanced by the transit time), the APIC base and EFER (sregs set them in the blackout, in
/// the order KVM needs), and the kvmclock wall-clock MSRs (a write makes KVM write guest
/// memory at once, which the pages still to come would overwrite and `--verify` would see), and
/// the FS/GS bases (a Linux guest changes them at every context switch and `swapgs`: they
/// would travel twice).
pub const BLACKOUT_ONLY_MSRS: [u32; 10] = [
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    0x3b,        // MSR_IA32_TSC_ADJUST
    0x1b,        // MSR_IA32_APICBASE
    0xc000_0080, // MSR_EFER
    0x11,        // MSR_KVM_WALL_CLOCK
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0xc000_0100, // MSR_FS_BASE
    0xc000_0101, // MSR_GS_BASE
    0xc000_0102, // MSR_KERNEL_GS_BASE
];

/// One vCPU's early state: the pieces a running guest cannot change (CPUID, TSC frequency)
/// or changes rarely (XCRs: XSETBV at boot; most MSRs: written once at boot, e.g. SYSCALL
/// entry points, PAT, kvmclock system time, async PF, steal time, PV EOI), as they were some
/// time before the pause.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyVcpu {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value), sorted by index.
    pub msrs: Vec<(u32, u64)>,
}

impl EarlyVcpu {
    /// The early value of MSR `m`, if it travelled early.
    pub fn msr(&self, m: u32) -> Option<u64> {
        self.msrs
            .binary_search_by_key(&m, |&(i, _)| i)
            .ok()
            .map(|at| self.msrs[at].1)
    }
}

/// The state sent before the pause ([`EarlyState::of`]) and applied to the destination's
/// prepared vCPUs then ([`Vm::apply_early`]). The blackout's state then carries only what
/// differs from it ([`VmState::strip_early`]); the destination puts the two back together
/// ([`VmState::merge_early`]), so a piece the guest changed after the early send is restored
/// with its new value, never the stale one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyState {
    pub vcpus: Vec<EarlyVcpu>,
}

/// Magic of the early-state envelope (the same layout as [`ENVELOPE`]).
pub const EARLY_MAGIC: [u8; 8] = *b"BLIPERLY";
/// The early-state envelope.
pub const EARLY_ENVELOPE: Envelope =
    Envelope::new(&EARLY_MAGIC, FORMAT_VERSION, 4).with_len(8, MAX_STATE_SIZE);

/// What [`VmState::strip_early`] left in the blackout's state besides the pieces that never
/// travel early: how many early pieces changed since the early send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlyDelta {
    /// MSRs whose value differs from the early one (re-sent).
    pub msrs: usize,
    /// vCPUs whose XCRs differ (re-sent).
    pub xcrs: usize,
    /// vCPUs whose CPUID or TSC frequency differs (re-sent; the VMM alone sets them).
    pub fixed: usize,
}

impl EarlyState {
    /// The early pieces of a full state.
    pub fn of(st: &VmState) -> EarlyState {
        EarlyState {
            vcpus: st
                .vcpus
                .iter()
                .map(|v| {
                    let mut msrs: Vec<(u32, u64)> = v
                        .msrs
                        .iter()
                        .filter(|(m, _)| !BLACKOUT_ONLY_MSRS.contains(m))
                        .copied()
                        .collect();
                    msrs.sort_unstable_by_key(|&(m, _)| m);
                    msrs.dedup_by_key(|(m, _)| *m);
                    EarlyVcpu {
                        index: v.index,
                        cpuid: v.cpuid.clone(),
                        tsc_khz: v.tsc_khz,
                        xcrs: v.xcrs,
                        msrs,
                    }
                })
                .collect(),
        }
    }

    /// Checks the early state against a VM of `vcpus` vCPUs (before anything is applied).
    pub fn check(&self, vcpus: usize) -> Result<(), PersistError> {
        if self.vcpus.len() != vcpus {
            return Err(PersistError::VcpuCount {
                saved: self.vcpus.len(),
                here: vcpus,
            });
        }
        for (index, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != index {
                return Err(PersistError::VcpuOrder {
                    index,
                    saved: v.index,
                });
            }
            if !v.msrs.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(PersistError::EarlyMsrOrder(v.index));
            }
        }
        Ok(())
    }
}

impl VmState {
    /// Moves the saved guest time (each vCPU's TSC, the KVM clock, the save's timestamp) on by
    /// `ns`: the guest's clocks kept running on this host for that long after they were read
    /// (the final pages, a digest), and the state must say so, or a restore, which adds only
    /// the time after the state left ([`ClockPolicy::Advance`]), would lose it.
    pub fn advance_guest_time(&mut self, ns: u64) {
        if ns == 0 {
            return;
        }
        if let Some(c) = &mut self.clock {
            c.clock = c.clock.wrapping_add(ns);
        }
        for v in &mut self.vcpus {
            if let Some(khz) = v.tsc_khz {
                let step = platform_state::tsc_ticks(ns, khz);
                for (m, val) in &mut v.msrs {
                    if *m == MSR_IA32_TSC {
                        *val = val.wrapping_add(step);
                    }
                }
            }
        }
        if self.saved_at_ns != 0 {
            self.saved_at_ns += ns;
        }
    }

    /// Removes from this (full, just saved) state what `early` already carried with the same
    /// value; the rest, including every piece that changed since, stays. Returns what changed.
    pub fn strip_early(&mut self, early: &EarlyState) -> EarlyDelta {
        let mut d = EarlyDelta::default();
        for (v, e) in self.vcpus.iter_mut().zip(&early.vcpus) {
            if v.cpuid == e.cpuid {
                v.cpuid = Vec::new();
            } else {
                d.fixed += 1;
            }
            if v.tsc_khz.is_some() {
                if v.tsc_khz == e.tsc_khz {
                    v.tsc_khz = None;
                } else {
                    d.fixed += 1;
                }
            }
            if v.xcrs.is_some() {
                if v.xcrs == e.xcrs {
                    v.xcrs = None;
                } else {
                    d.xcrs += 1;
                }
            }
            v.msrs.retain(|&(m, val)| match e.msr(m) {
                Some(old) if old == val => false,
                Some(_) => {
                    d.msrs += 1;
                    true
                }
                None => true,
            });
        }
        d
    }

    /// Puts a stripped state ([`VmState::strip_early`]) and its early state back together:
    /// the result is the whole state as saved in the blackout. A piece in both takes the
    /// blackout's value.
    pub fn merge_early(&mut self, early: &EarlyState) -> Result<(), PersistError> {
        early.check(self.vcpus.len())?;
        for (v, e) in self.vcpus.iter_mut().zip(&early.vcpus) {
            if v.cpuid.is_empty() {
                v.cpuid = e.cpuid.clone();
            }
            if v.pieces & PIECE_TSC_KHZ != 0 && v.tsc_khz.is_none() {
                v.tsc_khz = e.tsc_khz;
            }
            if v.pieces & PIECE_XCRS != 0 && v.xcrs.is_none() {
                v.xcrs = e.xcrs;
            }
            let sent: std::collections::HashSet<u32> = v.msrs.iter().map(|&(m, _)| m).collect();
            let mut all: Vec<(u32, u64)> = e
                .msrs
                .iter()
                .filter(|(m, _)| !sent.contains(m))
                .copied()
                .collect();
            all.append(&mut v.msrs);
            v.msrs = all;
        }
        Ok(())
    }
}

/// What [`apply_early_vcpu`] did on one vCPU.
#[derive(Debug, Default)]
pub struct EarlyApplied {
    /// Set when the TSC frequency could not be matched.
    pub note: Option<TscNote>,
    /// MSRs KVM refused on the blank vCPU; the blackout sets them (after sregs).
    pub refused: Vec<u32>,
}

/// Applies one vCPU's early state to a blank, paused vCPU, before the blackout: CPUID first
/// (KVM checks XCRs and some MSRs against it), the TSC frequency (before any TSC write), the
/// MSRs, the XCRs.
///
/// An MSR KVM refuses here is skipped, not an error: some checks depend on state that only
/// the blackout sets (standard KVM checks an address MSR such as `LSTAR` for canonical form
/// against the vCPU's CR4.LA57, so a 5-level-paging guest's kernel addresses are refused
/// before sregs). Such an MSR is left out of what counts as applied, and the blackout sets it
/// in the usual order.
pub fn apply_early_vcpu(
    fd: &VcpuFd,
    e: &EarlyVcpu,
    caps: &Caps,
) -> Result<EarlyApplied, PersistError> {
    let i = e.index;
    set_cpuid(fd, i, &e.cpuid)?;
    let mut out = EarlyApplied {
        note: match e.tsc_khz {
            Some(khz) => set_tsc_khz(fd, i, khz, caps)?,
            None => None,
        },
        refused: Vec::new(),
    };
    let mut rest = &e.msrs[..];
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries = msr_writes(chunk);
        let n = fd
            .set_msrs(&msrs_of(i, &entries)?)
            .map_err(kvm("set MSRs (early)", i))?
            .min(chunk.len());
        // KVM stops at the first MSR it refuses: skip that one and go on.
        let consumed = if n == chunk.len() {
            n
        } else {
            out.refused.push(chunk[n].0);
            n + 1
        };
        rest = &rest[consumed..];
    }
    if let Some(x) = &e.xcrs {
        fd.set_xcrs(x).map_err(kvm("set XCRs (early)", i))?;
    }
    Ok(out)
}

/// Wraps an early state in its envelope.
pub fn encode_early(early: &EarlyState) -> Result<Vec<u8>, PersistError> {
    let mut out = vec![0; HEADER_LEN];
    bincode_opts()
        .serialize_into(&mut out, early)
        .map_err(PersistError::Encode)?;
    EARLY_ENVELOPE.seal_in_place(&mut out)?;
    Ok(out)
}

/// Unwraps and checks an early state's envelope, then decodes it.
pub fn decode_early(bytes: &[u8]) -> Result<EarlyState, PersistError> {
    bincode_opts()
        .deserialize(EARLY_ENVELOPE.open(bytes)?)
        .map_err(PersistError::Undecodable)
}

fn bincode_opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_STATE_SIZE)
        .reject_trailing_bytes()
}

/// Wraps `state` in the envelope.
pub fn encode(state: &VmState) -> Result<Vec<u8>, PersistError> {
    let size = bincode_opts()
        .serialized_size(state)
        .map_err(|e| match *e {
            bincode::ErrorKind::SizeLimit => PersistError::TooLarge {
                size: MAX_STATE_SIZE + 1,
            },
            _ => PersistError::Encode(e),
        })?;
    if size > MAX_STATE_SIZE {
        return Err(PersistError::TooLarge { size });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + size as usize);
    out.resize(HEADER_LEN, 0);
    bincode_opts()
        .serialize_into(&mut out, state)
        .map_err(PersistError::Encode)?;
    ENVELOPE.seal_in_place(&mut out)?;
    Ok(out)
}

impl From<EnvelopeError> for PersistError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::BadMagic => PersistError::NotBlipState,
            EnvelopeError::Version { found, .. } => PersistError::UnsupportedVersion { found },
            EnvelopeError::Truncated { need, have } => PersistError::Truncated { need, have },
            EnvelopeError::TooLarge { len, .. } => PersistError::TooLarge { size: len },
            EnvelopeError::Crc { expected, actual } => PersistError::Crc { expected, actual },
            EnvelopeError::Trailing(n) => PersistError::Trailing(n),
            EnvelopeError::Io(e) => PersistError::Io(e),
        }
    }
}

fn decode_payload(payload: &[u8]) -> Result<VmState, PersistError> {
    bincode_opts()
        .deserialize(payload)
        .map_err(PersistError::Undecodable)
}

/// Unwraps and checks the envelope, then decodes the state.
pub fn decode(bytes: &[u8]) -> Result<VmState, PersistError> {
    decode_payload(ENVELOPE.open(bytes)?)
}

/// Reads one envelope from `r` (header first: the payload buffer is allocated only once its
/// length passed the size cap) and decodes it.
pub fn decode_from(r: &mut dyn Read) -> Result<VmState, PersistError> {
    decode_payload(&ENVELOPE.read(r)?)
}

/// The VM-wide part of a save ([`Vm::save_vm_wide`]).
struct VmWide {
    pieces: u64,
    irqchip: Option<IrqchipState>,
    pit: Option<kvm_pit_state2>,
    clock: Option<kvm_bindings::kvm_clock_data>,
    saved_at_ns: u64,
    devices: crate::devices::DevicesState,
}

/// The closure that saves vCPU `i` on its own thread and sends the result to `tx`.
fn save_on_vcpu(
    i: u8,
    tx: &crossbeam_channel::Sender<VcpuSaved>,
    caps: &Arc<Caps>,
) -> crate::vcpu::VcpuFn {
    let (tx, c) = (tx.clone(), caps.clone());
    Box::new(move |fd| {
        let t = crate::devices::now_ns();
        let st = save_vcpu(fd, i, &c);
        let _ = tx.send((i, st, crate::devices::now_ns() - t));
    })
}

/// One vCPU's saved state (or why not), and how long its thread took to save it (ns).
type VcpuSaved = (u8, Result<VcpuState, PersistError>, u64);

impl Vm {
    /// What this VM can save: KVM's optional pieces and the MSRs that are restorable on this
    /// host ([`restorable_msrs`]) and readable on vCPU 0. Call once per VM before the blackout;
    /// it need not be paused (the vCPU reads run between two KVM_RUNs) (the probes make a throwaway VM and a few KVM calls per MSR that
    /// fails).
    pub fn persist_caps(&mut self) -> Result<Caps, PersistError> {
        self.persist_caps_at_exit(Duration::ZERO)
    }

    /// [`Vm::persist_caps`], its vCPU reads taken at each vCPU's next exit from the guest
    /// (kicked after `patience`, see [`Vm::with_each_vcpu_at_exit`]): a migration probes while
    /// the guest runs, and a kick would stop it for the reads.
    pub fn persist_caps_at_exit(&mut self, patience: Duration) -> Result<Caps, PersistError> {
        let mut caps = Caps::of_vm(self.fd());
        let candidates = restorable_msrs_for(caps.pieces & PIECE_IRQCHIP != 0)?;
        let (tx, rx) = mpsc::sync_channel(1);
        self.with_vcpu_at_exit(
            0,
            Box::new(move |fd| {
                let _ = tx.send(readable_msrs(fd, 0, &candidates));
            }),
            patience,
        )
        .map_err(PersistError::Vm)?;
        caps.msr_indices = rx.try_recv().map_err(|_| PersistError::NoReply(0))??;
        let n = self.vcpu_count();
        let (tx, rx) = mpsc::sync_channel(n);
        let tsc = caps.pieces & PIECE_TSC_KHZ != 0;
        self.with_each_vcpu_at_exit(
            |i| {
                let tx = tx.clone();
                Box::new(move |fd| {
                    let c = fd
                        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                        .map(|c| c.as_slice().to_vec())
                        .map_err(kvm("read CPUID", i));
                    let khz = if tsc {
                        fd.get_tsc_khz()
                            .map(Some)
                            .map_err(kvm("read the TSC frequency", i))
                    } else {
                        Ok(None)
                    };
                    let _ = tx.send((i, c, khz));
                })
            },
            patience,
        )
        .map_err(PersistError::Vm)?;
        let mut cpuid = vec![Vec::new(); n];
        let mut khz = vec![0; n];
        while let Ok((i, c, k)) = rx.try_recv() {
            cpuid[i as usize] = c?;
            khz[i as usize] = k?.unwrap_or(0);
        }
        caps.cpuid = cpuid;
        if tsc {
            caps.tsc_khz = khz;
        }
        Ok(caps)
    }

    /// Saves the state of a paused VM (call only after `pause_all`). Probes the capabilities
    /// first; the migration path probes once with [`Vm::persist_caps`] and calls
    /// [`Vm::save_state_with`] inside the blackout.
    pub fn save_state(&mut self) -> Result<VmState, PersistError> {
        let caps = self.persist_caps()?;
        self.save_state_with(&caps)
    }

    /// Saves the state of a paused VM with capabilities probed earlier.
    pub fn save_state_with(&mut self, caps: &Caps) -> Result<VmState, PersistError> {
        self.save_state_timed(caps).map(|(state, _)| state)
    }

    /// [`Vm::save_state_with`], also returning the longest time one vCPU thread spent saving
    /// (ns): the calibration's measure of the per-vCPU ioctls alone.
    pub fn save_state_timed(&mut self, caps: &Caps) -> Result<(VmState, u64), PersistError> {
        self.save_state_via(caps, Duration::ZERO)
            .map(|(state, longest, _)| (state, longest))
    }

    /// A save of a *running* VM for its costs, not its state: each vCPU saves itself at its next
    /// exit from the guest (kicked after `patience`, see [`Vm::with_each_vcpu_at_exit`]), so a
    /// guest that exits often is not stopped for it; the vCPUs are saved at different moments
    /// and the state restores nothing. Returns it with the longest time one vCPU thread spent
    /// saving and the time the VM-wide pieces took (ns). A migration's calibration times the
    /// blackout's save this way, and takes the early state (pieces that do not change while
    /// the guest runs) from it.
    pub fn save_costs_at_exits(
        &mut self,
        caps: &Caps,
        patience: Duration,
    ) -> Result<(VmState, u64, u64), PersistError> {
        self.save_state_via(caps, patience.max(Duration::from_nanos(1)))
    }

    /// Every vCPU saves at once (kicked after `patience`), then the VM-wide pieces.
    fn save_state_via(
        &mut self,
        caps: &Caps,
        patience: Duration,
    ) -> Result<(VmState, u64, u64), PersistError> {
        let caps = Arc::new(caps.clone());
        let n = self.vcpu_count();
        // Every vCPU thread saves its own state at the same time.
        let (tx, rx) = crossbeam_channel::bounded(n);
        self.with_each_vcpu_at_exit(|i| save_on_vcpu(i, &tx, &caps), patience)
            .map_err(PersistError::Vm)?;
        let mut slots: Vec<Option<VcpuState>> = vec![None; n];
        let mut longest = 0;
        while let Ok((i, st, took)) = rx.try_recv() {
            slots[i as usize] = Some(st?);
            longest = longest.max(took);
        }
        let t = crate::devices::now_ns();
        let wide = self.save_vm_wide(&caps)?;
        let wide_ns = crate::devices::now_ns() - t;
        Ok((self.assemble_state(slots, wide)?, longest, wide_ns))
    }

    /// The VM-wide pieces (irqchip, PIT, KVM clock, devices), read now. Taken in the same
    /// breath as the vCPUs' saves: the in-kernel PIT and IOAPIC keep delivering to LAPICs and
    /// the KVM clock keeps running while the vCPUs stand still, so pieces read much later
    /// than the LAPICs and TSCs would not describe the same instant.
    fn save_vm_wide(&mut self, caps: &Caps) -> Result<VmWide, PersistError> {
        let mut pieces = 0;
        // The irqchip and PIT only where this VM has them (the PC platform).
        let irqchip = if caps.pieces & PIECE_IRQCHIP != 0 {
            pieces |= PIECE_IRQCHIP;
            Some(platform_state::save_irqchip(self.fd())?)
        } else {
            None
        };
        let pit = if caps.pieces & PIECE_PIT != 0 {
            pieces |= PIECE_PIT;
            Some(platform_state::save_pit(self.fd())?)
        } else {
            None
        };
        // Only PC-platform state has its guest time advanced on restore.
        let saved_at_ns = if irqchip.is_some() {
            platform_state::realtime_ns()
        } else {
            0
        };
        let clock = if caps.pieces & PIECE_CLOCK != 0 {
            pieces |= PIECE_CLOCK;
            Some(
                self.fd()
                    .get_clock()
                    .map_err(|source| PersistError::VmKvm {
                        what: "read the KVM clock",
                        source,
                    })?,
            )
        } else {
            None
        };
        Ok(VmWide {
            pieces,
            irqchip,
            pit,
            clock,
            saved_at_ns,
            devices: self.devices().save_state(),
        })
    }

    /// The VM's state from its vCPUs' and the VM-wide pieces.
    fn assemble_state(
        &mut self,
        slots: Vec<Option<VcpuState>>,
        wide: VmWide,
    ) -> Result<VmState, PersistError> {
        let mut pieces = wide.pieces;
        let mut vcpus = Vec::with_capacity(slots.len());
        for (i, st) in slots.into_iter().enumerate() {
            let st = st.ok_or(PersistError::NoReply(i as u8))?;
            pieces |= st.pieces;
            vcpus.push(st);
        }
        let clock = wide.clock.map(|c| ClockState {
            clock: self.guest_clock(&vcpus, c.clock, c.flags),
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
        });
        let st = VmState {
            mem_size: self.mem_size(),
            pieces,
            vcpus,
            clock,
            irqchip: wide.irqchip,
            pit: wide.pit,
            saved_at_ns: wide.saved_at_ns,
            devices: wide.devices,
        };
        Ok(st)
    }

    /// The KVM clock value to save: KVM's own (`kvm`) when its master clock is stable, else the
    /// time the guest itself reads at vCPU 0's saved TSC (see
    /// [`platform_state::guest_kvmclock_ns`]), so a restore moves neither kvmclock nor TSC
    /// relative to the other.
    fn guest_clock(&self, vcpus: &[VcpuState], kvm: u64, flags: u32) -> u64 {
        if flags & kvm_bindings::KVM_CLOCK_TSC_STABLE != 0 {
            return kvm;
        }
        let Some(v) = vcpus.first() else { return kvm };
        let msr = |i: u32| v.msrs.iter().find(|&&(m, _)| m == i).map(|&(_, d)| d);
        let (Some(st), Some(tsc)) = (
            msr(platform_state::MSR_KVM_SYSTEM_TIME_NEW),
            msr(MSR_IA32_TSC),
        ) else {
            return kvm;
        };
        match platform_state::guest_kvmclock_ns(self.memory(), st, tsc) {
            Some(g) => {
                let d = g as i64 - kvm as i64;
                if d.unsigned_abs() > 1_000_000 {
                    eprintln!(
                        "blip: note: the guest's kvmclock differs from KVM's by {:.1} ms; saving the guest's",
                        d as f64 / 1e6
                    );
                }
                g
            }
            None => kvm,
        }
    }

    /// Restores `st` into this VM, which must be blank (`image: None`) and paused, with guest
    /// memory already in place. The KVM clock is set to the saved value, so guest time
    /// continues from where it stopped. Returns notes on vCPUs whose TSC frequency could not be
    /// matched (the VM still runs).
    pub fn restore_state(&mut self, st: &VmState) -> Result<Vec<TscNote>, PersistError> {
        self.restore_state_with(st, ClockPolicy::Continue)
    }

    /// [`Vm::restore_state`] with a choice of what happens to guest time. The VM must have
    /// the platform the state was saved on: an irqchip and PIT exactly when the state carries
    /// them. Order: irqchip and PIT first, then every vCPU ([`restore_vcpu`]), then the KVM
    /// clock, then the devices.
    pub fn restore_state_with(
        &mut self,
        st: &VmState,
        policy: ClockPolicy,
    ) -> Result<Vec<TscNote>, PersistError> {
        self.restore_state_after(st, policy, None)
    }

    /// Applies an early state ([`EarlyState`]) to this blank, paused VM before the blackout:
    /// every vCPU thread sets its own pieces at the same time. Returns notes on vCPUs whose
    /// TSC frequency could not be matched, and what was applied: `early` without the MSRs KVM
    /// refused on a blank vCPU (pass that to [`Vm::restore_state_after`], which then sets
    /// them in the blackout).
    pub fn apply_early(
        &mut self,
        early: &EarlyState,
    ) -> Result<(Vec<TscNote>, EarlyState), PersistError> {
        early.check(self.vcpu_count())?;
        let caps = Arc::new(Caps::of_vm_probing(self.fd(), false));
        let n = early.vcpus.len();
        let (tx, rx) = mpsc::sync_channel(n);
        let shared = Arc::new(early.vcpus.clone());
        self.with_each_vcpu(|i| {
            let (tx, c, all) = (tx.clone(), caps.clone(), shared.clone());
            Box::new(move |fd| {
                let _ = tx.send((i, apply_early_vcpu(fd, &all[i as usize], &c)));
            })
        })
        .map_err(PersistError::Vm)?;
        let mut notes = Vec::new();
        let mut applied = early.clone();
        let mut replies = 0;
        while let Ok((i, r)) = rx.try_recv() {
            replies += 1;
            let r = r?;
            notes.extend(r.note);
            if !r.refused.is_empty() {
                tracing::debug!(
                    "vCPU {i}: MSRs {:x?} refused before sregs; set in the blackout",
                    r.refused
                );
                applied.vcpus[i as usize]
                    .msrs
                    .retain(|(m, _)| !r.refused.contains(m));
            }
        }
        if replies != n {
            return Err(PersistError::NoReply(replies as u8));
        }
        Ok((notes, applied))
    }

    /// [`Vm::restore_state_with`] into a VM that got `early` ([`Vm::apply_early`]) before:
    /// `st` is whole ([`VmState::merge_early`]), and pieces equal to the early ones are not
    /// set again.
    pub fn restore_state_after(
        &mut self,
        st: &VmState,
        policy: ClockPolicy,
        early: Option<&EarlyState>,
    ) -> Result<Vec<TscNote>, PersistError> {
        if let Some(e) = early {
            e.check(self.vcpu_count())?;
        }
        if st.vcpus.len() != self.vcpu_count() {
            return Err(PersistError::VcpuCount {
                saved: st.vcpus.len(),
                here: self.vcpu_count(),
            });
        }
        if st.mem_size != self.mem_size() {
            return Err(PersistError::MemSize {
                saved: st.mem_size,
                here: self.mem_size(),
            });
        }
        for (index, v) in st.vcpus.iter().enumerate() {
            if usize::from(v.index) != index {
                return Err(PersistError::VcpuOrder {
                    index,
                    saved: v.index,
                });
            }
        }
        let caps = Arc::new(Caps::of_vm_probing(
            self.fd(),
            st.pieces & PLATFORM_PIECES != 0,
        ));
        let missing = st.pieces & !caps.pieces;
        if missing & PLATFORM_PIECES != 0 {
            return Err(PersistError::NeedsPlatform(piece_names(
                missing & PLATFORM_PIECES,
            )));
        }
        if missing != 0 {
            return Err(PersistError::MissingPieces(piece_names(missing)));
        }
        // Interrupt controllers and PIT before any vCPU state: a LAPIC restored later finds
        // the IOAPIC routing it belongs to, and nothing runs until resume.
        if let Some(chips) = &st.irqchip {
            platform_state::restore_irqchip(self.fd(), chips)?;
        }
        if let Some(pit) = &st.pit {
            platform_state::restore_pit(self.fd(), pit)?;
        }
        let advance_ns = match policy {
            ClockPolicy::Advance { since_ns } if st.pieces & PIECE_IRQCHIP != 0 => {
                crate::devices::now_ns()
                    .saturating_sub(since_ns)
                    .min(MAX_ADVANCE_NS)
            }
            _ => 0,
        };
        // Every vCPU thread restores its own state at the same time.
        let n = st.vcpus.len();
        let (tx, rx) = mpsc::sync_channel(n);
        let shared = Arc::new(st.vcpus.clone());
        let applied = Arc::new(early.map(|e| e.vcpus.clone()));
        self.with_each_vcpu(|i| {
            let (tx, c, all, a) = (tx.clone(), caps.clone(), shared.clone(), applied.clone());
            Box::new(move |fd| {
                let e = a.as_ref().as_ref().map(|v| &v[i as usize]);
                let _ = tx.send((
                    i,
                    restore_vcpu_after(fd, &all[i as usize], &c, advance_ns, e),
                ));
            })
        })
        .map_err(PersistError::Vm)?;
        let mut notes = Vec::new();
        let mut replies = 0;
        while let Ok((_, r)) = rx.try_recv() {
            replies += 1;
            if let Some(note) = r? {
                notes.push(note);
            }
        }
        if replies != n {
            return Err(PersistError::NoReply(replies as u8));
        }
        if let Some(c) = &st.clock {
            let data = kvm_bindings::kvm_clock_data {
                clock: c.clock.wrapping_add(advance_ns),
                ..Default::default()
            };
            self.fd()
                .set_clock(&data)
                .map_err(|source| PersistError::VmKvm {
                    what: "set the KVM clock",
                    source,
                })?;
        }
        self.devices()
            .restore_state(&st.devices)
            .map_err(PersistError::Devices)?;
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::SerialRegs;
    use crate::loader::Image;
    use crate::memory::{Backing, GuestMem};
    use crate::vm::{VmConfig, VmExit};
    use std::io::Write;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const CMDLINE: &str = "dirty ws=4 rate=max heartbeat period=500";

    fn config(mem_size: u64, vcpus: u32, image: Option<Image>, serial: Sink) -> VmConfig {
        VmConfig {
            mem_size,
            vcpus,
            cmdline: CMDLINE.into(),
            backing: Backing::Anon,
            image,
            serial: Box::new(serial),
            platform: Default::default(),
        }
    }

    fn boot(vcpus: u32, run: Duration) -> Vm {
        let mut vm = Vm::create(config(
            32 << 20,
            vcpus,
            Some(Image::embedded()),
            Sink::default(),
        ))
        .expect("create source VM");
        vm.resume_all().unwrap();
        std::thread::sleep(run);
        vm.pause_all().unwrap();
        vm
    }

    fn sample_state() -> VmState {
        let vcpu = VcpuState {
            index: 0,
            pieces: PIECE_XSAVE | PIECE_TSC_KHZ,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x1234,
                ..Default::default()
            }],
            regs: kvm_regs {
                rip: 0x10_0000,
                rax: 42,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x8000_0011,
                ..Default::default()
            },
            fpu: FpuState {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            },
            msrs: vec![(0x10, 99), (0xc000_0080, 0x500)],
            xsave: Some(vec![7; 1024]),
            xcrs: None,
            events: Some(kvm_vcpu_events::default()),
            mp_state: 0,
            debugregs: None,
            tsc_khz: Some(2_000_000),
            lapic: None,
        };
        VmState {
            mem_size: 32 << 20,
            pieces: PIECE_XSAVE | PIECE_TSC_KHZ | PIECE_CLOCK,
            vcpus: vec![vcpu],
            clock: Some(ClockState {
                clock: 123,
                flags: 2,
                realtime: 4,
                host_tsc: 5,
            }),
            irqchip: None,
            pit: None,
            saved_at_ns: 77,
            devices: DevicesState {
                serial: SerialRegs {
                    line_status: 0x60,
                    in_buffer: vec![1, 2, 3],
                    ..Default::default()
                },
                heartbeat_hi: vec![3],
            },
        }
    }

    #[test]
    fn persist_envelope_round_trips() {
        let st = sample_state();
        let bytes = encode(&st).unwrap();
        assert_eq!(&bytes[..8], b"BLIPSTAT");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.mem_size, st.mem_size);
        assert_eq!(back.pieces, st.pieces);
        assert_eq!(back.clock, st.clock);
        assert_eq!(back.devices, st.devices);
        let (a, b) = (&back.vcpus[0], &st.vcpus[0]);
        assert_eq!(a.cpuid, b.cpuid);
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.sregs, b.sregs);
        assert_eq!(a.fpu, b.fpu);
        assert_eq!(a.msrs, b.msrs);
        assert_eq!(a.xsave, b.xsave);
        assert_eq!(a.tsc_khz, b.tsc_khz);
        // The same through a reader.
        let back = decode_from(&mut &bytes[..]).unwrap();
        assert_eq!(back.vcpus[0].msrs, st.vcpus[0].msrs);
    }

    #[test]
    fn persist_envelope_rejects_corruption() {
        let bytes = encode(&sample_state()).unwrap();

        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 10] ^= 0x40;
        assert!(matches!(decode(&flipped), Err(PersistError::Crc { .. })));

        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(decode(&magic), Err(PersistError::NotBlipState)));
        assert!(matches!(
            decode(b"GIF89a....."),
            Err(PersistError::NotBlipState)
        ));

        let mut v2 = bytes.clone();
        v2[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = decode(&v2).unwrap_err();
        assert!(matches!(e, PersistError::UnsupportedVersion { found: 1 }));
        assert_eq!(
            e.to_string(),
            "unsupported blip state format version 1 (this blip reads 2)"
        );

        for cut in [
            0,
            3,
            8,
            11,
            12,
            19,
            20,
            23,
            24,
            25,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            match decode(&bytes[..cut]) {
                Err(PersistError::Truncated { have, .. }) => assert_eq!(have, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert!(matches!(
                decode_from(&mut &bytes[..cut]),
                Err(PersistError::Truncated { .. })
            ));
        }

        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(PersistError::Trailing(1))));

        // A huge length is refused from the header alone: nothing is allocated or read.
        let mut huge = bytes[..HEADER_LEN].to_vec();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge),
            Err(PersistError::TooLarge { size: u64::MAX })
        ));
        assert!(matches!(
            decode_from(&mut &huge[..]),
            Err(PersistError::TooLarge { .. })
        ));
    }

    #[test]
    fn persist_payload_with_hostile_inner_length_is_refused() {
        // A valid envelope whose payload claims a 2^60-element vector.
        let mut payload = Vec::new();
        payload.extend_from_slice(&(32u64 << 20).to_le_bytes()); // mem_size
        payload.extend_from_slice(&0u64.to_le_bytes()); // pieces
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes()); // vcpus.len()
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode(&bytes), Err(PersistError::Undecodable(_))));
    }

    fn copy_memory(src: &GuestMem, dst: &GuestMem, size: u64) {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = buf.len().min((size - at) as usize);
            src.read_slice(&mut buf[..n], GuestAddress(at)).unwrap();
            dst.write_slice(&buf[..n], GuestAddress(at)).unwrap();
            at += n as u64;
        }
    }

    #[test]
    fn persist_in_process_migration_continues_the_guest() {
        let mem = 32u64 << 20;
        let mut src = boot(2, Duration::from_millis(300));
        let last_src = src
            .devices()
            .heartbeats
            .lock()
            .unwrap()
            .last()
            .expect("source guest sent heartbeats");

        let t = Instant::now();
        let caps = src.persist_caps().unwrap();
        let caps_time = t.elapsed();
        let listed = Kvm::new().unwrap().get_msr_index_list().unwrap();
        let dropped: Vec<String> = listed
            .as_slice()
            .iter()
            .filter(|i| !caps.msr_indices.contains(i))
            .map(|i| format!("{i:#x}"))
            .collect();
        eprintln!(
            "persist: caps probe {caps_time:?}: pieces [{}], {} of {} listed MSRs saved \
             (dropped {dropped:?}), xsave {} bytes, tsc_control {}",
            piece_names(caps.pieces),
            caps.msr_indices.len(),
            listed.as_slice().len(),
            caps.xsave_size,
            caps.tsc_control
        );
        let t = Instant::now();
        let st = src.save_state_with(&caps).unwrap();
        let save_time = t.elapsed();
        let bytes = encode(&st).unwrap();
        let decoded = decode(&bytes).unwrap();

        let out = Sink::default();
        let mut dst = Vm::create(config(mem, 2, None, out.clone())).expect("create destination");
        copy_memory(src.memory(), dst.memory(), mem);
        let t = Instant::now();
        let notes = dst.restore_state(&decoded).unwrap();
        let restore_time = t.elapsed();
        for n in &notes {
            eprintln!("persist: {n}");
        }
        eprintln!(
            "persist: 2 vCPUs: encoded {} bytes, save_state {:?} (+ caps probe before), \
             restore_state {:?}",
            bytes.len(),
            save_time,
            restore_time
        );
        drop(src);

        dst.resume_all().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        dst.send_guest_command(1).unwrap();
        let exit = dst.wait(&AtomicBool::new(false));
        let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
        assert_eq!(exit, VmExit::PoweredOff, "serial output:\n{text}");
        assert!(text.contains("check: ok"), "serial output:\n{text}");

        let hb = dst.devices().heartbeats.lock().unwrap();
        assert!(hb.total as usize <= crate::devices::HEARTBEAT_RING);
        let first_dst = hb.beats()[0];
        assert!(
            first_dst.counter > last_src.counter,
            "heartbeat counter went back: source {} destination {}",
            last_src.counter,
            first_dst.counter
        );
    }

    /// The blackout saves the state, then the late pages (and `--verify`'s digest) go before it
    /// leaves: [`VmState::advance_guest_time`] must step the saved guest time on by that, or
    /// the guest would lose it on every migration.
    #[test]
    fn persist_save_counts_the_time_the_pages_took() {
        let mut vm = boot(1, Duration::from_millis(50));
        let caps = vm.persist_caps().unwrap();
        vm.pause_all().unwrap();
        let mut st = vm.save_state_with(&caps).unwrap();
        let t_saved = crate::devices::now_ns();
        std::thread::sleep(Duration::from_millis(500)); // the late pages, the digest
        st.advance_guest_time(crate::devices::now_ns() - t_saved);
        vm.resume_all().unwrap();
        vm.pause_all().unwrap();
        let now = vm.save_state_with(&caps).unwrap();
        let tsc = |s: &VmState| {
            s.vcpus[0]
                .msrs
                .iter()
                .find(|&&(m, _)| m == MSR_IA32_TSC)
                .map(|&(_, v)| v)
                .expect("the TSC is saved")
        };
        let khz = u64::from(st.vcpus[0].tsc_khz.expect("KVM reports the TSC frequency"));
        let behind_ms = tsc(&now).wrapping_sub(tsc(&st)) as i64 as f64 / khz as f64;
        assert!(
            (0.0..250.0).contains(&behind_ms),
            "the saved TSC is {behind_ms:.1} ms behind a reading taken after the save"
        );
        if let (Some(a), Some(b)) = (&st.clock, &now.clock) {
            let behind_ms = b.clock.wrapping_sub(a.clock) as i64 as f64 / 1e6;
            assert!(
                (0.0..250.0).contains(&behind_ms),
                "the saved KVM clock is {behind_ms:.1} ms behind a reading taken after the save"
            );
        }
    }

    #[test]
    fn persist_state_size_for_one_vcpu() {
        let mut src = boot(1, Duration::from_millis(50));
        let st = src.save_state().unwrap();
        let bytes = encode(&st).unwrap();
        eprintln!(
            "persist: 1 vCPU: encoded {} bytes ({} MSRs, pieces [{}])",
            bytes.len(),
            st.vcpus[0].msrs.len(),
            piece_names(st.pieces)
        );
        assert_eq!(decode(&bytes).unwrap().vcpus.len(), 1);
    }

    #[test]
    fn persist_restore_refuses_other_shapes() {
        let mut src = boot(2, Duration::from_millis(20));
        let st = src.save_state().unwrap();
        drop(src);

        let mut one = Vm::create(config(32 << 20, 1, None, Sink::default())).unwrap();
        let e = one.restore_state(&st).unwrap_err();
        assert!(matches!(e, PersistError::VcpuCount { saved: 2, here: 1 }));
        assert_eq!(e.to_string(), "saved state has 2 vCPUs but this VM has 1");
        drop(one);

        let mut small = Vm::create(config(16 << 20, 2, None, Sink::default())).unwrap();
        let e = small.restore_state(&st).unwrap_err();
        assert!(matches!(e, PersistError::MemSize { .. }));
        assert_eq!(
            e.to_string(),
            "saved state has 33554432 bytes of guest memory but this VM has 16777216"
        );
    }

    /// Boots the embedded guest on `platform`, lets it run, pauses it.
    fn boot_on(platform: crate::platform::Platform, run: Duration) -> Vm {
        let mut c = config(32 << 20, 1, Some(Image::embedded()), Sink::default());
        c.platform = platform;
        let mut vm = Vm::create(c).expect("create source VM");
        vm.resume_all().unwrap();
        std::thread::sleep(run);
        vm.pause_all().unwrap();
        vm
    }

    /// The restore inside the blackout, whole (as before) against after the early state was
    /// applied (as a migration does now), alternating on fresh VMs of the same process: `cargo
    /// test -p blip-vmm --lib persist_early_restore_cost -- --nocapture` (numbers in
    /// docs/ARCHITECTURE.md).
    #[test]
    fn persist_early_restore_cost() {
        use crate::platform::Platform;
        for (platform, vcpus) in [
            (Platform::Minimal, 1),
            (Platform::Minimal, 2),
            (Platform::Pc, 1),
            (Platform::Pc, 2),
        ] {
            let mut c = config(32 << 20, vcpus, Some(Image::embedded()), Sink::default());
            c.platform = platform;
            let mut src = Vm::create(c).unwrap();
            src.resume_all().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            src.pause_all().unwrap();
            let caps = src.persist_caps().unwrap();
            let st = src.save_state_with(&caps).unwrap();
            drop(src);
            let early = EarlyState::of(&st);
            let mut rest = st.clone();
            rest.strip_early(&early);
            let (whole_len, rest_len) = (encode(&st).unwrap().len(), encode(&rest).unwrap().len());
            let mut merged = rest.clone();
            merged.merge_early(&early).unwrap();
            let fresh = || {
                let mut c = config(32 << 20, vcpus, None, Sink::default());
                c.platform = platform;
                Vm::create(c).unwrap()
            };
            let (mut whole, mut after, mut applied) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..15 {
                let mut d = fresh();
                let t = Instant::now();
                d.restore_state(&st).unwrap();
                whole.push(t.elapsed().as_secs_f64() * 1e6);
                drop(d);
                let mut d = fresh();
                let t = Instant::now();
                let (_, took) = d.apply_early(&early).unwrap();
                applied.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                d.restore_state_after(&merged, ClockPolicy::Continue, Some(&took))
                    .unwrap();
                after.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (w, a, e) = (med(&mut whole), med(&mut after), med(&mut applied));
            eprintln!(
                "persist: restore {platform:?} {vcpus} vCPU: whole {w:.1} us, after early {a:.1} us \
                 ({:.2}x; early applied before the pause {e:.1} us); state {whole_len} -> {rest_len} bytes",
                a / w
            );
        }
    }

    /// The data behind the early split: two saves of a running guest taken a second apart.
    /// CPUID, the TSC frequency and the XCRs stay; of the MSRs only those in
    /// [`BLACKOUT_ONLY_MSRS`] (the TSC) change for blip's guest on either platform.
    #[test]
    fn persist_early_pieces_stay_while_the_guest_runs() {
        for platform in [
            crate::platform::Platform::Minimal,
            crate::platform::Platform::Pc,
        ] {
            let mut vm = boot_on(platform, Duration::from_millis(100));
            let caps = vm.persist_caps().unwrap();
            let a = vm.save_state_with(&caps).unwrap();
            vm.resume_all().unwrap();
            std::thread::sleep(Duration::from_secs(1));
            vm.pause_all().unwrap();
            let mut b = vm.save_state_with(&caps).unwrap();
            let changed: Vec<String> = a.vcpus[0]
                .msrs
                .iter()
                .zip(&b.vcpus[0].msrs)
                .filter(|(x, y)| x != y)
                .map(|(x, _)| format!("{:#x}", x.0))
                .collect();
            eprintln!(
                "persist: {platform:?}: {} MSRs, changed in 1 s: {changed:?}",
                a.vcpus[0].msrs.len()
            );
            let early = EarlyState::of(&a);
            let delta = b.strip_early(&early);
            assert_eq!(delta, EarlyDelta::default(), "{platform:?}: {changed:?}");
            let enc_whole = encode(&a).unwrap().len();
            let enc_rest = encode(&b).unwrap().len();
            eprintln!(
                "persist: {platform:?}: early {} bytes ({} MSRs), blackout state {} of {} bytes ({} MSRs)",
                encode_early(&early).unwrap().len(),
                early.vcpus[0].msrs.len(),
                enc_rest,
                enc_whole,
                b.vcpus[0].msrs.len()
            );
            assert!(enc_rest < enc_whole);
        }
    }

    /// A piece sent early that changes before the pause is re-sent and restored with its new
    /// value: the source VMM rewrites two MSRs and the XCRs after the early save, as a guest
    /// could (SYSENTER_CS and the kvmclock system-time MSR; XSETBV).
    #[test]
    fn persist_early_piece_changed_before_the_pause_is_restored_new() {
        const SYSENTER_CS: u32 = 0x174;
        let mut src = boot(1, Duration::from_millis(100));
        let caps = src.persist_caps().unwrap();
        let first = src.save_state_with(&caps).unwrap();
        let early = EarlyState::of(&first);
        assert!(early.vcpus[0].msr(SYSENTER_CS).is_some());
        let old_xcrs = early.vcpus[0].xcrs;
        // What the guest does between the early send and the pause.
        let new_cs = early.vcpus[0].msr(SYSENTER_CS).unwrap() ^ 0x8;
        src.with_vcpu(
            0,
            Box::new(move |fd| {
                let m = Msrs::from_entries(&[kvm_msr_entry {
                    index: SYSENTER_CS,
                    data: new_cs,
                    ..Default::default()
                }])
                .unwrap();
                assert_eq!(fd.set_msrs(&m).unwrap(), 1);
                if let Ok(mut x) = fd.get_xcrs() {
                    // XCR0 with x87 only (always valid) differs from what the guest set.
                    if x.nr_xcrs > 0 && x.xcrs[0].value != 1 {
                        x.xcrs[0].value = 1;
                        fd.set_xcrs(&x).unwrap();
                    }
                }
            }),
        )
        .unwrap();
        let mut st = src.save_state_with(&caps).unwrap();
        let whole = st.clone();
        let delta = st.strip_early(&early);
        assert_eq!(delta.msrs, 1, "{delta:?}");
        assert!(st.vcpus[0].cpuid.is_empty() && st.vcpus[0].msrs.len() < whole.vcpus[0].msrs.len());
        let xcrs_changed = whole.vcpus[0].xcrs != old_xcrs;
        assert_eq!(delta.xcrs, usize::from(xcrs_changed));

        // Destination: the early state first (stale by now), then the blackout's rest.
        let mut dst = Vm::create(config(32 << 20, 1, None, Sink::default())).unwrap();
        copy_memory(src.memory(), dst.memory(), 32 << 20);
        drop(src);
        let early = decode_early(&encode_early(&early).unwrap()).unwrap();
        let (_, applied) = dst.apply_early(&early).unwrap();
        let mut back = decode(&encode(&st).unwrap()).unwrap();
        back.merge_early(&early).unwrap();
        assert_eq!(back.vcpus[0].cpuid, whole.vcpus[0].cpuid);
        assert_eq!(back.vcpus[0].xcrs, whole.vcpus[0].xcrs);
        let mut a = back.vcpus[0].msrs.clone();
        let mut b = whole.vcpus[0].msrs.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "merged MSRs differ from the saved ones");
        dst.restore_state_after(&back, ClockPolicy::Continue, Some(&applied))
            .unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        dst.with_vcpu(
            0,
            Box::new(move |fd| {
                let mut m = Msrs::from_entries(&[kvm_msr_entry {
                    index: SYSENTER_CS,
                    ..Default::default()
                }])
                .unwrap();
                fd.get_msrs(&mut m).unwrap();
                let _ = tx.send((m.as_slice()[0].data, fd.get_xcrs().ok()));
            }),
        )
        .unwrap();
        let (cs, xcrs) = rx.recv().unwrap();
        assert_eq!(cs, new_cs, "the destination kept the stale early value");
        if let (Some(x), Some(w)) = (xcrs, whole.vcpus[0].xcrs) {
            assert_eq!(x.xcrs[0].value, w.xcrs[0].value);
        }
    }

    /// What each piece costs, get and set, on a paused vCPU of a booted guest (µs per call,
    /// median of 200), for the table in docs/ARCHITECTURE.md: which pieces are worth moving out
    /// of the blackout (median of 200 calls). `cargo test -p blip-vmm --lib
    /// persist_piece_ioctl_costs -- --nocapture`
    #[test]
    fn persist_piece_ioctl_costs() {
        let mut vm = boot(1, Duration::from_millis(100));
        let caps = Arc::new(vm.persist_caps().unwrap());
        let (tx, rx) = mpsc::sync_channel(1);
        let c = caps.clone();
        vm.with_vcpu(
            0,
            Box::new(move |fd| {
                const N: u32 = 200;
                // The median call: a loaded host preempts some of them.
                let time = |f: &mut dyn FnMut()| {
                    let mut v: Vec<f64> = (0..N)
                        .map(|_| {
                            let t = Instant::now();
                            f();
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let st = save_vcpu(fd, 0, &c).unwrap();
                let cpuid = CpuId::from_entries(&st.cpuid).unwrap();
                let early: Vec<(u32, u64)> = st
                    .msrs
                    .iter()
                    .copied()
                    .filter(|(m, _)| !BLACKOUT_ONLY_MSRS.contains(m))
                    .collect();
                let entries = msr_writes(&early);
                let early_msrs = msrs_of(0, &entries).unwrap();
                let all = msrs_of(0, &msr_entries(&c.msr_indices)).unwrap();
                let mut rows: Vec<(String, f64, f64)> = Vec::new();
                rows.push((
                    format!("CPUID ({} entries)", st.cpuid.len()),
                    time(&mut || {
                        fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
                    }),
                    time(&mut || fd.set_cpuid2(&cpuid).unwrap()),
                ));
                let khz = fd.get_tsc_khz().unwrap();
                rows.push((
                    "TSC kHz".into(),
                    time(&mut || {
                        fd.get_tsc_khz().unwrap();
                    }),
                    time(&mut || {
                        let _ = fd.set_tsc_khz(khz);
                    }),
                ));
                rows.push((
                    format!("MSRs, early ({})", entries.len()),
                    time(&mut || {
                        let mut m = early_msrs.clone();
                        fd.get_msrs(&mut m).unwrap();
                    }),
                    time(&mut || {
                        fd.set_msrs(&early_msrs).unwrap();
                    }),
                ));
                rows.push((
                    format!("MSRs, all ({})", c.msr_indices.len()),
                    time(&mut || {
                        let mut m = all.clone();
                        fd.get_msrs(&mut m).unwrap();
                    }),
                    f64::NAN,
                ));
                if let Some(x) = st.xcrs {
                    rows.push((
                        "XCRs".into(),
                        time(&mut || {
                            fd.get_xcrs().unwrap();
                        }),
                        time(&mut || fd.set_xcrs(&x).unwrap()),
                    ));
                }
                if let Some(w) = &st.xsave {
                    rows.push((
                        "XSAVE".into(),
                        time(&mut || {
                            get_xsave(fd, 0, c.xsave_size).unwrap();
                        }),
                        time(&mut || set_xsave(fd, 0, w, c.xsave_size).unwrap()),
                    ));
                }
                rows.push((
                    "regs".into(),
                    time(&mut || {
                        fd.get_regs().unwrap();
                    }),
                    time(&mut || fd.set_regs(&st.regs).unwrap()),
                ));
                rows.push((
                    "sregs".into(),
                    time(&mut || {
                        fd.get_sregs().unwrap();
                    }),
                    time(&mut || fd.set_sregs(&st.sregs).unwrap()),
                ));
                if let Some(e) = st.events {
                    rows.push((
                        "vCPU events".into(),
                        time(&mut || {
                            fd.get_vcpu_events().unwrap();
                        }),
                        time(&mut || fd.set_vcpu_events(&e).unwrap()),
                    ));
                }
                rows.push((
                    "MP state".into(),
                    time(&mut || {
                        fd.get_mp_state().unwrap();
                    }),
                    time(&mut || {
                        fd.set_mp_state(kvm_bindings::kvm_mp_state {
                            mp_state: st.mp_state,
                        })
                        .unwrap()
                    }),
                ));
                if let Some(d) = st.debugregs {
                    rows.push((
                        "debug registers".into(),
                        time(&mut || {
                            fd.get_debug_regs().unwrap();
                        }),
                        time(&mut || fd.set_debug_regs(&d).unwrap()),
                    ));
                }
                let _ = tx.send(rows);
            }),
        )
        .unwrap();
        for (what, get, set) in rx.recv().unwrap() {
            eprintln!("persist: cost {what:<22} get {get:>6.2} us  set {set:>6.2} us");
        }
    }

    /// An early MSR KVM refuses on a blank vCPU (as standard KVM refuses a 5-level-paging
    /// kernel's address before CR4.LA57 is set) is skipped before the pause and set in the
    /// blackout, after sregs. Here: a non-canonical LSTAR in the early state, the real one in
    /// the blackout's state.
    #[test]
    fn persist_early_msr_refused_on_a_blank_vcpu_is_set_in_the_blackout() {
        const LSTAR: u32 = 0xc000_0082;
        let mut src = boot(1, Duration::from_millis(50));
        let caps = src.persist_caps().unwrap();
        let st = src.save_state_with(&caps).unwrap();
        drop(src);
        let real = st.vcpus[0].msrs.iter().find(|m| m.0 == LSTAR).unwrap().1;
        let mut early = EarlyState::of(&st);
        let at = early.vcpus[0]
            .msrs
            .iter()
            .position(|m| m.0 == LSTAR)
            .unwrap();
        early.vcpus[0].msrs[at].1 = 0x8000_0000_0000_0000;
        let mut rest = st.clone();
        assert_eq!(
            rest.strip_early(&early).msrs,
            1,
            "the real LSTAR travels again"
        );
        let mut dst = Vm::create(config(32 << 20, 1, None, Sink::default())).unwrap();
        let (_, applied) = dst.apply_early(&early).unwrap();
        assert_eq!(
            applied.vcpus[0].msr(LSTAR),
            None,
            "KVM took a non-canonical LSTAR"
        );
        assert_eq!(
            applied.vcpus[0].msrs.len() + 1,
            early.vcpus[0].msrs.len(),
            "only LSTAR was refused"
        );
        rest.merge_early(&early).unwrap();
        dst.restore_state_after(&rest, ClockPolicy::Continue, Some(&applied))
            .unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        dst.with_vcpu(
            0,
            Box::new(move |fd| {
                let mut m = Msrs::from_entries(&[kvm_msr_entry {
                    index: LSTAR,
                    ..Default::default()
                }])
                .unwrap();
                fd.get_msrs(&mut m).unwrap();
                let _ = tx.send(m.as_slice()[0].data);
            }),
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap(), real);
    }

    #[test]
    fn persist_early_state_refuses_a_wrong_shape() {
        let mut e = EarlyState {
            vcpus: vec![EarlyVcpu::default(), EarlyVcpu::default()],
        };
        assert!(matches!(
            e.check(1),
            Err(PersistError::VcpuCount { saved: 2, here: 1 })
        ));
        assert!(matches!(
            e.check(2),
            Err(PersistError::VcpuOrder { index: 1, saved: 0 })
        ));
        e.vcpus[1].index = 1;
        e.vcpus[1].msrs = vec![(5, 0), (3, 0)];
        assert_eq!(
            e.check(2).unwrap_err().to_string(),
            "early state of vCPU 1 lists its MSRs out of order"
        );
        assert!(matches!(
            decode_early(&encode(&sample_state()).unwrap()),
            Err(PersistError::NotBlipState)
        ));
    }

    #[test]
    fn persist_piece_names_are_readable() {
        assert_eq!(piece_names(PIECE_XSAVE | PIECE_CLOCK), "xsave,clock");
        assert_eq!(piece_names(1 << 40), "unknown 0x10000000000");
    }
}
