//! Console logs and resource use of VMs.

use std::path::PathBuf;
use std::time::Duration;

use super::Vms;
use crate::auth::Caller;
use crate::error::{Error, ErrorKind, Result};
use crate::vm::VmState;
use crate::vm::process::ProcessId;

use super::{blocking, vmm_named};

/// Resource usage of a running VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmStats {
    /// CPU time of the VMM process, microseconds.
    pub cpu_usec: u64,
    /// Resident memory of the VMM process, bytes.
    pub rss_bytes: u64,
    /// Seconds since the VMM started.
    pub uptime_secs: f64,
    /// The guest's kernel release, from the agent; empty when it does not answer.
    pub guest_kernel: String,
    /// The guest's hostname, from the agent.
    pub guest_hostname: String,
    /// The guest's `MemTotal` and `MemAvailable`, bytes, from the agent
    /// (0 when it does not answer).
    pub guest_memory_total_bytes: u64,
    pub guest_memory_available_bytes: u64,
    /// The guest's `/` and `/root`: mount point, size and bytes used,
    /// from the agent.
    pub guest_disks: Vec<(String, u64, u64)>,
}

impl Vms {
    /// Where VM `id`'s console log is.
    pub fn console_log_path(&self, id: &str) -> PathBuf {
        self.vm_paths(id).console_log
    }

    /// Up to 1 MiB of VM `id`'s console log from byte `offset`, and
    /// the offset after it. Only its owner (or `manage-others`) may read it.
    pub async fn vm_console(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_read_vm(caller, &vm).await?;
        let log = self.vm_paths(&vm.id).console_log;
        blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = match std::fs::File::open(&log) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
                Err(e) => return Err(Error::failed(format!("cannot read the console log: {e}"))),
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A log shorter than the offset was started anew: from the top.
            let from = if offset > len { 0 } else { offset };
            file.seek(SeekFrom::Start(from))
                .map_err(|e| Error::failed(format!("cannot read the console log: {e}")))?;
            let mut data = Vec::new();
            file.take(1 << 20)
                .read_to_end(&mut data)
                .map_err(|e| Error::failed(format!("cannot read the console log: {e}")))?;
            let next = from + data.len() as u64;
            Ok((data, next))
        })
        .await
    }

    /// CPU and memory of the VMM process and what the agent says.
    pub async fn vm_stats(&self, caller: &Caller, id: &str) -> Result<VmStats> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_read_vm(caller, &vm).await?;
        let (Some(pid), Some(start)) = (vm.pid, vm.pid_start) else {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("vm {} is not running", vm.name),
            ));
        };
        let process = ProcessId { pid, start };
        let mut stats = blocking(move || Ok(process_stats(process)))
            .await?
            .ok_or_else(|| Error::new(ErrorKind::Busy, format!("vm {} is not running", vm.name)))?;
        if vm.state == VmState::Running {
            let vmm = vmm_named(&self.config(), vm.vmm)?;
            if let Ok(mut conn) = self
                .agent
                .connect(&vmm.agent(&self.vm_paths(&vm.id)), Duration::from_secs(2))
                .await
                && let Ok(info) = conn.info(Duration::from_secs(2)).await
            {
                stats.guest_kernel = info.kernel_release;
                stats.guest_hostname = info.hostname;
                stats.guest_memory_total_bytes = info.memory_total_bytes;
                stats.guest_memory_available_bytes = info.memory_available_bytes;
                stats.guest_disks = info
                    .disks
                    .into_iter()
                    .map(|d| (d.path, d.total_bytes, d.used_bytes))
                    .collect();
            }
        }
        Ok(stats)
    }
}

/// CPU time, resident memory and uptime of a process, from /proc.
fn process_stats(p: ProcessId) -> Option<VmStats> {
    if !p.alive() {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(VmStats {
        cpu_usec: (utime + stime) * 1_000_000 / ticks,
        rss_bytes: rss_kib * 1024,
        uptime_secs: (uptime - p.start as f64 / ticks as f64).max(0.0),
        ..VmStats::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{image, kernel};
    use super::*;
    use crate::auth::{Action, Authorizer, BoxFuture};
    use crate::config::Config;
    use crate::core::{Core, CoreDeps};
    use crate::doctor::{BusProbe, HostPaths, NameState};
    use crate::store::Store;
    use crate::vm::agent::{
        AgentConnectError, AgentEndpoint, AgentSession, AgentWaitError, GuestAgent, Ready,
    };
    use crate::vm::{Vm, VmmDriver};
    use banger_agent_proto::Info;
    use banger_agent_proto::client::ClientError;
    use std::sync::Arc;

    #[derive(Debug)]
    struct NoBus;

    impl BusProbe for NoBus {
        fn name_state<'a>(&'a self, _: &'a str) -> BoxFuture<'a, NameState> {
            Box::pin(async { NameState::Absent })
        }
    }

    #[test]
    fn process_stats_of_a_live_process() {
        let me = ProcessId::of(std::process::id()).expect("me");
        let s = process_stats(me).expect("stats");
        assert!(s.rss_bytes > 0);
        assert!(s.uptime_secs >= 0.0);
        let gone = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(process_stats(gone).is_none());
    }

    /// Answers `Info` with fixed values and records where it was asked.
    #[derive(Debug, Default)]
    struct FakeAgent {
        asked: std::sync::Mutex<Vec<String>>,
    }

    struct FakeSession;

    impl AgentSession for FakeSession {
        fn info(&mut self, _: Duration) -> BoxFuture<'_, Result<Info, ClientError>> {
            Box::pin(async {
                Ok(Info {
                    kernel_release: "6.1.0-fake".into(),
                    kernel_version: String::new(),
                    machine: "x86_64".into(),
                    hostname: "fake-guest".into(),
                    os_id: None,
                    os_pretty_name: None,
                    memory_total_bytes: 0,
                    memory_available_bytes: 0,
                    disks: vec![],
                })
            })
        }

        fn wait_port(
            &mut self,
            _: u16,
            _: Duration,
        ) -> BoxFuture<'_, Result<Duration, ClientError>> {
            Box::pin(async { Ok(Duration::ZERO) })
        }

        fn shutdown(&mut self, _: bool, _: Duration) -> BoxFuture<'_, Result<(), ClientError>> {
            Box::pin(async { Ok(()) })
        }

        fn mount(
            &mut self,
            _: &str,
            _: &str,
            _: bool,
            _: Duration,
        ) -> BoxFuture<'_, Result<(), ClientError>> {
            Box::pin(async { Ok(()) })
        }
    }

    impl GuestAgent for FakeAgent {
        fn wait_ready<'a>(
            &'a self,
            _: &'a AgentEndpoint,
            overall: Duration,
            _: Duration,
        ) -> BoxFuture<'a, Result<Ready, AgentWaitError>> {
            Box::pin(async move {
                Err(AgentWaitError::Timeout {
                    secs: overall.as_secs_f64(),
                    last: "fake".into(),
                })
            })
        }

        fn connect<'a>(
            &'a self,
            endpoint: &'a AgentEndpoint,
            _: Duration,
        ) -> BoxFuture<'a, Result<Box<dyn AgentSession>, AgentConnectError>> {
            self.asked.lock().expect("lock").push(endpoint.to_string());
            Box::pin(async { Ok(Box::new(FakeSession) as Box<dyn AgentSession>) })
        }
    }

    #[derive(Debug)]
    struct AllowAll;

    impl Authorizer for AllowAll {
        fn authorize<'a>(&'a self, _: &'a Caller, _: Action) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// The stats of a running VM carry what the VMs service's agent says:
    /// the lifecycle reaches guests only through the `GuestAgent` it was
    /// given (this process stands in for the VMM).
    #[tokio::test]
    async fn stats_ask_the_agent_the_service_was_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = crate::paths::Dirs::from_lookup(|var| Some(dir.path().join(var)));
        dirs.create().expect("dirs");
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let agent = Arc::new(FakeAgent::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        let core = Core::new(
            Config::default(),
            CoreDeps {
                config_file: dirs.config_file(),
                dirs,
                store: store.clone(),
                authorizer: Arc::new(AllowAll),
                bus: Arc::new(NoBus),
                host: HostPaths::default(),
                supervisor: Arc::new(crate::vm::supervise::Direct),
                steps: Arc::new(crate::artifacts::build::steps::Direct),
                tools: Arc::new(banger_formats::tool::Unconfined),
                helper: std::path::PathBuf::from("bangerd"),
                dm: Arc::new(crate::vm::snapshot::Absent),
                agent: agent.clone(),
                link_dns: Arc::new(crate::net::resolved::NoLinkDns),
                releases: banger_release::Releases::new(dir.path().join("releases")),
                restart: Arc::new(crate::update::NoRestart),
            },
            tx,
        );
        store.insert_kernel(&kernel(false)).expect("kernel");
        store.insert_image(&image(None)).expect("image");
        let me = ProcessId::of(std::process::id()).expect("me");
        let vm = Vm {
            id: "00000000000000v1".into(),
            name: "web".into(),
            owner_uid: 0,
            image_id: "i".into(),
            kernel_id: "k".into(),
            vcpus: 1,
            memory_mib: 128,
            disk_bytes: 64 << 20,
            nat: false,
            peers: false,
            autostart: false,
            state: VmState::Running,
            vmm: Some(VmmDriver::Qemu),
            pid: Some(me.pid),
            pid_start: Some(me.start),
            tap: None,
            ssh_keys: vec![],
            disk_method: None,
            created_at: 0,
            last_error: String::new(),
            forwards: Vec::new(),
            mounts: Vec::new(),
            suspended: false,
        };
        store.insert_vm(&vm).expect("vm");

        let stats = core
            .vms()
            .vm_stats(&Caller::root(), &vm.id)
            .await
            .expect("stats");
        assert_eq!(stats.guest_kernel, "6.1.0-fake");
        assert_eq!(stats.guest_hostname, "fake-guest");
        assert!(stats.rss_bytes > 0);
        let asked = agent.asked.lock().expect("lock").clone();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(asked[0].contains(&vm.id), "{asked:?}");
    }
}
