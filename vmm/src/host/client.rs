//! Clients of the host service: the network requests another host sends ([`info`],
//! [`prepare`]) and the thin `blip host ...` commands that talk to this host's API socket.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blip_transport::auth::Key;
use blip_transport::protocol::{
    self, HostReply, HostRequest, Message, ProtocolError, HOST_INFO, HOST_PREPARE,
};
use blip_transport::tcp::{self, Endpoint};
use blip_transport::tls::{Conn, Tls};
use blip_vmm::cli::{DrainPlan, HostCmd};
use blip_vmm::migration::session::Session;
use blip_vmm::migration::{peer_timeout, MigrationError};
use blip_vmm::registry::Entry;
use serde_json::{json, Value};

use super::{http, HostError};
use crate::Failure;

/// Asks the host service at `url` what it has free.
pub fn info(url: &str, key: Option<Key>, tls: Option<&Tls>) -> Result<HostReply, HostError> {
    ask(
        url,
        key,
        tls,
        HostRequest {
            op: HOST_INFO,
            name: String::new(),
            mem_size: 0,
            vcpus: 0,
        },
    )
}

/// Asks the host service at `url` to start a receiver for guest `g`; the reply's `address` is
/// where to migrate it.
pub fn prepare(
    url: &str,
    key: Option<Key>,
    tls: Option<&Tls>,
    g: &Entry,
) -> Result<HostReply, HostError> {
    ask(
        url,
        key,
        tls,
        HostRequest {
            op: HOST_PREPARE,
            name: g.name.clone(),
            mem_size: g.mem_size,
            vcpus: g.vcpus as u32,
        },
    )
}

/// Did the peer behave like something that is not a host service (closed on our request, or
/// answered it with something other than a Hello)?
fn not_a_service(e: &MigrationError) -> bool {
    match e {
        MigrationError::Aborted(_) | MigrationError::Io(_) | MigrationError::Unexpected { .. } => {
            true
        }
        MigrationError::Protocol(p) => matches!(
            p,
            ProtocolError::Closed | ProtocolError::Io(_) | ProtocolError::Unexpected { .. }
        ),
        _ => false,
    }
}

fn ask(
    url: &str,
    key: Option<Key>,
    tls: Option<&Tls>,
    req: HostRequest,
) -> Result<HostReply, HostError> {
    let unreachable = |e: std::io::Error| HostError::Unreachable(url.to_string(), e);
    let ep = Endpoint::from_str(url)
        .map_err(|e| unreachable(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let c = tcp::connect(ep.address(), Duration::from_secs(5)).map_err(unreachable)?;
    c.set_read_timeout(Some(peer_timeout()))?;
    c.set_write_timeout(Some(peer_timeout()))?;
    let mut c = match tls {
        None => Conn::from(c),
        Some(t) => t
            .connect(c, &ep.address().host_name())
            .map_err(|e| HostError::Session(url.to_string(), e.into()))?,
    };
    protocol::write_message(&mut c, &Message::HostRequest(req))
        .map_err(|_| HostError::NotAService(url.to_string()))?;
    match Session::open_source(&mut c, key) {
        Ok(_) => {}
        Err(e) if not_a_service(&e) => return Err(HostError::NotAService(url.to_string())),
        Err(MigrationError::Refused(r)) => return Err(HostError::Refused(url.to_string(), r)),
        Err(e) => return Err(HostError::Session(url.to_string(), e)),
    }
    match tcp::read_message_within(&mut c, peer_timeout()).map(|f| f.msg) {
        Ok(Message::HostReply(r)) => Ok(r),
        Ok(Message::Refuse { reason }) | Ok(Message::Abort { reason }) => {
            Err(HostError::Refused(url.to_string(), reason))
        }
        Ok(other) => Err(HostError::Unexpected(
            url.to_string(),
            other.kind().to_string(),
        )),
        Err(e) => Err(HostError::Session(url.to_string(), e.into())),
    }
}

/// The host API socket of `blip host ... --api`.
fn api(p: &Option<std::path::PathBuf>) -> std::path::PathBuf {
    p.clone().unwrap_or_else(super::default_api)
}

/// One call; a non-2xx status becomes the command's error (its `error` field).
fn call(sock: &Path, method: &str, target: &str, body: Option<&Value>) -> Result<Value, Failure> {
    let (status, v) = http::call(sock, method, target, body, Duration::from_secs(120))?;
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(Failure(
            v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("the host API answered {status}")),
        ))
    }
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |b| format!("{} MiB", b >> 20))
}

/// `blip host <command>` other than `serve`.
pub fn run(
    api_path: &Option<std::path::PathBuf>,
    cmd: &HostCmd,
    stop: &AtomicBool,
) -> Result<i32, Failure> {
    let sock = api(api_path);
    match cmd {
        HostCmd::Serve(_) => unreachable!("dispatched by main"),
        HostCmd::Status { json } => {
            let v = call(&sock, "GET", "/host", None)?;
            if *json {
                println!("{v}");
            } else {
                println!(
                    "host {} on {}: {} guest(s), {} incoming, free {} and {} vCPU(s){}",
                    v["host"].as_str().unwrap_or("?"),
                    v["listen"].as_str().unwrap_or("?"),
                    v["guests"],
                    v["incoming"],
                    mib(&v["free_mem"]),
                    v["free_vcpus"],
                    if v["drained"].as_bool() == Some(true) {
                        ", DRAINED (takes no guests; blip host undrain)"
                    } else {
                        ""
                    }
                );
            }
            Ok(0)
        }
        HostCmd::Guests { json } => {
            let v = call(&sock, "GET", "/guests", None)?;
            if *json {
                println!("{v}");
                return Ok(0);
            }
            let cells: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    vec![
                        g["name"].as_str().unwrap_or("?").to_string(),
                        g["pid"].to_string(),
                        g["vcpus"].to_string(),
                        mib(&g["mem_size"]),
                        g["state"].as_str().unwrap_or("?").to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                blip_vmm::cli::table(
                    &["NAME", "PID", "VCPUS", "MEM", "STATE"],
                    &cells,
                    &[false, true, true, true, false]
                )
            );
            Ok(0)
        }
        HostCmd::Guest { name } => {
            let v = call(&sock, "GET", &format!("/guests/{name}"), None)?;
            println!("{v}");
            Ok(0)
        }
        HostCmd::Run {
            name,
            snapshot,
            args,
        } => {
            let mut body = json!({ "name": name, "args": args });
            if let Some(f) = snapshot {
                body["snapshot"] = json!(std::path::absolute(f)?);
            }
            let v = call(&sock, "POST", "/guests", Some(&body))?;
            println!(
                "guest {} runs (pid {}, API {})",
                v["name"].as_str().unwrap_or("?"),
                v["pid"],
                v["api"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        HostCmd::Stop {
            name,
            snapshot,
            timeout,
            force,
        } => {
            let mut body = json!({ "timeout_ms": timeout / 1_000_000, "force": force });
            if let Some(f) = snapshot {
                body["snapshot"] = json!(std::path::absolute(f)?);
            }
            let (status, v) = http::call(
                &sock,
                "DELETE",
                &format!("/guests/{name}"),
                Some(&body),
                Duration::from_nanos(*timeout) + Duration::from_secs(30),
            )?;
            if !(200..300).contains(&status) {
                return Err(Failure(v["error"].as_str().map_or_else(
                    || format!("the host API answered {status}"),
                    str::to_string,
                )));
            }
            println!(
                "guest {name} stopped (pid {}{}{})",
                v["pid"],
                if v["killed"].as_bool() == Some(true) {
                    ", killed"
                } else {
                    ""
                },
                match snapshot {
                    Some(f) => format!(", snapshot {}", f.display()),
                    None => String::new(),
                }
            );
            Ok(0)
        }
        HostCmd::Migrate {
            name,
            to,
            max_blackout,
            max_precopy_time,
            streams,
            transport,
            max_bandwidth,
            verify,
            json,
        } => {
            let body = json!({
                "to": [to], "verify": verify, "max_blackout_ns": max_blackout,
                "max_precopy_ms": max_precopy_time / 1_000_000, "streams": streams,
                "transport": transport, "max_bandwidth": max_bandwidth,
            });
            let v = call(
                &sock,
                "POST",
                &format!("/guests/{name}/migrate"),
                Some(&body),
            )?;
            follow(&sock, job_id(&v)?, Some(name), *json, stop)
        }
        HostCmd::Drain(DrainPlan {
            to,
            parallel,
            max_blackout,
            max_precopy_time,
            streams,
            transport,
            max_bandwidth,
            verify,
            json,
        }) => {
            let body = json!({
                "to": to, "parallel": parallel, "verify": verify, "max_blackout_ns": max_blackout,
                "max_precopy_ms": max_precopy_time / 1_000_000, "streams": streams,
                "transport": transport, "max_bandwidth": max_bandwidth,
            });
            let v = call(&sock, "POST", "/drain", Some(&body))?;
            follow(&sock, job_id(&v)?, None, *json, stop)
        }
        HostCmd::Snapshot { name, file, stop } => {
            let path = std::path::absolute(file)?;
            let v = call(
                &sock,
                "POST",
                &format!("/guests/{name}/snapshot"),
                Some(&json!({ "path": path, "stop": stop })),
            )?;
            println!("{v}");
            Ok(0)
        }
        HostCmd::Cancel { name } => {
            match name {
                Some(n) => {
                    call(&sock, "POST", &format!("/guests/{n}/cancel"), None)?;
                    println!("{n}: migration cancelled; the guest stays here");
                }
                None => {
                    call(&sock, "POST", "/drain/cancel", None)?;
                    println!("drain cancelled: migrations under way stop, no more start");
                }
            }
            Ok(0)
        }
        HostCmd::Undrain => {
            call(&sock, "POST", "/undrain", None)?;
            println!("host undrained: it takes guests again");
            Ok(0)
        }
        HostCmd::Migrations { last, json } => {
            let v = call(&sock, "GET", &format!("/migrations?last={last}"), None)?;
            if *json {
                println!("{v}");
                return Ok(0);
            }
            let cells: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        r["ended"].to_string(),
                        r["guest"].as_str().unwrap_or("?").to_string(),
                        r["to"].as_str().unwrap_or("?").to_string(),
                        r["report"]["blackout_ns"]
                            .as_u64()
                            .map_or("-".into(), |b| format!("{:.1} us", b as f64 / 1e3)),
                        if r["ok"].as_bool() == Some(true) {
                            "ok".to_string()
                        } else {
                            format!("FAILED: {}", r["error"].as_str().unwrap_or("?"))
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                blip_vmm::cli::table(
                    &["ENDED", "GUEST", "TO", "BLACKOUT", "RESULT"],
                    &cells,
                    &[false, false, false, true, false]
                )
            );
            Ok(0)
        }
    }
}

fn job_id(v: &Value) -> Result<u64, Failure> {
    v["job"]
        .as_u64()
        .ok_or_else(|| Failure(format!("the host service started no job: {v}")))
}

/// Follows job `job` (a drain, or guest `single`'s move) until it ends, showing its own table,
/// and exits with its own result; Ctrl-C here stops following only (the service carries on).
fn follow(
    sock: &Path,
    job: u64,
    single: Option<&str>,
    json: bool,
    stop: &AtomicBool,
) -> Result<i32, Failure> {
    let mut last = String::new();
    loop {
        let v = call(sock, "GET", &format!("/jobs/{job}"), None)?;
        let rows: std::collections::BTreeMap<String, crate::drain::Row> =
            serde_json::from_value(v["rows"].clone()).unwrap_or_default();
        if !json {
            crate::drain::render_live(&rows, &mut last);
        }
        if v["running"].as_bool() != Some(true) {
            return match single {
                None => crate::drain::finish(&rows, json),
                Some(name) => finish_one(name, &rows, json),
            };
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!(
                "blip: stopped following; the host service carries on (job {job}: blip host status)"
            );
            return Ok(130);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The end of one guest's move: its own line (or its row as JSON) and its own verdict.
fn finish_one(
    name: &str,
    rows: &std::collections::BTreeMap<String, crate::drain::Row>,
    json: bool,
) -> Result<i32, Failure> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    }
    match rows.get(name) {
        Some(r) if r.ok == Some(true) => {
            if !json {
                println!(
                    "{name} migrated to {}: blackout {}, total {}",
                    r.to,
                    r.blackout_us.map_or("-".into(), |b| format!("{b:.1} us")),
                    r.total_ms.map_or("-".into(), |t| format!("{t:.1} ms"))
                );
            }
            Ok(0)
        }
        Some(r) => Err(Failure(format!(
            "{name} was not migrated{}: {}; it still runs here",
            if r.to.is_empty() {
                String::new()
            } else {
                format!(" to {}", r.to)
            },
            if r.tried.is_empty() {
                r.state.clone()
            } else {
                r.tried.join("; ")
            }
        ))),
        None => Err(Failure(format!(
            "{name} was not migrated: the job has no row for it"
        ))),
    }
}
