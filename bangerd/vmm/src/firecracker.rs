//! Firecracker: one process and one API socket per VM, configured over
//! HTTP on that socket in the order `reference/firecracker-api.yaml`
//! (the upstream OpenAPI description) allows, then `InstanceStart`.
//!
//! The guest's devices match QEMU `microvm`'s: virtio-mmio block devices
//! (`/dev/vda` system, `/dev/vdb` work), one virtio-net NIC, the console
//! on ttyS0. The agent is reached over Firecracker's hybrid vsock: a unix
//! socket on the host where `CONNECT <port>\n` opens a guest stream.
//! Graceful stop is `SendCtrlAltDel`.
//!
//! With a jailer ([`Firecracker::jailer`]) and a VM uid
//! ([`LaunchSpec::confine`]), Firecracker runs in a chroot of its own as
//! that uid ([`crate::jailer`]); the configuration then names the files
//! as the chroot holds them ([`Names::jailed`]). Without one it runs as a
//! root with no capability, behind its own seccomp filters.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::{Accel, LaunchSpec, Saved, StateFds, Vmm, exited_at_start, kill_failed, start_process};
use crate::BoxFuture;
use crate::VmPaths;
use crate::jailer::{self, Layout};
use crate::process::{ProcessId, Watched};
use crate::supervise::{Launcher, Supervisor};
use banger_agent_host::AgentEndpoint;
use banger_error::{Error, Result};

/// The guest context id of every VM: each VM has its own vsock device and
/// socket, so they need not differ (3 is the lowest a guest may have).
pub const GUEST_CID: u32 = 3;

/// How long a new Firecracker process gets to open its API socket.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The Firecracker driver.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// The `firecracker` executable.
    pub binary: PathBuf,
    /// Firecracker's `jailer`, when it is to be used.
    pub jailer: Option<PathBuf>,
}

/// The paths the configuration names, as Firecracker sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    kernel: String,
    initrd: Option<String>,
    system_disk: String,
    work_disk: String,
    log: String,
    metrics: String,
    console: String,
    vsock: String,
}

impl Names {
    /// Unjailed: the host's paths.
    pub fn host(spec: &LaunchSpec) -> Self {
        let p = &spec.paths;
        Self {
            kernel: path(&spec.kernel),
            initrd: spec.initrd.as_deref().map(path),
            system_disk: path(&spec.system_disk),
            work_disk: path(&p.work_disk),
            log: path(&p.vmm_log),
            metrics: path(&metrics_path(p)),
            console: path(&p.console_log),
            vsock: path(&p.agent_socket),
        }
    }

    /// Jailed: the names in the chroot ([`jailer::inside`]).
    pub fn jailed(spec: &LaunchSpec) -> Self {
        use jailer::inside;
        Self {
            kernel: inside::KERNEL.into(),
            initrd: spec.initrd.as_ref().map(|_| inside::INITRD.into()),
            system_disk: inside::SYSTEM_DISK.into(),
            work_disk: inside::WORK_DISK.into(),
            log: inside::LOG.into(),
            metrics: inside::METRICS.into(),
            console: inside::CONSOLE.into(),
            vsock: inside::VSOCK.into(),
        }
    }
}

/// One request of the API conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    /// `PUT`, `PATCH` or `GET`.
    pub method: Method,
    /// The path, e.g. `/drives/system`.
    pub path: String,
    /// The JSON body, if any.
    pub body: Option<Value>,
}

impl ApiCall {
    fn put(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: Method::PUT,
            path: path.into(),
            body: Some(body),
        }
    }

    fn patch(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: Method::PATCH,
            path: path.into(),
            body: Some(body),
        }
    }

    /// `PATCH /vm`: pause or resume the guest.
    fn vm_state(state: &str) -> Self {
        Self::patch("/vm", json!({ "state": state }))
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where Firecracker flushes its metrics (one JSON line a minute).
pub fn metrics_path(paths: &VmPaths) -> PathBuf {
    paths.run.join("metrics.json")
}

impl Firecracker {
    /// The command line: only the API socket and the id; everything else
    /// goes over the API.
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
        vec![
            "--api-sock".into(),
            path(&spec.paths.control_socket),
            "--id".into(),
            spec.id.clone(),
        ]
    }

    /// The configuration sequence for `spec`, in order: logger and
    /// metrics first (so that what follows is logged), then machine,
    /// boot source, drives, NIC, vsock, serial, and `InstanceStart`.
    pub fn configuration(spec: &LaunchSpec) -> Vec<ApiCall> {
        Self::configuration_as(spec, &Names::host(spec))
    }

    /// [`Self::configuration`] with the files named as `names`. A VMM
    /// that waits for a snapshot ([`LaunchSpec::incoming`]) gets only
    /// its logger and metrics: the snapshot holds the rest, and
    /// `/snapshot/load` is refused after anything else.
    pub fn configuration_as(spec: &LaunchSpec, names: &Names) -> Vec<ApiCall> {
        let mut boot = json!({
            "kernel_image_path": names.kernel,
            "boot_args": spec.cmdline,
        });
        if let Some(initrd) = &names.initrd {
            boot["initrd_path"] = json!(initrd);
        }
        let mut calls = vec![
            ApiCall::put(
                "/logger",
                json!({
                    "log_path": names.log,
                    "level": "Info",
                    "show_level": true,
                    "show_log_origin": false,
                }),
            ),
            ApiCall::put("/metrics", json!({ "metrics_path": names.metrics })),
        ];
        if spec.incoming {
            return calls;
        }
        calls.extend([
            ApiCall::put(
                "/machine-config",
                json!({
                    "vcpu_count": spec.vcpus,
                    "mem_size_mib": spec.memory_mib,
                    "smt": false,
                }),
            ),
            ApiCall::put("/boot-source", boot),
        ]);
        for (id, disk, root) in [
            ("system", &names.system_disk, true),
            ("work", &names.work_disk, false),
        ] {
            calls.push(ApiCall::put(
                format!("/drives/{id}"),
                json!({
                    "drive_id": id,
                    "path_on_host": disk,
                    "is_root_device": root,
                    "is_read_only": false,
                    "cache_type": "Unsafe",
                    "io_engine": "Sync",
                }),
            ));
        }
        if let Some((tap, mac)) = &spec.net {
            calls.push(ApiCall::put(
                "/network-interfaces/net0",
                json!({
                    "iface_id": "net0",
                    "host_dev_name": tap,
                    "guest_mac": mac,
                }),
            ));
        }
        calls.push(ApiCall::put(
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": names.vsock,
            }),
        ));
        // Randomness from the host for the guest's pool.
        calls.push(ApiCall::put("/entropy", json!({})));
        calls.push(ApiCall::put(
            "/serial",
            json!({ "serial_out_path": names.console }),
        ));
        calls.push(ApiCall::put(
            "/actions",
            json!({ "action_type": "InstanceStart" }),
        ));
        calls
    }
}

/// A client of one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    /// The API at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// Send `call`; a 2xx answer's body (empty for 204), or an error with
    /// Firecracker's `fault_message`.
    pub async fn send(&self, call: &ApiCall) -> Result<Bytes> {
        let what = format!("{} {}", call.method, call.path);
        let stream = banger_agent_host::connect_nofollow(&self.socket)
            .await
            .map_err(|e| {
                Error::failed(format!(
                    "cannot reach the firecracker API at {}: {e}",
                    self.socket.display()
                ))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::failed(format!("firecracker API {what}: {e}")))?;
        let conn = tokio::spawn(conn);
        let body = match &call.body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(&call.path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if call.body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Error::failed(format!("firecracker API {what}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Error::failed(format!("firecracker API {what}: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| Error::failed(format!("firecracker API {what}: {e}")))?;
        drop(sender);
        conn.abort();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(Error::failed(format!(
            "firecracker refused {what} ({}): {}",
            status.as_u16(),
            fault_message(status, &bytes)
        )))
    }

    /// `GET /`: the instance's state (`Not started`, `Running`, `Paused`).
    pub async fn state(&self) -> Result<String> {
        let body = self
            .send(&ApiCall {
                method: Method::GET,
                path: "/".into(),
                body: None,
            })
            .await?;
        let info: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::failed(format!("firecracker GET / answered no JSON: {e}")))?;
        info.get("state")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::failed(format!("firecracker GET / has no state: {info}")))
    }

    /// Wait until the API answers `GET /`, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            match self.state().await {
                Ok(state) => return Ok(state),
                Err(e) if started.elapsed() > timeout => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Send each call in order; stop at the first refusal.
    pub async fn configure(&self, calls: &[ApiCall]) -> Result<()> {
        for call in calls {
            self.send(call).await?;
        }
        Ok(())
    }
}

/// The `fault_message` of an error body (`Error` in the spec), or the
/// status when there is none.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body).trim().to_owned();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("no message").to_owned()
            } else {
                text
            }
        })
}

impl Firecracker {
    /// The chroot of the VM whose files are `paths`, when it runs jailed
    /// (the chroot exists from its start until [`jailer::release`]).
    fn jail_of(&self, paths: &VmPaths) -> Option<Layout> {
        let layout = Layout::new(paths, &self.binary);
        std::fs::symlink_metadata(&layout.root)
            .is_ok()
            .then_some(layout)
    }

    /// Where a snapshot's files are linked for Firecracker.
    fn site(&self, paths: &VmPaths) -> snapshot::Site {
        match self.jail_of(paths) {
            Some(layout) => snapshot::Site {
                dir: layout.root,
                jailed: true,
            },
            None => snapshot::Site {
                dir: paths.dir.clone(),
                jailed: false,
            },
        }
    }

    /// Send `call` with the snapshot's files linked for `use_`, unlinked
    /// again whatever the answer.
    async fn with_files(
        &self,
        paths: &VmPaths,
        files: &StateFds,
        use_: snapshot::Use,
        call: impl FnOnce(&snapshot::Site) -> ApiCall,
    ) -> Result<()> {
        let memory = files.memory.as_ref().ok_or_else(|| {
            Error::failed(
                "firecracker keeps a guest's memory in a file of its own, and none was given",
            )
        })?;
        let site = self.site(paths);
        let dups = [&files.state, memory].map(OwnedFd::try_clone);
        let s = site.clone();
        let placed = tokio::task::spawn_blocking(move || {
            let [state, memory] = dups;
            snapshot::place(&s, [state?, memory?], use_)
        })
        .await
        .map_err(|e| Error::failed(format!("the snapshot's files were not placed: {e}")))?
        .map_err(|e| {
            Error::failed(format!(
                "cannot give firecracker the snapshot's files in {}: {e}",
                site.dir.display()
            ))
        })?;
        let sent = Api::new(self.api_socket(paths)).send(&call(&site)).await;
        let removed = tokio::task::spawn_blocking(move || placed.remove())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        sent?;
        removed.map_err(|e| {
            Error::failed(format!(
                "cannot take the snapshot's files back from {}: {e}",
                site.dir.display()
            ))
        })
    }

    /// The API socket of the VM whose files are `paths`.
    fn api_socket(&self, paths: &VmPaths) -> PathBuf {
        match self.jail_of(paths) {
            Some(layout) => layout.host(jailer::inside::API),
            None => paths.control_socket.clone(),
        }
    }

    /// Start the process: the jailer (maybe behind `jailer-exec`) with a
    /// freshly prepared chroot, or Firecracker itself. Returns the
    /// process, its API, and how Firecracker names the files.
    async fn start(
        &self,
        spec: &LaunchSpec,
        supervisor: &dyn Supervisor,
    ) -> Result<(Watched, ProcessId, Api, Names)> {
        let p = &spec.paths;
        let (Some(jailer_bin), Some(confine)) = (&self.jailer, &spec.confine) else {
            // Logger, metrics and serial outputs must exist beforehand;
            // a chroot left by a jailed run goes.
            for file in [&p.vmm_log, &metrics_path(p), &p.console_log] {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .map_err(|e| Error::failed(format!("cannot create {}: {e}", file.display())))?;
            }
            jailer::release(p).map_err(|e| {
                Error::failed(format!("cannot remove the jail of an earlier run: {e}"))
            })?;
            let (watched, id) = start_process(
                spec,
                supervisor,
                &self.binary,
                &self.args(spec),
                None,
                Launcher::Bare,
            )
            .await?;
            return Ok((watched, id, Api::new(&p.control_socket), Names::host(spec)));
        };
        jailer::check(&self.binary, &spec.id).map_err(|e| Error::unavailable(e.to_string()))?;
        let layout = Layout::new(p, &self.binary);
        let gid = crate::jail::VMM_GROUP;
        let nodes = jailer::prepare(&layout, spec, confine.uid, gid)
            .map_err(|e| Error::failed(e.to_string()))?;
        let args = jailer::args(&layout, &self.binary, &spec.id, confine.uid, gid);
        let (program, argv) = jailer::command(&confine.helper, &nodes, jailer_bin, &args);
        let started =
            start_process(spec, supervisor, &program, &argv, None, Launcher::Jailer).await;
        let (watched, id) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = jailer::release(p);
                return Err(e);
            }
        };
        let api = Api::new(layout.host(jailer::inside::API));
        Ok((watched, id, api, Names::jailed(spec)))
    }
}

impl Vmm for Firecracker {
    fn driver(&self) -> crate::VmmDriver {
        crate::VmmDriver::Firecracker
    }

    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        supervisor: &'a dyn Supervisor,
    ) -> BoxFuture<'a, Result<(Watched, ProcessId)>> {
        Box::pin(async move {
            let p = &spec.paths;
            let (mut watched, id, api, names) = self.start(spec, supervisor).await?;
            let configured = async {
                // The API answers once the socket is bound; a bad start
                // makes the process exit first.
                let started = Instant::now();
                loop {
                    if watched.ended() {
                        return Err(exited_at_start("firecracker", &p.vmm_log));
                    }
                    match api.state().await {
                        Ok(_) => break,
                        Err(e) if started.elapsed() > API_TIMEOUT => return Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                api.configure(&Self::configuration_as(spec, &names)).await
            }
            .await;
            match configured {
                Ok(()) => Ok((watched, id)),
                Err(e) => {
                    kill_failed(supervisor, &spec.id, &mut watched, id).await;
                    let _ = jailer::release(p);
                    Err(e)
                }
            }
        })
    }

    fn agent(&self, paths: &VmPaths) -> AgentEndpoint {
        let uds = match self.jail_of(paths) {
            Some(layout) => layout.host(jailer::inside::VSOCK),
            None => paths.agent_socket.clone(),
        };
        AgentEndpoint::FirecrackerVsock {
            uds,
            port: banger_agent_proto::VSOCK_PORT,
        }
    }

    fn request_shutdown<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Api::new(self.api_socket(paths))
                .send(&ApiCall::put(
                    "/actions",
                    json!({ "action_type": "SendCtrlAltDel" }),
                ))
                .await
                .map(|_| ())
        })
    }

    fn wants_elf_kernel(&self) -> bool {
        true
    }

    fn snapshots(&self) -> bool {
        true
    }

    /// Firecracker reopens the disks a snapshot names: under the jailer
    /// every VM's are at the same names in its own chroot; without it
    /// they are the paths of the VM that was saved.
    fn portable_snapshots(&self) -> bool {
        self.jailer.is_some()
    }

    fn memory_apart(&self) -> bool {
        true
    }

    fn save<'a>(&'a self, paths: &'a VmPaths, to: StateFds) -> BoxFuture<'a, Result<Saved>> {
        Box::pin(async move {
            let api = Api::new(self.api_socket(paths));
            api.send(&ApiCall::vm_state("Paused")).await?;
            let written = self
                .with_files(paths, &to, snapshot::Use::Write, |site| {
                    let [state, memory] = site.seen();
                    ApiCall::put(
                        "/snapshot/create",
                        json!({
                            "snapshot_type": "Full",
                            "snapshot_path": state,
                            "mem_file_path": memory,
                        }),
                    )
                })
                .await;
            if let Err(e) = written {
                // The guest goes on as it was.
                let _ = api.send(&ApiCall::vm_state("Resumed")).await;
                return Err(e);
            }
            // Firecracker runs only under KVM.
            Ok(Saved { accel: Accel::Kvm })
        })
    }

    fn restore<'a>(&'a self, spec: &'a LaunchSpec, from: StateFds) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let paths = &spec.paths;
            self.with_files(paths, &from, snapshot::Use::Read, |site| {
                let [state, memory] = site.seen();
                let mut load = json!({
                    "snapshot_path": state,
                    "mem_backend": { "backend_type": "File", "backend_path": memory },
                    "resume_vm": true,
                });
                // This VM's TAP, not the saved one's.
                if let Some((tap, _)) = &spec.net {
                    load["network_overrides"] =
                        json!([{ "iface_id": "net0", "host_dev_name": tap }]);
                }
                // Jailed, the socket has the same name in every chroot.
                if !site.jailed {
                    load["vsock_override"] = json!({ "uds_path": path(&paths.agent_socket) });
                }
                ApiCall::put("/snapshot/load", load)
            })
            .await
            .map_err(|e| {
                Error::failed(format!(
                    "firecracker could not load the guest's state: {}",
                    e.message
                ))
            })
        })
    }

    fn resume<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            Api::new(self.api_socket(paths))
                .send(&ApiCall::vm_state("Resumed"))
                .await
                .map(|_| ())
        })
    }

    /// Launched for a snapshot, it reports "Not started" until one is
    /// loaded.
    fn awaits_state<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            Api::new(self.api_socket(paths))
                .state()
                .await
                .is_ok_and(|s| s == "Not started")
        })
    }

    /// Firecracker has no request to exit: its process is killed.
    fn quit<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        let _ = paths;
        Box::pin(async {
            Err(Error::unavailable(
                "firecracker cannot be asked to exit; its process is to be killed",
            ))
        })
    }

    fn program(&self) -> &std::path::Path {
        &self.binary
    }

    fn confined(&self) -> bool {
        self.jailer.is_some()
    }
}

mod snapshot;

#[cfg(test)]
mod tests;
