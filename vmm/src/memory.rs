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
    /// Private anonymous memory (the default).
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

/// Registers every region of guest memory for RDMA on `pd` (`Access::RemoteWrite` on a
/// destination, `Access::Local` on a source). Each registration keeps a clone of `mem` (which
/// keeps the mappings alive), so a region can never outlive the memory it covers.
pub fn register_rdma(
    pd: &std::sync::Arc<blip_transport::rdma::ProtectionDomain>,
    mem: &GuestMem,
    access: blip_transport::rdma::Access,
) -> Result<Vec<blip_transport::rdma::LocalRegion>, blip_transport::rdma::RdmaError> {
    use blip_transport::rdma::{LocalRegion, MemoryRegion};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| blip_transport::rdma::RdmaError::OutOfRange {
                side: "local",
                addr: region.start_addr().0,
                len: region.len(),
            })?;
        // SAFETY: `host..host+len` is this region's live mapping (read-write), kept mapped by
        // the clone of `mem` the registration owns. Remote writes into guest memory are the
        // point of a destination's registration: the guest is not running while they land.
        let mr = unsafe {
            MemoryRegion::register(
                pd,
                host,
                region.len() as usize,
                access,
                Box::new(mem.clone()),
            )
        }?;
        out.push(LocalRegion {
            base: region.start_addr().0,
            mr: std::sync::Arc::new(mr),
        });
    }
    Ok(out)
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
