//! The per-node image cache on disk, `<state>/images/`:
//!
//! - `sha256-<hex>`: a verified image, named by the SHA-256 of its bytes,
//!   read-only (0444), never written again; several sources may share one.
//! - `index/<key>.json`: which source (a [`key`] of the URL and expected
//!   digest, or of the node path) gave which file, with its format and
//!   virtual size. Written after the file is in place, so a crash leaves
//!   either a complete entry or none; its mtime is the entry's last use.
//! - `.partial-<key>`: a download in progress (resumed after a restart);
//!   never used by a VM. Only a file whose digest was computed over every
//!   byte while it was written is renamed into the cache.
//!
//! The cache lives in the agent's state directory, outside every allowed
//! directory, so no user path can name it.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kubevmm_crds::image::{ImageFormat, ImageSource};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Hex of a SHA-256.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The cache key of a source: the same URL with the same expected digest,
/// or the same node path, is imported once per node.
pub fn key(source: &ImageSource) -> String {
    let mut h = Sha256::new();
    if let Some(http) = &source.http {
        h.update(b"http\0");
        h.update(http.url.as_bytes());
        h.update(b"\0");
        h.update(http.sha256.as_deref().unwrap_or("").to_ascii_lowercase());
    } else if let Some(p) = &source.path {
        h.update(b"path\0");
        h.update(p.as_bytes());
    }
    hex(&h.finalize())[..32].to_string()
}

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Detected format.
    pub format: ImageFormat,
    /// Size the guest sees.
    pub virtual_size: u64,
    /// Bytes on disk.
    pub size: u64,
    /// Where it came from (URL or path), for operators reading the index.
    pub source: String,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// `<state>/images`.
    pub root: PathBuf,
}

impl Store {
    /// The cache under `state`, created (0700) when missing.
    pub fn open(state: &Path) -> std::io::Result<Self> {
        let root = state.join("images");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("index"))?;
        Ok(Self { root })
    }

    /// The file of a verified image.
    pub fn file(&self, sha256: &str) -> PathBuf {
        self.root.join(format!("sha256-{sha256}"))
    }

    /// The download in progress for `key`.
    pub fn partial(&self, key: &str) -> PathBuf {
        self.root.join(format!(".partial-{key}"))
    }

    /// Which image objects say this node holds `sha256` (`ns/name` lines),
    /// so their entries are retracted when the file is collected, even
    /// after an agent restart.
    fn published(&self, sha256: &str) -> PathBuf {
        self.root.join("published").join(sha256)
    }

    /// Records that `ns/name`'s status says this node holds `sha256`.
    pub fn record_published(&self, sha256: &str, ns: &str, name: &str) -> std::io::Result<()> {
        let path = self.published(sha256);
        let line = format!("{ns}/{name}");
        let text = fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.root.join("published"))?;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes())
    }

    /// The `(ns, name)` recorded for `sha256`, forgotten.
    pub fn take_published(&self, sha256: &str) -> Vec<(String, String)> {
        let path = self.published(sha256);
        let text = fs::read_to_string(&path).unwrap_or_default();
        let _ = fs::remove_file(path);
        text.lines()
            .filter_map(|l| l.split_once('/'))
            .map(|(ns, n)| (ns.to_string(), n.to_string()))
            .collect()
    }

    fn index(&self, key: &str) -> PathBuf {
        self.root.join("index").join(format!("{key}.json"))
    }

    /// The cached entry for `key`, when both the index and the file exist
    /// (and have the recorded size).
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let e: Entry = serde_json::from_slice(&fs::read(self.index(key)).ok()?).ok()?;
        let meta = fs::symlink_metadata(self.file(&e.sha256)).ok()?;
        (meta.is_file() && meta.len() == e.size).then_some(e)
    }

    /// Marks the entry of `key` as used now (the garbage collector's clock).
    pub fn touch(&self, key: &str) {
        if let Ok(f) = fs::File::options().write(true).open(self.index(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Moves a complete, verified partial file into the cache under its
    /// digest (read-only) and records the entry for `key`.
    pub fn commit(&self, key: &str, partial: &Path, entry: &Entry) -> std::io::Result<PathBuf> {
        let f = fs::File::open(partial)?;
        f.sync_all()?;
        fs::set_permissions(partial, fs::Permissions::from_mode(0o444))?;
        let dst = self.file(&entry.sha256);
        if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_file() && m.len() == entry.size) {
            // The same bytes from another source: keep the one we have.
            fs::remove_file(partial)?;
        } else {
            fs::rename(partial, &dst)?;
        }
        let tmp = self.root.join("index").join(format!(".{key}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut t = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        t.write_all(&serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?)?;
        t.sync_all()?;
        fs::rename(&tmp, self.index(key))?;
        fs::File::open(&self.root)?.sync_all()?;
        Ok(dst)
    }

    /// Bytes of every cached image.
    pub fn size(&self) -> u64 {
        fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("sha256-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Removes entries unused for `grace` (index mtime), whose file no VM
    /// on the node uses (`in_use`: file names `sha256-<hex>` recorded by VMs
    /// on this node) and no VMM holds (a VMM keeps a shared lock on the
    /// disks it was handed), and whose key is not `busy` (being imported).
    /// Also drops partial files of keys not `busy` older than `grace`, and
    /// files no index names. Returns the removed digests.
    pub fn collect(
        &self,
        grace: Duration,
        busy: &dyn Fn(&str) -> bool,
        in_use: &std::collections::HashSet<String>,
    ) -> Vec<String> {
        let locked = |p: &Path| {
            locked(p)
                || p.file_name()
                    .is_some_and(|n| in_use.contains(&*n.to_string_lossy()))
        };
        let now = SystemTime::now();
        let old = |m: &fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        let mut keep = std::collections::HashSet::new();
        let mut candidates = Vec::new();
        for e in fs::read_dir(self.root.join("index"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(entry) =
                serde_json::from_slice::<Entry>(&fs::read(e.path()).unwrap_or_default())
            else {
                let _ = fs::remove_file(e.path());
                continue;
            };
            let stale = e.metadata().is_ok_and(|m| old(&m)) && !busy(key);
            if stale && !locked(&self.file(&entry.sha256)) {
                candidates.push((e.path(), entry.sha256));
            } else {
                keep.insert(entry.sha256);
            }
        }
        let mut removed = Vec::new();
        for (index, sha) in candidates {
            let _ = fs::remove_file(index);
            if !keep.contains(&sha) && fs::remove_file(self.file(&sha)).is_ok() {
                removed.push(sha);
            }
        }
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            let orphan = name
                .strip_prefix("sha256-")
                .is_some_and(|sha| !keep.contains(sha) && old(&meta) && !locked(&e.path()));
            let dead_partial = name
                .strip_prefix(".partial-")
                .is_some_and(|k| !busy(k) && old(&meta));
            if orphan {
                if fs::remove_file(e.path()).is_ok() {
                    removed.push(name["sha256-".len()..].to_string());
                }
            } else if dead_partial {
                let _ = fs::remove_file(e.path());
            }
        }
        removed
    }
}

/// Whether a VMM holds `path` (a lock we cannot take exclusively).
fn locked(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Bytes available to the agent on the file system of `dir`.
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubevmm_crds::image::HttpSource;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kubevmm-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn http(url: &str, sha: Option<&str>) -> ImageSource {
        ImageSource {
            http: Some(HttpSource {
                url: url.into(),
                sha256: sha.map(Into::into),
            }),
            path: None,
        }
    }

    #[test]
    fn keys_tell_sources_apart() {
        let a = key(&http("http://x/a", None));
        assert_eq!(a, key(&http("http://x/a", None)));
        assert_ne!(a, key(&http("http://x/b", None)));
        assert_ne!(a, key(&http("http://x/a", Some("00"))));
        assert_eq!(
            key(&http("http://x/a", Some("AB"))),
            key(&http("http://x/a", Some("ab")))
        );
        let p = ImageSource {
            http: None,
            path: Some("http://x/a".into()),
        };
        assert_ne!(a, key(&p));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn published_records_are_kept_once_and_taken_once() {
        let state = tmp("published");
        let s = Store::open(&state).unwrap();
        assert!(s.take_published("aa").is_empty());
        s.record_published("aa", "ns", "a").unwrap();
        s.record_published("aa", "ns", "a").unwrap();
        s.record_published("aa", "other", "b").unwrap();
        assert_eq!(
            s.take_published("aa"),
            vec![("ns".into(), "a".into()), ("other".into(), "b".into())]
        );
        assert!(s.take_published("aa").is_empty(), "forgotten once taken");
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn commit_lookup_and_collect() {
        let state = tmp("commit");
        let s = Store::open(&state).unwrap();
        assert_eq!(s.lookup("k1"), None);
        let part = s.partial("k1");
        fs::write(&part, b"hello").unwrap();
        let sha = hex(&Sha256::digest(b"hello"));
        let entry = Entry {
            sha256: sha.clone(),
            format: ImageFormat::Raw,
            virtual_size: 5,
            size: 5,
            source: "http://x/a".into(),
        };
        let path = s.commit("k1", &part, &entry).unwrap();
        assert!(!part.exists());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(s.lookup("k1"), Some(entry.clone()));
        // A second source with the same bytes shares the file.
        fs::write(s.partial("k2"), b"hello").unwrap();
        s.commit("k2", &s.partial("k2"), &entry).unwrap();
        assert_eq!(s.size(), 5);

        let none = std::collections::HashSet::new();
        // A file a VM on the node records as used stays.
        let used = std::collections::HashSet::from([format!("sha256-{sha}")]);
        assert!(s.collect(Duration::ZERO, &|_| false, &used).is_empty());
        assert!(path.exists());
        // Fresh entries stay; busy keys stay; a held file stays.
        assert!(s
            .collect(Duration::from_secs(3600), &|_| false, &none)
            .is_empty());
        assert!(s.collect(Duration::ZERO, &|_| true, &none).is_empty());
        let held = fs::File::open(&path).unwrap();
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH) }, 0);
        assert!(s.collect(Duration::ZERO, &|_| false, &none).is_empty());
        assert!(path.exists());
        drop(held);
        // k1 busy: k2's index goes, the shared file stays for k1.
        assert!(s.collect(Duration::ZERO, &|k| k == "k1", &none).is_empty());
        assert!(s.lookup("k2").is_none() && s.lookup("k1").is_some());
        assert_eq!(s.collect(Duration::ZERO, &|_| false, &none), vec![sha]);
        assert!(!path.exists() && s.lookup("k1").is_none());
        fs::write(s.partial("k3"), b"x").unwrap();
        s.collect(Duration::ZERO, &|k| k == "k3", &none);
        assert!(s.partial("k3").exists(), "a busy partial stays");
        s.collect(Duration::ZERO, &|_| false, &none);
        assert!(!s.partial("k3").exists());
        assert!(free_space(&state).unwrap() > 0);
        let _ = fs::remove_dir_all(&state);
    }
}
