//! The PC platform's interrupt and timer state survives save → restore into a second VM, on
//! the real /dev/kvm: LAPIC registers, the IOAPIC redirection table, both PICs, the PIT's
//! channels and flags. Also prints what each new ioctl costs on this host (the table in
//! docs/ARCHITECTURE.md) and which MSRs an irqchip makes restorable.

use std::time::Instant;

use blip_vmm::persist::restorable_msrs_for;
use blip_vmm::platform_state::{
    create_pc, lapic_reg, restore_irqchip, restore_lapic, restore_pit, save_irqchip, save_lapic,
    save_pit, set_lapic_reg, IrqchipState, Presence,
};
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

const SVR: usize = 0xf0;
const TPR: usize = 0x80;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const TIMER_INIT: usize = 0x380;
const TIMER_DIV: usize = 0x3e0;

fn pc_vm(kvm: &Kvm, vcpus: u8) -> (VmFd, Vec<VcpuFd>) {
    let vm = kvm.create_vm().unwrap();
    create_pc(&vm).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let fds = (0..vcpus)
        .map(|i| {
            let fd = vm.create_vcpu(u64::from(i)).unwrap();
            fd.set_cpuid2(&cpuid).unwrap();
            fd
        })
        .collect();
    (vm, fds)
}

fn us(t: Instant, n: u32) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

#[test]
fn platform_state_presence_follows_what_was_created() {
    let kvm = Kvm::new().unwrap();
    let bare = kvm.create_vm().unwrap();
    assert_eq!(Presence::of_vm(&bare), Presence::default());
    let (pc, _) = pc_vm(&kvm, 1);
    assert_eq!(
        Presence::of_vm(&pc),
        Presence {
            irqchip: true,
            pit: true
        }
    );
}

#[test]
fn platform_state_round_trips_into_a_second_vm() {
    let kvm = Kvm::new().unwrap();
    let (src, src_cpus) = pc_vm(&kvm, 2);

    // Give every piece state that differs from reset.
    for (i, fd) in src_cpus.iter().enumerate() {
        let mut l = save_lapic(fd, i as u8).unwrap();
        set_lapic_reg(&mut l, SVR, 0x1ff);
        set_lapic_reg(&mut l, TPR, 0x20 + i as u32);
        set_lapic_reg(&mut l, LVT_TIMER, 0x2_00ec); // periodic, vector 0xec
        set_lapic_reg(&mut l, LVT_LINT0, 0x700);
        set_lapic_reg(&mut l, TIMER_DIV, 0xb);
        set_lapic_reg(&mut l, TIMER_INIT, 0x1000_0000);
        restore_lapic(fd, i as u8, &l).unwrap();
    }
    let mut chips = save_irqchip(&src).unwrap();
    // SAFETY: plain-data union fields, written as the chip each one is.
    unsafe {
        chips.pic_master.chip.pic.imr = 0xb8;
        chips.pic_master.chip.pic.irq_base = 0x30;
        chips.pic_slave.chip.pic.imr = 0x8f;
        chips.pic_slave.chip.pic.irq_base = 0x38;
        chips.ioapic.chip.ioapic.id = 0;
        chips.ioapic.chip.ioapic.redirtbl[4].bits = 0x0100_0000_0000_0024; // COM1 → vector 0x24
        chips.ioapic.chip.ioapic.redirtbl[9].bits = 0x0000_0000_0000_a029; // level, masked
        chips.ioapic.chip.ioapic.redirtbl[2].bits = 0x0000_0000_0000_0030;
    }
    restore_irqchip(&src, &chips).unwrap();
    let mut pit = save_pit(&src).unwrap();
    pit.channels[0].mode = 2;
    pit.channels[0].rw_mode = 3;
    pit.channels[0].count = 11932;
    pit.channels[2].gate = 1;
    restore_pit(&src, &pit).unwrap();

    // Save.
    let lapics: Vec<_> = src_cpus
        .iter()
        .enumerate()
        .map(|(i, fd)| save_lapic(fd, i as u8).unwrap())
        .collect();
    let chips = save_irqchip(&src).unwrap();
    let pit = save_pit(&src).unwrap();

    // Restore into a second VM.
    let (dst, dst_cpus) = pc_vm(&kvm, 2);
    restore_irqchip(&dst, &chips).unwrap();
    restore_pit(&dst, &pit).unwrap();
    for (i, fd) in dst_cpus.iter().enumerate() {
        restore_lapic(fd, i as u8, &lapics[i]).unwrap();
    }

    // Same state back.
    for (i, fd) in dst_cpus.iter().enumerate() {
        let back = save_lapic(fd, i as u8).unwrap();
        for reg in [0x20, TPR, SVR, LVT_TIMER, LVT_LINT0, TIMER_INIT, TIMER_DIV] {
            assert_eq!(
                lapic_reg(&back, reg),
                lapic_reg(&lapics[i], reg),
                "vCPU {i} LAPIC register {reg:#x}"
            );
        }
        assert_eq!(lapic_reg(&back, TPR), 0x20 + i as u32);
        // The periodic timer keeps running from what was left (TMCCT is recomputed).
        assert!(lapic_reg(&back, 0x390) <= 0x1000_0000);
    }
    let back = save_irqchip(&dst).unwrap();
    assert_eq!(back, chips);
    // SAFETY: plain-data union fields of the chips they were read as.
    unsafe {
        assert_eq!(
            back.ioapic.chip.ioapic.redirtbl[4].bits,
            0x0100_0000_0000_0024
        );
        assert_eq!(back.ioapic.chip.ioapic.redirtbl[9].bits & 0x1_ffff, 0xa029);
        assert_eq!(back.pic_master.chip.pic.imr, 0xb8);
        assert_eq!(back.pic_slave.chip.pic.irq_base, 0x38);
    }
    let pit_back = save_pit(&dst).unwrap();
    assert_eq!(pit_back.flags, pit.flags);
    for c in 0..3 {
        let (a, b) = (&pit_back.channels[c], &pit.channels[c]);
        assert_eq!(
            (a.count, a.mode, a.rw_mode, a.gate, a.bcd, a.read_state),
            (b.count, b.mode, b.rw_mode, b.gate, b.bcd, b.read_state),
            "PIT channel {c}"
        );
    }
    assert_eq!(pit_back.channels[0].count, 11932);

    // Encoded through serde as the persist module does: same bytes back.
    let enc = bincode::serialize(&chips).unwrap();
    let dec: IrqchipState = bincode::deserialize(&enc).unwrap();
    assert_eq!(dec, chips);
}

#[test]
fn platform_state_ioctl_costs() {
    let kvm = Kvm::new().unwrap();
    let (vm, cpus) = pc_vm(&kvm, 1);
    let n = 200;
    let fd = &cpus[0];
    let t = Instant::now();
    let mut l = None;
    for _ in 0..n {
        l = Some(save_lapic(fd, 0).unwrap());
    }
    let get_lapic = us(t, n);
    let l = l.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        restore_lapic(fd, 0, &l).unwrap();
    }
    let set_lapic = us(t, n);
    let t = Instant::now();
    let mut c = None;
    for _ in 0..n {
        c = Some(save_irqchip(&vm).unwrap());
    }
    let get_chip = us(t, n);
    let c = c.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        restore_irqchip(&vm, &c).unwrap();
    }
    let set_chip = us(t, n);
    let t = Instant::now();
    let mut p = None;
    for _ in 0..n {
        p = Some(save_pit(&vm).unwrap());
    }
    let get_pit = us(t, n);
    let p = p.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        restore_pit(&vm, &p).unwrap();
    }
    let set_pit = us(t, n);
    let t = Instant::now();
    let mut clk = None;
    for _ in 0..n {
        clk = Some(vm.get_clock().unwrap());
    }
    let get_clock = us(t, n);
    let clk = clk.unwrap();
    let data = kvm_bindings::kvm_clock_data {
        clock: clk.clock,
        ..Default::default()
    };
    let t = Instant::now();
    for _ in 0..n {
        vm.set_clock(&data).unwrap();
    }
    let set_clock = us(t, n);
    eprintln!(
        "platform-state costs (µs per call, mean of {n}): get_lapic {get_lapic:.1} set_lapic \
         {set_lapic:.1} | get_irqchip x3 {get_chip:.1} set_irqchip x3 {set_chip:.1} | get_pit2 \
         {get_pit:.1} set_pit2 {set_pit:.1} | get_clock {get_clock:.1} set_clock {set_clock:.1} \
         (clock flags {:#x})",
        clk.flags
    );
    let mut probe = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut probe).unwrap();
    probe.chip_id = KVM_IRQCHIP_IOAPIC;
    vm.get_irqchip(&mut probe).unwrap();
}

#[test]
fn platform_state_irqchip_makes_more_msrs_restorable() {
    let minimal = restorable_msrs_for(false).unwrap();
    let pc = restorable_msrs_for(true).unwrap();
    let listed = Kvm::new().unwrap().get_msr_index_list().unwrap();
    let only_pc: Vec<String> = pc
        .iter()
        .filter(|i| !minimal.contains(i))
        .map(|i| format!("{i:#x}"))
        .collect();
    let neither: Vec<String> = listed
        .as_slice()
        .iter()
        .filter(|i| !pc.contains(i))
        .map(|i| format!("{i:#x}"))
        .collect();
    eprintln!(
        "platform-state MSRs: {} listed, {} restorable without irqchip, {} with; only with \
         irqchip: {only_pc:?}; never: {neither:?}; with: {pc:x?}",
        listed.as_slice().len(),
        minimal.len(),
        pc.len()
    );
    for m in &minimal {
        assert!(pc.contains(m), "MSR {m:#x} restorable only without irqchip");
    }
    // kvmclock, async PF, steal time, PV EOI, TSC deadline: a stock kernel's MSRs.
    for m in [
        0x4b56_4d01u32,
        0x4b56_4d00,
        0x4b56_4d02,
        0x4b56_4d03,
        0x4b56_4d04,
        0x6e0,
    ] {
        if listed.as_slice().contains(&m) {
            assert!(pc.contains(&m), "MSR {m:#x} not restorable with an irqchip");
        }
    }
}
