//! Architectural vCPU set-up: CPUID, boot MSRs, registers and segments.
//!
//! On the Pc platform (in-kernel irqchip) only the BSP gets boot registers: the PVH 32-bit
//! entry state below, or for a bzImage the Linux 64-bit boot protocol's (long mode, identity
//! page tables, flat segments at `__BOOT_CS` = 0x10 / `__BOOT_DS` = 0x18, `%rsi` = zero page).
//! The APs keep KVM's reset state, UNINITIALIZED, and the guest starts them with INIT/SIPI
//! through its LAPIC, which KVM emulates in the kernel. CPUID is set on every vCPU. The CPUID
//! is KVM's supported set passed through, so KVM's paravirtual leaves (0x40000000 signature
//! "KVMKVMKVM", 0x40000001 features including kvmclock) reach the guest as KVM reports them.
//!
//! On the Minimal platform every vCPU, the BSP and the APs alike, starts at the PVH 32-bit
//! entry in the same state:
//! protected mode, paging off, flat 4 GiB code and data segments, `%ebx` = `hvm_start_info`.
//! blip does not bring APs up through INIT/SIPI: that would need a real-mode trampoline in every
//! guest and an in-kernel LAPIC whose state then has to travel in every migration. Instead the
//! APs are made runnable directly at the entry the guest names in its PVH note, and the guest
//! tells vCPUs apart by the initial APIC ID CPUID reports (leaf 1 EBX[31:24], leaf 0xB EDX),
//! which blip sets to the vCPU index. The consequence (documented in the guest ABI) is that a
//! guest's PVH entry must be re-entrant for all vCPUs; QEMU runs such guests with one vCPU.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::loader::{Boot, EntryMode, BOOT_GDT, PAGE_TABLES};

/// Boot GDT descriptors written by the loader at [`BOOT_GDT`]: null, code32, data, TSS.
pub const BOOT_GDT_ENTRIES: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Boot GDT for the Linux 64-bit entry: null, null, code64 (0x10), data (0x18), TSS (0x20).
pub const LONG_GDT_ENTRIES: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Hypervisor CPUID leaf (VMware convention, read by Linux too) that carries the TSC frequency.
pub const CPUID_TSC_LEAF: u32 = 0x4000_0010;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM refused to set {what}")]
    Set {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} boot MSRs")]
    PartialMsrs { set: usize, total: usize },
}

fn set(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Set { what, source }
}

/// Adapts KVM's supported CPUID for vCPU `index` of `count`.
pub fn cpuid_for(base: &CpuId, index: u8, count: u8, tsc_khz: u32) -> CpuId {
    let mut entries: Vec<_> = base.as_slice().to_vec();
    let mut has_tsc_leaf = false;
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = u32::from(index),
            0x4000_0000 => e.eax = e.eax.max(CPUID_TSC_LEAF),
            CPUID_TSC_LEAF => {
                has_tsc_leaf = true;
                e.eax = tsc_khz;
            }
            _ => {}
        }
    }
    if !has_tsc_leaf {
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: CPUID_TSC_LEAF,
            eax: tsc_khz,
            ebx: 1_000_000, // APIC bus frequency in kHz (no LAPIC timer is used)
            ..Default::default()
        });
    }
    xsave_consistent(&mut entries);
    CpuId::from_entries(&entries).unwrap_or_else(|_| base.clone())
}

/// XSAVE state components (bit of XCR0) and the feature flag that must be advertised for the
/// guest to use them: (component bits, leaf, register index 1=EBX 2=ECX 3=EDX, feature bit).
const XSAVE_FEATURES: [(u64, u32, u8, u32); 5] = [
    (1 << 2, 1, 2, 28),                         // AVX: leaf 1 ECX.AVX
    ((1 << 3) | (1 << 4), 7, 1, 14),            // MPX: leaf 7 EBX.MPX
    ((1 << 5) | (1 << 6) | (1 << 7), 7, 1, 16), // AVX-512: leaf 7 EBX.AVX512F
    (1 << 9, 7, 2, 3),                          // PKRU: leaf 7 ECX.PKU
    ((1 << 17) | (1 << 18), 7, 3, 24),          // AMX: leaf 7 EDX.AMX-TILE
];

/// Makes leaf 0xD agree with the rest of the CPUID: a state component whose feature the
/// guest is not told about leaves the XCR0 mask (0xD.0 EAX/EDX) and loses its sub-leaf, and
/// the sizes in 0xD.0 EBX/ECX are recomputed from the sub-leaves that remain. Linux checks
/// the size it adds up from the sub-leaves against 0xD.0 EBX and warns at boot when they
/// differ.
fn xsave_consistent(entries: &mut Vec<kvm_bindings::kvm_cpuid_entry2>) {
    let reg = |leaf: u32, r: u8| {
        entries
            .iter()
            .find(|e| e.function == leaf && e.index == 0)
            .map(|e| match r {
                1 => e.ebx,
                2 => e.ecx,
                _ => e.edx,
            })
            .unwrap_or(0)
    };
    let mut drop = 0u64;
    for (bits, leaf, r, bit) in XSAVE_FEATURES {
        if reg(leaf, r) & (1 << bit) == 0 {
            drop |= bits;
        }
    }
    entries.retain(|e| {
        !(e.function == 0xd && e.index >= 2 && e.index < 64 && drop & (1 << e.index) != 0)
    });
    let Some(i) = entries
        .iter()
        .position(|e| e.function == 0xd && e.index == 0)
    else {
        return;
    };
    let mask = (u64::from(entries[i].edx) << 32 | u64::from(entries[i].eax)) & !drop;
    entries[i].eax = mask as u32;
    entries[i].edx = (mask >> 32) as u32;
    let size = xsave_size(entries, mask);
    entries[i].ebx = size;
    entries[i].ecx = size;
}

/// Standard-format XSAVE area size for the components in `mask`: the legacy area and header
/// (576 bytes), then each component at the offset its sub-leaf gives.
fn xsave_size(entries: &[kvm_bindings::kvm_cpuid_entry2], mask: u64) -> u32 {
    entries
        .iter()
        .filter(|e| e.function == 0xd && (2..64).contains(&e.index) && mask & (1 << e.index) != 0)
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(576, u32::max)
}

/// The XCR0 value a guest with this CPUID enables: every user state component of leaf 0xD.
pub fn guest_xcr0(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.edx) << 32 | u64::from(e.eax))
        .unwrap_or(0)
}

/// Starts the vCPU with XCR0 already holding every component of its CPUID's leaf 0xD.
///
/// KVM keeps 0xD.0 EBX (the XSAVE area size for the current XCR0) up to date by watching
/// the guest's XSETBV, and loads its own idea of the guest's XCR0 before entering the guest.
/// Under a nested KVM on QEMU's TCG (the soft-RoCE harness) the guest's XSETBV never reaches
/// KVM (TCG does not honour the XSETBV intercept): KVM then keeps XCR0 = x87 only, tells the
/// guest a 576-byte area in 0xD.0 EBX (Linux warns "XSAVE consistency problem") and resets
/// XCR0 on every entry. With XCR0 set here to what Linux enables anyway, KVM's view and the
/// guest's agree; on a plain host the guest's own XSETBV sets the same value. XCR0 has no
/// effect until the guest sets CR4.OSXSAVE.
fn set_xcr0(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuError> {
    let xcr0 = guest_xcr0(cpuid);
    if xcr0 & !3 == 0 {
        return Ok(()); // nothing beyond x87/SSE: the reset value serves
    }
    let mut xcrs = kvm_bindings::kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).map_err(set("XCR0"))
}

/// MSR values every vCPU starts with (as Firecracker's boot MSRs).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(0x174, 0),                     // IA32_SYSENTER_CS
        msr(0x175, 0),                     // IA32_SYSENTER_ESP
        msr(0x176, 0),                     // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),               // STAR
        msr(0xc000_0082, 0),               // LSTAR
        msr(0xc000_0083, 0),               // CSTAR
        msr(0xc000_0084, 0),               // SYSCALL_MASK
        msr(0xc000_0102, 0),               // KERNEL_GS_BASE
        msr(0x10, 0),                      // IA32_TSC
        msr(0x1a0, 1),                     // IA32_MISC_ENABLE: fast strings
        msr(0x2ff, (1 << 11) | 6),         // MTRRdefType: enabled, write-back
        msr(0x277, 0x0007_0406_0007_0406), // IA32_PAT: power-on default
    ]
}

fn segment(selector: u16, type_: u8, s: u8, limit: u32, g: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l: 0,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Gives an AP of the Pc platform its CPUID and the BSP's boot MSRs (the same TSC value in
/// particular, so the guest finds the TSCs synchronised) and leaves the rest at KVM's reset
/// state: the AP waits for INIT/SIPI.
pub fn setup_ap(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(set("CPUID"))?;
    set_xcr0(vcpu, cpuid)?;
    set_boot_msrs(vcpu)
}

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::PartialMsrs {
        set: 0,
        total: entries.len(),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(set("boot MSRs"))?;
    if n != entries.len() {
        return Err(CpuError::PartialMsrs {
            set: n,
            total: entries.len(),
        });
    }
    Ok(())
}

/// Flat segments for either boot entry: one code segment, every data segment the same, the
/// boot GDT (`gdt_entries` long) and no IDT yet.
fn flat_segments(
    sregs: &mut kvm_sregs,
    code: kvm_segment,
    data: kvm_segment,
    tr: kvm_segment,
    gdt_entries: usize,
) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tr;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt_entries * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

/// Puts a fresh vCPU into its boot entry state (PVH 32-bit or Linux 64-bit).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, boot: &Boot) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(set("CPUID"))?;
    set_xcr0(vcpu, cpuid)?;
    set_boot_msrs(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(set("FPU state"))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(set("segment registers"))?;
    if boot.mode == EntryMode::Linux64 {
        let mut code = segment(0x10, 0xb, 1, 0xffff_ffff, 1, 0);
        code.l = 1;
        let data = segment(0x18, 0x3, 1, 0xffff_ffff, 1, 1);
        let tr = segment(0x20, 0xb, 0, 0x67, 0, 0);
        flat_segments(&mut sregs, code, data, tr, LONG_GDT_ENTRIES.len());
        sregs.cr3 = PAGE_TABLES;
        sregs.cr4 = 0x20; // PAE
        sregs.cr0 = 0x8000_0011; // PG | ET | PE
        sregs.efer = 0x500; // LME | LMA
        vcpu.set_sregs(&sregs).map_err(set("segment registers"))?;
        let regs = kvm_regs {
            rflags: 0x2,
            rip: boot.entry,
            rsi: boot.start_info,
            ..Default::default()
        };
        return vcpu.set_regs(&regs).map_err(set("registers"));
    }
    let code = segment(0x08, 0xb, 1, 0xffff_ffff, 1, 1);
    let data = segment(0x10, 0x3, 1, 0xffff_ffff, 1, 1);
    let tr = segment(0x18, 0xb, 0, 0x67, 0, 0);
    flat_segments(&mut sregs, code, data, tr, BOOT_GDT_ENTRIES.len());
    sregs.cr0 = 0x1 | 0x10; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(set("segment registers"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        rbx: boot.start_info,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(set("registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_as_flat_segments() {
        // Code: base 0, limit 0xfffff, access 0x9b, flags 0xc (4 KiB granularity, 32-bit).
        assert_eq!(BOOT_GDT_ENTRIES[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT_ENTRIES[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT_ENTRIES[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn cpuid_carries_apic_id_and_tsc() {
        let base = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = cpuid_for(&base, 3, 4, 2_500_000);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].function, CPUID_TSC_LEAF);
        assert_eq!(s[2].eax, 2_500_000);
    }

    fn leaf(function: u32, index: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 0xd { 1 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn xsave_leaf_follows_the_advertised_features() {
        // x87|SSE|AVX|PKRU offered by KVM, as on the harness's hosts, but PKU not advertised.
        let mut l1 = leaf(1, 0);
        l1.ecx = 1 << 28; // AVX
        let l7 = leaf(7, 0);
        let mut d0 = leaf(0xd, 0);
        d0.eax = 0x207;
        d0.ebx = 576;
        d0.ecx = 0xa88;
        let mut d2 = leaf(0xd, 2);
        (d2.eax, d2.ebx) = (256, 576);
        let mut d9 = leaf(0xd, 9);
        (d9.eax, d9.ebx) = (8, 2688);
        let mut ext = leaf(0x8000_0007, 0);
        ext.edx = 0;
        let base = CpuId::from_entries(&[l1, l7, d0, d2, d9, ext]).unwrap();
        let c = cpuid_for(&base, 0, 2, 1_000_000);
        let s = c.as_slice();
        let out = s
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!((out.eax, out.edx), (0x7, 0));
        assert_eq!((out.ebx, out.ecx), (832, 832));
        assert_eq!(out.flags, 1, "the significant-index flag survives");
        assert!(!s.iter().any(|e| e.function == 0xd && e.index == 9));
        assert!(s.iter().any(|e| e.function == 0xd && e.index == 2));
        assert_eq!(guest_xcr0(&c), 0x7);
        let ext = s.iter().find(|e| e.function == 0x8000_0007).unwrap();
        assert_eq!(
            ext.edx & (1 << 8),
            0,
            "no invariant TSC: kvm-clock stays the clocksource"
        );

        // With PKU advertised the component stays and the size covers it.
        let mut l7 = leaf(7, 0);
        l7.ecx = 1 << 3;
        let base = CpuId::from_entries(&[l1, l7, d0, d2, d9]).unwrap();
        let c = cpuid_for(&base, 0, 1, 1_000_000);
        let d0 = *c
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!((d0.eax, d0.ebx, d0.ecx), (0x207, 2696, 2696));
        assert_eq!(guest_xcr0(&c), 0x207);
    }
}
