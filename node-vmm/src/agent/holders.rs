//! Which VM on this node holds a disk file, so that "in use" names it.
//! Locks are per node, and so is this answer: the VMs whose recorded VMM
//! config lists a file with the same device and inode, and whose VMM is
//! alive. [`pick`] is pure; [`name_holder`] reads the state directory.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::hostfs::HostFsError;
use super::supervisor::VmDir;

/// A file's identity on this node.
pub type FileId = (u64, u64);

fn id_of(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The first VM (by name) whose files include `target` (pure).
pub fn pick(target: FileId, candidates: &[(String, Vec<FileId>)]) -> Option<String> {
    let mut names: Vec<&String> = candidates
        .iter()
        .filter(|(_, ids)| ids.contains(&target))
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names.first().map(|n| (*n).clone())
}

/// "VM namespace/name" of the VM in `dir`, from its owner record.
fn owner(dir: &VmDir) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.owner_file()).ok()?).ok()?;
    Some(format!(
        "VM {}/{}",
        v["namespace"].as_str()?,
        v["name"].as_str()?
    ))
}

/// The disk files of the running VMM in `dir`.
fn disks(dir: &VmDir) -> Vec<FileId> {
    if !dir.vmm_pid().is_some_and(|p| p.alive()) {
        return Vec::new();
    }
    let Ok(config) = kubevmm_vmm::VmConfig::from_file(&dir.config()) else {
        return Vec::new();
    };
    config.disks.iter().filter_map(|d| id_of(&d.path)).collect()
}

/// Fills in who holds the file of a `Locked` error (other errors pass).
pub fn name_holder(err: HostFsError, vms: &Path, own_uid: &str) -> HostFsError {
    let HostFsError::Locked {
        field,
        path,
        holder,
        how,
    } = err
    else {
        return err;
    };
    let found = id_of(Path::new(&path)).and_then(|target| {
        let candidates: Vec<(String, Vec<FileId>)> = std::fs::read_dir(vms)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name() != own_uid)
            .filter_map(|e| {
                let dir = VmDir(e.path());
                Some((owner(&dir)?, disks(&dir)))
            })
            .collect();
        pick(target, &candidates)
    });
    HostFsError::Locked {
        field,
        path,
        holder: found.unwrap_or(holder),
        how,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_vm_listing_the_file() {
        let c = vec![
            ("VM a/web".to_string(), vec![(1, 10), (1, 11)]),
            ("VM a/db".to_string(), vec![(1, 12)]),
            ("VM a/other".to_string(), vec![(2, 12)]),
        ];
        assert_eq!(pick((1, 12), &c), Some("VM a/db".into()));
        assert_eq!(pick((1, 11), &c), Some("VM a/web".into()));
        assert_eq!(pick((3, 12), &c), None, "same inode on another device");
        assert_eq!(pick((1, 12), &[]), None);
    }
}
