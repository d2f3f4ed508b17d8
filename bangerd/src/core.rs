//! The internal command API. Every front end (D-Bus today) calls these
//! methods with a [`Caller`] and plain Rust types; nothing here knows about
//! the wire.

use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::{Artifacts, ArtifactsDeps};
use crate::auth::{Action, Authorizer, Caller};
use crate::config::{Config, SharedConfig};
use crate::doctor::{self, BusProbe, Check, HostPaths};
use crate::error::{Error, Result};
use crate::jobs::{JobId, JobOutcome, JobSettings, JobSnapshot, Jobs};
use crate::net::host::HostNetwork;
use crate::paths::Dirs;
use crate::store::{Store, StoreError};
use crate::vm::commands::{Vms, VmsDeps};
use crate::vm::quota::Quotas;

/// Run a blocking store call off the async threads.
async fn on_store<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    crate::blocking::run(move || f(&store)).await
}

/// Daemon version.
pub const VERSION: &str = banger_release::VERSION;

/// Options of the store-maintenance job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintainOptions {
    /// Also `VACUUM` the store.
    pub vacuum: bool,
}

/// What the core needs from the outside world.
#[derive(Debug)]
pub struct CoreDeps {
    /// Where things live.
    pub dirs: Dirs,
    /// The configuration file (reloads read it again).
    pub config_file: std::path::PathBuf,
    /// The open store.
    pub store: Arc<Store>,
    /// Decides who may do what.
    pub authorizer: Arc<dyn Authorizer>,
    /// Answers bus questions for `doctor`.
    pub bus: Arc<dyn BusProbe>,
    /// Host paths for `doctor`.
    pub host: HostPaths,
    /// Who runs VMM processes.
    pub supervisor: Arc<dyn crate::vm::supervise::Supervisor>,
    /// Who runs the privileged steps of image builds.
    pub steps: Arc<dyn crate::artifacts::build::steps::StepRunner>,
    /// Runs e2fsprogs on users' and guests' file systems (sandboxed).
    pub tools: Arc<dyn banger_formats::tool::Tools>,
    /// bangerd's own binary: the tools' sandbox and OCI layers run it.
    pub helper: std::path::PathBuf,
    /// Device-mapper, for snapshot system disks where it exists.
    pub dm: Arc<dyn crate::vm::snapshot::DeviceMapper>,
    /// Reaches the guests' agents.
    pub agent: Arc<dyn crate::vm::agent::GuestAgent>,
    /// The host's resolver, told to route `.vm` to the bridge.
    pub link_dns: Arc<dyn crate::net::resolved::LinkDns>,
    /// Where `banger update` installs releases.
    pub releases: banger_release::Releases,
    /// Restarts the daemon after an update.
    pub restart: Arc<dyn crate::update::Restart>,
}

/// The daemon root: composes the services and runs the commands that
/// belong to none of them (doctor, maintenance, jobs, configuration).
#[derive(Debug)]
pub struct Core {
    config: SharedConfig,
    deps: CoreDeps,
    jobs: Arc<Jobs>,
    /// Releases of banger itself.
    updates: crate::update::Updates,
    /// The per-user limits.
    quotas: Arc<Quotas>,
    /// The host network the VMs share.
    net: Arc<HostNetwork>,
    /// Kernels, images and their catalogs.
    artifacts: Arc<Artifacts>,
    /// The VMs.
    vms: Arc<Vms>,
}

fn job_settings(config: &Config) -> JobSettings {
    JobSettings {
        retention: Duration::from_secs(config.daemon.job_retention_secs),
        stage_delay: Duration::from_millis(config.debug.job_stage_delay_ms),
    }
}

impl Core {
    /// A core reporting job events to `events`.
    pub fn new(
        config: Config,
        deps: CoreDeps,
        events: tokio::sync::mpsc::UnboundedSender<crate::jobs::JobEvent>,
    ) -> Arc<Self> {
        let jobs = Jobs::new(deps.store.clone(), events, job_settings(&config));
        let config = SharedConfig::new(config);
        let updates = crate::update::Updates {
            config: config.clone(),
            config_file: deps.config_file.clone(),
            state: deps.dirs.state.clone(),
            authorizer: deps.authorizer.clone(),
            releases: deps.releases.clone(),
            restart: deps.restart.clone(),
            jobs: jobs.clone(),
        };
        let quotas = Arc::new(Quotas::new(
            config.clone(),
            deps.store.clone(),
            deps.authorizer.clone(),
        ));
        let artifacts = Arc::new(Artifacts::new(ArtifactsDeps {
            config: config.clone(),
            state: deps.dirs.state.clone(),
            cache: deps.dirs.cache.clone(),
            store: deps.store.clone(),
            authorizer: deps.authorizer.clone(),
            jobs: jobs.clone(),
            catalogs: crate::catalog::Catalogs {
                config: config.clone(),
                config_file: deps.config_file.clone(),
                state: deps.dirs.state.clone(),
            },
            quotas: quotas.clone(),
            steps: deps.steps.clone(),
            tools: deps.tools.clone(),
            helper: deps.helper.clone(),
        }));
        let net = Arc::new(HostNetwork::new(deps.store.clone(), deps.link_dns.clone()));
        let vms = Arc::new(Vms::new(VmsDeps {
            config: config.clone(),
            dirs: deps.dirs.clone(),
            store: deps.store.clone(),
            authorizer: deps.authorizer.clone(),
            jobs: jobs.clone(),
            artifacts: artifacts.clone(),
            quotas: quotas.clone(),
            net: net.clone(),
            supervisor: deps.supervisor.clone(),
            dm: deps.dm.clone(),
            tools: deps.tools.clone(),
            agent: deps.agent.clone(),
            host: deps.host.clone(),
            helper: deps.helper.clone(),
        }));
        Arc::new(Self {
            config,
            deps,
            jobs,
            updates,
            quotas,
            net,
            artifacts,
            vms,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// The kernel and image catalogs in use.
    pub fn catalogs(&self) -> &crate::catalog::Catalogs {
        self.artifacts.catalogs()
    }

    /// Releases of banger itself (`Manager.Update`).
    pub fn updates(&self) -> &crate::update::Updates {
        &self.updates
    }

    /// Kernels and images.
    pub fn artifacts(&self) -> &Arc<Artifacts> {
        &self.artifacts
    }

    /// The VMs.
    pub fn vms(&self) -> &Arc<Vms> {
        &self.vms
    }

    /// One-line summary for `Status` and sd_notify, e.g. "idle",
    /// "1 job running" or "2 VMs running, 1 job".
    pub fn status_line(&self) -> String {
        let vms = self.vms.running_vms();
        let jobs = self.jobs.running();
        match (vms, jobs) {
            (0, 0) => "idle".to_owned(),
            (0, 1) => "1 job running".to_owned(),
            (0, n) => format!("{n} jobs running"),
            (v, j) => {
                let v = if v == 1 {
                    "1 VM running".to_owned()
                } else {
                    format!("{v} VMs running")
                };
                match j {
                    0 => v,
                    1 => format!("{v}, 1 job"),
                    n => format!("{v}, {n} jobs"),
                }
            }
        }
    }

    /// The job registry (read access for front ends).
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Run the host checks. Read-only, open to every caller.
    /// Where `vm create` would get the image `name` it does not have:
    /// the catalog's pull, else a build from its recipe (when builds can
    /// run here), the same order `vm create` tries them in.
    async fn image_fallback(
        &self,
        config: &crate::config::Config,
        name: &str,
    ) -> doctor::ImageFallback {
        use crate::artifacts::build::image;
        if self
            .artifacts
            .catalog_entry(banger_catalog::Kind::Images, name)
            .await
            .is_ok()
        {
            return doctor::ImageFallback::Catalog;
        }
        let recipes = config.images.recipes.clone();
        let name = name.to_owned();
        let on = crate::artifacts::build::enabled(&config.images);
        crate::blocking::value(move || match image::recipe(&recipes, &name) {
            Err(_) => doctor::ImageFallback::Nothing,
            Ok(_) => match on.and_then(|()| image::readiness()) {
                Ok(()) => doctor::ImageFallback::Recipe(recipes.display().to_string()),
                Err(e) => doctor::ImageFallback::Unbuildable(e.message),
            },
        })
        .await
        .unwrap_or(doctor::ImageFallback::Nothing)
    }

    pub async fn doctor(&self, caller: &Caller) -> Vec<Check> {
        let config = self.config();
        let mut checks = doctor::run(
            &config,
            &self.deps.dirs.state,
            &self.deps.store,
            self.deps.bus.as_ref(),
            &self.deps.host,
            self.net.dns_served(),
            &self.net.resolved(),
        )
        .await;
        checks.push(doctor::tools_sandbox(self.deps.tools.clone()).await);
        // What VMs get: the default image and the accelerator the KVM probe
        // chose with its kernel (a real boot, cached; see vm::vmm::kvm).
        let image_name = &config.vm.default_image;
        let found = self.artifacts.default_image().await;
        let fallback = if found.is_some() {
            doctor::ImageFallback::Nothing
        } else {
            self.image_fallback(&config, image_name).await
        };
        let default_image = doctor::check_default_image(
            image_name,
            found
                .as_ref()
                .map(|(i, k)| (i.id.as_str(), k.name.as_str())),
            &fallback,
        );
        let kernel = found.as_ref().map(|(_, k)| k.boot_file());
        let verdict = match (kernel, config.vm.accel) {
            (Some(path), crate::config::Accel::Auto | crate::config::Accel::Kvm) => {
                Some(self.vms.kvm_verdict(path).await)
            }
            _ => None,
        };
        let accel = doctor::check_accel(config.vm.accel, kernel.zip(verdict.as_ref()), image_name);
        // And what create would pick with that verdict: the lifecycle's own
        // decision, reported only when it needs no probe doctor lacks.
        let probe_missing = std::cell::Cell::new(false);
        let choice = crate::vm::commands::check_vmm(&config)
            .ok()
            .map(|()| {
                crate::vm::commands::choose_vmm(&config, || match &verdict {
                    Some(v) => v.clone(),
                    None => {
                        probe_missing.set(true);
                        crate::vm::vmm::kvm::KvmVerdict::NotProbed(String::new())
                    }
                })
                .map(|(vmm, accel)| (vmm.name(), accel))
            })
            .filter(|_| !probe_missing.get());
        let snapshots = crate::vm::commands::check_vmm(&config)
            .ok()
            .and_then(|()| {
                crate::vm::commands::choose_vmm(&config, || match &verdict {
                    Some(v) => v.clone(),
                    None => crate::vm::vmm::kvm::KvmVerdict::NotProbed(String::new()),
                })
                .ok()
            })
            .map(|(vmm, _)| doctor::Snapshots {
                vmm: vmm.name(),
                saves: vmm.snapshots(),
                portable: vmm.portable_snapshots(),
            });
        let snapshots = doctor::check_snapshots(snapshots, config.vm.templates);
        let accel = doctor::with_choice(accel, choice);
        let at = checks
            .iter()
            .position(|c| c.name == "vmm")
            .map_or(checks.len(), |i| i + 1);
        checks.splice(at..at, [accel, snapshots, default_image]);
        // System disks: the lifecycle's own decision (device-mapper as
        // create asks it, the reflink probe of vm::disk).
        let dm = self.deps.dm.clone();
        let control = self.deps.host.mapper_control.clone();
        let state = self.deps.dirs.state.clone();
        let disks =
            crate::blocking::value(move || doctor::check_disks(dm.available(), &control, &state))
                .await;
        if let Ok(disks) = disks {
            let at = checks
                .iter()
                .position(|c| c.name == "loop")
                .map_or(checks.len(), |i| i + 1);
            checks.splice(at..at, disks);
        }
        if self.quotas.applies(caller).await {
            match self.quotas.usage_of(caller.uid, None) {
                Ok(usage) => checks.push(doctor::check_limits(&config.limits, Some(&usage))),
                Err(e) => checks.push(doctor::Check {
                    name: "limits",
                    verdict: doctor::Verdict::Warn,
                    detail: format!("cannot count what you hold: {e}"),
                    hint: "see journalctl -u bangerd".into(),
                }),
            }
        } else {
            checks.push(doctor::check_limits(&config.limits, None));
        }
        checks
    }

    /// Record that the DNS server answers for `zone` on `addr`.
    pub fn set_dns(&self, zone: crate::net::dns::VmZone, addr: std::net::SocketAddr) {
        self.net.set_dns(zone, addr);
    }

    /// The host network the VMs share.
    pub fn net(&self) -> &HostNetwork {
        &self.net
    }

    /// Drop job history older than `days`; returns how many went.
    pub async fn prune_job_history(&self, days: u32) -> Result<usize> {
        on_store(&self.deps.store, move |s| s.prune_jobs_older_than(days))
            .await
            .map_err(|e| Error::failed_with("pruning the job history failed", &e))
    }

    /// Start store maintenance as a job (action `org.banger.maintain`).
    /// Delete image `reference` (as `Artifacts::delete_image`) and the
    /// templates made of it.
    pub async fn delete_image(&self, caller: &Caller, reference: &str) -> Result<()> {
        let id = self.artifacts().image(reference).await.ok().map(|i| i.id);
        self.artifacts().delete_image(caller, reference).await?;
        if let Some(id) = id {
            self.vms.drop_templates_of(&id).await;
        }
        Ok(())
    }

    pub async fn maintain(&self, caller: &Caller, options: MaintainOptions) -> Result<JobId> {
        self.deps
            .authorizer
            .authorize(caller, Action::Maintain)
            .await?;
        let store = self.deps.store.clone();
        let history_days = self.config().daemon.job_history_days;
        self.jobs
            .start("maintain", caller.uid, Action::Maintain, move |ctx| async move {
                let steps = if options.vacuum { 5.0 } else { 4.0 };

                ctx.stage("check integrity", 0.0).await?;
                match on_store(&store, |s| s.quick_check()).await {
                    Ok(None) => ctx.progress("ok", 1.0 / steps, None),
                    Ok(Some(problem)) => {
                        return Err(Error::failed(format!(
                            "the store is damaged ({problem}); stop bangerd and restore it from a backup"
                        )));
                    }
                    Err(e) => return Err(Error::failed_with("integrity check failed", &e)),
                }

                ctx.stage("prune job history", 1.0 / steps).await?;
                let pruned = on_store(&store, move |s| s.prune_jobs_older_than(history_days))
                    .await
                    .map_err(|e| Error::failed_with("pruning job history failed", &e))?;
                ctx.progress(&format!("{pruned} old jobs removed"), 2.0 / steps, None);

                ctx.stage("checkpoint", 2.0 / steps).await?;
                on_store(&store, Store::checkpoint)
                    .await
                    .map_err(|e| Error::failed_with("checkpoint failed", &e))?;

                ctx.stage("optimize", 3.0 / steps).await?;
                on_store(&store, Store::optimize)
                    .await
                    .map_err(|e| Error::failed_with("optimize failed", &e))?;

                if options.vacuum {
                    ctx.stage("vacuum", 4.0 / steps).await?;
                    on_store(&store, Store::vacuum)
                        .await
                        .map_err(|e| Error::failed_with("vacuum failed", &e))?;
                }
                Ok(())
            })
            .await
    }

    /// Cancel job `id`. The owner needs the action that started the job;
    /// anyone else needs `manage-others` too.
    pub async fn cancel_job(&self, caller: &Caller, id: JobId) -> Result<()> {
        let job = self
            .jobs
            .get(id)
            .ok_or_else(|| Error::not_found(format!("there is no job {id}")))?;
        if caller.uid != job.owner_uid && caller.uid != 0 {
            self.deps
                .authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        self.deps.authorizer.authorize(caller, job.action).await?;
        self.jobs.cancel(id, caller.uid)
    }

    /// One job.
    pub fn job(&self, id: JobId) -> Option<JobSnapshot> {
        self.jobs.get(id)
    }

    /// What became of job `id`, live or from the history, for its owner,
    /// root, or a caller allowed to manage others' VMs.
    pub async fn job_outcome(&self, caller: &Caller, id: JobId) -> Result<JobOutcome> {
        let gone = || {
            Error::not_found(format!(
                "there is no job {id}: finished jobs are kept for daemon.job_history_days"
            ))
        };
        let outcome = self.jobs.outcome(id).await?.ok_or_else(gone)?;
        if caller.uid != outcome.owner_uid && caller.uid != 0 {
            self.deps
                .authorizer
                .authorize(caller, Action::VmManageOthers)
                .await?;
        }
        Ok(outcome)
    }

    /// Re-read `bangerd.toml`. A bad file is refused with an error naming
    /// the key, and the configuration in force stays.
    pub async fn reload_config(&self, caller: &Caller) -> Result<Arc<Config>> {
        self.deps
            .authorizer
            .authorize(caller, Action::Maintain)
            .await?;
        self.reload_config_unchecked()
    }

    /// Reload without authorization (SIGHUP from root).
    pub fn reload_config_unchecked(&self) -> Result<Arc<Config>> {
        let path = &self.deps.config_file;
        let config = Arc::new(Config::load(path).map_err(|e| Error::invalid(e.to_string()))?);
        self.jobs.set_settings(job_settings(&config));
        self.config.set(config.clone());
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(config)
    }

    /// Stop: cancel running jobs.
    pub fn shutdown(&self) {
        self.jobs.cancel_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::BoxFuture;
    use crate::doctor::NameState;
    use crate::error::ErrorKind;
    use crate::jobs::{JobEvent, JobState};
    use std::sync::Mutex;

    /// Allows exactly the listed (uid, action) pairs and records every question.
    #[derive(Debug, Default)]
    struct Rules {
        allowed: Vec<(u32, Action)>,
        asked: Mutex<Vec<(u32, Action)>>,
    }

    impl Authorizer for Rules {
        fn authorize<'a>(
            &'a self,
            caller: &'a Caller,
            action: Action,
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                self.asked.lock().expect("lock").push((caller.uid, action));
                if self.allowed.contains(&(caller.uid, action)) {
                    Ok(())
                } else {
                    Err(Error::denied(format!(
                        "uid {} may not {}",
                        caller.uid,
                        action.id()
                    )))
                }
            })
        }
    }

    #[derive(Debug)]
    struct NoBus;

    impl BusProbe for NoBus {
        fn name_state<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, NameState> {
            Box::pin(async { NameState::Absent })
        }
    }

    fn user(uid: u32) -> Caller {
        Caller {
            uid,
            bus_name: Some(format!(":1.{uid}")),
            allow_interactive: false,
        }
    }

    fn core(
        allowed: Vec<(u32, Action)>,
        config: Config,
    ) -> (
        Arc<Core>,
        tokio::sync::mpsc::UnboundedReceiver<JobEvent>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = Dirs::from_lookup(|var| match var {
            "STATE_DIRECTORY" => Some(dir.path().join("state")),
            "CONFIGURATION_DIRECTORY" => Some(dir.path().join("config")),
            _ => Some(dir.path().join(var)),
        });
        dirs.create().expect("dirs");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let core = Core::new(
            config,
            CoreDeps {
                config_file: dirs.config_file(),
                dirs,
                store: Arc::new(Store::open_in_memory().expect("store")),
                authorizer: Arc::new(Rules {
                    allowed,
                    ..Rules::default()
                }),
                bus: Arc::new(NoBus),
                host: HostPaths::default(),
                supervisor: Arc::new(crate::vm::supervise::Direct),
                steps: Arc::new(crate::artifacts::build::steps::Direct),
                tools: Arc::new(banger_formats::tool::Unconfined),
                helper: std::path::PathBuf::from("bangerd"),
                dm: Arc::new(crate::vm::snapshot::Absent),
                agent: Arc::new(crate::vm::agent::HostAgent::default()),
                link_dns: Arc::new(crate::net::resolved::NoLinkDns),
                releases: banger_release::Releases::new(dir.path().join("releases")),
                restart: Arc::new(crate::update::NoRestart),
            },
            tx,
        );
        (core, rx, dir)
    }

    async fn completion(rx: &mut tokio::sync::mpsc::UnboundedReceiver<JobEvent>) -> Option<Error> {
        loop {
            match rx.recv().await.expect("event") {
                JobEvent::Completed { error, .. } => return error,
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn maintain_needs_authorization_and_makes_no_job_when_denied() {
        let (core, _rx, _dir) = core(vec![], Config::default());
        let err = core
            .maintain(&user(1000), MaintainOptions::default())
            .await
            .expect_err("denied");
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        assert!(core.jobs().list().is_empty());
    }

    #[tokio::test]
    async fn maintain_runs_its_stages() {
        let (core, mut rx, _dir) = core(vec![(1000, Action::Maintain)], Config::default());
        let id = core
            .maintain(&user(1000), MaintainOptions { vacuum: true })
            .await
            .expect("started");
        assert_eq!(completion(&mut rx).await, None);
        let job = core.job(id).expect("retained");
        assert_eq!(job.state, JobState::Succeeded);
        let stages: Vec<_> = job.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            stages,
            [
                "check integrity",
                "prune job history",
                "checkpoint",
                "optimize",
                "vacuum"
            ]
        );
        assert_eq!(job.owner_uid, 1000);
        assert_eq!(core.status_line(), "idle");
    }

    #[tokio::test]
    async fn cancelling_someone_elses_job_needs_manage_others() {
        let mut config = Config::default();
        config.debug.job_stage_delay_ms = 5_000;
        let (core, mut rx, _dir) = core(
            vec![(1000, Action::Maintain), (2000, Action::Maintain)],
            config,
        );
        let id = core
            .maintain(&user(1000), MaintainOptions::default())
            .await
            .expect("started");
        assert_eq!(core.status_line(), "1 job running");
        let err = core
            .cancel_job(&user(2000), id)
            .await
            .expect_err("not theirs");
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        assert!(err.message.contains("manage-others"), "{}", err.message);
        core.cancel_job(&user(1000), id)
            .await
            .expect("owner cancels");
        let error = completion(&mut rx).await.expect("cancelled");
        assert_eq!(error.kind, ErrorKind::Cancelled);
        assert_eq!(core.job(id).expect("retained").state, JobState::Cancelled);
    }

    #[tokio::test]
    async fn bad_reload_keeps_the_old_configuration() {
        let (core, _rx, dir) = core(vec![(0, Action::Maintain)], Config::default());
        let file = dir.path().join("config").join(crate::config::FILE_NAME);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, "[daemon]\njob_retention_secs = 3\n").expect("write");
        let root = user(0);
        assert_eq!(
            core.reload_config(&root)
                .await
                .expect("good")
                .daemon
                .job_retention_secs,
            3
        );
        std::fs::write(&file, "[daemon]\nretention = 3\n").expect("write");
        let err = core.reload_config(&root).await.expect_err("bad key");
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert!(err.message.contains("retention"), "{}", err.message);
        assert_eq!(core.config().daemon.job_retention_secs, 3);
    }
}
