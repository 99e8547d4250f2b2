//! Guest memory: one RAM region starting at guest-physical 0, backed by anonymous memory or a
//! memfd, accessed only through vm-memory.
//!
//! Why one region: blip's guests are unikernels that need no PCI hole below 4 GiB, and a single
//! region keeps dirty tracking, page runs and RDMA registration trivial (one slot, one memory
//! region, one rkey). The cost is a 3 GiB cap on guest memory, enforced here with a clear error.
//!
//! Why `AtomicBitmap`: every write the VMM itself makes to guest memory (loader, devices, the
//! info page) is recorded in vm-memory's per-page bitmap, so live migration can merge those
//! pages with what KVM reports for the guest's own writes.
//!
//! Why memfd as an option: the destination of a migration wants shared, pre-faulted memory
//! that can be registered for RDMA before the first page arrives; `--mem-backing memfd` gives a
//! `MAP_SHARED` mapping of a sealed-size memfd.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;

use crate::hash::Fnv;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory type used everywhere in blip.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size (x86-64 base pages; dirty tracking works at this granularity).
pub const PAGE_SIZE: u64 = 4096;

/// Largest guest memory blip supports (one region below the 32-bit MMIO area).
pub const MAX_MEM: u64 = 3 << 30;

/// Smallest guest memory blip accepts: the boot structures and a 1 MiB-linked image need room.
pub const MIN_MEM: u64 = 2 << 20;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backing {
    /// Private anonymous memory.
    Anon,
    /// A memfd mapped shared (what a migration destination and RDMA registration want).
    Memfd,
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {size} is out of range (supported: {min} to {max} bytes)")]
    OutOfRange { size: u64, min: u64, max: u64 },
    #[error("cannot create the memfd for guest memory")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the memfd for guest memory to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    #[error("cannot pre-fault guest memory")]
    Prefault(#[source] std::io::Error),
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("{pages} pages at {gpa:#x} lie outside the {size}-byte guest memory")]
    OutOfBounds { gpa: u64, pages: u64, size: u64 },
    #[error("page run at {0:#x} does not start on a page boundary")]
    UnalignedRun(u64),
    #[error("guest memory at {0:#x} has no host mapping")]
    NoHostMapping(u64),
}

/// Allocates `size` bytes of guest RAM at guest-physical 0.
pub fn create(size: u64, backing: Backing) -> Result<GuestMem, MemoryError> {
    if size % PAGE_SIZE != 0 {
        return Err(MemoryError::Unaligned(size));
    }
    if !(MIN_MEM..=MAX_MEM).contains(&size) {
        return Err(MemoryError::OutOfRange {
            size,
            min: MIN_MEM,
            max: MAX_MEM,
        });
    }
    let file = match backing {
        Backing::Anon => None,
        Backing::Memfd => Some(FileOffset::new(memfd(size)?, 0)),
    };
    let region = GuestRegionMmap::from_range(GuestAddress(0), size as usize, file)
        .map_err(|e| MemoryError::Map(size, e))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Map(size, e.into()))
}

/// Total size of guest memory in bytes (every region).
pub fn size(mem: &GuestMem) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

/// Checks that `pages` pages from `gpa` lie inside guest memory and `gpa` is page-aligned,
/// before a peer's or a file's page run is written there. Returns the run's length in bytes.
pub fn check_run(mem: &GuestMem, gpa: u64, pages: u64) -> Result<u64, MemoryError> {
    if gpa % PAGE_SIZE != 0 {
        return Err(MemoryError::UnalignedRun(gpa));
    }
    let size = size(mem);
    pages
        .checked_mul(PAGE_SIZE)
        .filter(|len| gpa.checked_add(*len).is_some_and(|end| end <= size))
        .ok_or(MemoryError::OutOfBounds { gpa, pages, size })
}

/// The KVM memory slots of guest memory: slot `i` maps region `i` at its guest address, with
/// `flags` (0, or `KVM_MEM_LOG_DIRTY_PAGES`). VM creation registers them and dirty logging
/// re-registers them with another flag: both build them here.
pub fn kvm_slots(
    mem: &GuestMem,
    flags: u32,
) -> Result<Vec<kvm_bindings::kvm_userspace_memory_region>, MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| MemoryError::NoHostMapping(region.start_addr().0))?;
            Ok(kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            })
        })
        .collect()
}

/// Runs of non-zero pages in `buf`, as (first page, pages) in page units of `page` bytes
/// (a last partial page counts as a page). Zero pages need not travel or be stored: a
/// destination's or a restored guest's memory starts zeroed.
///
/// # Panics
///
/// If `page` is 0.
pub fn nonzero_runs(buf: &[u8], page: usize) -> NonzeroRuns<'_> {
    assert!(page > 0, "page size 0");
    NonzeroRuns { buf, page, at: 0 }
}

/// The iterator of [`nonzero_runs`].
#[derive(Clone, Debug)]
pub struct NonzeroRuns<'a> {
    buf: &'a [u8],
    page: usize,
    /// Next page to look at.
    at: usize,
}

impl NonzeroRuns<'_> {
    fn page_is_zero(&self, i: usize) -> bool {
        /// Compared against with `==` (a memcmp, fast even in debug builds).
        static ZERO: [u8; 4096] = [0; 4096];
        let start = i * self.page;
        let end = (start + self.page).min(self.buf.len());
        self.buf[start..end]
            .chunks(ZERO.len())
            .all(|c| c == &ZERO[..c.len()])
    }
}

impl Iterator for NonzeroRuns<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let pages = self.buf.len().div_ceil(self.page);
        while self.at < pages && self.page_is_zero(self.at) {
            self.at += 1;
        }
        if self.at == pages {
            return None;
        }
        let first = self.at;
        while self.at < pages && !self.page_is_zero(self.at) {
            self.at += 1;
        }
        Some((first, self.at - first))
    }
}

/// Faults in every page of guest memory now (`MADV_POPULATE_WRITE`), so a migration
/// destination takes no page faults while pages arrive or after it resumes. Falls back to
/// touching one byte per page where the kernel lacks the advice.
pub fn prefault(mem: &GuestMem) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Prefault(std::io::Error::other("no host address")))?;
        let len = region.len() as usize;
        // SAFETY: `host..host+len` is exactly this region's live mapping; the advice only
        // populates page tables and never changes the contents.
        let r = unsafe {
            libc::madvise(host.cast(), len, 23 /* MADV_POPULATE_WRITE */)
        };
        if r != 0 {
            // Older kernels: write the value each page already holds (zero) to fault it in.
            let mut off = 0u64;
            while off < len as u64 {
                let a = vm_memory::MemoryRegionAddress(off);
                let v: u8 = vm_memory::Bytes::read_obj(region, a).unwrap_or(0);
                let _ = vm_memory::Bytes::write_obj(region, v, a);
                off += PAGE_SIZE;
            }
        }
    }
    Ok(())
}

/// A 64-bit digest of all guest memory (per-MiB CRC32C chained), for `--verify`.
pub fn digest(mem: &GuestMem) -> u64 {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut buf = vec![0u8; 1 << 20];
    let mut h = Fnv::new();
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = ((region.len() - off) as usize).min(buf.len());
            let _ = region.read_slice(&mut buf[..n], vm_memory::MemoryRegionAddress(off));
            h.word(u64::from(crc32c::crc32c(&buf[..n])));
            off += n as u64;
        }
    }
    h.finish()
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the call has no
    // memory-safety preconditions beyond that.
    let fd = unsafe { libc::memfd_create(c"blip-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            create(4097, Backing::Anon),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            create(4096, Backing::Anon),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            create(4 << 30, Backing::Anon),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn nonzero_runs_finds_each_run() {
        let page = 8;
        let mut buf = vec![0u8; 10 * page];
        for p in [1, 2, 3, 6, 9] {
            buf[p * page + p % page] = 1;
        }
        let runs: Vec<_> = nonzero_runs(&buf, page).collect();
        assert_eq!(runs, [(1, 3), (6, 1), (9, 1)]);
        assert_eq!(nonzero_runs(&[], page).count(), 0);
        assert_eq!(nonzero_runs(&buf[..page], page).count(), 0);
        // A byte at the very end of a page, and pages larger than the zero block compared.
        let big = 3 * 4096 + 100;
        let mut b = vec![0u8; 2 * big];
        b[2 * big - 1] = 7;
        assert_eq!(nonzero_runs(&b, big).collect::<Vec<_>>(), [(1, 1)]);
        // A last partial page is a page.
        let mut p = vec![0u8; 2 * page + 3];
        p[2 * page + 2] = 1;
        assert_eq!(nonzero_runs(&p, page).collect::<Vec<_>>(), [(2, 1)]);
        // All non-zero: one run.
        assert_eq!(nonzero_runs(&[1u8; 4 * 8], 8).collect::<Vec<_>>(), [(0, 4)]);
    }

    #[test]
    fn check_run_refuses_what_lies_outside() {
        let mem = create(4 << 20, Backing::Anon).unwrap();
        let pages = (4 << 20) / PAGE_SIZE;
        assert_eq!(check_run(&mem, 0, pages).unwrap(), 4 << 20);
        assert_eq!(check_run(&mem, 0x1000, 2).unwrap(), 0x2000);
        assert_eq!(check_run(&mem, 4 << 20, 0).unwrap(), 0);
        assert!(matches!(
            check_run(&mem, 0x1001, 1),
            Err(MemoryError::UnalignedRun(0x1001))
        ));
        for (gpa, n) in [
            (0, pages + 1),
            (4 << 20, 1),
            ((4 << 20) - PAGE_SIZE, 2),
            (!(PAGE_SIZE - 1), 1),
            (0x1000, u64::MAX / PAGE_SIZE + 1),
        ] {
            let e = check_run(&mem, gpa, n).unwrap_err();
            assert!(
                matches!(e, MemoryError::OutOfBounds { gpa: g, pages: p, size } if g == gpa && p == n && size == 4 << 20),
                "{gpa:#x} {n}: {e}"
            );
            assert!(e.to_string().contains("outside"));
        }
    }

    #[test]
    fn kvm_slots_cover_guest_memory() {
        let mem = create(4 << 20, Backing::Anon).unwrap();
        let slots = kvm_slots(&mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES).unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].slot, 0);
        assert_eq!(slots[0].guest_phys_addr, 0);
        assert_eq!(slots[0].memory_size, 4 << 20);
        assert_eq!(slots[0].flags, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
        assert_ne!(slots[0].userspace_addr, 0);
    }

    #[test]
    fn memfd_backing_is_usable() {
        let mem = create(4 << 20, Backing::Memfd).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(mem.num_regions(), 1);
    }
}
