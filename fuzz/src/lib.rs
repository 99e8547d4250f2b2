//! Helpers shared by blip's fuzz targets.
//!
//! [`LargestAlloc`] is the global allocator of every target: it forwards to the system
//! allocator and remembers the largest single allocation (or reallocation) made since the last
//! [`largest_alloc_reset`], so targets can assert that a decoder's allocations stay proportional
//! to the bytes it was actually given, which libFuzzer's `-rss_limit_mb` cannot see (a large
//! `Vec::with_capacity` is never touched, so it does not show up in RSS).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use blip_vmm::devices::{DevicesState, SerialRegs};
use blip_vmm::persist::{
    ClockState, FpuState, VcpuState, VmState, PIECE_CLOCK, PIECE_IRQCHIP, PIECE_LAPIC, PIECE_PIT,
    PIECE_TSC_KHZ, PIECE_VCPU_EVENTS, PIECE_XSAVE,
};
use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, kvm_sregs, kvm_vcpu_events};

/// Counting wrapper around [`System`].
pub struct LargestAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// extra work is an atomic max on a counter, which neither allocates nor touches the memory.
unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: LargestAlloc = LargestAlloc;

/// Forgets the largest allocation seen so far.
pub fn largest_alloc_reset() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// Size in bytes of the largest single allocation since the last reset.
pub fn largest_alloc() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// A little-endian reader over the fuzz input that yields zeros once the input runs out.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A small, valid two-vCPU [`VmState`] built by hand (the `state_envelope` target mutates its
/// encoding; `gen_seeds` writes it to the corpus).
pub fn sample_state() -> VmState {
    let vcpu = |index: u8| VcpuState {
        index,
        pieces: PIECE_XSAVE | PIECE_TSC_KHZ | PIECE_VCPU_EVENTS | PIECE_LAPIC,
        cpuid: vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ebx: 0x6874_7541,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x00a2_0f12,
                ..Default::default()
            },
        ],
        regs: kvm_regs {
            rip: 0x10_0000,
            rsp: 0x8000,
            rflags: 2,
            ..Default::default()
        },
        sregs: kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        },
        fpu: FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        msrs: vec![(0x10, 99), (0xc000_0080, 0x500), (0x174, 0)],
        xsave: Some(vec![0; 16]),
        xcrs: None,
        events: Some(kvm_vcpu_events::default()),
        mp_state: 0,
        debugregs: None,
        tsc_khz: Some(2_000_000),
        lapic: Some(kvm_bindings::kvm_lapic_state::default()),
    };
    VmState {
        mem_size: 32 << 20,
        pieces: PIECE_XSAVE
            | PIECE_TSC_KHZ
            | PIECE_VCPU_EVENTS
            | PIECE_CLOCK
            | PIECE_LAPIC
            | PIECE_IRQCHIP
            | PIECE_PIT,
        vcpus: vec![vcpu(0), vcpu(1)],
        clock: Some(ClockState {
            clock: 123_456,
            flags: 2,
            realtime: 0,
            host_tsc: 0,
        }),
        irqchip: Some(blip_vmm::platform_state::IrqchipState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
        }),
        pit: Some(Default::default()),
        saved_at_ns: 1,
        devices: DevicesState {
            serial: SerialRegs {
                line_status: 0x60,
                in_buffer: vec![b'o', b'k'],
                ..Default::default()
            },
            heartbeat_hi: vec![0, 1],
        },
    }
}

