//! blip-soak: migrates one dirtying, heartbeating guest back and forth between fresh local blip
//! processes, drawing one random fault per hop (a lost or stalled control message, a corrupted
//! frame, a destination killed at a fault point, or none), and checks after every hop that the
//! guest runs on exactly one side and its heartbeats advance. In-doubt handovers are resolved
//! by the rule in ARCHITECTURE "In doubt". Every 10 hops and at the end the guest checks its
//! own memory.
//!
//! Usage: blip-soak [--hops N] [--seed S] [--out FILE.json] [--keep]
//!
//! Every process's stdout, stderr and serial output, and every `blip migrate`'s, are kept in a
//! scratch directory, removed at the end unless an invariant broke or `--keep` is given.
//!
//! Needs a debug build of `blip` (fault points are compiled out of release builds); it runs
//! the `blip` next to this binary unless `BLIP_BIN` says otherwise. Exits 1 when an invariant
//! broke (a guest lost or duplicated, wrong memory, stalled heartbeats).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blip_tests::relay::{Action, Dir, Relay};
use blip_tests::{blip, key_file, listen_url, Bg, DIRTY_RUN};
use blip_transport::protocol::MessageKind;

/// Every process's peer timeout (ms): faults resolve within a few of these.
const PEER_TIMEOUT_MS: u64 = 2000;

/// A small xorshift64* generator: the same seed draws the same faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The control messages a fault may hit, and the way each goes.
const CONTROL: [(MessageKind, &str, Option<Dir>); 9] = [
    (MessageKind::Hello, "Hello", None), // both sides send one
    (MessageKind::Offer, "Offer", Some(Dir::ToDest)),
    (MessageKind::Accept, "Accept", Some(Dir::ToSource)),
    (MessageKind::RoundEnd, "RoundEnd", Some(Dir::ToDest)),
    (MessageKind::RoundAck, "RoundAck", Some(Dir::ToSource)),
    (MessageKind::State, "State", Some(Dir::ToDest)),
    (MessageKind::Ready, "Ready", Some(Dir::ToSource)),
    (MessageKind::Commit, "Commit", Some(Dir::ToDest)),
    (MessageKind::Resumed, "Resumed", Some(Dir::ToSource)),
];

/// One hop's fault.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Drop the first control message of this kind going this way.
    Drop(usize, Dir),
    /// Stall the first control message of this kind going this way past the peer timeout.
    Stall(usize, Dir),
    /// Flip a bit of frame `seq` on connection `conn` going `dir`, at byte `at` (mod length).
    Corrupt {
        conn: usize,
        dir: Dir,
        seq: u64,
        at: u64,
        bit: u8,
    },
    /// Kill the destination at this fault point (`BLIP_FAULT=<point>:kill`).
    Kill(&'static str),
}

impl Fault {
    fn draw(rng: &mut Rng) -> Fault {
        let dir_of = |rng: &mut Rng, i: usize| {
            CONTROL[i].2.unwrap_or(if rng.below(2) == 0 {
                Dir::ToDest
            } else {
                Dir::ToSource
            })
        };
        match rng.below(5) {
            0 => Fault::None,
            1 => {
                let i = rng.below(CONTROL.len() as u64) as usize;
                Fault::Drop(i, dir_of(rng, i))
            }
            2 => {
                let i = rng.below(CONTROL.len() as u64) as usize;
                Fault::Stall(i, dir_of(rng, i))
            }
            3 => {
                // Connection 0 is control (a few frames each way), 1 the data stream (pages
                // toward the destination).
                let conn = rng.below(2) as usize;
                let (dir, seq) = if conn == 0 {
                    let d = if rng.below(2) == 0 {
                        Dir::ToDest
                    } else {
                        Dir::ToSource
                    };
                    (d, rng.below(4))
                } else {
                    (Dir::ToDest, rng.below(40))
                };
                Fault::Corrupt {
                    conn,
                    dir,
                    seq,
                    at: rng.next(),
                    bit: rng.below(8) as u8,
                }
            }
            _ => Fault::Kill(if rng.below(2) == 0 {
                "dest-precopy"
            } else {
                "dest-state"
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Drop(..) => "drop",
            Fault::Stall(..) => "stall",
            Fault::Corrupt { .. } => "corrupt",
            Fault::Kill(_) => "kill",
        }
    }

    fn describe(&self) -> String {
        let d = |d: &Dir| match d {
            Dir::ToDest => "->dst",
            Dir::ToSource => "->src",
        };
        match self {
            Fault::None => "none".into(),
            Fault::Drop(i, dir) => format!("drop {}{}", CONTROL[*i].1, d(dir)),
            Fault::Stall(i, dir) => format!("stall {}{}", CONTROL[*i].1, d(dir)),
            Fault::Corrupt { conn, dir, seq, .. } => {
                format!("corrupt conn{conn}{} frame {seq}", d(dir))
            }
            Fault::Kill(p) => format!("kill dst at {p}"),
        }
    }
}

/// The relay for a hop's fault; `fired` turns true when the fault hit a frame.
fn relay_for(url: &str, fault: Fault, fired: Arc<AtomicBool>) -> Relay {
    Relay::start(url, move |f| {
        match fault {
            Fault::Drop(i, dir) | Fault::Stall(i, dir) => {
                if f.conn == 0
                    && f.dir == dir
                    && f.kind == CONTROL[i].0 as u16
                    && !fired.swap(true, Ordering::SeqCst)
                {
                    return if matches!(fault, Fault::Drop(..)) {
                        Action::Drop
                    } else {
                        Action::Delay(Duration::from_millis(PEER_TIMEOUT_MS + 1500))
                    };
                }
            }
            Fault::Corrupt {
                conn,
                dir,
                seq,
                at,
                bit,
            } => {
                if f.conn == conn
                    && f.dir == dir
                    && f.seq == seq
                    && !fired.swap(true, Ordering::SeqCst)
                {
                    let n = f.bytes.len() as u64;
                    f.bytes[(at % n) as usize] ^= 1 << bit;
                }
            }
            Fault::None | Fault::Kill(_) => {}
        }
        Action::Forward
    })
}

/// What one side looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Obs {
    /// The process has exited.
    Gone,
    /// Alive, but its control API does not answer (a receiver still waiting, or exiting).
    Silent,
    Running,
    InDoubt,
}

impl Obs {
    fn name(&self) -> &'static str {
        match self {
            Obs::Gone => "gone",
            Obs::Silent => "silent",
            Obs::Running => "running",
            Obs::InDoubt => "in-doubt",
        }
    }
}

struct Soak {
    dir: PathBuf,
    run_dir: PathBuf,
    key: String,
    next_id: usize,
}

impl Soak {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BLIP_PEER_TIMEOUT_MS".into(), PEER_TIMEOUT_MS.to_string()),
            ("BLIP_RUN_DIR".into(), self.run_dir.display().to_string()),
        ]
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = blip(args);
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }

    fn serial(&self, b: &Bg) -> PathBuf {
        self.dir.join(format!("{}.serial", b.name))
    }

    fn fresh_name(&mut self) -> String {
        self.next_id += 1;
        format!("g{}", self.next_id)
    }

    fn start(&self, name: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Bg {
        let env = self.env();
        let mut e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        e.extend_from_slice(extra_env);
        Bg::start(&self.dir, name, args, &e)
    }

    /// A fresh guest (`blip run`), its API answering.
    fn source(&mut self) -> Bg {
        let name = self.fresh_name();
        let serial = self.dir.join(format!("{name}.serial"));
        let mut args = DIRTY_RUN.to_vec();
        args.extend_from_slice(&["--serial", serial.to_str().unwrap()]);
        let mut s = self.start(&name, &args, &[]);
        s.wait_api();
        s
    }

    /// A keyed receiver and its URL.
    fn receiver(&mut self, fault_env: &[(&str, &str)]) -> (Bg, String) {
        let name = self.fresh_name();
        let serial = self.dir.join(format!("{name}.serial"));
        let mut r = self.start(
            &name,
            &[
                "receive",
                "--listen",
                "tcp://127.0.0.1:0",
                "--key",
                &self.key,
                "--serial",
                serial.to_str().unwrap(),
            ],
            fault_env,
        );
        let url = listen_url(&mut r);
        (r, url)
    }

    /// `blip status` as JSON; None when it does not answer within 1.5 s (a receiver that
    /// serves no API yet holds the connection until the client's own 5 s deadline).
    fn status(&self, b: &Bg) -> Option<serde_json::Value> {
        use std::io::Read;
        let mut c = self
            .cmd(&["status", "--api", b.api.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let start = Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().ok()? {
                break st;
            }
            if start.elapsed() > Duration::from_millis(1500) {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = Vec::new();
        c.stdout.take()?.read_to_end(&mut out).ok()?;
        if !st.success() {
            return None;
        }
        serde_json::from_slice(&out).ok()
    }

    fn observe(&self, b: &mut Bg) -> Obs {
        if !b.alive() {
            return Obs::Gone;
        }
        match self.status(b) {
            Some(s) if s["state"] == "running" => Obs::Running,
            Some(s) if s["state"] == "in-doubt" => Obs::InDoubt,
            _ if !b.alive() => Obs::Gone,
            _ => Obs::Silent,
        }
    }

    /// The final observation of a side that was `before` when the hop settled. A side that
    /// answered "running" or "in-doubt" and was not discarded since, whose process is alive,
    /// but whose status call now misses its 1.5 s limit is asked again for up to 30 s before it
    /// counts as silent: on a loaded host (load average 25-30 here) a status call can take
    /// longer, and a judge that reads that as "no guest here" reports a guest lost that runs.
    fn observe_again(
        &self,
        b: &mut Bg,
        before: Obs,
        resolution: &Option<(&str, Vec<(bool, &str)>)>,
        on_dest: bool,
    ) -> Obs {
        let discarded = resolution
            .as_ref()
            .is_some_and(|(_, steps)| steps.iter().any(|(d, w)| *d == on_dest && *w == "discard"));
        let start = Instant::now();
        loop {
            let o = self.observe(b);
            let patient = matches!(before, Obs::Running | Obs::InDoubt) && !discarded;
            if o != Obs::Silent || !patient || start.elapsed() > Duration::from_secs(30) {
                return o;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn heartbeat(&self, b: &Bg) -> u64 {
        self.status(b)
            .and_then(|s| s["last_heartbeat"].as_u64())
            .unwrap_or(0)
    }

    /// `blip resolve --api SOCK resume|discard`; true when it was accepted.
    fn resolve(&self, b: &Bg, what: &str) -> bool {
        self.cmd(&["resolve", "--api", b.api.to_str().unwrap(), what])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// `blip migrate` from `src` to `to`, stdout and stderr to files (hang guard 180 s).
    fn migrate(&self, src: &Bg, to: &str, hop: usize) -> (Option<i32>, String) {
        let out = self.dir.join(format!("hop{hop}.migrate.out"));
        let err = self.dir.join(format!("hop{hop}.migrate.err"));
        let mut c = self.cmd(&[
            "migrate",
            "--api",
            src.api.to_str().unwrap(),
            "--to",
            to,
            "--json",
            "--key",
            &self.key,
            "--max-precopy-time",
            "5s",
        ]);
        c.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let mut child = c.spawn().expect("spawn blip migrate");
        let start = Instant::now();
        let code = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st.code();
            }
            if start.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, std::fs::read_to_string(&err).unwrap_or_default())
    }

    /// Has `b` check its memory; true when its serial says `check: ok`. The guest exits.
    fn check(&self, b: &mut Bg) -> bool {
        let ok = self
            .cmd(&["check", "--api", b.api.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let start = Instant::now();
        while b.alive() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let serial = std::fs::read_to_string(self.serial(b)).unwrap_or_default();
        ok && !b.alive() && serial.contains("check: ok")
    }
}

#[derive(Default)]
struct Tally {
    hops: usize,
    faults: BTreeMap<String, usize>,
    faults_fired: BTreeMap<String, usize>,
    moved: usize,
    target_missed: usize,
    failed: usize,
    in_doubt: usize,
    other_exit: usize,
    resolutions: BTreeMap<String, usize>,
    guests_lost: usize,
    duplicates: usize,
    wrong_memory: usize,
    heartbeat_stalls: usize,
    checks: usize,
    violations: Vec<String>,
}

fn bump(m: &mut BTreeMap<String, usize>, k: &str) {
    *m.entry(k.to_string()).or_default() += 1;
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until both sides are settled: each gone, running or in doubt (a silent destination
/// counts as holding no guest once it has had time to give up), the same twice in a row, and
/// not both running (a source still shutting down may answer for a moment).
fn settle(s: &Soak, a: &mut Bg, b: &mut Bg) -> (Obs, Obs) {
    let start = Instant::now();
    let grace = Duration::from_millis(2 * PEER_TIMEOUT_MS + 1000);
    let mut prev = None;
    loop {
        let oa = s.observe(a);
        let ob = s.observe(b);
        let t = start.elapsed();
        let unsettled = oa == Obs::Silent
            || (ob == Obs::Silent && t < grace)
            || (oa == Obs::Running && ob == Obs::Running && t < Duration::from_secs(10));
        if (!unsettled && prev == Some((oa, ob))) || t > Duration::from_secs(30) {
            return (oa, ob);
        }
        prev = Some((oa, ob));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (up to 15 s) for a discarded side to exit.
fn wait_gone(b: &mut Bg) -> bool {
    let start = Instant::now();
    while b.alive() {
        if start.elapsed() > Duration::from_secs(15) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn main() {
    let mut hops = 20usize;
    let mut seed = 1u64;
    let mut out: Option<PathBuf> = None;
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--hops" => hops = val().parse().unwrap_or_else(|_| usage("bad --hops")),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage("bad --seed")),
            "--out" => out = Some(PathBuf::from(val())),
            "--keep" => keep = true,
            "-h" | "--help" => usage(""),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if std::env::var_os("BLIP_BIN").is_none() {
        let exe = std::env::current_exe().expect("current_exe");
        std::env::set_var("BLIP_BIN", exe.with_file_name("blip"));
    }
    let run_dir = std::env::var_os("BLIP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(blip_tests::default_run_dir);
    std::fs::create_dir_all(&run_dir).unwrap();
    let dir = blip_tests::scratch("soak");
    let key = key_file(&dir, "migration.key").display().to_string();
    let mut soak = Soak {
        dir: dir.clone(),
        run_dir,
        key,
        next_id: 0,
    };
    println!(
        "blip-soak: {hops} hops, seed {seed}, blip {}, files in {}",
        blip_tests::blip_bin().display(),
        dir.display()
    );
    let mut rng = Rng::new(seed);
    let mut t = Tally::default();
    let began = Instant::now();
    let mut a = soak.source();
    for hop in 1..=hops {
        let hop_start = Instant::now();
        let fault = Fault::draw(&mut rng);
        bump(&mut t.faults, fault.kind());
        let fault_env: Vec<(&str, String)> = match fault {
            Fault::Kill(p) => vec![("BLIP_FAULT", format!("{p}:kill"))],
            _ => vec![],
        };
        let fe: Vec<(&str, &str)> = fault_env.iter().map(|(k, v)| (*k, &v[..])).collect();
        let (mut b, url) = soak.receiver(&fe);
        let fired = Arc::new(AtomicBool::new(false));
        let relay = relay_for(&url, fault, fired.clone());
        let h0 = soak.heartbeat(&a);
        let (code, merr) = soak.migrate(&a, &relay.url, hop);
        let outcome = match code {
            Some(0) => {
                t.moved += 1;
                "moved"
            }
            Some(5) => {
                t.moved += 1;
                t.target_missed += 1;
                "moved(target missed)"
            }
            Some(6) => {
                t.in_doubt += 1;
                "in-doubt"
            }
            Some(2) => {
                t.failed += 1;
                "failed"
            }
            _ => {
                t.other_exit += 1;
                "other"
            }
        };
        let (oa, ob) = settle(&soak, &mut a, &mut b);
        drop(relay);
        // Kill faults fire in the destination: it died by SIGKILL.
        let fired = match fault {
            Fault::None => false,
            Fault::Kill(_) => {
                b.child.try_wait().ok().flatten().and_then(|s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.signal()
                }) == Some(9)
            }
            _ => fired.load(Ordering::SeqCst),
        };
        if fired {
            bump(&mut t.faults_fired, fault.kind());
        }
        // Resolve an in-doubt handover by the documented rule.
        let resolution = match (oa, ob) {
            (Obs::InDoubt, Obs::Running) => Some(("discard-source", vec![(false, "discard")])),
            (Obs::Running, Obs::InDoubt) => Some(("discard-destination", vec![(true, "discard")])),
            (Obs::InDoubt, Obs::InDoubt) => {
                Some(("both-in-doubt", vec![(true, "discard"), (false, "resume")]))
            }
            (Obs::InDoubt, _) => Some(("resume-source-alone", vec![(false, "resume")])),
            (_, Obs::InDoubt) => Some(("resume-destination-alone", vec![(true, "resume")])),
            _ => None,
        };
        let mut notes = Vec::new();
        if let Some((kind, steps)) = &resolution {
            bump(&mut t.resolutions, kind);
            for (on_dest, what) in steps {
                let side = if *on_dest { &mut b } else { &mut a };
                if !soak.resolve(side, what) {
                    notes.push(format!("resolve {what} on {} refused", side.name));
                }
                if *what == "discard" && !wait_gone(side) {
                    notes.push(format!("{} did not exit after discard", side.name));
                }
            }
        }
        // A destination still silent holds no guest: it is still waiting, or gave up.
        let (fa, fb) = (
            soak.observe_again(&mut a, oa, &resolution, false),
            soak.observe_again(&mut b, ob, &resolution, true),
        );
        let runs_a = fa == Obs::Running;
        let runs_b = fb == Obs::Running;
        let mut broke = None;
        let survivor = match (runs_a, runs_b) {
            (true, false) => Some(false),
            (false, true) => Some(true),
            (true, true) => {
                t.duplicates += 1;
                broke = Some("DUPLICATE: the guest runs on both sides");
                Some(false)
            }
            (false, false) => {
                t.guests_lost += 1;
                broke = Some("GUEST LOST: it runs on neither side");
                None
            }
        };
        let mut hb = String::new();
        if let Some(on_dest) = survivor {
            let (surv, other) = if on_dest {
                (&mut b, &mut a)
            } else {
                (&mut a, &mut b)
            };
            let _ = other.child.kill();
            let _ = other.child.wait();
            let start = Instant::now();
            let mut h1 = soak.heartbeat(surv);
            while h1 <= h0 && start.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(50));
                h1 = soak.heartbeat(surv);
            }
            hb = format!("hb {h0}->{h1}");
            if h1 <= h0 && broke.is_none() {
                t.heartbeat_stalls += 1;
                broke = Some("HEARTBEATS STALLED on the survivor");
            }
        }
        let where_ = match survivor {
            Some(true) => b.name.clone(),
            Some(false) => a.name.clone(),
            None => "-".into(),
        };
        println!(
            "hop {hop:>4}: {:<28} {} migrate={:<21} src {}={:<8} dst {}={:<8} {:<26} guest on {:<5} {} {:.1}s{}",
            fault.describe(),
            if fired || matches!(fault, Fault::None) { "      " } else { "(miss)" },
            outcome,
            a.name,
            oa.name(),
            b.name,
            ob.name(),
            resolution.as_ref().map(|r| r.0).unwrap_or("-"),
            where_,
            hb,
            hop_start.elapsed().as_secs_f64(),
            if notes.is_empty() { String::new() } else { format!(" [{}]", notes.join("; ")) }
        );
        if let Some(what) = broke {
            let msg = format!(
                "hop {hop}: {what}; fault {}, migrate exit {code:?}, src {} {}, dst {} {}\n--- migrate stderr:\n{}\n--- src {} stderr:\n{}\n--- dst {} stderr:\n{}",
                fault.describe(),
                a.name,
                oa.name(),
                b.name,
                ob.name(),
                tail(&merr, 15),
                a.name,
                tail(&a.stderr(), 15),
                b.name,
                tail(&b.stderr(), 15)
            );
            eprintln!("{msg}");
            t.violations.push(msg);
        }
        t.hops = hop;
        // The guest goes on from the survivor (or a fresh one when it was lost).
        let mut next = match survivor {
            Some(true) => b,
            Some(false) => {
                drop(b);
                a
            }
            None => {
                drop(b);
                drop(a);
                soak.source()
            }
        };
        if hop % 10 == 0 || hop == hops {
            t.checks += 1;
            if soak.check(&mut next) {
                println!("hop {hop:>4}: memory check on {}: ok", next.name);
            } else {
                t.wrong_memory += 1;
                let msg = format!(
                    "hop {hop}: WRONG MEMORY: check on {} failed; serial tail:\n{}\nstderr:\n{}",
                    next.name,
                    tail(
                        &std::fs::read_to_string(soak.serial(&next)).unwrap_or_default(),
                        5
                    ),
                    tail(&next.stderr(), 10)
                );
                eprintln!("{msg}");
                t.violations.push(msg);
            }
            drop(next);
            if hop == hops {
                break;
            }
            next = soak.source();
        }
        a = next;
    }
    let secs = began.elapsed().as_secs_f64();
    report(&t, secs, seed, out.as_deref());
    let bad = t.guests_lost + t.duplicates + t.wrong_memory + t.heartbeat_stalls;
    if bad == 0 && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The helpers make a per-process run directory even when BLIP_RUN_DIR points elsewhere:
    // remove it when it stayed empty.
    let _ = std::fs::remove_dir(blip_tests::default_run_dir());
    std::process::exit(if bad == 0 { 0 } else { 1 });
}

fn usage(why: &str) -> ! {
    if !why.is_empty() {
        eprintln!("blip-soak: {why}");
    }
    eprintln!("usage: blip-soak [--hops N] [--seed S] [--out FILE.json] [--keep]");
    std::process::exit(if why.is_empty() { 0 } else { 2 });
}

fn report(t: &Tally, secs: f64, seed: u64, out: Option<&Path>) {
    let map = |m: &BTreeMap<String, usize>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let rows = [
        ("hops", t.hops.to_string()),
        ("seed", seed.to_string()),
        ("seconds", format!("{secs:.0}")),
        ("faults drawn", map(&t.faults)),
        ("faults that hit", map(&t.faults_fired)),
        (
            "migrations",
            format!(
                "moved {} (target missed {}), failed {}, in doubt {}, other {}",
                t.moved, t.target_missed, t.failed, t.in_doubt, t.other_exit
            ),
        ),
        ("in-doubt resolutions", map(&t.resolutions)),
        ("memory checks", t.checks.to_string()),
        ("guests lost", t.guests_lost.to_string()),
        ("duplicates", t.duplicates.to_string()),
        ("wrong memory", t.wrong_memory.to_string()),
        ("heartbeat stalls", t.heartbeat_stalls.to_string()),
    ];
    println!();
    for (k, v) in &rows {
        println!("| {k:<22} | {v} |");
    }
    if let Some(path) = out {
        let j = serde_json::json!({
            "hops": t.hops,
            "seed": seed,
            "seconds": secs,
            "faults": t.faults,
            "faults_fired": t.faults_fired,
            "migrations": {
                "moved": t.moved,
                "target_missed": t.target_missed,
                "failed": t.failed,
                "in_doubt": t.in_doubt,
                "other": t.other_exit,
            },
            "resolutions": t.resolutions,
            "memory_checks": t.checks,
            "guests_lost": t.guests_lost,
            "duplicates": t.duplicates,
            "wrong_memory": t.wrong_memory,
            "heartbeat_stalls": t.heartbeat_stalls,
            "violations": t.violations,
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&j).unwrap() + "\n") {
            eprintln!("blip-soak: cannot write {}: {e}", path.display());
        }
    }
}
