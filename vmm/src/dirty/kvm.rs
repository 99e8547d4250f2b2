//! The unsafe edge of dirty tracking: KVM's per-vCPU dirty ring (mmap'ed from the vCPU fd) and
//! the two ioctls kvm-ioctls 0.25 does not wrap (`KVM_RESET_DIRTY_RINGS`, `KVM_CLEAR_DIRTY_LOG`).
//!
//! Ring protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"): KVM pushes
//! `kvm_dirty_gfn {flags, slot, offset}` entries with `flags = DIRTY`; userspace reads entries in
//! order from its own fetch index, loading `flags` with acquire ordering, and hands each back by
//! storing `flags | RESET` with release ordering; `KVM_RESET_DIRTY_RINGS` then lets KVM reuse
//! them (and re-protect the pages). Only one harvester may walk a ring at a time: a tiny
//! per-ring guard flag serialises the collector thread with a vCPU thread draining its own ring
//! after a ring-full exit. Nothing else on this path takes a lock.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::VmFd;

const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// `_IO(KVMIO, 0xc7)`
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

/// Errors of the raw KVM dirty-tracking calls.
#[derive(Debug, thiserror::Error)]
pub enum KvmDirtyError {
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    Map {
        vcpu: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed")]
    Clear(#[source] std::io::Error),
}

/// Published by KVM and not yet handed back.
fn published(flags: u32) -> bool {
    flags & KVM_DIRTY_GFN_F_DIRTY != 0 && flags & KVM_DIRTY_GFN_F_RESET == 0
}

/// One vCPU's dirty ring, mapped from its vCPU fd.
pub struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    bytes: usize,
    /// Next entry to read (only touched by whoever holds `busy`).
    next: AtomicU32,
    busy: AtomicBool,
    /// Entries harvested from this ring since it was mapped (per-vCPU dirty rates).
    pub harvested: AtomicU64,
    /// Consecutive ring-full exits that found nothing to harvest.
    pub empty_fulls: AtomicU32,
}

// SAFETY: the mapping is shared memory that KVM and this process access with atomic loads and
// stores only (`flags` through AtomicU32 with acquire/release, the rest read after the acquire);
// the fetch index is an atomic guarded by `busy`. Nothing in Ring is tied to a thread.
unsafe impl Send for Ring {}
// SAFETY: see `Send`; concurrent harvesters are excluded by the `busy` flag.
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps the ring of `entries` entries (a power of two) of the vCPU behind `vcpu_fd`.
    pub fn map(vcpu: u8, vcpu_fd: RawFd, entries: u32) -> Result<Ring, KvmDirtyError> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: we ask the kernel for a new shared mapping of the vCPU fd at the documented
        // dirty-ring offset; no existing memory is affected and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd,
                kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmDirtyError::Map {
                vcpu,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Ring {
            base: p.cast(),
            entries,
            bytes,
            next: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            harvested: AtomicU64::new(0),
            empty_fulls: AtomicU32::new(0),
        })
    }

    /// Takes the ring for one harvester, spinning while another holds it (never for long);
    /// `unlock` gives it back.
    fn lock(&self) {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }

    fn unlock(&self) {
        self.busy.store(false, Ordering::Release);
    }

    fn flags(&self, i: u32) -> &AtomicU32 {
        let e = (i & (self.entries - 1)) as usize;
        // SAFETY: `e < entries`, so the entry lies inside the live mapping; `flags` is the first,
        // 4-byte-aligned u32 of a 16-byte entry, and KVM also accesses it atomically.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.base.add(e)).flags)) }
    }

    fn entry(&self, i: u32) -> (u32, u64) {
        let e = (i & (self.entries - 1)) as usize;
        // SAFETY: in bounds as in `flags`; called only after an acquire load of the entry's
        // flags saw DIRTY, so KVM finished writing slot and offset (volatile: shared memory).
        unsafe {
            let p = self.base.add(e);
            (
                std::ptr::addr_of!((*p).slot).read_volatile(),
                std::ptr::addr_of!((*p).offset).read_volatile(),
            )
        }
    }

    /// Reads every published entry in order, calling `f(slot, offset)` for each and handing it
    /// back to KVM. Returns how many were harvested. Spins while another harvester holds the
    /// ring (it is never held for long).
    pub fn harvest(&self, mut f: impl FnMut(u32, u64)) -> u32 {
        self.lock();
        let n = self.take_published(self.next.load(Ordering::Relaxed), self.entries, &mut f);
        self.unlock();
        n
    }

    /// With the ring held: hands back the published entries from index `from` on, at most
    /// `max`, calling `f(slot, offset)` for each before its hand-back; moves the fetch index
    /// past them and returns how many there were.
    fn take_published(&self, from: u32, max: u32, f: &mut impl FnMut(u32, u64)) -> u32 {
        let mut next = from;
        let mut n = 0;
        while n < max {
            let flags = self.flags(next);
            let v = flags.load(Ordering::Acquire);
            if !published(v) {
                break;
            }
            let (slot, offset) = self.entry(next);
            f(slot, offset);
            flags.store(v | KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            next = next.wrapping_add(1);
            n += 1;
        }
        self.next.store(next, Ordering::Relaxed);
        self.harvested.fetch_add(u64::from(n), Ordering::Relaxed);
        n
    }

    /// Waits until no harvest of this ring is under way: a harvest marks each page before it
    /// hands the entry back, so after this every entry behind a mark already seen is handed
    /// back and the next `KVM_RESET_DIRTY_RINGS` re-protects its page.
    pub fn fence(&self) {
        self.lock();
        self.unlock();
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.entries
    }

    /// Recovers a ring KVM wrote past its end. Call it only from the ring's own vCPU thread
    /// after a ring-full exit that `harvest` found nothing for: KVM pushes to a ring only from
    /// its vCPU, so the ring is still while that thread is out of KVM_RUN.
    ///
    /// KVM looks for a full ring only when it enters the guest. Here (nested PVM) a burst
    /// between two entries pushed more entries than the ring holds: the newest overwrote the
    /// oldest unharvested ones and KVM's write index moved past ours. Our index then sits on
    /// entries KVM has already reset (flags 0), while KVM's reset index waits for exactly those
    /// to be handed back: neither side moves again and the vCPU takes ring-full exits forever
    /// (a guest wedged for good; found with logging on from boot, where only full exits drain
    /// the rings). This hands the skipped entries back too (RESET on an empty entry: KVM
    /// re-protects the page it names, which costs at most one extra fault) and harvests the
    /// published run after them. Returns (entries skipped, entries harvested), (0, 0) when
    /// nothing is published anywhere (a normal empty full exit). Skipped entries mean that
    /// writes were overwritten: the caller must answer "everything dirty".
    pub fn recover_overrun(&self, mut f: impl FnMut(u32, u64)) -> (u32, u32) {
        self.lock();
        let start = self.next.load(Ordering::Relaxed);
        let Some(skipped) = (0..self.entries)
            .find(|&i| published(self.flags(start.wrapping_add(i)).load(Ordering::Acquire)))
        else {
            self.unlock();
            return (0, 0);
        };
        for i in 0..skipped {
            self.flags(start.wrapping_add(i))
                .fetch_or(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        }
        let n = self.take_published(start.wrapping_add(skipped), self.entries - skipped, &mut f);
        self.unlock();
        (skipped, n)
    }

    /// Recovers from a desynchronised ring (a ring-full exit with nothing at our index): hands
    /// back every published entry wherever it sits, reporting each, and moves the fetch index
    /// past the last one. The caller must treat the round as "everything dirty".
    pub fn resync(&self, mut f: impl FnMut(u32, u64)) -> u32 {
        self.lock();
        let mut n = 0;
        let mut after_last = None;
        for i in 0..self.entries {
            let flags = self.flags(i);
            let v = flags.load(Ordering::Acquire);
            if published(v) {
                let (slot, offset) = self.entry(i);
                f(slot, offset);
                flags.store(v | KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                n += 1;
                let nxt = (i + 1) & (self.entries - 1);
                if self.flags(nxt).load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                    after_last = Some(nxt);
                }
            }
        }
        if let Some(i) = after_last {
            let cur = self.next.load(Ordering::Relaxed);
            // Keep the high bits so the index stays monotonic modulo the ring size.
            let base = cur & !(self.entries - 1);
            let mut next = base | i;
            if next < cur {
                next = next.wrapping_add(self.entries);
            }
            self.next.store(next, Ordering::Relaxed);
        }
        self.harvested.fetch_add(u64::from(n), Ordering::Relaxed);
        self.unlock();
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` describe the mapping created in `map`, unmapped exactly once.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// `KVM_RESET_DIRTY_RINGS`: lets KVM reuse every handed-back entry and re-protect its page.
pub fn reset_rings(vm: &VmFd) -> Result<u32, KvmDirtyError> {
    // SAFETY: a no-argument ioctl on a valid VM fd; the result is checked.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _) };
    if r < 0 {
        return Err(KvmDirtyError::Reset(std::io::Error::last_os_error()));
    }
    Ok(r as u32)
}

/// `KVM_CLEAR_DIRTY_LOG` for `bitmap` (one bit per page from `first_page`, a multiple of 64).
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<(), KvmDirtyError> {
    let arg = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    assert!(
        bitmap.len() * 64 >= num_pages as usize,
        "bitmap shorter than num_pages"
    );
    // SAFETY: `arg` points at a bitmap with at least `num_pages` bits that outlives the call;
    // KVM only reads it. The result is checked.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if r < 0 {
        return Err(KvmDirtyError::Clear(std::io::Error::last_os_error()));
    }
    Ok(())
}
