//! The `bangerd` binary: configuration, logging, signals, then [`bangerd::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bangerd::config::Config;
use bangerd::paths::Dirs;
use bangerd::{Control, RunOptions};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// The banger system service. Normally started by systemd (D-Bus activation);
/// it owns org.banger.Manager on the system bus.
#[derive(Debug, Parser)]
#[command(version = bangerd::core::VERSION, about)]
struct Args {
    /// Configuration file [default: $CONFIGURATION_DIRECTORY/bangerd.toml, else /etc/banger/bangerd.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration file and exit.
    #[arg(long)]
    check_config: bool,
}

/// sysexits.h EX_CONFIG: systemd shows it as a configuration error.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // bangerd's own binary as a step's helper, single-threaded:
    // `sandbox-exec SPEC` runs a tool in its sandbox (os::sandbox),
    // `layers-apply SPEC` an OCI pull's layers (artifacts::oci::unpack).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `vmm-exec SPEC -- VMM ARGS...` puts a VMM in its jail and becomes it
    // (banger_vmm::jail), `jailer-exec NODES -- JAILER ARGS...` makes a
    // jailed Firecracker's device nodes and becomes its jailer
    // (banger_vmm::jailer), `virtiofsd-exec SPEC -- VIRTIOFSD` serves a
    // VM's host folders as its owner (banger_vmm::virtiofs); they return
    // only to say why they could not.
    let mode = argv.get(1).and_then(|a| a.to_str());
    let exec_helper: Option<fn(&[String]) -> String> = match mode {
        Some(bangerd::vm::vmm::jail::HELPER_ARG) => Some(bangerd::vm::vmm::jail::exec),
        Some(bangerd::vm::vmm::jailer::HELPER_ARG) => Some(bangerd::vm::vmm::jailer::exec),
        Some(bangerd::vm::vmm::virtiofs::HELPER_ARG) => Some(bangerd::vm::vmm::virtiofs::exec),
        _ => None,
    };
    if let (Some(exec), Some(name)) = (exec_helper, mode) {
        let rest: Option<Vec<String>> = argv[2..]
            .iter()
            .map(|a| a.to_str().map(str::to_owned))
            .collect();
        let why = match rest {
            Some(rest) => exec(&rest),
            None => "arguments that are not UTF-8".to_owned(),
        };
        eprintln!("bangerd {name}: {why}");
        return ExitCode::from(126);
    }
    if let [_, mode, spec] = argv.as_slice()
        && let (Some(mode), Some(spec)) = (mode.to_str(), spec.to_str())
    {
        let helper: Option<fn(&str) -> i32> = match mode {
            bangerd::os::sandbox::HELPER_ARG => Some(bangerd::os::sandbox::exec),
            bangerd::artifacts::oci::unpack::HELPER_ARG => {
                Some(bangerd::artifacts::oci::unpack::exec)
            }
            _ => None,
        };
        if let Some(helper) = helper {
            return ExitCode::from(u8::try_from(helper(spec)).unwrap_or(u8::MAX));
        }
    }
    // A newer release installed by `banger update` takes over (before any
    // thread exists, and before LISTEN_FDS are taken: they pass through).
    banger_release::exec_newest("bangerd", bangerd::core::VERSION);
    // Private by default, as the unit's UMask=0077 makes it: the state
    // directory is searchable by VMMs' users (for the kernels they share),
    // so nothing else in it may be readable by others. Steps started as
    // children get systemd's default back (artifacts::build::steps).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    bangerd::memory::limit_arenas();
    let args = Args::parse();
    let dirs = Dirs::from_env();
    let config_file = args.config.unwrap_or_else(|| dirs.config_file());
    let config = match Config::load(&config_file) {
        Ok(config) => config,
        Err(e) => {
            let _ = bangerd::logging::init("info");
            tracing::error!("{e}");
            eprintln!("bangerd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("{}: ok", config_file.display());
        return ExitCode::SUCCESS;
    }
    let (log, sink) = bangerd::logging::init(&config.daemon.log_level);
    tracing::debug!(?sink, "logging initialised");
    // Before any other thread exists: this unsets the LISTEN_* variables.
    let dns_fds = match bangerd::os::activation::take_named("dns") {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!("{e}");
            Vec::new()
        }
    };

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(serve(RunOptions {
                dirs,
                config_file,
                config,
                log: Some(log),
                dns_fds,
                exit_when_idle: bangerd::idle::started_by_systemd(),
            }))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("bangerd: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve(options: RunOptions) -> anyhow::Result<()> {
    let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".into());
    let conn = zbus::Connection::system()
        .await
        .with_context(|| format!("cannot connect to the system bus at {address}"))?;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        loop {
            let control = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(control).await.is_err() || control == Control::Shutdown {
                break;
            }
        }
    });
    bangerd::run(conn, options, rx)
        .await
        .context("bangerd stopped")
}
