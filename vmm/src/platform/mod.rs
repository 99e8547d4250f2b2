//! Which machine a guest sees: blip's own polling machine, or a small PC a stock Linux kernel
//! boots on.
//!
//! - [`Platform::Minimal`] (the embedded guest's machine): no interrupt controller, no timer.
//!   The guest polls COM1, HLT means power-off, and there is no platform state beyond vCPU
//!   registers and memory: nothing extra to save inside a migration blackout.
//! - [`Platform::Pc`] (any `--kernel` image by default): what a stock Linux kernel needs to boot
//!   and keep time, and nothing more:
//!   - **in-kernel irqchip** (`KVM_CREATE_IRQCHIP`: 8259 PIC pair, IOAPIC, one LAPIC per vCPU):
//!     Linux's scheduler tick, IPIs and device interrupts all go through the LAPIC/IOAPIC;
//!     KVM also installs its default GSI routing (GSI 0-15 to PIC and IOAPIC pins 0-15,
//!     16-23 to the IOAPIC), and handles HLT and INIT/SIPI in the kernel, so the APs boot
//!     the way they do on hardware.
//!   - **in-kernel PIT** (`KVM_CREATE_PIT2`, dummy speaker port): Linux calibrates the TSC and
//!     checks the timer interrupt routing against it during boot.
//!   - **COM1 on IRQ 4** (an irqfd on GSI 4): the console. printk polls, but user space writes
//!     through the tty layer, which waits for THR-empty interrupts.
//!   - **i8042 reset line** (port 0x64, command 0xFE): how Linux reboots without ACPI
//!     (`reboot=k`). blip has no ACPI, so `reboot` and a panic with `panic=-1` come here, and
//!     blip ends the VM with exit code 0 (as a power-off: blip does not restart guests). A
//!     Linux `poweroff` without ACPI halts every CPU with interrupts off instead; the VM's
//!     halt probe (see `vm`) recognises that and also ends with exit code 0.
//!   - **an MP table** (Intel MultiProcessor Specification 1.4) in the EBDA just below 640 KiB:
//!     how Linux finds the vCPUs, the IOAPIC and the ISA interrupt wiring without ACPI.
//!   - **kvmclock**: advertised by the KVM CPUID leaves (0x40000000/0x40000001) KVM reports as
//!     supported, which blip passes through (see `cpu`): the guest's clocksource.
//!
//! There is deliberately no PCI, no ACPI, no RTC, no keyboard: each would be more state to
//! migrate and more exits to handle, and Linux boots without them.

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// The machine a guest runs on (fixed at VM creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// No interrupt controller or timer; HLT powers off (blip's own guests).
    #[default]
    Minimal,
    /// In-kernel PIC/IOAPIC/LAPIC and PIT, COM1 on IRQ 4, MP table, i8042 reset (stock Linux).
    Pc,
}

impl Platform {
    /// Does this platform have the in-kernel irqchip?
    pub fn has_irqchip(self) -> bool {
        self == Platform::Pc
    }
}

/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Start of the Extended BIOS Data Area, where the MP table lives: 639 KiB, one of the places
/// Linux scans for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the area below 1 MiB that the memory map reserves (EBDA, VGA hole, BIOS).
pub const LOW_RESERVED_END: u64 = 0x10_0000;
/// BIOS data area word holding the EBDA segment.
const BDA_EBDA_SEGMENT: u64 = 0x40e;
/// Default LAPIC and IOAPIC MMIO bases (KVM's in-kernel devices sit there).
const LAPIC_BASE: u32 = 0xfee0_0000;
const IOAPIC_BASE: u32 = 0xfec0_0000;
/// e820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Errors building the platform.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("KVM could not {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PlatformError {
    move |source| PlatformError::Kvm { what, source }
}

/// Creates the platform's in-kernel devices; must run before the first vCPU is created.
pub fn create_devices(platform: Platform, fd: &VmFd) -> Result<(), PlatformError> {
    if platform == Platform::Minimal {
        return Ok(());
    }
    fd.create_irq_chip().map_err(kvm("create the irqchip"))?;
    let pit = kvm_bindings::kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm("create the PIT"))?;
    Ok(())
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map. Minimal: one RAM range (what blip's guests have always seen). Pc:
/// RAM below the EBDA, the EBDA-to-1-MiB area reserved (MP table, legacy holes), RAM above.
pub fn memory_map(platform: Platform, mem_size: u64) -> Vec<MemRange> {
    match platform {
        Platform::Minimal => vec![MemRange {
            addr: 0,
            size: mem_size,
            kind: E820_RAM,
        }],
        Platform::Pc => vec![
            MemRange {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            },
            MemRange {
                addr: EBDA_START,
                size: LOW_RESERVED_END - EBDA_START,
                kind: E820_RESERVED,
            },
            MemRange {
                addr: LOW_RESERVED_END,
                size: mem_size.saturating_sub(LOW_RESERVED_END),
                kind: E820_RAM,
            },
        ],
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The MP floating pointer and configuration table for `vcpus` processors, as bytes to place
/// at [`EBDA_START`] (floating pointer first, the table right after it).
pub fn mptable(vcpus: u8) -> Vec<u8> {
    let table_addr = EBDA_START as u32 + 16;
    let ioapic_id = vcpus; // after the LAPIC IDs 0..vcpus
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for i in 0..vcpus {
        // Processor: type 0, LAPIC id, LAPIC version, flags (EN, BP for vCPU 0), signature
        // (family 6), feature flags (FPU, APIC), reserved.
        let flags = 1 | if i == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, i, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC, enabled.
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n (KVM's default routing); flags 0 = as the bus (edge, high).
    for irq in 0..16u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT (the PIC) on LINT0, NMI on LINT1, for every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut table = Vec::with_capacity(len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BLIP    ");
    table.extend_from_slice(b"BLIP-PC     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR (virtual wire)
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the platform's boot tables (Pc: the MP table and the BDA's EBDA pointer).
pub fn write_tables(platform: Platform, mem: &GuestMem, vcpus: u8) -> Result<(), PlatformError> {
    if platform == Platform::Minimal {
        return Ok(());
    }
    mem.write_obj((EBDA_START >> 4) as u16, GuestAddress(BDA_EBDA_SEGMENT))
        .map_err(PlatformError::Write)?;
    mem.write_slice(&mptable(vcpus), GuestAddress(EBDA_START))
        .map_err(PlatformError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mptable_checksums_and_counts() {
        for n in [1u8, 2, 64] {
            let t = mptable(n);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(addr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(n) + 1 + 1 + 16 + 2);
            assert_eq!(len, 44 + 20 * n as usize + 8 + 8 + 16 * 8 + 2 * 8);
            // Processor 0 is the BSP, the others are not.
            assert_eq!(cfg[44 + 3], 3);
            if n > 1 {
                assert_eq!(cfg[44 + 20 + 3], 1);
            }
        }
        // Even 64 vCPUs stay inside the reserved area.
        assert!(EBDA_START + mptable(64).len() as u64 <= LOW_RESERVED_END);
    }

    #[test]
    fn memory_maps() {
        let m = memory_map(Platform::Minimal, 64 << 20);
        assert_eq!(m.len(), 1);
        let m = memory_map(Platform::Pc, 256 << 20);
        assert_eq!(m.iter().map(|r| r.size).sum::<u64>(), 256 << 20);
        assert_eq!(m[1].kind, E820_RESERVED);
        assert!(m[1].addr <= EBDA_START && m[2].addr == 1 << 20);
    }
}
