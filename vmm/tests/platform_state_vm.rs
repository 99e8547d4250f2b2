//! A running Pc-platform guest saved and restored into a second Pc VM in process, on the
//! real /dev/kvm: the state carries the LAPIC, irqchip and PIT pieces, the restored guest's
//! heartbeat continues; the LAPICs, IOAPIC and PIC of the restored VM are
//! what was saved; a Pc state is refused by a Minimal VM with one line. The minimal platform's
//! state carries none of the new pieces.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use blip_vmm::loader::Image;
use blip_vmm::memory::{Backing, GuestMem};
use blip_vmm::persist::{
    decode, encode, piece_names, ClockPolicy, PIECE_IRQCHIP, PIECE_LAPIC, PIECE_PIT,
    PLATFORM_PIECES,
};
use blip_vmm::platform::Platform;
use blip_vmm::platform_state::{lapic_reg, save_irqchip};
use blip_vmm::vm::{Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MEM: u64 = 32 << 20;

fn config(platform: Platform, image: Option<Image>, sink: Sink) -> VmConfig {
    VmConfig {
        mem_size: MEM,
        vcpus: 2,
        cmdline: "dirty ws=4 rate=max heartbeat period=500".into(),
        backing: Backing::Anon,
        image,
        serial: Box::new(sink),
        platform,
    }
}

fn copy_memory(src: &GuestMem, dst: &GuestMem) {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < MEM {
        src.read_slice(&mut buf, GuestAddress(at)).unwrap();
        dst.write_slice(&buf, GuestAddress(at)).unwrap();
        at += buf.len() as u64;
    }
}

fn running(platform: Platform) -> Vm {
    let mut vm = Vm::create(config(platform, Some(Image::embedded()), Sink::default())).unwrap();
    vm.resume_all().unwrap();
    // Wait on the guest itself: its first heartbeats.
    let t = std::time::Instant::now();
    while vm.devices().heartbeats.lock().unwrap().total < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no heartbeats");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause_all().unwrap();
    vm
}

#[test]
fn platform_state_pc_guest_continues_in_a_second_pc_vm() {
    let mut src = running(Platform::Pc);
    let last = src.devices().heartbeats.lock().unwrap().last().unwrap();
    let st = src.save_state().unwrap();
    assert_eq!(
        st.pieces & PLATFORM_PIECES,
        PLATFORM_PIECES,
        "pieces [{}]",
        piece_names(st.pieces)
    );
    assert!(st.vcpus.iter().all(|v| v.lapic.is_some()));
    assert!(st.irqchip.is_some() && st.pit.is_some());
    let st = decode(&encode(&st).unwrap()).unwrap();

    // A Minimal VM cannot take it: one line, nothing restored.
    let mut minimal = Vm::create(config(Platform::Minimal, None, Sink::default())).unwrap();
    let e = minimal.restore_state(&st).unwrap_err();
    assert_eq!(
        e.to_string(),
        "saved state carries lapic,irqchip,pit but this VM has no in-kernel irqchip and PIT \
         (it needs the PC platform)"
    );
    drop(minimal);

    let out = Sink::default();
    let mut dst = Vm::create(config(Platform::Pc, None, out.clone())).unwrap();
    copy_memory(src.memory(), dst.memory());
    let chips = save_irqchip(src.fd()).unwrap();
    drop(src);
    let since_ns = blip_vmm::devices::now_ns();
    dst.restore_state_with(&st, ClockPolicy::Advance { since_ns })
        .unwrap();

    // The restored VM's interrupt state is the saved one.
    assert_eq!(save_irqchip(dst.fd()).unwrap(), chips);
    let again = dst.save_state().unwrap();
    for (a, b) in again.vcpus.iter().zip(&st.vcpus) {
        let (a, b) = (a.lapic.unwrap(), b.lapic.unwrap());
        for reg in [
            0x20, 0x30, 0x80, 0xf0, 0x320, 0x350, 0x360, 0x370, 0x380, 0x3e0,
        ] {
            assert_eq!(lapic_reg(&a, reg), lapic_reg(&b, reg), "LAPIC {reg:#x}");
        }
    }
    assert_eq!(again.pit.unwrap().flags, st.pit.unwrap().flags);

    // The guest runs on: its heartbeats continue above the source's last one. (The check
    // command is not used: on the Pc platform the embedded guest's serial output and its
    // command loop are h1's to make interrupt-proof; a fresh Pc VM does not answer it either.)
    dst.resume_all().unwrap();
    let t = std::time::Instant::now();
    while dst.devices().heartbeats.lock().unwrap().total < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no heartbeats after restore"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = dst.devices().heartbeats.lock().unwrap().beats()[0];
    assert!(first.counter > last.counter, "heartbeat went back");
    dst.pause_all().unwrap();
}

#[test]
fn platform_state_minimal_carries_none_of_it() {
    let mut src = running(Platform::Minimal);
    let st = src.save_state().unwrap();
    assert_eq!(st.pieces & (PIECE_LAPIC | PIECE_IRQCHIP | PIECE_PIT), 0);
    assert!(st.vcpus.iter().all(|v| v.lapic.is_none()));
    assert!(st.irqchip.is_none() && st.pit.is_none());
    assert_eq!(st.saved_at_ns, 0);
}
