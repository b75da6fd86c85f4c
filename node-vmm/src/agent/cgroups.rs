//! One cgroup per VM, outside the agent's, with memory, pid and CPU limits.
//!
//! Two host layouts are supported, detected once at start ([`Layout::detect`]):
//! a unified cgroup v2 hierarchy whose root offers the `memory`, `pids` and
//! `cpu` controllers, and hybrid hosts (v1 controllers, v2 mounted without
//! controllers, as on our CI machines), where the VM gets a directory in each
//! v1 hierarchy plus one in the v2 tree that tracks membership.
//!
//! On hybrid hosts the VMM joins a directory in *every* v1 hierarchy, not
//! only those it has limits in: a container runtime finds the processes of a
//! container through its cgroups (runc reads the `devices` one, the kubelet
//! the pod's), so a VMM left in any of the agent pod's cgroups would be
//! killed with the pod. Outside all of them it survives agent restarts,
//! upgrades and `kubectl delete pod` (docs/deploy.md).
//! [`plan`] is pure (table-tested); [`create`], [`live_pids`] and [`remove`]
//! do the I/O. The shim joins every directory before it starts the VMM.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors creating a VM's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A directory or limit file could not be written.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The host's cgroup layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 with the controllers we need, rooted at `root/kubevmm`.
    Unified {
        /// The v2 mount.
        root: PathBuf,
    },
    /// v1 controller mounts plus, optionally, a v2 mount without controllers.
    Hybrid {
        /// Every v1 hierarchy's mount point, with what we limit there.
        v1: Vec<(Controller, PathBuf)>,
        /// The v2 mount, if any.
        v2: Option<PathBuf>,
    },
    /// No cgroups (disabled by flag).
    None,
}

/// A v1 controller we set limits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory.limit_in_bytes`
    Memory,
    /// `pids.max`
    Pids,
    /// `cpu.cfs_quota_us` / `cpu.cfs_period_us`
    Cpu,
    /// A hierarchy we set no limit in (`devices`, `freezer`, `cpuset`,
    /// `name=systemd`, ...): joined only to leave the agent's cgroup.
    Membership,
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Guest RAM plus the configured VMM overhead.
    pub memory: u64,
    /// Processes and threads: shim, VMM, vCPUs and a margin.
    pub pids: u64,
    /// CPU time per period, in µs: one core per vCPU plus one for the VMM's
    /// own threads (device emulation, the API).
    pub cpu_quota_us: u64,
    /// The CPU period, in µs.
    pub cpu_period_us: u64,
}

/// Threads beside the vCPUs: shim, VMM main thread and headroom.
const PID_MARGIN: u64 = 16;
const CPU_PERIOD_US: u64 = 100_000;

/// Limits for a VM with `cpus` vCPUs and `memory` bytes of guest RAM.
pub fn limits(cpus: u32, memory: u64, overhead: u64) -> Limits {
    Limits {
        memory: memory.saturating_add(overhead),
        pids: u64::from(cpus) + PID_MARGIN,
        cpu_quota_us: (u64::from(cpus) + 1) * CPU_PERIOD_US,
        cpu_period_us: CPU_PERIOD_US,
    }
}

/// One directory to create and the files to write in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    /// The cgroup directory.
    pub path: PathBuf,
    /// `(file, value)` written after creating it.
    pub files: Vec<(&'static str, String)>,
    /// A parent whose `cgroup.subtree_control` must enable our controllers.
    pub enable_in: Option<PathBuf>,
}

/// The directory of a VM's cgroups below a hierarchy's root:
/// `kubevmm/<node>/vm-<uid>`. Each agent owns its node's subtree and never
/// looks outside it, so agents that share a host (tests, a local cluster
/// beside them) never take each other's VMs for leftovers.
fn leaf(node: &str, uid: &str) -> String {
    format!("kubevmm/{node}/vm-{uid}")
}

/// The cgroups of VM `uid` of node `node` under `layout` with `limits` (pure).
pub fn plan(layout: &Layout, node: &str, uid: &str, limits: Option<Limits>) -> Vec<Dir> {
    let leaf = leaf(node, uid);
    match layout {
        Layout::None => Vec::new(),
        Layout::Unified { root } => {
            let files = limits.map_or_else(Vec::new, |l| {
                vec![
                    ("memory.max", l.memory.to_string()),
                    ("pids.max", l.pids.to_string()),
                    ("cpu.max", format!("{} {}", l.cpu_quota_us, l.cpu_period_us)),
                ]
            });
            vec![Dir {
                path: root.join(&leaf),
                files,
                enable_in: Some(root.join("kubevmm").join(node)),
            }]
        }
        Layout::Hybrid { v1, v2 } => {
            let mut dirs: Vec<Dir> = v1
                .iter()
                .map(|(c, mount)| Dir {
                    path: mount.join(&leaf),
                    files: limits.map_or_else(Vec::new, |l| match c {
                        Controller::Memory => {
                            vec![("memory.limit_in_bytes", l.memory.to_string())]
                        }
                        Controller::Pids => vec![("pids.max", l.pids.to_string())],
                        Controller::Cpu => vec![
                            ("cpu.cfs_period_us", l.cpu_period_us.to_string()),
                            ("cpu.cfs_quota_us", l.cpu_quota_us.to_string()),
                        ],
                        Controller::Membership => Vec::new(),
                    }),
                    enable_in: None,
                })
                .collect();
            if let Some(v2) = v2 {
                dirs.push(Dir {
                    path: v2.join(&leaf),
                    files: Vec::new(),
                    enable_in: None,
                });
            }
            dirs
        }
    }
}

/// What we limit in a v1 hierarchy mounted with `opts` (its controllers are
/// mount options; `cpu,cpuacct` co-mounted counts as `cpu`).
fn controller_of(opts: &str) -> Controller {
    let has = |name: &str| opts.split(',').any(|o| o == name);
    if has("memory") {
        Controller::Memory
    } else if has("pids") {
        Controller::Pids
    } else if has("cpu") {
        Controller::Cpu
    } else {
        Controller::Membership
    }
}

fn mounts() -> Vec<(String, PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[2].to_string(), PathBuf::from(f[1]), f[3].to_string()))
        })
        .collect()
}

impl Layout {
    /// Reads /proc/self/mounts and the v2 root's controllers.
    pub fn detect() -> Self {
        let mounts = mounts();
        let v2 = mounts
            .iter()
            .find(|(fs, _, _)| fs == "cgroup2")
            .map(|(_, p, _)| p.clone());
        if let Some(root) = &v2 {
            let ctl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let have: Vec<&str> = ctl.split_whitespace().collect();
            if ["memory", "pids", "cpu"].iter().all(|c| have.contains(c)) {
                return Layout::Unified { root: root.clone() };
            }
        }
        let mut v1: Vec<(Controller, PathBuf)> = Vec::new();
        for (fs, path, opts) in &mounts {
            if fs != "cgroup" || v1.iter().any(|(_, p)| p == path) {
                continue;
            }
            v1.push((controller_of(opts), path.clone()));
        }
        Layout::Hybrid { v1, v2 }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the directories and writes the limits (idempotent).
pub fn create(dirs: &[Dir]) -> Result<(), CgroupError> {
    for d in dirs {
        if let Some(parent) = &d.enable_in {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            enable_controllers(parent)?;
        }
        std::fs::create_dir_all(&d.path).map_err(io(&d.path))?;
        fill_cpuset(&d.path)?;
        for (file, value) in &d.files {
            let p = d.path.join(file);
            std::fs::write(&p, value).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// A new v1 `cpuset` directory has no CPUs and no memory nodes, and no
/// process can join it: copy them from the parent, top down (elsewhere a
/// no-op).
fn fill_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| p.join("cpuset.cpus").exists())
        .collect();
    chain.reverse();
    for pair in chain.windows(2) {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = pair[1].join(file);
            if std::fs::read_to_string(&own)
                .map_err(io(&own))?
                .trim()
                .is_empty()
            {
                let parent = pair[0].join(file);
                let value = std::fs::read_to_string(&parent).map_err(io(&parent))?;
                std::fs::write(&own, value.trim()).map_err(io(&own))?;
            }
        }
    }
    Ok(())
}

/// Enables memory, pids and cpu for the children of `dir` and its ancestors
/// up to the v2 root.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| p.join("cgroup.subtree_control").exists())
        .collect();
    chain.reverse();
    for p in chain {
        let f = p.join("cgroup.subtree_control");
        std::fs::write(&f, "+memory +pids +cpu").map_err(io(&f))?;
    }
    Ok(())
}

/// The VM uids of node `node` that have a cgroup directory in any
/// hierarchy of `layout`.
pub fn vm_uids(layout: &Layout, node: &str) -> Vec<String> {
    let parents: Vec<PathBuf> = plan(layout, node, "x", None)
        .into_iter()
        .filter_map(|d| d.path.parent().map(Path::to_path_buf))
        .collect();
    let mut uids: Vec<String> = parents
        .iter()
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flat_map(Iterator::flatten)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vm-")
                .map(str::to_string)
        })
        .collect();
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// Processes in any of the VM's cgroups.
pub fn live_pids(dirs: &[Dir]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.path.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Kills what is left in the VM's cgroups and removes them; retries while
/// the kernel still tears processes down. Returns the directories that
/// could not be removed yet (a later sweep retries).
pub fn remove(dirs: &[Dir]) -> Vec<PathBuf> {
    for pid in live_pids(dirs) {
        // SAFETY: kill(2) on pids listed in this VM's own cgroup.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let mut left: Vec<PathBuf> = dirs.iter().map(|d| d.path.clone()).collect();
    for _ in 0..50 {
        left.retain(|p| p.exists() && std::fs::remove_dir(p).is_err());
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_v1_hierarchy_is_classified_by_its_mount_options() {
        for (opts, want) in [
            ("rw,relatime,memory", Controller::Memory),
            ("rw,nosuid,pids", Controller::Pids),
            ("rw,cpu,cpuacct", Controller::Cpu),
            ("rw,cpuacct", Controller::Membership),
            ("rw,cpuset", Controller::Membership),
            ("rw,devices", Controller::Membership),
            ("rw,relatime,name=systemd", Controller::Membership),
        ] {
            assert_eq!(controller_of(opts), want, "{opts}");
        }
    }

    #[test]
    fn limits_cover_guest_ram_overhead_and_threads() {
        let l = limits(2, 512 << 20, 64 << 20);
        assert_eq!(l.memory, 576 << 20);
        assert_eq!(l.pids, 18);
        assert_eq!((l.cpu_quota_us, l.cpu_period_us), (300_000, 100_000));
    }

    #[test]
    fn plans_per_layout() {
        let l = Some(limits(1, 64 << 20, 32 << 20));
        let unified = plan(
            &Layout::Unified {
                root: "/sys/fs/cgroup".into(),
            },
            "n1",
            "u1",
            l,
        );
        assert_eq!(unified.len(), 1);
        assert_eq!(
            unified[0].path,
            PathBuf::from("/sys/fs/cgroup/kubevmm/n1/vm-u1")
        );
        assert_eq!(
            unified[0].files,
            vec![
                ("memory.max", (96u64 << 20).to_string()),
                ("pids.max", "17".into()),
                ("cpu.max", "200000 100000".into())
            ]
        );
        assert_eq!(
            unified[0].enable_in,
            Some(PathBuf::from("/sys/fs/cgroup/kubevmm/n1"))
        );

        let hybrid = Layout::Hybrid {
            v1: vec![
                (Controller::Memory, "/sys/fs/cgroup/memory".into()),
                (Controller::Pids, "/sys/fs/cgroup/pids".into()),
                (Controller::Cpu, "/sys/fs/cgroup/cpu".into()),
                (Controller::Membership, "/sys/fs/cgroup/devices".into()),
            ],
            v2: Some("/sys/fs/cgroup/unified".into()),
        };
        let h = plan(&hybrid, "n1", "u1", l);
        let paths: Vec<_> = h.iter().map(|d| d.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/sys/fs/cgroup/memory/kubevmm/n1/vm-u1",
                "/sys/fs/cgroup/pids/kubevmm/n1/vm-u1",
                "/sys/fs/cgroup/cpu/kubevmm/n1/vm-u1",
                "/sys/fs/cgroup/devices/kubevmm/n1/vm-u1",
                "/sys/fs/cgroup/unified/kubevmm/n1/vm-u1"
            ]
        );
        assert_eq!(
            h[0].files,
            vec![("memory.limit_in_bytes", (96u64 << 20).to_string())]
        );
        assert_eq!(h[1].files, vec![("pids.max", "17".into())]);
        assert_eq!(h[2].files.len(), 2);
        assert!(h[3].files.is_empty());
        assert!(h[4].files.is_empty());
        // Without limits (cleanup), the same directories and no files.
        assert!(plan(&hybrid, "n1", "u1", None)
            .iter()
            .all(|d| d.files.is_empty()));
        assert!(plan(&Layout::None, "n1", "u1", l).is_empty());
        // Another node's VM of the same uid lives in another subtree.
        assert_ne!(plan(&hybrid, "n2", "u1", None)[0].path, h[0].path);
    }
}
