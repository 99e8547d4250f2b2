//! `blip host serve --config FILE`: the service's settings in a file, so a systemd unit can
//! stay the same on every node and `/etc/blip/host.toml` says what differs.
//!
//! The format is the part of TOML a flat list of settings needs, and nothing more: one
//! `key = value` per line, the value bare or in double quotes, `#` comments, blank lines;
//! `insecure = true|false`. Keys are the long flags of `blip host serve` (`max_incoming` or
//! `max-incoming`). Unknown keys are errors (a typo must not silently fall back to a
//! default); the file is capped at 64 KiB. A flag on the command line overrides the file.

use std::path::{Path, PathBuf};

use blip_vmm::cli::HostServeArgs;

/// Largest config file read.
const MAX_CONFIG: u64 = 64 << 10;

/// Errors of reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is larger than 64 KiB: not a blip host config")]
    TooLarge(PathBuf),
    #[error("{0}:{1}: {2}")]
    Line(PathBuf, usize, String),
}

/// The settings a config file can give.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub listen: Option<String>,
    pub ports: Option<String>,
    pub max_incoming: Option<u32>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub metrics_listen: Option<String>,
    pub api: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

/// Parses the text of a config file (`file` names it in errors).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let mut c = Config::default();
    for (i, raw) in text.lines().enumerate() {
        let bad = |m: String| ConfigError::Line(file.to_path_buf(), i + 1, m);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad(format!("expected `key = value`, found {line:?}")))?;
        let key = k.trim().replace('-', "_");
        let v = v.trim();
        let value = if let Some(q) = v.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| bad("unterminated string".into()))?;
            let rest = q[end + 1..].trim();
            if !(rest.is_empty() || rest.starts_with('#')) {
                return Err(bad(format!("unexpected {rest:?} after the value")));
            }
            q[..end].to_string()
        } else {
            // A bare value ends at a comment.
            v.split('#').next().unwrap_or("").trim().to_string()
        };
        if value.is_empty() {
            return Err(bad(format!("{key} has no value")));
        }
        match key.as_str() {
            "listen" => c.listen = Some(value),
            "ports" => c.ports = Some(value),
            "max_incoming" => {
                c.max_incoming = Some(value.parse().map_err(|_| {
                    bad(format!("max_incoming must be a number, not {value:?}"))
                })?)
            }
            "key" => c.key = Some(PathBuf::from(value)),
            "insecure" => {
                c.insecure = Some(match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(format!("insecure is true or false, not {value:?}"))),
                })
            }
            "metrics_listen" => c.metrics_listen = Some(value),
            "api" => c.api = Some(PathBuf::from(value)),
            "tls_cert" => c.tls_cert = Some(PathBuf::from(value)),
            "tls_key" => c.tls_key = Some(PathBuf::from(value)),
            "tls_ca" => c.tls_ca = Some(PathBuf::from(value)),
            _ => return Err(bad(format!(
                "unknown setting {key:?} (known: listen, ports, max_incoming, key, insecure, metrics_listen, api, tls_cert, tls_key, tls_ca)"
            ))),
        }
    }
    Ok(c)
}

/// Reads `path` (bounded) and parses it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    let mut text = String::new();
    f.take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(|e| ConfigError::Read(path.into(), e))?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(ConfigError::TooLarge(path.into()));
    }
    parse(&text, path)
}

/// Fills what the command line left unset from the config file (flags win). A key or
/// `--insecure` on the command line replaces both of the file's auth settings.
pub fn merge(
    a: &HostServeArgs,
    api: &Option<PathBuf>,
    c: Config,
) -> (HostServeArgs, Option<PathBuf>) {
    let mut m = a.clone();
    m.listen = a.listen.clone().or(c.listen);
    m.ports = a.ports.clone().or(c.ports);
    m.max_incoming = a.max_incoming.or(c.max_incoming);
    m.metrics_listen = a.metrics_listen.clone().or(c.metrics_listen);
    if a.auth.key.is_none() && !a.auth.insecure {
        m.auth.key = c.key;
        m.auth.insecure = c.insecure.unwrap_or(false) && m.auth.key.is_none();
    }
    // TLS files come as a set: any of them on the command line replaces the file's three.
    if a.tls.tls_cert.is_none() && a.tls.tls_key.is_none() && a.tls.tls_ca.is_none() {
        m.tls.tls_cert = c.tls_cert;
        m.tls.tls_key = c.tls_key;
        m.tls.tls_ca = c.tls_ca;
    }
    (m, api.clone().or(c.api))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example_and_rejects_mistakes() {
        let text = include_str!("../../../packaging/etc/blip/host.toml");
        let c = parse(text, Path::new("host.toml")).unwrap();
        assert_eq!(c.listen.as_deref(), Some("tcp://0.0.0.0:7000"));
        assert_eq!(c.ports.as_deref(), Some("7100-7199"));
        let c = parse(
            "# c\n\nlisten = tcp://1.2.3.4:7000 # here\nmax-incoming=3\ninsecure = true\napi = \"/run/x # y.sock\"\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(c.listen.as_deref(), Some("tcp://1.2.3.4:7000"));
        assert_eq!(c.max_incoming, Some(3));
        assert_eq!(c.insecure, Some(true));
        assert_eq!(c.api, Some(PathBuf::from("/run/x # y.sock")));
        let c = parse(
            "tls_cert = /etc/blip/tls/node.crt\ntls-key = \"/etc/blip/tls/node.key\"\ntls_ca = /etc/blip/tls/ca.crt\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/blip/tls/node.crt")));
        assert_eq!(c.tls_key, Some(PathBuf::from("/etc/blip/tls/node.key")));
        assert_eq!(c.tls_ca, Some(PathBuf::from("/etc/blip/tls/ca.crt")));
        for bad in [
            "listen",
            "lisen = x",
            "max_incoming = many",
            "insecure = yes",
            "ports = \"1-2",
            "ports = \"1-2\" junk",
            "ports =",
        ] {
            let e = parse(bad, Path::new("f")).unwrap_err().to_string();
            assert!(e.starts_with("f:1: "), "{bad}: {e}");
        }
    }
}
