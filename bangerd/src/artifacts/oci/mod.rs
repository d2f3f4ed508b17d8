//! OCI images: `image pull REGISTRY/REPO[:TAG|@DIGEST]`. The registry side
//! (`registry`: the linux/amd64 manifest and its layer blobs, digests
//! checked), the layers applied in order onto a staging root (`layers`),
//! the first-boot wrapper, agent and unit masks put in (`boot`), and an
//! ext4 image built from it without a loop mount (`ext4`); then a
//! work-seed from its `/root`, and the image recorded like any managed one.

pub mod boot;
pub use banger_formats::{ext4, layers};
pub mod registry;
pub mod unpack;

use std::sync::Arc;
use std::time::Duration;

use banger_catalog::Kind;
use oci_client::Reference;

use super::commands::{TmpDir, already_exists, blocking, ticker};
use super::pull::StagedImage;
use super::{Service, images_dir, validate};
use crate::artifacts::Artifacts;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::Resource;
use crate::jobs::{JobContext, JobId};

/// What `image pull` of an OCI reference was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciPull {
    /// `registry/repo[:tag|@digest]`.
    pub reference: String,
    /// Name to record the image under; default from the repository and tag.
    pub name: Option<String>,
    /// Kernel (name or id) it boots with; default the default image's.
    pub kernel: Option<String>,
    /// Registry credentials; anonymous without.
    pub credentials: Option<registry::Credentials>,
}

/// `debian-bookworm` for `registry/library/debian:bookworm`: the last
/// repository segment and the tag (or the digest's start), as a DNS label.
pub fn default_name(reference: &Reference) -> String {
    let repo = reference.repository().rsplit('/').next().unwrap_or("image");
    let suffix = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_owned(),
        (None, Some(digest)) => digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect(),
        (None, None) => "latest".to_owned(),
    };
    let mut name: String = format!("{repo}-{suffix}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_matches('-').to_owned()
}

impl Artifacts {
    /// Pull an OCI image as a job (polkit `org.banger.image.manage`);
    /// joins a running pull of the same name.
    pub async fn pull_oci(self: &Arc<Self>, caller: &Caller, req: OciPull) -> Result<JobId> {
        self.authorizer
            .authorize(caller, Action::ImageManage)
            .await?;
        let reference = registry::parse_reference(&req.reference)?;
        let name = req.name.clone().unwrap_or_else(|| default_name(&reference));
        validate::name("image", &name)?;
        self.authorize_name(caller, Kind::Images, &name).await?;
        let kernel = match &req.kernel {
            Some(k) => self.kernel(k).await.map_err(|e| match e.kind {
                ErrorKind::NotFound => Error::not_found(format!(
                    "there is no kernel {k:?}: pull one (`banger kernel list --available`) or import it first"
                )),
                _ => e,
            })?,
            None => match self.default_image().await {
                Some((_, kernel)) => kernel,
                None => {
                    return Err(Error::invalid(
                        "name the kernel the image boots with (`--kernel-ref NAME`); there is no default image to take it from",
                    ));
                }
            },
        };
        self.authorize_use(caller, &kernel).await?;
        let agent = self.config().vm.agent_bin.clone();
        boot::check_agent(&agent)?;
        let mut pulls = self.pulls.lock().await;
        // Joined only by the same caller asking for the same thing.
        let key = (
            Kind::Images,
            format!("{name} {} uid {}", req.reference, caller.uid),
        );
        if let Some(id) = self.running_pull(&mut pulls, &key) {
            return Ok(id);
        }
        let exists = {
            let name = name.clone();
            self.on_store("reading images failed", move |s| s.image_by_name(&name))
                .await?
                .is_some()
        };
        if exists {
            return Err(already_exists("image", &name));
        }
        let core = self.clone();
        let uid = caller.uid;
        let job_name = name.clone();
        let credentials = req.credentials;
        let id = self
            .jobs()
            .start_with_result(
                "image-pull",
                uid,
                Action::ImageManage,
                move |ctx| async move {
                    let staged = StagedImage {
                        id: super::new_id()
                            .map_err(|e| Error::failed(format!("cannot make an id: {e}")))?,
                        name: job_name,
                        kernel_id: kernel.id,
                        kernel_name: kernel.name,
                        services: vec![Service {
                            name: "ssh".into(),
                            port: 22,
                        }],
                        init: Some(boot::INIT_PATH.to_owned()),
                        uid,
                    };
                    // Job errors are broadcast: no registry, repository or
                    // login of the caller's in them.
                    let (whole, registry, repository) = (
                        reference.whole(),
                        reference.registry().to_owned(),
                        reference.repository().to_owned(),
                    );
                    let words = [
                        (whole.as_str(), "the image"),
                        (registry.as_str(), "<registry>"),
                        (repository.as_str(), "<repository>"),
                    ];
                    core.pull_oci_job(&ctx, reference.clone(), credentials, staged, agent)
                        .await
                        .map_err(|e| e.redacted(&words))
                },
            )
            .await?;
        pulls.insert(key, id);
        Ok(id)
    }

    async fn pull_oci_job(
        &self,
        ctx: &JobContext,
        reference: Reference,
        credentials: Option<registry::Credentials>,
        staged: StagedImage,
        agent: std::path::PathBuf,
    ) -> Result<Option<Resource>> {
        let state = self.state.clone();
        let tmp = TmpDir::create(images_dir(&state).join(format!(".tmp-{}", staged.id)))?;
        let blobs = tmp.path().join(".layers");
        let root = tmp.path().join(".root");
        for dir in [&blobs, &root] {
            std::fs::create_dir(dir)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
        }

        ctx.stage("fetch layers", 0.0).await?;
        let stall = Duration::from_secs(self.config().update.stall_timeout_secs);
        let mut report = |done: u64, total: u64| {
            let share = if total == 0 {
                1.0
            } else {
                done as f64 / total as f64
            };
            ctx.progress(
                &format!(
                    "{:.1} of {:.1} MiB",
                    done as f64 / 1048576.0,
                    total as f64 / 1048576.0
                ),
                0.5 * share,
                Some(done),
            );
        };
        let max_bytes = self.config().limits.image_max_gib.saturating_mul(1 << 30);
        let fetched = registry::fetch(
            &reference,
            credentials.as_ref(),
            &blobs,
            stall,
            max_bytes,
            &mut report,
        )
        .await?;
        tracing::info!(
            image = %reference,
            digest = %fetched.digest,
            layers = fetched.layers.len(),
            "image layers fetched"
        );

        ctx.stage("apply layers", 0.5).await?;
        let mut tick = ticker(ctx, "layers", 0, 0.5, 0.7);
        unpack::apply(
            &*self.steps,
            &self.helper,
            &format!("pull-{}-layers", staged.id),
            &unpack::Spec {
                root: root.clone(),
                blobs: fetched.layers.clone(),
                shift: self.tools.root_id(),
            },
            &mut |_, bytes| tick(bytes),
            &|| ctx.check_cancelled(),
        )
        .await?;

        ctx.stage("first-boot wrapper", 0.7).await?;
        let (into, owner) = (root.clone(), self.tools.root_id());
        blocking(move || boot::prepare(&into, &agent, owner)).await?;

        ctx.stage("build rootfs", 0.72).await?;
        let image = tmp.path().join("rootfs.ext4");
        let (from, to, tools) = (root.clone(), image.clone(), self.tools.clone());
        blocking(move || {
            ext4::build(&*tools, &from, &to, ext4::ROOM_FOR_PACKAGES)?;
            std::fs::remove_dir_all(&from)
                .map_err(|e| Error::failed(format!("cannot remove {}: {e}", from.display())))
        })
        .await?;
        let _ = std::fs::remove_dir(&blobs);
        self.record_image(ctx, tmp, staged).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_dns_labels() {
        let name = |r: &str| default_name(&registry::parse_reference(r).expect(r));
        assert_eq!(
            name("127.0.0.1:5000/library/debian:bookworm"),
            "debian-bookworm"
        );
        assert_eq!(name("127.0.0.1:5000/test/img:V1.2_rc"), "img-v1-2-rc");
        assert_eq!(name("127.0.0.1:5000/alpine"), "alpine-latest");
        assert_eq!(
            name(
                "127.0.0.1:5000/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
            "x-0123456789ab"
        );
    }
}
