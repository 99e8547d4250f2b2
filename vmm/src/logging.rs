//! Logging: `tracing` events, one line each on stderr, filtered by `RUST_LOG` (or `BLIP_LOG`).
//!
//! Why here and not in every caller: a `blip run` or `blip host serve` is a long-running
//! process whose stderr is its log (a file the host service keeps per guest, or the journal
//! under systemd), and operators need levels to filter it and the guest and migration each
//! line belongs to. Those two come from spans: [`guest_span`] for the guest a process runs or
//! receives, [`migration_span`] around one migration, whose id ([`migration_id`], from the
//! session id both ends share) is filled in by [`set_migration`] once the session is open.
//!
//! Two styles, chosen once at start:
//!
//! - **journal** when stderr *is* the stream systemd names in `JOURNAL_STREAM` (device and
//!   inode match, as systemd documents; a guest the host service started inherits the variable
//!   but writes to its own log file): no timestamp (the journal has its own), no colour, and
//!   each line starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>`
//!   debug and trace), which journald strips and records as the entry's priority.
//! - **human** otherwise: an RFC 3339 UTC timestamp and the level, coloured on a terminal.
//!
//! Both then print the spans' fields in brackets and the message:
//! `2026-12-01T19:40:01.123456Z  INFO [guest=web1 migration=5f0c1a2e] blip: guest migrated …`.
//! User-facing output (reports, progress lines, tables, the final `blip: error: …` line) does
//! not go through here.

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Span, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Level when neither `BLIP_LOG` nor `RUST_LOG` says one.
pub const DEFAULT_FILTER: &str = "info";

/// Target of the lines other programs wait for (`blip receive`'s "waiting for an incoming
/// migration on URL", `blip host serve`'s "serving"): shown at info whatever the filter says,
/// so a host service run with `RUST_LOG=warn` (its receivers inherit it) still sees its
/// receivers listen.
pub const READY: &str = "blip::ready";

/// How lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `<6>[guest=a] message`: for journald (stderr is `JOURNAL_STREAM`).
    Journal,
    /// `2026-…Z  INFO [guest=a] message`, coloured when `ansi`.
    Human { ansi: bool },
}

/// The syslog priority journald records for a level.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Does `JOURNAL_STREAM` (`DEVICE:INODE`) name the file with this device and inode?
pub fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// Is stderr the journal stream systemd connected?
fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    journal_stream_matches(&var.to_string_lossy(), meta.dev(), meta.ino())
}

/// The style for this process's stderr.
pub fn detect_style() -> Style {
    if stderr_is_journal() {
        Style::Journal
    } else {
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Style::Human { ansi }
    }
}

/// The last line of a failed command, `blip: error: MSG`, on stderr. Under journald it carries
/// the error priority (`<3>`) like the events do, so `journalctl -p err` finds a guest that died;
/// elsewhere it is the plain line scripts and tests read.
pub fn error_line(msg: &str) {
    eprintln!("{}", error_text(detect_style(), msg));
}

/// What [`error_line`] prints for `style`.
pub fn error_text(style: Style, msg: &str) -> String {
    match style {
        Style::Journal => format!("<{}>blip: error: {msg}", priority(Level::ERROR)),
        Style::Human { .. } => format!("blip: error: {msg}"),
    }
}

/// A rate limit for lines that a peer can cause at will (a refused or dropped connection): a
/// flood of strangers must not flood the journal. Lines are counted per *kind* (the caller's
/// text with its digits removed, so addresses and ports do not make kinds): at most
/// `per_window` lines of a kind pass per window, and the first line of that kind to pass in a
/// later window says how many were left out. Per kind, so the first line of every kind in a
/// window always shows: one flood cannot hide another reason.
pub struct Quota {
    per_window: u32,
    window: std::time::Duration,
    kinds: std::sync::Mutex<Vec<(String, QuotaState)>>,
}

struct QuotaState {
    start: std::time::Instant,
    shown: u32,
    left_out: u64,
}

/// Kinds remembered at most; beyond, the table starts afresh (a kind then shows again).
const QUOTA_KINDS: usize = 64;

impl Quota {
    /// A quota of `per_window` lines of each kind per `window` (usable in a `static`).
    pub const fn new(per_window: u32, window: std::time::Duration) -> Quota {
        Quota {
            per_window,
            window,
            kinds: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Whether a line with text `line` at `now` may be shown: `Some(n)` with the number of
    /// lines of its kind left out before it (usually 0), `None` when it is to be left out.
    pub fn admit(&self, line: &str, now: std::time::Instant) -> Option<u64> {
        let kind: String = line
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(120)
            .collect();
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let i = match kinds.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                if kinds.len() >= QUOTA_KINDS {
                    kinds.clear();
                }
                let fresh = QuotaState {
                    start: now,
                    shown: 0,
                    left_out: 0,
                };
                kinds.push((kind, fresh));
                kinds.len() - 1
            }
        };
        let s = &mut kinds[i].1;
        if now.saturating_duration_since(s.start) >= self.window {
            s.start = now;
            s.shown = 0;
        }
        if s.shown >= self.per_window {
            s.left_out += 1;
            return None;
        }
        s.shown += 1;
        Some(std::mem::take(&mut s.left_out))
    }

    /// Logs `line` as a warning if its kind's quota allows, with how many were left out.
    pub fn warn(&self, line: &str) {
        match self.admit(line, std::time::Instant::now()) {
            Some(0) => tracing::warn!("{line}"),
            Some(n) => tracing::warn!("{line} ({n} similar lines left out before this one)"),
            None => {}
        }
    }
}

/// The filter: `BLIP_LOG`, else `RUST_LOG`, else [`DEFAULT_FILTER`]; with the complaint to log
/// when the variable did not parse (the default is used then).
pub fn filter_from(blip_log: Option<&str>, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let chosen = [("BLIP_LOG", blip_log), ("RUST_LOG", rust_log)]
        .into_iter()
        .find_map(|(n, v)| v.filter(|s| !s.trim().is_empty()).map(|v| (n, v)));
    let (filter, complaint) = match chosen {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some((name, v)) => match EnvFilter::try_new(v) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "blip: ignoring {name}={v:?} ({e}); logging at {DEFAULT_FILTER}"
                )),
            ),
        },
    };
    let ready = format!("{READY}=info").parse();
    match ready {
        Ok(d) => (filter.add_directive(d), complaint),
        Err(_) => (filter, complaint),
    }
}

/// Installs the subscriber for the whole process (once; later calls do nothing).
pub fn init() {
    let blip_log = std::env::var("BLIP_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, complaint) = filter_from(blip_log.as_deref(), rust_log.as_deref());
    let style = detect_style();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(matches!(style, Style::Human { ansi: true }))
        .event_format(Line { style })
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        if let Some(c) = complaint {
            tracing::warn!("{c}");
        }
    }
}

/// The span of the guest a process runs or receives (`guest=NAME` on each line).
pub fn guest_span(name: &str) -> Span {
    // ERROR level: the span is enabled whenever any event is, so even RUST_LOG=warn lines
    // name their guest.
    tracing::error_span!(target: "blip", "guest", guest = %name)
}

/// The span of one migration; its id is filled in by [`set_migration`] when the session opens.
pub fn migration_span() -> Span {
    tracing::error_span!(target: "blip", "migration", migration = tracing::field::Empty)
}

/// A migration's id as logs, reports and records show it: the high 32 bits of the session id
/// (random, chosen by the source, known to both ends), in hex.
pub fn migration_id(session_id: u64) -> String {
    format!("{:08x}", session_id >> 32)
}

/// Names the migration of the current [`migration_span`] (a no-op outside one).
pub fn set_migration(session_id: u64) {
    Span::current().record(
        "migration",
        tracing::field::display(migration_id(session_id)),
    );
}

/// The event format of both styles.
pub struct Line {
    pub style: Style,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        match self.style {
            Style::Journal => write!(w, "<{}>", priority(level))?,
            Style::Human { ansi } => {
                SystemTime.format_time(&mut w)?;
                if ansi {
                    let colour = match level {
                        Level::ERROR => "31",
                        Level::WARN => "33",
                        Level::INFO => "32",
                        Level::DEBUG => "34",
                        Level::TRACE => "35",
                    };
                    write!(w, " \x1b[{colour}m{:>5}\x1b[0m ", level.as_str())?;
                } else {
                    write!(w, " {:>5} ", level.as_str())?;
                }
            }
        }
        let mut fields = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if !f.is_empty() {
                        fields.push(f.to_string());
                    }
                }
            }
        }
        if !fields.is_empty() {
            write!(w, "[{}] ", fields.join(" "))?;
        }
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_quota_passes_its_lines_per_window_and_kind_and_counts_the_rest() {
        let q = Quota::new(2, std::time::Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        let a = |port: u32| format!("refused a connection from 10.0.0.1:{port}: garbage");
        assert_eq!(q.admit(&a(1), t0), Some(0));
        assert_eq!(q.admit(&a(2), t0), Some(0));
        assert_eq!(q.admit(&a(3), t0), None);
        // Another kind is not hidden by the first one's flood.
        assert_eq!(q.admit("refused: authentication failed", t0), Some(0));
        assert_eq!(
            q.admit(&a(4), t0 + std::time::Duration::from_millis(999)),
            None
        );
        // A new window: the first line says two were left out, the next says nothing more.
        let t1 = t0 + std::time::Duration::from_secs(1);
        assert_eq!(q.admit(&a(5), t1), Some(2));
        assert_eq!(q.admit(&a(6), t1), Some(0));
    }

    #[test]
    fn error_lines_carry_the_error_priority_only_for_the_journal() {
        assert_eq!(error_text(Style::Journal, "x"), "<3>blip: error: x");
        assert_eq!(
            error_text(Style::Human { ansi: true }, "x"),
            "blip: error: x"
        );
    }

    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `f` logs in `style` under `filter`.
    fn capture(style: Style, filter: &str, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(Line { style })
            .finish();
        tracing::subscriber::with_default(sub, f);
        let b = buf.0.lock().unwrap().clone();
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    #[test]
    fn journal_lines_carry_the_priority_and_no_time() {
        let text = capture(Style::Journal, "debug", || {
            let _g = guest_span("web1").entered();
            let _m = migration_span().entered();
            set_migration(0x5f0c_1a2e_dead_beef);
            tracing::error!("blip: e");
            tracing::warn!("blip: w");
            tracing::info!("blip: i");
            tracing::debug!("blip: d");
            tracing::trace!("blip: t (filtered out)");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "<3>[guest=web1 migration=5f0c1a2e] blip: e",
                "<4>[guest=web1 migration=5f0c1a2e] blip: w",
                "<6>[guest=web1 migration=5f0c1a2e] blip: i",
                "<7>[guest=web1 migration=5f0c1a2e] blip: d",
            ]
        );
    }

    #[test]
    fn human_lines_have_time_and_level() {
        let text = capture(Style::Human { ansi: false }, "info", || {
            tracing::info!("blip: waiting for an incoming migration on tcp://127.0.0.1:1");
            tracing::debug!("not shown");
            let _g = guest_span("a").entered();
            tracing::warn!("blip: careful");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (time, rest) = lines[0].split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert_eq!(
            rest,
            " INFO blip: waiting for an incoming migration on tcp://127.0.0.1:1"
        );
        assert!(
            lines[1].ends_with("  WARN [guest=a] blip: careful"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn the_journal_is_recognised_by_device_and_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(journal_stream_matches("8:12345\n", 8, 12345));
        assert!(!journal_stream_matches("8:12346", 8, 12345));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("junk", 8, 12345));
    }

    #[test]
    fn filters_come_from_blip_log_then_rust_log() {
        // The filter's directives, minus the READY one every filter has.
        let dirs = |f: EnvFilter| -> String {
            let s = f.to_string();
            let mut d: Vec<&str> = s.split(',').collect();
            let n = d.len();
            d.retain(|x| *x != "blip::ready=info");
            assert_eq!(d.len() + 1, n, "{s}");
            d.join(",")
        };
        let (f, c) = filter_from(None, None);
        assert_eq!(dirs(f), "info");
        assert!(c.is_none());
        let (f, _) = filter_from(None, Some("debug"));
        assert_eq!(dirs(f), "debug");
        let (f, _) = filter_from(Some("warn"), Some("debug"));
        assert_eq!(dirs(f), "warn");
        let (f, _) = filter_from(Some(" "), Some("debug"));
        assert_eq!(dirs(f), "debug");
        let (f, c) = filter_from(None, Some("blip=notalevel"));
        assert_eq!(dirs(f), "info");
        assert!(c.unwrap().contains("RUST_LOG"));
    }

    #[test]
    fn ready_lines_pass_any_filter() {
        let (filter, _) = filter_from(None, Some("warn"));
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(Line {
                style: Style::Journal,
            })
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!("hidden");
            tracing::info!(target: READY, "blip: waiting for an incoming migration on tcp://x");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "<6>blip: waiting for an incoming migration on tcp://x\n"
        );
    }

    #[test]
    fn migration_ids_are_short_hex() {
        assert_eq!(migration_id(0x0000_0001_ffff_ffff), "00000001");
        assert_eq!(migration_id(u64::MAX), "ffffffff");
    }
}
