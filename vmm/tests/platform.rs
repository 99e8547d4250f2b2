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
