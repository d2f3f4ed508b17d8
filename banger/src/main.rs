//! `banger`: the command-line client of bangerd.
//!
//! Parsing happens in two stages ([`cli`]: clap structs, then a resolved
//! [`cli::Invocation`]); [`commands`] runs it over D-Bus through [`client`];
//! `main` turns the outcome into an exit code ([`exit`]) and prints errors
//! with their whole cause chain.

mod artifacts;
mod cli;
mod client;
mod commands;
mod cp;
mod docs;
mod exec;
mod exit;
mod forward;
mod live;
mod names;
mod output;
mod polkit_agent;
mod progress;
mod registry_auth;
mod session;
mod tui;
mod vm;
mod web;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    // A newer release installed by `banger update` takes over.
    banger_release::exec_newest("banger", banger_release::VERSION);
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err, wants_json(&args)),
    };
    let invocation = cli.resolve();
    let json = invocation.options.json;
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(commands::run(invocation)));
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => report(&err, json),
    }
}

/// Whether `--json` is among the arguments (before `--`), for errors that
/// happen before parsing succeeded.
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| a.as_os_str() != "--")
        .any(|a| a.as_os_str() == "--json")
}

fn usage_error(err: &clap::Error, json: bool) -> ExitCode {
    if json && err.use_stderr() {
        let rendered = err.to_string();
        let message = match err.kind() {
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                "a command is required: see `banger --help`"
            }
            _ => rendered
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: "),
        };
        let _ = output::emit_json(&output::error_json("org.banger.Cli.Error.Usage", message));
    }
    let _ = err.print();
    ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(exit::USAGE))
}

/// Print `error: ...` and every cause on stderr (and the JSON error on
/// stdout with `--json`); the exit code comes from the error's kind.
fn report(err: &anyhow::Error, json: bool) -> ExitCode {
    if is_broken_pipe(err) {
        // The reader went away (`banger man | head`): nothing to tell anyone.
        return ExitCode::from(exit::OK);
    }
    let (kind, name) = exit::classify(err);
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if json {
        let message = err
            .chain()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        let _ = output::emit_json(&output::error_json(&name, &message));
    }
    ExitCode::from(kind.code())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
