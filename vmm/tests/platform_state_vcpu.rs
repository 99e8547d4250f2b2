//! A whole vCPU of a PC-platform VM through `persist::save_vcpu` → `restore_vcpu` into a
//! second VM on the real /dev/kvm: the LAPIC in TSC-deadline mode with its deadline armed, the
//! MSRs a stock kernel writes (kvmclock, async PF, steal time, PV EOI, MISC_ENABLE), and the
//! TSC moved forward by a given blackout.

use blip_vmm::persist::{
    readable_msrs, restorable_msrs_for, restore_vcpu, save_vcpu, Caps, PIECE_IRQCHIP, PIECE_LAPIC,
    PIECE_PIT,
};
use blip_vmm::platform_state::{
    create_pc, lapic_reg, restore_lapic, save_lapic, set_lapic_reg, tsc_ticks,
};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

const MSR_TSC: u32 = 0x10;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const MSR_MISC_ENABLE: u32 = 0x1a0;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
const LVT_TIMER: usize = 0x320;
const MEM: u64 = 1 << 20;
const SVR: usize = 0xf0;

fn pc_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().unwrap();
    create_pc(&vm).unwrap();
    // The PV MSRs point at guest memory: KVM refuses them unless the address is in a slot.
    // SAFETY: a fresh anonymous private mapping, checked below and never unmapped (the test
    // process ends soon; the VM may use it until then).
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping is MEM bytes long and outlives the VM (never unmapped).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= 1 << 24; // TSC-deadline timer: without it KVM masks the LVT timer mode
        }
    }
    fd.set_cpuid2(&cpuid).unwrap();
    (vm, fd)
}

fn msr(fd: &VcpuFd, index: u32) -> u64 {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(fd.get_msrs(&mut m).unwrap(), 1, "read MSR {index:#x}");
    m.as_slice()[0].data
}

fn set_msrs(fd: &VcpuFd, pairs: &[(u32, u64)]) {
    let entries: Vec<_> = pairs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let n = fd.set_msrs(&Msrs::from_entries(&entries).unwrap()).unwrap();
    assert_eq!(
        n,
        pairs.len(),
        "MSR {:#x} refused",
        pairs[n.min(pairs.len() - 1)].0
    );
}

fn caps(vm: &VmFd, fd: &VcpuFd) -> Caps {
    let mut caps = Caps::of_vm(vm);
    assert_eq!(
        caps.pieces & (PIECE_LAPIC | PIECE_IRQCHIP | PIECE_PIT),
        PIECE_LAPIC | PIECE_IRQCHIP | PIECE_PIT
    );
    let candidates = restorable_msrs_for(true).unwrap();
    caps.msr_indices = readable_msrs(fd, 0, &candidates).unwrap();
    caps
}

#[test]
fn platform_state_vcpu_keeps_lapic_timer_and_pv_msrs() {
    let kvm = Kvm::new().unwrap();
    let (src_vm, src) = pc_vcpu(&kvm);

    // A stock kernel's state: LAPIC enabled, timer in TSC-deadline mode, a deadline armed far
    // ahead, kvmclock and the PV features registered.
    let mut l = save_lapic(&src, 0).unwrap();
    set_lapic_reg(&mut l, SVR, 0x1ff);
    set_lapic_reg(&mut l, LVT_TIMER, 0x4_00ec);
    restore_lapic(&src, 0, &l).unwrap();
    let tsc = msr(&src, MSR_TSC);
    let deadline = tsc + (1u64 << 40);
    let listed = kvm.get_msr_index_list().unwrap();
    let mut pv = vec![
        (MSR_TSC_DEADLINE, deadline),
        (MSR_MISC_ENABLE, msr(&src, MSR_MISC_ENABLE) | 1),
    ];
    for (m, v) in [
        (MSR_KVM_SYSTEM_TIME_NEW, 0x7000 | 1),
        (MSR_KVM_WALL_CLOCK_NEW, 0x7100),
        (MSR_KVM_ASYNC_PF_INT, 0xf3),
        (MSR_KVM_ASYNC_PF_EN, 0x7200 | 1 | (1 << 3)),
        (MSR_KVM_STEAL_TIME, 0x7300 | 1),
        (MSR_KVM_PV_EOI_EN, 0x7400 | 1),
    ] {
        if listed.as_slice().contains(&m) {
            pv.push((m, v));
        }
    }
    set_msrs(&src, &pv);
    assert_eq!(msr(&src, MSR_TSC_DEADLINE), deadline);

    let c = caps(&src_vm, &src);
    let st = save_vcpu(&src, 0, &c).unwrap();
    assert!(st.lapic.is_some());
    assert_eq!(st.pieces & PIECE_LAPIC, PIECE_LAPIC);
    for (m, v) in &pv {
        // kvmclock's wall clock MSR is write-only in effect (KVM reads back 0 for it).
        if *m == MSR_KVM_WALL_CLOCK_NEW {
            continue;
        }
        let saved = st.msrs.iter().find(|(i, _)| i == m).map(|(_, v)| *v);
        assert_eq!(saved, Some(*v), "MSR {m:#x} not saved");
    }

    // Restore into a second PC VM, moving the TSC forward by a 1 s "blackout".
    let (dst_vm, dst) = pc_vcpu(&kvm);
    let dc = Caps::of_vm(&dst_vm);
    let advance = 1_000_000_000;
    restore_vcpu(&dst, &st, &dc, advance).unwrap();

    let back = save_lapic(&dst, 0).unwrap();
    assert_eq!(lapic_reg(&back, LVT_TIMER), 0x4_00ec);
    assert_eq!(lapic_reg(&back, SVR), 0x1ff);
    // The deadline is armed: the LAPIC was in TSC-deadline mode before the MSR was written
    // (KVM drops the write otherwise and reads back 0). Standard KVM reads back exactly what
    // was written; this host's paravirtual KVM reads back a deadline written after a TSC
    // change shifted by that change (`deadline - step` here), so allow that much.
    let d = msr(&dst, MSR_TSC_DEADLINE);
    let step = tsc_ticks(advance, dst.get_tsc_khz().unwrap());
    eprintln!("platform-state: TSC deadline {deadline} saved, {d} after restore (TSC step {step})");
    assert!(
        d <= deadline && d + step + step / 10 >= deadline,
        "deadline {d} after restore, {deadline} saved"
    );
    for (m, v) in &pv {
        if *m == MSR_KVM_WALL_CLOCK_NEW || *m == MSR_TSC_DEADLINE {
            continue;
        }
        assert_eq!(msr(&dst, *m), *v, "MSR {m:#x} after restore");
    }
    let khz = dst.get_tsc_khz().unwrap();
    let saved_tsc = st.msrs.iter().find(|(i, _)| *i == MSR_TSC).unwrap().1;
    let now = msr(&dst, MSR_TSC);
    let step = tsc_ticks(advance, khz);
    // Standard KVM takes the written TSC (saved + step, plus the time since); this host's
    // paravirtual KVM ignores host writes of MSR_IA32_TSC (guest TSC = host TSC), which on
    // one host is saved + the time since. Either way it never goes back and never leaps
    // past the blackout.
    eprintln!(
        "platform-state: TSC saved {saved_tsc}, {now} after restore (+{} ticks, step {step})",
        now - saved_tsc
    );
    assert!(
        now >= saved_tsc && now < saved_tsc + step + tsc_ticks(1_000_000_000, khz),
        "TSC {now} after restore: saved {saved_tsc}, step {step}"
    );
}
