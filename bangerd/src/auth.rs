//! Who is calling and what they may do.
//!
//! The caller's identity comes from the transport (the bus says which uid
//! owns the sending connection), never from arguments. Decisions come from
//! an [`Authorizer`]; the real one asks polkit (`os::polkit`).

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

/// The caller of a command, as the front end established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Unix uid owning the calling connection.
    pub uid: u32,
    /// The caller's unique bus name (the polkit subject), if it came over D-Bus.
    pub bus_name: Option<String>,
    /// Whether the caller is prepared to wait for an authentication prompt.
    pub allow_interactive: bool,
}

impl Caller {
    /// The daemon itself (internal work, tests).
    pub fn root() -> Self {
        Self {
            uid: 0,
            bus_name: None,
            allow_interactive: false,
        }
    }
}

/// A polkit action (see `packaging/org.banger.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create VMs.
    VmCreate,
    /// Start, stop, change and delete one's own VMs.
    VmManage,
    /// Do that to other users' VMs.
    VmManageOthers,
    /// Give one's VMs NAT to the outside (at create or with Set).
    VmNat,
    /// Import, pull, promote and delete one's own images and kernels.
    ImageManage,
    /// Use, change and delete other users' images and kernels, and make,
    /// replace or delete system ones (catalog names, the default image).
    ImageManageOthers,
    /// Change host networking (NAT, bridge).
    NetworkConfigure,
    /// Update banger.
    Update,
    /// Run store maintenance and other daemon housekeeping.
    Maintain,
}

impl Action {
    /// Every action, in policy-file order.
    pub const ALL: [Action; 9] = [
        Action::VmCreate,
        Action::VmManage,
        Action::VmManageOthers,
        Action::VmNat,
        Action::ImageManage,
        Action::ImageManageOthers,
        Action::NetworkConfigure,
        Action::Update,
        Action::Maintain,
    ];

    /// The polkit action id.
    pub fn id(self) -> &'static str {
        match self {
            Self::VmCreate => "org.banger.vm.create",
            Self::VmManage => "org.banger.vm.manage",
            Self::VmManageOthers => "org.banger.vm.manage-others",
            Self::VmNat => "org.banger.vm.nat",
            Self::ImageManage => "org.banger.image.manage",
            Self::ImageManageOthers => "org.banger.image.manage-others",
            Self::NetworkConfigure => "org.banger.network.configure",
            Self::Update => "org.banger.update",
            Self::Maintain => "org.banger.maintain",
        }
    }

    /// What the action allows, for messages ("... to <describe>").
    pub fn describe(self) -> &'static str {
        match self {
            Self::VmCreate => "create VMs",
            Self::VmManage => "manage your VMs",
            Self::VmManageOthers => "manage other users' VMs",
            Self::VmNat => "give VMs NAT to the outside",
            Self::ImageManage => "manage images and kernels",
            Self::ImageManageOthers => "manage other users' and system images and kernels",
            Self::NetworkConfigure => "configure host networking",
            Self::Update => "update banger",
            Self::Maintain => "run daemon maintenance",
        }
    }
}

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides whether a caller may perform an action.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    /// `Ok(())` when allowed; `PermissionDenied` or
    /// `InteractiveAuthorizationRequired` otherwise, with a message that says
    /// what to do.
    fn authorize<'a>(&'a self, caller: &'a Caller, action: Action) -> BoxFuture<'a, Result<()>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_ids_match_the_policy_file() {
        let policy = include_str!("../../packaging/org.banger.policy");
        for action in Action::ALL {
            let needle = format!("<action id=\"{}\">", action.id());
            assert!(policy.contains(&needle), "policy lacks {}", action.id());
        }
        assert_eq!(
            policy.matches("<action id=").count(),
            Action::ALL.len(),
            "policy has actions the daemon does not know"
        );
    }
}
