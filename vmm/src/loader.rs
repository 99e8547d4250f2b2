//! Loading a PVH guest: the ELF64 image, the PVH `hvm_start_info`, the command line, the memory
//! map and blip's info page.
//!
//! PVH is the boot protocol shared by Firecracker, Cloud Hypervisor and QEMU microvm: the image is
//! an ELF64 file carrying a `XEN_ELFNOTE_PHYS32_ENTRY` note; every vCPU enters that 32-bit entry
//! in protected mode with paging off and `%ebx` pointing at `hvm_start_info`. Using it means the
//! same guest image runs under QEMU, which is how the benchmark compares blip with QEMU.
//!
//! Before handing the file to linux-loader we read its ELF header and program headers ourselves:
//! linux-loader's errors do not tell "not an ELF" from "truncated" from "does not fit in memory",
//! and users deserve to know which one they hit.
//!
//! Guest-physical layout (all below 1 MiB except the image):
//!
//! | address  | what |
//! |----------|------|
//! | 0x0500   | boot GDT (null, code32, data, tss) |
//! | 0x5000   | blip info page ([`INFO_PAGE`]): magic, vCPU count, TSC kHz, command word |
//! | 0x6000   | `hvm_start_info` |
//! | 0x6100   | memory map (one RAM entry) |
//! | 0x7000   | command line (NUL-terminated, < 4 KiB) |
//! | 0x100000 | the guest image (linked there) |

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Where the boot GDT lives.
pub const BOOT_GDT: u64 = 0x500;
/// blip's info page (see the guest ABI in `vmm/guest/main.rs`).
pub const INFO_PAGE: u64 = 0x5000;
/// Offset of the command word inside the info page.
pub const INFO_COMMAND: u64 = INFO_PAGE + 0x10;
/// Info page magic: "BLIPINFO" little-endian.
pub const INFO_MAGIC: u64 = u64::from_le_bytes(*b"BLIPINFO");
/// Where `hvm_start_info` lives; every vCPU gets its address in `%ebx`.
pub const START_INFO: u64 = 0x6000;
const MEMMAP: u64 = 0x6100;
const CMDLINE: u64 = 0x7000;
/// Longest command line, without its NUL.
pub const CMDLINE_MAX: usize = 4095;
/// Lowest address an image may load at.
const IMAGE_MIN: u64 = 0x100000;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH 32-bit entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// The embedded demo/test guest, built from `vmm/guest/` by `build.rs`.
pub static EMBEDDED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blip-guest.elf"));

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel image {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {path} is not a regular file")]
    NotRegular { path: String },
    #[error("kernel image {path} is {len} bytes, more than the guest's {mem} bytes of memory")]
    FileTooLarge { path: String, len: u64, mem: u64 },
    #[error("kernel image is not an ELF file")]
    NotElf,
    #[error("kernel image is a 32-bit ELF; blip loads ELF64 images (link PVH guests as ELF64)")]
    NotElf64,
    #[error("kernel image is not an x86-64 ELF (e_machine {0})")]
    WrongMachine(u16),
    #[error("kernel image is truncated or its program headers are corrupt")]
    Corrupt,
    #[error(
        "kernel image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); blip boots PVH images only"
    )]
    NoPvhNote,
    #[error("kernel image loads at {0:#x}, below 1 MiB, where blip keeps its boot structures")]
    LoadsTooLow(u64),
    #[error("kernel image needs memory up to {end:#x} but the guest has only {mem:#x} bytes")]
    TooLarge { end: u64, mem: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    CmdlineTooLong(usize),
    #[error("cannot load kernel image")]
    Load(#[source] linux_loader::loader::Error),
    #[error("cannot write boot structures into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the loader learned and the vCPUs need.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Guest-physical address of `hvm_start_info`.
    pub start_info: u64,
}

/// A guest image read into memory (from a file or the embedded guest).
pub struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// Reads an image from a file that must fit in the largest guest memory blip makes
    /// ([`crate::memory::MAX_MEM`]); [`Image::from_file_within`] bounds it by the guest's.
    pub fn from_file(path: &Path) -> Result<Self, LoaderError> {
        Self::from_file_within(path, crate::memory::MAX_MEM)
    }

    /// Reads an image from a regular file of at most `mem_size` bytes (an image cannot be
    /// larger than the memory it is loaded into). Anything else is refused before it is read:
    /// a FIFO (opened without blocking), a device such as /dev/zero, a file too large.
    pub fn from_file_within(path: &Path, mem_size: u64) -> Result<Self, LoaderError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = || path.display().to_string();
        let open = |source| LoaderError::Open { path: p(), source };
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(open)?;
        let meta = file.metadata().map_err(open)?;
        if !meta.file_type().is_file() {
            return Err(LoaderError::NotRegular { path: p() });
        }
        if meta.len() > mem_size {
            return Err(LoaderError::FileTooLarge {
                path: p(),
                len: meta.len(),
                mem: mem_size,
            });
        }
        // Bounded again while reading: the file may grow after the check.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(mem_size).read_to_end(&mut bytes).map_err(open)?;
        Ok(Image { bytes })
    }

    /// The guest embedded in the `blip` binary.
    pub fn embedded() -> Self {
        Image {
            bytes: EMBEDDED_GUEST.to_vec(),
        }
    }

    /// Checks the ELF header and returns the highest guest-physical address the image occupies.
    pub fn check(&self) -> Result<u64, LoaderError> {
        let b = &self.bytes;
        if b.len() < 4 || &b[..4] != b"\x7fELF" {
            return Err(LoaderError::NotElf);
        }
        if b.len() < 64 {
            return Err(LoaderError::Corrupt);
        }
        if b[4] != 2 {
            return Err(LoaderError::NotElf64);
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let machine = u16_at(18);
        if machine != 62 {
            return Err(LoaderError::WrongMachine(machine));
        }
        let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()) as usize;
        let phentsize = u16_at(54) as usize;
        let phnum = u16_at(56) as usize;
        if phentsize < 56 {
            return Err(LoaderError::Corrupt);
        }
        let mut end = 0u64;
        let mut pvh = false;
        let mut low = u64::MAX;
        for i in 0..phnum {
            let o = phoff
                .checked_add(i * phentsize)
                .filter(|o| o.checked_add(56).is_some_and(|e| e <= b.len()))
                .ok_or(LoaderError::Corrupt)?;
            let word = |off: usize| {
                u64::from_le_bytes(b[o + off..o + off + 8].try_into().unwrap_or_default())
            };
            let p_type = u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
            if p_type != PT_LOAD && p_type != PT_NOTE {
                continue;
            }
            let (offset, paddr, filesz, memsz) = (word(8), word(24), word(32), word(40));
            if offset
                .checked_add(filesz)
                .is_none_or(|e| e > b.len() as u64)
            {
                return Err(LoaderError::Corrupt);
            }
            if p_type == PT_NOTE {
                pvh |= has_pvh_note(&b[offset as usize..(offset + filesz) as usize]);
                continue;
            }
            low = low.min(paddr);
            end = end.max(paddr.checked_add(memsz).ok_or(LoaderError::Corrupt)?);
        }
        if !pvh {
            return Err(LoaderError::NoPvhNote);
        }
        if end == 0 {
            return Err(LoaderError::Corrupt);
        }
        if low < IMAGE_MIN {
            return Err(LoaderError::LoadsTooLow(low));
        }
        Ok(end)
    }

    /// Loads the image and writes every boot structure. Returns where vCPUs enter.
    pub fn load(
        &self,
        mem: &GuestMem,
        mem_size: u64,
        cmdline: &str,
        vcpus: u8,
        tsc_khz: u32,
    ) -> Result<Boot, LoaderError> {
        let end = self.check()?;
        if end > mem_size {
            return Err(LoaderError::TooLarge { end, mem: mem_size });
        }
        if cmdline.len() > CMDLINE_MAX {
            return Err(LoaderError::CmdlineTooLong(cmdline.len()));
        }
        let mut cursor = std::io::Cursor::new(&self.bytes[..]);
        cursor
            .seek(SeekFrom::Start(0))
            .map_err(|_| LoaderError::Corrupt)?;
        let loaded = Elf::load(mem, None, &mut cursor, None).map_err(LoaderError::Load)?;
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr.0,
            _ => return Err(LoaderError::NoPvhNote),
        };

        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(LoaderError::Write);
        // Command line, NUL-terminated.
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        w(mem.write_slice(&line, GuestAddress(CMDLINE)))?;
        // Memory map: one RAM entry covering all of guest memory.
        let ram = hvm_memmap_table_entry {
            addr: 0,
            size: mem_size,
            type_: E820_RAM,
            reserved: 0,
        };
        w(mem.write_obj(ram, GuestAddress(MEMMAP)))?;
        let info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE,
            memmap_paddr: MEMMAP,
            memmap_entries: 1,
            ..Default::default()
        };
        w(mem.write_obj(info, GuestAddress(START_INFO)))?;
        // blip info page.
        w(mem.write_obj(INFO_MAGIC, GuestAddress(INFO_PAGE)))?;
        w(mem.write_obj(u32::from(vcpus), GuestAddress(INFO_PAGE + 8)))?;
        w(mem.write_obj(tsc_khz, GuestAddress(INFO_PAGE + 12)))?;
        w(mem.write_obj(0u64, GuestAddress(INFO_COMMAND)))?;
        // Boot GDT: null, 32-bit code, data, 32-bit TSS (the descriptors `cpu` loads).
        for (i, d) in crate::cpu::BOOT_GDT_ENTRIES.iter().enumerate() {
            w(mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64)))?;
        }
        Ok(Boot {
            entry,
            start_info: START_INFO,
        })
    }
}

/// Does this PT_NOTE segment carry a Xen PVH entry note?
fn has_pvh_note(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let u = |o: usize| {
            u32::from_le_bytes([notes[o], notes[o + 1], notes[o + 2], notes[o + 3]]) as usize
        };
        let (namesz, descsz, kind) = (u(0), u(4), u(8) as u32);
        let name_end = 12usize.saturating_add(align4(namesz));
        let next = name_end.saturating_add(align4(descsz));
        if next > notes.len() {
            return false;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY
            && notes[12..12 + namesz].starts_with(b"Xen")
            && descsz >= 4
        {
            return true;
        }
        notes = &notes[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(bytes: &[u8]) -> Image {
        Image {
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn rejects_non_elf() {
        assert!(matches!(
            img(b"hello world").check(),
            Err(LoaderError::NotElf)
        ));
        assert!(matches!(img(b"").check(), Err(LoaderError::NotElf)));
    }

    #[test]
    fn rejects_elf32_and_truncation() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        assert!(matches!(img(&h).check(), Err(LoaderError::NotElf64)));
        assert!(matches!(img(&h[..20]).check(), Err(LoaderError::Corrupt)));
        h[4] = 2;
        h[18] = 3; // EM_386
        assert!(matches!(img(&h).check(), Err(LoaderError::WrongMachine(3))));
        h[18] = 62;
        h[54] = 56;
        h[56] = 4; // four program headers past the end of the file
        h[32] = 64;
        assert!(matches!(img(&h).check(), Err(LoaderError::Corrupt)));
    }

    #[test]
    fn program_header_offset_near_the_top_is_refused() {
        // Found by the elf_loader fuzz target: e_phoff = u64::MAX used to overflow.
        let hex = concat!(
            "7f454c4602010101000000000000000002003e000100000000001000007fffff",
            "ffffffffffffffffffffffffff000000ffffff454c46020101a0000008005000"
        );
        let b: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(b.len(), 64);
        assert!(matches!(img(&b).check(), Err(LoaderError::Corrupt)));
    }

    #[test]
    fn embedded_guest_is_a_pvh_elf() {
        let end = Image::embedded().check().unwrap();
        assert!(end > IMAGE_MIN);
        let mem = crate::memory::create(16 << 20, crate::memory::Backing::Anon).unwrap();
        let boot = Image::embedded()
            .load(&mem, 16 << 20, "hello", 1, 1000)
            .unwrap();
        assert!(boot.entry >= IMAGE_MIN);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(INFO_PAGE)).unwrap(),
            INFO_MAGIC
        );
    }

    #[test]
    fn image_files_must_be_regular_and_fit_in_memory() {
        let r = Image::from_file(Path::new("/dev/zero"));
        assert!(
            matches!(r, Err(LoaderError::NotRegular { .. })),
            "{:?}",
            r.err()
        );
        let r = Image::from_file(Path::new("/"));
        assert!(matches!(
            r,
            Err(LoaderError::NotRegular { .. }) | Err(LoaderError::Open { .. })
        ));
        let dir = std::env::temp_dir().join(format!("blip-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big.elf");
        // Sparse: refused from its size, never read.
        File::create(&f).unwrap().set_len(8 << 30).unwrap();
        let r = Image::from_file(&f);
        assert!(
            matches!(r, Err(LoaderError::FileTooLarge { .. })),
            "{:?}",
            r.err()
        );
        std::fs::write(&f, EMBEDDED_GUEST).unwrap();
        let len = EMBEDDED_GUEST.len() as u64;
        let r = Image::from_file_within(&f, len - 1);
        assert!(matches!(r, Err(LoaderError::FileTooLarge { len: l, .. }) if l == len));
        assert!(Image::from_file_within(&f, len).unwrap().check().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_larger_than_memory_is_refused() {
        let mem = crate::memory::create(1 << 21, crate::memory::Backing::Anon).unwrap();
        let end = Image::embedded().check().unwrap();
        let r = Image::embedded().load(&mem, 1 << 20, "", 1, 1000);
        assert!(matches!(r, Err(LoaderError::TooLarge { end: e, .. }) if e == end));
    }
}
