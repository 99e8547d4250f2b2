//! `blip generate`: the man pages and completion scripts the real binary writes. The pages
//! render with `man -l` where man exists (otherwise their .TH header and NAME section are
//! checked), and bash's completion script parses and completes blip's subcommands.

use std::path::Path;
use std::process::Command;

use blip_tests::{run_blip, scratch, stderr, stdout};

/// The subcommands `blip --help` lists (clap's `help` aside).
fn subcommands() -> Vec<String> {
    let o = run_blip(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let mut subs = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        if l.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside && !l.starts_with("  ") {
            break;
        }
        if let Some(w) = l.split_whitespace().next().filter(|_| inside) {
            if w != "help" {
                subs.push(w.to_string());
            }
        }
    }
    assert!(subs.len() >= 10, "{text}");
    subs
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn man_pages_are_written_one_per_command_and_render() {
    let dir = scratch("man");
    let out = dir.join("man1");
    let o = run_blip(&["generate", "man", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut pages = vec!["blip".to_string()];
    pages.extend(subcommands().iter().map(|s| format!("blip-{s}")));
    pages.extend(["blip-host-serve", "blip-host-status", "blip-generate-man"].map(String::from));
    for page in &pages {
        let path = out.join(format!("{page}.1"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let th = text.lines().find(|l| l.starts_with(".TH ")).unwrap_or("");
        assert!(th.starts_with(&format!(".TH {page} 1 ")), "{page}: {th:?}");
        let name = text
            .split_once(".SH NAME\n")
            .map(|(_, rest)| rest.lines().next().unwrap_or(""))
            .unwrap_or_else(|| panic!("{page}: no NAME section"));
        assert!(
            name.starts_with(&format!("{} \\- ", page.replace('-', "\\-"))),
            "{page}: NAME is {name:?}"
        );
        if have("man") {
            render(&path, page);
        }
    }
    assert!(
        !out.join("blip-help.1").exists(),
        "clap's help subcommand got a page"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `man -l PAGE` renders without a warning and shows the page's name.
fn render(path: &Path, page: &str) {
    let o = Command::new("man")
        .arg("-l")
        .arg(path)
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "man -l {}: {err}", path.display());
    assert!(err.trim().is_empty(), "man -l {}: {err}", path.display());
    let text = stdout(&o);
    assert!(text.contains("NAME") && text.contains(page), "{text}");
}

#[test]
fn bash_completion_parses_and_completes_the_subcommands() {
    let dir = scratch("completion");
    let o = run_blip(&["generate", "completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = dir.join("blip");
    std::fs::write(&script, &o.stdout).unwrap();
    let n = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(n.status.success(), "bash -n: {}", stderr(&n));
    let text = stdout(&o);
    for sub in subcommands() {
        assert!(text.contains(&sub), "the bash script never names {sub}");
    }
    // And bash completes with it: `blip mi<TAB>`, `blip host s<TAB>`.
    let complete = |words: &str, cword: usize| -> String {
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; _blip blip \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    assert_eq!(complete("blip mi", 1), "migrate");
    assert_eq!(complete("blip host se", 2), "serve");
    assert_eq!(complete("blip migrate --max-bl", 2), "--max-blackout");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zsh_and_fish_scripts_are_written_and_parse_where_the_shell_exists() {
    for shell in ["zsh", "fish"] {
        let o = run_blip(&["generate", "completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains("migrate"), "{shell}: {text}");
        if have(shell) {
            let dir = scratch(&format!("completion-{shell}"));
            let f = dir.join("blip");
            std::fs::write(&f, &o.stdout).unwrap();
            let n = Command::new(shell).arg("-n").arg(&f).output().unwrap();
            assert!(n.status.success(), "{shell} -n: {}", stderr(&n));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn an_unknown_shell_is_one_line_and_exit_2() {
    let o = run_blip(&["generate", "completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("blip: error: "), "{err}");
}
