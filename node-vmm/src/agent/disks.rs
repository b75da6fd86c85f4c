//! Where a VM's node-local disks live, and when they go.
//!
//! `emptyDisk` files and `image` overlays hold guest data, so they live in
//! `<state>/disks/<uid>/`, apart from the run state in `<state>/vms/<uid>/`
//! (removed whenever the VM stops running here). They survive stop/start —
//! the operator keeps a VM with such disks on this node (`status.diskNode`)
//! — and agent restarts, and are deleted when the VM object is deleted, is
//! re-created under the same name (a new uid), or gives its disks up
//! (`status.diskNode` removed or naming another node).
//!
//! The rule is [`super::retention::disks`]; the agent's sweep
//! ([`super::orphans`]) applies it to the directories of VMs no longer
//! bound here.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory of one VM's node-local disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDir(pub PathBuf);

impl DiskDir {
    /// `<state>/disks/<uid>`.
    pub fn of(state_dir: &Path, uid: &str) -> Self {
        Self(root(state_dir).join(uid))
    }

    /// Who the disks belong to ([`Owner`], JSON).
    pub fn owner_file(&self) -> PathBuf {
        self.0.join("owner.json")
    }

    /// The owner recorded when the directory was made.
    pub fn owner(&self) -> Option<Owner> {
        let text = std::fs::read(self.owner_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// `<state>/disks`.
pub fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("disks")
}

/// The VM a disk directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
}

/// Why a disk directory could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Creating the directory or its owner record failed.
    #[error("disk directory {dir}: {why}")]
    Create {
        /// The directory.
        dir: PathBuf,
        /// The error.
        why: String,
    },
}

/// Creates the VM's disk directory (0700) and records its owner (once).
pub fn create(dir: &DiskDir, owner: &Owner) -> Result<(), DiskError> {
    let err = |why: String| DiskError::Create {
        dir: dir.0.clone(),
        why,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir.0)
        .and_then(|()| std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| err(e.to_string()))?;
    if dir.owner().as_ref() != Some(owner) {
        let json = serde_json::to_vec(owner).map_err(|e| err(e.to_string()))?;
        super::supervisor::write_atomic(&dir.owner_file(), &json)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "ns".into(),
            name: "vm".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn create_makes_a_private_directory_and_records_the_owner_once() {
        let base = std::env::temp_dir().join(format!("kubevmm-disks-{}", std::process::id()));
        let dir = DiskDir::of(&base, "u1");
        create(&dir, &owner()).expect("create");
        let mode = std::fs::metadata(&dir.0).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(dir.owner(), Some(owner()));
        std::fs::write(dir.0.join("disk-a.img"), b"data").expect("disk");
        create(&dir, &owner()).expect("again");
        assert_eq!(
            std::fs::read(dir.0.join("disk-a.img")).expect("kept"),
            b"data"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
