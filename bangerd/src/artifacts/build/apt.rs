//! apt as a kernel build uses it: the host's sources, keys, mirrors and
//! proxies (its `/etc/apt`), with banger's own package lists and download
//! cache under the cache directory, so a build never changes what the
//! host's apt knows and never installs a package. apt's update hooks are
//! cleared in banger's configuration file (they belong to the host's own
//! lists), and downloads run in apt's `_apt` sandbox where that user
//! exists. apt runs as a step (a transient unit under systemd): switching
//! to `_apt` takes `CAP_SETUID` and `CAP_SETGID`, which bangerd's own unit
//! does without.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::steps::{self, Step, StepRunner};
use crate::error::{Error, Result};

/// One package file apt would download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Where it comes from.
    pub url: String,
    /// Its file name.
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256 (hex), from the signed archive indexes.
    pub sha256: String,
}

/// apt with banger's lists and cache under one directory, run by a
/// step runner.
#[derive(Debug, Clone)]
pub struct Apt {
    dir: PathBuf,
    steps: Arc<dyn StepRunner>,
}

/// The archive's name for a package is plain: no option can hide in it.
pub fn valid_package(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

impl Apt {
    /// apt with its state under `dir` (made on first use), run by
    /// `steps`.
    pub fn new(dir: PathBuf, steps: Arc<dyn StepRunner>) -> Self {
        Self { dir, steps }
    }

    /// Where downloaded packages are kept between builds.
    pub fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// Make the directories and banger's configuration file; returns its
    /// path.
    fn prepare(&self) -> Result<PathBuf> {
        let lists = self.dir.join("lists");
        let cache = self.dir.join("cache");
        for d in [
            lists.join("partial"),
            cache.join("archives/partial"),
            self.debs(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::failed(format!("cannot make {}: {e}", d.display())))?;
        }
        let sandbox = match nix::unistd::User::from_name("_apt") {
            Ok(Some(user)) => {
                // The sandboxed download writes into this directory.
                nix::unistd::chown(&self.debs(), Some(user.uid), None).map_err(|e| {
                    Error::failed(format!(
                        "cannot hand {} to _apt: {e}",
                        self.debs().display()
                    ))
                })?;
                String::new()
            }
            _ => "APT::Sandbox::User \"root\";\n".to_owned(),
        };
        let quote = |p: &Path| p.to_string_lossy().replace('"', "");
        let conf = format!(
            "// Written by bangerd for kernel builds; see apt.conf(5).\n\
             Dir::State::Lists \"{}\";\n\
             Dir::Cache \"{}\";\n\
             Acquire::Languages \"none\";\n\
             {sandbox}\
             #clear APT::Update::Pre-Invoke;\n\
             #clear APT::Update::Post-Invoke;\n\
             #clear APT::Update::Post-Invoke-Success;\n\
             #clear DPkg::Pre-Invoke;\n\
             #clear DPkg::Post-Invoke;\n",
            quote(&lists),
            quote(&cache),
        );
        let path = self.dir.join("banger.conf");
        std::fs::write(&path, conf)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Run `program` (apt-get or apt-cache) with banger's configuration,
    /// in `cwd` when given (`env --chdir`: a step starts in `/`); its
    /// standard output.
    async fn run(&self, program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String> {
        let conf = self.prepare()?;
        let missing = |e: Error| {
            Error::unavailable(format!("{}; kernel builds need apt (Debian)", e.message))
        };
        let apt = steps::program(program).map_err(missing)?;
        let mut argv: Vec<String> = cwd
            .map(|cwd| format!("--chdir={}", cwd.display()))
            .into_iter()
            .collect();
        argv.extend(["LC_ALL=C".into(), "DEBIAN_FRONTEND=noninteractive".into()]);
        argv.push(apt.to_string_lossy().into_owned());
        argv.extend([
            "-c".to_owned(),
            conf.to_string_lossy().into_owned(),
            "-q".to_owned(),
        ]);
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let step = Step {
            id: steps::unique_id("apt"),
            what: format!("{program} {}", args.first().copied().unwrap_or_default()),
            program: steps::program("env").map_err(missing)?,
            args: argv,
            writable: vec![self.dir.clone()],
            user: None,
        };
        let (ended, out) = steps::capture(self.steps.as_ref(), &step, &|| Ok(())).await?;
        if ended.is_err() {
            return Err(Error::unavailable(format!(
                "{} failed: {}",
                step.what,
                apt_error(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetch the package lists of the host's sources into banger's lists.
    pub async fn update(&self) -> Result<()> {
        self.run("apt-get", &["update"], None).await.map(|_| ())
    }

    /// The package `meta` (a metapackage like `linux-image-cloud-amd64`)
    /// stands for now: its first hard dependency.
    pub async fn resolve(&self, meta: &str) -> Result<String> {
        let out = self
            .run("apt-cache", &["depends", "--important", meta], None)
            .await
            .map_err(|e| {
                Error::not_found(format!(
                    "apt knows no {meta} in the host's sources ({}); name the kernel package yourself (--package)",
                    e.message
                ))
            })?;
        parse_depends(&out).ok_or_else(|| {
            Error::not_found(format!(
                "apt says {meta} depends on no package; name the kernel package yourself (--package)"
            ))
        })
    }

    /// Where `package` would come from, with its size and digest.
    pub async fn locate(&self, package: &str) -> Result<Download> {
        let out = self
            .run("apt-get", &["download", "--print-uris", package], None)
            .await
            .map_err(|e| {
                Error::not_found(format!("apt cannot download {package}: {}", e.message))
            })?;
        parse_uris(&out)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::not_found(format!("apt offers no file for {package}")))
    }

    /// Download `want` into [`Apt::debs`] unless it is there with its
    /// digest, calling `progress` with the bytes so far every half second.
    /// Returns the file.
    pub async fn download(
        &self,
        package: &str,
        want: &Download,
        mut progress: impl FnMut(u64) -> Result<()>,
    ) -> Result<PathBuf> {
        let path = self.debs().join(&want.file);
        if matches_download(&path, want).await {
            return Ok(path);
        }
        let _ = std::fs::remove_file(&path);
        let debs = self.debs();
        let args = ["download", package];
        let fetch = self.run("apt-get", &args, Some(&debs));
        tokio::pin!(fetch);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                done = &mut fetch => { done?; break; }
                _ = tick.tick() => {
                    let got = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    progress(got)?;
                }
            }
        }
        progress(want.size)?;
        if !matches_download(&path, want).await {
            let _ = std::fs::remove_file(&path);
            return Err(Error::failed(format!(
                "{} does not have the size and SHA-256 the archive index gives",
                want.file
            )));
        }
        Ok(path)
    }
}

/// Whether `path` is `want`: its size and SHA-256.
async fn matches_download(path: &Path, want: &Download) -> bool {
    let (path, size) = (path.to_owned(), want.size);
    let sha = crate::blocking::value(move || {
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size) {
            return None;
        }
        crate::artifacts::files::sha256_file(&path, &mut |_| Ok(())).ok()
    })
    .await;
    matches!(sha, Ok(Some(s)) if s.eq_ignore_ascii_case(&want.sha256))
}

/// The last `E:` line apt wrote, or its last line.
fn apt_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("E: "))
        .or(lines.last())
        .map(|l| l.trim_start_matches("E: ").to_owned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// The first `Depends:` of `apt-cache depends` output.
fn parse_depends(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?.trim();
        // `<virtual>` names are no package to download.
        (valid_package(dep)).then(|| dep.to_owned())
    })
}

/// `apt-get download --print-uris` lines: `'URL' FILE SIZE SHA256:HEX`.
fn parse_uris(out: &str) -> Result<Vec<Download>> {
    let bad = |l: &str| Error::failed(format!("apt printed an unexpected download line: {l}"));
    let mut found = Vec::new();
    for line in out.lines().filter(|l| l.starts_with('\'')) {
        let mut parts = line.split_whitespace();
        let url = parts
            .next()
            .and_then(|u| u.strip_prefix('\'')?.strip_suffix('\''))
            .ok_or_else(|| bad(line))?;
        let file = parts.next().ok_or_else(|| bad(line))?;
        let size = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(line))?;
        let sha256 = parts
            .next()
            .and_then(|s| s.strip_prefix("SHA256:"))
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| bad(line))?;
        if file.contains('/') || file.starts_with('.') {
            return Err(bad(line));
        }
        found.push(Download {
            url: url.to_owned(),
            file: file.to_owned(),
            size,
            sha256: sha256.to_ascii_lowercase(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_output_is_read() {
        let uris = "'http://deb.debian.org/debian-security/pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb' linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb 26705532 SHA256:4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754\n";
        let got = parse_uris(uris).expect("parsed");
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].file,
            "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
        );
        assert_eq!(got[0].size, 26_705_532);
        assert!(got[0].url.starts_with("http://deb.debian.org/"));
        for bad in [
            "'http://x/a.deb' ../a.deb 1 SHA256:4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754",
            "'http://x/a.deb' a.deb x SHA256:4fdd",
            "'http://x/a.deb' a.deb 1 MD5Sum:abc",
        ] {
            assert!(parse_uris(bad).is_err(), "{bad}");
        }
        assert!(
            parse_uris("Reading package lists...\n")
                .expect("none")
                .is_empty()
        );

        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            parse_depends(depends).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(parse_depends("x\n  Depends: <virtual>\n"), None);

        assert_eq!(
            apt_error("W: something\nE: Unable to locate package nope\n"),
            "Unable to locate package nope"
        );
    }

    #[test]
    fn package_names_carry_no_options() {
        for good in [
            "linux-image-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "g++-12",
        ] {
            assert!(valid_package(good), "{good}");
        }
        for bad in [
            "",
            "-o",
            "--print-uris",
            "a b",
            "A",
            "x;y",
            "x/y",
            &"a".repeat(129),
        ] {
            assert!(!valid_package(bad), "{bad}");
        }
    }
}
