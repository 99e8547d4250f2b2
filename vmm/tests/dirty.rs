//! Dirty-tracking correctness on the real /dev/kvm: the guest's `scatter` workload writes a
//! seeded pseudo-random set of pages from every vCPU and publishes how far it got; between two
//! pauses the test recomputes exactly which pages were written and requires every one of them
//! to be reported in that round (zero misses), for both trackers and ring sizes from the
//! smallest to the largest, including a ring too small for the burst, and with logging on from
//! boot across several tracking sessions.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blip_vmm::dirty::{LogFrom, Mode, DEFAULT_RING_ENTRIES, MAX_RING_ENTRIES, MIN_RING_ENTRIES};
use blip_vmm::loader::{Image, INFO_PAGE};
use blip_vmm::memory::Backing;
use blip_vmm::vm::{DirtyConfig, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const WS_BASE_PFN: u64 = (8 << 20) / 4096;
const WS_MIB: u64 = 8;
const SEED: u64 = 0x5eed_1234;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn share(total: u64, n: u64, k: u64) -> (u64, u64) {
    let per = total / n;
    let first = per * k;
    (first, if k + 1 == n { total - first } else { per })
}

fn counters(vm: &Vm, n: u64) -> Vec<u64> {
    (0..n)
        .map(|k| {
            vm.memory()
                .read_obj::<u64>(GuestAddress(INFO_PAGE + 0x100 + 8 * k))
                .unwrap()
        })
        .collect()
}

fn written(n: u64, prev: &[u64], cur: &[u64]) -> BTreeSet<u64> {
    let total = WS_MIB * 256;
    let mut out = BTreeSet::new();
    for k in 0..n {
        let (first, count) = share(total, n, k);
        for c in prev[k as usize] + 1..=cur[k as usize] {
            out.insert(WS_BASE_PFN + first + splitmix64(SEED ^ (k << 56) ^ c) % count);
        }
    }
    out
}

/// The pages of write prev+1 of each vCPU (possibly written before the pause that read prev).
fn straddling(n: u64, prev: &[u64]) -> BTreeSet<u64> {
    let next: Vec<u64> = prev.iter().map(|c| c + 1).collect();
    written(n, prev, &next)
}

/// Boots a scatter guest with the given tracker and checks `rounds` rounds for misses.
/// Returns (pages checked, full exits, anomalies).
fn check_rounds(
    mode: Mode,
    ring_entries: u32,
    vcpus: u32,
    rounds: u32,
    starve_collector: bool,
) -> (u64, u64, u64) {
    check_sessions(
        mode,
        ring_entries,
        vcpus,
        rounds,
        starve_collector,
        LogFrom::Migration,
        1,
    )
}

/// [`check_rounds`] with logging switched on `from`, over `sessions` start..stop sessions of
/// `rounds` rounds each; between sessions the guest runs untracked for a while (from boot:
/// the collector drains its rings between migrations too).
fn check_sessions(
    mode: Mode,
    ring_entries: u32,
    vcpus: u32,
    rounds: u32,
    starve_collector: bool,
    from: LogFrom,
    sessions: u32,
) -> (u64, u64, u64) {
    let mut vm = Vm::create_with(
        VmConfig {
            mem_size: 32 << 20,
            vcpus,
            cmdline: format!("scatter ws={WS_MIB} seed={SEED}"),
            backing: Backing::Anon,
            image: Some(Image::embedded()),
            serial: Box::new(std::io::sink()),
            platform: Default::default(),
        },
        DirtyConfig {
            mode,
            ring_entries,
            log_from: from,
        },
    )
    .expect("create VM");
    let n = u64::from(vcpus);
    vm.resume_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters(&vm, n).contains(&0) {
        assert!(Instant::now() < deadline, "guest never started writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut checked = 0;
    for i in 0..sessions {
        // Untracked running: with logging from boot, the collector keeps the rings drained.
        if i > 0 {
            vm.resume_all().unwrap();
        }
        std::thread::sleep(Duration::from_millis(60));
        checked += session(&mut vm, mode, ring_entries, n, rounds, starve_collector);
    }
    let shared = vm.tracker().shared().clone();
    (
        checked,
        shared.full_exits.load(Ordering::Relaxed),
        shared.anomalies.load(Ordering::Relaxed),
    )
}

/// One tracking session: start (the guest paused), `rounds` checked rounds, stop.
fn session(
    vm: &mut Vm,
    mode: Mode,
    ring_entries: u32,
    n: u64,
    rounds: u32,
    starve_collector: bool,
) -> u64 {
    vm.pause_all().unwrap();
    {
        let (t, mem) = vm.tracker_mut();
        t.start(mem).unwrap();
    }
    if starve_collector {
        vm.tracker()
            .shared()
            .collector_paused
            .store(true, Ordering::Relaxed);
    }
    let mut prev = counters(vm, n);
    let mut checked = 0;
    let mut last_reported = BTreeSet::new();
    for round in 0..rounds {
        vm.resume_all().unwrap();
        std::thread::sleep(Duration::from_millis(40));
        vm.pause_all().unwrap();
        let runs = vm.tracker().take_runs(vm.memory()).unwrap();
        let reported: BTreeSet<u64> = runs
            .iter()
            .flat_map(|r| r.first..r.first + r.pages)
            .collect();
        let cur = counters(vm, n);
        let want = written(n, &prev, &cur);
        // Write prev+1 of a vCPU may already have landed before the last pause (the page is
        // written before its counter): it then belongs to the previous round (or, in round 0,
        // to the time before tracking started, which a migration's full first pass covers).
        let missed: Vec<_> = want
            .difference(&reported)
            .filter(|p| {
                !straddling(n, &prev).contains(*p) || (round > 0 && !last_reported.contains(*p))
            })
            .collect();
        if !missed.is_empty() {
            let total = WS_MIB * 256;
            let mut who = Vec::new();
            for k in 0..n {
                let (first, count) = share(total, n, k);
                for c in prev[k as usize] + 1..=cur[k as usize] {
                    let p = WS_BASE_PFN + first + splitmix64(SEED ^ (k << 56) ^ c) % count;
                    if missed.contains(&&p) {
                        who.push((k, c, prev[k as usize], cur[k as usize]));
                    }
                }
            }
            panic!(
                "{mode:?} ring {ring_entries}: round {round}: {} of {} written pages not reported, e.g. {:x?}; (vcpu, write, prev, cur): {who:?}",
                missed.len(),
                want.len(),
                &missed[..missed.len().min(8)]
            );
        }
        checked += want.len() as u64;
        prev = cur;
        last_reported = reported;
    }
    vm.tracker()
        .shared()
        .collector_paused
        .store(false, Ordering::Relaxed);
    {
        let (t, mem) = vm.tracker_mut();
        t.stop(mem).unwrap();
    }
    checked
}

#[test]
fn ring_reports_every_written_page_at_every_size() {
    for entries in [MIN_RING_ENTRIES, DEFAULT_RING_ENTRIES, MAX_RING_ENTRIES] {
        let (checked, _, _) = check_rounds(Mode::Ring, entries, 2, 5, false);
        assert!(
            checked > 0,
            "ring {entries}: the guest wrote nothing to check"
        );
    }
}

#[test]
fn bitmap_reports_every_written_page() {
    let (checked, _, _) = check_rounds(Mode::Bitmap, 0, 2, 5, false);
    assert!(checked > 0);
}

#[test]
fn ring_too_small_for_the_burst_still_misses_nothing() {
    // With the collector starved, the smallest ring fills and vCPUs take ring-full exits; the
    // pages must still all be reported (drained by the vCPU, or by "everything dirty").
    let (checked, full_exits, anomalies) = check_rounds(Mode::Ring, MIN_RING_ENTRIES, 2, 4, true);
    assert!(
        checked > u64::from(MIN_RING_ENTRIES),
        "burst too small to overflow: {checked}"
    );
    assert!(full_exits > 0 || anomalies > 0, "the ring never filled");
}

#[test]
fn logging_from_boot_misses_nothing_across_sessions() {
    // Logging on from boot: each start hands the ring entries back instead of write-protecting
    // everything. The smallest ring fills while nobody tracks; three sessions in a row.
    for entries in [MIN_RING_ENTRIES, DEFAULT_RING_ENTRIES] {
        let (checked, _, _) = check_sessions(Mode::Ring, entries, 2, 3, false, LogFrom::Boot, 3);
        assert!(checked > 0, "ring {entries}: the guest wrote nothing");
    }
    let (checked, _, _) = check_sessions(Mode::Bitmap, 0, 2, 3, false, LogFrom::Boot, 3);
    assert!(checked > 0, "bitmap: the guest wrote nothing");
    // And with the collector starved during tracking (ring-full exits while tracking too).
    let (checked, _, _) =
        check_sessions(Mode::Ring, MIN_RING_ENTRIES, 2, 3, true, LogFrom::Boot, 2);
    assert!(checked > 0);
}

#[test]
fn vmm_writes_appear_in_the_dirty_set() {
    for mode in [Mode::Ring, Mode::Bitmap] {
        let mut vm = Vm::create_with(
            VmConfig {
                mem_size: 16 << 20,
                vcpus: 1,
                cmdline: "hello".into(),
                backing: Backing::Anon,
                image: None,
                serial: Box::new(std::io::sink()),
                platform: Default::default(),
            },
            DirtyConfig {
                mode,
                ring_entries: DEFAULT_RING_ENTRIES,
                ..Default::default()
            },
        )
        .unwrap();
        {
            let (t, mem) = vm.tracker_mut();
            t.start(mem).unwrap();
        }
        vm.memory()
            .write_obj(0xabcd_u64, GuestAddress(0x7_3000))
            .unwrap();
        vm.memory()
            .write_slice(&[1u8; 8192], GuestAddress(0x20_0000))
            .unwrap();
        let runs = vm.tracker().take_runs(vm.memory()).unwrap();
        let pages: BTreeSet<u64> = runs
            .iter()
            .flat_map(|r| r.first..r.first + r.pages)
            .collect();
        assert_eq!(pages, BTreeSet::from([0x73, 0x200, 0x201]), "{mode:?}");
        assert!(vm.tracker().take_runs(vm.memory()).unwrap().is_empty());
    }
}

#[test]
fn bad_ring_size_is_refused() {
    let r = Vm::create_with(
        VmConfig {
            mem_size: 16 << 20,
            vcpus: 1,
            cmdline: String::new(),
            backing: Backing::Anon,
            image: None,
            serial: Box::new(std::io::sink()),
            platform: Default::default(),
        },
        DirtyConfig {
            mode: Mode::Ring,
            ring_entries: 1000,
            ..Default::default()
        },
    );
    let e = r.err().expect("must fail").to_string();
    assert!(e.contains("power of two"), "{e}");
}
