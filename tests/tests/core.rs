//! End-to-end tests of the VMM core: the real `blip` binary booting the real embedded guest on
//! the real /dev/kvm. Assertions are about behaviour and output, never about time.

use blip_tests::{run_blip, stderr, stdout};

fn one_line_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "blip errors exit with 2; stderr: {err}"
    );
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err:?}");
    assert!(lines[0].starts_with("blip: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hello_prints_and_exits_zero() {
    let o = run_blip(&["run", "--cmdline", "hello"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("hello from blip guest"),
        "stdout: {}",
        stdout(&o)
    );
}

#[test]
fn empty_cmdline_is_hello() {
    let o = run_blip(&["run", "--cmdline", ""]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("hello from blip guest"));
}

#[test]
fn hello_on_memfd_backing_and_four_vcpus() {
    let o = run_blip(&[
        "run",
        "--mem-backing",
        "memfd",
        "--vcpus",
        "4",
        "--mem",
        "32M",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o).matches("hello from blip guest").count(), 1);
}

#[test]
fn guest_exit_code_propagates() {
    // A bad guest command line makes the guest write 2 to the exit port: (2 << 1) | 1 = 5.
    let o = run_blip(&["run", "--cmdline", "frobnicate"]);
    assert_eq!(o.status.code(), Some(5), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("error: bad command line: frobnicate"));
    // A working set that does not fit: exit port 3 -> 7.
    let o = run_blip(&["run", "--mem", "16M", "--cmdline", "dirty ws=64 rate=max"]);
    assert_eq!(o.status.code(), Some(7), "stdout: {}", stdout(&o));
}

#[test]
fn serial_to_file_and_none() {
    let dir = std::env::temp_dir().join(format!("blip-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("com1.txt");
    let o = run_blip(&["run", "--serial", f.to_str().unwrap()]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert!(std::fs::read_to_string(&f)
        .unwrap()
        .contains("hello from blip guest"));
    assert!(!stdout(&o).contains("hello from blip guest"));
    let o = run_blip(&["run", "--serial", "none"]);
    assert!(o.status.success());
    assert!(!stdout(&o).contains("hello"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn vcpu_gens(out: &str) -> Vec<(u32, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("check: vcpu "))
        .map(|l| {
            let w: Vec<_> = l.split_whitespace().collect();
            (w[0].parse().unwrap(), w[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn two_vcpus_both_run_the_dirty_workload() {
    let o = run_blip(&[
        "run",
        "--vcpus",
        "2",
        "--cmdline",
        "dirty ws=2 rate=max sweeps=2",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "stdout: {out} stderr: {}", stderr(&o));
    assert!(out.contains("check: ok pages=512"), "{out}");
    let gens = vcpu_gens(&out);
    assert_eq!(gens.len(), 2, "{out}");
    for (v, g) in gens {
        assert!(g >= 2, "vcpu {v} did not advance: gen {g}\n{out}");
    }
}

#[test]
fn two_vcpus_dirty_at_full_speed_and_pass_the_check() {
    // `rate=full`: one store per page in batches; the check knows its page format.
    let o = run_blip(&[
        "run",
        "--vcpus",
        "2",
        "--cmdline",
        "dirty ws=2 rate=full sweeps=3",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "stdout: {out} stderr: {}", stderr(&o));
    assert!(out.contains("check: ok pages=512"), "{out}");
    for (v, g) in vcpu_gens(&out) {
        assert!(g >= 3, "vcpu {v} did not advance: gen {g}\n{out}");
    }
}

#[test]
fn heartbeats_are_recorded() {
    let o = run_blip(&[
        "run",
        "--cmdline",
        "heartbeat period=200 dirty ws=1 rate=max sweeps=4",
    ]);
    assert!(
        o.status.success(),
        "stdout: {} stderr: {}",
        stdout(&o),
        stderr(&o)
    );
    let err = stderr(&o);
    let n: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("blip: heartbeats: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat summary in {err:?}"));
    assert!(n > 0, "{err}");
}

#[test]
fn check_alone_passes() {
    let o = run_blip(&["run", "--cmdline", "check"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("check: ok"));
}

#[test]
fn triple_fault_is_reported() {
    let o = run_blip(&["run", "--cmdline", "crash"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("triple fault") && err.contains("vcpu 0") && err.contains("rip 0x"),
        "{err}"
    );
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("blip-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("not-elf");
    std::fs::write(&text, b"this is not an ELF file").unwrap();
    let elf32 = dir.join("elf32");
    let mut h = vec![0u8; 128];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 1;
    std::fs::write(&elf32, &h).unwrap();

    one_line_error(
        &run_blip(&["run", "--kernel", "/nonexistent/guest.elf"]),
        "cannot open kernel image",
    );
    one_line_error(
        &run_blip(&["run", "--kernel", text.to_str().unwrap()]),
        "not an ELF",
    );
    one_line_error(
        &run_blip(&["run", "--kernel", elf32.to_str().unwrap()]),
        "32-bit ELF",
    );
    // A real ELF64 executable without a PVH note.
    one_line_error(
        &run_blip(&["run", "--kernel", "/bin/true"]),
        "no PVH entry note",
    );
    one_line_error(&run_blip(&["run", "--mem", "2M"]), "needs memory up to");
    one_line_error(&run_blip(&["run", "--mem", "lots"]), "is not a size");
    one_line_error(&run_blip(&["run", "--mem", "8G"]), "out of range");
    one_line_error(
        &run_blip(&["run", "--vcpus", "0"]),
        "--vcpus 0 is out of range",
    );
    one_line_error(
        &run_blip(&["run", "--vcpus", "1000"]),
        "--vcpus 1000 is out of range",
    );
    one_line_error(&run_blip(&["run", "--frobnicate"]), "--frobnicate");
    // CPU lists: a CPU this process may not use (none has 1000 here), a malformed list.
    one_line_error(
        &run_blip(&["run", "--pin-vcpus", "1000"]),
        "--pin-vcpus: host CPU 1000 is not one this process may use",
    );
    one_line_error(
        &run_blip(&[
            "receive",
            "--listen",
            "tcp://127.0.0.1:0",
            "--pin-vmm",
            "0,1000",
        ]),
        "--pin-vmm: host CPU 1000",
    );
    one_line_error(&run_blip(&["run", "--pin-vmm", "3-1"]), "runs backwards");
    one_line_error(
        &run_blip(&["run", "--serial", "/nonexistent/dir/out"]),
        "cannot create serial output",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_or_forbidden_kvm_is_one_line() {
    let o = blip_tests::blip(&["run"])
        .env("BLIP_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    one_line_error(&o, "cannot open /nonexistent/kvm");
    // /dev/kvm is mode 0600 root on CI machines: an unprivileged user must get a clear refusal.
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode() & 0o006 == 0);
    if private.unwrap_or(false) {
        let o = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(blip_tests::blip_bin())
            .arg("run")
            .output()
            .expect("setpriv (util-linux) runs");
        one_line_error(&o, "cannot open /dev/kvm");
        assert!(stderr(&o).contains("ermission denied"), "{}", stderr(&o));
    }
}

/// Issue 14: files that are not regular files are refused at once, with one line: a FIFO as
/// `--key` used to block blip for good, `--kernel /dev/zero` to eat memory until killed.
#[test]
fn non_regular_kernel_and_key_files_are_refused() {
    use blip_tests::{blip, scratch, wait_with_limit};
    use std::time::Duration;
    let dir = scratch("core-nonregular");
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(made.success());
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let fifo = fifo.to_str().unwrap();
    let limit = Duration::from_secs(60); // a hang guard only
    for kernel in ["/dev/zero", fifo] {
        let o = wait_with_limit(blip(&["run", "--kernel", kernel]).spawn().unwrap(), limit);
        one_line_error(&o, &format!("kernel image {kernel} is not a regular file"));
    }
    let o = wait_with_limit(
        blip(&[
            "migrate",
            "--api",
            "/nonexistent/blip.sock",
            "--to",
            "tcp://127.0.0.1:9",
            "--key",
            fifo,
        ])
        .spawn()
        .unwrap(),
        limit,
    );
    one_line_error(&o, &format!("key file {fifo} is not a regular file"));
    // A (sparse) image larger than any guest memory is refused from its size, not read.
    let big = dir.join("big.elf");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let o = wait_with_limit(
        blip(&["run", "--kernel", big.to_str().unwrap()])
            .spawn()
            .unwrap(),
        limit,
    );
    one_line_error(&o, "more than the guest's");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14: a bad `--name` (control characters, '/', more than 64 characters) and a
/// `--streams` outside 1..=16 are refused by the parser with exactly one line, exit 2.
#[test]
fn bad_names_and_stream_counts_are_one_line_errors() {
    let long = "n".repeat(65);
    for name in ["a\nb", "tab\there", "a/b", "../x", long.as_str()] {
        for cmd in [
            &["run", "--name", name][..],
            &["restore", "f", "--name", name],
        ] {
            let o = run_blip(cmd);
            one_line_error(&o, "invalid --name");
            assert!(stderr(&o).contains(&format!("{name:?}")), "{}", stderr(&o));
        }
    }
    for n in ["0", "17", "1000"] {
        let o = run_blip(&[
            "migrate",
            "--api",
            "/nonexistent/blip.sock",
            "--to",
            "tcp://127.0.0.1:9",
            "--streams",
            n,
        ]);
        one_line_error(&o, "--streams");
        assert!(stderr(&o).contains("1..=16"), "{}", stderr(&o));
    }
}

/// `--max-bandwidth` on every command that migrates: a rate that is not one, or one below
/// 64 KiB/s, is one line and exit 2 before anything is contacted.
#[test]
fn bad_bandwidths_are_one_line_errors() {
    let to = "tcp://127.0.0.1:9";
    let api = "/nonexistent/blip.sock";
    for (bw, says) in [
        ("fast", "not a bandwidth"),
        ("1K", "64 KiB/s"),
        ("-4M", "not a bandwidth"),
    ] {
        let flag = format!("--max-bandwidth={bw}");
        for cmd in [
            &["migrate", "--api", api, "--to", to, flag.as_str()][..],
            &["drain", "--to", to, flag.as_str()],
            &[
                "host",
                "--api",
                api,
                "migrate",
                "g",
                "--to",
                to,
                flag.as_str(),
            ],
            &["host", "--api", api, "drain", "--to", to, flag.as_str()],
        ] {
            let o = run_blip(cmd);
            one_line_error(&o, says);
        }
    }
}
