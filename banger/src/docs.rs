//! Man pages and shell completions, generated from the clap definitions.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

use crate::cli::Cli;
use crate::exit;

/// Write the completion script for `shell`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut cmd = Cli::command_tree();
    clap_complete::generate(shell, &mut cmd, "banger", out);
}

/// The whole command tree as one man page: the usual sections of
/// `banger(1)`, EXIT STATUS, and a COMMAND REFERENCE with every command.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    let mut root = Cli::command_tree().disable_help_subcommand(true);
    root.build();
    let man = clap_mangen::Man::new(root.clone());
    render_common(&man, out)?;
    out.write_all(exit_status_section().as_bytes())?;
    out.write_all(b".SH \"COMMAND REFERENCE\"\n")?;
    for sub in visible_subcommands(&root) {
        write_reference(sub, &mut vec!["banger".to_owned()], out)?;
    }
    man.render_version_section(out)
}

/// One page per command in `dir` (banger.1, banger-daemon.1,
/// banger-daemon-maintain.1, ...). Returns the files written.
pub fn man_pages_to(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut root = Cli::command_tree().disable_help_subcommand(true);
    root.build();
    let mut written = Vec::new();
    write_pages(&root, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    render_common(&man, &mut page)?;
    page.extend_from_slice(exit_status_section().as_bytes());
    man.render_version_section(&mut page)?;
    std::fs::write(&path, page)?;
    written.push(path);
    for sub in visible_subcommands(cmd) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

fn render_common(man: &clap_mangen::Man, out: &mut dyn Write) -> std::io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// The EXIT STATUS section, from [`exit::EXIT_CODES`].
pub fn exit_status_section() -> String {
    let mut text = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in exit::EXIT_CODES {
        text.push_str(&format!(".TP\n.B {code}\n{}\n", escape(meaning)));
    }
    text.push_str(&format!(
        ".PP\n{}\n",
        escape(
            "With --json, errors are also printed on stdout as \
             {\"error\":{\"name\":...,\"message\":...}}."
        )
    ));
    text
}

fn write_reference(
    cmd: &clap::Command,
    path: &mut Vec<String>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    path.push(cmd.get_name().to_owned());
    let full_name = path.join(" ");
    let mut text = format!(".SS \"{}\"\n", escape(&full_name));
    if let Some(about) = cmd.get_long_about().or_else(|| cmd.get_about()) {
        for paragraph in about.to_string().split("\n\n") {
            text.push_str(&format!(".PP\n{}\n", escape(paragraph.trim())));
        }
    }
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:").trim();
    text.push_str(&format!(".PP\n\\fBUsage:\\fR {}\n", escape(usage)));
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || arg.is_global_set() || id == "help" || id == "version" {
            continue;
        }
        text.push_str(&format!(".TP\n{}\n", arg_heading(arg)));
        if let Some(help) = arg.get_long_help().or_else(|| arg.get_help()) {
            text.push_str(&format!("{}\n", escape(&help.to_string())));
        }
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_owned())
            .collect();
        if !values.is_empty() && arg.get_action().takes_values() {
            text.push_str(&format!(
                ".br\n[possible values: {}]\n",
                escape(&values.join(", "))
            ));
        }
    }
    out.write_all(text.as_bytes())?;
    for sub in visible_subcommands(cmd) {
        write_reference(sub, path, out)?;
    }
    path.pop();
    Ok(())
}

fn arg_heading(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string);
    if arg.is_positional() {
        return format!("\\fI<{}>\\fR", escape(&value));
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("\\fB\\-{short}\\fR"));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("\\fB\\-\\-{}\\fR", escape(long)));
    }
    let mut heading = names.join(", ");
    if arg.get_action().takes_values() {
        heading.push_str(&format!(" \\fI<{}>\\fR", escape(&value)));
    }
    heading
}

/// Escape text for roff: backslashes, hyphens, and control characters at
/// the start of a line.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for line in text.lines() {
        if !escaped.is_empty() {
            escaped.push('\n');
        }
        if line.starts_with('.') || line.starts_with('\'') {
            escaped.push_str("\\&");
        }
        for c in line.chars() {
            match c {
                '\\' => escaped.push_str("\\e"),
                '-' => escaped.push_str("\\-"),
                _ => escaped.push(c),
            }
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn man() -> String {
        let mut out = Vec::new();
        man_page(&mut out).expect("render");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn man_page_covers_the_tree() {
        let page = man();
        assert!(
            page.starts_with(".ie") || page.contains(".TH banger"),
            "{page}"
        );
        for needle in [
            ".SH \"EXIT STATUS\"",
            ".SS \"banger doctor\"",
            ".SS \"banger daemon status\"",
            ".SS \"banger daemon maintain\"",
            "\\fB\\-\\-vacuum\\fR",
            ".SS \"banger job cancel\"",
            ".SS \"banger vm create\"",
            ".SS \"banger image pull\"",
            ".SS \"banger kernel import\"",
            ".SS \"banger update\"",
            ".SS \"banger completions\"",
            ".SS \"banger man\"",
            "not implemented yet",
            "\\-\\-no\\-ask\\-password",
        ] {
            assert!(page.contains(needle), "man page lacks {needle}");
        }
        for (code, _) in exit::EXIT_CODES {
            assert!(page.contains(&format!(".B {code}\n")), "exit code {code}");
        }
    }

    #[test]
    fn man_pages_per_command() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = man_pages_to(dir.path()).expect("written");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        for name in [
            "banger.1",
            "banger-daemon-maintain.1",
            "banger-vm-create.1",
            "banger-job-show.1",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
    }

    #[test]
    fn bash_completions() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out);
        let script = String::from_utf8(out).expect("utf-8");
        assert!(script.contains("banger"));
        assert!(script.contains("maintain"));
        for shell in [Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            assert!(!out.is_empty(), "{shell}");
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("a-b\\c"), "a\\-b\\ec");
        assert_eq!(escape(".x\n'y"), "\\&.x\n\\&'y");
    }
}
