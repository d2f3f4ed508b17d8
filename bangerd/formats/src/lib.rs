//! `banger-formats`: the file formats banger reads from users, registries
//! and catalogs, parsed without knowing the daemon: catalog bundles
//! ([`bundle`]), OCI layers applied onto a root ([`layers`]), sparse and
//! checked copies and module trees ([`files`]), ext4 images written with
//! `mkfs.ext4 -d` ([`ext4`]), and the e2fsprogs tools run on such data
//! through [`tool::Tools`].

pub mod bundle;
pub mod ext4;
pub mod files;
pub mod initramfs;
pub mod layers;
pub mod tool;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
