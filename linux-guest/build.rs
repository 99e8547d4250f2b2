//! Builds the Linux workload (`workload/main.rs`) into `$OUT_DIR/blip-linux-workload`, a
//! static x86-64 executable, and exports its path as `BLIP_LINUX_WORKLOAD`.
//!
//! There is no musl target here and none can be added offline, so the workload is built for
//! the host (gnu) target with `-C target-feature=+crt-static`: glibc linked statically. It
//! needs no crates (its few libc calls are declared by hand), so plain `rustc` does, and
//! none of its flags reach the rest of the build.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("blip-linux-workload");
    let main_rs = dir.join("workload/main.rs");
    for f in [
        "build.rs",
        "workload/main.rs",
        "src/config.rs",
        "src/heartbeat.rs",
        "src/pattern.rs",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(&rustc);
    cmd.args(["--edition", "2021", "--crate-type", "bin"])
        .args(["--crate-name", "blip_linux_workload"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "target-feature=+crt-static"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "strip=symbols"])
        .args(["-C", "codegen-units=1"])
        .arg(&main_rs)
        .arg("-o")
        .arg(&out);
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run `{}` to build the Linux workload: {e}",
            rustc.to_string_lossy()
        ))
    });
    if !output.status.success() {
        fail(&format!(
            "building the Linux workload ({}) failed ({}):\n{}{}",
            main_rs.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.starts_with("warning") {
            println!("cargo:warning=linux workload: {line}");
        }
    }
    println!("cargo:rustc-env=BLIP_LINUX_WORKLOAD={}", out.display());
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
