//! The x86 platform's interrupt and timer state: the in-kernel irqchip (PIC master, PIC
//! slave, IOAPIC), the PIT and each vCPU's local APIC, saved and restored for snapshots and
//! live migration.
//!
//! Why: a stock Linux kernel takes interrupts. Its LAPIC timer, the IOAPIC's redirection table
//! (where COM1's IRQ 4 goes, which lines are masked, which level-triggered line is still in
//! service) and the PIC's masks live inside KVM once the VM has an in-kernel irqchip; leave
//! any of it behind and the guest on the destination waits for a timer tick or an EOI that
//! never comes. A VM without an irqchip (blip's minimal platform) has none of this state, and
//! carries none: nothing here runs inside its blackout.
//!
//! What travels is exactly what KVM reports: whether a VM has an irqchip or a PIT is probed
//! once, before any blackout ([`Presence::of_vm`]: `KVM_GET_IRQCHIP` and `KVM_GET_PIT2`
//! answer ENXIO on a VM without them), and the migration offer names the pieces
//! (`persist::PIECE_LAPIC`, `PIECE_IRQCHIP`, `PIECE_PIT`), so a destination that cannot
//! build the same platform refuses before any page moves.
//!
//! Order of restore (see `persist::restore_vcpu` and `Vm::restore_state`): the irqchip and PIT
//! are set before the vCPUs' state, the LAPIC after sregs (whose `apic_base` decides xAPIC or
//! x2APIC, which changes how KVM reads the LAPIC ID) and before the MSRs (KVM ignores a write
//! of `MSR_IA32_TSC_DEADLINE` unless the LAPIC timer is already in TSC-deadline mode), vCPU
//! events and MP state last, the KVM clock after every vCPU.

use kvm_bindings::{
    kvm_irqchip, kvm_lapic_state, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors reading or writing platform state.
#[derive(Debug, thiserror::Error)]
pub enum PlatformStateError {
    #[error("KVM could not {what}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM could not {what} on vCPU {vcpu}")]
    Vcpu {
        what: &'static str,
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PlatformStateError {
    move |source| PlatformStateError::Vm { what, source }
}

/// Which in-kernel platform devices a VM has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Presence {
    /// PIC master and slave, IOAPIC and a LAPIC per vCPU (`KVM_CREATE_IRQCHIP`).
    pub irqchip: bool,
    /// The i8254 PIT (`KVM_CREATE_PIT2`).
    pub pit: bool,
}

impl Presence {
    /// Probes `vm`: KVM answers ENXIO to `KVM_GET_IRQCHIP` / `KVM_GET_PIT2` on a VM that has
    /// no irqchip / PIT. Two ioctls, run once per VM before any blackout.
    pub fn of_vm(vm: &VmFd) -> Presence {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        Presence {
            irqchip: vm.get_irqchip(&mut chip).is_ok(),
            pit: vm.get_pit2().is_ok(),
        }
    }
}

/// Builds the PC platform's in-kernel devices on a fresh VM (before any vCPU exists): the
/// irqchip, then the PIT (KVM needs the irqchip first). Tests use it on raw `VmFd`s; the VM
/// builder does the same for `--platform pc`.
pub fn create_pc(vm: &VmFd) -> Result<(), PlatformStateError> {
    vm.create_irq_chip()
        .map_err(vm_err("create the in-kernel irqchip"))?;
    let cfg = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(cfg).map_err(vm_err("create the PIT"))
}

/// The three chips of the in-kernel irqchip, as `KVM_GET_IRQCHIP` returns them.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: reads of plain-data union fields: every bit pattern is a valid u8/u32/u64.
        let (m, s, io) = unsafe {
            (
                self.pic_master.chip.pic,
                self.pic_slave.chip.pic,
                self.ioapic.chip.ioapic,
            )
        };
        f.debug_struct("IrqchipState")
            .field("pic_master_imr", &m.imr)
            .field("pic_slave_imr", &s.imr)
            .field("ioapic_id", &io.id)
            .field("ioapic_irr", &io.irr)
            .finish_non_exhaustive()
    }
}

impl PartialEq for IrqchipState {
    fn eq(&self, other: &Self) -> bool {
        bytes_of(self) == bytes_of(other)
    }
}

fn bytes_of(s: &IrqchipState) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 * std::mem::size_of::<kvm_irqchip>());
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        // SAFETY: kvm_irqchip is repr(C) plain data of this size with no padding bytes that
        // matter to KVM; its union's `dummy` member spans all 512 bytes.
        let chip = unsafe { c.chip.dummy };
        v.extend_from_slice(&c.chip_id.to_le_bytes());
        v.extend(chip.iter().map(|&b| b as u8));
    }
    v
}

fn chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, PlatformStateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(vm_err(what))?;
    Ok(c)
}

/// Reads the irqchip (three `KVM_GET_IRQCHIP`s). The VM must be paused.
pub fn save_irqchip(vm: &VmFd) -> Result<IrqchipState, PlatformStateError> {
    Ok(IrqchipState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "read the PIC master")?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "read the PIC slave")?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "read the IOAPIC")?,
    })
}

/// Writes the irqchip back (three `KVM_SET_IRQCHIP`s), before any vCPU runs.
pub fn restore_irqchip(vm: &VmFd, st: &IrqchipState) -> Result<(), PlatformStateError> {
    let mut c = st.pic_master;
    c.chip_id = KVM_IRQCHIP_PIC_MASTER;
    vm.set_irqchip(&c).map_err(vm_err("set the PIC master"))?;
    let mut c = st.pic_slave;
    c.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    vm.set_irqchip(&c).map_err(vm_err("set the PIC slave"))?;
    let mut c = st.ioapic;
    c.chip_id = KVM_IRQCHIP_IOAPIC;
    vm.set_irqchip(&c).map_err(vm_err("set the IOAPIC"))
}

/// Reads the PIT: its three channels and its flags (`KVM_GET_PIT2`).
pub fn save_pit(vm: &VmFd) -> Result<kvm_pit_state2, PlatformStateError> {
    vm.get_pit2().map_err(vm_err("read the PIT"))
}

/// Writes the PIT back (`KVM_SET_PIT2`). KVM reloads each channel's count from the saved
/// count at this moment (it does not use the saved `count_load_time`, a source-host time), so
/// a channel restarts its period: the guest sees at most one period stretched by the blackout.
pub fn restore_pit(vm: &VmFd, st: &kvm_pit_state2) -> Result<(), PlatformStateError> {
    vm.set_pit2(st).map_err(vm_err("set the PIT"))
}

/// Reads vCPU `vcpu`'s local APIC registers (`KVM_GET_LAPIC`: 1 KiB; KVM stores the timer's
/// remaining count in TMCCT, so a one-shot or periodic timer resumes with what was left).
pub fn save_lapic(fd: &VcpuFd, vcpu: u8) -> Result<kvm_lapic_state, PlatformStateError> {
    fd.get_lapic().map_err(|source| PlatformStateError::Vcpu {
        what: "read the local APIC",
        vcpu,
        source,
    })
}

/// Writes vCPU `vcpu`'s local APIC back (`KVM_SET_LAPIC`): after sregs (APIC base), before
/// the MSRs (TSC deadline).
pub fn restore_lapic(
    fd: &VcpuFd,
    vcpu: u8,
    st: &kvm_lapic_state,
) -> Result<(), PlatformStateError> {
    fd.set_lapic(st).map_err(|source| PlatformStateError::Vcpu {
        what: "set the local APIC",
        vcpu,
        source,
    })
}

/// LAPIC register at byte offset `reg` (0x20 ID, 0x80 TPR, 0xf0 SVR, 0x320 LVT timer, 0x380
/// initial count, 0x3e0 divide, ...).
pub fn lapic_reg(st: &kvm_lapic_state, reg: usize) -> u32 {
    let b = |i: usize| st.regs[reg + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Sets the LAPIC register at byte offset `reg`.
pub fn set_lapic_reg(st: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        st.regs[reg + i] = b as _;
    }
}

/// CLOCK_REALTIME in nanoseconds: the host time against which a restore measures how long
/// the guest was away (the same clock KVM uses for `KVM_CLOCK_REALTIME`).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// MSR_KVM_SYSTEM_TIME_NEW: where the guest asked KVM to keep its kvmclock structure (guest
/// physical address, bit 0 = enabled).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// The kvmclock time the guest itself reads when its TSC is `tsc`: from the pvclock structure
/// (`pvclock_vcpu_time_info`: version, pad, tsc_timestamp, system_time, tsc_to_system_mul,
/// tsc_shift) that `system_time_msr` points at. `None` when kvmclock is off, the structure is
/// outside memory or mid-update, or `tsc` is before its timestamp.
///
/// Why: `KVM_GET_CLOCK` answers in the host's time. Without a stable master clock
/// (`KVM_CLOCK_TSC_STABLE` unset, as under the soft-RoCE hosts' emulated TSC) KVM refreshes a
/// guest's structure rarely, and between refreshes the guest extrapolates with its TSC at the
/// nominal rate: its kvmclock drifts from KVM's by the TSC's rate error. A restore that sets
/// KVM's value makes KVM write a fresh structure, and the guest's kvmclock jumps by that drift
/// while its TSC does not; Linux's clocksource watchdog then marks the TSC unstable. Saving
/// the guest's own view keeps the two in step.
pub fn guest_kvmclock_ns(
    mem: &crate::memory::GuestMem,
    system_time_msr: u64,
    tsc: u64,
) -> Option<u64> {
    use vm_memory::{Bytes, GuestAddress};
    if system_time_msr & 1 == 0 {
        return None;
    }
    let mut b = [0u8; 32];
    mem.read_slice(&mut b, GuestAddress(system_time_msr & !1))
        .ok()?;
    pvclock_read(&b, tsc)
}

/// [`guest_kvmclock_ns`] over the structure's bytes.
fn pvclock_read(b: &[u8; 32], tsc: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    if u32_at(0) & 1 != 0 {
        return None;
    }
    let (tsc_timestamp, system_time, mul) = (u64_at(8), u64_at(16), u32_at(24));
    let shift = b[28] as i8;
    let mut delta = tsc.checked_sub(tsc_timestamp)?;
    if shift < 0 {
        delta >>= u32::from(shift.unsigned_abs());
    } else {
        delta <<= u32::from(shift as u8);
    }
    let ns = ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
    Some(system_time.wrapping_add(ns))
}

/// TSC ticks in `ns` nanoseconds at `tsc_khz`.
pub fn tsc_ticks(ns: u64, tsc_khz: u32) -> u64 {
    ((u128::from(ns) * u128::from(tsc_khz)) / 1_000_000) as u64
}

#[cfg(test)]
mod pvclock_tests {
    use super::*;

    fn structure(
        version: u32,
        tsc_timestamp: u64,
        system_time: u64,
        mul: u32,
        shift: i8,
    ) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&version.to_le_bytes());
        b[8..16].copy_from_slice(&tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&system_time.to_le_bytes());
        b[24..28].copy_from_slice(&mul.to_le_bytes());
        b[28] = shift as u8;
        b
    }

    #[test]
    fn pvclock_scales_the_tsc_delta_like_the_guest() {
        // 2 GHz: 0.5 ns per tick = mul 2^31, shift 0.
        let b = structure(2, 1_000, 5_000_000, 1 << 31, 0);
        assert_eq!(pvclock_read(&b, 1_000), Some(5_000_000));
        assert_eq!(pvclock_read(&b, 2_001_000), Some(6_000_000));
        // The same rate as shift -1 with mul 2^32 - 1 (just under 1 ns per tick).
        let b = structure(2, 0, 0, u32::MAX, -1);
        assert_eq!(pvclock_read(&b, 2_000_000), Some(999_999));
        // 500 MHz: 2 ns per tick = mul 2^31, shift 2.
        let b = structure(2, 0, 10, 1 << 31, 2);
        assert_eq!(pvclock_read(&b, 1_000), Some(2_010));
    }

    #[test]
    fn pvclock_mid_update_or_before_its_timestamp_is_none() {
        assert_eq!(pvclock_read(&structure(3, 0, 0, 1 << 31, 0), 10), None);
        assert_eq!(pvclock_read(&structure(2, 100, 0, 1 << 31, 0), 10), None);
    }
}
