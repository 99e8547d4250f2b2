//! Loading a guest: a PVH ELF64 image or a Linux bzImage, with an optional initrd, and the
//! structures each boot protocol hands over (PVH `hvm_start_info` or Linux `boot_params`), the
//! command line, the memory map and blip's info page.
//!
//! PVH is the boot protocol shared by Firecracker, Cloud Hypervisor and QEMU microvm: the image is
//! an ELF64 file carrying a `XEN_ELFNOTE_PHYS32_ENTRY` note; the BSP (every vCPU on the Minimal
//! platform) enters that 32-bit entry in protected mode with paging off and `%ebx` pointing at
//! `hvm_start_info`. Using it means the same guest image runs under QEMU, which is how the
//! benchmark compares blip with QEMU. An initrd travels as the first PVH module.
//!
//! A bzImage (what distributions ship in `/boot`) is booted through Linux's 64-bit boot
//! protocol: linux-loader copies the protected-mode kernel to its `code32_start`, blip writes
//! the zero page (`boot_params`: setup header, e820 map, command line pointer, ramdisk fields),
//! and the BSP starts in long mode with identity-mapped page tables at `startup_64` (load
//! address + 0x200) with `%rsi` pointing at the zero page.
//!
//! Before handing the file to linux-loader we read its headers ourselves: linux-loader's errors
//! do not tell "not an ELF" from "truncated" from "does not fit in memory", and users deserve
//! to know which one they hit.
//!
//! Guest-physical layout (all below 1 MiB except the image and the initrd):
//!
//! | address  | what |
//! |----------|------|
//! | 0x0500   | boot GDT (PVH: null, code32, data, tss; bzImage: null, null, code64, data, tss) |
//! | 0x5000   | blip info page ([`INFO_PAGE`]): magic, vCPU count, TSC kHz, command word |
//! | 0x6000   | `hvm_start_info` (PVH) |
//! | 0x6100   | PVH memory map |
//! | 0x6400   | PVH module list (the initrd) |
//! | 0x7000   | PVH command line, or the bzImage zero page (`boot_params`) |
//! | 0x9000   | bzImage: identity page tables (PML4, PDPT, 4 PDs of 2 MiB pages: 4 GiB) |
//! | 0x20000  | bzImage command line |
//! | 0x9fc00  | Pc platform: MP table (see `platform`) |
//! | 0x100000 | the guest image (linked there, or the bzImage's `code32_start`) |
//! | top      | the initrd: page-aligned, as high as RAM (and `initrd_addr_max`) allow |

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;
use crate::platform::Platform;

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
const MODLIST: u64 = 0x6400;
const CMDLINE: u64 = 0x7000;
/// Where a bzImage's zero page (`boot_params`) lives; the BSP gets it in `%rsi`.
pub const ZERO_PAGE: u64 = 0x7000;
/// First of the bzImage boot page tables (PML4; the PDPT and PDs follow).
pub const PAGE_TABLES: u64 = 0x9000;
const BZ_CMDLINE: u64 = 0x20000;
const PAGE: u64 = 0x1000;
/// bzImage setup header fields (offsets in the file, see Documentation/arch/x86/boot.rst).
const BZ_BOOT_FLAG: usize = 0x1fe;
const BZ_HEADER: usize = 0x202;
const BZ_VERSION: usize = 0x206;
const BZ_LOADFLAGS: usize = 0x211;
const BZ_CODE32_START: usize = 0x214;
const BZ_INITRD_ADDR_MAX: usize = 0x22c;
const BZ_RELOCATABLE: usize = 0x234;
const BZ_XLOADFLAGS: usize = 0x236;
const BZ_CMDLINE_SIZE: usize = 0x238;
const BZ_PREF_ADDRESS: usize = 0x258;
const BZ_INIT_SIZE: usize = 0x260;
/// Oldest boot protocol with the 64-bit entry and `init_size` (2.10 has `pref_address`, 2.12
/// `xloadflags`).
const BZ_MIN_VERSION: u16 = 0x020c;
/// Offset of `startup_64` from the protected-mode kernel's load address.
const BZ_STARTUP_64: u64 = 0x200;
/// Longest command line, without its NUL.
pub const CMDLINE_MAX: usize = 4095;
/// Lowest address an image may load at.
const IMAGE_MIN: u64 = 0x100000;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH 32-bit entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The embedded demo/test guest, built from `vmm/guest/` by `build.rs`.
pub static EMBEDDED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blip-guest.elf"));

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotRegular { what: &'static str, path: String },
    #[error("{what} {path} is {len} bytes, more than the guest's {mem} bytes of memory")]
    FileTooLarge {
        what: &'static str,
        path: String,
        len: u64,
        mem: u64,
    },
    #[error("kernel image is not an ELF file with a PVH note, nor a bzImage")]
    NotElf,
    #[error("kernel image is a bzImage blip cannot boot: {0}")]
    BadBzImage(&'static str),
    #[error(
        "kernel image and initrd need {need:#x} bytes of memory but the guest has only {mem:#x}"
    )]
    InitrdTooLarge { need: u64, mem: u64 },
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

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh32,
    /// Linux 64-bit boot protocol: long mode, identity paging, `%rsi` = zero page.
    Linux64,
}

/// What the loader learned and the vCPUs need.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// Entry point (PVH 32-bit entry, or `startup_64`).
    pub entry: u64,
    /// Guest-physical address of `hvm_start_info` (PVH) or of the zero page (bzImage).
    pub start_info: u64,
    /// The boot protocol.
    pub mode: EntryMode,
}

/// The kinds of image blip boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// ELF64 with a PVH entry note.
    Pvh,
    /// Linux bzImage (64-bit boot protocol).
    BzImage,
}

/// A guest image read into memory (from a file or the embedded guest), with its initrd.
pub struct Image {
    bytes: Vec<u8>,
    initrd: Option<Vec<u8>>,
    /// blip's own guest: it never sends INIT/SIPI, so its APs must start runnable.
    embedded: bool,
}

/// A bzImage's setup header fields blip uses.
#[derive(Clone, Copy, Debug)]
struct BzHeader {
    load: u64,
    /// Highest guest address the decompressed kernel occupies (its run-time footprint).
    end: u64,
    initrd_addr_max: u64,
    cmdline_size: u64,
}

fn read_limited(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, LoaderError> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = || path.display().to_string();
    let open = |source| LoaderError::Open {
        what,
        path: p(),
        source,
    };
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(open)?;
    let meta = file.metadata().map_err(open)?;
    if !meta.file_type().is_file() {
        return Err(LoaderError::NotRegular { what, path: p() });
    }
    if meta.len() > limit {
        return Err(LoaderError::FileTooLarge {
            what,
            path: p(),
            len: meta.len(),
            mem: limit,
        });
    }
    // Bounded again while reading: the file may grow after the check.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit).read_to_end(&mut bytes).map_err(open)?;
    Ok(bytes)
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
        Ok(Image {
            bytes: read_limited("kernel image", path, mem_size)?,
            initrd: None,
            embedded: false,
        })
    }

    /// Adds an initrd read from a regular file of at most `mem_size` bytes (checked the same
    /// way as the image).
    pub fn with_initrd_file(mut self, path: &Path, mem_size: u64) -> Result<Self, LoaderError> {
        self.initrd = Some(read_limited("initrd", path, mem_size)?);
        Ok(self)
    }

    /// Adds an initrd from bytes.
    pub fn with_initrd(mut self, initrd: Vec<u8>) -> Self {
        self.initrd = Some(initrd);
        self
    }

    /// The guest embedded in the `blip` binary.
    pub fn embedded() -> Self {
        Image {
            bytes: EMBEDDED_GUEST.to_vec(),
            initrd: None,
            embedded: true,
        }
    }

    /// Whether the guest starts its own APs with INIT/SIPI (a stock kernel does), so that on a
    /// platform with an irqchip they wait for it. blip's own guest does not: its APs start
    /// runnable at its entry on every platform (on `--platform pc` they used to wait for a
    /// SIPI that never came, and its memory check, which waits for every vCPU, never ran).
    pub fn starts_its_own_aps(&self) -> bool {
        !self.embedded
    }

    /// What kind of image this is (an image that is neither is refused).
    pub fn kind(&self) -> Result<Kind, LoaderError> {
        let b = &self.bytes;
        if b.len() >= 4 && &b[..4] == b"\x7fELF" {
            return Ok(Kind::Pvh);
        }
        if b.len() > BZ_HEADER + 4
            && &b[BZ_HEADER..BZ_HEADER + 4] == b"HdrS"
            && b[BZ_BOOT_FLAG..BZ_BOOT_FLAG + 2] == [0x55, 0xaa]
        {
            return Ok(Kind::BzImage);
        }
        Err(LoaderError::NotElf)
    }

    /// Checks the image and returns how much guest memory it needs: the highest guest-physical
    /// address the kernel occupies (for a bzImage, once decompressed), plus the initrd.
    pub fn check(&self) -> Result<u64, LoaderError> {
        let end = match self.kind()? {
            Kind::Pvh => self.check_elf()?,
            Kind::BzImage => self.bz_header()?.end,
        };
        Ok(match &self.initrd {
            Some(i) => end + (i.len() as u64).div_ceil(PAGE) * PAGE,
            None => end,
        })
    }

    /// The setup header of a bzImage, checked.
    fn bz_header(&self) -> Result<BzHeader, LoaderError> {
        let b = &self.bytes;
        if b.len() < BZ_INIT_SIZE + 4 {
            return Err(LoaderError::BadBzImage("truncated setup header"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        if u16_at(BZ_VERSION) < BZ_MIN_VERSION {
            return Err(LoaderError::BadBzImage(
                "boot protocol older than 2.12 (no 64-bit entry)",
            ));
        }
        if b[BZ_LOADFLAGS] & 1 == 0 {
            return Err(LoaderError::BadBzImage("not loaded high (a zImage)"));
        }
        if u16_at(BZ_XLOADFLAGS) & 1 == 0 {
            return Err(LoaderError::BadBzImage("no 64-bit entry point"));
        }
        let setup = (usize::from(b[0x1f1]).max(4) + 1) * 512;
        if b.len() <= setup {
            return Err(LoaderError::BadBzImage("no kernel after the setup code"));
        }
        let load = u64::from(u32_at(BZ_CODE32_START));
        if load < IMAGE_MIN {
            return Err(LoaderError::LoadsTooLow(load));
        }
        // A relocatable kernel decompresses at its preferred address (not below where it was
        // loaded) and needs `init_size` bytes from there.
        let base = if b[BZ_RELOCATABLE] != 0 {
            load.max(u64_at(BZ_PREF_ADDRESS))
        } else {
            load
        };
        let payload_end = load + (b.len() - setup) as u64;
        let end = (base + u64::from(u32_at(BZ_INIT_SIZE))).max(payload_end);
        Ok(BzHeader {
            load,
            end,
            initrd_addr_max: u64::from(u32_at(BZ_INITRD_ADDR_MAX)),
            cmdline_size: u64::from(u32_at(BZ_CMDLINE_SIZE)),
        })
    }

    /// The bzImage's run-time footprint end and `startup_64` (for tests and diagnostics).
    pub fn bz_entry(&self) -> Result<(u64, u64), LoaderError> {
        let h = self.bz_header()?;
        Ok((h.load + BZ_STARTUP_64, h.end))
    }

    /// Checks the ELF header and returns the highest guest-physical address the image occupies.
    fn check_elf(&self) -> Result<u64, LoaderError> {
        let b = &self.bytes;
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

    /// Loads the image for the Minimal platform (see [`Image::load_for`]).
    pub fn load(
        &self,
        mem: &GuestMem,
        mem_size: u64,
        cmdline: &str,
        vcpus: u8,
        tsc_khz: u32,
    ) -> Result<Boot, LoaderError> {
        self.load_for(Platform::Minimal, mem, mem_size, cmdline, vcpus, tsc_khz)
    }

    /// Loads the image and its initrd and writes every boot structure for `platform`.
    /// Returns where the boot vCPU enters.
    pub fn load_for(
        &self,
        platform: Platform,
        mem: &GuestMem,
        mem_size: u64,
        cmdline: &str,
        vcpus: u8,
        tsc_khz: u32,
    ) -> Result<Boot, LoaderError> {
        self.check_fits(mem_size)?;
        if cmdline.len() > CMDLINE_MAX {
            return Err(LoaderError::CmdlineTooLong(cmdline.len()));
        }
        let map = crate::platform::memory_map(platform, mem_size);
        match self.kind()? {
            Kind::Pvh => self.load_pvh(mem, mem_size, cmdline, vcpus, tsc_khz, &map),
            Kind::BzImage => self.load_bzimage(mem, mem_size, cmdline, &map),
        }
    }

    /// Checks the image (and initrd) and that they fit in `mem_size` bytes of guest memory.
    pub fn check_fits(&self, mem_size: u64) -> Result<(), LoaderError> {
        let need = self.check()?;
        if need > mem_size {
            return Err(match self.initrd {
                Some(_) => LoaderError::InitrdTooLarge {
                    need,
                    mem: mem_size,
                },
                None => LoaderError::TooLarge {
                    end: need,
                    mem: mem_size,
                },
            });
        }
        Ok(())
    }

    /// Where the initrd goes: the highest page-aligned address below `top` where it fits,
    /// above `kernel_end`.
    fn place_initrd(&self, kernel_end: u64, top: u64) -> Result<Option<(u64, u64)>, LoaderError> {
        let Some(initrd) = &self.initrd else {
            return Ok(None);
        };
        let len = initrd.len() as u64;
        let addr = top
            .checked_sub(len)
            .map(|a| a & !(PAGE - 1))
            .filter(|a| *a >= kernel_end)
            .ok_or(LoaderError::InitrdTooLarge {
                need: kernel_end + len.div_ceil(PAGE) * PAGE,
                mem: top,
            })?;
        Ok(Some((addr, len)))
    }

    fn write_initrd(&self, mem: &GuestMem, at: Option<(u64, u64)>) -> Result<(), LoaderError> {
        if let (Some(initrd), Some((addr, _))) = (&self.initrd, at) {
            mem.write_slice(initrd, GuestAddress(addr))
                .map_err(LoaderError::Write)?;
        }
        Ok(())
    }

    fn load_pvh(
        &self,
        mem: &GuestMem,
        mem_size: u64,
        cmdline: &str,
        vcpus: u8,
        tsc_khz: u32,
        map: &[crate::platform::MemRange],
    ) -> Result<Boot, LoaderError> {
        let end = self.check_elf()?;
        let initrd = self.place_initrd(end, mem_size.min(1 << 32))?;
        let mut cursor = std::io::Cursor::new(&self.bytes[..]);
        cursor
            .seek(SeekFrom::Start(0))
            .map_err(|_| LoaderError::Corrupt)?;
        let loaded = Elf::load(mem, None, &mut cursor, None).map_err(LoaderError::Load)?;
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr.0,
            _ => return Err(LoaderError::NoPvhNote),
        };
        self.write_initrd(mem, initrd)?;

        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(LoaderError::Write);
        // Command line, NUL-terminated.
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        w(mem.write_slice(&line, GuestAddress(CMDLINE)))?;
        for (i, r) in map.iter().enumerate() {
            let e = hvm_memmap_table_entry {
                addr: r.addr,
                size: r.size,
                type_: r.kind,
                reserved: 0,
            };
            w(mem.write_obj(e, GuestAddress(MEMMAP + 24 * i as u64)))?;
        }
        let mut info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE,
            memmap_paddr: MEMMAP,
            memmap_entries: map.len() as u32,
            ..Default::default()
        };
        if let Some((addr, len)) = initrd {
            let module = hvm_modlist_entry {
                paddr: addr,
                size: len,
                cmdline_paddr: 0,
                reserved: 0,
            };
            w(mem.write_obj(module, GuestAddress(MODLIST)))?;
            info.nr_modules = 1;
            info.modlist_paddr = MODLIST;
        }
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
            mode: EntryMode::Pvh32,
        })
    }

    fn load_bzimage(
        &self,
        mem: &GuestMem,
        mem_size: u64,
        cmdline: &str,
        map: &[crate::platform::MemRange],
    ) -> Result<Boot, LoaderError> {
        let h = self.bz_header()?;
        if cmdline.len() as u64 > h.cmdline_size {
            return Err(LoaderError::CmdlineTooLong(cmdline.len()));
        }
        let top = mem_size.min(h.initrd_addr_max.saturating_add(1));
        let initrd = self.place_initrd(h.end, top)?;
        let mut cursor = std::io::Cursor::new(&self.bytes[..]);
        let loaded = BzImage::load(mem, None, &mut cursor, None).map_err(LoaderError::Load)?;
        let mut hdr = loaded
            .setup_header
            .ok_or(LoaderError::BadBzImage("no setup header"))?;
        self.write_initrd(mem, initrd)?;

        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(LoaderError::Write);
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        w(mem.write_slice(&line, GuestAddress(BZ_CMDLINE)))?;

        hdr.type_of_loader = 0xff; // "undefined" boot loader
        hdr.cmd_line_ptr = BZ_CMDLINE as u32;
        hdr.code32_start = loaded.kernel_load.0 as u32;
        if let Some((addr, len)) = initrd {
            hdr.ramdisk_image = addr as u32;
            hdr.ramdisk_size = len as u32;
        }
        let mut params = boot_params {
            hdr,
            ..Default::default()
        };
        for (i, r) in map.iter().enumerate() {
            params.e820_table[i] = boot_e820_entry {
                addr: r.addr,
                size: r.size,
                r#type: r.kind,
            };
        }
        params.e820_entries = map.len() as u8;
        w(mem.write_obj(params, GuestAddress(ZERO_PAGE)))?;

        // Identity map of the low 4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 PDs.
        let pdpt = PAGE_TABLES + PAGE;
        let pd = PAGE_TABLES + 2 * PAGE;
        w(mem.write_obj(pdpt | 0x3, GuestAddress(PAGE_TABLES)))?;
        for i in 0..4u64 {
            w(mem.write_obj((pd + i * PAGE) | 0x3, GuestAddress(pdpt + 8 * i)))?;
        }
        for i in 0..2048u64 {
            // Present, writable, 2 MiB page.
            w(mem.write_obj((i << 21) | 0x83, GuestAddress(pd + 8 * i)))?;
        }
        for (i, d) in crate::cpu::LONG_GDT_ENTRIES.iter().enumerate() {
            w(mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64)))?;
        }
        Ok(Boot {
            entry: loaded.kernel_load.0 + BZ_STARTUP_64,
            start_info: ZERO_PAGE,
            mode: EntryMode::Linux64,
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
            initrd: None,
            embedded: false,
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
