//! The few devices a blip guest has, and no more.
//!
//! - **COM1** (16550 UART at 0x3f8, vm-superio): output goes to the chosen sink. On the Minimal
//!   platform interrupts are not wired (no irqchip) and guests poll the line status register;
//!   on the Pc platform the UART raises ISA IRQ 4 through an irqfd (THR empty, data received),
//!   because Linux's tty layer waits for those interrupts.
//!   Console input (`blip console`, the API's `console` request) goes into the receive FIFO,
//!   which raises the data-received interrupt on Pc; a polling guest sees LSR.DR.
//! - **i8042 reset** (Pc only): a write of 0xFE to port 0x64 is how Linux resets a PC without
//!   ACPI (`reboot=k`); blip ends the VM as if powered off. Reads of 0x64 say "output full,
//!   input empty" and 0x60 floats (0xff), so Linux's i8042 driver finds no working controller
//!   and creates no keyboard.
//! - **Exit port** at 0xf4, compatible with QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`: the
//!   guest writes `v`, blip exits with `(v << 1) | 1`.
//! - **Heartbeat port**: the guest writes the high half of a 64-bit counter to 0xfc (when it
//!   changes) and the low half to 0xf8; each low write is one heartbeat, timestamped here with
//!   CLOCK_MONOTONIC and kept in a small ring. The largest gap between consecutive heartbeats is
//!   the guest-observed blackout of a migration.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// First port of COM1.
pub const COM1: u16 = 0x3f8;
/// QEMU-compatible debug exit port.
pub const EXIT_PORT: u16 = 0xf4;
/// Heartbeat counter, low 32 bits (a write records a heartbeat).
pub const HEARTBEAT_LO: u16 = 0xf8;
/// Heartbeat counter, high 32 bits.
pub const HEARTBEAT_HI: u16 = 0xfc;
/// Receive FIFO size of vm-superio's 16550A (its constant is private).
const UART_FIFO: usize = 0x40;
/// How many heartbeats the ring keeps: 6.5 s of beats every 100 µs, so the ring still holds
/// the start of a long migration when its gaps are computed (1 MiB at most).
pub const HEARTBEAT_RING: usize = 65536;

/// Current CLOCK_MONOTONIC time in nanoseconds (the clock every blip timestamp uses).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;
/// i8042 command "pulse the CPU reset line".
pub const I8042_RESET: u8 = 0xfe;

/// Where COM1's interrupt goes: nowhere (Minimal: guests poll) or an irqfd on IRQ 4 (Pc).
pub enum SerialIrq {
    None,
    EventFd(vmm_sys_util::eventfd::EventFd),
}

impl SerialIrq {
    fn try_clone(&self) -> SerialIrq {
        match self {
            SerialIrq::None => SerialIrq::None,
            // A failed dup leaves the UART without its interrupt rather than failing a restore.
            SerialIrq::EventFd(e) => e.try_clone().map_or(SerialIrq::None, SerialIrq::EventFd),
        }
    }
}

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            SerialIrq::None => Ok(()),
            SerialIrq::EventFd(e) => e.write(1),
        }
    }
}

/// Offset of the UART's interrupt-enable register.
const UART_IER: u8 = 1;

/// Would writing `ier` to the UART in state `st` enable an interrupt whose condition is already
/// flagged in IIR? A real 16550's interrupt line is (pending AND enabled), so such a write raises
/// it; vm-superio raises one only when the IIR bit goes from clear to set. The difference bites
/// after a lost edge: a migration whose LAPIC was saved before the irqfd's edge for the last THR
/// write landed leaves IIR saying "THR empty" with Linux's 8250 driver done transmitting (it
/// cleared IER's THR bit); when it sets that bit again for its next line, no edge comes, it
/// never reads IIR, and the console stays silent for good.
fn ier_edge_missed(st: &SerialState, ier: u8) -> bool {
    if st.line_control & 0x80 != 0 {
        return false; // DLAB: offset 1 is the divisor latch's high byte
    }
    let newly = ier & !st.interrupt_enable;
    let iir = st.interrupt_identification;
    (newly & 0x02 != 0 && iir & 0x02 != 0) || (newly & 0x01 != 0 && iir & 0x04 != 0)
}

/// What a port write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// The guest wrote the exit port: exit with this code.
    Exit(i32),
    /// The guest pulsed the reset line (i8042): the VM ends as powered off.
    Reset,
}

/// One recorded heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The guest's counter.
    pub counter: u64,
    /// CLOCK_MONOTONIC at the VMM when the write exited.
    pub t_ns: u64,
}

/// Heartbeat history.
#[derive(Default)]
pub struct Heartbeats {
    ring: VecDeque<Beat>,
    /// Heartbeats seen since this VMM started.
    pub total: u64,
}

impl Heartbeats {
    /// Records one heartbeat.
    pub fn record(&mut self, beat: Beat) {
        if self.ring.len() == HEARTBEAT_RING {
            self.ring.pop_front();
        }
        self.ring.push_back(beat);
        self.total += 1;
    }

    /// The most recent heartbeat.
    pub fn last(&self) -> Option<Beat> {
        self.ring.back().copied()
    }

    /// The beats in order, oldest first.
    pub fn beats(&self) -> Vec<Beat> {
        self.ring.iter().copied().collect()
    }

    /// Timestamps of the beats at or after `since_ns`, oldest first.
    pub fn times_since(&self, since_ns: u64) -> Vec<u64> {
        self.ring
            .iter()
            .filter(|b| b.t_ns >= since_ns)
            .map(|b| b.t_ns)
            .collect()
    }

    /// The first beat at or after `since_ns`.
    pub fn first_since(&self, since_ns: u64) -> Option<Beat> {
        self.ring.iter().find(|b| b.t_ns >= since_ns).copied()
    }

    /// The largest gap between consecutive beats whose later beat lies in `from_ns..=to_ns`
    /// (the gap into the window's first beat counts), and when it began. None with fewer than
    /// two beats to compare.
    pub fn largest_gap(&self, from_ns: u64, to_ns: u64) -> Option<(u64, u64)> {
        largest_gap(self.ring.iter().map(|b| b.t_ns), from_ns, to_ns)
    }
}

/// [`Heartbeats::largest_gap`] over timestamps in order: (gap, its start).
pub fn largest_gap(
    times: impl IntoIterator<Item = u64>,
    from_ns: u64,
    to_ns: u64,
) -> Option<(u64, u64)> {
    let mut prev: Option<u64> = None;
    let mut best: Option<(u64, u64)> = None;
    for t in times {
        if let Some(p) = prev {
            // Two vCPUs' beats may be recorded a little out of order: no negative gaps.
            if (from_ns..=to_ns).contains(&t) && best.is_none_or(|(g, _)| t.saturating_sub(p) > g) {
                best = Some((t.saturating_sub(p), p));
            }
        }
        prev = Some(t);
    }
    best
}

/// COM1's registers and receive FIFO (a serde mirror of vm-superio's `SerialState`, which has
/// no serde derive). The output sink is not state: each VM keeps its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The device state a migration carries: COM1's registers and each vCPU's last heartbeat high
/// half (the guest writes the high half only when it changes, so the destination must know it).
/// The heartbeat ring is history, not state: it stays with the VMM that recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialRegs,
    pub heartbeat_hi: Vec<u32>,
}

/// Errors restoring device state.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("saved COM1 receive FIFO holds {0} bytes, more than the UART's FIFO")]
    SerialFifo(usize),
    #[error("saved device state is for {saved} vCPUs but this VM has {here}")]
    VcpuCount { saved: usize, here: usize },
    #[error("the guest's console has room for {free} of {len} bytes (it has not read what it got yet); try again later")]
    ConsoleFull { len: usize, free: usize },
}

/// The device set shared by all vCPU threads.
pub struct Devices {
    serial: Mutex<Serial<SerialIrq, NoEvents, Box<dyn Write + Send>>>,
    /// The i8042 reset line is wired (Pc platform).
    reset_port: bool,
    heartbeat_hi: Vec<AtomicU32>,
    /// Heartbeat history (read by the control API and the migration report).
    pub heartbeats: Mutex<Heartbeats>,
}

impl Devices {
    /// Creates the devices with COM1 writing to `serial_out`.
    pub fn new(serial_out: Box<dyn Write + Send>, vcpus: u8) -> Self {
        Self::with_irq(serial_out, vcpus, SerialIrq::None, false)
    }

    /// Creates the devices with COM1's interrupt going to `irq`; `reset_port` wires the i8042
    /// reset line (the Pc platform).
    pub fn with_irq(
        serial_out: Box<dyn Write + Send>,
        vcpus: u8,
        irq: SerialIrq,
        reset_port: bool,
    ) -> Self {
        Devices {
            serial: Mutex::new(Serial::new(irq, serial_out)),
            reset_port,
            heartbeat_hi: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            heartbeats: Mutex::new(Heartbeats::default()),
        }
    }

    /// Snapshot of the device state (call with the vCPUs paused).
    pub fn save_state(&self) -> DevicesState {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        DevicesState {
            serial: serial.state().into(),
            heartbeat_hi: self
                .heartbeat_hi
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// Loads device state saved by [`Devices::save_state`] (vCPUs paused); COM1 keeps this VM's
    /// output sink.
    pub fn restore_state(&self, st: &DevicesState) -> Result<(), DevicesError> {
        if st.heartbeat_hi.len() != self.heartbeat_hi.len() {
            return Err(DevicesError::VcpuCount {
                saved: st.heartbeat_hi.len(),
                here: self.heartbeat_hi.len(),
            });
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let irq = serial.interrupt_evt().try_clone();
        let old = std::mem::replace(&mut *serial, Serial::new(SerialIrq::None, placeholder));
        let out = old.into_writer();
        // `from_state` fails only on an oversized FIFO; check first so the sink is never lost.
        if st.serial.in_buffer.len() > UART_FIFO {
            *serial = Serial::new(irq, out);
            return Err(DevicesError::SerialFifo(st.serial.in_buffer.len()));
        }
        *serial = Serial::from_state(&SerialState::from(&st.serial), irq, NoEvents, out)
            .map_err(|_| DevicesError::SerialFifo(st.serial.in_buffer.len()))?;
        for (h, v) in self.heartbeat_hi.iter().zip(&st.heartbeat_hi) {
            h.store(*v, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Puts `input` into COM1's receive FIFO, all of it or (no room) none, and raises the
    /// data-received interrupt where the guest enabled it.
    pub fn console_input(&self, input: &[u8]) -> Result<(), DevicesError> {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let free = serial.fifo_capacity();
        if input.len() > free {
            return Err(DevicesError::ConsoleFull {
                len: input.len(),
                free,
            });
        }
        // Only the interrupt can fail (a full eventfd counter); the bytes are queued already
        // and the guest reads them at its next interrupt or poll.
        let _ = serial.enqueue_raw_bytes(input);
        Ok(())
    }

    /// A port write; says so when the guest asked to exit or reset.
    pub fn port_write(&self, vcpu: u8, port: u16, data: &[u8]) -> Option<PortEffect> {
        let value = le_value(data);
        match port {
            COM1..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let (offset, byte) = ((port - COM1) as u8, data.first().copied().unwrap_or(0));
                let missed = offset == UART_IER && ier_edge_missed(&serial.state(), byte);
                // The sink failing (a closed pipe) must not stop the guest.
                let _ = serial.write(offset, byte);
                if missed {
                    let _ = serial.interrupt_evt().trigger();
                }
                if port == COM1 {
                    let _ = serial.writer_mut().flush();
                }
            }
            EXIT_PORT => return Some(PortEffect::Exit(((value << 1) | 1) as i32)),
            I8042_COMMAND if self.reset_port && data.first() == Some(&I8042_RESET) => {
                return Some(PortEffect::Reset)
            }
            HEARTBEAT_HI => {
                if let Some(h) = self.heartbeat_hi.get(vcpu as usize) {
                    h.store(value as u32, Ordering::Relaxed);
                }
            }
            HEARTBEAT_LO => {
                let t_ns = now_ns();
                let hi = self
                    .heartbeat_hi
                    .get(vcpu as usize)
                    .map_or(0, |h| h.load(Ordering::Relaxed));
                let counter = (u64::from(hi) << 32) | (value & 0xffff_ffff);
                self.heartbeats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(Beat { counter, t_ns });
            }
            _ => {} // unknown ports are ignored, as on real hardware
        }
        None
    }

    /// A port read; fills `data`.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let v = serial.read((port - COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            // Pc: the i8042 status reads "output full, input empty". Linux's i8042 driver
            // then sees a stuck controller and gives up at once, and its reset path writes
            // 0xFE without first polling a busy controller tens of thousands of times.
            I8042_COMMAND if self.reset_port => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = 0x01;
                }
            }
            _ => data.fill(0xff), // floating bus
        }
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_reaches_sink() {
        let sink = Sink::default();
        let d = Devices::new(Box::new(sink.clone()), 1);
        for b in b"hi\n" {
            assert_eq!(d.port_write(0, COM1, &[*b]), None);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        d.port_read(COM1 + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn exit_port_is_qemu_compatible() {
        let d = Devices::new(Box::new(std::io::sink()), 1);
        assert_eq!(
            d.port_write(0, EXIT_PORT, &[0, 0, 0, 0]),
            Some(PortEffect::Exit(1))
        );
        assert_eq!(
            d.port_write(0, EXIT_PORT, &[3, 0, 0, 0]),
            Some(PortEffect::Exit(7))
        );
        // No reset line on the Minimal platform.
        assert_eq!(d.port_write(0, I8042_COMMAND, &[I8042_RESET]), None);
    }

    /// Pc-platform devices (1 vCPU, reset line) and the eventfd behind COM1's IRQ 4.
    fn pc_devices() -> (Devices, vmm_sys_util::eventfd::EventFd) {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = SerialIrq::EventFd(evt.try_clone().unwrap());
        (
            Devices::with_irq(Box::new(std::io::sink()), 1, irq, true),
            evt,
        )
    }

    #[test]
    fn reset_line_and_serial_irq_on_pc() {
        let (d, evt) = pc_devices();
        assert_eq!(
            d.port_write(0, I8042_COMMAND, &[I8042_RESET]),
            Some(PortEffect::Reset)
        );
        assert_eq!(d.port_write(0, I8042_COMMAND, &[0xaa]), None);
        // Enabling the THR-empty interrupt raises IRQ 4 at once (the THR is empty).
        assert_eq!(d.port_write(0, COM1 + 1, &[0x02]), None);
        assert!(evt.read().unwrap() >= 1);
        // Garbage in every UART register never fails.
        for r in 0..8u16 {
            for v in [0u8, 0x55, 0xaa, 0xff] {
                let _ = d.port_write(0, COM1 + r, &[v]);
                let mut b = [0u8; 4];
                d.port_read(COM1 + r, &mut b);
            }
        }
    }

    #[test]
    fn enabling_a_pending_uart_interrupt_raises_it() {
        let (d, evt) = pc_devices();
        // Linux's 8250 driver: THR-empty on, a byte out (IIR says "THR empty"), THR-empty off.
        d.port_write(0, COM1 + 1, &[0x02]);
        d.port_write(0, COM1, b"x");
        d.port_write(0, COM1 + 1, &[0x00]);
        // Whatever those raised is taken here.
        let _ = evt.read();
        // The edge for that byte was lost (a migration saved the LAPIC before it landed):
        // IIR still flags THR empty. The next line turns THR-empty on again: IRQ 4 must rise.
        d.port_write(0, COM1 + 1, &[0x02]);
        assert_eq!(
            evt.read().unwrap(),
            1,
            "re-enabling a pending THR-empty raised IRQ 4"
        );
        // Enabling nothing new, or with the divisor latch selected, raises nothing.
        d.port_write(0, COM1 + 1, &[0x02]);
        assert!(evt.read().is_err());
        d.port_write(0, COM1 + 1, &[0x00]);
        d.port_write(0, COM1 + 3, &[0x80]); // LCR.DLAB
        d.port_write(0, COM1 + 1, &[0x02]);
        assert!(evt.read().is_err(), "a divisor write is not an IER write");
        d.port_write(0, COM1 + 3, &[0x03]);
        // Data received while its interrupt was off: enabling it raises IRQ 4.
        let mut iir = [0u8];
        d.port_read(COM1 + 2, &mut iir); // the guest takes the pending THR-empty
        d.port_write(0, COM1 + 1, &[0x00]);
        d.console_input(b"a").unwrap();
        let _ = evt.read();
        d.port_write(0, COM1 + 1, &[0x01]);
        assert!(
            evt.read().unwrap() >= 1,
            "data waiting: enabling RX interrupts raised IRQ 4"
        );
    }

    #[test]
    fn console_input_reaches_the_guest_with_its_interrupt() {
        let (d, evt) = pc_devices();
        // The guest enables the data-received interrupt (IER bit 0), as Linux's 8250 driver.
        d.port_write(0, COM1 + 1, &[0x01]);
        d.console_input(b"check\n").unwrap();
        assert!(evt.read().unwrap() >= 1, "IRQ 4 raised");
        let mut got = Vec::new();
        loop {
            let mut lsr = [0u8];
            d.port_read(COM1 + 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break; // no more data ready
            }
            let mut b = [0u8];
            d.port_read(COM1, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"check\n");
        // All or nothing: a FIFO without room refuses and keeps what it holds.
        d.console_input(&[b'x'; UART_FIFO - 1]).unwrap();
        let err = d.console_input(b"ab").unwrap_err();
        assert!(matches!(err, DevicesError::ConsoleFull { len: 2, free: 1 }));
        assert!(err.to_string().contains("try again"));
        d.console_input(b"y").unwrap();
        assert_eq!(d.save_state().serial.in_buffer.len(), UART_FIFO);
    }

    #[test]
    fn largest_gap_counts_the_gap_into_the_window() {
        let t = [100, 200, 900, 1000, 1100, 3000];
        assert_eq!(largest_gap(t, 850, 1100), Some((700, 200)));
        assert_eq!(largest_gap(t, 950, 1100), Some((100, 900)));
        assert_eq!(largest_gap(t, 0, 100), None);
        assert_eq!(largest_gap(t, 0, u64::MAX), Some((1900, 1100)));
        let mut h = Heartbeats::default();
        for (i, t) in t.iter().enumerate() {
            h.record(Beat {
                counter: i as u64,
                t_ns: *t,
            });
        }
        assert_eq!(h.times_since(1000), [1000, 1100, 3000]);
        assert_eq!(
            h.first_since(950).map(|b| (b.counter, b.t_ns)),
            Some((3, 1000))
        );
        assert_eq!(h.first_since(3001), None);
        assert_eq!(h.largest_gap(150, 1000), Some((700, 200)));
    }

    #[test]
    fn heartbeats_combine_halves_and_ring_is_bounded() {
        let d = Devices::new(Box::new(std::io::sink()), 2);
        d.port_write(1, HEARTBEAT_HI, &1u32.to_le_bytes());
        d.port_write(1, HEARTBEAT_LO, &5u32.to_le_bytes());
        d.port_write(0, HEARTBEAT_LO, &6u32.to_le_bytes());
        let hb = d.heartbeats.lock().unwrap();
        let beats = hb.beats();
        assert_eq!(beats[0].counter, (1 << 32) | 5);
        assert_eq!(beats[1].counter, 6);
        assert!(beats[1].t_ns >= beats[0].t_ns);
        drop(hb);
        for i in 0..(HEARTBEAT_RING as u32 + 10) {
            d.port_write(0, HEARTBEAT_LO, &i.to_le_bytes());
        }
        let hb = d.heartbeats.lock().unwrap();
        assert_eq!(hb.beats().len(), HEARTBEAT_RING);
        assert_eq!(hb.total, HEARTBEAT_RING as u64 + 12);
    }
}
