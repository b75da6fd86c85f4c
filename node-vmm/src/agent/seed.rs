//! cloud-init `NoCloud` seed disks: what a `cloudInit` disk holds and the
//! FAT image that carries it.
//!
//! [`files`] decides the contents (pure): `user-data` as given (empty when
//! the spec has none), `meta-data` with `instance-id` = the VM uid and
//! `local-hostname` = the VM name, the user's `metaData` keys merged over
//! them, and `network-config` when the spec gives `networkData`. [`image`]
//! lays them out in a FAT volume labelled `cidata`, the label cloud-init's
//! `NoCloud` source looks for, built in memory with the `fatfs` crate (no
//! `mkfs`); the same files give the same bytes (fixed timestamps, volume id
//! from the uid). The agent regenerates the image at every start, so it
//! always matches the spec, and hands it to the guest read-only.

use std::io::{Cursor, Write as _};

use kubevmm_crds::vm::CloudInit;

/// The volume label cloud-init's `NoCloud` data source looks for.
pub const LABEL: &str = "cidata";
/// The smallest seed image.
pub const MIN_IMAGE: u64 = 1 << 20;
/// Room for the FAT, root directory and per-file cluster slack.
const OVERHEAD: u64 = 128 << 10;
/// Sector size of the image.
const SECTOR: u64 = 512;

/// Why a seed cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// `metaData` is not a YAML mapping.
    #[error("{field}: meta-data must be a YAML mapping of keys to values: {why}")]
    MetaData {
        /// The spec field.
        field: String,
        /// What the YAML parser or the check said.
        why: String,
    },
    /// Writing the FAT volume in memory failed.
    #[error("cannot lay out the seed image: {0}")]
    Image(#[from] std::io::Error),
}

/// One file of the seed volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFile {
    /// Name in the root directory.
    pub name: &'static str,
    /// Contents.
    pub contents: String,
}

/// The `meta-data` document: `instance-id` and `local-hostname`, then the
/// user's keys (which replace a generated one of the same name, as the API
/// documents for `metaData`).
fn meta_data(uid: &str, name: &str, extra: Option<&str>, field: &str) -> Result<String, SeedError> {
    use serde_yaml::{Mapping, Value};
    let bad = |why: String| SeedError::MetaData {
        field: field.to_string(),
        why,
    };
    let mut meta = Mapping::new();
    meta.insert("instance-id".into(), uid.into());
    meta.insert("local-hostname".into(), name.into());
    match extra
        .map(serde_yaml::from_str::<Value>)
        .transpose()
        .map_err(|e| bad(e.to_string()))?
    {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(user)) => {
            for (k, v) in user {
                meta.insert(k, v);
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "found {}",
                match other {
                    Value::Sequence(_) => "a list",
                    Value::String(_) => "a string",
                    _ => "a scalar",
                }
            )))
        }
    }
    serde_yaml::to_string(&meta).map_err(|e| bad(e.to_string()))
}

/// The files of the seed of the VM `uid` named `name`; `field` names the
/// `cloudInit` field for errors.
pub fn files(
    uid: &str,
    name: &str,
    ci: &CloudInit,
    field: &str,
) -> Result<Vec<SeedFile>, SeedError> {
    let mut files = vec![
        SeedFile {
            name: "user-data",
            contents: ci.user_data.clone().unwrap_or_default(),
        },
        SeedFile {
            name: "meta-data",
            contents: meta_data(
                uid,
                name,
                ci.meta_data.as_deref(),
                &format!("{field}.metaData"),
            )?,
        },
    ];
    if let Some(net) = &ci.network_data {
        files.push(SeedFile {
            name: "network-config",
            contents: net.clone(),
        });
    }
    Ok(files)
}

/// Size of the image for `files`: their contents rounded up to 4 KiB each
/// plus the FAT overhead, in whole MiB, at least [`MIN_IMAGE`].
pub fn image_size(files: &[SeedFile]) -> u64 {
    let data: u64 = files
        .iter()
        .map(|f| (f.contents.len() as u64).div_ceil(4096) * 4096)
        .sum();
    ((data + OVERHEAD).div_ceil(MIN_IMAGE) * MIN_IMAGE).max(MIN_IMAGE)
}

/// A stable FAT volume id for the VM `uid` (FNV-1a).
pub fn volume_id(uid: &str) -> u32 {
    uid.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The FAT volume labelled [`LABEL`] holding `files` in its root directory.
pub fn image(files: &[SeedFile], volume_id: u32) -> Result<Vec<u8>, SeedError> {
    let size = image_size(files);
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    let sectors = u32::try_from(size / SECTOR).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "seed image too large")
    })?;
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(volume_id)
            .total_sectors(sectors),
    )?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for f in files {
                let mut file = root.create_file(f.name)?;
                file.truncate()?;
                file.write_all(f.contents.as_bytes())?;
                file.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn ci(user: Option<&str>, meta: Option<&str>, net: Option<&str>) -> CloudInit {
        CloudInit {
            user_data: user.map(Into::into),
            meta_data: meta.map(Into::into),
            network_data: net.map(Into::into),
        }
    }

    const UID: &str = "8d2f5c1e-0b6a-4c1f-9e2d-3a4b5c6d7e8f";

    #[test]
    fn files_from_the_spec() {
        let user = "#cloud-config\npackages: [nginx]\n";
        let net = "version: 2\nethernets: {eth0: {dhcp4: true}}\n";
        let cases: &[(CloudInit, &[(&str, &str)])] = &[
            (
                ci(Some(user), None, None),
                &[
                    ("user-data", user),
                    (
                        "meta-data",
                        "instance-id: 8d2f5c1e-0b6a-4c1f-9e2d-3a4b5c6d7e8f\nlocal-hostname: web-1\n",
                    ),
                ],
            ),
            (
                ci(None, None, Some(net)),
                &[
                    ("user-data", ""),
                    (
                        "meta-data",
                        "instance-id: 8d2f5c1e-0b6a-4c1f-9e2d-3a4b5c6d7e8f\nlocal-hostname: web-1\n",
                    ),
                    ("network-config", net),
                ],
            ),
            (
                ci(Some(user), Some("local-hostname: www\nzone: b\n"), None),
                &[
                    ("user-data", user),
                    (
                        "meta-data",
                        "instance-id: 8d2f5c1e-0b6a-4c1f-9e2d-3a4b5c6d7e8f\nlocal-hostname: www\nzone: b\n",
                    ),
                ],
            ),
            (
                ci(None, Some("instance-id: iid-7\npublic-keys: [ssh-ed25519 AAAA]\n"), None),
                &[
                    ("user-data", ""),
                    (
                        "meta-data",
                        "instance-id: iid-7\nlocal-hostname: web-1\npublic-keys:\n- ssh-ed25519 AAAA\n",
                    ),
                ],
            ),
            (
                ci(Some(user), Some("# nothing\n"), None),
                &[
                    ("user-data", user),
                    (
                        "meta-data",
                        "instance-id: 8d2f5c1e-0b6a-4c1f-9e2d-3a4b5c6d7e8f\nlocal-hostname: web-1\n",
                    ),
                ],
            ),
        ];
        for (spec, want) in cases {
            let got = files(UID, "web-1", spec, "spec.disks[2].cloudInit").expect("files");
            let got: Vec<(&str, &str)> =
                got.iter().map(|f| (f.name, f.contents.as_str())).collect();
            assert_eq!(got, *want, "{spec:?}");
        }
    }

    #[test]
    fn meta_data_must_be_a_mapping() {
        let cases = [
            ("- a\n- b\n", "found a list"),
            ("just words", "found a string"),
            ("a: [", "did not find expected"),
        ];
        for (meta, want) in cases {
            let e = files(
                UID,
                "vm",
                &ci(None, Some(meta), None),
                "spec.disks[0].cloudInit",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("spec.disks[0].cloudInit.metaData: meta-data must be a YAML mapping"),
                "{e}"
            );
            assert!(e.contains(want), "{meta:?}: {e}");
        }
    }

    #[test]
    fn image_size_grows_with_the_contents() {
        let f = |n: usize| SeedFile {
            name: "user-data",
            contents: "x".repeat(n),
        };
        let cases = [
            (vec![], MIN_IMAGE),
            (vec![f(10)], MIN_IMAGE),
            (vec![f(65536), f(65536), f(65536)], MIN_IMAGE),
            (vec![f(900 << 10)], 2 << 20),
            (vec![f(3 << 20)], 4 << 20),
        ];
        for (files, want) in cases {
            assert_eq!(image_size(&files), want, "{:?}", files.len());
        }
    }

    fn read_back(img: Vec<u8>) -> (String, Vec<(String, String)>) {
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).expect("mount");
        let label = fs.volume_label();
        let mut out = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.expect("entry");
            let mut s = String::new();
            e.to_file().read_to_string(&mut s).expect("read");
            out.push((e.file_name(), s));
        }
        (label, out)
    }

    #[test]
    fn image_reads_back_with_label_and_files() {
        let big = format!(
            "#cloud-config\nwrite_files: [{{path: /x, content: {}}}]\n",
            "a".repeat(60_000)
        );
        let spec = ci(Some(&big), Some("zone: b\n"), Some("version: 2\n"));
        let fs = files(UID, "web-1", &spec, "f").expect("files");
        let img = image(&fs, volume_id(UID)).expect("image");
        assert_eq!(img.len() as u64, MIN_IMAGE);
        let (label, got) = read_back(img.clone());
        assert_eq!(label.trim_end(), LABEL);
        let want: Vec<(String, String)> = fs
            .iter()
            .map(|f| (f.name.to_string(), f.contents.clone()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            image(&fs, volume_id(UID)).expect("again"),
            img,
            "deterministic"
        );
        assert_ne!(image(&fs, volume_id("other")).expect("other"), img);
    }

    /// What standard tools make of the image: `blkid` finds the `cidata`
    /// label cloud-init looks for, `mcopy` reads every file back.
    #[test]
    fn standard_tools_read_the_image() {
        let dir = std::env::temp_dir().join(format!("kubevmm-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("seed.img");
        let spec = ci(
            Some("#cloud-config\nhostname: web-1\n"),
            None,
            Some("version: 2\n"),
        );
        let fs = files(UID, "web-1", &spec, "f").expect("files");
        std::fs::write(&path, image(&fs, volume_id(UID)).expect("image")).expect("write");
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd)
                .args(args)
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("{cmd} (hack/install-deps.sh installs it): {e}"));
            assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
            String::from_utf8(out.stdout).expect("utf-8")
        };
        assert_eq!(run("blkid", &["-o", "value", "-s", "LABEL"]).trim(), LABEL);
        assert_eq!(run("blkid", &["-o", "value", "-s", "TYPE"]).trim(), "vfat");
        for f in &fs {
            let out = std::process::Command::new("mcopy")
                .arg("-i")
                .arg(&path)
                .arg(format!("::{}", f.name))
                .arg("-")
                .output()
                .expect("mcopy (hack/install-deps.sh installs mtools)");
            assert!(out.status.success(), "mcopy {}: {out:?}", f.name);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                f.contents,
                "{}",
                f.name
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
