//! blip guest: a tiny PVH unikernel used by blip's tests, benchmarks and demo.
//!
//! Built by `vmm/build.rs` with the stock host toolchain (`rustc` directly, host target,
//! `#![no_std]`, no libc, linker script `vmm/guest/link.ld`) into `blip-guest.elf`.
//! This doc is the guest ABI reference for the VMM.
//!
//! # Image
//!
//! ELF64 x86_64 executable, linked and loaded at guest-physical 1 MiB (virtual ==
//! physical), ending below 8 MiB. A PT_NOTE segment holds the PVH note (name `"Xen"`,
//! type 18 = XEN_ELFNOTE_PHYS32_ENTRY, desc = 32-bit physical entry address).
//!
//! # Boot flow
//!
//! Every vCPU (BSP and APs alike) starts at the PVH entry `pvh_start32`: 32-bit protected
//! mode, paging off, flat 4 GiB segments, EBX = guest-physical address of the PVH
//! `hvm_start_info`, interrupts off (there is no irqchip). The entry code:
//!
//! 1. reads its vCPU index from CPUID leaf 1 EBX[31:24] (initial APIC ID; 0 = BSP);
//!    indices >= 64 halt at once;
//! 2. loads CR3 with static page tables (assembled into `.data`: PML4 + PDPT + 4 PDs of
//!    2 MiB pages identity-mapping the first 4 GiB), sets CR4.PAE|OSFXSR|OSXMMEXCPT,
//!    EFER.LME, CR0.PG|MP (EM and TS clear), loads a 64-bit GDT and far-jumps to 64-bit code
//!    (no SSE code runs, see below);
//! 3. takes its own 32 KiB stack (`STACKS[cpu]`, in `.bss`) and calls
//!    `rust_main(start_info, cpu)`.
//!
//! # SSE
//!
//! On the kvm_pvm hosts we build on, the guest runs inside KVM's instruction emulator,
//! which cannot execute SSE arithmetic (`pxor`, `movd`, ...: "KVM internal error,
//! suberror 1, emulation failure"). The entry code still enables SSE (CR0.MP, CR4.OSFXSR),
//! but the crate is compiled with `-C target-feature=-sse,-sse2` (see `vmm/build.rs`) and
//! avoids `core::fmt` and other precompiled libcore code that uses SSE (the panic handler
//! prints only static messages). Keep it that way: after changes, `objdump -d` of the ELF
//! may show `xmm` only in `core::fmt` functions that never run.
//!
//! Nothing zeroes `.bss` at run time (guest RAM starts zeroed); no vCPU writes shared
//! state before it is needed, so the APs may start at the same moment as the BSP.
//!
//! # I/O ports
//!
//! | port  | width | direction | meaning |
//! |-------|-------|-----------|---------|
//! | 0x3f8 | 8     | out       | COM1 THR; the guest polls LSR (0x3fd) bit 5 once per byte. Lines end in `\n`; vCPUs serialise whole lines with a spinlock. |
//! | 0xf4  | 32    | out       | exit, as QEMU `isa-debug-exit,iobase=0xf4,iosize=4`: value v → exit code `(v << 1) \| 1`. |
//! | 0xfc  | 32    | out       | heartbeat counter, high 32 bits; written only when it differs from the last high half this vCPU wrote (initially 0), always before the low half. |
//! | 0xf8  | 32    | out       | heartbeat counter, low 32 bits; each write is one heartbeat. |
//!
//! Clean power-off (exit code 0): every vCPU ends in a `cli; hlt` loop; the VMM treats a
//! vCPU HLT as "this vCPU is done". Exit-port values: 2 = bad command line, 3 = working
//! set does not fit in RAM, 4 = check failed, 0x7f = guest panic.
//!
//! # Info page (VMM → guest) at guest-physical 0x5000
//!
//! | offset | type | field |
//! |--------|------|-------|
//! | 0x00   | u64  | magic `0x4f464e4950494c42` ("BLIPINFO") |
//! | 0x08   | u32  | nr_vcpus |
//! | 0x0c   | u32  | tsc_khz |
//! | 0x10   | u64  | command, written by the VMM at any time: 0 = none, 1 = stop workloads, run the check, report, exit |
//!
//! Without the magic (e.g. under QEMU): nr_vcpus = 1, tsc_khz from CPUID 0x40000010 EAX
//! when the hypervisor leaf range reaches it, else 1 000 000. nr_vcpus is clamped to
//! 1..=64. Only vCPUs with index < nr_vcpus work; the others halt at once. The BSP polls
//! the command word once per loop iteration.
//!
//! # Command line (PVH `cmdline_paddr`, space separated; empty = `hello`)
//!
//! * `hello` — the BSP prints `hello from blip guest`; with no other word all vCPUs then
//!   power off.
//! * `dirty ws=<MiB> rate=<pages/s per vCPU | max | full> [sweeps=<N>]` — working set of `ws` MiB
//!   at guest-physical 8 MiB (must lie inside RAM per the PVH memmap and below 4 GiB, else
//!   `error: working set does not fit in memory`, exit v=3). Its pages are split into
//!   nr_vcpus contiguous shares (the last takes the remainder). vCPU k sweeps its share
//!   forever, starting at generation 1. Writing page `gpa` with generation `g` stores
//!   (volatile, in this order) `u64 @0 = gpa ^ 0xB11BB11BB11BB11B`, `u64 @8 = g`,
//!   `u64 @4088 = mix(gpa, g)`, with `mix(a, g) = splitmix64(a ^ g * 0x9E3779B97F4A7C15)`
//!   (wrapping) and `splitmix64(x)`: `z = x + 0x9E3779B97F4A7C15;
//!   z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
//!   z ^ z >> 31`. Then it updates `PROGRESS[k] = {gen, idx}` (idx = next page index in
//!   the share; at the end of the share idx = 0, gen += 1). `rate` is paced with rdtsc
//!   deadlines. With `sweeps=N`, once every vCPU has completed N sweeps the check runs.
//!   `rate=full` dirties as fast as the hardware lets it: the vCPU writes its share in batches
//!   of up to 16 pages (never across the end of the share) with **one** store per page,
//!   `u64 @8 = g` (words @0 and @4088 stay zero, so such a page's words are `[0, g, 0]`), in a
//!   tight loop with no per-page bookkeeping; `PROGRESS[k]`, the exit conditions and the
//!   heartbeat are looked at once per batch. The check then expects `[0, G, 0]` / `[0, G-1, 0]`
//!   (generation 0 = all zero). Why: under this host's KVM each guest instruction costs about
//!   a microsecond, so `rate=max`'s per-page mix, rdtsc and progress stores hold it to ~20 k
//!   pages/s, far below what the VMM must keep up with. Measured here (loaded host, no
//!   tracking): ~90 µs per page for `rate=full` against ~340 µs for `rate=max`; 16 pages per
//!   batch keep a 1 ms heartbeat within about one period (64 made gaps of 6 ms and more).
//! * `heartbeat period=<µs> [via=serial]` — every period each working vCPU increments a
//!   shared counter (`lock xadd`) and writes the new value to the heartbeat ports; with
//!   `via=serial` it writes one `*` byte to COM1 instead (for VMMs without the heartbeat port,
//!   e.g. QEMU in the benchmark: the host timestamps the bytes).
//! * `scatter ws=<MiB> seed=<n>` — each vCPU writes pseudo-random pages of its share of the
//!   working set (at 8 MiB) as fast as it can: write c (c = 1, 2, ...) of vCPU k stores c at
//!   offset 16 of page `first_k + splitmix64(seed ^ (k << 56) ^ c) % count_k`, then stores c at
//!   info page + 0x100 + 8k. The VMM's dirty-tracking tests recompute the written pages from it.
//! * `crash` — the BSP executes `ud2` with no IDT: a triple fault (blip must report it).
//! * `check` — run the check at once (at boot, memory all zero: it succeeds).
//!
//! Workloads combine; every working vCPU runs all of them interleaved in one loop. Options
//! belong to the workload word before them. An unknown word, bad value, repeated word or
//! missing option makes the BSP print `error: bad command line: <word>` and exit with v=2.
//!
//! # Check
//!
//! The BSP sets STOP; each AP finishes its current page and progress update, increments
//! STOPPED and halts. The BSP waits for all APs, prints `check: vcpu K gen G idx I` per
//! vCPU, then verifies every page of every share: pages before idx carry generation G,
//! the rest G-1 (generation 0 = all three words zero). Result: `check: ok pages=<n>
//! checksum=<16 hex>` (FNV-1a 64 over the little-endian bytes of word@0, word@8,
//! word@4088 of each page in address order) and power-off, or `check: FAILED vcpu K page
//! gpa=0x... expected gen G found <word@8>` and exit v=4.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::panic::PanicInfo;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Most vCPUs the guest supports (stacks and progress records are static).
const MAX_CPUS: usize = 64;
/// Stack size per vCPU.
const STACK_SIZE: usize = 32 * 1024;
const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Guest-physical address of the VMM's info page.
const INFO_PAGE: u64 = 0x5000;
const INFO_MAGIC: u64 = 0x4f46_4e49_5049_4c42;
const CMD_STOP_AND_CHECK: u64 = 1;

/// PVH `hvm_start_info` magic.
const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// The `dirty` working set starts at 8 MiB.
const WS_BASE: u64 = 8 * MIB;
const WORD0_TAG: u64 = 0xB11B_B11B_B11B_B11B;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
const EXIT_PORT: u16 = 0xf4;
const HEARTBEAT_LO: u16 = 0xf8;
const HEARTBEAT_HI: u16 = 0xfc;

const EXIT_BAD_CMDLINE: u32 = 2;
const EXIT_NO_FIT: u32 = 3;
const EXIT_CHECK_FAILED: u32 = 4;
const EXIT_PANIC: u32 = 0x7f;

// ---------------------------------------------------------------------------------------
// Boot: PVH note, 32-bit entry, static page tables, GDT, switch to long mode.
// ---------------------------------------------------------------------------------------

global_asm!(
    r#"
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4                      /* namesz */
    .long 4                      /* descsz */
    .long 18                     /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    .pushsection .text.pvh_start, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %edi               /* edi = start_info (cpuid clobbers ebx) */
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %ebx, %esi               /* esi = vCPU index (initial APIC ID) */
    cmp ${max_cpus}, %esi
    jae 9f

    mov $blip_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax              /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xC0000080, %ecx        /* EFER */
    rdmsr
    or $0x100, %eax              /* LME */
    wrmsr
    mov %cr0, %eax
    and $0xFFFFFFF3, %eax        /* clear EM, TS */
    or $0x80000003, %eax         /* PG | MP | PE */
    mov %eax, %cr0
    lgdt blip_gdt_ptr
    ljmp $0x08, $blip_start64

9:  cli
    hlt
    jmp 9b

    .code64
blip_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov %edi, %edi               /* zero-extend start_info */
    mov %esi, %esi               /* zero-extend vCPU index */
    lea 1(%rsi), %rax
    imul ${stack_size}, %rax, %rax
    lea {stacks}(%rax), %rsp     /* top of STACKS[cpu] */
    xor %ebp, %ebp
    call {rust_main}
    ud2
    .popsection

    .pushsection .data.pagetables, "aw", @progbits
    .balign 4096
blip_pml4:
    .quad blip_pdpt + 0x3
    .fill 511, 8, 0
blip_pdpt:
    .quad blip_pd + 0x0003
    .quad blip_pd + 0x1003
    .quad blip_pd + 0x2003
    .quad blip_pd + 0x3003
    .fill 508, 8, 0
blip_pd:                         /* 2048 x 2 MiB pages: present | writable | PS */
    .set blip_i, 0
    .rept 2048
    .quad (blip_i << 21) | 0x83
    .set blip_i, blip_i + 1
    .endr

    .balign 16
blip_gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
blip_gdt_end:
blip_gdt_ptr:
    .word blip_gdt_end - blip_gdt - 1
    .long blip_gdt
    .popsection
    "#,
    max_cpus = const MAX_CPUS,
    stack_size = const STACK_SIZE,
    stacks = sym STACKS,
    rust_main = sym rust_main,
    options(att_syntax)
);

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// Per-vCPU stacks; only touched by the entry code (through `sym`) and the stack pointer.
static mut STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

// ---------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------

/// A u64 in shared memory accessed only with volatile loads and stores (aligned, so each
/// access is single-copy atomic on x86-64).
#[repr(transparent)]
struct VolatileU64(UnsafeCell<u64>);

// SAFETY: all accesses are aligned volatile loads/stores of a u64, which are atomic on
// x86-64; cross-vCPU ordering is provided by the atomics (STOP/STOPPED) around them.
unsafe impl Sync for VolatileU64 {}

impl VolatileU64 {
    const fn new(v: u64) -> Self {
        Self(UnsafeCell::new(v))
    }
    fn get(&self) -> u64 {
        // SAFETY: the pointer comes from a live UnsafeCell and is aligned.
        unsafe { read_volatile(self.0.get()) }
    }
    fn set(&self, v: u64) {
        // SAFETY: as in `get`.
        unsafe { write_volatile(self.0.get(), v) }
    }
}

/// Progress of one vCPU's `dirty` sweep: generation being written, next page index.
#[repr(C)]
struct Progress {
    gen: VolatileU64,
    idx: VolatileU64,
}

/// Starts at {gen 1, idx 0} (in `.data`), so a check before any write expects all-zero pages.
static PROGRESS: [Progress; MAX_CPUS] =
    [const { Progress { gen: VolatileU64::new(1), idx: VolatileU64::new(0) } }; MAX_CPUS];

/// Set by the BSP: APs stop after their current page.
static STOP: AtomicBool = AtomicBool::new(false);
/// Number of APs that stopped for the check.
static STOPPED: AtomicU32 = AtomicU32::new(0);
/// Number of vCPUs that completed `sweeps=N`.
static SWEEPS_DONE: AtomicU32 = AtomicU32::new(0);
/// Shared heartbeat counter.
static HEARTBEAT: AtomicU64 = AtomicU64::new(0);
/// Serial spinlock: whole lines are written under it.
static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------------------
// Port I/O, CPU helpers
// ---------------------------------------------------------------------------------------

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to devices the VMM emulates; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects besides reading the TSC.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid(leaf)
}

/// Clean power-off of this vCPU: blip counts it as done; the VM exits 0 when all are.
fn halt() -> ! {
    loop {
        // SAFETY: stops this vCPU; interrupts are off so it never wakes up.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Exit the whole VM through the debug-exit port with value `v` (code `(v << 1) | 1`).
fn exit(v: u32) -> ! {
    outl(EXIT_PORT, v);
    halt()
}

// ---------------------------------------------------------------------------------------
// Serial console
// ---------------------------------------------------------------------------------------

struct Serial;

impl Serial {
    fn put(b: u8) {
        while inb(COM1_LSR) & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

/// One piece of an output line (the guest avoids `core::fmt`: see "SSE" in the module doc).
enum Arg<'a> {
    /// Raw bytes; non-printable ones are shown as `?`.
    S(&'a [u8]),
    /// Unsigned decimal.
    D(u64),
    /// 16 hex digits, zero padded.
    H16(u64),
    /// `0x` and minimal hex digits.
    X(u64),
}

fn put_bytes(s: &[u8]) {
    for &b in s {
        Serial::put(if b.is_ascii_graphic() || b == b' ' { b } else { b'?' });
    }
}

fn put_hex(v: u64, min_digits: u32) {
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(min_digits);
    for i in (0..digits).rev() {
        Serial::put(b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize]);
    }
}

fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put_bytes(&buf[i..]);
}

fn put_args(parts: &[Arg<'_>]) {
    for part in parts {
        match *part {
            Arg::S(s) => put_bytes(s),
            Arg::D(v) => put_dec(v),
            Arg::H16(v) => put_hex(v, 16),
            Arg::X(v) => {
                put_bytes(b"0x");
                put_hex(v, 1);
            }
        }
    }
    Serial::put(b'\n');
}

/// Print one line atomically with respect to other vCPUs.
fn println(parts: &[Arg<'_>]) {
    let _guard = SerialGuard::lock();
    put_args(parts);
}

/// Holds the serial lock; released on drop.
struct SerialGuard {
    locked: bool,
}

impl SerialGuard {
    fn lock() -> Self {
        while SERIAL_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        SerialGuard { locked: true }
    }

    /// For the panic path: give up waiting after a while (the lock may be ours).
    fn lock_or_steal() -> Self {
        for _ in 0..100_000 {
            if SERIAL_LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return SerialGuard { locked: true };
            }
            core::hint::spin_loop();
        }
        SerialGuard { locked: false }
    }
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        if self.locked {
            SERIAL_LOCK.store(false, Ordering::Release);
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    {
        let _guard = SerialGuard::lock_or_steal();
        let msg = info.message().as_str().unwrap_or("(formatted message)");
        match info.location() {
            Some(l) => put_args(&[
                Arg::S(b"panic: "),
                Arg::S(msg.as_bytes()),
                Arg::S(b" at "),
                Arg::S(l.file().as_bytes()),
                Arg::S(b":"),
                Arg::D(l.line() as u64),
            ]),
            None => put_args(&[Arg::S(b"panic: "), Arg::S(msg.as_bytes())]),
        }
    }
    exit(EXIT_PANIC)
}

// ---------------------------------------------------------------------------------------
// libc memory functions the compiler may call
// ---------------------------------------------------------------------------------------

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap; DF is clear.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        unsafe { memcpy(dst, src, n) }
    } else if n > 0 {
        // SAFETY: overlapping with dst above src: copy backwards from the last byte, then
        // restore DF = 0 as the ABI requires.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack));
        }
        dst
    } else {
        dst
    }
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes. Volatile reads
        // keep the compiler from turning this loop back into a memcmp call.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled libcore (built with unwinding for the host target) references the
/// personality routine from its unwind tables; with `panic=abort` it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

// ---------------------------------------------------------------------------------------
// Machine description: PVH start info + blip info page
// ---------------------------------------------------------------------------------------

/// One PVH memory map entry.
#[derive(Clone, Copy)]
#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    _reserved: u32,
}

struct Machine {
    nr_vcpus: u32,
    tsc_khz: u64,
    /// The blip info page is present (so the command word may be polled).
    info_page: bool,
    cmdline: &'static [u8],
    memmap: &'static [MemmapEntry],
}

/// Reads `T` from guest-physical `addr` (identity mapped).
///
/// # Safety
/// `addr` must be mapped, suitably aligned RAM.
unsafe fn phys_read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { read_volatile(addr as *const T) }
}

impl Machine {
    fn probe(start_info: u64) -> Machine {
        let mut cmdline: &'static [u8] = &[];
        let mut memmap: &'static [MemmapEntry] = &[];
        // SAFETY: the VMM passes the address of a valid hvm_start_info in EBX (below 4 GiB,
        // identity mapped); fields are only trusted after the magic matches.
        unsafe {
            if start_info != 0 && phys_read::<u32>(start_info) == PVH_MAGIC {
                let version: u32 = phys_read(start_info + 4);
                let cmdline_paddr: u64 = phys_read(start_info + 24);
                if cmdline_paddr != 0 && cmdline_paddr < 1 << 32 {
                    let p = cmdline_paddr as *const u8;
                    let mut len = 0;
                    while len < 4096 && read_volatile(p.add(len)) != 0 {
                        len += 1;
                    }
                    cmdline = core::slice::from_raw_parts(p, len);
                }
                if version >= 1 {
                    let memmap_paddr: u64 = phys_read(start_info + 40);
                    let entries: u32 = phys_read(start_info + 48);
                    if memmap_paddr != 0 && memmap_paddr < 1 << 32 && memmap_paddr % 8 == 0 {
                        memmap = core::slice::from_raw_parts(
                            memmap_paddr as *const MemmapEntry,
                            entries.min(128) as usize,
                        );
                    }
                }
            }
        }

        // SAFETY: the info page address is low RAM, mapped and aligned.
        let magic: u64 = unsafe { phys_read(INFO_PAGE) };
        let (nr_vcpus, tsc_khz, info_page) = if magic == INFO_MAGIC {
            // SAFETY: as above; the VMM filled the page.
            let (n, khz) = unsafe { (phys_read::<u32>(INFO_PAGE + 8), phys_read::<u32>(INFO_PAGE + 12)) };
            let khz = if khz == 0 { tsc_khz_from_cpuid() } else { khz as u64 };
            (n.clamp(1, MAX_CPUS as u32), khz, true)
        } else {
            (1, tsc_khz_from_cpuid(), false)
        };
        Machine { nr_vcpus, tsc_khz, info_page, cmdline, memmap }
    }

    /// The command word of the info page (0 without an info page).
    fn command(&self) -> u64 {
        if !self.info_page {
            return 0;
        }
        // SAFETY: the info page is mapped, aligned RAM the VMM may write at any time.
        unsafe { phys_read(INFO_PAGE + 0x10) }
    }

    /// Whether [start, end) lies in RAM according to the memory map (and below 4 GiB,
    /// the end of our identity mapping). Without a memory map, assume it does.
    fn ram_covers(&self, start: u64, end: u64) -> bool {
        if end > 1 << 32 || end < start {
            return false;
        }
        if self.memmap.is_empty() {
            return true;
        }
        let mut cur = start;
        'outer: while cur < end {
            for e in self.memmap {
                let e_end = e.addr.saturating_add(e.size);
                if e.kind == E820_RAM && e.addr <= cur && cur < e_end {
                    cur = e_end;
                    continue 'outer;
                }
            }
            return false;
        }
        true
    }
}

fn tsc_khz_from_cpuid() -> u64 {
    if cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).eax;
        if khz != 0 {
            return khz as u64;
        }
    }
    1_000_000
}

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct DirtyCfg {
    ws_mib: u64,
    /// Pages per second per vCPU; None = as fast as possible.
    rate: Option<u64>,
    /// `rate=full`: one store per page in batches (see the module doc).
    full: bool,
    sweeps: Option<u64>,
}

#[derive(Clone, Copy, Default)]
struct Config {
    hello: bool,
    /// `crash`: the BSP executes `ud2` with no IDT loaded, a triple fault (tests use it).
    crash: bool,
    check: bool,
    dirty: Option<DirtyCfg>,
    /// Heartbeat period in µs.
    heartbeat: Option<u64>,
    /// `heartbeat ... via=serial`: beats are `*` bytes on COM1 instead of port writes.
    heartbeat_serial: bool,
    /// `scatter ws=<MiB> seed=<n>`: (working set MiB, seed).
    scatter: Option<(u64, u64)>,
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        if c.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add((c - b'0') as u64)
        } else {
            None
        }
    })
}

/// Parses the command line; on error returns the offending word.
fn parse_cmdline(cmdline: &[u8]) -> Result<Config, &[u8]> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Dirty,
        Heartbeat,
        Scatter,
    }
    let mut cfg = Config::default();
    let mut section = Section::None;
    // Options seen so far (`rate`: Some(None) = max or full).
    let (mut ws, mut rate, mut sweeps, mut period) = (None, None, None, None);
    let mut full = false;
    let (mut scatter_ws, mut seed) = (None, None);
    let mut any = false;

    for word in cmdline.split(|c| c.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        any = true;
        if let Some(eq) = word.iter().position(|&c| c == b'=') {
            let (key, val) = (&word[..eq], &word[eq + 1..]);
            let positive = parse_u64(val).filter(|&v| v > 0);
            match (&section, key) {
                (Section::Dirty, b"ws") if ws.is_none() => {
                    ws = Some(positive.filter(|&v| v <= 1 << 20).ok_or(word)?);
                }
                (Section::Dirty, b"rate") if rate.is_none() => {
                    full = val == b"full";
                    rate = Some(if val == b"max" || full { None } else { Some(positive.ok_or(word)?) });
                }
                (Section::Dirty, b"sweeps") if sweeps.is_none() => sweeps = Some(positive.ok_or(word)?),
                (Section::Scatter, b"ws") if scatter_ws.is_none() => {
                    scatter_ws = Some(positive.filter(|&v| v <= 1 << 20).ok_or(word)?);
                }
                (Section::Scatter, b"seed") if seed.is_none() => seed = Some(parse_u64(val).ok_or(word)?),
                (Section::Heartbeat, b"via") if !cfg.heartbeat_serial && val == b"serial" => {
                    cfg.heartbeat_serial = true;
                }
                (Section::Heartbeat, b"period") if period.is_none() => {
                    period = Some(positive.filter(|&v| v <= 1 << 40).ok_or(word)?);
                }
                _ => return Err(word),
            }
            continue;
        }
        match word {
            b"hello" if !cfg.hello => {
                cfg.hello = true;
                section = Section::None;
            }
            b"crash" if !cfg.crash => {
                cfg.crash = true;
                section = Section::None;
            }
            b"check" if !cfg.check => {
                cfg.check = true;
                section = Section::None;
            }
            b"dirty" if cfg.dirty.is_none() => {
                section = Section::Dirty;
                // Placeholder marking `dirty` as seen; filled in below.
                cfg.dirty = Some(DirtyCfg { ws_mib: 0, rate: None, full: false, sweeps: None });
            }
            b"scatter" if cfg.scatter.is_none() => {
                section = Section::Scatter;
                cfg.scatter = Some((0, 0));
            }
            b"heartbeat" if cfg.heartbeat.is_none() => {
                section = Section::Heartbeat;
                cfg.heartbeat = Some(0);
            }
            _ => return Err(word),
        }
    }

    if cfg.dirty.is_some() {
        let (Some(ws_mib), Some(rate)) = (ws, rate) else { return Err(b"dirty") };
        cfg.dirty = Some(DirtyCfg { ws_mib, rate, full, sweeps });
    }
    if cfg.heartbeat.is_some() {
        cfg.heartbeat = Some(period.ok_or(&b"heartbeat"[..])?);
    }
    if cfg.scatter.is_some() {
        let (Some(w), Some(sd)) = (scatter_ws, seed) else { return Err(b"scatter") };
        cfg.scatter = Some((w, sd));
    }
    if !any {
        cfg.hello = true;
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------

/// Where vCPU k publishes its scatter counter: info page + 0x100 + 8k.
const SCATTER_COUNTERS: u64 = INFO_PAGE + 0x100;

fn scatter_counter(cpu: u64) -> u64 {
    // SAFETY: the info page is guest RAM below the image, identity-mapped; volatile read.
    unsafe { ((SCATTER_COUNTERS + 8 * cpu) as *const u64).read_volatile() }
}

/// `scatter`: each vCPU writes pseudo-random pages of its share, publishing a counter after
/// every write, so the VMM can recompute exactly which pages were written between two pauses:
/// write number c (c = 1, 2, ...) of vCPU k goes to page
/// `first_k + splitmix64(seed ^ (k << 56) ^ c) % count_k` (u64 at offset 16 := c), and only then
/// is the counter at info page + 0x100 + 8k set to c. Used by the dirty-tracking tests.
struct ScatterState {
    cpu: u64,
    first: u64,
    count: u64,
    seed: u64,
    counter: u64,
}

impl ScatterState {
    fn step(&mut self) {
        if self.count == 0 {
            return;
        }
        let c = self.counter + 1;
        let page = self.first + splitmix64(self.seed ^ (self.cpu << 56) ^ c) % self.count;
        let gpa = WS_BASE + page * PAGE_SIZE;
        // SAFETY: gpa lies in this vCPU's share of the working set, checked to be inside RAM
        // and identity-mapped; the counter slot is in the info page. Volatile: the VMM reads.
        unsafe {
            ((gpa + 16) as *mut u64).write_volatile(c);
            ((SCATTER_COUNTERS + 8 * self.cpu) as *mut u64).write_volatile(c);
        }
        self.counter = c;
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(gpa: u64, gen: u64) -> u64 {
    splitmix64(gpa ^ gen.wrapping_mul(GOLDEN))
}

/// The three words a page at `gpa` holds after being written with generation `gen`
/// (`full`: by `rate=full`, which stores only the generation).
fn page_words(gpa: u64, gen: u64, full: bool) -> [u64; 3] {
    if gen == 0 {
        [0; 3]
    } else if full {
        [0, gen, 0]
    } else {
        [gpa ^ WORD0_TAG, gen, mix(gpa, gen)]
    }
}

/// Pages `rate=full` writes between two looks at its progress, exit conditions and heartbeat.
const FULL_BATCH: u64 = 16;

/// Page range [first, first + count) of vCPU `k`'s share, as page indices from WS_BASE.
fn share(total_pages: u64, nr_vcpus: u32, k: u32) -> (u64, u64) {
    let per = total_pages / nr_vcpus as u64;
    let first = per * k as u64;
    let count = if k + 1 == nr_vcpus { total_pages - first } else { per };
    (first, count)
}

fn write_page(gpa: u64, gen: u64) {
    let p = gpa as *mut u64;
    let [w0, w1, w2] = page_words(gpa, gen, false);
    // SAFETY: gpa is a page of the working set, checked to be RAM inside the identity
    // mapping and above the guest image; only this vCPU writes it.
    unsafe {
        write_volatile(p, w0);
        write_volatile(p.add(1), w1);
        write_volatile(p.add(511), w2);
    }
}

fn read_page(gpa: u64) -> [u64; 3] {
    let p = gpa as *const u64;
    // SAFETY: as in `write_page`; all writers have stopped.
    unsafe { [read_volatile(p), read_volatile(p.add(1)), read_volatile(p.add(511))] }
}

/// Deadline pacing with rdtsc: due when the deadline passed; no burst catch-up after a
/// long pause (e.g. a migration blackout).
struct Pacer {
    period: u64,
    next: u64,
}

impl Pacer {
    fn new(period: u64, now: u64) -> Self {
        Pacer { period, next: now }
    }
    fn due(&mut self, now: u64) -> bool {
        if now < self.next {
            return false;
        }
        self.next = if now - self.next >= self.period { now + self.period } else { self.next + self.period };
        true
    }
}

struct DirtyState {
    cpu: usize,
    first: u64,
    count: u64,
    gen: u64,
    idx: u64,
    sweeps_left: Option<u64>,
    pacer: Option<Pacer>,
    full: bool,
}

impl DirtyState {
    /// `rate=full`: writes up to [`FULL_BATCH`] pages (not past the end of the share), one
    /// store each, then records progress once; returns true when a sweep just completed.
    fn step_full(&mut self) -> bool {
        let n = FULL_BATCH.min(self.count - self.idx);
        let mut p = (WS_BASE + (self.first + self.idx) * PAGE_SIZE + 8) as *mut u64;
        let gen = self.gen;
        for _ in 0..n {
            // SAFETY: p is word 1 of a page of this vCPU's share of the working set, checked
            // to be RAM inside the identity mapping and above the guest image; only this vCPU
            // writes it. The loop stays inside the share (n <= count - idx).
            unsafe {
                write_volatile(p, gen);
                p = p.add(PAGE_SIZE as usize / 8);
            }
        }
        self.idx += n;
        let wrapped = self.idx == self.count;
        if wrapped {
            self.idx = 0;
            self.gen += 1;
        }
        let pr = &PROGRESS[self.cpu];
        pr.idx.set(self.idx);
        pr.gen.set(self.gen);
        wrapped
    }

    /// Write the next page, record progress; returns true when a sweep just completed.
    fn step(&mut self) -> bool {
        let gpa = WS_BASE + (self.first + self.idx) * PAGE_SIZE;
        write_page(gpa, self.gen);
        self.idx += 1;
        let wrapped = self.idx == self.count;
        if wrapped {
            self.idx = 0;
            self.gen += 1;
        }
        let p = &PROGRESS[self.cpu];
        p.idx.set(self.idx);
        p.gen.set(self.gen);
        wrapped
    }
}

struct HeartbeatState {
    pacer: Pacer,
    last_high: u32,
    serial: bool,
}

impl HeartbeatState {
    fn beat(&mut self) {
        let v = HEARTBEAT.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if self.serial {
            // One byte per beat on COM1, for VMMs without blip's heartbeat port (QEMU): the
            // host timestamps each `*` as it reads the serial line.
            let _guard = SerialGuard::lock();
            Serial::put(b'*');
            return;
        }
        let high = (v >> 32) as u32;
        if high != self.last_high {
            outl(HEARTBEAT_HI, high);
            self.last_high = high;
        }
        outl(HEARTBEAT_LO, v as u32);
    }
}

fn fnv1a(mut h: u64, word: u64) -> u64 {
    for b in word.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// BSP only, after every AP stopped: verify and report, then power off or exit v=4.
fn run_check(m: &Machine, cfg: &Config) -> ! {
    let n = m.nr_vcpus;
    for k in 0..n as usize {
        println(&[
            Arg::S(b"check: vcpu "),
            Arg::D(k as u64),
            Arg::S(b" gen "),
            Arg::D(PROGRESS[k].gen.get()),
            Arg::S(b" idx "),
            Arg::D(PROGRESS[k].idx.get()),
        ]);
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut pages = 0;
    if let Some(d) = cfg.dirty {
        let total = d.ws_mib * MIB / PAGE_SIZE;
        for k in 0..n {
            let (first, count) = share(total, n, k);
            let (gen, idx) = (PROGRESS[k as usize].gen.get(), PROGRESS[k as usize].idx.get());
            if gen == 0 || idx >= count {
                println(&[
                    Arg::S(b"check: FAILED vcpu "),
                    Arg::D(k as u64),
                    Arg::S(b" bad progress gen "),
                    Arg::D(gen),
                    Arg::S(b" idx "),
                    Arg::D(idx),
                ]);
                exit(EXIT_CHECK_FAILED);
            }
            for j in 0..count {
                let gpa = WS_BASE + (first + j) * PAGE_SIZE;
                let expected = if j < idx { gen } else { gen - 1 };
                let found = read_page(gpa);
                if found != page_words(gpa, expected, d.full) {
                    println(&[
                        Arg::S(b"check: FAILED vcpu "),
                        Arg::D(k as u64),
                        Arg::S(b" page gpa="),
                        Arg::X(gpa),
                        Arg::S(b" expected gen "),
                        Arg::D(expected),
                        Arg::S(b" found "),
                        Arg::D(found[1]),
                    ]);
                    exit(EXIT_CHECK_FAILED);
                }
                hash = found.iter().fold(hash, |h, &w| fnv1a(h, w));
            }
        }
        pages = total;
    }
    println(&[Arg::S(b"check: ok pages="), Arg::D(pages), Arg::S(b" checksum="), Arg::H16(hash)]);
    halt()
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

extern "C" fn rust_main(start_info: u64, cpu: u32) -> ! {
    let m = Machine::probe(start_info);
    if cpu >= m.nr_vcpus {
        halt();
    }
    let bsp = cpu == 0;

    let cfg = match parse_cmdline(m.cmdline) {
        Ok(cfg) => cfg,
        Err(word) if bsp => {
            println(&[Arg::S(b"error: bad command line: "), Arg::S(word)]);
            exit(EXIT_BAD_CMDLINE)
        }
        Err(_) => halt(),
    };

    if cfg.hello && bsp {
        println(&[Arg::S(b"hello from blip guest")]);
    }
    if cfg.crash && bsp {
        // SAFETY: deliberately raises #UD; with no IDT this escalates to a triple fault, which
        // is the point of the `crash` workload.
        unsafe { core::arch::asm!("ud2", options(noreturn)) };
    }
    if cfg.dirty.is_none() && cfg.heartbeat.is_none() && cfg.scatter.is_none() && !cfg.check {
        halt();
    }

    let now = rdtsc();
    let mut dirty = match cfg.dirty {
        Some(d) => {
            let total = d.ws_mib * MIB / PAGE_SIZE;
            if !m.ram_covers(WS_BASE, WS_BASE + total * PAGE_SIZE) {
                if bsp {
                    println(&[Arg::S(b"error: working set does not fit in memory")]);
                    exit(EXIT_NO_FIT);
                }
                halt();
            }
            let (first, count) = share(total, m.nr_vcpus, cpu);
            let p = &PROGRESS[cpu as usize];
            Some(DirtyState {
                cpu: cpu as usize,
                first,
                count,
                gen: p.gen.get(),
                idx: p.idx.get(),
                sweeps_left: d.sweeps,
                pacer: d.rate.map(|r| Pacer::new(m.tsc_khz * 1000 / r, now)),
                full: d.full,
            })
        }
        None => None,
    };
    let mut scatter = match cfg.scatter {
        Some((ws_mib, seed)) => {
            let total = ws_mib * MIB / PAGE_SIZE;
            if !m.ram_covers(WS_BASE, WS_BASE + total * PAGE_SIZE) {
                if bsp {
                    println(&[Arg::S(b"error: working set does not fit in memory")]);
                    exit(EXIT_NO_FIT);
                }
                halt();
            }
            let (first, count) = share(total, m.nr_vcpus, cpu);
            Some(ScatterState { cpu: cpu as u64, first, count, seed, counter: scatter_counter(cpu as u64) })
        }
        None => None,
    };
    let mut heartbeat = cfg.heartbeat.map(|us| HeartbeatState {
        pacer: Pacer::new(us.saturating_mul(m.tsc_khz) / 1000, now),
        last_high: 0,
        serial: cfg.heartbeat_serial,
    });

    if bsp && cfg.check {
        STOP.store(true, Ordering::Release);
    }

    loop {
        if bsp {
            if STOP.load(Ordering::Relaxed)
                || m.command() == CMD_STOP_AND_CHECK
                || SWEEPS_DONE.load(Ordering::Acquire) == m.nr_vcpus
            {
                break;
            }
        } else if STOP.load(Ordering::Acquire) {
            break;
        }
        if let Some(d) = dirty.as_mut().filter(|d| d.full && d.sweeps_left != Some(0)) {
            if d.step_full() {
                if let Some(left) = d.sweeps_left.as_mut() {
                    *left -= 1;
                    if *left == 0 {
                        SWEEPS_DONE.fetch_add(1, Ordering::Release);
                    }
                }
            }
        }
        let now = rdtsc();
        if let Some(d) = dirty.as_mut().filter(|d| !d.full) {
            if d.sweeps_left != Some(0) && d.pacer.as_mut().is_none_or(|p| p.due(now)) && d.step() {
                if let Some(left) = d.sweeps_left.as_mut() {
                    *left -= 1;
                    if *left == 0 {
                        SWEEPS_DONE.fetch_add(1, Ordering::Release);
                    }
                }
            }
        }
        if let Some(sc) = scatter.as_mut() {
            sc.step();
        }
        if let Some(h) = heartbeat.as_mut() {
            if h.pacer.due(now) {
                h.beat();
            }
        }
    }

    if !bsp {
        STOPPED.fetch_add(1, Ordering::Release);
        halt();
    }
    STOP.store(true, Ordering::Release);
    while STOPPED.load(Ordering::Acquire) != m.nr_vcpus - 1 {
        core::hint::spin_loop();
    }
    run_check(&m, &cfg)
}
