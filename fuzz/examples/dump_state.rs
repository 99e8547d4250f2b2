//! Writes the seed corpus for `state_envelope` from a real VM: boots the embedded guest on
//! /dev/kvm with 1 vCPU, lets it run briefly, pauses it, saves and encodes its state, and
//! writes `seed-real-payload` (mode byte 1 and the payload: the target wraps it in an envelope
//! with the right CRC, so mutations reach the state decoder) into the directory given as the
//! only argument.
//!
//! cargo run --manifest-path fuzz/Cargo.toml --example dump_state -- fuzz/corpus/state_envelope

use std::path::PathBuf;
use std::time::Duration;

use blip_vmm::loader::Image;
use blip_vmm::memory::Backing;
use blip_vmm::persist::{encode, HEADER_LEN};
use blip_vmm::vm::{Vm, VmConfig};

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: dump_state DIR"));
    let mut vm = Vm::create(VmConfig {
        mem_size: 16 << 20,
        vcpus: 1,
        cmdline: "heartbeat period=500".into(),
        backing: Backing::Anon,
        image: Some(Image::embedded()),
        serial: Box::new(std::io::sink()),
        platform: Default::default(),
    })
    .expect("create VM");
    vm.resume_all().expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    vm.pause_all().expect("pause");
    let st = vm.save_state().expect("save state");
    let bytes = encode(&st).expect("encode state");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let mut payload = vec![1u8];
    payload.extend_from_slice(&bytes[HEADER_LEN..]);
    std::fs::write(dir.join("seed-real-payload"), &payload).expect("write payload seed");
    println!(
        "state of 1 vCPU: {} bytes, {} MSRs, xsave {} words",
        bytes.len(),
        st.vcpus[0].msrs.len(),
        st.vcpus[0].xsave.as_ref().map_or(0, Vec::len)
    );
}
