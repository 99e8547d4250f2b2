//! Command-line surface of `blip` and the small parsers behind it.
//!
//! Parsing is kept here, free of KVM, so it can be unit-tested; `main.rs` only dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::memory::Backing;

/// blip: a minimal KVM VMM that live-migrates guests with a microsecond blackout.
#[derive(Parser, Debug)]
#[command(name = "blip", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a PVH guest (default: the embedded demo guest) and run it until it exits.
    Run(RunArgs),
    /// Boot the embedded guest and show it working: workloads, heartbeats, pause/resume cost.
    Demo(DemoArgs),
    /// Write the embedded guest image (a PVH ELF, also bootable by QEMU microvm) to a file.
    GuestImage {
        /// Where to write the image.
        out: PathBuf,
    },
}

/// Options shared by everything that boots a guest.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// PVH ELF64 image to boot (default: the embedded guest).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Guest memory size, e.g. 64M or 1G (suffixes K, M, G; plain numbers are bytes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Command line passed to the guest in the PVH start info.
    #[arg(long, default_value = "hello")]
    pub cmdline: String,
    /// Where COM1 output goes: stdout, none, or a file path.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    pub serial: Serial,
    /// How guest RAM is backed.
    #[arg(long, value_enum, default_value = "anon")]
    pub mem_backing: Backing,
}

/// `blip run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// `blip demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of vCPUs for the demo guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Pause/resume cycles to time.
    #[arg(long, default_value_t = 200)]
    pub cycles: u32,
}

/// COM1 sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serial {
    Stdout,
    None,
    File(PathBuf),
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<Serial, String> {
    match s {
        "stdout" => Ok(Serial::Stdout),
        "none" => Ok(Serial::None),
        "" => Err("empty --serial value (use stdout, none or a file path)".into()),
        path => Ok(Serial::File(PathBuf::from(path))),
    }
}

/// Parses a size such as `64M`, `1G`, `4096`, `512k` or `2MiB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("'{s}' is not a size (expected e.g. 64M, 1G, 4096)"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{s}' is too large"))?;
    let shift = match t[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' is not a size (expected e.g. 64M, 1G, 4096)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err());
    }

    #[test]
    fn serial_sinks() {
        assert_eq!(parse_serial("stdout"), Ok(Serial::Stdout));
        assert_eq!(parse_serial("none"), Ok(Serial::None));
        assert_eq!(parse_serial("/tmp/x"), Ok(Serial::File("/tmp/x".into())));
        assert!(parse_serial("").is_err());
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from(["blip", "run", "--mem", "128M", "--vcpus", "2"]).unwrap();
        match c.command {
            Cmd::Run(r) => {
                assert_eq!(r.guest.mem, 128 << 20);
                assert_eq!(r.guest.vcpus, 2);
            }
            _ => panic!("expected run"),
        }
        assert!(Cli::try_parse_from(["blip", "run", "--mem", "lots"]).is_err());
    }
}
