//! Attacks on the node agent and the VMM, each performed for real against a
//! private control plane, the real binaries and guests on `/dev/kvm`
//! (docs/security.md lists what each test proves): the jail a cluster VM's
//! VMM runs in, user paths opened beneath the allow-list, disk locks, the
//! bridge allow-list, a lost pid file.

mod agent_env;

use std::path::PathBuf;

use agent_env::{alive, start_agent, start_agent_with, Env};
use kubevmm_e2e::{bin_path, wait_for};

/// `/proc/PID/status` of every thread of `pid`.
fn thread_statuses(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or("", str::trim)
}

#[test]
fn the_vmm_is_jailed_unprivileged_filtered_and_limited() {
    let env = Env::new("jail");
    env.apply("j", "counter", "");
    env.wait_phase("j", "Running", 60);
    let uid = env.uid("j");
    let pid = env.vmm_pid(&uid).expect("vmm pid");
    let threads = thread_statuses(pid);
    assert!(threads.len() >= 2, "main and vCPU threads: {threads:?}");
    for st in &threads {
        let uids: Vec<u32> = status_field(st, "Uid:")
            .split_whitespace()
            .filter_map(|u| u.parse().ok())
            .collect();
        assert!(
            uids.len() == 4 && uids.iter().all(|u| *u >= 3_000_000),
            "Uid: {uids:?}"
        );
        assert_eq!(status_field(st, "CapEff:"), "0000000000000000");
        assert_eq!(status_field(st, "CapPrm:"), "0000000000000000");
        assert_eq!(status_field(st, "CapBnd:"), "0000000000000000");
        assert_eq!(status_field(st, "NoNewPrivs:"), "1");
        assert_eq!(
            status_field(st, "Seccomp:"),
            "2",
            "every thread is filtered"
        );
    }
    for ns in ["pid", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "the VMM has its own {ns} namespace");
    }
    let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root");
    assert_eq!(
        root,
        env.vm_dir(&uid).join("root"),
        "chrooted into the VM's empty root"
    );
    // Limits: 64Mi guest RAM + 64Mi overhead, 1 vCPU + 16 pids, 2 CPUs of quota.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let mut checked = 0;
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let dir = |c: &str| PathBuf::from(format!("/sys/fs/cgroup/{c}{path}"));
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        match ctrl {
            "memory" => {
                assert_eq!(
                    read(dir("memory").join("memory.limit_in_bytes")),
                    (128u64 << 20).to_string()
                );
                checked += 1;
            }
            "pids" => {
                assert_eq!(read(dir("pids").join("pids.max")), "17");
                checked += 1;
            }
            "" if dir("").join("memory.max").exists() => {
                assert_eq!(read(dir("").join("memory.max")), (128u64 << 20).to_string());
                assert_eq!(read(dir("").join("pids.max")), "17");
                checked += 2;
            }
            _ => {}
        }
        assert!(!path.is_empty());
    }
    assert!(checked >= 2, "memory and pid limits found in {cgroups}");
}

#[test]
fn user_paths_are_opened_beneath_the_allow_list_and_disks_are_locked() {
    let mut env = Env::new("paths");
    // Room for two VMs at once (the victim and the thief).
    env.agent.kill();
    env.agent = start_agent_with(
        env.cp,
        &env.node,
        &env.state,
        &env.guests,
        "agent2.log",
        "0",
    );
    let tag = &env.ns;
    // A symlink inside the allowed directory pointing outside it.
    let link = env.guests.join(format!("evil-{tag}.elf"));
    let disk = env.guests.join(format!("shared-{tag}.img"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/hostname", &link).expect("symlink");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let cleanup = || {
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&disk);
    };
    // Two vCPUs on the test node: each refused VM is deleted again.
    let refused = |name: &str, words: &[&str]| {
        env.wait_phase(name, "Failed", 60);
        let ready = env.condition(name, "Ready").expect("Ready");
        let msg = ready["message"].as_str().unwrap_or_default().to_string();
        assert!(words.iter().all(|w| msg.contains(w)), "{name}: {msg}");
        env.kubectl(&["delete", "vm", name, "--wait=true", "--timeout=60s"]);
    };
    env.apply_kernel("link", &link, "");
    refused(
        "link",
        &[
            "spec.boot.kernel.path",
            "resolves outside the allowed directory",
        ],
    );

    // Another VM's state (its empty disk) is outside every allowed directory.
    env.apply(
        "victim",
        "counter",
        "  disks:\n  - {name: scratch, emptyDisk: {size: 1Mi}}\n",
    );
    env.wait_phase("victim", "Running", 60);
    let victim_disk = env
        .state
        .join("disks")
        .join(env.uid("victim"))
        .join("disk-scratch.img");
    assert!(victim_disk.exists());
    env.apply(
        "thief",
        "counter",
        &format!(
            "  disks:\n  - {{name: stolen, hostDisk: {{path: {}}}}}\n",
            victim_disk.display()
        ),
    );
    refused(
        "thief",
        &[
            "spec.disks[0].hostDisk.path",
            "outside the allowed directories",
        ],
    );
    env.kubectl(&["delete", "vm", "victim", "--wait=true", "--timeout=60s"]);

    // One writer per disk file: the second VMM finds the file locked.
    let rw = format!(
        "  disks:\n  - {{name: d, hostDisk: {{path: {}}}}}\n",
        disk.display()
    );
    env.apply("writer", "counter", &rw);
    env.wait_phase("writer", "Running", 60);
    let f = std::fs::File::open(&disk).expect("disk");
    // SAFETY: flock on a file we opened; LOCK_NB never blocks.
    let held = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_SH | libc::LOCK_NB,
        )
    };
    assert_eq!(
        held, -1,
        "the running VMM holds an exclusive lock on its disk"
    );
    env.apply("second", "counter", &rw);
    refused(
        "second",
        &[
            "spec.disks[0].hostDisk.path",
            &format!("in use by VM {}/writer", env.ns),
        ],
    );
    env.kubectl(&["delete", "vm", "writer", "--wait=true", "--timeout=60s"]);
    // SAFETY: as above.
    let free = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(free, 0, "the lock ends with the VMM");
    cleanup();
}

#[test]
fn an_agent_refuses_state_inside_an_allowed_directory() {
    let env = Env::new("overlap");
    let out = std::process::Command::new(bin_path("node-vmm"))
        .env("KUBECONFIG", env.cp.kubeconfig())
        .args(["agent", "--node-name", "overlap", "--state-dir"])
        .arg(env.guests.join("state"))
        .arg("--allowed-dir")
        .arg(&env.guests)
        .output()
        .expect("node-vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("overlaps allowed directory"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(env.guests.join("state"));
}

#[test]
fn bridges_must_be_allow_listed() {
    let env = Env::new("bridge");
    env.apply(
        "b",
        "counter",
        "  networks:\n  - {name: lan, bridge: {name: br-notallowed}}\n",
    );
    env.wait_phase("b", "Failed", 60);
    let ready = env.condition("b", "Ready").expect("Ready");
    let msg = ready["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spec.networks[0].bridge.name") && msg.contains("not in the allowed bridges"),
        "{msg}"
    );
}

#[test]
fn a_lost_pid_file_never_leaves_two_vmms_for_one_vm() {
    let mut env = Env::new("pidfile");
    env.apply("p", "counter", "");
    env.wait_phase("p", "Running", 60);
    let uid = env.uid("p");
    let old = env.vmm_pid(&uid).expect("vmm pid");
    env.agent.kill();
    // The agent's record of the VMM is gone; the VMM still runs.
    std::fs::remove_file(env.vm_dir(&uid).join("vmm.pid")).expect("remove vmm.pid");
    assert!(alive(old));
    env.agent = start_agent(env.cp, &env.node, &env.state, &env.guests, "agent2.log");
    wait_for(
        90,
        "a new VMM for the VM, the old one stopped",
        || {
            let new = env.vmm_pid(&uid)?;
            (new != old && !alive(old) && env.phase("p").as_deref() == Some("Running"))
                .then_some(())
        },
        || env.describe("p"),
    );
}
