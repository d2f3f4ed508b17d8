//! `org.banger.Kernel` and `org.banger.Image` objects: read-only views of
//! the core's kernels and images, refreshed when the core says they changed.

use std::sync::Arc;

use banger_dbus::{ServicePort, image_path, kernel_path};
use zbus::{ObjectServer, OwnedObjectPath, interface};

use crate::artifacts::{Image, Kernel};
use crate::core::Core;
use crate::jobs::Resource;

fn text(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One kernel on the bus.
#[derive(Debug)]
pub struct KernelObject {
    kernel: Kernel,
}

/// A kernel: an ELF vmlinux (and the bzImage it came from), with its
/// optional initramfs and modules, all in managed storage. Delete it with
/// Manager.DeleteKernel.
#[interface(name = "org.banger.Kernel")]
impl KernelObject {
    /// Stable id (lowercase hex); the last element of the object path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.kernel.id.clone()
    }

    /// Unique name, a DNS label.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.kernel.name.clone()
    }

    /// Version string from the bzImage header; empty when unknown.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        self.kernel.version.clone()
    }

    /// Path of the ELF vmlinux (what Firecracker boots).
    #[zbus(property(emits_changed_signal = "const"))]
    fn vmlinux(&self) -> String {
        self.kernel.vmlinux.to_string_lossy().into_owned()
    }

    /// Path of the bzImage as imported; empty when an ELF was imported.
    #[zbus(property(emits_changed_signal = "const"), name = "BzImage")]
    fn bz_image(&self) -> String {
        text(&self.kernel.bzimage)
    }

    /// Path of the initramfs; empty when none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn initrd(&self) -> String {
        text(&self.kernel.initrd)
    }

    /// Path of the modules directory; empty when none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn modules(&self) -> String {
        text(&self.kernel.modules)
    }

    /// sha256 of the vmlinux, hex.
    #[zbus(property(emits_changed_signal = "const"))]
    fn sha256(&self) -> String {
        self.kernel.sha256.clone()
    }

    /// Bytes on disk of everything managed for this kernel.
    #[zbus(property(emits_changed_signal = "const"))]
    fn size_bytes(&self) -> u64 {
        self.kernel.size_bytes
    }

    /// Import time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> u64 {
        self.kernel.created_at.max(0) as u64
    }

    /// Uid that imported it.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> u32 {
        self.kernel.owner_uid
    }
}

/// One image on the bus.
#[derive(Debug)]
pub struct ImageObject {
    image: Image,
    /// Where templates live.
    templates: std::path::PathBuf,
}

/// An image: a rootfs, its work-seed (the first contents of every VM's
/// /root disk) and the kernel it boots. Unmanaged images point at host
/// files; Manager.PromoteImage copies them into managed storage.
#[interface(name = "org.banger.Image")]
impl ImageObject {
    /// Stable id (lowercase hex); the last element of the object path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.image.id.clone()
    }

    /// Unique name, a DNS label.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.image.name.clone()
    }

    /// Whether banger owns the files (promoted) or only points at them.
    #[zbus(property)]
    fn managed(&self) -> bool {
        self.image.managed
    }

    /// Path of the rootfs ext4 image.
    #[zbus(property)]
    fn rootfs(&self) -> String {
        self.image.rootfs.to_string_lossy().into_owned()
    }

    /// Apparent size of the rootfs in bytes.
    #[zbus(property)]
    fn rootfs_bytes(&self) -> u64 {
        self.image.rootfs_bytes
    }

    /// Path of the work-seed ext4 image; empty until one exists.
    #[zbus(property)]
    fn work_seed(&self) -> String {
        text(&self.image.work_seed)
    }

    /// sha256 of the work-seed, hex; empty until one exists.
    #[zbus(property)]
    fn work_seed_sha256(&self) -> String {
        self.image.work_seed_sha256.clone()
    }

    /// The kernel object the image boots.
    #[zbus(property)]
    fn kernel(&self) -> OwnedObjectPath {
        kernel_path(&self.image.kernel_id)
    }

    /// Guest services (name, TCP port) readiness waits for.
    #[zbus(property(emits_changed_signal = "const"))]
    fn services(&self) -> Vec<ServicePort> {
        self.image
            .services
            .iter()
            .map(|s| ServicePort {
                name: s.name.clone(),
                port: s.port,
            })
            .collect()
    }

    /// The init the kernel starts; empty for the kernel's default.
    #[zbus(property(emits_changed_signal = "const"))]
    fn init(&self) -> String {
        self.image.init.clone().unwrap_or_default()
    }

    /// Registration time, microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn created_at(&self) -> u64 {
        self.image.created_at.max(0) as u64
    }

    /// Uid that registered it.
    #[zbus(property(emits_changed_signal = "const"), name = "OwnerUID")]
    fn owner_uid(&self) -> u32 {
        self.image.owner_uid
    }

    /// Its templates, ready to be restored by creates of their shape:
    /// vCPUs, memory (MiB), work disk (bytes), saved state (bytes), when
    /// made (µs since the epoch). Announced when one is made; one removed
    /// since shows until then.
    #[zbus(property)]
    async fn templates(&self) -> Vec<(u32, u32, u64, u64, i64)> {
        let (dir, id) = (self.templates.clone(), self.image.id.clone());
        crate::blocking::value(move || {
            crate::vm::commands::templates_of(&dir, &id)
                .into_iter()
                .map(|t| {
                    (
                        t.vcpus,
                        t.memory_mib,
                        t.disk_bytes,
                        t.state_bytes,
                        t.made_at,
                    )
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }
}

/// Object path of a resource.
pub fn path_of(r: &Resource) -> OwnedObjectPath {
    match r {
        Resource::Kernel(id) => kernel_path(id),
        Resource::Image(id) => image_path(id),
        Resource::Vm(id) => banger_dbus::vm_path(id),
    }
}

/// Publish every kernel and image the core has (at startup).
pub async fn publish_all(server: &ObjectServer, core: &Arc<Core>) -> zbus::Result<()> {
    let kernels = core
        .artifacts()
        .kernels()
        .await
        .map_err(|e| zbus::Error::Failure(e.message))?;
    for k in kernels {
        server
            .at(kernel_path(&k.id), KernelObject { kernel: k })
            .await?;
    }
    let images = core
        .artifacts()
        .images()
        .await
        .map_err(|e| zbus::Error::Failure(e.message))?;
    for i in images {
        server
            .at(
                image_path(&i.id),
                ImageObject {
                    image: i,
                    templates: core.vms().templates(),
                },
            )
            .await?;
    }
    Ok(())
}

/// Bring the object of `r` in line with the core: create it, refresh it
/// (announcing the properties that can change), or remove it if the core
/// no longer has it.
pub async fn refresh(server: &ObjectServer, core: &Arc<Core>, r: &Resource) -> zbus::Result<()> {
    let path = path_of(r);
    match r {
        Resource::Vm(id) => return super::vm::refresh(server, core, id).await,
        Resource::Kernel(id) => match core.artifacts().kernel_by_id(id).await {
            Ok(kernel) => {
                // Kernels never change after import; only create.
                server.at(&path, KernelObject { kernel }).await?;
            }
            Err(_) => {
                server.remove::<KernelObject, _>(&path).await?;
            }
        },
        Resource::Image(id) => match core.artifacts().image_by_id(id).await {
            Ok(image) => {
                if let Ok(iface) = server.interface::<_, ImageObject>(&path).await {
                    let emitter = iface.signal_emitter().clone();
                    let mut object = iface.get_mut().await;
                    object.image = image;
                    object.managed_changed(&emitter).await?;
                    object.rootfs_changed(&emitter).await?;
                    object.rootfs_bytes_changed(&emitter).await?;
                    object.work_seed_changed(&emitter).await?;
                    object.work_seed_sha256_changed(&emitter).await?;
                    object.templates_changed(&emitter).await?;
                } else {
                    let templates = core.vms().templates();
                    server.at(&path, ImageObject { image, templates }).await?;
                }
            }
            Err(_) => {
                server.remove::<ImageObject, _>(&path).await?;
            }
        },
    }
    Ok(())
}

/// Remove the object of `r`; one already gone is fine.
pub async fn remove(server: &ObjectServer, r: &Resource) -> zbus::Result<()> {
    let path = path_of(r);
    let removed = match r {
        Resource::Kernel(_) => server.remove::<KernelObject, _>(&path).await,
        Resource::Image(_) => server.remove::<ImageObject, _>(&path).await,
        Resource::Vm(id) => return super::vm::remove(server, id).await,
    };
    match removed {
        Ok(_) | Err(zbus::Error::InterfaceNotFound) => Ok(()),
        Err(e) => Err(e),
    }
}
