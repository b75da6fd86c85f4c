//! The unprivileged uid/gid each VMM runs as: one per VM, so no VMM can
//! signal, trace or share files with another. Picked from a configured
//! range by a hash of the VM's uid with linear probing past ids in use
//! ([`pick`], pure), and recorded in the VM's state directory so it stays the
//! same across restarts of the VM and of the agent ([`assign`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

/// First id of the default range (far above login users and container ids).
pub const DEFAULT_BASE: u32 = 3_000_000;
/// Size of the default range.
pub const DEFAULT_COUNT: u32 = 65_536;
/// The file in a VM's state directory holding its id.
const FILE: &str = "jail-id";

/// The id range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First id.
    pub base: u32,
    /// How many.
    pub count: u32,
}

impl Default for Range {
    fn default() -> Self {
        Self {
            base: DEFAULT_BASE,
            count: DEFAULT_COUNT,
        }
    }
}

/// Errors assigning an id.
#[derive(Debug, thiserror::Error)]
pub enum JailIdError {
    /// Every id of the range is taken.
    #[error("all {0} VMM user ids of the range are in use; widen --vmm-uid-count")]
    Exhausted(u32),
    /// The record could not be written.
    #[error("cannot record the VMM user id in {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The id for `vm_uid` given the ids in `used` (pure).
pub fn pick<S: std::hash::BuildHasher>(
    vm_uid: &str,
    used: &HashSet<u32, S>,
    range: Range,
) -> Option<u32> {
    let count = range.count.max(1);
    let h = vm_uid.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (0..count)
        .map(|i| range.base + (h.wrapping_add(i) % count))
        .find(|id| !used.contains(id))
}

static ASSIGN: Mutex<()> = Mutex::new(());

fn read(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The id of the VM whose state directory is `vms/vm_uid`: the recorded one,
/// or a new one recorded now.
pub fn assign(vms: &Path, vm_uid: &str, range: Range) -> Result<u32, JailIdError> {
    let _guard = ASSIGN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = vms.join(vm_uid);
    if let Some(id) =
        read(&dir).filter(|id| (range.base..range.base.saturating_add(range.count)).contains(id))
    {
        return Ok(id);
    }
    let used: HashSet<u32> = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != vm_uid)
        .filter_map(|e| read(&e.path()))
        .collect();
    let id = pick(vm_uid, &used, range).ok_or(JailIdError::Exhausted(range.count))?;
    let path = dir.join(FILE);
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| JailIdError::Io {
                path: dir.display().to_string(),
                source,
            })?;
    }
    super::supervisor::write_atomic(&path, id.to_string().as_bytes()).map_err(|e| {
        JailIdError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_in_range_and_unique() {
        let r = Range {
            base: 1000,
            count: 4,
        };
        let mut used = HashSet::new();
        let a = pick("vm-a", &used, r).unwrap();
        assert_eq!(pick("vm-a", &used, r), Some(a), "same VM, same id");
        assert!((1000..1004).contains(&a));
        let mut all = HashSet::new();
        for vm in ["vm-a", "vm-b", "vm-c", "vm-d"] {
            let id = pick(vm, &used, r).unwrap();
            assert!(all.insert(id), "{vm} got {id} twice");
            used.insert(id);
        }
        assert_eq!(pick("vm-e", &used, r), None, "range exhausted");
    }

    #[test]
    fn assignment_is_recorded_and_reused() {
        let vms = std::env::temp_dir().join(format!("kubevmm-jailids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&vms);
        std::fs::create_dir_all(&vms).unwrap();
        let r = Range {
            base: 5000,
            count: 2,
        };
        let a = assign(&vms, "a", r).unwrap();
        let b = assign(&vms, "b", r).unwrap();
        assert_ne!(a, b);
        assert_eq!(assign(&vms, "a", r).unwrap(), a);
        let _ = std::fs::remove_dir_all(&vms);
    }
}
