//! `dirty`: what dirty tracking costs the guest and how fast the VMM harvests, ring vs bitmap,
//! in-process through the blip_vmm library.
//!
//! The guest runs `scatter ws=<MiB> seed=1`: every vCPU writes pseudo-random pages of its share
//! of the working set as fast as it can and publishes its write counter at guest-physical
//! `0x5100 + 8k`. Per working set and mode (tracking mode is fixed at VM creation, so one VM per
//! mode): guest progress (writes/s, summed over vCPUs) with tracking off (the same VM with
//! tracking stopped) and with tracking on while a "migration round" harvests every 10 ms with
//! `take_runs`, as the migration engine does; off and on alternate in slices so the host's
//! drift hits both alike. Nothing is asserted.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blip_vmm::dirty::{run_pages, Mode, DEFAULT_RING_ENTRIES};
use blip_vmm::loader::{Image, INFO_PAGE};
use blip_vmm::memory::Backing;
use blip_vmm::vm::{DirtyConfig, Vm, VmConfig};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::report::{hist, p99, summary, us};

/// Where vCPU k publishes its scatter write counter.
const SCATTER_COUNTERS: u64 = INFO_PAGE + 0x100;
const VCPUS: u32 = 2;
const MEM: u64 = 64 << 20;
/// How often the "migration round" harvests.
const ROUND: Duration = Duration::from_millis(10);
/// Off/on alternations per measurement.
const SLICES: u32 = 6;

fn counters(vm: &Vm) -> Vec<u64> {
    (0..vm.vcpu_count() as u64)
        .map(|k| {
            vm.memory()
                .read_obj::<u64>(GuestAddress(SCATTER_COUNTERS + 8 * k))
                .unwrap_or(0)
        })
        .collect()
}

fn advanced(a: &[u64], b: &[u64]) -> u64 {
    a.iter().zip(b).map(|(x, y)| y.saturating_sub(*x)).sum()
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Ring => "ring",
        Mode::Bitmap => "bitmap",
    }
}

/// The table header.
pub fn header() {
    println!(
        "dirty   | {:>5} {:>6} | {:>12} {:>12} {:>6} | {:>12} {:>12} | {:>9} {:>9} {:>6} | {:>9} {:>5}",
        "ws", "mode", "off wr/s", "on wr/s", "on/off", "ring ent/s", "pages/s", "take mean", "take p99", "rounds", "ring-full", "anom"
    );
}

/// Measures one working set with one tracking mode; prints a row, returns the figures.
pub fn run(ws_mib: u64, mode: Mode, window: Duration) -> Value {
    match measure(ws_mib, mode, window) {
        Ok(v) => v,
        Err(e) => {
            println!(
                "dirty   | {:>4}M {:>6} | failed: {e}",
                ws_mib,
                mode_name(mode)
            );
            json!({"ws_mib": ws_mib, "mode": mode_name(mode), "error": e})
        }
    }
}

fn measure(ws_mib: u64, mode: Mode, window: Duration) -> Result<Value, String> {
    let cmdline = format!("scatter ws={ws_mib} seed=1");
    let mut vm = Vm::create_with(
        VmConfig {
            mem_size: MEM,
            vcpus: VCPUS,
            cmdline: cmdline.clone(),
            backing: Backing::Anon,
            image: Some(Image::embedded()),
            serial: Box::new(std::io::sink()),
            platform: Default::default(),
        },
        DirtyConfig {
            mode,
            ring_entries: DEFAULT_RING_ENTRIES,
            ..Default::default()
        },
    )
    .map_err(|e| format!("create VM: {e}"))?;
    let active = vm.tracker().active().to_string();
    vm.resume_all().map_err(|e| format!("start: {e}"))?;
    // Wait until every vCPU is writing (hang guard, not a timing).
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters(&vm).contains(&0) {
        if Instant::now() > deadline {
            return Err("the guest never started writing".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));

    // Off and on alternate in SLICES slices each, so the host's drift (shared, noisy, emulated)
    // hits both alike; tracking restarts for every "on" slice, as for every migration.
    let slice = window / SLICES;
    let shared = vm.tracker().shared().clone();
    let full0 = shared.full_exits.load(Ordering::Relaxed);
    let anom0 = vm.tracker().anomalies();
    let mut take = hist();
    let (mut pages, mut entries) = (0u64, 0u64);
    let (mut w_off, mut w_on) = (0u64, 0u64);
    let (mut s_off, mut s_on) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..SLICES {
        // (a) tracking off.
        let (c0, t0) = (counters(&vm), Instant::now());
        std::thread::sleep(slice);
        let (c1, t1) = (counters(&vm), Instant::now());
        w_off += advanced(&c0, &c1);
        s_off += t1 - t0;

        // (b) tracking on, harvested every ROUND as a migration round would.
        {
            let (t, mem) = vm.tracker_mut();
            t.start(mem).map_err(|e| format!("start tracking: {e}"))?;
        }
        let h0: u64 = vm.tracker().per_vcpu_harvested().iter().sum();
        let (c0, t0) = (counters(&vm), Instant::now());
        let mut next = t0;
        while next.duration_since(t0) < slice {
            next += ROUND;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let s = Instant::now();
            let runs = vm
                .tracker()
                .take_runs(vm.memory())
                .map_err(|e| format!("take_runs: {e}"))?;
            take.saturating_record(s.elapsed().as_nanos() as u64);
            pages += run_pages(&runs);
        }
        let (c1, t1) = (counters(&vm), Instant::now());
        let h1: u64 = vm.tracker().per_vcpu_harvested().iter().sum();
        entries += h1.saturating_sub(h0);
        w_on += advanced(&c0, &c1);
        s_on += t1 - t0;
        let (t, mem) = vm.tracker_mut();
        t.stop(mem).map_err(|e| format!("stop tracking: {e}"))?;
    }
    let full = shared.full_exits.load(Ordering::Relaxed) - full0;
    let anomalies = vm.tracker().anomalies() - anom0;
    let off = w_off as f64 / s_off.as_secs_f64();
    let secs = s_on.as_secs_f64();
    let on = w_on as f64 / secs;
    vm.shutdown();

    let is_ring = active.starts_with("dirty ring");
    let ratio = if off > 0.0 { on / off } else { 0.0 };
    let entries_per_s = entries as f64 / secs;
    let pages_per_s = pages as f64 / secs;
    println!(
        "dirty   | {:>4}M {:>6} | {:>12.0} {:>12.0} {:>6.3} | {:>12} {:>12.0} | {:>9.1} {:>9.1} {:>6} | {:>9} {:>5}",
        ws_mib,
        mode_name(mode),
        off,
        on,
        ratio,
        if is_ring { format!("{entries_per_s:.0}") } else { "n/a".into() },
        pages_per_s,
        us(take.mean() as u64),
        us(p99(&take)),
        take.len(),
        if is_ring { full.to_string() } else { "n/a".into() },
        anomalies,
    );
    Ok(json!({
        "ws_mib": ws_mib,
        "mode": mode_name(mode),
        "active": active,
        "vcpus": VCPUS,
        "mem_mib": MEM >> 20,
        "cmdline": cmdline,
        "window_s": window.as_secs_f64(),
        "slices": SLICES,
        "round_interval_ms": ROUND.as_millis() as u64,
        "guest_writes_per_s_off": off,
        "guest_writes_per_s_on": on,
        "on_off_ratio": ratio,
        "ring_entries_harvested_per_s": if is_ring { Some(entries_per_s) } else { None },
        "pages_reported_per_s": pages_per_s,
        "pages_reported": pages,
        "take_runs_ns": summary(&take),
        "ring_full_exits": if is_ring { Some(full) } else { None },
        "anomalies": anomalies,
    }))
}

/// Loopback TCP bandwidth in bytes per second, for the migrate cells' final pages to be
/// compared with in the same run: one connection over 127.0.0.1 (TCP_NODELAY, as blip's
/// streams), a writer thread blasting `total` bytes in 1 MiB writes and this thread reading
/// them into a 1 MiB buffer; timed from the first byte read to the last. The best of `tries`
/// (the host is shared: the best is what the machine allows).
pub fn loopback_tcp_bandwidth(total: usize, tries: u32) -> Result<f64, String> {
    use std::io::{Read, Write};
    let mut best = 0.0f64;
    for _ in 0..tries.max(1) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let buf = vec![0x5au8; 1 << 20];
            let mut left = total;
            while left > 0 {
                let n = left.min(buf.len());
                s.write_all(&buf[..n])?;
                left -= n;
            }
            Ok(())
        });
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = s.read(&mut buf).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let first = got;
        while got < total {
            match s.read(&mut buf).map_err(|e| e.to_string())? {
                0 => return Err("loopback writer closed early".into()),
                n => got += n,
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        writer
            .join()
            .map_err(|_| "loopback writer panicked".to_string())?
            .map_err(|e| e.to_string())?;
        if secs > 0.0 {
            best = best.max((total - first) as f64 / secs);
        }
    }
    Ok(best)
}

/// The final-pages path as the source runs it ([`blip_vmm::migration::link::send_batches`]:
/// copy out of guest memory, a CRC and a vectored write per frame of `frame_pages` pages)
/// into a loopback TCP connection whose reader decodes frames as the destination does
/// (`read_message`, each frame's pages read from the socket into pre-faulted memory). Timed
/// from the call to the moment the reader has the last page: bytes per second.
///
/// `backlog` pages of a last live round (Pages frames of up to 256 pages) are written first.
/// With `barrier` the timing starts only after the reader consumed them (what the last live
/// round's RoundEnd/RoundAck barrier does since issue 18); without it, as before, the final
/// batch queues behind them in the socket buffers and its time includes theirs.
pub fn final_pages_path(
    pages: u64,
    backlog: u64,
    barrier: bool,
    frame_pages: u64,
) -> Result<f64, String> {
    use blip_transport::protocol::{read_message, write_pages, Message};
    use blip_vmm::dirty::Run;
    use std::io::IoSlice;
    use std::sync::mpsc;

    let e = |e: &dyn std::fmt::Display| e.to_string();
    let page = 4096u64;
    let mem = blip_vmm::memory::create(64 << 20, Backing::Anon).map_err(|x| e(&x))?;
    // Every other page of the first 32 MiB, so the batch has many runs, as a real final round.
    let runs: Vec<Run> = (0..pages)
        .map(|i| Run {
            first: 2 * i,
            pages: 1,
        })
        .collect();
    for r in &runs {
        mem.write_obj(r.first ^ 0x5a5a, GuestAddress(r.gpa()))
            .map_err(|x| e(&x))?;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|x| e(&x))?;
    let addr = l.local_addr().map_err(|x| e(&x))?;
    let (tx, rx) = mpsc::channel::<(&'static str, Instant)>();
    let reader = std::thread::spawn(move || -> Result<(), String> {
        let (mut s, _) = l.accept().map_err(|x| e(&x))?;
        s.set_nodelay(true).map_err(|x| e(&x))?;
        let mut sink = vec![0u8; (256 * page) as usize];
        let mut seen = 0u64;
        let mut landing = vec![1u8; (pages * page) as usize];
        let (mut landed, mut batch_pages) = (0usize, 0u64);
        loop {
            let f = read_message(&mut s).map_err(|x| e(&x))?;
            match f.msg {
                Message::Pages { count, .. } => {
                    let receipt = f.pages.ok_or("no receipt")?;
                    receipt
                        .read_into(&mut s, &mut sink[..receipt.data_len])
                        .map_err(|x| e(&x))?;
                    seen += u64::from(count);
                    if seen == backlog {
                        let _ = tx.send(("backlog", Instant::now()));
                    }
                }
                // As the destination does: each frame's pages read straight into
                // (pre-faulted) guest memory; the path ends when the last of them is in.
                Message::PageBatch { runs } => {
                    let receipt = f.pages.ok_or("no receipt")?;
                    let n = receipt.data_len.min(landing.len() - landed);
                    if n != receipt.data_len {
                        return Err("more pages than were sent".into());
                    }
                    receipt
                        .read_into(&mut s, &mut landing[landed..landed + n])
                        .map_err(|x| e(&x))?;
                    landed += n;
                    batch_pages += runs.iter().map(|r| u64::from(r.1)).sum::<u64>();
                    if batch_pages >= pages {
                        std::hint::black_box(&landing);
                        let _ = tx.send(("batch", Instant::now()));
                        return Ok(());
                    }
                }
                other => return Err(format!("unexpected {:?}", other.kind())),
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).map_err(|x| e(&x))?;
    s.set_nodelay(true).map_err(|x| e(&x))?;
    let live = vec![0x77u8; (256 * page) as usize];
    let mut left = backlog;
    let mut gpa = 32 << 20;
    while left > 0 {
        let n = left.min(256);
        write_pages(&mut s, gpa, &[IoSlice::new(&live[..(n * page) as usize])])
            .map_err(|x| e(&x))?;
        gpa += n * page;
        left -= n;
    }
    if barrier && backlog > 0 {
        rx.recv().map_err(|x| e(&x))?;
    }
    let mut batch = blip_vmm::migration::link::prefaulted((256 * page) as usize);
    let mut table = Vec::with_capacity(256);
    let t0 = Instant::now();
    blip_vmm::migration::link::send_batches_framed(
        &mut s,
        &mem,
        &runs,
        &mut batch,
        &mut table,
        (frame_pages * page) as usize,
    )
    .map_err(|x| e(&x))?;
    let done = loop {
        if let ("batch", t) = rx.recv().map_err(|x| e(&x))? {
            break t;
        }
    };
    reader.join().map_err(|_| "reader panicked".to_string())??;
    Ok((pages * page) as f64 / done.duration_since(t0).as_secs_f64())
}
