//! `tls`: what mutual TLS costs a migration. The same guest (128 MiB, 32 MiB of it dirtied at
//! full speed on 1 vCPU) migrates over loopback TCP between fresh `blip` processes, plain and
//! TLS alternately in one run (so both see the same machine load), a few times each; reported
//! per mode: pre-copy throughput (MB/s: bytes of the pre-copy rounds over their time) and VMM
//! blackout, then TLS/plain ratios. Certificates come from a throwaway CA made here (rcgen).
//! Both modes keep the shared key (HMAC) on, as operators run them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blip_vmm::migration::Report;
use serde_json::{json, Value};

const MEM: &str = "128M";
const GUEST: &str = "dirty ws=32 rate=max heartbeat period=1000";

/// A child blip, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `--tls-*` arguments of two nodes of one throwaway CA.
fn certs(dir: &Path) -> Result<[Vec<String>; 2], String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().map_err(e)?).map_err(e)?;
    let ca_file = dir.join("ca.crt");
    let write = |p: &Path, s: String| {
        std::fs::write(p, s).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write(&ca_file, ca.pem())?;
    let node = |n: &str| -> Result<Vec<String>, String> {
        let p = CertificateParams::new(vec!["127.0.0.1".to_string()]).map_err(e)?;
        let key = KeyPair::generate().map_err(e)?;
        let cert = p.signed_by(&key, &ca).map_err(e)?;
        let (c, k) = (dir.join(format!("{n}.crt")), dir.join(format!("{n}.key")));
        write(&c, cert.pem())?;
        write(&k, key.serialize_pem())?;
        Ok([
            ("--tls-cert", &c),
            ("--tls-key", &k),
            ("--tls-ca", &ca_file),
        ]
        .iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect())
    };
    Ok([node("a")?, node("b")?])
}

fn key_file(dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let k = dir.join("migration.key");
    let secret: [u8; 32] = blip_vmm::migration::random_bytes().map_err(|e| e.to_string())?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&k)
        .map_err(|e| format!("cannot create {}: {e}", k.display()))?;
    std::io::Write::write_all(&mut f, hex.as_bytes()).map_err(|e| e.to_string())?;
    Ok(k)
}

/// One migration: a fresh source and receiver, `tls` or not; the source's report.
fn once(
    bin: &Path,
    dir: &Path,
    key: &Path,
    tls: Option<&[Vec<String>; 2]>,
) -> Result<Report, String> {
    let api = dir.join("src.sock");
    let _ = std::fs::remove_file(&api);
    let src = Proc(
        Command::new(bin)
            .args([
                "run",
                "--mem",
                MEM,
                "--cmdline",
                GUEST,
                "--serial",
                "none",
                "--api",
            ])
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?,
    );
    let mut rx = Command::new(bin);
    rx.args([
        "receive",
        "--listen",
        "tcp://127.0.0.1:0",
        "--serial",
        "none",
        "--key",
    ])
    .arg(key)
    .arg("--api")
    .arg(dir.join("dst.sock"));
    if let Some(t) = tls {
        rx.args(&t[1]);
    }
    let mut rx = Proc(
        rx.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?,
    );
    let err = rx.0.stderr.take().ok_or("no receiver stderr")?;
    let mut url = None;
    let mut last = String::new();
    let mut lines = BufReader::new(err).lines();
    for l in lines.by_ref().map_while(Result::ok) {
        if let Some((_, u)) = l.split_once("waiting for an incoming migration on ") {
            url = Some(u.trim().to_string());
            break;
        }
        last = l;
    }
    // Keep draining its stderr (a closed pipe would fail its later writes).
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    let url = url.ok_or(format!(
        "the receiver never said where it listens (its last line: {last:?})"
    ))?;
    // The source's API is up and its guest has touched its working set.
    let start = Instant::now();
    while blip_vmm::api::call(&api, &blip_vmm::api::Request::Status, &mut |_| {}).is_err() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the source never answered".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut m = Command::new(bin);
    m.arg("migrate")
        .arg("--api")
        .arg(&api)
        .args(["--to", &url, "--json", "--max-precopy-time", "10s", "--key"])
        .arg(key);
    if let Some(t) = tls {
        m.args(&t[0]);
    }
    let o = m
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run blip migrate: {e}"))?;
    drop(src);
    if !matches!(o.status.code(), Some(0 | 5)) {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("unreadable report: {e}"))
}

/// Pre-copy throughput of one report, MB/s (10^6 bytes).
fn precopy_mbps(r: &Report) -> f64 {
    let (bytes, ns) = r
        .rounds
        .iter()
        .fold((0u64, 0u64), |(b, n), x| (b + x.bytes, n + x.duration_ns));
    if ns == 0 {
        0.0
    } else {
        bytes as f64 / ns as f64 * 1e3
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the scenario (`reps` migrations per mode, alternating) and prints its table.
pub fn run(bin: &Path, reps: u32) -> Value {
    let dir = std::env::temp_dir().join(format!("blip-bench-tls-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let r = (|| -> Result<Value, String> {
        let certs = certs(&dir)?;
        let key = key_file(&dir)?;
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for _ in 0..reps.max(1) {
            plain.push(once(bin, &dir, &key, None)?);
            tls.push(once(bin, &dir, &key, Some(&certs))?);
        }
        let row = |name: &str, rs: &[Report]| {
            let mbps = median(rs.iter().map(precopy_mbps).collect());
            let bo = median(rs.iter().map(|r| r.blackout_ns as f64 / 1e3).collect());
            println!(
                "tls | {name:<5} | {} migrations | pre-copy {mbps:>8.1} MB/s (median) | blackout {bo:>9.1} us (median) | per run MB/s {:?}",
                rs.len(),
                rs.iter().map(|r| (precopy_mbps(r) * 10.0).round() / 10.0).collect::<Vec<_>>()
            );
            (mbps, bo)
        };
        println!("tls | mode  | {MEM} guest, {GUEST:?}, loopback TCP, shared key on in both");
        let (p_mbps, p_bo) = row("plain", &plain);
        let (t_mbps, t_bo) = row("tls", &tls);
        let tput_ratio = if p_mbps > 0.0 { t_mbps / p_mbps } else { 0.0 };
        let bo_ratio = if p_bo > 0.0 { t_bo / p_bo } else { 0.0 };
        println!("tls | TLS/plain: pre-copy throughput x{tput_ratio:.2}, blackout x{bo_ratio:.2}");
        Ok(json!({
            "mem": MEM, "guest": GUEST, "reps": reps,
            "plain": { "precopy_mbps": p_mbps, "blackout_us": p_bo },
            "tls": { "precopy_mbps": t_mbps, "blackout_us": t_bo },
            "throughput_ratio": tput_ratio, "blackout_ratio": bo_ratio,
        }))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r.unwrap_or_else(|e| {
        println!("tls | failed: {e}");
        json!({ "error": e })
    })
}
