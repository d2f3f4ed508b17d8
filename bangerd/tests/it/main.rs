//! The daemon's integration tests, one module per area, in one binary
//! (one link of the daemon instead of one per file). Most need root and
//! start a real private system bus with polkitd, journald and bangerd
//! (`banger-testbed`); tests in different modules run concurrently, so
//! each one names what it creates after its process and a counter.

mod agent_transport;
mod artifacts;
mod autostart;
mod build_image;
mod build_kernel;
mod clone;
mod crash;
mod daemon;
mod daemon_dns;
mod dns;
mod exec;
mod folders;
mod fork;
mod guest_boot;
mod isolation;
mod kvm_probe;
mod net_firewall;
mod net_links;
mod oci;
mod package;
mod package_fresh;
mod package_update;
mod pull;
mod sandbox;
mod scale;
mod suspend;
mod systemd_units;
mod template;
mod trust;
mod tui;
mod update;
mod vm_lifecycle;
mod web;
