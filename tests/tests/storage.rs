//! Disks prepared by the agent, end to end: a `cloudInit` disk becomes a
//! `NoCloud` seed image (FAT, label `cidata`) in the VM's state directory,
//! which standard tools read, which the guest reads over virtio-blk
//! (read-only: its writes are refused) with the checksum of the host file,
//! and which is written again from the spec at every start.
mod agent_env;

use std::path::Path;
use std::process::Command;

use agent_env::Env;
use kubevmm_e2e::{crc32, wait_for};
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
