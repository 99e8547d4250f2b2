//! `blip drain`: migrate every guest registered on this host to the given destinations, at most
//! `--parallel` at once, with live progress and a final per-guest table. A guest whose
//! migration fails keeps running here, and the command exits non-zero naming it.
//!
//! Each `--to` is either a host running the host service (`blip host serve`, see
//! [`crate::host`]) or a waiting `blip receive` (the older form). Which one is found out by
//! asking: a host service answers the [`crate::host::client::info`] request, a plain receiver
//! refuses it without being consumed. Hosts are chosen per guest by the free memory and vCPUs
//! they report (biggest guests first, each placed where most vCPUs and then most memory are
//! free, counting what this drain already sent there); a host that refuses or a migration that
//! fails sends the guest to the next host. A receiver takes one guest.
//!
//! The same engine ([`run_drain`]) serves the host service's `POST /drain`, so a drain started
//! through the service outlives the command that asked for it.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blip_transport::auth::Key;
use blip_transport::protocol::HostReply;
use blip_transport::tls::Tls;
use blip_vmm::api::{self, Done, Progress, Reply, Request};
use blip_vmm::cli::DrainArgs;
use blip_vmm::migration::{OnTimeout, Options, Report};
use blip_vmm::registry::{self, Entry};
use serde::{Deserialize, Serialize};

use crate::host::{client, HostError};
use crate::Failure;

/// One guest's line in the drain table.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    pub to: String,
    pub state: String,
    pub blackout_us: Option<f64>,
    pub total_ms: Option<f64>,
    pub ok: Option<bool>,
    /// Hosts tried before the one that took the guest, with why they did not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[serde(default)]
    pub tried: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default)]
    pub report: Option<Box<Report>>,
}

/// The drain table, by guest name.
pub type Rows = Arc<Mutex<BTreeMap<String, Row>>>;

/// What a drain is asked to do.
#[derive(Clone, Debug)]
pub struct DrainOptions {
    pub to: Vec<String>,
    pub parallel: u32,
    pub max_blackout_ns: u64,
    pub max_precopy_ms: u64,
    pub verify: bool,
    pub streams: u32,
    pub transport: blip_vmm::migration::rdma::TransportChoice,
    /// Pre-copy bandwidth limit per migration, bytes per second (0 = none).
    pub max_bandwidth: u64,
    /// Shared key file (`None` = --insecure).
    pub key: Option<std::path::PathBuf>,
    /// Mutual TLS (`--tls-*`, or the host service's settings).
    pub tls: Option<blip_transport::tls::Files>,
}

/// A destination and what is known about it.
#[derive(Clone, Debug)]
enum Dest {
    /// A host service; `planned` is its last reply minus what this drain sent there since.
    Host { url: String, planned: HostReply },
    /// A waiting receiver (one guest), `used` once a guest went to it.
    Receiver { url: String, used: bool },
}

impl Dest {
    fn url(&self) -> &str {
        match self {
            Dest::Host { url, .. } | Dest::Receiver { url, .. } => url,
        }
    }
}

/// Finds out what each destination is. A destination that cannot be reached at all is kept as
/// a receiver: its migration then fails with the real reason.
fn classify(to: &[String], key: &Option<Key>, tls: Option<&Tls>) -> Vec<Dest> {
    to.iter()
        .map(|url| match client::info(url, key.clone(), tls) {
            Ok(reply) => Dest::Host {
                url: url.clone(),
                planned: reply,
            },
            Err(_) => Dest::Receiver {
                url: url.clone(),
                used: false,
            },
        })
        .collect()
}

/// The candidate destinations for `g`, best first, skipping `tried`: hosts with room for its
/// memory (most free vCPUs, then most free memory), then unused receivers.
fn candidates(dests: &[Dest], g: &Entry, tried: &[usize]) -> Vec<usize> {
    let mut hosts: Vec<(usize, &HostReply)> = dests
        .iter()
        .enumerate()
        .filter(|(i, _)| !tried.contains(i))
        .filter_map(|(i, d)| match d {
            Dest::Host { planned, .. }
                if planned.drained == 0 && planned.free_mem >= g.mem_size =>
            {
                Some((i, planned))
            }
            _ => None,
        })
        .collect();
    hosts.sort_by(|a, b| {
        (b.1.free_vcpus, b.1.free_mem)
            .cmp(&(a.1.free_vcpus, a.1.free_mem))
            .then(a.0.cmp(&b.0))
    });
    let mut out: Vec<usize> = hosts.into_iter().map(|(i, _)| i).collect();
    out.extend(dests.iter().enumerate().filter_map(|(i, d)| match d {
        Dest::Receiver { used: false, .. } if !tried.contains(&i) => Some(i),
        _ => None,
    }));
    out
}

fn reserve(d: &mut Dest, g: &Entry, sign: i64) {
    match d {
        Dest::Host { planned, .. } => {
            let mem = g.mem_size as i64 * sign;
            let vcpus = g.vcpus as i64 * sign;
            planned.free_mem = (planned.free_mem as i64 - mem).max(0) as u64;
            planned.free_vcpus = (planned.free_vcpus as i64 - vcpus).max(0) as u32;
        }
        // A receiver serves one attempt: after a failed one it has exited (or holds a
        // half-received guest), so it is never handed out again.
        Dest::Receiver { used, .. } => *used = true,
    }
}

/// Updates one guest's row.
type SetRow<'a> = dyn Fn(&dyn Fn(&mut Row)) + 'a;

/// Called with each guest's live progress (the host service shows it in `GET /guests/NAME`).
pub type OnProgress = Arc<dyn Fn(&str, &str, Option<&Progress>) + Send + Sync>;

/// Asks the host service at `url` to prepare a receiver for `g`. A refusal is its answer; a
/// connection that failed on the way (the service busy with a flood of strays, a restart) is
/// tried twice more before the drain moves on to the next host.
fn prepare_on(
    url: &str,
    key: &Option<Key>,
    tls: Option<&Tls>,
    g: &Entry,
) -> Result<HostReply, HostError> {
    let mut pause = Duration::from_millis(250);
    let mut tries_left = 2;
    loop {
        match client::prepare(url, key.clone(), tls, g) {
            Err(e) if !matches!(e, HostError::Refused(..)) && tries_left > 0 => {
                tries_left -= 1;
                std::thread::sleep(pause);
                pause *= 2;
            }
            r => return r,
        }
    }
}

/// Migrates `g` to the best destination, falling back to the next one when a host refuses or
/// a migration fails (the guest still runs here then). Never retries a handover in doubt.
fn move_guest(
    g: &Entry,
    dests: &Mutex<Vec<Dest>>,
    o: &DrainOptions,
    key: &Option<Key>,
    tls: Option<&Tls>,
    set: &SetRow<'_>,
    on_progress: &OnProgress,
) {
    let mut tried: Vec<usize> = Vec::new();
    let mut why: Vec<String> = Vec::new();
    loop {
        let pick = {
            let mut d = dests.lock().unwrap_or_else(|e| e.into_inner());
            let c = candidates(&d, g, &tried);
            c.first().copied().map(|i| {
                reserve(&mut d[i], g, 1);
                (i, d[i].clone())
            })
        };
        let Some((i, dest)) = pick else {
            // Say why the hosts never tried were passed over.
            for (j, d) in dests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .enumerate()
            {
                if let (false, Dest::Host { url, planned }) = (tried.contains(&j), d) {
                    why.push(if planned.drained != 0 {
                        format!(
                            "{url}: host {} is drained: it takes no guests",
                            planned.host
                        )
                    } else {
                        format!(
                            "{url}: not enough free memory ({} MiB free, {} MiB needed)",
                            planned.free_mem >> 20,
                            g.mem_size >> 20
                        )
                    });
                }
            }
            let reason = if why.is_empty() {
                "no destination left: stays here".to_string()
            } else {
                format!("FAILED: {}", why.join("; "))
            };
            set(&|r| {
                r.state = reason.clone();
                r.ok = Some(false);
            });
            return;
        };
        tried.push(i);
        let release = || {
            reserve(
                &mut dests.lock().unwrap_or_else(|e| e.into_inner())[i],
                g,
                -1,
            )
        };
        set(&|r| {
            r.to = dest.url().to_string();
            r.state = "connecting".into();
        });
        let to = match &dest {
            Dest::Receiver { url, .. } => url.clone(),
            Dest::Host { url, .. } => match prepare_on(url, key, tls, g) {
                Ok(reply) => reply.address,
                Err(e) => {
                    release();
                    let e = format!("{url}: {e}");
                    set(&|r| r.tried.push(e.clone()));
                    why.push(e);
                    continue;
                }
            },
        };
        on_progress(&g.name, &to, None);
        let connecting = Progress {
            phase: "connecting".into(),
            ..Progress::default()
        };
        crate::host::write_live(&g.name, &to, &connecting);
        let options = Options {
            to: to.clone(),
            max_blackout_ns: o.max_blackout_ns,
            streams: o.streams,
            max_precopy_ms: o.max_precopy_ms,
            on_timeout: OnTimeout::Go,
            verify: o.verify,
            key: o.key.clone(),
            guest_name: g.name.clone(),
            transport: o.transport,
            tls: o.tls.clone(),
            precopy_nice: 0,
            max_bandwidth: o.max_bandwidth,
        };
        // Published for the host service at most every 250 ms: this callback must keep up
        // with the progress lines, or the source stops writing them.
        let mut published = std::time::Instant::now();
        let result = api::call(&g.api, &Request::Migrate { options }, &mut |reply| {
            if let Reply::Progress(p) = reply {
                on_progress(&g.name, &to, Some(p));
                if published.elapsed() >= Duration::from_millis(250) {
                    published = std::time::Instant::now();
                    crate::host::write_live(&g.name, &to, p);
                }
                let s = format!(
                    "round {} | {} dirty | predicted {:.0} us",
                    p.round,
                    p.remaining_dirty,
                    p.predicted_blackout_ns as f64 / 1e3
                );
                set(&|r| r.state = s.clone());
            }
        });
        crate::host::clear_live(&g.name);
        let failure = match result {
            Ok(Reply::Done(Done::Migrated { report })) if report.in_doubt.is_some() => {
                let msg = format!(
                    "IN DOUBT: {} (blip resolve)",
                    report.in_doubt.as_deref().unwrap_or_default()
                );
                crate::host::record(&g.name, &to, Err(&msg), Some(&report));
                set(&|r| {
                    r.state = msg.clone();
                    r.ok = Some(false);
                });
                return;
            }
            Ok(Reply::Done(Done::Migrated { report })) => {
                crate::host::record(&g.name, &to, Ok(()), Some(&report));
                set(&|r| {
                    r.state = "migrated".into();
                    r.blackout_us = Some(report.blackout_ns as f64 / 1e3);
                    r.total_ms = Some(report.total_ns as f64 / 1e6);
                    r.ok = Some(true);
                    r.report = Some(report.clone());
                });
                return;
            }
            Ok(Reply::Error { message }) => message,
            Ok(_) => "the source blip ended the migration without a result".into(),
            Err(e) => blip_vmm::cli::error_chain(&e),
        };
        release();
        crate::host::record(&g.name, &to, Err(&failure), None);
        let e = format!("{}: {failure}", dest.url());
        set(&|r| r.tried.push(e.clone()));
        why.push(e);
    }
}

/// Drains `guests` to `o.to`, filling `rows` as it goes; returns when every guest is moved or
/// given up on. `stop` cancels the migrations under way (queued guests are not started).
pub fn run_drain(
    guests: &[Entry],
    o: &DrainOptions,
    rows: &Rows,
    stop: &AtomicBool,
    on_progress: OnProgress,
    mut tick: impl FnMut(bool),
) -> Result<(), Failure> {
    let key = o.key.as_deref().map(Key::load).transpose()?;
    let tls = o.tls.as_ref().map(Tls::load).transpose()?;
    let dests = Arc::new(Mutex::new(classify(&o.to, &key, tls.as_ref())));
    let mut order: Vec<Entry> = guests.to_vec();
    order.sort_by(|a, b| b.mem_size.cmp(&a.mem_size).then(a.name.cmp(&b.name)));
    let (tx, rx) = crossbeam_channel::unbounded();
    for g in &order {
        rows.lock().unwrap_or_else(|e| e.into_inner()).insert(
            g.name.clone(),
            Row {
                state: "queued".into(),
                ..Row::default()
            },
        );
        let _ = tx.send(g.clone());
    }
    drop(tx);
    // Set once `stop` is seen: queued guests are then not started.
    let cancelled_flag = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..o.parallel.max(1))
        .map(|_| {
            let (rx, rows, dests, o, key, tls, on_progress, cancelled) = (
                rx.clone(),
                rows.clone(),
                dests.clone(),
                o.clone(),
                key.clone(),
                tls.clone(),
                on_progress.clone(),
                cancelled_flag.clone(),
            );
            std::thread::spawn(move || {
                for g in rx {
                    let set = |f: &dyn Fn(&mut Row)| {
                        if let Some(r) = rows
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_mut(&g.name)
                        {
                            f(r);
                        }
                    };
                    if cancelled.load(Ordering::Acquire) {
                        set(&|r| {
                            r.state = "cancelled: not started, stays here".into();
                            r.ok = Some(false);
                        });
                        continue;
                    }
                    move_guest(&g, &dests, &o, &key, tls.as_ref(), &set, &on_progress);
                }
            })
        })
        .collect();
    let mut cancelled = false;
    loop {
        let done = workers.iter().all(|w| w.is_finished());
        tick(done);
        if done {
            break;
        }
        if stop.load(Ordering::Relaxed) && !cancelled {
            cancelled = true;
            cancelled_flag.store(true, Ordering::Release);
            // Ctrl-C: cancel what runs; queued guests are simply not started.
            for g in guests {
                let _ = api::call(&g.api, &Request::Cancel, &mut |_| {});
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// The names of the guests a finished drain did not move.
pub fn failed(rows: &BTreeMap<String, Row>) -> Vec<String> {
    rows.iter()
        .filter(|(_, r)| r.ok != Some(true))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Prints the final table (or JSON) and turns failures into the command's error.
pub fn finish(rows: &BTreeMap<String, Row>, json: bool) -> Result<i32, Failure> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|(n, r)| {
                vec![
                    n.clone(),
                    r.to.clone(),
                    r.blackout_us.map_or("-".into(), |b| format!("{b:.1} us")),
                    r.total_ms.map_or("-".into(), |t| format!("{t:.1} ms")),
                    r.state.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            blip_vmm::cli::table(
                &["GUEST", "TO", "BLACKOUT", "TOTAL", "RESULT"],
                &cells,
                &[false, false, true, true, false]
            )
        );
    }
    let failed = failed(rows);
    if failed.is_empty() {
        if !json {
            println!(
                "blip drain: all {} guest(s) migrated; this host runs none",
                rows.len()
            );
        }
        Ok(0)
    } else {
        Err(Failure(format!(
            "drain incomplete: {} guest(s) still running here: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

/// The live view on stderr (redrawn in place on a terminal).
pub fn render_live(rows: &BTreeMap<String, Row>, last: &mut String) {
    let view = live_view(rows, std::io::stderr().is_terminal());
    if view != *last {
        if std::io::stderr().is_terminal() && !last.is_empty() {
            eprint!("\x1b[{}A", last.lines().count());
        }
        eprint!("{view}");
        *last = view;
    }
}

/// The drain's live table; on a terminal every line ends by clearing the rest of the line, so
/// a state shorter than the one it overwrites ("migrated" over "migrating") leaves no tail.
pub fn live_view(rows: &BTreeMap<String, Row>, tty: bool) -> String {
    let nw = rows.keys().map(|n| n.len()).max().unwrap_or(0);
    let tw = rows.values().map(|r| r.to.len()).max().unwrap_or(0);
    let clear = if tty { "\x1b[K" } else { "" };
    rows.iter()
        .map(|(n, r)| format!("  {n:<nw$} -> {:<tw$} {}{clear}\n", r.to, r.state))
        .collect()
}

/// Runs the drain.
pub fn drain(args: &DrainArgs, stop: &AtomicBool) -> Result<i32, Failure> {
    let (a, key) = (&args.plan, args.auth.resolve().map_err(Failure)?);
    if let Some(k) = &key {
        Key::load(k)?;
    }
    let tls = args.tls.resolve().map_err(Failure)?;
    if let Some(f) = &tls {
        Tls::load(f)?;
    }
    for t in &a.to {
        let _: blip_transport::tcp::Endpoint = t.parse()?;
    }
    let guests = registry::list();
    if guests.is_empty() {
        println!(
            "blip drain: no guests registered in {}; nothing to do",
            registry::run_dir().display()
        );
        return Ok(0);
    }
    if !a.json {
        println!(
            "blip drain: {} guest(s), {} destination(s), {} at a time",
            guests.len(),
            a.to.len(),
            a.parallel.max(1)
        );
    }
    let o = DrainOptions {
        to: a.to.clone(),
        parallel: a.parallel,
        max_blackout_ns: a.max_blackout,
        max_precopy_ms: a.max_precopy_time / 1_000_000,
        verify: a.verify,
        streams: a.streams,
        transport: a.transport,
        max_bandwidth: a.max_bandwidth,
        key,
        tls,
    };
    let rows: Rows = Arc::default();
    let mut last = String::new();
    let view = rows.clone();
    run_drain(&guests, &o, &rows, stop, Arc::new(|_, _, _| {}), |_| {
        render_live(&view.lock().unwrap_or_else(|e| e.into_inner()), &mut last)
    })?;
    let rows = rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
    finish(&rows, a.json)
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_view_clears_each_line_on_a_terminal() {
        let mut rows = BTreeMap::new();
        for (n, st) in [("a-long-guest-name-here", "migrating"), ("b", "migrated")] {
            rows.insert(
                n.to_string(),
                Row {
                    to: "tcp://10.0.0.2:7000".into(),
                    state: st.into(),
                    ..Row::default()
                },
            );
        }
        let v = live_view(&rows, true);
        assert!(v.lines().all(|l| l.ends_with("\x1b[K")), "{v:?}");
        assert_eq!(
            v.lines().map(|l| l.find(" -> ")).collect::<Vec<_>>(),
            vec![Some(24), Some(24)]
        );
        assert!(!live_view(&rows, false).contains('\x1b'));
    }

    use super::*;

    fn host(url: &str, free_mem: u64, free_vcpus: u32) -> Dest {
        Dest::Host {
            url: url.into(),
            planned: HostReply {
                host: url.into(),
                free_mem,
                free_vcpus,
                guests: 0,
                incoming: 0,
                drained: 0,
                address: String::new(),
            },
        }
    }

    fn guest(mem: u64, vcpus: usize) -> Entry {
        Entry {
            name: "g".into(),
            pid: 1,
            vcpus,
            mem_size: mem,
            started: 0,
            api: "/x".into(),
        }
    }

    #[test]
    fn hosts_are_ranked_by_free_vcpus_then_memory_and_full_ones_skipped() {
        let mut d = vec![
            host("a", 1 << 30, 2),
            host("b", 4 << 30, 2),
            host("c", 8 << 30, 4),
            host("tiny", 16 << 20, 64),
            Dest::Receiver {
                url: "r".into(),
                used: false,
            },
        ];
        let g = guest(64 << 20, 1);
        assert_eq!(candidates(&d, &g, &[]), [2, 1, 0, 4]);
        assert_eq!(candidates(&d, &g, &[2]), [1, 0, 4]);
        // Reserving what a drain sends there changes the ranking.
        for _ in 0..3 {
            reserve(&mut d[2], &g, 1);
        }
        assert_eq!(candidates(&d, &g, &[])[0], 1);
        reserve(&mut d[4], &g, 1);
        assert!(
            !candidates(&d, &g, &[]).contains(&4),
            "a receiver takes one"
        );
    }
}
