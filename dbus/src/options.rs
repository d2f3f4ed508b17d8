//! The `a{sv}` arguments: their keys, one struct per method that takes
//! them, and the one parser both sides use. Clients build a struct and
//! send [`to_dict`](CreateVm::to_dict); the daemon [`parse`](CreateVm::parse)s
//! what arrives, refusing unknown keys and wrong types with an
//! [`OptionError`] that names the key.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;

use zbus::{OwnedVariant, Variant};

/// Options as they arrive.
pub type Dict = HashMap<String, OwnedVariant>;

/// Options as a client sends them (values may borrow from the struct).
pub type DictOut<'a> = HashMap<&'static str, Variant<'a>>;

/// Why options were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// Keys the method does not take.
    Unknown {
        /// The method, e.g. `Maintain`.
        method: &'static str,
        /// The unknown keys, sorted.
        keys: Vec<String>,
        /// The keys it takes.
        known: &'static [&'static str],
    },
    /// A value of the wrong type.
    WrongType {
        /// The key.
        key: &'static str,
        /// What it must be, e.g. `a boolean (b)`.
        want: &'static str,
        /// The signature it had.
        got: String,
    },
    /// An empty string where one was given.
    Empty {
        /// The key.
        key: &'static str,
    },
    /// Two options that go together, one without the other.
    Pair {
        /// The method.
        method: &'static str,
        /// The two keys.
        keys: [&'static str; 2],
    },
    /// A descriptor this process could not keep (the daemon's fault, not
    /// the caller's).
    Descriptor {
        /// The key.
        key: &'static str,
        /// Why.
        why: String,
    },
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown {
                method,
                keys,
                known,
            } => {
                let known = if known.is_empty() {
                    "it takes none".to_owned()
                } else {
                    format!("known options: {}", known.join(", "))
                };
                write!(
                    f,
                    "unknown option {} for {method}; {known}",
                    keys.join(", ")
                )
            }
            Self::WrongType { key, want, got } => {
                write!(f, "option {key} must be {want}, not {got}")?;
                if *want == FD {
                    write!(f, ": pass an open file, not a path")?;
                }
                Ok(())
            }
            Self::Empty { key } => write!(f, "option {key} is empty; leave it out instead"),
            Self::Pair { method, keys } => write!(
                f,
                "{method}: options \"{}\" and \"{}\" go together",
                keys[0], keys[1]
            ),
            Self::Descriptor { key, why } => write!(f, "cannot keep descriptor {key}: {why}"),
        }
    }
}

impl std::error::Error for OptionError {}

const FD: &str = "a file descriptor (h)";

/// Reads one method's options.
struct Reader<'a> {
    dict: &'a Dict,
}

impl<'a> Reader<'a> {
    /// Refuse keys not in `known`.
    fn new(
        method: &'static str,
        dict: &'a Dict,
        known: &'static [&'static str],
    ) -> Result<Self, OptionError> {
        let mut keys: Vec<String> = dict
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        if !keys.is_empty() {
            keys.sort_unstable();
            return Err(OptionError::Unknown {
                method,
                keys,
                known,
            });
        }
        Ok(Self { dict })
    }

    fn get<T>(
        &self,
        key: &'static str,
        want: &'static str,
        convert: impl FnOnce(&OwnedVariant) -> Option<T>,
    ) -> Result<Option<T>, OptionError> {
        match self.dict.get(key) {
            None => Ok(None),
            Some(v) => convert(v).map(Some).ok_or_else(|| OptionError::WrongType {
                key,
                want,
                got: v.value_signature().to_string(),
            }),
        }
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, OptionError> {
        self.get(key, "a boolean (b)", |v| bool::try_from(v).ok())
    }

    fn u32(&self, key: &'static str) -> Result<Option<u32>, OptionError> {
        self.get(key, "an unsigned 32-bit integer (u)", |v| {
            u32::try_from(v).ok()
        })
    }

    fn u64(&self, key: &'static str) -> Result<Option<u64>, OptionError> {
        self.get(key, "an unsigned 64-bit integer (t)", |v| {
            u64::try_from(v).ok()
        })
    }

    /// A non-empty string.
    fn string(&self, key: &'static str) -> Result<Option<String>, OptionError> {
        let s = self.get(key, "a string (s)", |v| {
            v.try_clone().ok().and_then(|v| String::try_from(v).ok())
        })?;
        if s.as_deref() == Some("") {
            return Err(OptionError::Empty { key });
        }
        Ok(s)
    }

    /// Non-empty bytes.
    fn bytes(&self, key: &'static str) -> Result<Option<Vec<u8>>, OptionError> {
        let b = self.get(key, "an array of bytes (ay)", |v| {
            v.try_clone().ok().and_then(|v| Vec::<u8>::try_from(v).ok())
        })?;
        if b.as_ref().is_some_and(Vec::is_empty) {
            return Err(OptionError::Empty { key });
        }
        Ok(b)
    }

    /// Host folders, `a(ssb)`: host directory, guest directory,
    /// read-only.
    fn mounts(&self, key: &'static str) -> Result<Option<Vec<Mount>>, OptionError> {
        self.get(
            key,
            "an array of (host folder, guest folder, read-only) (a(ssb))",
            |v| {
                v.try_clone()
                    .ok()
                    .and_then(|v| Vec::<(String, String, bool)>::try_from(v).ok())
                    .map(|m| {
                        m.into_iter()
                            .map(|(source, target, read_only)| Mount {
                                source,
                                target,
                                read_only,
                            })
                            .collect()
                    })
            },
        )
    }

    fn strings(&self, key: &'static str) -> Result<Vec<String>, OptionError> {
        Ok(self
            .get(key, "an array of strings (as)", |v| {
                v.try_clone()
                    .ok()
                    .and_then(|v| Vec::<String>::try_from(v).ok())
            })?
            .unwrap_or_default())
    }

    /// A descriptor, as a file of this process.
    fn file(&self, key: &'static str) -> Result<Option<File>, OptionError> {
        let Some(fd) = self.get(key, FD, |v| {
            <&zbus::Fd<'_>>::try_from(v)
                .ok()
                .map(|fd| fd.as_fd().try_clone_to_owned())
        })?
        else {
            return Ok(None);
        };
        fd.map(|fd| Some(File::from(fd)))
            .map_err(|e| OptionError::Descriptor {
                key,
                why: e.to_string(),
            })
    }
}

/// Adds the set fields of a struct to a [`DictOut`].
struct Writer<'a>(DictOut<'a>);

impl<'a> Writer<'a> {
    fn new() -> Self {
        Self(HashMap::new())
    }

    fn put(mut self, key: &'static str, value: Option<Variant<'a>>) -> Self {
        if let Some(v) = value {
            self.0.insert(key, v);
        }
        self
    }

    fn file(self, key: &'static str, file: Option<&'a File>) -> Self {
        self.put(key, file.map(|f| Variant::from(zbus::Fd::from(f.as_fd()))))
    }

    fn mounts(self, key: &'static str, mounts: Option<&[Mount]>) -> Self {
        self.put(
            key,
            mounts.map(|m| {
                Variant::from(
                    m.iter()
                        .map(|m| (m.source.clone(), m.target.clone(), m.read_only))
                        .collect::<Vec<_>>(),
                )
            }),
        )
    }

    fn strings(self, key: &'static str, values: &[String]) -> Self {
        self.put(
            key,
            (!values.is_empty()).then(|| Variant::from(values.to_vec())),
        )
    }
}

/// Keys of `Manager.Maintain(a{sv} options)`.
pub mod maintain {
    /// `b`: also run `VACUUM` on the store (slower; reclaims space).
    pub const VACUUM: &str = "vacuum";
}

/// Keys of `Manager.Update(a{sv} options)`.
pub mod update {
    /// `b`: only report what the channel offers; change nothing.
    pub const CHECK: &str = "check";
    /// `s`: release channel URL instead of the configured one.
    pub const CHANNEL: &str = "channel";
    /// `b`: return to the set installed before the last update.
    pub const ROLLBACK: &str = "rollback";
}

/// Keys of `VM.Exec(as command, a{sv} options)`.
pub mod exec {
    /// `as`: `NAME=value` entries added to the command's environment.
    pub const ENV: &str = "env";
    /// `s`: the directory to run in (default: the user's home).
    pub const WORKDIR: &str = "workdir";
    /// `s`: the guest user to run as, a name or uid (default: root).
    pub const USER: &str = "user";
    /// `b`: run on a new terminal in the guest.
    pub const TTY: &str = "tty";
    /// `u`: the terminal's rows (with tty).
    pub const ROWS: &str = "rows";
    /// `u`: the terminal's columns (with tty).
    pub const COLS: &str = "cols";
    /// `s`: `TERM` for the command (with tty).
    pub const TERM: &str = "term";
}

/// Keys of `VM.ConnectPort(q port, a{sv} options)`.
pub mod connect_port {
    /// `b`: the caller serves the port beyond this host's loopback (needs
    /// `org.banger.network.configure`).
    pub const EXPOSED: &str = "exposed";
}

/// Keys of `VM.Clone(s name, a{sv} options)`.
pub mod clone_vm {
    /// `b`: boot the clone once its disks are copied (default false).
    pub const START: &str = "start";
}

/// Keys of `VM.Fork(s name, a{sv} options)`.
pub mod fork_vm {
    /// `u`: how many forks (1 to 16, default 1); more than one are named
    /// `NAME-1` … `NAME-N`.
    pub const COUNT: &str = "count";
}

/// Keys of `Manager.PullImage(s reference, a{sv} options)` for an OCI
/// reference.
pub mod pull_image {
    /// `s`: name to record the image under (default from the repository
    /// and tag).
    pub const NAME: &str = "name";
    /// `s`: kernel (name or id) the image boots with (default the default
    /// image's).
    pub const KERNEL: &str = "kernel";
    /// `s`: registry username; with [`PASSWORD`], the pull sends both to
    /// the registry's token service (or as basic auth); anonymous without.
    pub const USERNAME: &str = "username";
    /// `s`: registry password or access token; only with [`USERNAME`].
    pub const PASSWORD: &str = "password";
}

/// Keys of `Manager.BuildKernel(s name, a{sv} options)`.
pub mod build_kernel {
    /// `s`: where the kernel comes from; only `debian` (the host's apt
    /// sources), the default.
    pub const FROM: &str = "from";
    /// `s`: the kernel image package (default: what
    /// `linux-image-cloud-amd64` depends on).
    pub const PACKAGE: &str = "package";
}

/// Keys of `Manager.BuildImage(s recipe, a{sv} options)`.
pub mod build_image {
    /// `s`: name to record the image under (default the recipe's).
    pub const NAME: &str = "name";
    /// `s`: kernel (name) the image boots with (default the one `kernel
    /// build` makes, built first when missing).
    pub const KERNEL: &str = "kernel";
}

/// Keys of `Manager.ImportKernel(s name, s kernel, a{sv} options)`.
pub mod import_kernel {
    /// `s`: host path of an initramfs to boot with the kernel.
    pub const INITRD: &str = "initrd";
    /// `s`: host path of the kernel's `lib/modules/<version>` directory.
    pub const MODULES: &str = "modules";
}

/// Keys of `Manager.ImportKernelFd(s name, h kernel, a{sv} options)`.
pub mod import_kernel_fd {
    /// `h`: an initramfs to boot with the kernel, opened for reading.
    pub const INITRD: &str = "initrd";
    /// `h`: an uncompressed tar of the kernel's `lib/modules/<version>`
    /// directory's contents, in a regular file (the CLI writes one as the
    /// caller).
    pub const MODULES: &str = "modules";
}

/// Keys of `Manager.ImportImageFd(s name, h rootfs, s kernel, a{sv} options)`.
pub mod import_image_fd {
    /// `h`: an ext4 image holding the rootfs's `/root`, opened for reading.
    pub const WORK_SEED: &str = "work_seed";
    /// `as`: guest services readiness waits for, each `name:port`.
    pub const SERVICES: &str = "services";
    /// `s`: the init the kernel starts (e.g. `/sbin/banger-init`).
    pub const INIT: &str = "init";
}

/// Keys of `Manager.RegisterImage(s name, s rootfs, s kernel, a{sv} options)`.
pub mod register_image {
    /// `s`: host path of an ext4 image holding the rootfs's `/root`.
    pub const WORK_SEED: &str = "work_seed";
    /// `as`: guest services readiness waits for, each `name:port`.
    pub const SERVICES: &str = "services";
    /// `s`: the init the kernel starts (e.g. `/sbin/banger-init`).
    pub const INIT: &str = "init";
}

/// Keys of `Manager.CreateVM(s name, s image, a{sv} options)`.
pub mod create_vm {
    /// `u`: virtual CPUs.
    pub const VCPUS: &str = "vcpus";
    /// `u`: memory in MiB.
    pub const MEMORY_MIB: &str = "memory_mib";
    /// `t`: size of the work disk (/root) in bytes.
    pub const DISK_BYTES: &str = "disk_bytes";
    /// `b`: NAT the VM's traffic to the outside.
    pub const NAT: &str = "nat";
    /// `b`: let the VM talk with the other VMs that have this on.
    pub const PEERS: &str = "peers";
    /// `b`: start the VM when bangerd first starts after a host boot.
    pub const AUTOSTART: &str = "autostart";
    /// `as`: SSH public key lines for root's authorized_keys.
    pub const SSH_KEYS: &str = "ssh_keys";
    /// `b`: start the VM once it is made (default true).
    pub const START: &str = "start";
    /// `ay`: a script run once as root through the agent after the first
    /// boot (at most 256 KiB).
    pub const SETUP: &str = "setup";
    /// `a(ssb)`: host folders shared with the guest: host directory,
    /// guest directory, read-only (QEMU only).
    pub const MOUNTS: &str = "mounts";
    /// `b`: boot from the image even where a template of it could be
    /// restored (default false).
    pub const COLD_BOOT: &str = "cold_boot";
}

/// Keys of `VM.Set(a{sv} changes)`.
pub mod set_vm {
    pub use super::create_vm::{AUTOSTART, DISK_BYTES, MEMORY_MIB, MOUNTS, NAT, PEERS, VCPUS};
}

/// A host folder shared with a VM ([`create_vm::MOUNTS`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mount {
    /// The host directory (absolute).
    pub source: String,
    /// Where the guest mounts it (absolute).
    pub target: String,
    /// Shared read-only.
    pub read_only: bool,
}

/// Options of a method that takes none (`Manager.PullKernel`, a catalog
/// `Manager.PullImage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoOptions;

impl NoOptions {
    /// Refuse any key.
    pub fn parse(method: &'static str, dict: &Dict) -> Result<Self, OptionError> {
        Reader::new(method, dict, &[])?;
        Ok(Self)
    }

    /// The empty dictionary.
    pub fn to_dict(&self) -> DictOut<'static> {
        HashMap::new()
    }
}

/// `Manager.Maintain` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintain {
    /// [`maintain::VACUUM`].
    pub vacuum: bool,
}

impl Maintain {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new("Maintain", dict, &[maintain::VACUUM])?;
        Ok(Self {
            vacuum: r.bool(maintain::VACUUM)?.unwrap_or(false),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'static> {
        Writer::new()
            .put(maintain::VACUUM, self.vacuum.then(|| Variant::from(true)))
            .0
    }
}

/// `Manager.Update` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// [`update::CHECK`].
    pub check: bool,
    /// [`update::CHANNEL`].
    pub channel: Option<String>,
    /// [`update::ROLLBACK`].
    pub rollback: bool,
}

impl Update {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "Update",
            dict,
            &[update::CHECK, update::CHANNEL, update::ROLLBACK],
        )?;
        Ok(Self {
            check: r.bool(update::CHECK)?.unwrap_or(false),
            channel: r.string(update::CHANNEL)?,
            rollback: r.bool(update::ROLLBACK)?.unwrap_or(false),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(update::CHECK, self.check.then(|| Variant::from(true)))
            .put(update::CHANNEL, self.channel.as_deref().map(Variant::from))
            .put(update::ROLLBACK, self.rollback.then(|| Variant::from(true)))
            .0
    }
}

/// `Manager.PullImage` options for an OCI reference.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PullOci {
    /// [`pull_image::NAME`].
    pub name: Option<String>,
    /// [`pull_image::KERNEL`].
    pub kernel: Option<String>,
    /// [`pull_image::USERNAME`] and [`pull_image::PASSWORD`], together.
    pub login: Option<(String, String)>,
}

impl std::fmt::Debug for PullOci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOci")
            .field("name", &self.name)
            .field("kernel", &self.kernel)
            .field(
                "login",
                &self.login.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .finish()
    }
}

impl PullOci {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "PullImage",
            dict,
            &[
                pull_image::NAME,
                pull_image::KERNEL,
                pull_image::USERNAME,
                pull_image::PASSWORD,
            ],
        )?;
        let login = match (
            r.string(pull_image::USERNAME)?,
            r.string(pull_image::PASSWORD)?,
        ) {
            (None, None) => None,
            (Some(u), Some(p)) => Some((u, p)),
            _ => {
                return Err(OptionError::Pair {
                    method: "PullImage",
                    keys: [pull_image::USERNAME, pull_image::PASSWORD],
                });
            }
        };
        Ok(Self {
            name: r.string(pull_image::NAME)?,
            kernel: r.string(pull_image::KERNEL)?,
            login,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        let login = self.login.as_ref();
        Writer::new()
            .put(pull_image::NAME, self.name.as_deref().map(Variant::from))
            .put(
                pull_image::KERNEL,
                self.kernel.as_deref().map(Variant::from),
            )
            .put(
                pull_image::USERNAME,
                login.map(|(u, _)| Variant::from(u.as_str())),
            )
            .put(
                pull_image::PASSWORD,
                login.map(|(_, p)| Variant::from(p.as_str())),
            )
            .0
    }
}

/// `Manager.BuildKernel` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildKernel {
    /// [`build_kernel::FROM`].
    pub from: Option<String>,
    /// [`build_kernel::PACKAGE`].
    pub package: Option<String>,
}

impl BuildKernel {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "BuildKernel",
            dict,
            &[build_kernel::FROM, build_kernel::PACKAGE],
        )?;
        Ok(Self {
            from: r.string(build_kernel::FROM)?,
            package: r.string(build_kernel::PACKAGE)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(build_kernel::FROM, self.from.as_deref().map(Variant::from))
            .put(
                build_kernel::PACKAGE,
                self.package.as_deref().map(Variant::from),
            )
            .0
    }
}

/// `Manager.BuildImage` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildImage {
    /// [`build_image::NAME`].
    pub name: Option<String>,
    /// [`build_image::KERNEL`].
    pub kernel: Option<String>,
}

impl BuildImage {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "BuildImage",
            dict,
            &[build_image::NAME, build_image::KERNEL],
        )?;
        Ok(Self {
            name: r.string(build_image::NAME)?,
            kernel: r.string(build_image::KERNEL)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(build_image::NAME, self.name.as_deref().map(Variant::from))
            .put(
                build_image::KERNEL,
                self.kernel.as_deref().map(Variant::from),
            )
            .0
    }
}

/// `Manager.ImportKernel` options (root's host paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportKernel {
    /// [`import_kernel::INITRD`].
    pub initrd: Option<String>,
    /// [`import_kernel::MODULES`].
    pub modules: Option<String>,
}

impl ImportKernel {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "ImportKernel",
            dict,
            &[import_kernel::INITRD, import_kernel::MODULES],
        )?;
        Ok(Self {
            initrd: r.string(import_kernel::INITRD)?,
            modules: r.string(import_kernel::MODULES)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(
                import_kernel::INITRD,
                self.initrd.as_deref().map(Variant::from),
            )
            .put(
                import_kernel::MODULES,
                self.modules.as_deref().map(Variant::from),
            )
            .0
    }
}

/// `Manager.ImportKernelFd` options (descriptors).
#[derive(Debug, Default)]
pub struct ImportKernelFd {
    /// [`import_kernel_fd::INITRD`].
    pub initrd: Option<File>,
    /// [`import_kernel_fd::MODULES`].
    pub modules: Option<File>,
}

impl ImportKernelFd {
    /// Read what arrived (the daemon keeps its own copies of the
    /// descriptors).
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "ImportKernelFd",
            dict,
            &[import_kernel_fd::INITRD, import_kernel_fd::MODULES],
        )?;
        Ok(Self {
            initrd: r.file(import_kernel_fd::INITRD)?,
            modules: r.file(import_kernel_fd::MODULES)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .file(import_kernel_fd::INITRD, self.initrd.as_ref())
            .file(import_kernel_fd::MODULES, self.modules.as_ref())
            .0
    }
}

/// `Manager.ImportImageFd` options.
#[derive(Debug, Default)]
pub struct ImportImageFd {
    /// [`import_image_fd::WORK_SEED`].
    pub work_seed: Option<File>,
    /// [`import_image_fd::SERVICES`].
    pub services: Vec<String>,
    /// [`import_image_fd::INIT`].
    pub init: Option<String>,
}

impl ImportImageFd {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "ImportImageFd",
            dict,
            &[
                import_image_fd::WORK_SEED,
                import_image_fd::SERVICES,
                import_image_fd::INIT,
            ],
        )?;
        Ok(Self {
            work_seed: r.file(import_image_fd::WORK_SEED)?,
            services: r.strings(import_image_fd::SERVICES)?,
            init: r.string(import_image_fd::INIT)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .file(import_image_fd::WORK_SEED, self.work_seed.as_ref())
            .strings(import_image_fd::SERVICES, &self.services)
            .put(
                import_image_fd::INIT,
                self.init.as_deref().map(Variant::from),
            )
            .0
    }
}

/// `Manager.RegisterImage` options (root's host paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterImage {
    /// [`register_image::WORK_SEED`].
    pub work_seed: Option<String>,
    /// [`register_image::SERVICES`].
    pub services: Vec<String>,
    /// [`register_image::INIT`].
    pub init: Option<String>,
}

impl RegisterImage {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "RegisterImage",
            dict,
            &[
                register_image::WORK_SEED,
                register_image::SERVICES,
                register_image::INIT,
            ],
        )?;
        Ok(Self {
            work_seed: r.string(register_image::WORK_SEED)?,
            services: r.strings(register_image::SERVICES)?,
            init: r.string(register_image::INIT)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(
                register_image::WORK_SEED,
                self.work_seed.as_deref().map(Variant::from),
            )
            .strings(register_image::SERVICES, &self.services)
            .put(
                register_image::INIT,
                self.init.as_deref().map(Variant::from),
            )
            .0
    }
}

/// `Manager.CreateVM` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVm {
    /// [`create_vm::VCPUS`]; the configured default when absent.
    pub vcpus: Option<u32>,
    /// [`create_vm::MEMORY_MIB`].
    pub memory_mib: Option<u32>,
    /// [`create_vm::DISK_BYTES`].
    pub disk_bytes: Option<u64>,
    /// [`create_vm::NAT`].
    pub nat: Option<bool>,
    /// [`create_vm::PEERS`].
    pub peers: Option<bool>,
    /// [`create_vm::AUTOSTART`].
    pub autostart: Option<bool>,
    /// [`create_vm::SSH_KEYS`].
    pub ssh_keys: Vec<String>,
    /// [`create_vm::START`] (default true).
    pub start: bool,
    /// [`create_vm::SETUP`].
    pub setup: Option<Vec<u8>>,
    /// [`create_vm::MOUNTS`].
    pub mounts: Vec<Mount>,
    /// [`create_vm::COLD_BOOT`].
    pub cold_boot: bool,
}

impl Default for CreateVm {
    fn default() -> Self {
        Self {
            vcpus: None,
            memory_mib: None,
            disk_bytes: None,
            nat: None,
            peers: None,
            autostart: None,
            ssh_keys: Vec::new(),
            start: true,
            setup: None,
            mounts: Vec::new(),
            cold_boot: false,
        }
    }
}

impl CreateVm {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "CreateVM",
            dict,
            &[
                create_vm::VCPUS,
                create_vm::MEMORY_MIB,
                create_vm::DISK_BYTES,
                create_vm::NAT,
                create_vm::PEERS,
                create_vm::AUTOSTART,
                create_vm::SSH_KEYS,
                create_vm::START,
                create_vm::SETUP,
                create_vm::MOUNTS,
                create_vm::COLD_BOOT,
            ],
        )?;
        Ok(Self {
            vcpus: r.u32(create_vm::VCPUS)?,
            memory_mib: r.u32(create_vm::MEMORY_MIB)?,
            disk_bytes: r.u64(create_vm::DISK_BYTES)?,
            nat: r.bool(create_vm::NAT)?,
            peers: r.bool(create_vm::PEERS)?,
            autostart: r.bool(create_vm::AUTOSTART)?,
            ssh_keys: r.strings(create_vm::SSH_KEYS)?,
            start: r.bool(create_vm::START)?.unwrap_or(true),
            setup: r.bytes(create_vm::SETUP)?,
            mounts: r.mounts(create_vm::MOUNTS)?.unwrap_or_default(),
            cold_boot: r.bool(create_vm::COLD_BOOT)?.unwrap_or(false),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .put(create_vm::VCPUS, self.vcpus.map(Variant::from))
            .put(create_vm::MEMORY_MIB, self.memory_mib.map(Variant::from))
            .put(create_vm::DISK_BYTES, self.disk_bytes.map(Variant::from))
            .put(create_vm::NAT, self.nat.map(Variant::from))
            .put(create_vm::PEERS, self.peers.map(Variant::from))
            .put(create_vm::AUTOSTART, self.autostart.map(Variant::from))
            .strings(create_vm::SSH_KEYS, &self.ssh_keys)
            .put(
                create_vm::START,
                (!self.start).then(|| Variant::from(false)),
            )
            .put(create_vm::SETUP, self.setup.as_deref().map(Variant::from))
            .mounts(
                create_vm::MOUNTS,
                (!self.mounts.is_empty()).then_some(self.mounts.as_slice()),
            )
            .put(
                create_vm::COLD_BOOT,
                self.cold_boot.then(|| Variant::from(true)),
            )
            .0
    }
}

/// `VM.Exec` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exec {
    /// [`exec::ENV`].
    pub env: Vec<String>,
    /// [`exec::WORKDIR`].
    pub workdir: Option<String>,
    /// [`exec::USER`].
    pub user: Option<String>,
    /// [`exec::TTY`].
    pub tty: bool,
    /// [`exec::ROWS`].
    pub rows: Option<u32>,
    /// [`exec::COLS`].
    pub cols: Option<u32>,
    /// [`exec::TERM`].
    pub term: Option<String>,
}

impl Exec {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "Exec",
            dict,
            &[
                exec::ENV,
                exec::WORKDIR,
                exec::USER,
                exec::TTY,
                exec::ROWS,
                exec::COLS,
                exec::TERM,
            ],
        )?;
        Ok(Self {
            env: r.strings(exec::ENV)?,
            workdir: r.string(exec::WORKDIR)?,
            user: r.string(exec::USER)?,
            tty: r.bool(exec::TTY)?.unwrap_or(false),
            rows: r.u32(exec::ROWS)?,
            cols: r.u32(exec::COLS)?,
            term: r.string(exec::TERM)?,
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'_> {
        Writer::new()
            .strings(exec::ENV, &self.env)
            .put(exec::WORKDIR, self.workdir.as_deref().map(Variant::from))
            .put(exec::USER, self.user.as_deref().map(Variant::from))
            .put(exec::TTY, self.tty.then(|| Variant::from(true)))
            .put(exec::ROWS, self.rows.map(Variant::from))
            .put(exec::COLS, self.cols.map(Variant::from))
            .put(exec::TERM, self.term.as_deref().map(Variant::from))
            .0
    }
}

/// `VM.ConnectPort` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectPort {
    /// [`connect_port::EXPOSED`].
    pub exposed: bool,
}

impl ConnectPort {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new("ConnectPort", dict, &[connect_port::EXPOSED])?;
        Ok(Self {
            exposed: r.bool(connect_port::EXPOSED)?.unwrap_or(false),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'static> {
        Writer::new()
            .put(
                connect_port::EXPOSED,
                self.exposed.then(|| Variant::from(true)),
            )
            .0
    }
}

/// `VM.Clone` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneVm {
    /// [`clone_vm::START`].
    pub start: bool,
}

impl CloneVm {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new("Clone", dict, &[clone_vm::START])?;
        Ok(Self {
            start: r.bool(clone_vm::START)?.unwrap_or(false),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'static> {
        Writer::new()
            .put(clone_vm::START, self.start.then(|| Variant::from(true)))
            .0
    }
}

/// `VM.Fork` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkVm {
    /// [`fork_vm::COUNT`].
    pub count: u32,
}

impl Default for ForkVm {
    fn default() -> Self {
        Self { count: 1 }
    }
}

impl ForkVm {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new("Fork", dict, &[fork_vm::COUNT])?;
        Ok(Self {
            count: r.u32(fork_vm::COUNT)?.unwrap_or(1),
        })
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'static> {
        Writer::new()
            .put(
                fork_vm::COUNT,
                (self.count != 1).then(|| Variant::from(self.count)),
            )
            .0
    }
}

/// `VM.Set` changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetVm {
    /// [`set_vm::VCPUS`].
    pub vcpus: Option<u32>,
    /// [`set_vm::MEMORY_MIB`].
    pub memory_mib: Option<u32>,
    /// [`set_vm::DISK_BYTES`].
    pub disk_bytes: Option<u64>,
    /// [`set_vm::NAT`].
    pub nat: Option<bool>,
    /// [`set_vm::PEERS`].
    pub peers: Option<bool>,
    /// [`set_vm::AUTOSTART`].
    pub autostart: Option<bool>,
    /// [`set_vm::MOUNTS`]: the whole new list (empty: none).
    pub mounts: Option<Vec<Mount>>,
}

impl SetVm {
    /// Read what arrived.
    pub fn parse(dict: &Dict) -> Result<Self, OptionError> {
        let r = Reader::new(
            "Set",
            dict,
            &[
                set_vm::VCPUS,
                set_vm::MEMORY_MIB,
                set_vm::DISK_BYTES,
                set_vm::NAT,
                set_vm::PEERS,
                set_vm::AUTOSTART,
                set_vm::MOUNTS,
            ],
        )?;
        Ok(Self {
            vcpus: r.u32(set_vm::VCPUS)?,
            memory_mib: r.u32(set_vm::MEMORY_MIB)?,
            disk_bytes: r.u64(set_vm::DISK_BYTES)?,
            nat: r.bool(set_vm::NAT)?,
            peers: r.bool(set_vm::PEERS)?,
            autostart: r.bool(set_vm::AUTOSTART)?,
            mounts: r.mounts(set_vm::MOUNTS)?,
        })
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// What to send.
    pub fn to_dict(&self) -> DictOut<'static> {
        Writer::new()
            .mounts(set_vm::MOUNTS, self.mounts.as_deref())
            .put(set_vm::VCPUS, self.vcpus.map(Variant::from))
            .put(set_vm::MEMORY_MIB, self.memory_mib.map(Variant::from))
            .put(set_vm::DISK_BYTES, self.disk_bytes.map(Variant::from))
            .put(set_vm::NAT, self.nat.map(Variant::from))
            .put(set_vm::PEERS, self.peers.map(Variant::from))
            .put(set_vm::AUTOSTART, self.autostart.map(Variant::from))
            .0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the daemon receives for `out`.
    fn received(out: &DictOut<'_>) -> Dict {
        out.iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    OwnedVariant::try_from(v.try_clone().expect("clone")).expect("owned"),
                )
            })
            .collect()
    }

    fn dict(pairs: &[(&str, Variant<'static>)]) -> Dict {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    OwnedVariant::try_from(v.try_clone().expect("clone")).expect("owned"),
                )
            })
            .collect()
    }

    #[test]
    fn structs_survive_the_wire() {
        let create = CreateVm {
            vcpus: Some(2),
            memory_mib: Some(512),
            disk_bytes: Some(1 << 30),
            nat: Some(true),
            peers: Some(true),
            autostart: Some(true),
            ssh_keys: vec!["ssh-ed25519 AAAA me".into()],
            start: false,
            setup: Some(b"#!/bin/sh\necho hi\n".to_vec()),
            mounts: vec![Mount {
                source: "/home/me/src".into(),
                target: "/src".into(),
                read_only: true,
            }],
            cold_boot: true,
        };
        assert_eq!(CreateVm::parse(&received(&create.to_dict())), Ok(create));
        assert_eq!(
            CreateVm::parse(&received(&CreateVm::default().to_dict())),
            Ok(CreateVm::default())
        );
        let fork = ForkVm { count: 3 };
        assert_eq!(ForkVm::parse(&received(&fork.to_dict())), Ok(fork));
        assert_eq!(
            ForkVm::parse(&received(&ForkVm::default().to_dict())),
            Ok(ForkVm::default())
        );
        let set = SetVm {
            nat: Some(false),
            peers: Some(true),
            autostart: Some(false),
            ..SetVm::default()
        };
        assert_eq!(SetVm::parse(&received(&set.to_dict())), Ok(set));
        // An empty list clears the folders; no key keeps them.
        let clear = SetVm {
            mounts: Some(Vec::new()),
            ..SetVm::default()
        };
        assert_eq!(SetVm::parse(&received(&clear.to_dict())), Ok(clear));
        let exec = Exec {
            env: vec!["A=b".into()],
            workdir: Some("/tmp".into()),
            user: Some("dev".into()),
            tty: true,
            rows: Some(24),
            cols: Some(80),
            term: Some("xterm".into()),
        };
        assert_eq!(Exec::parse(&received(&exec.to_dict())), Ok(exec));
        let port = ConnectPort { exposed: true };
        assert_eq!(ConnectPort::parse(&received(&port.to_dict())), Ok(port));
        let update = Update {
            check: true,
            channel: Some("https://releases.example/stable".into()),
            rollback: false,
        };
        assert_eq!(Update::parse(&received(&update.to_dict())), Ok(update));
        let pull = PullOci {
            name: Some("deb".into()),
            kernel: None,
            login: Some(("me".into(), "secret".into())),
        };
        assert_eq!(PullOci::parse(&received(&pull.to_dict())), Ok(pull.clone()));
        assert!(!format!("{pull:?}").contains("secret"));
        let register = RegisterImage {
            work_seed: Some("/srv/seed.ext4".into()),
            services: vec!["ssh:22".into()],
            init: None,
        };
        assert_eq!(
            RegisterImage::parse(&received(&register.to_dict())),
            Ok(register)
        );
        let maintain = Maintain { vacuum: true };
        assert_eq!(
            Maintain::parse(&received(&maintain.to_dict())),
            Ok(maintain)
        );
        let build = BuildKernel {
            from: Some("debian".into()),
            package: Some("linux-image-6.1.0-57-cloud-amd64".into()),
        };
        assert_eq!(BuildKernel::parse(&received(&build.to_dict())), Ok(build));
        let image = BuildImage {
            name: Some("dev".into()),
            kernel: Some("debian-bookworm".into()),
        };
        assert_eq!(BuildImage::parse(&received(&image.to_dict())), Ok(image));
        assert_eq!(
            BuildKernel::parse(&received(&BuildKernel::default().to_dict())),
            Ok(BuildKernel::default())
        );
    }

    #[test]
    fn descriptors_arrive_as_files() {
        use std::io::{Read, Write};
        let mut f = tempfile_in_tmp();
        f.write_all(b"initrd").expect("write");
        let sent = ImportKernelFd {
            initrd: Some(f),
            modules: None,
        };
        let got = ImportKernelFd::parse(&received(&sent.to_dict())).expect("parse");
        assert!(got.modules.is_none());
        let mut initrd = got.initrd.expect("initrd");
        use std::io::Seek;
        initrd.rewind().expect("rewind");
        let mut text = String::new();
        initrd.read_to_string(&mut text).expect("read");
        assert_eq!(text, "initrd");
        let e = ImportKernelFd::parse(&dict(&[(
            import_kernel_fd::INITRD,
            Variant::from("/boot/initrd"),
        )]))
        .expect_err("a path");
        assert!(e.to_string().contains("not a path"), "{e}");
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("banger-dbus-opt-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        std::fs::remove_file(&path).expect("unlink");
        f
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let e = Maintain::parse(&dict(&[("vacum", Variant::from(true))])).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown option vacum for Maintain; known options: vacuum"
        );
        let e = NoOptions::parse("PullKernel", &dict(&[("x", Variant::from(1u32))]))
            .expect_err("none taken");
        assert!(e.to_string().ends_with("it takes none"), "{e}");
        let e = Maintain::parse(&dict(&[("vacuum", Variant::from("yes"))])).expect_err("type");
        assert_eq!(e.to_string(), "option vacuum must be a boolean (b), not s");
        let e = CreateVm::parse(&dict(&[("vcpus", Variant::from(2u64))])).expect_err("type");
        assert!(e.to_string().contains("(u)"), "{e}");
        let e = Update::parse(&dict(&[("channel", Variant::from(""))])).expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = RegisterImage::parse(&dict(&[("services", Variant::from("ssh:22"))]))
            .expect_err("type");
        assert!(e.to_string().contains("(as)"), "{e}");
        let e = PullOci::parse(&dict(&[("username", Variant::from("me"))])).expect_err("pair");
        assert_eq!(
            e.to_string(),
            "PullImage: options \"username\" and \"password\" go together"
        );
    }
}
