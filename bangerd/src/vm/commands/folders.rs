//! Host folders (`--mount HOST_DIR:GUEST_DIR[:ro]`): before the VMM
//! starts, one virtiofsd per folder runs as the VM's owner
//! ([`crate::vm::vmm::virtiofs`]); once the agent answers, it mounts each
//! folder in the guest. Only QEMU has the device.

use std::sync::Arc;
use std::time::Duration;

use super::Vms;
use crate::config::{Config, VmmKind};
use crate::error::{Error, Result};
use crate::vm::agent::AgentSession;
use crate::vm::vmm::virtiofs::{self, Folder, Launch, Share};
use crate::vm::{Vm, VmPaths};

/// The virtiofsd that serves host folders with `config`, or why they
/// cannot work: they need QEMU and virtiofsd.
pub fn check_folders_possible(config: &Config) -> Result<std::path::PathBuf> {
    if config.vm.vmm == VmmKind::Firecracker {
        return Err(Error::unavailable(
            "host folders need QEMU: Firecracker has no virtio-fs device; set vm.vmm = \"qemu\" in bangerd.toml",
        ));
    }
    virtiofsd(config)
}

/// The virtiofsd binary, or why there is none.
fn virtiofsd(config: &Config) -> Result<std::path::PathBuf> {
    crate::program::find(&config.vm.virtiofsd_bin).ok_or_else(|| {
        Error::unavailable(format!(
            "host folders need virtiofsd, and {} was not found: install qemu-system-common, or point vm.virtiofsd_bin at one",
            config.vm.virtiofsd_bin.display()
        ))
    })
}

/// How long the agent gets to mount one folder.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

impl Vms {
    /// Start the virtiofsds of `vm`'s folders, as its owner; what QEMU
    /// connects to. None when it has no folders.
    pub(super) async fn start_folders(&self, vm: &Vm, paths: &VmPaths) -> Result<Vec<Share>> {
        if vm.mounts.is_empty() {
            return Ok(Vec::new());
        }
        let config = self.config();
        let virtiofsd = virtiofsd(&config)?;
        let uid = vm.owner_uid;
        let owner = super::blocking(move || owner_groups(uid)).await?;
        let shares: Vec<Share> = vm
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| Share {
                tag: virtiofs::tag(i),
                folder: Folder {
                    source: m.source.clone().into(),
                    read_only: m.read_only,
                },
                socket: virtiofs::socket(&paths.run, i),
            })
            .collect();
        let log = paths.dir.join("virtiofsd.log");
        virtiofs::start(
            &Launch {
                vm: (&vm.id, &vm.name),
                helper: &self.helper,
                virtiofsd: &virtiofsd,
                owner,
                shares: &shares,
                run: &paths.run,
                log: &log,
            },
            self.supervisor.as_ref(),
        )
        .await?;
        Ok(shares)
    }

    /// Mount `vm`'s folders in the guest through its agent.
    pub(super) async fn mount_folders(&self, conn: &mut dyn AgentSession, vm: &Vm) -> Result<()> {
        for (i, m) in vm.mounts.iter().enumerate() {
            conn.mount(&virtiofs::tag(i), &m.target, m.read_only, MOUNT_TIMEOUT)
                .await
                .map_err(|e| match e {
                    banger_agent_proto::client::ClientError::Agent { source, .. }
                        if source.kind == banger_agent_proto::ErrorKind::UnknownRequest =>
                    {
                        super::exec::agent_too_old(&vm.name, "mount host folders")
                    }
                    e => Error::failed(format!(
                        "cannot mount host folder {} at {} in vm {}: {e}",
                        m.source, m.target, vm.name
                    )),
                })?;
        }
        Ok(())
    }
}

impl Vms {
    /// Mount `vm`'s folders once its agent answers, in the background:
    /// for a VM adopted by a restarted bangerd whose start was cut short
    /// (mounting is idempotent in the agent). A failure is logged.
    pub(super) fn mount_folders_later(self: &Arc<Self>, vm: Vm) {
        let vms = Arc::clone(self);
        tokio::spawn(async move {
            let config = vms.config();
            let mounted = async {
                let vmm = super::vmm_named(&config, vm.vmm)?;
                let endpoint = vmm.agent(&vms.vm_paths(&vm.id));
                let ready = vms
                    .agent
                    .wait_ready(
                        &endpoint,
                        Duration::from_secs(config.vm.boot_timeout_secs),
                        Duration::from_millis(200),
                    )
                    .await
                    .map_err(|e| Error::failed(format!("the guest agent did not answer: {e}")))?;
                let mut conn = ready.session;
                vms.mount_folders(conn.as_mut(), &vm).await
            };
            match mounted.await {
                Ok(()) => {
                    tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "mounted its host folders after a restart")
                }
                Err(e) => {
                    tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "cannot mount its host folders: {e}")
                }
            }
        });
    }
}

/// The owner's primary group and supplementary groups, from the host's
/// accounts.
fn owner_groups(uid: u32) -> Result<(u32, u32, Vec<u32>)> {
    use nix::unistd::{Uid, User, getgrouplist};
    let user = User::from_uid(Uid::from_raw(uid))
        .map_err(|e| Error::failed(format!("cannot look up uid {uid}: {e}")))?
        .ok_or_else(|| {
            Error::failed(format!(
                "the vm's owner, uid {uid}, has no account here: its host folders cannot be served as it"
            ))
        })?;
    let name = std::ffi::CString::new(user.name.as_str())
        .map_err(|_| Error::failed(format!("uid {uid} has a name with a NUL byte")))?;
    let groups = getgrouplist(&name, user.gid)
        .map_err(|e| Error::failed(format!("cannot list the groups of uid {uid}: {e}")))?;
    Ok((
        uid,
        user.gid.as_raw(),
        groups
            .into_iter()
            .map(|g| g.as_raw())
            .filter(|g| *g != user.gid.as_raw())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_need_qemu_and_virtiofsd() {
        let mut config = Config::default();
        config.vm.vmm = VmmKind::Firecracker;
        let e = check_folders_possible(&config).expect_err("firecracker");
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        assert!(e.message.contains("Firecracker has no virtio-fs"));
        config.vm.vmm = VmmKind::Qemu;
        config.vm.virtiofsd_bin = "/nonexistent/virtiofsd".into();
        let e = check_folders_possible(&config).expect_err("no virtiofsd");
        assert!(e.message.contains("qemu-system-common"), "{}", e.message);
    }

    #[test]
    fn root_has_its_groups() {
        let (uid, gid, _) = owner_groups(0).expect("root");
        assert_eq!((uid, gid), (0, 0));
    }
}
