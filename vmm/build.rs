//! Builds the guest unikernel (`guest/main.rs` + `guest/link.ld`) into
//! `$OUT_DIR/blip-guest.elf` and exports its path as `BLIP_GUEST_ELF`
//! (`include_bytes!(env!("BLIP_GUEST_ELF"))`).
//!
//! The stock toolchain has no bare-metal target, so the guest is a `#![no_std]`,
//! `#![no_main]` crate for the host target, compiled by invoking `rustc` directly (not
//! cargo) with a linker script and no libc; none of these flags reach the VMM's own build.
//!
//! It also exports `BLIP_GIT_COMMIT` for `blip --version`: `git rev-parse --short HEAD`, or
//! "unknown" outside a git checkout or without git (never a build failure).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR not set"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set"));
    let guest_dir = manifest_dir.join("guest");
    let main_rs = guest_dir.join("main.rs");
    let link_ld = guest_dir.join("link.ld");
    let elf = out_dir.join("blip-guest.elf");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", guest_dir.display());
    println!("cargo:rerun-if-changed={}", main_rs.display());
    println!("cargo:rerun-if-changed={}", link_ld.display());
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(&rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-type",
        "bin",
        "--crate-name",
        "blip_guest",
    ])
    .args(["-C", "opt-level=2"])
    .args(["-C", "panic=abort"])
    .args(["-C", "relocation-model=static"])
    .args(["-C", "target-cpu=x86-64"])
    // KVM's instruction emulator (kvm_pvm hosts) cannot run SSE arithmetic: no SSE
    // codegen. rustc warns that this changes the float ABI; the guest has no floats.
    .args(["-C", "target-feature=-sse,-sse2"])
    .args(["-C", "debuginfo=0"])
    .args(["-C", "strip=debuginfo"])
    .args(["-C", "codegen-units=1"])
    .args(["-C", "force-unwind-tables=no"])
    .args(["-C", "relro-level=off"])
    .args(["-C", "overflow-checks=off"])
    .args(["-C", "debug-assertions=off"])
    .args(["-C", "link-arg=-nostartfiles"])
    .args(["-C", "link-arg=-nostdlib"])
    .args(["-C", "link-arg=-static"])
    .args(["-C", "link-arg=-no-pie"])
    .arg("-C")
    .arg(format!("link-arg=-T{}", link_ld.display()))
    .args(["-C", "link-arg=-Wl,--build-id=none"])
    .args(["-C", "link-arg=-Wl,-z,noexecstack"])
    .arg(&main_rs)
    .arg("-o")
    .arg(&elf);
    // Keep the outer cargo invocation out of this rustc: no wrappers, flags or jobserver.
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

    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => fail(&format!(
            "cannot run `{}` to build the blip guest: {e}",
            rustc.to_string_lossy()
        )),
    };
    if !output.status.success() {
        fail(&format!(
            "building the blip guest ({}) with `{}` failed ({}):\n{}{}",
            main_rs.display(),
            rustc.to_string_lossy(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    // Surface guest warnings in the cargo output.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.starts_with("warning")
            && !line.contains("target feature")
            && !line.contains(" emitted")
        {
            println!("cargo:warning=blip guest: {line}");
        }
    }
    println!("cargo:rustc-env=BLIP_GUEST_ELF={}", elf.display());
    git_commit(&manifest_dir);
}

/// Exports `BLIP_GIT_COMMIT` and asks cargo to rerun when HEAD moves.
fn git_commit(dir: &std::path::Path) {
    let git = |args: &[&str]| -> Option<String> {
        let o = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
        (o.status.success() && !s.is_empty()).then_some(s)
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BLIP_GIT_COMMIT={commit}");
    // HEAD, the branch it names and packed-refs (only files that exist: a missing one would
    // rerun this script on every build).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(r);
    }
    for w in watch {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", &w]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
}

/// Reports a build failure on stderr (shown by cargo) and stops the build.
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
