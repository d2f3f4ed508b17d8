//! Kernel and image rows of the store.

use std::path::PathBuf;

use rusqlite::{OptionalExtension, Row, params};

use super::{Image, Kernel, Service};
use crate::store::{Store, StoreError};

fn opt_path(s: String) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn path_text(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn kernel_row(r: &Row<'_>) -> rusqlite::Result<Kernel> {
    Ok(Kernel {
        id: r.get("id")?,
        name: r.get("name")?,
        version: r.get("version")?,
        vmlinux: PathBuf::from(r.get::<_, String>("vmlinux")?),
        bzimage: opt_path(r.get("bzimage")?),
        initrd: opt_path(r.get("initrd")?),
        modules: opt_path(r.get("modules")?),
        sha256: r.get("sha256")?,
        size_bytes: r.get::<_, i64>("size_bytes")?.max(0) as u64,
        created_at: r.get("created_at")?,
        owner_uid: r.get("owner_uid")?,
    })
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    let services: String = r.get("services")?;
    let init: String = r.get("init")?;
    Ok(Image {
        id: r.get("id")?,
        name: r.get("name")?,
        managed: r.get::<_, i64>("managed")? == 1,
        rootfs: PathBuf::from(r.get::<_, String>("rootfs")?),
        rootfs_bytes: r.get::<_, i64>("rootfs_bytes")?.max(0) as u64,
        work_seed: opt_path(r.get("work_seed")?),
        work_seed_sha256: r.get("work_seed_sha256")?,
        kernel_id: r.get("kernel_id")?,
        services: serde_json::from_str::<Vec<Service>>(&services).unwrap_or_default(),
        init: (!init.is_empty()).then_some(init),
        created_at: r.get("created_at")?,
        owner_uid: r.get("owner_uid")?,
    })
}

fn constraint_message(e: &StoreError) -> Option<String> {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Some(msg.clone().unwrap_or_default())
        }
        _ => None,
    }
}

/// Whether an error is a UNIQUE constraint failure (a name taken).
pub fn is_unique_violation(e: &StoreError) -> bool {
    constraint_message(e).is_some_and(|m| m.starts_with("UNIQUE"))
}

/// Whether an error is a FOREIGN KEY constraint failure (still in use).
pub fn is_fk_violation(e: &StoreError) -> bool {
    constraint_message(e).is_some_and(|m| m.starts_with("FOREIGN KEY"))
}

impl Store {
    /// Record a kernel.
    pub fn insert_kernel(&self, k: &Kernel) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO kernels (id, name, version, vmlinux, bzimage, initrd, modules,
                                  sha256, size_bytes, created_at, owner_uid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                k.id,
                k.name,
                k.version,
                k.vmlinux.to_string_lossy(),
                path_text(&k.bzimage),
                path_text(&k.initrd),
                path_text(&k.modules),
                k.sha256,
                i64::try_from(k.size_bytes).unwrap_or(i64::MAX),
                k.created_at,
                k.owner_uid
            ],
        )?;
        Ok(())
    }

    /// All kernels, by name.
    pub fn kernels(&self) -> Result<Vec<Kernel>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM kernels ORDER BY name")?;
        let rows = st.query_map([], kernel_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The kernel with id `id`.
    pub fn kernel_by_id(&self, id: &str) -> Result<Option<Kernel>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM kernels WHERE id = ?1", [id], kernel_row)
            .optional()?)
    }

    /// The kernel named `name`.
    pub fn kernel_by_name(&self, name: &str) -> Result<Option<Kernel>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM kernels WHERE name = ?1", [name], kernel_row)
            .optional()?)
    }

    /// Delete kernel `id`; fails with a foreign-key error while images use it.
    pub fn delete_kernel(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM kernels WHERE id = ?1", [id])?
            == 1)
    }

    /// Record an image.
    pub fn insert_image(&self, i: &Image) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO images (id, name, managed, rootfs, rootfs_bytes, work_seed,
                                 work_seed_sha256, kernel_id, services, init, created_at, owner_uid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                i.id,
                i.name,
                i64::from(i.managed),
                i.rootfs.to_string_lossy(),
                i64::try_from(i.rootfs_bytes).unwrap_or(i64::MAX),
                path_text(&i.work_seed),
                i.work_seed_sha256,
                i.kernel_id,
                serde_json::to_string(&i.services).unwrap_or_else(|_| "[]".into()),
                i.init.clone().unwrap_or_default(),
                i.created_at,
                i.owner_uid
            ],
        )?;
        Ok(())
    }

    /// Replace the file fields of image `i.id` (after promote or a lazy
    /// work-seed).
    pub fn update_image_files(&self, i: &Image) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE images SET managed = ?2, rootfs = ?3, rootfs_bytes = ?4, work_seed = ?5,
                               work_seed_sha256 = ?6
             WHERE id = ?1",
            params![
                i.id,
                i64::from(i.managed),
                i.rootfs.to_string_lossy(),
                i64::try_from(i.rootfs_bytes).unwrap_or(i64::MAX),
                path_text(&i.work_seed),
                i.work_seed_sha256
            ],
        )?;
        Ok(())
    }

    /// All images, by name.
    pub fn images(&self) -> Result<Vec<Image>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM images ORDER BY name")?;
        let rows = st.query_map([], image_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The image with id `id`.
    pub fn image_by_id(&self, id: &str) -> Result<Option<Image>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM images WHERE id = ?1", [id], image_row)
            .optional()?)
    }

    /// The image named `name`.
    pub fn image_by_name(&self, name: &str) -> Result<Option<Image>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM images WHERE name = ?1", [name], image_row)
            .optional()?)
    }

    /// Names of the images that boot kernel `id`.
    pub fn images_using_kernel(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT name FROM images WHERE kernel_id = ?1 ORDER BY name")?;
        let rows = st.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Delete image `id`.
    pub fn delete_image(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM images WHERE id = ?1", [id])?
            == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(id: &str, name: &str) -> Kernel {
        Kernel {
            id: id.into(),
            name: name.into(),
            version: "6.1".into(),
            vmlinux: "/s/k/vmlinux".into(),
            bzimage: None,
            initrd: Some("/s/k/initrd.img".into()),
            modules: None,
            sha256: "ab".into(),
            size_bytes: 10,
            created_at: 1,
            owner_uid: 0,
        }
    }

    fn image(id: &str, name: &str, kernel_id: &str) -> Image {
        Image {
            id: id.into(),
            name: name.into(),
            managed: false,
            rootfs: "/x/rootfs.ext4".into(),
            rootfs_bytes: 100,
            work_seed: None,
            work_seed_sha256: String::new(),
            kernel_id: kernel_id.into(),
            services: vec![Service {
                name: "ssh".into(),
                port: 22,
            }],
            init: Some("/sbin/banger-init".into()),
            created_at: 2,
            owner_uid: 1000,
        }
    }

    #[test]
    fn kernels_and_images_round_trip_with_constraints() {
        let store = Store::open_in_memory().expect("store");
        let k = kernel("k1", "test");
        store.insert_kernel(&k).expect("insert");
        assert_eq!(store.kernel_by_name("test").expect("q"), Some(k.clone()));
        assert_eq!(store.kernel_by_id("k1").expect("q"), Some(k.clone()));
        // Never one for the other.
        assert_eq!(store.kernel_by_name("k1").expect("q"), None);
        assert_eq!(store.kernel_by_id("test").expect("q"), None);
        let dup = store.insert_kernel(&kernel("k2", "test")).expect_err("dup");
        assert!(is_unique_violation(&dup), "{dup}");

        let mut i = image("i1", "tiny", "k1");
        store.insert_image(&i).expect("insert");
        assert_eq!(store.image_by_name("tiny").expect("q"), Some(i.clone()));
        assert_eq!(store.image_by_id("i1").expect("q"), Some(i.clone()));
        assert_eq!(store.image_by_name("i1").expect("q"), None);
        let orphan = store
            .insert_image(&image("i2", "x", "nokernel"))
            .expect_err("fk");
        assert!(is_fk_violation(&orphan), "{orphan}");
        assert_eq!(store.images_using_kernel("k1").expect("q"), ["tiny"]);
        let busy = store.delete_kernel("k1").expect_err("in use");
        assert!(is_fk_violation(&busy), "{busy}");

        i.managed = true;
        i.work_seed = Some("/s/i/work-seed.ext4".into());
        i.work_seed_sha256 = "cd".into();
        store.update_image_files(&i).expect("update");
        assert_eq!(store.images().expect("q"), vec![i]);
        assert!(store.delete_image("i1").expect("delete"));
        assert!(store.delete_kernel("k1").expect("delete"));
        assert!(store.kernels().expect("q").is_empty());
    }
}
