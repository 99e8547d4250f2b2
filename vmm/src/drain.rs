//! `blip drain`: migrate every guest registered on this host to the given destinations, at most
//! `--parallel` at once, with live progress and a final per-guest table. A guest whose
//! migration fails keeps running here, and the command exits non-zero naming it.
//!
//! Each `--to` is one waiting `blip receive` and takes one guest; guests beyond the number of
//! destinations are not moved (and are named as such).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blip_transport::auth::Key;
use blip_vmm::api::{self, Done, Reply, Request};
use blip_vmm::cli::DrainArgs;
use blip_vmm::migration::{OnTimeout, Options};
use blip_vmm::registry;

use crate::Failure;

#[derive(Clone, Debug, Default)]
struct Row {
    to: String,
    state: String,
    blackout_us: Option<f64>,
    total_ms: Option<f64>,
    ok: Option<bool>,
}

/// Runs the drain.
pub fn drain(a: &DrainArgs, stop: &AtomicBool) -> Result<i32, Failure> {
    let key = a.auth.resolve().map_err(Failure)?;
    if let Some(k) = &key {
        Key::load(k)?;
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
    let rows: Arc<Mutex<BTreeMap<String, Row>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let (tx, rx) = crossbeam_channel::unbounded();
    for (i, g) in guests.iter().enumerate() {
        let mut row = Row::default();
        match a.to.get(i) {
            Some(to) => {
                row.to = to.clone();
                row.state = "queued".into();
                let _ = tx.send((g.clone(), to.clone()));
            }
            None => {
                row.state = "no destination left: stays here".into();
                row.ok = Some(false);
            }
        }
        rows.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(g.name.clone(), row);
    }
    drop(tx);
    println!(
        "blip drain: {} guest(s), {} destination(s), {} at a time",
        guests.len(),
        a.to.len(),
        a.parallel.max(1)
    );
    let workers: Vec<_> = (0..a.parallel.max(1))
        .map(|_| {
            let rx = rx.clone();
            let rows = rows.clone();
            let key = key.clone();
            let max_blackout = a.max_blackout;
            std::thread::spawn(move || {
                for (g, to) in rx {
                    let set = |f: &dyn Fn(&mut Row)| {
                        if let Some(r) = rows
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_mut(&g.name)
                        {
                            f(r);
                        }
                    };
                    set(&|r| r.state = "connecting".into());
                    let options = Options {
                        to: to.clone(),
                        max_blackout_ns: max_blackout,
                        streams: 1,
                        max_precopy_ms: 60_000,
                        on_timeout: OnTimeout::Go,
                        verify: false,
                        key: key.clone(),
                        guest_name: String::new(),
                        transport: Default::default(),
                    };
                    let result = api::call(&g.api, &Request::Migrate { options }, &mut |reply| {
                        if let Reply::Progress(p) = reply {
                            let s = format!(
                                "round {} | {} dirty | predicted {:.0} us",
                                p.round,
                                p.remaining_dirty,
                                p.predicted_blackout_ns as f64 / 1e3
                            );
                            set(&|r| r.state = s.clone());
                        }
                    });
                    let failure = match result {
                        Ok(Reply::Done(Done::Migrated { report })) if report.in_doubt.is_some() => {
                            format!(
                                "IN DOUBT: {} (blip resolve)",
                                report.in_doubt.as_deref().unwrap_or_default()
                            )
                        }
                        Ok(Reply::Done(Done::Migrated { report })) => {
                            set(&|r| {
                                r.state = "migrated".into();
                                r.blackout_us = Some(report.blackout_ns as f64 / 1e3);
                                r.total_ms = Some(report.total_ns as f64 / 1e6);
                                r.ok = Some(true);
                            });
                            continue;
                        }
                        Ok(Reply::Error { message }) => message,
                        Ok(_) => "the source blip ended the migration without a result".into(),
                        Err(e) => blip_vmm::cli::error_chain(&e),
                    };
                    set(&|r| {
                        r.state = format!("FAILED: {failure}");
                        r.ok = Some(false);
                    });
                }
            })
        })
        .collect();

    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let done = workers.iter().all(|w| w.is_finished());
        let snapshot = rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let view: String = snapshot
            .iter()
            .map(|(n, r)| format!("  {n:<24} -> {:<24} {}\n", r.to, r.state))
            .collect();
        if view != last {
            if tty && !last.is_empty() {
                eprint!("\x1b[{}A", last.lines().count());
            }
            eprint!("{view}");
            last = view;
        }
        if done {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            // Ctrl-C: cancel what runs; queued guests are simply not started.
            for g in &guests {
                let _ = api::call(&g.api, &Request::Cancel, &mut |_| {});
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for w in workers {
        let _ = w.join();
    }
    let rows = rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "{:<24} {:<24} {:>12} {:>10}  RESULT",
        "GUEST", "TO", "BLACKOUT", "TOTAL"
    );
    for (n, r) in &rows {
        println!(
            "{:<24} {:<24} {:>12} {:>10}  {}",
            n,
            r.to,
            r.blackout_us.map_or("-".into(), |b| format!("{b:.1} us")),
            r.total_ms.map_or("-".into(), |t| format!("{t:.1} ms")),
            r.state
        );
    }
    let failed: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| r.ok != Some(true))
        .map(|(n, _)| n)
        .collect();
    if failed.is_empty() {
        println!(
            "blip drain: all {} guest(s) migrated; this host runs none",
            rows.len()
        );
        Ok(0)
    } else {
        Err(Failure(format!(
            "drain incomplete: {} guest(s) still running here: {}",
            failed.len(),
            failed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}
