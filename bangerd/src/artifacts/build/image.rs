//! Images built here from a recipe (`BuildImage`, `banger image build`):
//! a recipe is a directory under `images.recipes` (the package ships
//! `debian-bookworm`) with its Debian suite, package list, configure script
//! and image.json. The job makes the suite's base system with those
//! packages from `images.mirror`: `mmdebstrap --mode=unshare` as
//! [`BUILD_USER`], without privilege, where the host allows, else
//! `debootstrap` as root ([`bootstrapper`]). The tree is cached as a
//! tarball keyed by suite, mirror, packages, tool and the mirror's
//! release file, so later builds skip it until the suite's packages
//! change. Then it puts banger-agent and the kernel's modules in, runs
//! the recipe's `configure`, makes the ext4 root filesystem and its
//! work-seed, and records a system image. The bootstrap, the unpacking
//! of its tree and `configure` need other rights than bangerd's: they
//! run as [`super::steps`]. So does giving the tree to the tools'
//! sandbox's ids, in which `mkfs.ext4 -d` reads it. The kernel it boots is built first (see
//! [`super`]) when it is not here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::apt::valid_package;
use super::steps::{self, Step};
use crate::artifacts::commands::{TmpDir, already_exists, blocking};
use crate::artifacts::owner::SYSTEM_UID;
use crate::artifacts::pull::StagedImage;
use crate::artifacts::{Artifacts, bundle, images_dir, validate};
use crate::auth::{Action, Caller};
use crate::error::{Error, Result};
use crate::jobs::{JobContext, JobId, Resource};

/// The agent's unit, installed beside the agent.
const AGENT_UNIT: &str = include_str!("../../../../agent/banger-agent.service");

/// What `BuildImage` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuild {
    /// The recipe (a directory name under `images.recipes`); "" for
    /// `vm.default_image`.
    pub recipe: String,
    /// The name to record the image under (default the recipe's).
    pub name: Option<String>,
    /// The kernel it boots (default the kernel `kernel build` makes here,
    /// built first when missing).
    pub kernel: Option<String>,
}

/// A recipe, read and checked.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Its directory.
    pub dir: PathBuf,
    /// The Debian suite (`bookworm`).
    pub suite: String,
    /// Packages on top of minbase.
    pub packages: Vec<String>,
    /// Services readiness waits for, `name:port`.
    pub services: Vec<crate::artifacts::Service>,
    /// The init the kernel starts.
    pub init: Option<String>,
}

/// Read recipe `name` under `recipes`.
pub fn recipe(recipes: &Path, name: &str) -> Result<Recipe> {
    validate::name("recipe", name)?;
    let dir = recipes.join(name);
    if !dir.is_dir() {
        let mut known: Vec<String> = std::fs::read_dir(recipes)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("configure").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        known.sort();
        return Err(Error::not_found(format!(
            "there is no image recipe {name} in {} (there: {})",
            recipes.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map_err(|e| Error::invalid(format!("recipe {name} has no readable {file}: {e}")))
    };
    let suite = read("suite")?.trim().to_owned();
    if !valid_package(&suite) {
        return Err(Error::invalid(format!(
            "recipe {name}: bad suite {suite:?}"
        )));
    }
    let packages: Vec<String> = read("packages")?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if let Some(bad) = packages.iter().find(|p| !valid_package(p)) {
        return Err(Error::invalid(format!(
            "recipe {name}: bad package name {bad:?}"
        )));
    }
    if crate::program::find(&dir.join("configure")).is_none() {
        return Err(Error::invalid(format!(
            "recipe {name} has no executable configure"
        )));
    }
    let meta = bundle::image_meta(&dir)?;
    let services = validate::services(&meta.service_specs())?;
    if let Some(init) = &meta.init {
        validate::init_path(init)?;
    }
    Ok(Recipe {
        dir,
        suite,
        packages,
        services,
        init: meta.init,
    })
}

/// The account unprivileged bootstraps run as; the package makes it,
/// with subordinate ids (`useradd --system --add-subids-for-system`).
pub const BUILD_USER: &str = "banger-build";

/// How the base tree is made here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// `mmdebstrap --mode=unshare` as [`BUILD_USER`], without privilege:
    /// packages are fetched, unpacked and configured by root of a user
    /// namespace that maps to the account's subordinate ids.
    Unshare {
        program: PathBuf,
        user: steps::Account,
    },
    /// `debootstrap` as root (in its own confined unit under systemd);
    /// `why` says what the unprivileged way lacks here.
    Root { program: PathBuf, why: String },
}

impl Bootstrap {
    /// The tool's name, for messages.
    pub fn tool(&self) -> &'static str {
        match self {
            Bootstrap::Unshare { .. } => "mmdebstrap",
            Bootstrap::Root { .. } => "debootstrap",
        }
    }
}

/// How this host makes base trees: unprivileged where it can.
pub fn bootstrapper() -> Result<Bootstrap> {
    let why = match unshare_ready() {
        Ok(b) => return Ok(b),
        Err(why) => why,
    };
    match crate::program::find(Path::new("debootstrap")) {
        Some(program) => Ok(Bootstrap::Root { program, why }),
        None => Err(Error::unavailable(format!(
            "image builds need mmdebstrap (unprivileged) or debootstrap here: \
             apt install mmdebstrap uidmap ({why})"
        ))),
    }
}

/// `mmdebstrap --mode=unshare` as [`BUILD_USER`], or what it lacks.
fn unshare_ready() -> std::result::Result<Bootstrap, String> {
    let program = crate::program::find(Path::new("mmdebstrap"))
        .ok_or("mmdebstrap is not installed: apt install mmdebstrap uidmap")?;
    for tool in ["newuidmap", "newgidmap"] {
        crate::program::find(Path::new(tool))
            .ok_or(format!("{tool} is not installed: apt install uidmap"))?;
    }
    let user = nix::unistd::User::from_name(BUILD_USER)
        .ok()
        .flatten()
        .ok_or(format!(
            "there is no {BUILD_USER} account (the package makes it: dpkg-reconfigure banger)"
        ))?;
    let account = steps::Account {
        name: BUILD_USER.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    };
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !has_subids(&text, &account.name, account.uid) {
            return Err(format!(
                "{BUILD_USER} has no subordinate ids in {file}: \
                 usermod --add-subuids N-M --add-subgids N-M {BUILD_USER} (65536 of each)"
            ));
        }
    }
    let sysctl = |name: &str| {
        std::fs::read_to_string(Path::new("/proc/sys").join(name))
            .ok()
            .map(|v| v.trim().to_owned())
    };
    if sysctl("user/max_user_namespaces").as_deref() == Some("0")
        || sysctl("kernel/unprivileged_userns_clone").as_deref() == Some("0")
        || sysctl("kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        return Err("this kernel does not let unprivileged users make user namespaces".to_owned());
    }
    Ok(Bootstrap::Unshare {
        program,
        user: account,
    })
}

/// Whether `/etc/subuid` (or subgid) text gives `name` (or `uid`) a
/// range of at least 65536 ids, what a Debian tree's ids need.
fn has_subids(text: &str, name: &str, uid: u32) -> bool {
    text.lines().any(|line| {
        let mut f = line.trim().split(':');
        let (Some(who), Some(_start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        (who == name || who == uid.to_string()) && count.parse::<u64>().is_ok_and(|c| c >= 65536)
    })
}

/// Whether an image build can run here: a bootstrapper, and what a
/// kernel build needs (its kernel may have to be built first). The one
/// answer `BuildImage` (before its job starts) and `doctor` give.
pub fn readiness() -> Result<()> {
    let kernel = super::readiness();
    if let Err(e) = bootstrapper() {
        let more = kernel
            .err()
            .map(|e| format!("; {}", e.message))
            .unwrap_or_default();
        return Err(Error::unavailable(format!("{}{more}", e.message)));
    }
    kernel
}

/// The cached base tree of `recipe` from `mirror`: keyed by what goes in.
fn base_key(recipe: &Recipe, mirror: &str, tool: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "{} {mirror} {} {tool}",
        recipe.suite,
        recipe.packages.join(",")
    ));
    crate::artifacts::hex(&h.finalize())[..16].to_owned()
}

/// The SHA-256 of `mirror`'s release file for `suite` (`InRelease`, else
/// `Release`): it changes whenever a package of the suite does, so with
/// [`base_key`] it keys the cached base tree by the package versions in
/// it. Only hashed here; debootstrap checks its signature.
async fn release_digest(mirror: &str, suite: &str) -> Result<String> {
    let base = mirror.trim_end_matches('/');
    let mut failures = Vec::new();
    for file in ["InRelease", "Release"] {
        let url = format!("{base}/dists/{suite}/{file}");
        let body = match url.strip_prefix("file://") {
            Some(path) => tokio::fs::read(path).await.map_err(|e| e.to_string()),
            None => fetch(&url).await,
        };
        match body {
            Ok(bytes) => return Ok(crate::artifacts::hex(&Sha256::digest(&bytes))),
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    Err(Error::unavailable(format!(
        "cannot read the mirror's release file ({}); check images.mirror and the network",
        failures.join("; ")
    )))
}

/// `url`'s body, over HTTP(S).
async fn fetch(url: &str) -> std::result::Result<Vec<u8>, String> {
    // reqwest is built without a default TLS provider; ring is ours.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(std::time::Duration::from_secs(60))
        .user_agent(format!("bangerd/{}", banger_release::VERSION))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("the server answered {}", response.status()));
    }
    response
        .bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string())
}

/// The cached base trees of `recipe` from `mirror` in `bases`: the one
/// for the mirror's current release (`release` is its digest, `None`
/// when the mirror cannot be read), and the others, oldest first. A
/// tarball is `SUITE-RECIPEKEY-RELEASEKEY.tar`.
fn base_tarballs(
    bases: &Path,
    recipe: &Recipe,
    mirror: &str,
    tool: &str,
    release: Option<&str>,
) -> (Option<PathBuf>, Vec<PathBuf>) {
    let prefix = format!("{}-{}-", recipe.suite, base_key(recipe, mirror, tool));
    let current = release.map(|r| bases.join(format!("{prefix}{}.tar", &r[..16.min(r.len())])));
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(bases)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with(&prefix) && name.ends_with(".tar")
                })
                .map(|e| e.path())
                .filter(|p| Some(p) != current.as_ref())
                .map(|p| {
                    let t = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, p)
                })
                .collect()
        })
        .unwrap_or_default();
    others.sort();
    (current, others.into_iter().map(|(_, p)| p).collect())
}

/// Run `cmd`, keeping its output; fails with its last lines.
fn run(what: &str, cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::unavailable(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    Err(Error::failed(format!(
        "{what} failed: {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    )))
}

/// What the bootstrapper's output says about its packages: how many it
/// has dealt with and what it is doing now, and how many bytes of
/// packages it has fetched so far. debootstrap's `I:` lines name each
/// package; mmdebstrap's (`--verbose`) are apt's `Get:` lines, with
/// sizes, and dpkg's.
#[derive(Debug, Default)]
struct BootstrapProgress {
    tool: &'static str,
    retrieved: u64,
    installed: u64,
    bytes: u64,
    doing: String,
}

/// The bytes an apt `Get:` line ends with (`[37.6 kB]`).
fn apt_size(line: &str) -> Option<u64> {
    let inside = line.trim_end().strip_suffix(']')?;
    let (_, inside) = inside.rsplit_once('[')?;
    let (number, unit) = inside.split_once(' ')?;
    let number: f64 = number.replace(',', "").parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((number * scale) as u64)
}

impl BootstrapProgress {
    fn new(tool: &'static str) -> Self {
        Self {
            tool,
            ..Self::default()
        }
    }

    /// Take in one line; the detail to show for it, if any.
    fn line(&mut self, line: &str) -> Option<String> {
        if let Some(rest) = line.strip_prefix("Get:") {
            // Get:N URL SUITE/COMPONENT ARCH PACKAGE ARCH VERSION [SIZE]
            let fields: Vec<&str> = rest.split_whitespace().collect();
            self.bytes += apt_size(line).unwrap_or(0);
            self.doing = match fields.get(4) {
                Some(package) if fields.len() >= 8 => {
                    self.retrieved += 1;
                    format!("fetching {package}")
                }
                _ => "fetching the package lists".to_owned(),
            };
            return Some(self.detail());
        }
        for (prefix, verb) in [("Unpacking ", "unpacking"), ("Setting up ", "setting up")] {
            if let Some(rest) = line.strip_prefix(prefix) {
                let package = rest.split([':', ' ']).next().unwrap_or_default();
                self.installed += 1;
                self.doing = format!("{verb} {package}");
                return Some(self.detail());
            }
        }
        let rest = line.strip_prefix("I: ")?;
        let (verb, what) = rest.split_once(' ').unwrap_or((rest, ""));
        match verb {
            "Retrieving" => self.retrieved += 1,
            "Unpacking" | "Configuring" => self.installed += 1,
            _ => {}
        }
        if verb.starts_with(|c: char| c.is_ascii_lowercase()) {
            // mmdebstrap's phases: "I: running apt-get update..."
            self.doing = rest.trim_end_matches('.').to_owned();
        } else {
            let what = what.split_whitespace().next().unwrap_or_default();
            self.doing = format!("{} {what}", verb.to_lowercase());
        }
        Some(self.detail())
    }

    /// Take in the bytes fetched so far; the detail to show when that
    /// changed what is shown.
    fn fetched(&mut self, bytes: u64) -> Option<String> {
        if bytes == self.bytes || self.doing.is_empty() {
            return None;
        }
        self.bytes = bytes;
        Some(self.detail())
    }

    fn detail(&self) -> String {
        let bytes = if self.bytes > 0 {
            format!(", {:.1} MiB", self.bytes as f64 / f64::from(1u32 << 20))
        } else {
            String::new()
        };
        format!(
            "{}: {} ({} packages fetched{bytes}, {} unpack and configure steps)",
            self.tool, self.doing, self.retrieved, self.installed
        )
    }

    /// A share of the stage that only grows and never reaches 1: the
    /// package count is not known up front.
    fn share(&self) -> f64 {
        let done = (self.retrieved + self.installed) as f64;
        done / (done + 200.0)
    }
}

/// The bytes of the .deb files in `dir` (0 when there is none).
fn debs_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The step that makes `recipe`'s base tree: as a tarball on its
/// standard output (mmdebstrap), or in `tree` (debootstrap).
fn bootstrap_step(
    id: &str,
    how: &Bootstrap,
    recipe: &Recipe,
    mirror: &str,
    work: &Path,
    tree: &Path,
) -> Step {
    let mut args = vec!["--variant=minbase".to_owned()];
    if !recipe.packages.is_empty() {
        args.push(format!("--include={}", recipe.packages.join(",")));
    }
    let (program, user, target, writable) = match how {
        Bootstrap::Unshare { program, user } => {
            args.splice(
                0..0,
                ["--mode=unshare", "--format=tar", "--verbose"].map(str::to_owned),
            );
            // Nothing of the host's but its private /var/tmp and the
            // tarball's descriptor.
            (program, Some(user.clone()), "-".to_owned(), Vec::new())
        }
        Bootstrap::Root { program, .. } => (
            program,
            None,
            tree.to_string_lossy().into_owned(),
            vec![work.to_owned()],
        ),
    };
    // apt in mmdebstrap's chroot cannot see a file:// mirror's files:
    // copy:// has apt copy them in, as debootstrap does.
    let mirror = match (how, mirror.strip_prefix("file://")) {
        (Bootstrap::Unshare { .. }, Some(path)) => format!("copy://{path}"),
        _ => mirror.to_owned(),
    };
    args.extend([recipe.suite.clone(), target, mirror]);
    Step {
        id: format!("build-{id}-bootstrap"),
        what: how.tool().to_owned(),
        program: program.clone(),
        args,
        writable,
        user,
    }
}

/// Keep the tree debootstrap made as `tarball` (written beside it,
/// renamed into place), and remove the tree.
fn keep_base(tree: &Path, tarball: &Path) -> Result<()> {
    // The downloaded packages are installed now: not in the image.
    let archives = tree.join("var/cache/apt/archives");
    if let Ok(dir) = std::fs::read_dir(&archives) {
        for e in dir.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let part = tarball.with_extension("part");
    run(
        "tar",
        std::process::Command::new("tar")
            .arg("-C")
            .arg(tree)
            .args(["--numeric-owner", "-cf"])
            .arg(&part)
            .arg("."),
    )?;
    std::fs::rename(&part, tarball)
        .map_err(|e| Error::failed(format!("cannot keep the base tree: {e}")))?;
    let _ = std::fs::remove_dir_all(tree);
    Ok(())
}

impl Artifacts {
    /// Build an image from a recipe as a job (action
    /// `org.banger.image.manage`); its result is the image, a system
    /// image. The recipe, names and kernel are checked before the job
    /// starts.
    pub async fn build_image(self: &Arc<Self>, caller: &Caller, req: ImageBuild) -> Result<JobId> {
        self.authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        super::enabled(&self.config().images)?;
        let recipes = self.config().images.recipes.clone();
        // "" is the configured default image, as for a pull.
        let recipe_name = if req.recipe.is_empty() {
            self.config().vm.default_image.clone()
        } else {
            req.recipe
        };
        let recipe = {
            let name = recipe_name.clone();
            blocking(move || recipe(&recipes, &name)).await?
        };
        let name = req.name.unwrap_or(recipe_name);
        validate::name("image", &name)?;
        self.authorize_name(caller, banger_catalog::Kind::Images, &name)
            .await?;
        let kernel = match req.kernel {
            Some(k) => k,
            None => {
                let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
                super::default_name(&os)
            }
        };
        validate::name("kernel", &kernel)?;
        let (image_exists, kernel_row) = {
            let (name, kernel) = (name.clone(), kernel.clone());
            self.on_store("reading the store failed", move |s| {
                Ok((
                    s.image_by_name(&name)?.is_some(),
                    s.kernel_by_name(&kernel)?,
                ))
            })
            .await?
        };
        if image_exists {
            return Err(already_exists("image", &name));
        }
        if let Some(k) = &kernel_row
            && k.owner_uid != SYSTEM_UID
            && k.owner_uid != caller.uid
        {
            return Err(Error::denied(format!(
                "kernel {kernel} belongs to uid {}; build with your own or a system kernel",
                k.owner_uid
            )));
        }
        blocking(readiness).await?;
        let core = self.clone();
        let uid = caller.uid;
        self.jobs()
            .start_with_result("image-build", uid, Action::ImageManage, move |ctx| async move {
                core.build_image_job(&ctx, recipe, name, kernel, uid).await
            })
            .await
    }

    async fn build_image_job(
        self: &Arc<Self>,
        ctx: &JobContext,
        recipe: Recipe,
        name: String,
        kernel_name: String,
        uid: u32,
    ) -> Result<Option<Resource>> {
        let kernel_id = match self.kernel_id_any(&kernel_name).await? {
            Some(id) => id,
            None => {
                ctx.stage(&format!("build kernel {kernel_name}"), 0.0)
                    .await?;
                let job = self
                    .start_kernel_build(kernel_name.clone(), None, uid)
                    .await?;
                self.await_kernel_job(ctx, job, &kernel_name, "building")
                    .await?
            }
        };
        let kernel = {
            let id = kernel_id.clone();
            self.on_store("reading kernels failed", move |s| s.kernel_by_id(&id))
                .await?
                .ok_or_else(|| Error::not_found(format!("kernel {kernel_name} is gone")))?
        };

        let id = crate::artifacts::new_id()
            .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?;
        // As in a kernel build, the tree is made inside the staging
        // directory (under `.build`, gone before the image is recorded),
        // and each blocking step holds that directory, so neither a cancel
        // nor a crash leaves anything behind.
        let tmp = Arc::new(TmpDir::create(
            images_dir(&self.state).join(format!(".tmp-{id}")),
        )?);
        let work = tmp.path().join(".build");
        let root = work.join("root");

        ctx.stage("base system", 0.3).await?;
        let mirror = self.config().images.mirror.clone();
        let bases = self.cache.join("images");
        // Keyed by the mirror's release: a point release or security
        // update in the suite makes a new base; an unreachable mirror
        // falls back to the newest one here.
        let how = blocking(bootstrapper).await?;
        let release = release_digest(&mirror, &recipe.suite).await;
        let (current, older) = {
            let (bases, recipe, mirror) = (bases.clone(), recipe.clone(), mirror.clone());
            let release = release.as_ref().ok().cloned();
            let tool = how.tool();
            blocking(move || {
                Ok(base_tarballs(
                    &bases,
                    &recipe,
                    &mirror,
                    tool,
                    release.as_deref(),
                ))
            })
            .await?
        };
        let tarball = match (current, release) {
            (Some(t), _) => t,
            (None, Err(e)) => match older.last() {
                Some(t) => {
                    ctx.progress(
                        &format!("{}; using the base tree cached before", e.message),
                        0.3,
                        None,
                    );
                    t.clone()
                }
                None => return Err(e),
            },
            (None, Ok(_)) => return Err(Error::failed("no name for the base tree")),
        };
        let _build = self.apt.lock().await;
        {
            let (bases, work) = (bases.clone(), work.clone());
            blocking(move || {
                for dir in [&bases, &work] {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Error::failed(format!("cannot make {}: {e}", dir.display()))
                    })?;
                }
                Ok(())
            })
            .await?;
        }
        if !tarball.exists() {
            let how_detail = match &how {
                Bootstrap::Unshare { user, .. } => format!("unprivileged, as {}", user.name),
                Bootstrap::Root { why, .. } => format!("as root: {why}"),
            };
            ctx.progress(
                &format!(
                    "{} {} from {mirror} ({how_detail}; cached afterwards)",
                    how.tool(),
                    recipe.suite
                ),
                0.3,
                None,
            );
            let tree = work.join("bootstrap");
            let step = bootstrap_step(&id, &how, &recipe, &mirror, &work, &tree);
            // debootstrap's downloaded packages are in the tree's apt
            // cache: their sizes are the bytes fetched so far
            // (mmdebstrap's lines say so themselves).
            let archives = match how {
                Bootstrap::Root { .. } => Some(tree.join("var/cache/apt/archives")),
                Bootstrap::Unshare { .. } => None,
            };
            // mmdebstrap's tarball, written beside its final name (as
            // root, 0600; the step only gets the descriptor).
            let part = tarball.with_extension("part");
            let stdout = match how {
                Bootstrap::Unshare { .. } => {
                    let part = part.clone();
                    Some(
                        blocking(move || {
                            use std::os::unix::fs::OpenOptionsExt;
                            std::fs::OpenOptions::new()
                                .write(true)
                                .create(true)
                                .truncate(true)
                                .mode(0o600)
                                .open(&part)
                                .map(std::os::fd::OwnedFd::from)
                                .map_err(|e| {
                                    Error::failed(format!("cannot make {}: {e}", part.display()))
                                })
                        })
                        .await?,
                    )
                }
                Bootstrap::Root { .. } => None,
            };
            let progress = std::sync::Mutex::new(BootstrapProgress::new(how.tool()));
            let show = |p: &BootstrapProgress, detail: &str| {
                ctx.progress(detail, 0.3 + 0.25 * p.share(), Some(p.bytes));
            };
            let ran = steps::run_to(
                &*self.steps,
                &step,
                stdout,
                &mut |line| {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(detail) = p.line(line) {
                        show(&p, &detail);
                    }
                    Ok(())
                },
                &|| {
                    ctx.check_cancelled()?;
                    if let Some(archives) = &archives {
                        let bytes = debs_size(archives);
                        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(detail) = p.fetched(bytes) {
                            show(&p, &detail);
                        }
                    }
                    Ok(())
                },
            )
            .await;
            let (tarball, held) = (tarball.clone(), tmp.clone());
            let unshared = matches!(how, Bootstrap::Unshare { .. });
            blocking(move || {
                let _held = held;
                if let Err(e) = ran {
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
                if unshared {
                    std::fs::rename(&part, &tarball)
                        .map_err(|e| Error::failed(format!("cannot keep the base tree: {e}")))?;
                } else {
                    keep_base(&tree, &tarball)?;
                }
                // Bases of earlier releases are not used again.
                for old in older {
                    let _ = std::fs::remove_file(old);
                }
                Ok(())
            })
            .await?;
        }
        // Unpacked as a step too: the tree has setuid files, which
        // bangerd's own unit may not make (RestrictSUIDSGID).
        {
            let (dir, held) = (root.clone(), tmp.clone());
            blocking(move || {
                let _held = held;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::failed(format!("cannot make the tree: {e}")))
            })
            .await?;
            let step = Step {
                id: format!("build-{id}-unpack"),
                what: "unpacking the base tree".to_owned(),
                program: steps::program("tar")?,
                args: vec![
                    "-C".to_owned(),
                    root.to_string_lossy().into_owned(),
                    "--numeric-owner".to_owned(),
                    "-xpf".to_owned(),
                    tarball.to_string_lossy().into_owned(),
                ],
                writable: vec![work.clone()],
                user: None,
            };
            steps::run(&*self.steps, &step, &mut |_| Ok(()), &|| {
                ctx.check_cancelled()
            })
            .await?;
        }
        drop(_build);

        ctx.stage("agent", 0.55).await?;
        {
            let agent = self.config().vm.agent_bin.clone();
            let (root, held) = (root.clone(), tmp.clone());
            blocking(move || {
                let _held = held;
                let io = |what: &str, e: std::io::Error| Error::failed(format!("{what}: {e}"));
                std::fs::copy(&agent, root.join("usr/sbin/banger-agent")).map_err(|e| {
                    Error::unavailable(format!(
                        "cannot copy the guest agent {} ({e}); see `banger doctor`",
                        agent.display()
                    ))
                })?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    root.join("usr/sbin/banger-agent"),
                    std::fs::Permissions::from_mode(0o755),
                )
                .map_err(|e| io("cannot chmod the agent", e))?;
                std::fs::write(
                    root.join("etc/systemd/system/banger-agent.service"),
                    AGENT_UNIT,
                )
                .map_err(|e| io("cannot write the agent's unit", e))?;
                if let Some(modules) = &kernel.modules {
                    let release = kernel.version.split_whitespace().next().unwrap_or_default();
                    if !release.is_empty() {
                        std::fs::create_dir_all(root.join("lib/modules"))
                            .map_err(|e| io("cannot make /lib/modules", e))?;
                        let to = root.join("lib/modules").join(release);
                        run(
                            "cp",
                            std::process::Command::new("cp")
                                .arg("-a")
                                .arg(modules)
                                .arg(&to),
                        )?;
                    }
                }
                Ok(())
            })
            .await?;
        }

        ctx.stage("configure", 0.6).await?;
        {
            let step = Step {
                id: format!("build-{id}-configure"),
                what: "the recipe's configure".to_owned(),
                program: recipe.dir.join("configure"),
                args: vec![root.to_string_lossy().into_owned()],
                writable: vec![work.clone()],
                user: None,
            };
            steps::run(
                &*self.steps,
                &step,
                &mut |line| {
                    ctx.progress(&format!("configure: {line}"), 0.6, None);
                    Ok(())
                },
                &|| ctx.check_cancelled(),
            )
            .await?;
        }

        ctx.stage("build rootfs", 0.7).await?;
        {
            // mkfs.ext4 reads the tree in the tools' sandbox, which sees
            // its owners shifted by its root id (as an OCI pull's).
            let spec = crate::artifacts::oci::unpack::Spec {
                root: root.clone(),
                blobs: Vec::new(),
                shift: self.tools.root_id(),
            };
            if spec.shift != 0 {
                crate::artifacts::oci::unpack::apply(
                    &*self.steps,
                    &self.helper,
                    &format!("build-{id}-owners"),
                    &spec,
                    &mut |_, _| Ok(()),
                    &|| ctx.check_cancelled(),
                )
                .await?;
            }
            let held = tmp.clone();
            let image = tmp.path().join("rootfs.ext4");
            let tools = self.tools.clone();
            blocking(move || {
                let _held = held;
                // The label the recipes' fstab names.
                banger_formats::ext4::build_labelled(
                    &*tools,
                    &root,
                    &image,
                    banger_formats::ext4::ROOM_FOR_PACKAGES,
                    "banger-root",
                )?;
                std::fs::remove_dir_all(&work)
                    .map_err(|e| Error::failed(format!("cannot remove the image's tree: {e}")))
            })
            .await?;
        }
        let tmp = Arc::into_inner(tmp)
            .ok_or_else(|| Error::failed("the image's staging directory is still in use"))?;
        self.record_image(
            ctx,
            tmp,
            StagedImage {
                id,
                name,
                kernel_id,
                kernel_name: kernel.name,
                services: recipe.services,
                init: recipe.init,
                // Built from the distribution's archive and banger's recipe.
                uid: SYSTEM_UID,
            },
        )
        .await
    }

    /// The id of kernel `name` when there is one.
    async fn kernel_id_any(&self, name: &str) -> Result<Option<String>> {
        let name = name.to_owned();
        self.on_store("reading kernels failed", move |s| {
            Ok(s.kernel_by_name(&name)?.map(|k| k.id))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_recipe_reads_and_bad_ones_are_refused() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        let r = recipe(&shipped, "debian-bookworm").expect("the shipped recipe");
        assert_eq!(r.suite, "bookworm");
        assert!(r.packages.contains(&"openssh-server".to_owned()));
        assert!(r.services.iter().any(|s| s.port == 22));
        assert_eq!(r.init.as_deref(), Some("/sbin/init"));
        let e = recipe(&shipped, "nope").expect_err("missing");
        assert_eq!(e.kind, crate::error::ErrorKind::NotFound);
        assert!(e.message.contains("debian-bookworm"), "{}", e.message);
        assert!(recipe(&shipped, "../etc").is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("broken");
        std::fs::create_dir(&bad).expect("dir");
        std::fs::write(bad.join("suite"), "bookworm\n").expect("suite");
        std::fs::write(bad.join("packages"), "openssh-server\n--option\n").expect("packages");
        let e = recipe(dir.path(), "broken").expect_err("bad package");
        assert!(e.message.contains("--option"), "{}", e.message);

        let mut p = BootstrapProgress::new("debootstrap");
        assert_eq!(p.line("W: no lines but I: count"), None);
        assert!(
            p.line("I: Retrieving libc6 2.36-9+deb12u13")
                .expect("shown")
                .contains("retrieving libc6 (1 packages fetched")
        );
        p.line("I: Configuring libc6...");
        assert_eq!((p.retrieved, p.installed), (1, 1));
        let s = p.share();
        assert!(s > 0.0 && s < 1.0);
        p.line("I: Retrieving bash");
        assert!(p.share() > s, "the share only grows");
        let shown = p.fetched(3 << 20).expect("bytes changed");
        assert!(
            shown.contains("retrieving bash (2 packages fetched, 3.0 MiB"),
            "{shown}"
        );
        assert_eq!(p.fetched(3 << 20), None, "nothing new");
        assert!(
            p.line("I: Unpacking bash")
                .expect("shown")
                .contains("3.0 MiB")
        );

        // mmdebstrap --verbose: apt's lines carry the sizes.
        let mut p = BootstrapProgress::new("mmdebstrap");
        let shown = p.line("I: running apt-get update...").expect("shown");
        assert!(
            shown.starts_with("mmdebstrap: running apt-get update ("),
            "{shown}"
        );
        p.line("Get:2 http://deb.debian.org/debian bookworm/main amd64 Packages [8790 kB]");
        assert_eq!((p.retrieved, p.bytes), (0, 8_790_000));
        let shown = p
            .line(
                "Get:1 file:/opt/mirror bookworm/main amd64 libc6 amd64 2.36-9+deb12u14 [2,757 kB]",
            )
            .expect("shown");
        assert!(
            shown.contains("fetching libc6 (1 packages fetched, 11.0 MiB"),
            "{shown}"
        );
        p.line("Unpacking libc6:amd64 (2.36-9+deb12u14) ...");
        let shown = p.line("Setting up bash (5.2.15-2+b7) ...").expect("shown");
        assert!(
            shown.contains("setting up bash (1 packages fetched"),
            "{shown}"
        );
        assert_eq!(p.installed, 2);
        assert_eq!(p.line("dpkg: warning: something else"), None);
        assert_eq!(apt_size("Get:3 x y z [512 B]"), Some(512));
        assert_eq!(apt_size("Get:3 x y z [1.5 MB]"), Some(1_500_000));
        assert_eq!(apt_size("no size"), None);

        // The bootstrap steps: mmdebstrap as the account, its tarball on
        // stdout, apt copying a file:// mirror's packages into its chroot;
        // debootstrap as root into the tree.
        let user = steps::Account {
            name: BUILD_USER.to_owned(),
            uid: 999,
            gid: 999,
        };
        let unshare = Bootstrap::Unshare {
            program: PathBuf::from("/usr/bin/mmdebstrap"),
            user: user.clone(),
        };
        let (work, tree) = (Path::new("/w"), Path::new("/w/tree"));
        let s = bootstrap_step("b1", &unshare, &r, "file:///srv/mirror", work, tree);
        assert_eq!(s.user, Some(user));
        assert!(s.writable.is_empty());
        assert_eq!(
            &s.args[..3],
            ["--mode=unshare", "--format=tar", "--verbose"]
        );
        assert_eq!(
            &s.args[s.args.len() - 3..],
            ["bookworm", "-", "copy:///srv/mirror"]
        );
        let root = Bootstrap::Root {
            program: PathBuf::from("/usr/sbin/debootstrap"),
            why: String::new(),
        };
        let s = bootstrap_step("b1", &root, &r, "file:///srv/mirror", work, tree);
        assert_eq!(s.user, None);
        assert_eq!(s.writable, [work]);
        assert_eq!(
            &s.args[s.args.len() - 3..],
            ["bookworm", "/w/tree", "file:///srv/mirror"]
        );
        assert_eq!(s.id, "build-b1-bootstrap");

        let subuid = "alice:100000:65536\n# comment\n999:165536:65536\nshort:300000:100\n";
        assert!(has_subids(subuid, "alice", 1000));
        assert!(has_subids(subuid, "banger-build", 999), "by uid");
        assert!(!has_subids(subuid, "short", 1001), "too few ids");
        assert!(!has_subids(subuid, "bob", 1002));
        assert!(!has_subids("", "alice", 1000));

        let same = base_key(&r, "http://deb.debian.org/debian", "mmdebstrap");
        assert_eq!(
            same,
            base_key(&r, "http://deb.debian.org/debian", "mmdebstrap")
        );
        assert_ne!(
            same,
            base_key(&r, "http://mirror.example/debian", "mmdebstrap")
        );
        // A tree debootstrap made is not one mmdebstrap made.
        assert_ne!(
            same,
            base_key(&r, "http://deb.debian.org/debian", "debootstrap")
        );
    }

    #[tokio::test]
    async fn cached_bases_follow_the_mirrors_release() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        let r = recipe(&shipped, "debian-bookworm").expect("the shipped recipe");
        let dir = tempfile::tempdir().expect("tempdir");
        let mirror = format!("file://{}", dir.path().join("mirror").display());
        let dists = dir.path().join("mirror/dists/bookworm");
        std::fs::create_dir_all(&dists).expect("dists");

        // No release file: a clear error naming the mirror.
        let e = release_digest(&mirror, "bookworm").await.expect_err("none");
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        assert!(e.message.contains("images.mirror"), "{}", e.message);

        // Release falls back after InRelease; a new release, a new key.
        std::fs::write(dists.join("Release"), "Date: one\n").expect("release");
        let one = release_digest(&mirror, "bookworm").await.expect("release");
        std::fs::write(dists.join("InRelease"), "Date: two\n").expect("inrelease");
        let two = release_digest(&mirror, "bookworm")
            .await
            .expect("inrelease");
        assert_ne!(one, two);

        let bases = dir.path().join("bases");
        std::fs::create_dir_all(&bases).expect("bases");
        let (first, older) = base_tarballs(&bases, &r, &mirror, "mmdebstrap", Some(&one));
        let first = first.expect("a name");
        assert!(older.is_empty());
        std::fs::write(&first, b"tar").expect("tarball");
        std::fs::write(bases.join("bookworm-unrelated.tar"), b"tar").expect("other");
        let (second, older) = base_tarballs(&bases, &r, &mirror, "mmdebstrap", Some(&two));
        assert_ne!(second.expect("a name"), first);
        assert_eq!(older, vec![first.clone()], "the earlier release's base");
        // The mirror unreachable: no current name, the earlier base is there.
        let (none, older) = base_tarballs(&bases, &r, &mirror, "mmdebstrap", None);
        assert_eq!((none, older), (None, vec![first]));
    }
}
