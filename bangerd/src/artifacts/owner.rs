//! Who may use and change a kernel or image.
//!
//! Every kernel and image records the uid that made it. Uid 0 owns the
//! *system* artifacts: whatever root makes and everything pulled from the
//! signed catalogs, whoever asked for the pull. Names the catalogs list and
//! the configured default image are *reserved*: only an administrator
//! (root, or `org.banger.image.manage-others`) may make an artifact under
//! one by any other way than a catalog pull, so no user can squat them.
//!
//! Rules, for a caller that is not root:
//! - use (boot an image, build an image on a kernel): one's own, system
//!   ones, others' with `image.manage-others`;
//! - change (delete, promote): one's own unless the name is reserved,
//!   everything else with `image.manage-others`.

use banger_catalog::Kind;

use super::{Image, Kernel};
use crate::artifacts::Artifacts;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};

/// The owner of system artifacts.
pub const SYSTEM_UID: u32 = 0;

/// Something with a name and an owner.
pub trait Owned {
    /// "kernel" or "image".
    const NOUN: &'static str;
    /// The catalog its name may be reserved in.
    const CATALOG: Kind;
    /// Its name.
    fn name(&self) -> &str;
    /// Its owner.
    fn owner_uid(&self) -> u32;
}

impl Owned for Kernel {
    const NOUN: &'static str = "kernel";
    const CATALOG: Kind = Kind::Kernels;
    fn name(&self) -> &str {
        &self.name
    }
    fn owner_uid(&self) -> u32 {
        self.owner_uid
    }
}

impl Owned for Image {
    const NOUN: &'static str = "image";
    const CATALOG: Kind = Kind::Images;
    fn name(&self) -> &str {
        &self.name
    }
    fn owner_uid(&self) -> u32 {
        self.owner_uid
    }
}

/// Ask for `org.banger.image.manage-others`, saying why in the refusal.
/// Keeps the error's kind, so `InteractiveAuthorizationRequired` still
/// tells a client to retry with a prompt.
async fn as_admin(core: &Artifacts, caller: &Caller, why: String) -> Result<()> {
    core.authorizer
        .authorize(caller, Action::ImageManageOthers)
        .await
        .map_err(|e| match e.kind {
            ErrorKind::PermissionDenied | ErrorKind::InteractiveAuthorizationRequired => {
                Error::new(
                    e.kind,
                    format!(
                        "{why}; that needs org.banger.image.manage-others ({})",
                        e.message
                    ),
                )
            }
            _ => e,
        })
}

impl Artifacts {
    /// Whether `name` is reserved for a system artifact of `kind`: a name
    /// the catalog in use lists (for images, also their kernels' names),
    /// or, for images, `vm.default_image`.
    pub async fn reserved_name(&self, kind: Kind, name: &str) -> Result<bool> {
        if kind == Kind::Images && self.config().vm.default_image == name {
            return Ok(true);
        }
        if self
            .available(kind)
            .await?
            .entries
            .iter()
            .any(|a| a.entry.name == name)
        {
            return Ok(true);
        }
        if kind == Kind::Kernels {
            // The kernels the image catalog's entries boot.
            return Ok(self
                .available(Kind::Images)
                .await?
                .entries
                .iter()
                .any(|a| a.entry.kernel.as_deref() == Some(name)));
        }
        Ok(false)
    }

    /// Refuse a caller who is not an administrator a new artifact of
    /// `kind` named `name` when the name is reserved (catalog pulls do not
    /// ask: what they record is vouched for by the catalog's signature).
    pub async fn authorize_name(&self, caller: &Caller, kind: Kind, name: &str) -> Result<()> {
        if caller.uid == SYSTEM_UID || !self.reserved_name(kind, name).await? {
            return Ok(());
        }
        let noun = match kind {
            Kind::Kernels => "kernel",
            Kind::Images => "image",
        };
        as_admin(
            self,
            caller,
            format!(
                "the {noun} name {name} is reserved for the system {noun} (the signed catalog's or the default image): \
                 pick another name, or pull it with `banger {noun} pull {name}`"
            ),
        )
        .await
    }

    /// Authorize `caller` to use `artifact` (boot it, build on it).
    pub async fn authorize_use<T: Owned>(&self, caller: &Caller, artifact: &T) -> Result<()> {
        let owner = artifact.owner_uid();
        if caller.uid == SYSTEM_UID || owner == SYSTEM_UID || owner == caller.uid {
            return Ok(());
        }
        as_admin(
            self,
            caller,
            format!(
                "{} {} belongs to uid {owner}: only its owner may use it",
                T::NOUN,
                artifact.name()
            ),
        )
        .await
    }

    /// Authorize `caller` to change or delete `artifact`.
    pub async fn authorize_change<T: Owned>(&self, caller: &Caller, artifact: &T) -> Result<()> {
        if caller.uid == SYSTEM_UID {
            return Ok(());
        }
        let owner = artifact.owner_uid();
        let why = if owner != caller.uid {
            let whose = if owner == SYSTEM_UID {
                "the system".to_owned()
            } else {
                format!("uid {owner}")
            };
            format!("{} {} belongs to {whose}", T::NOUN, artifact.name())
        } else if self.reserved_name(T::CATALOG, artifact.name()).await? {
            format!(
                "{} {} has a reserved name (the signed catalog's or the default image)",
                T::NOUN,
                artifact.name()
            )
        } else {
            return Ok(());
        };
        as_admin(self, caller, why).await
    }
}
