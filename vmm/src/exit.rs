//! What a vCPU exit means, as a plain function over the exit value.
//!
//! Kept free of threads and KVM file descriptors so every exit reason can be unit-tested with
//! fake `VcpuExit` values; the vCPU thread only acts on the returned [`Action`].

use kvm_ioctls::VcpuExit;

use crate::devices::{Devices, PortEffect};

/// KVM_EXIT_DIRTY_RING_FULL (kvm-ioctls 0.25 reports it as `Unsupported(31)`).
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// What the vCPU thread does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// The vCPU executed HLT; with no interrupt source it can never wake: it is done.
    Halt,
    /// The guest asked blip to exit with this code (exit port).
    GuestExit(i32),
    /// The guest reset the machine (i8042 reset line, Pc platform): blip ends the VM as
    /// powered off (exit code 0); it does not restart guests.
    Reset,
    /// The vCPU's dirty ring is full: drain it before re-entering.
    DirtyRingFull,
    /// The guest cannot continue; the string names the exit reason.
    Fault(String),
}

/// Decides what an exit means, performing device I/O on the way.
pub fn handle_exit(exit: VcpuExit<'_>, vcpu: u8, devices: &Devices) -> Action {
    match exit {
        VcpuExit::IoOut(port, data) => match devices.port_write(vcpu, port, data) {
            Some(PortEffect::Exit(code)) => Action::GuestExit(code),
            Some(PortEffect::Reset) => Action::Reset,
            None => Action::Continue,
        },
        VcpuExit::IoIn(port, data) => {
            devices.port_read(port, data);
            Action::Continue
        }
        VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            Action::Continue
        }
        VcpuExit::MmioWrite(..) | VcpuExit::Intr => Action::Continue,
        VcpuExit::Hlt => Action::Halt,
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => Action::DirtyRingFull,
        VcpuExit::Shutdown => Action::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => Action::Fault(format!(
            "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host cpu {cpu})"
        )),
        VcpuExit::InternalError => {
            Action::Fault("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into())
        }
        VcpuExit::SystemEvent(kind, _) => Action::Fault(format!(
            "unexpected system event {kind} (KVM_EXIT_SYSTEM_EVENT)"
        )),
        other => Action::Fault(format!("unhandled exit {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(Box::new(std::io::sink()), 1)
    }

    #[test]
    fn exit_port_exits_with_qemu_code() {
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0xf4, &[2, 0, 0, 0]), 0, &devices()),
            Action::GuestExit(5)
        );
    }

    #[test]
    fn io_and_mmio_continue() {
        let d = devices();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"x"), 0, &d),
            Action::Continue
        );
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[1]), 0, &d),
            Action::Continue
        );
        let mut buf = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x60, &mut buf), 0, &d),
            Action::Continue
        );
        assert_eq!(buf, [0xff; 4]);
        let mut buf = [0u8; 8];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut buf), 0, &d),
            Action::Continue
        );
        assert_eq!(buf, [0xff; 8]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1]), 0, &d),
            Action::Continue
        );
        assert_eq!(handle_exit(VcpuExit::Intr, 0, &d), Action::Continue);
    }

    #[test]
    fn halt_ring_full_and_faults() {
        let d = devices();
        assert_eq!(handle_exit(VcpuExit::Hlt, 0, &d), Action::Halt);
        assert_eq!(
            handle_exit(VcpuExit::Unsupported(31), 0, &d),
            Action::DirtyRingFull
        );
        assert!(
            matches!(handle_exit(VcpuExit::Shutdown, 0, &d), Action::Fault(m) if m.contains("triple fault"))
        );
        assert!(
            matches!(handle_exit(VcpuExit::FailEntry(7, 1), 0, &d), Action::Fault(m) if m.contains("0x7"))
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, 0, &d),
            Action::Fault(_)
        ));
        assert!(
            matches!(handle_exit(VcpuExit::Unsupported(99), 0, &d), Action::Fault(m) if m.contains("99"))
        );
        assert!(matches!(
            handle_exit(VcpuExit::Exception, 0, &d),
            Action::Fault(_)
        ));
    }
}
