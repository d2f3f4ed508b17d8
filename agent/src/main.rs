//! `banger-agent`: the guest agent. For now it only reports its version;
//! the guest protocol (health, info, wait-for-port, shutdown over vsock or
//! virtio-serial) arrives with the guest-side work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--version" | "-V") => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "banger-agent {}: the guest protocol is not implemented yet; only --version works",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
