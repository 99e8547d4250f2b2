//! The Pc platform on the real /dev/kvm: the in-kernel irqchip and PIT exist (and do not on
//! the Minimal platform), the MP table is in guest memory, and the embedded guest, which never
//! enables interrupts, still runs and powers off as before (its final HLT with interrupts off
//! is seen by the halt probe, since a HLT stays inside KVM once there is an irqchip).

use std::sync::atomic::AtomicBool;

use blip_vmm::loader::Image;
use blip_vmm::memory::Backing;
use blip_vmm::platform::{Platform, EBDA_START};
use blip_vmm::vm::{Vm, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

#[derive(Clone, Default)]
struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn vm(platform: Platform, vcpus: u32, sink: Sink) -> Vm {
    Vm::create(VmConfig {
        mem_size: 32 << 20,
        vcpus,
        cmdline: "hello".into(),
        backing: Backing::Anon,
        image: Some(Image::embedded()),
        serial: Box::new(sink),
        platform,
    })
    .unwrap()
}

fn has_irqchip(vm: &Vm) -> bool {
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.fd().get_irqchip(&mut chip).is_ok()
}

#[test]
fn pc_has_irqchip_pit_and_mp_table_and_runs_the_embedded_guest() {
    for vcpus in [1, 2] {
        let sink = Sink::default();
        let mut vm = vm(Platform::Pc, vcpus, sink.clone());
        assert_eq!(vm.platform(), Platform::Pc);
        assert!(has_irqchip(&vm), "no in-kernel irqchip");
        assert!(vm.fd().get_pit2().is_ok(), "no in-kernel PIT");
        let mut mp = [0u8; 4];
        vm.memory()
            .read_slice(&mut mp, GuestAddress(EBDA_START))
            .unwrap();
        assert_eq!(&mp, b"_MP_");
        vm.resume_all().unwrap();
        let exit = vm.wait(&AtomicBool::new(false));
        let out = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
        assert_eq!(exit, VmExit::PoweredOff, "{vcpus} vCPUs, serial: {out}");
        assert!(out.contains("hello from blip guest"), "{out}");
    }
}

#[test]
fn minimal_has_no_irqchip_pit_or_mp_table() {
    let sink = Sink::default();
    let mut vm = vm(Platform::Minimal, 1, sink.clone());
    assert!(!has_irqchip(&vm));
    assert!(vm.fd().get_pit2().is_err());
    let mp: u32 = vm.memory().read_obj(GuestAddress(EBDA_START)).unwrap();
    assert_eq!(mp, 0);
    vm.resume_all().unwrap();
    assert_eq!(vm.wait(&AtomicBool::new(false)), VmExit::PoweredOff);
}

/// A hand-made PVH ELF64 whose 32-bit entry runs `code` (paging off, flat segments).
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const ENTRY: u64 = 0x10_0000;
    let mut f = vec![0u8; 0x1000];
    let h = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    h(&mut f, 0, b"\x7fELF\x02\x01\x01");
    h(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    h(&mut f, 18, &62u16.to_le_bytes()); // x86-64
    h(&mut f, 20, &1u32.to_le_bytes());
    h(&mut f, 24, &ENTRY.to_le_bytes());
    h(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    h(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    h(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    h(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
                                        // PT_LOAD of the code at 1 MiB.
    let ph = 64;
    h(&mut f, ph, &1u32.to_le_bytes());
    h(&mut f, ph + 4, &5u32.to_le_bytes());
    h(&mut f, ph + 8, &0x1000u64.to_le_bytes());
    h(&mut f, ph + 16, &ENTRY.to_le_bytes());
    h(&mut f, ph + 24, &ENTRY.to_le_bytes());
    h(&mut f, ph + 32, &(code.len() as u64).to_le_bytes());
    h(&mut f, ph + 40, &(code.len() as u64).to_le_bytes());
    h(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE with the Xen PVH entry note.
    let ph = 64 + 56;
    h(&mut f, ph, &4u32.to_le_bytes());
    h(&mut f, ph + 4, &4u32.to_le_bytes());
    h(&mut f, ph + 8, &0x200u64.to_le_bytes());
    h(&mut f, ph + 32, &20u64.to_le_bytes());
    h(&mut f, ph + 40, &20u64.to_le_bytes());
    h(&mut f, ph + 48, &4u64.to_le_bytes());
    h(&mut f, 0x200, &4u32.to_le_bytes());
    h(&mut f, 0x204, &4u32.to_le_bytes());
    h(&mut f, 0x208, &18u32.to_le_bytes());
    h(&mut f, 0x20c, b"Xen\0");
    h(&mut f, 0x210, &(ENTRY as u32).to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// 32-bit code: `out dx, al` of `value` to `port`.
fn out8(code: &mut Vec<u8>, port: u16, value: u8) {
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xb0, value, 0xee]);
}

/// 32-bit code: `mov dword [addr], value`.
fn store32(code: &mut Vec<u8>, addr: u32, value: u32) {
    code.extend_from_slice(&[0xc7, 0x05]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&value.to_le_bytes());
}

#[test]
fn garbage_in_pic_pit_ioapic_lapic_and_uart_registers_does_not_hurt_blip() {
    let mut code = Vec::new();
    let ports: Vec<u16> = [
        0x20u16, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x4d0,
    ]
    .into_iter()
    .chain(0x3f8..=0x3ff)
    .collect();
    for v in [0xffu8, 0x00, 0xaa, 0x55, 0x11, 0x80] {
        for &p in &ports {
            out8(&mut code, p, v);
        }
        // IOAPIC: every register index, then a redirection entry, filled with garbage.
        for sel in [0x00u32, 0x01, 0x10, 0x11, 0x2f, 0xff] {
            store32(&mut code, 0xfec0_0000, sel);
            store32(&mut code, 0xfec0_0010, u32::from(v) * 0x0101_0101);
        }
        // LAPIC: ID, TPR, SVR, LVT timer, timer count (not the ICR: no IPIs to self).
        for off in [0x20u32, 0x80, 0xf0, 0x320, 0x380] {
            store32(&mut code, 0xfee0_0000 + off, u32::from(v) * 0x0101_0101);
        }
    }
    // Sane UART again, then "OK\n", then halt with interrupts off (= power-off on Pc).
    out8(&mut code, 0x3fb, 0x03);
    out8(&mut code, 0x3f9, 0x00);
    for b in b"OK\n" {
        out8(&mut code, 0x3f8, *b);
    }
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
    let dir = std::env::temp_dir().join(format!("blip-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("garbage.elf");
    std::fs::write(&path, pvh_elf(&code)).unwrap();
    let sink = Sink::default();
    let mut vm = Vm::create(VmConfig {
        mem_size: 32 << 20,
        vcpus: 1,
        cmdline: String::new(),
        backing: Backing::Anon,
        image: Some(Image::from_file(&path).unwrap()),
        serial: Box::new(sink.clone()),
        platform: Platform::Pc,
    })
    .unwrap();
    vm.resume_all().unwrap();
    let exit = vm.wait(&AtomicBool::new(false));
    let out = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
    assert_eq!(exit, VmExit::PoweredOff, "serial: {out:?}");
    assert!(out.ends_with("OK\n"), "serial: {out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
