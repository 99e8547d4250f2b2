//! `blip run --kernel/--initrd/--platform` end to end on the real binary: bad input gets one
//! clear line and exit 2; the embedded guest runs the same on the Pc platform. Booting Linux
//! itself needs interrupts, which this host's KVM cannot deliver: that is the soft-RoCE
//! harness's `linux-boot` scenario.

use blip_tests::{run_blip, stderr, stdout};

fn one_line_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err:?}");
    assert!(lines[0].starts_with("blip: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
}

fn debian_kernel() -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = std::path::PathBuf::from(home).join(".cache/blip-softroce/kernel");
    let ver = std::fs::read_to_string(dir.join("current")).ok()?;
    let p = dir
        .join(ver.trim())
        .join(format!("boot/vmlinuz-{}", ver.trim()));
    p.is_file().then(|| p.display().to_string())
}

#[test]
fn embedded_guest_runs_on_the_pc_platform() {
    for vcpus in ["1", "2"] {
        let o = run_blip(&["run", "--platform", "pc", "--vcpus", vcpus]);
        assert!(o.status.success(), "stderr: {}", stderr(&o));
        assert!(stdout(&o).contains("hello from blip guest"));
    }
    let o = run_blip(&["run", "--platform", "minimal", "--cmdline", "hello"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
}

#[test]
fn bad_kernel_and_initrd_inputs_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("blip-boot-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let guest = dir.join("guest.elf");
    assert!(run_blip(&["guest-image", guest.to_str().unwrap()])
        .status
        .success());
    let g = guest.to_str().unwrap();
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x90u8; 4096]).unwrap();

    one_line_error(
        &run_blip(&["run", "--kernel", g, "--initrd", "/nonexistent/initrd"]),
        "cannot open initrd /nonexistent/initrd",
    );
    one_line_error(
        &run_blip(&["run", "--kernel", g, "--initrd", "/"]),
        "initrd / is not a regular file",
    );
    one_line_error(
        &run_blip(&["run", "--kernel", g, "--initrd", "/dev/zero"]),
        "not a regular file",
    );
    one_line_error(
        &run_blip(&[
            "run",
            "--kernel",
            g,
            "--initrd",
            big.to_str().unwrap(),
            "--mem",
            "64M",
        ]),
        "more than the guest's",
    );
    one_line_error(
        &run_blip(&["run", "--kernel", junk.to_str().unwrap()]),
        "not an ELF file with a PVH note, nor a bzImage",
    );
    one_line_error(&run_blip(&["run", "--initrd", g]), "--kernel");
    one_line_error(
        &run_blip(&["run", "--kernel", g, "--platform", "vax"]),
        "vax",
    );
    // The initrd fits on its own but not next to the image.
    let rd = dir.join("rd");
    std::fs::File::create(&rd)
        .unwrap()
        .set_len(30 << 20)
        .unwrap();
    one_line_error(
        &run_blip(&[
            "run",
            "--kernel",
            g,
            "--initrd",
            rd.to_str().unwrap(),
            "--mem",
            "32M",
        ]),
        "kernel image and initrd need",
    );
    if let Some(k) = debian_kernel() {
        // Debian's kernel decompresses to about 80 MiB.
        one_line_error(
            &run_blip(&["run", "--kernel", &k, "--mem", "64M"]),
            "needs memory up to",
        );
        one_line_error(
            &run_blip(&[
                "run",
                "--kernel",
                &k,
                "--initrd",
                rd.to_str().unwrap(),
                "--mem",
                "96M",
            ]),
            "kernel image and initrd need",
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
