//! Stage three: run a resolved [`Invocation`]. Returns the exit code of a
//! command that ran (0, or 10 for doctor failures, ...) or the error that
//! stopped it; `main` reports errors.

use std::time::{Duration, Instant};

use anyhow::Context;
use banger_dbus::job_state;
use zbus::OwnedObjectPath;

use crate::artifacts;
use crate::cli::{Action, Invocation, JobRef, Options};
use crate::client::{Client, Interaction};
use crate::exit::{self, Failure, Kind};
use crate::output::{self, DaemonVersion, emit, emit_json};
use crate::progress::{self, Display, Followed, JobReport, Subscription, Tracker};
use crate::session::{
    Authorization, connect, follow_and_report, image_id, kernel_id, note, report_followed,
    report_job,
};

/// How long `banger version` waits for the daemon.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Run the invocation.
pub async fn run(invocation: Invocation) -> anyhow::Result<u8> {
    let opts = invocation.options;
    match invocation.action {
        Action::Completions(shell) => {
            let mut script = Vec::new();
            crate::docs::completions(shell, &mut script);
            emit(&String::from_utf8_lossy(&script))?;
            Ok(exit::OK)
        }
        Action::Man { dir: None } => {
            let mut page = Vec::new();
            crate::docs::man_page(&mut page)?;
            emit(&String::from_utf8_lossy(&page))?;
            Ok(exit::OK)
        }
        Action::Man { dir: Some(dir) } => {
            let written = crate::docs::man_pages_to(&dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            if opts.json {
                let files: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                emit_json(&serde_json::json!({ "files": files }))?;
            } else {
                note(
                    opts,
                    &format!("wrote {} pages into {}", written.len(), dir.display()),
                );
            }
            Ok(exit::OK)
        }
        Action::NotImplemented(command) => Err(Failure::not_implemented(command).into()),
        Action::Doctor => doctor(opts).await,
        Action::DaemonStatus => daemon_status(opts).await,
        Action::Maintain { vacuum, wait } => maintain(opts, vacuum, wait).await,
        Action::Update {
            check,
            channel,
            rollback,
        } => update(opts, check, channel.as_deref(), rollback).await,
        Action::JobShow(job) => job_show(opts, job).await,
        Action::JobWatch(job) => job_watch(opts, job).await,
        Action::JobCancel(job) => job_cancel(opts, job).await,
        Action::Version => version(opts).await,
        Action::Tui => crate::tui::run(opts).await,
        Action::Web { listen, open } => crate::web::run(opts, listen, open).await,
        Action::KernelList => kernel_list(opts).await,
        Action::Available(kind) => available(opts, kind).await,
        Action::Pull { image, name, wait } => pull(opts, image, &name, wait).await,
        Action::ImageBuild {
            recipe,
            name,
            kernel,
            wait,
        } => image_build(opts, recipe, name, kernel, wait).await,
        Action::KernelBuild {
            name,
            package,
            wait,
        } => kernel_build(opts, name, package, wait).await,
        Action::PullOci {
            reference,
            name,
            kernel,
            login,
            wait,
        } => {
            pull_oci(
                opts,
                &reference,
                name.as_deref(),
                kernel.as_deref(),
                login,
                wait,
            )
            .await
        }
        Action::KernelShow(r) => kernel_show(opts, &r).await,
        Action::KernelImport {
            name,
            kernel,
            initrd,
            modules,
            wait,
        } => {
            kernel_import(
                opts,
                &name,
                &kernel,
                initrd.as_deref(),
                modules.as_deref(),
                wait,
            )
            .await
        }
        Action::KernelDelete(refs) => delete_each(opts, "kernel", refs).await,
        Action::ImageList => image_list(opts).await,
        Action::ImageShow(r) => image_show(opts, &r).await,
        Action::ImageRegister {
            name,
            rootfs,
            kernel,
            work_seed,
            services,
            init,
        } => {
            image_register(
                opts,
                &name,
                &rootfs,
                &kernel,
                work_seed.as_deref(),
                &services,
                init.as_deref(),
            )
            .await
        }
        Action::ImagePromote { image, wait } => image_promote(opts, &image, wait).await,
        Action::ImageDelete(refs) => delete_each(opts, "image", refs).await,
        Action::Vm(command) => crate::vm::run(opts, command).await,
        Action::SshConfig => crate::vm::print_ssh_config(),
    }
}

/// `path` made absolute against the current directory (the daemon's is not
/// the user's), checked to exist so the user hears about a typo first.
async fn kernel_list(opts: Options) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    if opts.json {
        let all: Vec<_> = catalog.kernels.iter().map(artifacts::kernel_json).collect();
        emit_json(&all)?;
    } else {
        emit(&artifacts::kernels_table(&catalog.kernels))?;
    }
    Ok(exit::OK)
}

async fn available(opts: Options, kind: &str) -> anyhow::Result<u8> {
    let (serial, fetched, entries) = connect(opts).await?.available(kind).await?;
    if opts.json {
        emit_json(&artifacts::available_json(kind, serial, fetched, &entries))?;
    } else {
        emit(&artifacts::available_table(kind, serial, fetched, &entries))?;
    }
    Ok(exit::OK)
}

async fn kernel_show(opts: Options, reference: &str) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    let k = artifacts::resolve(&catalog.kernels, reference, "kernel")?;
    if opts.json {
        emit_json(&artifacts::kernel_json(k))?;
    } else {
        emit(&artifacts::kernel_human(k))?;
    }
    Ok(exit::OK)
}

async fn image_list(opts: Options) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    if opts.json {
        let all: Vec<_> = catalog
            .images
            .iter()
            .map(|i| artifacts::image_json(i, &catalog))
            .collect();
        emit_json(&all)?;
    } else {
        emit(&artifacts::images_table(&catalog))?;
    }
    Ok(exit::OK)
}

async fn image_show(opts: Options, reference: &str) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    let i = artifacts::resolve(&catalog.images, reference, "image")?;
    if opts.json {
        emit_json(&artifacts::image_json(i, &catalog))?;
    } else {
        emit(&artifacts::image_human(i, &catalog))?;
    }
    Ok(exit::OK)
}

/// Follow the job at `path` to its end. A success is handed back for the
/// caller to print; a failure or an interruption is reported here, and its
/// exit code handed back.
async fn follow_to_success(
    client: &Client,
    subscription: &mut Subscription,
    path: &OwnedObjectPath,
    display: Display,
    started: Instant,
    opts: Options,
) -> anyhow::Result<Result<JobReport, u8>> {
    let mut tracker = Tracker::new(path.as_str(), display, Vec::new());
    let followed = progress::follow(
        client,
        subscription,
        path,
        &mut tracker,
        started,
        opts.verbose,
    )
    .await?;
    match followed {
        Followed::Completed(report) if report.success => Ok(Ok(report)),
        other => report_followed(path, other, opts).map(Err),
    }
}

/// Follow a job that makes a kernel or an image, then print what it made.
async fn follow_then_show(
    opts: Options,
    client: &Client,
    subscription: &mut Subscription,
    path: &OwnedObjectPath,
    started: Instant,
    what: &str,
) -> anyhow::Result<u8> {
    let display = Display::for_stdout(opts.json);
    if display != Display::Quiet {
        emit(&format!(
            "job {} started (Ctrl-C cancels it)",
            progress::job_label(path.as_str())
        ))?;
    }
    let report = match follow_to_success(client, subscription, path, display, started, opts).await?
    {
        Ok(report) => report,
        Err(code) => return Ok(code),
    };
    let catalog = client.catalog().await?;
    let made = report.result.clone().unwrap_or_default();
    if opts.json {
        let object = match what {
            "kernel" => catalog
                .kernels
                .iter()
                .find(|k| k.path == made)
                .map(artifacts::kernel_json),
            _ => catalog
                .images
                .iter()
                .find(|i| i.path == made)
                .map(|i| artifacts::image_json(i, &catalog)),
        };
        emit_json(&serde_json::json!({
            "job": output::job_report_json(&report),
            what: object,
        }))?;
    } else {
        emit(&output::job_report_human(&report))?;
        let text = match what {
            "kernel" => catalog
                .kernels
                .iter()
                .find(|k| k.path == made)
                .map(artifacts::kernel_human),
            _ => catalog
                .images
                .iter()
                .find(|i| i.path == made)
                .map(|i| artifacts::image_human(i, &catalog)),
        };
        if let Some(text) = text {
            emit(&text)?;
        }
    }
    Ok(exit::OK)
}

async fn kernel_import(
    opts: Options,
    name: &str,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    modules: Option<&std::path::Path>,
    wait: bool,
) -> anyhow::Result<u8> {
    // Opened here, as the caller: bangerd reads the descriptors and never
    // opens a path of ours.
    let kernel = open_input("kernel", kernel)?;
    let initrd = initrd.map(|p| open_input("initrd", p)).transpose()?;
    let modules = modules.map(modules_archive).transpose()?;
    start_then_show(
        opts,
        wait,
        "kernel",
        format!("cannot import kernel {name}"),
        async |client, interaction| {
            client
                .import_kernel_fd(
                    name,
                    &kernel,
                    initrd.as_ref(),
                    modules.as_ref(),
                    interaction,
                )
                .await
        },
    )
    .await
}

/// `path` opened for reading, as the user running banger.
fn open_input(what: &str, path: &std::path::Path) -> Result<std::fs::File, Failure> {
    let file = std::fs::File::open(path).map_err(|e| {
        let shown = path.display();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Failure::new(
                Kind::Permission,
                format!("cannot open {what} {shown}: {e}; banger reads it as you, so you need to be able to read it"),
            ),
            std::io::ErrorKind::NotFound => Failure::new(
                Kind::InvalidArgument,
                format!("{what} {shown} does not exist; check the path"),
            ),
            _ => Failure::new(
                Kind::InvalidArgument,
                format!("cannot open {what} {shown}: {e}"),
            ),
        }
    })?;
    let meta = file.metadata().map_err(|e| {
        Failure::new(
            Kind::InvalidArgument,
            format!("cannot stat {what} {}: {e}", path.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!("{what} {} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// The modules directory `dir` as an uncompressed tar in an unlinked
/// temporary file, written with the rights of the user running banger
/// (symlinks stored as links, never followed): bangerd unpacks the
/// archive and never walks a directory of ours.
fn modules_archive(dir: &std::path::Path) -> Result<std::fs::File, Failure> {
    use std::io::Seek;
    let failed = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        let kind = if text.contains("ermission denied") {
            Kind::Permission
        } else {
            Kind::InvalidArgument
        };
        Failure::new(
            kind,
            format!(
                "cannot read the modules directory {}: {text}",
                dir.display()
            ),
        )
    };
    if !dir.is_dir() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!("modules {} is not a directory", dir.display()),
        ));
    }
    let file = tempfile::tempfile().map_err(|e| failed(&e))?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_dir_all(".", dir).map_err(|e| failed(&e))?;
    let mut file = builder.into_inner().map_err(|e| failed(&e))?;
    file.rewind().map_err(|e| failed(&e))?;
    Ok(file)
}

async fn pull(opts: Options, image: bool, name: &str, wait: bool) -> anyhow::Result<u8> {
    let what = if image { "image" } else { "kernel" };
    start_then_show(
        opts,
        wait,
        what,
        format!("cannot pull {what} {name}"),
        async |client, interaction| client.pull(image, name, interaction).await,
    )
    .await
}

async fn image_build(
    opts: Options,
    recipe: String,
    name: Option<String>,
    kernel: Option<String>,
    wait: bool,
) -> anyhow::Result<u8> {
    start_then_show(
        opts,
        wait,
        "image",
        format!("cannot build image {}", name.as_deref().unwrap_or(&recipe)),
        async |client, interaction| {
            client
                .build_image(&recipe, name.as_deref(), kernel.as_deref(), interaction)
                .await
        },
    )
    .await
}

async fn kernel_build(
    opts: Options,
    name: Option<String>,
    package: Option<String>,
    wait: bool,
) -> anyhow::Result<u8> {
    let label = name
        .clone()
        .unwrap_or_else(|| "from the Debian archive".to_owned());
    start_then_show(
        opts,
        wait,
        "kernel",
        format!("cannot build kernel {label}"),
        async |client, interaction| {
            client
                .build_kernel(
                    name.as_deref().unwrap_or(""),
                    package.as_deref(),
                    interaction,
                )
                .await
        },
    )
    .await
}

async fn pull_oci(
    opts: Options,
    reference: &str,
    name: Option<&str>,
    kernel: Option<&str>,
    login: crate::cli::LoginSource,
    wait: bool,
) -> anyhow::Result<u8> {
    use crate::cli::LoginSource;
    use crate::registry_auth as ra;
    let login = match login {
        LoginSource::Stdin(username) => {
            let password = ra::password_from(std::io::stdin().lock())
                .context("cannot read the password from standard input")?;
            Some(ra::Login { username, password })
        }
        LoginSource::AuthFile(path) => {
            let login = ra::stored_login(reference, std::slice::from_ref(&path), true)?;
            if login.is_none() {
                anyhow::bail!(
                    "{} has no login for the registry of {reference}; log in with `podman login --authfile {0}`, or pass --username and --password-stdin",
                    path.display()
                );
            }
            login
        }
        LoginSource::Stored => ra::stored_login(reference, &ra::auth_files(), false)?,
    };
    start_then_show(
        opts,
        wait,
        "image",
        format!("cannot pull {reference}"),
        async |client, interaction| {
            let kernel = match kernel {
                Some(k) => Some(kernel_id(client, k).await?),
                None => None,
            };
            client
                .pull_oci(
                    reference,
                    name,
                    kernel.as_deref(),
                    login.as_ref(),
                    interaction,
                )
                .await
        },
    )
    .await
}

/// Start a job that makes a `what` ("kernel" or "image") with `call`;
/// with `wait`, follow it and show what it made, else print its path.
/// `failed` is the context of a refused start.
async fn start_then_show(
    opts: Options,
    wait: bool,
    what: &str,
    failed: String,
    call: impl AsyncFnOnce(&Client, Interaction) -> Result<OwnedObjectPath, Failure>,
) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    // Subscribe before the call, so not one signal of the job is missed.
    let mut subscription = if wait {
        Some(Subscription::new(&client).await?)
    } else {
        None
    };
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    let result = call(&client, auth.interaction).await;
    let path = auth.finish(result).await.context(failed.clone())?;
    match subscription.as_mut() {
        // The job's own error names none of the caller's arguments (job
        // signals reach every user): `failed` says what this was.
        Some(sub) => follow_then_show(opts, &client, sub, &path, started, what)
            .await
            .context(failed),
        None => print_job(opts, &path),
    }
}

fn print_job(opts: Options, path: &OwnedObjectPath) -> anyhow::Result<u8> {
    if opts.json {
        emit_json(&serde_json::json!({ "job": path.as_str() }))?;
    } else {
        emit(path.as_str())?;
    }
    Ok(exit::OK)
}

async fn image_register(
    opts: Options,
    name: &str,
    rootfs: &std::path::Path,
    kernel: &str,
    work_seed: Option<&std::path::Path>,
    services: &[String],
    init: Option<&str>,
) -> anyhow::Result<u8> {
    let rootfs = open_input("rootfs", rootfs)?;
    let work_seed = work_seed.map(|p| open_input("work-seed", p)).transpose()?;
    start_then_show(
        opts,
        true,
        "image",
        format!("cannot register image {name}"),
        async |client, interaction| {
            let kernel = kernel_id(client, kernel).await?;
            client
                .import_image_fd(
                    name,
                    &rootfs,
                    &kernel,
                    work_seed.as_ref(),
                    services,
                    init,
                    interaction,
                )
                .await
        },
    )
    .await
}

async fn image_promote(opts: Options, image: &str, wait: bool) -> anyhow::Result<u8> {
    start_then_show(
        opts,
        wait,
        "image",
        format!("cannot promote image {image}"),
        async |client, interaction| {
            let id = image_id(client, image).await?;
            client.promote_image(&id, interaction).await
        },
    )
    .await
}

/// Delete each of `refs` (kernels or images); report each; fail if any did.
async fn delete_each(opts: Options, what: &str, refs: Vec<String>) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let catalog = client.catalog().await?;
    let auth = Authorization::prepare(opts).await;
    let mut results = Vec::new();
    for r in &refs {
        // The daemon is given the id the reference resolves to, never the
        // reference itself.
        let result = match what {
            "kernel" => match artifacts::resolve(&catalog.kernels, r, what) {
                Ok(k) => client.delete_kernel(&k.id, auth.interaction).await,
                Err(f) => Err(f),
            },
            _ => match artifacts::resolve(&catalog.images, r, what) {
                Ok(i) => client.delete_image(&i.id, auth.interaction).await,
                Err(f) => Err(f),
            },
        };
        results.push((r.clone(), result));
    }
    let outcome = auth.finish(Ok::<_, Failure>(())).await;
    outcome?;
    let mut worst: Option<Failure> = None;
    let mut json = Vec::new();
    for (r, result) in results {
        match result {
            Ok(()) => {
                if opts.json {
                    json.push(serde_json::json!({"ref": r, "deleted": true, "error": null}));
                } else {
                    emit(&format!("deleted {what} {r}"))?;
                }
            }
            Err(f) => {
                if opts.json {
                    json.push(serde_json::json!({
                        "ref": r, "deleted": false,
                        "error": {"name": f.name(), "message": f.to_string()},
                    }));
                } else if refs.len() > 1 {
                    eprintln!("error: cannot delete {what} {r}: {f}");
                }
                worst = Some(f);
            }
        }
    }
    if opts.json {
        emit_json(&json)?;
    }
    match worst {
        None => Ok(exit::OK),
        Some(f) if refs.len() == 1 && !opts.json => Err(f.into()),
        Some(f) => Ok(f.kind().code()),
    }
}

async fn doctor(opts: Options) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let checks = client.doctor().await?;
    if opts.json {
        emit_json(&output::doctor_json(&checks))?;
    } else {
        emit(&output::doctor_human(&checks))?;
    }
    if output::DoctorSummary::of(&checks).fail > 0 {
        Ok(exit::DOCTOR_FAILED)
    } else {
        Ok(exit::OK)
    }
}

async fn daemon_status(opts: Options) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let info = client.daemon_info().await?;
    if opts.json {
        emit_json(&output::status_json(&info))?;
    } else {
        emit(&output::status_human(&info))?;
    }
    Ok(exit::OK)
}

async fn version(opts: Options) -> anyhow::Result<u8> {
    let daemon = async {
        let client = connect(opts).await?;
        client.daemon_version().await
    };
    let daemon = match tokio::time::timeout(VERSION_TIMEOUT, daemon).await {
        Ok(Ok((version, api_version))) => DaemonVersion::Reachable {
            version,
            api_version,
        },
        Ok(Err(failure)) => DaemonVersion::Unreachable {
            name: failure.name().to_owned(),
            message: failure.message().to_owned(),
        },
        Err(_) => DaemonVersion::Unreachable {
            name: Kind::Unreachable.cli_error_name().to_owned(),
            message: format!(
                "bangerd did not answer within {} s",
                VERSION_TIMEOUT.as_secs()
            ),
        },
    };
    if opts.json {
        emit_json(&output::version_json(&daemon))?;
    } else {
        emit(&output::version_human(&daemon))?;
    }
    Ok(exit::OK)
}

async fn maintain(opts: Options, vacuum: bool, wait: bool) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    // Subscribe before the call, so not one signal of the job is missed.
    let mut subscription = if wait {
        Some(Subscription::new(&client).await?)
    } else {
        None
    };
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    let result = client.maintain(vacuum, auth.interaction).await;
    let path = auth
        .finish(result)
        .await
        .context("cannot start store maintenance")?;
    note(opts, &format!("started job {}", path.as_str()));
    let Some(subscription) = subscription.as_mut() else {
        if opts.json {
            emit_json(&serde_json::json!({ "job": path.as_str() }))?;
        } else {
            emit(path.as_str())?;
        }
        return Ok(exit::OK);
    };
    let display = Display::for_stdout(opts.json);
    if display != Display::Quiet {
        emit(&format!(
            "job {} started (Ctrl-C cancels it)",
            progress::job_label(path.as_str())
        ))?;
    }
    let tracker = Tracker::new(path.as_str(), display, Vec::new());
    follow_and_report(&client, subscription, &path, tracker, started, opts).await
}

/// `banger update`: the job, then (after an install or rollback) the
/// restarted daemon's version.
async fn update(
    opts: Options,
    check: bool,
    channel: Option<&str>,
    rollback: bool,
) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let mut subscription = Subscription::new(&client).await?;
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    let result = client
        .update(check, channel, rollback, auth.interaction)
        .await;
    let what = if rollback {
        "roll back"
    } else if check {
        "check for updates"
    } else {
        "update"
    };
    let path = auth
        .finish(result)
        .await
        .with_context(|| format!("cannot {what}"))?;
    let display = Display::for_stdout(opts.json);
    let report =
        match follow_to_success(&client, &mut subscription, &path, display, started, opts).await? {
            Ok(report) => report,
            Err(code) => return Ok(code),
        };
    if opts.json {
        let mut json = serde_json::to_value(output::job_report_json(&report))?;
        json["detail"] = serde_json::Value::String(report.detail.clone());
        emit_json(&json)?;
    } else {
        emit(&report.detail)?;
    }
    Ok(exit::OK)
}

async fn job_show(opts: Options, job: JobRef) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let info = client.job_info(&job.path()).await?;
    if opts.json {
        emit_json(&output::job_info_json(&info))?;
    } else {
        emit(&output::job_info_human(&info, output::now_usec()))?;
    }
    Ok(exit::OK)
}

async fn job_watch(opts: Options, job: JobRef) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let path = job.path();
    let mut subscription = Subscription::new(&client).await?;
    // After subscribing: what happened before is in the properties.
    let info = client.job_info(&path).await?;
    let age = Duration::from_micros(output::now_usec().saturating_sub(info.started_at_usec));
    let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    let display = Display::for_stdout(opts.json);
    let mut tracker = Tracker::new(path.as_str(), display, Vec::new());
    if display != Display::Quiet {
        emit(&format!("job {job} ({}): {}", info.kind, info.state))?;
        let mut out = std::io::stdout();
        for stage in &info.stages {
            tracker.apply(
                progress::JobEvent::StageFinished {
                    stage: stage.stage.clone(),
                    duration_usec: stage.duration_usec,
                },
                &mut out,
            )?;
        }
        if info.state == job_state::RUNNING && !info.stage.is_empty() {
            tracker.apply(
                progress::JobEvent::Progress {
                    stage: info.stage.clone(),
                    detail: String::new(),
                    fraction: info.progress,
                },
                &mut out,
            )?;
        }
    } else {
        tracker = Tracker::new(path.as_str(), display, info.stages.clone());
    }
    if info.state != job_state::RUNNING {
        let total = info.stages.iter().map(|s| s.duration_usec).sum();
        let report = tracker.ended(&info.state, info.stages.clone(), total);
        return report_job(&report, opts);
    }
    follow_and_report(&client, &mut subscription, &path, tracker, started, opts).await
}

async fn job_cancel(opts: Options, job: JobRef) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let path = job.path();
    let auth = Authorization::prepare(opts).await;
    let result = client.cancel(&path, auth.interaction).await;
    auth.finish(result)
        .await
        .with_context(|| format!("cannot cancel job {job}"))?;
    if opts.json {
        emit_json(&serde_json::json!({ "job": path.as_str(), "cancel_requested": true }))?;
    } else {
        emit(&format!("asked job {job} to cancel"))?;
    }
    Ok(exit::OK)
}
