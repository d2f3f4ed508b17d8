//! `banger kernel ...` and `banger image ...`: resolving references,
//! and what is printed.
//!
//! JSON shapes (one object or array on stdout):
//! - kernel: `{"id", "name", "version", "vmlinux", "bzimage", "initrd",
//!   "modules", "sha256", "size_bytes", "created_at_usec", "owner_uid",
//!   "path"}`; `kernel list` prints an array of them.
//! - image: `{"id", "name", "managed", "rootfs", "rootfs_bytes",
//!   "work_seed", "work_seed_sha256", "kernel" (object path),
//!   "kernel_name", "services": [{"name", "port"}], "init",
//!   "created_at_usec", "owner_uid", "path"}`.
//! - `kernel import` / `image promote`: `{"job": <job report>, "kernel"|"image": ...}`.
//! - `kernel delete` / `image delete`: `[{"ref", "deleted", "error"}]`.
//! - `kernel list --available` / `image list --available`: `{"catalog",
//!   "serial", "source" ("built-in" or "fetched"), "entries": [{"name",
//!   "version", "arch", "description", "url", "size_bytes", "kernel"
//!   (images; null for kernels), "min_banger", "installed", "usable"}]}`.

use serde_json::{Value, json};

use crate::client::{Catalog, ImageInfo, KernelInfo};
use crate::exit::{Failure, Kind};

/// Something with a name and an id.
pub trait Named {
    /// Its name.
    fn name(&self) -> &str;
    /// Its id.
    fn id(&self) -> &str;
    /// Who owns it.
    fn owner_uid(&self) -> u32;
}

impl Named for KernelInfo {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn owner_uid(&self) -> u32 {
        self.owner_uid
    }
}

impl Named for ImageInfo {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn owner_uid(&self) -> u32 {
        self.owner_uid
    }
}

/// Find `reference` among `items`: the one item whose name is
/// `reference` or whose id is or starts with it. More than one is an
/// error that lists them (with their owners), never a silent pick: a name
/// and another item's id prefix, or two items' ids. `what` is "kernel",
/// "image" or "vm".
pub fn resolve<'a, T: Named>(
    items: &'a [T],
    reference: &str,
    what: &str,
) -> Result<&'a T, Failure> {
    let hits: Vec<&T> = if reference.is_empty() {
        Vec::new()
    } else {
        items
            .iter()
            .filter(|i| i.name() == reference || i.id().starts_with(reference))
            .collect()
    };
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(Failure::new(
            Kind::NotFound,
            format!("no {what} named {reference:?}; see `banger {what} list`"),
        )),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|i| format!("{} (id {}, uid {})", i.name(), i.id(), i.owner_uid()))
                .collect();
            Err(Failure::new(
                Kind::InvalidArgument,
                format!(
                    "{reference:?} is ambiguous: it matches {what}s {}; give the full id",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// A size for humans: `1.5 GiB`, `20 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v >= 10.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A date for humans from µs since the epoch (UTC).
pub fn human_time(usec: u64) -> String {
    let secs = usec / 1_000_000;
    let days = secs / 86_400;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}")
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Columns aligned under `header`, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(header.to_vec())];
    lines.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    lines.join("\n")
}

/// JSON of a kernel.
pub fn kernel_json(k: &KernelInfo) -> Value {
    json!({
        "id": k.id, "name": k.name, "version": k.version, "vmlinux": k.vmlinux,
        "bzimage": k.bzimage, "initrd": k.initrd, "modules": k.modules, "sha256": k.sha256,
        "size_bytes": k.size_bytes, "created_at_usec": k.created_at_usec,
        "owner_uid": k.owner_uid, "path": k.path,
    })
}

fn kernel_name<'a>(catalog: &'a Catalog, path: &str) -> &'a str {
    catalog
        .kernels
        .iter()
        .find(|k| k.path == path)
        .map_or("?", |k| k.name.as_str())
}

/// JSON of an image.
pub fn image_json(i: &ImageInfo, catalog: &Catalog) -> Value {
    let services: Vec<Value> = i
        .services
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port}))
        .collect();
    json!({
        "id": i.id, "name": i.name, "managed": i.managed, "rootfs": i.rootfs,
        "rootfs_bytes": i.rootfs_bytes, "work_seed": i.work_seed,
        "work_seed_sha256": i.work_seed_sha256, "kernel": i.kernel,
        "kernel_name": kernel_name(catalog, &i.kernel), "services": services, "init": i.init,
        "created_at_usec": i.created_at_usec, "owner_uid": i.owner_uid, "path": i.path,
        "templates": i.templates.iter().map(|(vcpus, memory_mib, disk_bytes, state_bytes, made)| json!({
            "vcpus": vcpus, "memory_mib": memory_mib, "disk_bytes": disk_bytes,
            "state_bytes": state_bytes, "made_at_usec": made,
        })).collect::<Vec<_>>(),
    })
}

/// `kernel list` for humans.
pub fn kernels_table(kernels: &[KernelInfo]) -> String {
    if kernels.is_empty() {
        return "no kernels; import one with `banger kernel import --name NAME --kernel PATH`"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = kernels
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                short(&k.id).to_owned(),
                if k.version.is_empty() {
                    "-".into()
                } else {
                    k.version.clone()
                },
                human_bytes(k.size_bytes),
                human_time(k.created_at_usec),
            ]
        })
        .collect();
    table(&["NAME", "ID", "VERSION", "SIZE", "CREATED"], &rows)
}

/// Where a catalog came from, as listings say it.
fn catalog_source(fetched: bool) -> &'static str {
    if fetched { "fetched" } else { "built-in" }
}

/// `kernel list --available --json` / `image list --available --json`.
pub fn available_json(
    kind: &str,
    serial: u64,
    fetched: bool,
    entries: &[banger_dbus::CatalogEntry],
) -> Value {
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "version": e.version,
                "arch": e.arch,
                "description": e.description,
                "url": e.url,
                "size_bytes": e.size,
                "kernel": (!e.kernel.is_empty()).then_some(&e.kernel),
                "min_banger": e.min_banger,
                "installed": e.installed,
                "usable": e.usable,
            })
        })
        .collect();
    json!({
        "catalog": kind,
        "serial": serial,
        "source": catalog_source(fetched),
        "entries": entries,
    })
}

/// `kernel list --available` / `image list --available` for humans.
pub fn available_table(
    kind: &str,
    serial: u64,
    fetched: bool,
    entries: &[banger_dbus::CatalogEntry],
) -> String {
    let head = format!(
        "{kind} catalog serial {serial} ({})",
        catalog_source(fetched)
    );
    if entries.is_empty() {
        return format!(
            "{head}: no entries; `banger update --check` fetches a newer catalog from the release channel"
        );
    }
    let images = kind == "images";
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let mut row = vec![e.name.clone(), e.version.clone(), e.arch.clone()];
            if images {
                row.push(e.kernel.clone());
            }
            row.push(human_bytes(e.size));
            row.push(
                match (e.installed, e.usable) {
                    (true, _) => "installed",
                    (false, true) => "-",
                    (false, false) => "needs a newer banger",
                }
                .to_owned(),
            );
            row.push(e.description.clone());
            row
        })
        .collect();
    let header: &[&str] = if images {
        &[
            "NAME",
            "VERSION",
            "ARCH",
            "KERNEL",
            "SIZE",
            "STATE",
            "DESCRIPTION",
        ]
    } else {
        &["NAME", "VERSION", "ARCH", "SIZE", "STATE", "DESCRIPTION"]
    };
    format!("{head}\n{}", table(header, &rows))
}

/// `kernel show` for humans.
pub fn kernel_human(k: &KernelInfo) -> String {
    let or_none = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    [
        format!("name:     {}", k.name),
        format!("id:       {}", k.id),
        format!("version:  {}", or_none(&k.version)),
        format!("vmlinux:  {}", k.vmlinux),
        format!("bzImage:  {}", or_none(&k.bzimage)),
        format!("initrd:   {}", or_none(&k.initrd)),
        format!("modules:  {}", or_none(&k.modules)),
        format!("sha256:   {}", k.sha256),
        format!("size:     {}", human_bytes(k.size_bytes)),
        format!(
            "created:  {} UTC by uid {}",
            human_time(k.created_at_usec),
            k.owner_uid
        ),
    ]
    .join("\n")
}

/// `image list` for humans.
pub fn images_table(catalog: &Catalog) -> String {
    if catalog.images.is_empty() {
        return "no images; register one with `banger image register --name NAME --rootfs PATH --kernel KERNEL`"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = catalog
        .images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                short(&i.id).to_owned(),
                if i.managed { "yes".into() } else { "no".into() },
                kernel_name(catalog, &i.kernel).to_owned(),
                human_bytes(i.rootfs_bytes),
            ]
        })
        .collect();
    table(&["NAME", "ID", "MANAGED", "KERNEL", "SIZE"], &rows)
}

/// `image show` for humans.
pub fn image_human(i: &ImageInfo, catalog: &Catalog) -> String {
    let or_none = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let services = if i.services.is_empty() {
        "-".to_owned()
    } else {
        i.services
            .iter()
            .map(|(n, p)| format!("{n}:{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    [
        format!("name:       {}", i.name),
        format!("id:         {}", i.id),
        format!(
            "managed:    {}",
            if i.managed {
                "yes"
            } else {
                "no (banger points at your files)"
            }
        ),
        format!("kernel:     {}", kernel_name(catalog, &i.kernel)),
        format!("rootfs:     {} ({})", i.rootfs, human_bytes(i.rootfs_bytes)),
        format!(
            "work-seed:  {}",
            if i.work_seed.is_empty() {
                "- (made from the rootfs on first use)".to_owned()
            } else {
                i.work_seed.clone()
            }
        ),
        format!("seed sha256: {}", or_none(&i.work_seed_sha256)),
        format!("services:   {services}"),
        format!("init:       {}", or_none(&i.init)),
        format!(
            "created:    {} UTC by uid {}",
            human_time(i.created_at_usec),
            i.owner_uid
        ),
        format!("templates:  {}", templates_line(&i.templates)),
    ]
    .join("\n")
}

/// An image's templates for humans: each shape and its saved size.
fn templates_line(templates: &[(u32, u32, u64, u64, i64)]) -> String {
    if templates.is_empty() {
        return "- (made after a create boots; later creates of that shape restore it)".to_owned();
    }
    templates
        .iter()
        .map(|(vcpus, memory, disk, state, _)| {
            format!(
                "{vcpus} vCPU, {} memory, {} disk: ready, {} saved",
                human_bytes(u64::from(*memory) << 20),
                human_bytes(*disk),
                human_bytes(*state)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str, id: &str) -> KernelInfo {
        KernelInfo {
            path: format!("/org/banger/Manager/kernel/{id}"),
            id: id.into(),
            name: name.into(),
            version: "6.1.0-56-cloud-amd64".into(),
            vmlinux: "/var/lib/banger/kernels/x/vmlinux".into(),
            bzimage: String::new(),
            initrd: String::new(),
            modules: String::new(),
            sha256: "ab".into(),
            size_bytes: 53_243_444,
            created_at_usec: 1_795_000_000_000_000,
            owner_uid: 0,
        }
    }

    #[test]
    fn references_resolve_by_name_id_and_unique_prefix() {
        let ks = vec![
            kernel("a", "0123aaaa"),
            kernel("b", "0123bbbb"),
            kernel("c", "ffff0000"),
        ];
        assert_eq!(resolve(&ks, "b", "kernel").expect("name").id, "0123bbbb");
        assert_eq!(resolve(&ks, "ffff0000", "kernel").expect("id").name, "c");
        assert_eq!(resolve(&ks, "ff", "kernel").expect("prefix").name, "c");
        let e = resolve(&ks, "0123", "kernel").expect_err("ambiguous");
        assert_eq!(e.kind(), Kind::InvalidArgument);
        assert!(
            e.to_string().contains("a (id 0123aaaa, uid 0)")
                && e.to_string().contains("b (id 0123bbbb, uid 0)"),
            "{e}"
        );
        let e = resolve(&ks, "zz", "kernel").expect_err("none");
        assert_eq!(e.kind(), Kind::NotFound);
        assert!(e.to_string().contains("banger kernel list"), "{e}");
        assert_eq!(
            resolve(&ks, "", "kernel").expect_err("empty").kind(),
            Kind::NotFound
        );
    }

    /// A name (of an older daemon, before all-hex names were refused) that
    /// is also another owner's id prefix or id: never a silent pick.
    #[test]
    fn a_name_that_is_another_items_id_or_prefix_is_ambiguous() {
        let mut mine = kernel("mine", "0123aaaa00000000");
        mine.owner_uid = 1000;
        let mut theirs = kernel("0123aaaa00000000", "ffff000000000000");
        theirs.owner_uid = 1001;
        let mut prefixy = kernel("0123", "eeee000000000000");
        prefixy.owner_uid = 1001;
        let ks = vec![mine, theirs, prefixy];
        for reference in ["0123aaaa00000000", "0123"] {
            let e = resolve(&ks, reference, "kernel").expect_err(reference);
            assert_eq!(e.kind(), Kind::InvalidArgument);
            assert!(
                e.to_string().contains("ambiguous")
                    && e.to_string().contains("uid 1000")
                    && e.to_string().contains("uid 1001"),
                "{e}"
            );
        }
        assert_eq!(
            resolve(&ks, "mine", "kernel").expect("name").owner_uid,
            1000
        );
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(53_243_444), "51 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_time(0), "1970-01-01 00:00");
        assert_eq!(human_time(1_795_000_000_000_000), "2026-11-18 11:06");
    }

    #[test]
    fn tables_align_and_shorten_ids() {
        let ks = vec![
            kernel("test-kernel", "0123456789abcdef"),
            kernel("x", "fedcba9876543210"),
        ];
        let t = kernels_table(&ks);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME         ID            VERSION               SIZE    CREATED"
        );
        assert!(
            lines[1]
                .starts_with("test-kernel  0123456789ab  6.1.0-56-cloud-amd64  51 MiB  2026-11-18"),
            "{t}"
        );
        assert!(kernels_table(&[]).contains("banger kernel import"));
        let catalog = Catalog {
            vms: Vec::new(),
            kernels: ks.clone(),
            images: vec![ImageInfo {
                path: "/org/banger/Manager/image/11".into(),
                id: "11".into(),
                name: "tiny".into(),
                managed: true,
                rootfs: "/r".into(),
                rootfs_bytes: 50 << 20,
                work_seed: String::new(),
                work_seed_sha256: String::new(),
                kernel: ks[0].path.clone(),
                services: vec![("ssh".into(), 22)],
                init: "/sbin/banger-init".into(),
                created_at_usec: 0,
                owner_uid: 1000,
                templates: vec![(1, 256, 128 << 20, 93 << 20, 0)],
            }],
        };
        let t = images_table(&catalog);
        assert!(
            t.lines()
                .nth(1)
                .expect("row")
                .starts_with("tiny  11  yes      test-kernel  50 MiB"),
            "{t}"
        );
        let j = image_json(&catalog.images[0], &catalog);
        assert_eq!(j["kernel_name"], "test-kernel");
        assert_eq!(j["services"][0]["port"], 22);
        assert!(image_human(&catalog.images[0], &catalog).contains("services:   ssh:22"));
    }
}
