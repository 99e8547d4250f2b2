//! The workload's settings, from its arguments and the kernel command line.
//!
//! As PID 1 the workload gets no useful argv: the kernel passes it only the command-line words
//! it did not understand, and drops every `key.name=value` word (those are module
//! parameters). So the workload reads `/proc/cmdline` and takes the words `workload.KEY=VALUE`;
//! started by hand it also takes `KEY=VALUE` arguments. Later words win.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `mem` | `32M` | size of the region it rewrites (suffix K, M, G; plain = bytes) |
//! | `rate` | `1000` | pages rewritten per second, or `max` |
//! | `period` | `100` | heartbeat period, ms |
//! | `check` | `1000` | period of the sampled check, ms (0 = never) |
//! | `full` | `10` | every Nth periodic check reads every word (0 = never) |
//! | `hbport` | `1` | as PID 1, also write each heartbeat counter to blip's heartbeat port (0xfc/0xf8) |

/// The settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mem_bytes: u64,
    /// Pages per second; `None` = as fast as it can.
    pub rate: Option<u64>,
    pub period_ms: u64,
    pub check_ms: u64,
    pub full_every: u64,
    pub hbport: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mem_bytes: 32 << 20,
            rate: Some(1000),
            period_ms: 100,
            check_ms: 1000,
            full_every: 10,
            hbport: true,
        }
    }
}

/// A setting that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSetting(pub String);

impl std::fmt::Display for BadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad workload setting `{}`", self.0)
    }
}

fn size(v: &str) -> Option<u64> {
    let (num, mul) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

impl Config {
    /// Applies one `KEY=VALUE` (with or without the `workload.` prefix); other words are
    /// ignored when `only_prefixed` (the kernel command line), refused otherwise.
    pub fn apply(&mut self, word: &str, only_prefixed: bool) -> Result<(), BadSetting> {
        let bad = || BadSetting(word.to_string());
        let kv = match word.strip_prefix("workload.") {
            Some(kv) => kv,
            None if only_prefixed => return Ok(()),
            None => word,
        };
        let (k, v) = kv.split_once('=').ok_or_else(bad)?;
        let num = || v.parse::<u64>().map_err(|_| bad());
        match k {
            "mem" => {
                let b = size(v).ok_or_else(bad)?;
                if b < 4096 {
                    return Err(bad());
                }
                self.mem_bytes = b;
            }
            "rate" if v == "max" => self.rate = None,
            "rate" => self.rate = Some(num()?),
            "period" => self.period_ms = num()?.max(1),
            "check" => self.check_ms = num()?,
            "full" => self.full_every = num()?,
            "hbport" => self.hbport = num()? != 0,
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        (self.mem_bytes / 4096) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_words_only_with_prefix() {
        let mut c = Config::default();
        for w in "console=ttyS0 quiet workload.mem=8M workload.rate=max foo.bar=1".split(' ') {
            c.apply(w, true).unwrap();
        }
        assert_eq!(c.mem_bytes, 8 << 20);
        assert_eq!(c.rate, None);
        assert_eq!(c.pages(), 2048);
        assert_eq!(c.period_ms, 100);
    }

    #[test]
    fn arguments_and_errors() {
        let mut c = Config::default();
        c.apply("period=50", false).unwrap();
        c.apply("check=0", false).unwrap();
        c.apply("hbport=0", false).unwrap();
        c.apply("rate=250", false).unwrap();
        assert_eq!(
            (c.period_ms, c.check_ms, c.hbport, c.rate),
            (50, 0, false, Some(250))
        );
        assert!(c.apply("mem=12Q", false).is_err());
        assert!(c.apply("workload.mem=1", true).is_err());
        assert!(c.apply("colour=red", false).is_err());
        assert_eq!(
            c.apply("nonsense", false).unwrap_err().to_string(),
            "bad workload setting `nonsense`"
        );
    }
}
