//! `blip generate`: man pages and shell completions, generated from the clap definitions in
//! [`crate::cli`].
//!
//! Why generated and not written: the command line changes often and a hand-written page or
//! completion script goes stale at the first new option; these come from the same definitions
//! `blip --help` prints, so they cannot disagree with the binary that wrote them.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use thiserror::Error;

use crate::cli::Cli;

/// What can go wrong writing pages or scripts.
#[derive(Debug, Error)]
pub enum GenerateError {
    #[error("cannot make {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot write a man page into {0}")]
    Page(PathBuf, #[source] std::io::Error),
    #[error("cannot write the completion script")]
    Script(#[source] std::io::Error),
}

/// The command tree as the pages show it: built (so each subcommand is named `blip-migrate`,
/// `blip-host-serve`, ...), without clap's `help` subcommand.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Writes one man page per visible command into `dir` (made if missing); returns their paths,
/// the top-level `blip.1` first.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    std::fs::create_dir_all(dir).map_err(|e| GenerateError::Dir(dir.to_path_buf(), e))?;
    let mut written = Vec::new();
    let mut todo = vec![command()];
    while let Some(cmd) = todo.pop() {
        todo.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let path = clap_mangen::Man::new(cmd)
            .generate_to(dir)
            .map_err(|e| GenerateError::Page(dir.to_path_buf(), e))?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) -> Result<(), GenerateError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "blip", &mut script);
    out.write_all(&script).map_err(GenerateError::Script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_command_gets_a_page() {
        let dir = std::env::temp_dir().join(format!("blip-man-{}", std::process::id()));
        let pages = man_pages(&dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names[0], "blip.1");
        for want in [
            "blip-run.1",
            "blip-migrate.1",
            "blip-host.1",
            "blip-host-serve.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let top = std::fs::read_to_string(dir.join("blip.1")).unwrap();
        assert!(
            top.starts_with(".ie") || top.contains(".TH blip 1"),
            "{top}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bash_completion_names_the_subcommands() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        for sub in ["run", "receive", "migrate", "drain", "host", "generate"] {
            assert!(s.contains(sub), "{sub}");
        }
    }
}
