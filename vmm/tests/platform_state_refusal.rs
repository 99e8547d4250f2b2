//! A destination that cannot build the PC platform refuses an offer carrying its state
//! (LAPIC, irqchip, PIT) with one line, before it builds a VM and before any page moves; the
//! same destination takes a minimal-platform offer. "Cannot" is simulated with the debug
//! build's `BLIP_FAULT=dest-no-irqchip:drop`. Real `blip receive`, real socket, real KVM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blip_transport::protocol::{self, Message, Offer, Role};
use blip_vmm::migration::cpu_fingerprint;
use blip_vmm::persist::{PIECE_CLOCK, PLATFORM_PIECES};

const WAITING: &str = "waiting for an incoming migration on ";

/// A run directory removed when the test is done with it (blip writes its migration slot there
/// after the offer, so removing it earlier left one behind per run).
struct RunDir(std::path::PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `blip receive --insecure` on a free loopback port, `BLIP_FAULT` set; its address, a channel
/// of its stderr lines and its run directory (keep it until the receiver has exited).
fn receiver(tag: &str) -> (Child, String, mpsc::Receiver<String>, RunDir) {
    let run = std::env::temp_dir().join(format!(
        "blip-platform-refusal-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&run).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(["receive", "--listen", "tcp://127.0.0.1:0", "--insecure"])
        .env("BLIP_FAULT", "dest-no-irqchip:drop")
        .env("BLIP_RUN_DIR", &run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("receiver printed its waiting line");
        if let Some((_, url)) = line.split_once(WAITING) {
            break url.trim().trim_start_matches("tcp://").to_string();
        }
    };
    (child, addr, rx, RunDir(run))
}

fn offer(state_pieces: u64) -> Offer {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (cpu_vendor, cpu_signature, cpu_features) = cpu_fingerprint(&kvm, 1);
    Offer {
        mem_size: 32 << 20,
        page_size: 4096,
        vcpus: 1,
        cpu_vendor,
        cpu_signature,
        cpu_features,
        tsc_khz: 0,
        streams: 1,
        state_pieces,
        guest_name: String::new(),
        transport: protocol::TRANSPORT_TCP,
    }
}

fn send_offer(addr: &str, o: Offer) -> Message {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let hello = Message::Hello {
        role: Role::Source,
        session: 7,
        nonce: [1; 32],
        host_id: 0,
        auth: protocol::AUTH_NONE,
    };
    protocol::write_message(&mut c, &hello).unwrap();
    let _ = protocol::read_message(&mut c).unwrap(); // the destination's Hello
    protocol::write_message(&mut c, &Message::Offer(o)).unwrap();
    protocol::read_message(&mut c).unwrap().msg
}

#[test]
fn platform_state_offer_is_refused_where_no_irqchip_can_be_built() {
    let (mut b, addr, errs, _run) = receiver("pc");
    match send_offer(&addr, offer(PLATFORM_PIECES | PIECE_CLOCK)) {
        Message::Refuse { reason } => assert_eq!(
            reason,
            "interrupt-controller state (lapic,irqchip,pit): this host's KVM cannot create an \
             in-kernel irqchip and PIT"
        ),
        other => panic!("expected Refuse, got {other:?}"),
    }
    let status = b.wait().unwrap();
    let lines: Vec<String> = errs.try_iter().collect();
    assert_eq!(status.code(), Some(2), "{lines:?}");
    let err = lines.join("\n");
    assert!(
        err.contains("incoming migration failed")
            && err.contains("cannot create an in-kernel irqchip"),
        "{err}"
    );
}

#[test]
fn platform_state_minimal_offer_is_accepted_by_the_same_destination() {
    let (mut b, addr, _errs, _run) = receiver("minimal");
    let reply = send_offer(&addr, offer(PIECE_CLOCK));
    let _ = b.kill();
    let _ = b.wait();
    assert!(
        matches!(reply, Message::Accept),
        "expected Accept, got {reply:?}"
    );
}
