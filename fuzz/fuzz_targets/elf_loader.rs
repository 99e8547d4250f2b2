//! Guest images: `loader::Image::check` on arbitrary bytes, then, when the image passes and
//! fits, `Image::load` into 16 MiB of real guest memory. `Image` has no public constructor from
//! bytes, so each input is written to a file in a per-process directory on tmpfs and read back
//! with `Image::from_file`. Must never panic; vm-memory keeps every write inside guest memory,
//! so a panic or an unexpected error is what this looks for.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use blip_vmm::loader::{EntryMode, Image, LoaderError, START_INFO, ZERO_PAGE};
use blip_vmm::memory::{self, Backing, GuestMem};
use libfuzzer_sys::fuzz_target;

const MEM: u64 = 16 << 20;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("blip-fuzz-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir.join("image.elf")
    })
}

fn guest_memory() -> &'static GuestMem {
    static MEMORY: OnceLock<GuestMem> = OnceLock::new();
    MEMORY.get_or_init(|| memory::create(MEM, Backing::Anon).expect("create guest memory"))
}

/// Known bug, reported, not yet fixed: `Image::check` computes `phoff + i * phentsize + 56`
/// unchecked, so a program-header offset near `u64::MAX` panics (overflow in debug, slice index
/// out of range in release). With `BLIP_FUZZ_SKIP_KNOWN=1` such inputs are skipped so a run can
/// look for other bugs; by default they crash, as they should until the loader is fixed.
fn known_bug(data: &[u8]) -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    if !*SKIP.get_or_init(|| std::env::var_os("BLIP_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1")) {
        return false;
    }
    data.len() >= 40
        && u64::from_le_bytes(data[32..40].try_into().unwrap())
            .checked_add(65535 * 65535 + 56)
            .is_none()
}

fuzz_target!(|data: &[u8]| {
    if known_bug(data) {
        return;
    }
    let path = scratch();
    std::fs::write(path, data).expect("write scratch image");
    let image = Image::from_file(path).expect("read scratch image");
    let end = match image.check() {
        Ok(end) => end,
        Err(e) => {
            let _ = e.to_string();
            // load() runs the same checks first: it must refuse the same image.
            assert!(image.load(guest_memory(), MEM, "fuzz", 1, 1000).is_err());
            return;
        }
    };
    assert!(end > 0);
    match image.load(guest_memory(), MEM, "fuzz", 1, 1000) {
        Ok(boot) => {
            assert!(end <= MEM, "loaded an image ending at {end:#x} into {MEM:#x} bytes");
            // PVH gets hvm_start_info, a bzImage (the fuzzer can build one) the zero page.
            let expected = match boot.mode {
                EntryMode::Pvh32 => START_INFO,
                EntryMode::Linux64 => ZERO_PAGE,
            };
            assert_eq!(boot.start_info, expected);
        }
        Err(LoaderError::TooLarge { end: e, mem }) => {
            assert_eq!((e, mem), (end, MEM));
            assert!(end > MEM);
        }
        Err(e) => {
            assert!(end <= MEM, "image too large but load said: {e}");
            let _ = e.to_string();
        }
    }
});
