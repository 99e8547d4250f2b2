//! The boot path without running a guest: Debian's stock bzImage (from the soft-RoCE harness
//! cache, when present) and the embedded PVH guest, each with an initrd, loaded into real guest
//! memory; the zero page / start info, the memory map and the initrd placement checked.

use std::path::PathBuf;

use blip_vmm::loader::{EntryMode, Image, Kind, LoaderError, ZERO_PAGE};
use blip_vmm::memory::{self, Backing};
use blip_vmm::platform::{Platform, E820_RAM, E820_RESERVED};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

/// Debian's vmlinuz from the harness cache, if this machine has one.
fn debian_kernel() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(".cache/blip-softroce/kernel");
    let ver = std::fs::read_to_string(dir.join("current")).ok()?;
    let p = dir
        .join(ver.trim())
        .join(format!("boot/vmlinuz-{}", ver.trim()));
    p.is_file().then_some(p)
}

#[test]
fn debian_bzimage_loads_with_initrd_and_e820() {
    let Some(path) = debian_kernel() else {
        eprintln!("no cached Debian kernel: skipped");
        return;
    };
    let mem_size = 256 * MIB;
    let initrd: Vec<u8> = (0..3 * MIB + 123).map(|i| (i % 251) as u8).collect();
    let image = Image::from_file(&path).unwrap().with_initrd(initrd.clone());
    assert_eq!(image.kind().unwrap(), Kind::BzImage);
    let (entry, end) = image.bz_entry().unwrap();
    assert_eq!(entry, 0x100200, "startup_64 of a kernel loaded at 1 MiB");
    assert!(end > 16 * MIB && end < mem_size, "{end:#x}");
    let mem = memory::create(mem_size, Backing::Anon).unwrap();
    let cmdline = "console=ttyS0 reboot=k panic=-1";
    let boot = image
        .load_for(Platform::Pc, &mem, mem_size, cmdline, 2, 1000)
        .unwrap();
    assert_eq!(boot.mode, EntryMode::Linux64);
    assert_eq!(boot.entry, 0x100200);
    assert_eq!(boot.start_info, ZERO_PAGE);
    let zp = |off: u64| GuestAddress(ZERO_PAGE + off);
    assert_eq!(mem.read_obj::<u32>(zp(0x202)).unwrap(), 0x5372_6448); // "HdrS"
    assert_eq!(mem.read_obj::<u8>(zp(0x210)).unwrap(), 0xff); // type_of_loader
    let cmd_ptr = u64::from(mem.read_obj::<u32>(zp(0x228)).unwrap());
    let mut got = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut got, GuestAddress(cmd_ptr)).unwrap();
    assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(got[cmdline.len()], 0);
    let rd = u64::from(mem.read_obj::<u32>(zp(0x218)).unwrap());
    let rd_size = u64::from(mem.read_obj::<u32>(zp(0x21c)).unwrap());
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd % 4096, 0);
    assert!(rd >= end && rd + rd_size <= mem_size, "initrd at {rd:#x}");
    assert!(mem_size - (rd + rd_size) < 4096, "initrd placed high");
    let mut back = vec![0u8; initrd.len()];
    mem.read_slice(&mut back, GuestAddress(rd)).unwrap();
    assert!(back == initrd);
    // e820: RAM below the EBDA, reserved to 1 MiB, RAM above.
    assert_eq!(mem.read_obj::<u8>(zp(0x1e8)).unwrap(), 3);
    let e820 = |i: u64, f: u64| GuestAddress(ZERO_PAGE + 0x2d0 + 20 * i + f);
    let kinds: Vec<u32> = (0..3).map(|i| mem.read_obj(e820(i, 16)).unwrap()).collect();
    assert_eq!(kinds, [E820_RAM, E820_RESERVED, E820_RAM]);
    assert_eq!(mem.read_obj::<u64>(e820(2, 0)).unwrap(), MIB);
    assert_eq!(mem.read_obj::<u64>(e820(2, 8)).unwrap(), mem_size - MIB);
    // The protected-mode kernel sits at 1 MiB, byte for byte.
    let file = std::fs::read(&path).unwrap();
    let setup = (usize::from(file[0x1f1]).max(4) + 1) * 512;
    let mut head = vec![0u8; 4096];
    mem.read_slice(&mut head, GuestAddress(MIB)).unwrap();
    assert_eq!(&head[..], &file[setup..setup + 4096]);
}

#[test]
fn bzimage_plus_initrd_must_fit() {
    let Some(path) = debian_kernel() else {
        eprintln!("no cached Debian kernel: skipped");
        return;
    };
    let image = Image::from_file(&path).unwrap();
    let (_, end) = image.bz_entry().unwrap();
    let mem_size = (end + MIB).next_multiple_of(MIB);
    let image = image.with_initrd(vec![1u8; 4 * MIB as usize]);
    let mem = memory::create(mem_size, Backing::Anon).unwrap();
    let r = image.load_for(Platform::Pc, &mem, mem_size, "", 1, 1000);
    assert!(
        matches!(r, Err(LoaderError::InitrdTooLarge { .. })),
        "{:?}",
        r.err()
    );
}

#[test]
fn pvh_initrd_is_a_module_and_pc_gets_a_real_memory_map() {
    let mem_size = 32 * MIB;
    for (platform, entries) in [(Platform::Minimal, 1u32), (Platform::Pc, 3)] {
        let mem = memory::create(mem_size, Backing::Anon).unwrap();
        let boot = Image::embedded()
            .with_initrd(vec![7u8; 5000])
            .load_for(platform, &mem, mem_size, "hello", 1, 1000)
            .unwrap();
        assert_eq!(boot.mode, EntryMode::Pvh32);
        let si = boot.start_info;
        assert_eq!(mem.read_obj::<u32>(GuestAddress(si + 48)).unwrap(), entries);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(si + 12)).unwrap(), 1); // nr_modules
        let modlist: u64 = mem.read_obj(GuestAddress(si + 16)).unwrap();
        let paddr: u64 = mem.read_obj(GuestAddress(modlist)).unwrap();
        let size: u64 = mem.read_obj(GuestAddress(modlist + 8)).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(paddr % 4096, 0);
        assert!(paddr + size <= mem_size && paddr > 8 * MIB);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(paddr + 4999)).unwrap(), 7);
    }
}

#[test]
fn neither_elf_nor_bzimage_is_refused() {
    let dir = std::env::temp_dir().join(format!("blip-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("junk");
    let mut junk = vec![0u8; 0x1000];
    junk[0x202..0x206].copy_from_slice(b"HdrS"); // no boot flag: not a bzImage
    std::fs::write(&f, &junk).unwrap();
    let r = Image::from_file(&f).unwrap().kind();
    assert!(matches!(r, Err(LoaderError::NotElf)), "{r:?}");
    junk[0x1fe] = 0x55;
    junk[0x1ff] = 0xaa;
    std::fs::write(&f, &junk).unwrap();
    let r = Image::from_file(&f).unwrap().check();
    assert!(matches!(r, Err(LoaderError::BadBzImage(_))), "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
