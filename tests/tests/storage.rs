//! Disks prepared by the agent, end to end: a `cloudInit` disk becomes a
//! `NoCloud` seed image (FAT, label `cidata`) in the VM's state directory,
//! which standard tools read, which the guest reads over virtio-blk
//! (read-only: its writes are refused) with the checksum of the host file,
//! and which is written again from the spec at every start. `emptyDisk`
//! and `image` disks live with the VM: across stop/start (the operator
//! keeps the VM on the node that holds them) and agent restarts, until the
//! VM is deleted.
mod agent_env;

use std::path::Path;
use std::process::Command;

use agent_env::{start_agent_args, Env};
use kubevmm_e2e::http_server::{FileServer, Served};
use kubevmm_e2e::{crc32, run_with_input, wait_for};
use serde_json::Value;

/// The line our `blk` guest prints for a disk whose first 64 KiB are those of `img`.
fn crc_line(img: &[u8]) -> String {
    format!("disk crc32 {:#018x}", crc32(&img[..64 * 1024]))
}

fn tool(cmd: &str, args: &[&str], img: &Path) -> Option<String> {
    let out = Command::new(cmd).args(args).arg(img).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mcopy -i IMG ::NAME -`: a file of the FAT image.
fn mcopy(img: &Path, name: &str) -> Option<String> {
    let out = Command::new("mcopy")
        .arg("-i")
        .arg(img)
        .arg(format!("::{name}"))
        .arg("-")
        .output()
        .expect("mcopy (hack/install-deps.sh installs mtools)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restarts(env: &Env, name: &str) -> i64 {
    env.vm(name)
        .and_then(|v| v.pointer("/status/restartCount").and_then(Value::as_i64))
        .unwrap_or(0)
}

#[test]
fn cloud_init_seed_is_generated_read_only_and_read_by_the_guest() {
    let env = Env::new("seed");
    // The blk guest reads the first 64 KiB of its disk and prints their
    // CRC32, then checks that a write is refused ("ro"); it powers off and
    // runStrategy Always starts it again: each start rewrites the seed.
    env.apply(
        "seeded",
        "blk",
        "    cmdline: ro\n  disks:\n  - name: seed\n    readOnly: false\n    cloudInit:\n      \
         userData: \"#cloud-config\\nhostname: seeded\\n\"\n      metaData: \"zone: b\\n\"\n      \
         networkData: \"version: 2\\n\"\n",
    );
    let uid = env.uid("seeded");
    let img = env.vm_dir(&uid).join("seed-seed.img");
    wait_for(
        60,
        "the guest to read its seed disk",
        || {
            env.console(&uid)
                .contains("read-only write refused")
                .then_some(())
        },
        || format!("{}\n{}", env.console(&uid), env.describe("seeded")),
    );
    let bytes = std::fs::read(&img).expect("seed image in the VM's state directory");
    let user_data = b"#cloud-config\nhostname: seeded\n";
    assert!(
        bytes[..64 * 1024]
            .windows(user_data.len())
            .any(|w| w == user_data),
        "the checksummed 64 KiB hold the user-data itself, not only the FAT"
    );
    let console = env.console(&uid);
    assert!(
        console.contains(&crc_line(&bytes)),
        "the guest's checksum is not the host file's ({}):\n{console}",
        crc_line(&bytes)
    );
    assert!(console.contains("disk serial seed"), "{console}");
    assert_eq!(
        tool("blkid", &["-o", "value", "-s", "LABEL"], &img)
            .expect("blkid")
            .trim(),
        "cidata"
    );
    assert_eq!(
        mcopy(&img, "user-data").as_deref(),
        Some("#cloud-config\nhostname: seeded\n")
    );
    assert_eq!(
        mcopy(&img, "meta-data").expect("meta-data"),
        format!("instance-id: {uid}\nlocal-hostname: seeded\nzone: b\n")
    );
    assert_eq!(
        mcopy(&img, "network-config").as_deref(),
        Some("version: 2\n")
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&img).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Spoil the file and change the spec: the next start writes the seed
    // anew from the spec, and the guest reads the new one.
    std::fs::write(&img, vec![0u8; 4096]).expect("spoil the seed");
    let before = restarts(&env, "seeded");
    env.kubectl(&[
        "patch",
        "vm",
        "seeded",
        "--type",
        "json",
        "-p",
        r##"[{"op":"replace","path":"/spec/disks/0/cloudInit/userData","value":"#!/bin/sh\necho second\n"}]"##,
    ]);
    let fresh = wait_for(
        90,
        "a restart that rewrites the seed from the new spec",
        || {
            (restarts(&env, "seeded") > before).then_some(())?;
            let bytes = std::fs::read(&img).ok()?;
            (mcopy(&img, "user-data")?.as_str() == "#!/bin/sh\necho second\n").then_some(bytes)
        },
        || env.describe("seeded"),
    );
    wait_for(
        30,
        "the guest to read the new seed",
        || env.console(&uid).contains(&crc_line(&fresh)).then_some(()),
        || env.console(&uid),
    );
    env.kubectl(&[
        "patch",
        "vm",
        "seeded",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"runStrategy":"Halted"}}"#,
    ]);
    env.wait_phase("seeded", "Stopped", 60);
}

fn apply(env: &Env, manifest: &str) {
    let o = run_with_input(
        env.cp.kubectl().args(["apply", "-n", &env.ns, "-f", "-"]),
        manifest,
    );
    assert!(o.success, "{}", o.stderr);
}

fn set_strategy(env: &Env, name: &str, strategy: &str) {
    env.kubectl(&[
        "patch",
        "vm",
        name,
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{{"runStrategy":"{strategy}"}}}}"#),
    ]);
}

/// Waits for the persist guest to report `n` earlier boots on both disks.
fn boots(env: &Env, uid: &str, n: u32) {
    wait_for(
        120,
        &format!("the guest to find {n} earlier boots on both disks"),
        || {
            let c = env.console(uid);
            let has = |want: String| c.lines().any(|l| l.trim_end() == want);
            (has(format!("disk root boots {n}"))
                && has(format!("disk data boots {n}"))
                && c.contains("persist done"))
            .then_some(())
        },
        || format!("{}\n{}", env.console(uid), env.describe("p")),
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one VM's story, start to delete
fn local_disks_live_with_the_vm_across_stop_start_and_agent_restarts() {
    let mut env = Env::with_args(
        "disk-life",
        &["--max-empty-disk", "1Pi"],
        &["--cpu-overcommit", "4"],
    );
    let served = env.state.join("served");
    std::fs::create_dir_all(&served).expect("dir");
    let base = served.join("base.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let srv = FileServer::start().expect("http server");
    srv.serve(
        "base.qcow2",
        Served {
            file: base,
            ..Served::default()
        },
    );
    apply(
        &env,
        &format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachineImage\nmetadata: {{name: base}}\n\
             spec:\n  source: {{http: {{url: \"{}\"}}}}\n",
            srv.url("base.qcow2")
        ),
    );
    // The persist guest counts its boots on each disk and idles ("hold").
    let vm = |name: &str, data_size: &str| {
        format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: 1\n  \
             memory: 64Mi\n  terminationGracePeriodSeconds: 1\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  \
             boot:\n    kernel: {{path: {kernel}}}\n    cmdline: hold\n  disks:\n  - name: root\n    image: {{name: base}}\n  \
             - name: data\n    emptyDisk: {{size: {data_size}}}\n",
            node = env.node,
            kernel = env.guests.join("persist.elf").display(),
        )
    };
    apply(&env, &vm("p", "16Mi"));
    let uid = env.uid("p");
    boots(&env, &uid, 0);
    let disks = env.state.join("disks").join(&uid);
    let overlay = disks.join("disk-root.qcow2");
    assert!(overlay.is_file() && disks.join("disk-data.img").is_file());
    let disk_node = |env: &Env| {
        env.vm("p").and_then(|v| {
            v.pointer("/status/diskNode")
                .and_then(Value::as_str)
                .map(String::from)
        })
    };
    assert_eq!(disk_node(&env).as_deref(), Some(env.node.as_str()));

    // Stopped: the operator releases the VM; the agent's sweep releases its
    // taps and cgroups but keeps its disks (and its console, for a look at
    // the last run); the VM stays tied to the disks' node.
    set_strategy(&env, "p", "Halted");
    env.wait_phase("p", "Stopped", 60);
    std::thread::sleep(std::time::Duration::from_secs(12)); // a sweep pass
    assert!(overlay.is_file(), "the overlay outlives the stop");
    assert!(
        env.console(&uid).contains("persist done"),
        "the last run's console is kept"
    );
    assert_eq!(disk_node(&env).as_deref(), Some(env.node.as_str()));

    // A new agent finds them, and the next start uses them.
    env.agent.kill();
    env.agent = start_agent_args(
        env.cp,
        &env.node,
        &env.state,
        &env.guests,
        "agent2.log",
        "1",
        &["--max-empty-disk", "1Pi"],
    );
    set_strategy(&env, "p", "Always");
    boots(&env, &uid, 1);
    let check = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(&overlay)
        .output()
        .expect("qemu-img check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A disk larger than the node's free space: refused before any file is made.
    apply(&env, &vm("big", "900Ti"));
    let big = env.uid("big");
    let ready = env.wait_ready_reason("big", "InsufficientSpace", 60);
    let msg = ready["message"].as_str().unwrap_or_default();
    assert!(msg.contains("spec.disks[1].emptyDisk.size"), "{msg}");
    assert!(
        !env.state
            .join("disks")
            .join(&big)
            .join("disk-data.img")
            .exists(),
        "nothing half-made"
    );

    // Deleted while stopped: the sweep finds the VM gone and removes its
    // run state and disks; deleted while bound: released at once.
    set_strategy(&env, "p", "Halted");
    env.wait_phase("p", "Stopped", 60);
    env.kubectl(&["delete", "vm", "p", "big", "--wait=true", "--timeout=90s"]);
    let left = || {
        [
            &disks,
            &env.vm_dir(&uid),
            &env.state.join("disks").join(&big),
            &env.vm_dir(&big),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .cloned()
        .collect::<Vec<_>>()
    };
    wait_for(
        90,
        "the deleted VMs' run state and disks to be removed",
        || left().is_empty().then_some(()),
        || format!("{:?}\n{}", left(), agent_env::tail(&env.agent.output())),
    );
}
