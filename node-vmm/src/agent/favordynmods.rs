//! Fast cgroup migrations: the `favordynmods` option of the cgroup2 mount.
//!
//! Every VM start moves its shim into the VM's cgroups (a write to
//! `cgroup.procs` in each hierarchy). The kernel guards migrations with one
//! global per-CPU rwsem, `cgroup_threadgroup_rwsem`; by default its write
//! side waits for an RCU grace period. On the development machine (cgroup
//! v1, `HZ=250`) the first migration of a start took 5–16 ms, asleep, and
//! every fork on the host waited behind it. With `favordynmods` the rwsem
//! stays in its slow-reader mode: a migration takes ~0.3 ms, and forks and
//! exits pay an atomic operation more (Linux 6.0+, Documentation/admin-guide/
//! cgroup-v2.rst). The option lives on the cgroup2 root but acts on that
//! global rwsem, so it speeds up the v1 hierarchies of a hybrid host too.
//!
//! The agent turns it on at start unless `--no-cgroup-favordynmods` says
//! to leave the host's mounts alone: [`plan`] decides from
//! `/proc/self/mountinfo` (pure, table-tested), [`apply`] reconfigures the
//! mount through `fspick(2)`/`fsconfig(2)`, passing the mount's other
//! options again (the kernel resets the cgroup2 flags a reconfiguration
//! does not name). Where there is no cgroup2 mount, the kernel command line
//! `cgroup_favordynmods=true` does the same from boot.

use std::path::{Path, PathBuf};

/// Errors turning `favordynmods` on.
#[derive(Debug, thiserror::Error)]
pub enum FavorError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path}: {source}")]
    MountInfo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A step of the reconfiguration failed (EPERM without `CAP_SYS_ADMIN`,
    /// EINVAL on a kernel without the option).
    #[error("reconfiguring the cgroup2 mount at {mount} ({step}): {source}")]
    Reconfigure {
        /// The mount point.
        mount: PathBuf,
        /// `open`, `fspick`, `fsconfig <option>` or `fsconfig reconfigure`.
        step: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The option's name, in mountinfo and for `fsconfig`.
pub const OPTION: &str = "favordynmods";

/// One line of `/proc/self/mountinfo`, the parts used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted (octal escapes decoded).
    pub point: PathBuf,
    /// The filesystem type (`cgroup`, `cgroup2`, ...).
    pub fstype: String,
    /// The superblock's options.
    pub super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo` (proc(5)); lines that do not parse are
/// skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let point = head.split(' ').nth(4)?;
            let mut tail = tail.split(' ');
            let fstype = tail.next()?.to_string();
            let _source = tail.next()?;
            let super_options = tail
                .next()
                .unwrap_or_default()
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect();
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                fstype,
                super_options,
            })
        })
        .collect()
}

/// Decodes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let octal = bytes
            .get(at + 1..at + 4)
            .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match (bytes[at], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                at += 4;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to do about the option on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A cgroup mount already shows it: migrations are fast.
    AlreadyOn(PathBuf),
    /// Reconfigure the cgroup2 mount at `mount` with `options`: its current
    /// ones and [`OPTION`].
    Reconfigure {
        /// The cgroup2 mount point.
        mount: PathBuf,
        /// Every option to set, in order.
        options: Vec<String>,
    },
    /// No cgroup2 mount to reconfigure (a v1-only host): only the kernel
    /// command line `cgroup_favordynmods=true` can turn it on.
    NoCgroup2,
}

/// Decides from the mounts (pure).
pub fn plan(mounts: &[Mount]) -> Plan {
    let cgroup = |m: &&Mount| m.fstype == "cgroup" || m.fstype == "cgroup2";
    if let Some(on) = mounts
        .iter()
        .filter(cgroup)
        .find(|m| m.super_options.iter().any(|o| o == OPTION))
    {
        return Plan::AlreadyOn(on.point.clone());
    }
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => Plan::Reconfigure {
            mount: m.point.clone(),
            options: m
                .super_options
                .iter()
                .cloned()
                .chain(std::iter::once(OPTION.to_string()))
                .collect(),
        },
        None => Plan::NoCgroup2,
    }
}

/// Reconfigures the cgroup2 mount at `mount` with `options` (each a flag),
/// from the host's cgroup namespace: the kernel changes the cgroup2 root's
/// flags only for a caller there. An agent in a pod of its own cgroup
/// namespace (but with the host's PIDs, as the chart runs it) does the
/// reconfiguration on a thread that joined `host_ns` ([`HOST_CGROUP_NS`]).
pub fn apply(mount: &Path, options: &[String], host_ns: &Path) -> Result<(), FavorError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            join_cgroup_namespace(host_ns);
            reconfigure(mount, options)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(FavorError::Reconfigure {
                mount: mount.to_path_buf(),
                step: "thread".into(),
                source: std::io::Error::other("the reconfiguring thread panicked"),
            })
        })
    })
}

/// The host's cgroup namespace, as an agent with the host's PIDs sees it.
pub const HOST_CGROUP_NS: &str = "/proc/1/ns/cgroup";

/// Moves the calling thread into the cgroup namespace `ns` when it is not
/// in it already; where that fails (no such file, no permission), the
/// thread stays where it is, and a mount of another namespace does not take
/// the option: [`Outcome::NotTaken`].
fn join_cgroup_namespace(ns: &Path) {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let own = id(Path::new("/proc/thread-self/ns/cgroup"));
    if matches!((id(ns), own), (Ok(a), Ok(b)) if a == b) {
        return;
    }
    if let Ok(f) = std::fs::File::open(ns) {
        // SAFETY: setns takes a namespace fd we own for the call and a
        // flag; it changes only this thread's cgroup namespace, and the
        // thread ends right after the reconfiguration.
        let _ = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWCGROUP) };
    }
}

fn reconfigure(mount: &Path, options: &[String]) -> Result<(), FavorError> {
    use rustix::mount::{fsconfig_reconfigure, fsconfig_set_flag, fspick, FsPickFlags};
    use std::os::fd::AsFd as _;
    let fail = |step: &str| {
        let mount = mount.to_path_buf();
        let step = step.to_string();
        move |e: rustix::io::Errno| FavorError::Reconfigure {
            mount,
            step,
            source: e.into(),
        }
    };
    let root = std::fs::File::open(mount).map_err(|source| FavorError::Reconfigure {
        mount: mount.to_path_buf(),
        step: "open".into(),
        source,
    })?;
    let ctx = fspick(
        &root,
        "",
        FsPickFlags::FSPICK_CLOEXEC | FsPickFlags::FSPICK_EMPTY_PATH,
    )
    .map_err(fail("fspick"))?;
    for option in options {
        fsconfig_set_flag(ctx.as_fd(), option.as_str())
            .map_err(fail(&format!("fsconfig {option}")))?;
    }
    fsconfig_reconfigure(ctx.as_fd()).map_err(fail("fsconfig reconfigure"))
}

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It was on already (the mount that shows it).
    WasOn(PathBuf),
    /// Turned on at this cgroup2 mount.
    TurnedOn(PathBuf),
    /// The kernel took the reconfiguration but the mount does not show the
    /// option: the agent is not in the host's cgroup namespace, where the
    /// cgroup2 root flags can be changed.
    NotTaken(PathBuf),
    /// No cgroup2 mount.
    NoCgroup2,
}

/// Reads the mounts from `mountinfo`, turns the option on where [`plan`]
/// says so and checks that the mount shows it afterwards.
/// `host_ns` is the namespace to reconfigure from ([`HOST_CGROUP_NS`]).
pub fn ensure(mountinfo: &Path, host_ns: &Path) -> Result<Outcome, FavorError> {
    let read = || {
        std::fs::read_to_string(mountinfo)
            .map(|t| parse_mountinfo(&t))
            .map_err(|source| FavorError::MountInfo {
                path: mountinfo.to_path_buf(),
                source,
            })
    };
    match plan(&read()?) {
        Plan::AlreadyOn(at) => Ok(Outcome::WasOn(at)),
        Plan::NoCgroup2 => Ok(Outcome::NoCgroup2),
        Plan::Reconfigure { mount, options } => {
            apply(&mount, &options, host_ns)?;
            Ok(match plan(&read()?) {
                Plan::AlreadyOn(_) => Outcome::TurnedOn(mount),
                _ => Outcome::NotTaken(mount),
            })
        }
    }
}

/// [`ensure`] on this process's mounts, said in the agent's log.
pub fn ensure_and_log() {
    let slow = "each VM start waits for an RCU grace period to move its VMM into its cgroups";
    match ensure(
        Path::new("/proc/self/mountinfo"),
        Path::new(HOST_CGROUP_NS),
    ) {
        Ok(Outcome::WasOn(at)) => {
            tracing::info!("cgroup migrations are fast: {OPTION} is on ({})", at.display());
        }
        Ok(Outcome::TurnedOn(at)) => tracing::info!(
            "turned {OPTION} on at the cgroup2 mount {}: moving a VMM into its cgroups no \
             longer waits for an RCU grace period (--no-cgroup-favordynmods leaves the mount alone)",
            at.display()
        ),
        Ok(Outcome::NotTaken(at)) => tracing::warn!(
            "{slow}: the cgroup2 mount at {} did not take {OPTION} (the agent is not in the \
             host's cgroup namespace); run it in the host's, or boot with cgroup_favordynmods=true",
            at.display()
        ),
        Ok(Outcome::NoCgroup2) => tracing::warn!(
            "{slow}: no cgroup2 mount to set {OPTION} on; boot with cgroup_favordynmods=true"
        ),
        Err(e) => tracing::warn!("{slow}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / / rw,relatime - overlay overlay rw,lowerdir=/l
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 30 0:35 / /sys/fs/cgroup/unified rw,nosuid,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn mount(point: &str, fstype: &str, options: &str) -> Mount {
        Mount {
            point: point.into(),
            fstype: fstype.into(),
            super_options: options.split(',').map(str::to_string).collect(),
        }
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[4],
            mount(
                "/sys/fs/cgroup/unified",
                "cgroup2",
                "rw,nsdelegate,memory_recursiveprot"
            )
        );
        assert_eq!(m[2], mount("/sys/fs/cgroup/cpu", "cgroup", "rw,cpu"));
        let escaped = parse_mountinfo("7 1 0:5 / /mnt/a\\040b\\134c rw - cgroup2 none rw\n");
        assert_eq!(escaped[0].point, PathBuf::from("/mnt/a b\\c"));
        assert!(parse_mountinfo("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn the_plan_for_each_host() {
        let reconfigure = |at: &str, options: &str| Plan::Reconfigure {
            mount: at.into(),
            options: options.split(',').map(str::to_string).collect(),
        };
        // mountinfo | plan
        let table = [
            (
                HYBRID.to_string(),
                reconfigure(
                    "/sys/fs/cgroup/unified",
                    "rw,nsdelegate,memory_recursiveprot,favordynmods",
                ),
            ),
            (
                HYBRID.replace("nsdelegate,", "nsdelegate,favordynmods,"),
                Plan::AlreadyOn("/sys/fs/cgroup/unified".into()),
            ),
            // Turned on from the kernel command line: the v1 roots show it.
            (
                HYBRID.replace("rw,cpu", "rw,cpu,favordynmods"),
                Plan::AlreadyOn("/sys/fs/cgroup/cpu".into()),
            ),
            (
                "9 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n".to_string(),
                reconfigure("/sys/fs/cgroup", "rw,favordynmods"),
            ),
            (
                HYBRID
                    .lines()
                    .filter(|l| !l.contains("cgroup2"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Plan::NoCgroup2,
            ),
            // Another filesystem's option of the same name counts for nothing.
            (
                "1 0 0:1 / /x rw - tmpfs t rw,favordynmods\n".to_string(),
                Plan::NoCgroup2,
            ),
        ];
        for (text, want) in table {
            assert_eq!(plan(&parse_mountinfo(&text)), want, "{text}");
        }
    }

    /// The real reconfiguration, off and on again, keeping the mount's
    /// other options, from a thread in a cgroup namespace of its own, as
    /// in a pod (needs root and a cgroup2 mount).
    #[test]
    fn the_option_is_turned_on_and_the_other_options_are_kept() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "mount tests need root");
        // This thread's namespace stands for the host's.
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let host = PathBuf::from(format!("/proc/self/task/{tid}/ns/cgroup"));
        std::thread::spawn(move || {
            // SAFETY: unshare takes a flag; it moves only this test thread
            // into a new cgroup namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            off_and_on_again(&host);
        })
        .join()
        .expect("the test thread");
    }

    fn off_and_on_again(host: &Path) {
        let info = Path::new("/proc/self/mountinfo");
        let mounts = parse_mountinfo(&std::fs::read_to_string(info).expect("mountinfo"));
        let v2 = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .expect("this test needs a cgroup2 mount")
            .clone();
        let others: Vec<String> = v2
            .super_options
            .iter()
            .filter(|o| *o != OPTION)
            .cloned()
            .collect();
        // Off first, so that the test can fail.
        apply(&v2.point, &others, host).expect("turn favordynmods off");
        assert_eq!(
            plan(&parse_mountinfo(&std::fs::read_to_string(info).unwrap())),
            Plan::Reconfigure {
                mount: v2.point.clone(),
                options: others.iter().cloned().chain([OPTION.to_string()]).collect()
            }
        );
        assert_eq!(
            ensure(info, host).expect("ensure"),
            Outcome::TurnedOn(v2.point.clone())
        );
        assert_eq!(
            ensure(info, host).expect("ensure again"),
            Outcome::WasOn(v2.point.clone())
        );
        let after = parse_mountinfo(&std::fs::read_to_string(info).unwrap())
            .into_iter()
            .find(|m| m.point == v2.point)
            .expect("still mounted");
        let mut want = others.clone();
        want.push(OPTION.into());
        let (mut got, mut want) = (after.super_options, want);
        got.sort();
        want.sort();
        assert_eq!(got, want, "the mount's other options are kept");
    }
}
