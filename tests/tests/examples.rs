//! The examples users copy, applied as they are (only their image sources
//! pointed at a server the test starts, since nothing here reaches the
//! internet): `examples/web-1.yaml`'s storage — kernel and initrd from
//! images, a root overlay over a qcow2 image, a sparse scratch disk and a
//! cloud-init seed — is prepared on a node and the VMM starts on it, with
//! its `masquerade` NIC on the node bridge, an address reserved and the
//! NAT and anti-spoofing rules in place. Linux itself does not get far
//! under software KVM (docs/guests.md), so it never asks for its lease here.
mod agent_env;
mod net_env;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use agent_env::Env;
use kubevmm_e2e::http_server::{FileServer, Served};
use kubevmm_e2e::{repo_root, run_with_input, wait_for};
use serde::Deserialize as _;
use serde_yaml::Value;

/// The Linux kernel and initramfs `hack/fixtures-linux.sh` caches (`make
/// deps` runs it).
fn linux_fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("KUBEVMM_LINUX_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kubevmm/linux"),
        PathBuf::from,
    );
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make deps` (hack/fixtures-linux.sh) first",
        p.display()
    );
    p
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("example");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("yaml"))
        .collect()
}

fn apply(env: &Env, doc: &Value) {
    let o = run_with_input(
        env.cp.kubectl().args(["apply", "-n", &env.ns, "-f", "-"]),
        &serde_yaml::to_string(doc).expect("yaml"),
    );
    assert!(o.success, "{}", o.stderr);
}

fn qemu_img_json(args: &[&str], file: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(file)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
#[allow(clippy::too_many_lines)] // one example, applied and inspected
fn the_storage_of_web_1_is_prepared_from_its_images() {
    // The node's masquerade network is one this test makes (its own bridge,
    // subnet and uplink), so nothing reaches the machine's real uplink.
    let nets = net_env::Nets::new(3);
    let args = nets.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = Env::with_args("web-1", &args, &["--cpu-overcommit", "4"]);
    let served = env.state.join("served");
    std::fs::create_dir_all(&served).expect("dir");
    let root = served.join("debian-12.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&root)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let srv = FileServer::start().expect("http server");
    let files = [
        ("debian-6.1", linux_fixture("vmlinux")),
        ("debian-6.1-initrd", linux_fixture("initramfs.cpio.gz")),
        ("debian-12", root),
    ];
    for (name, file) in &files {
        srv.serve(
            name,
            Served {
                file: file.clone(),
                ..Served::default()
            },
        );
    }

    // The images of examples/debian-images.yaml, their sources served here.
    let examples = repo_root().join("examples");
    for mut img in docs(&examples.join("debian-images.yaml")) {
        let name = img["metadata"]["name"].as_str().expect("name").to_string();
        assert!(
            files.iter().any(|(n, _)| *n == name),
            "unknown image {name}"
        );
        img["spec"]["source"] =
            serde_yaml::from_str(&format!("http: {{url: \"{}\"}}", srv.url(&name)))
                .expect("source");
        apply(&env, &img);
    }
    // examples/web-1.yaml, placed on this test's node.
    let mut vm = docs(&examples.join("web-1.yaml")).remove(0);
    let Value::Mapping(spec) = &mut vm["spec"] else {
        panic!("spec")
    };
    spec.insert(
        "nodeSelector".into(),
        serde_yaml::from_str(&format!("{{kubevmm.io/test-node: {}}}", env.node)).expect("selector"),
    );
    apply(&env, &vm);
    let uid = env.uid("web-1");
    env.wait_phase("web-1", "Running", 180);
    let ready = env.condition("web-1", "Ready").expect("Ready");
    assert_eq!(ready["reason"], "GuestRunning", "{ready}");

    // The masquerade NIC: a tap on the node bridge, its address reserved,
    // the guest held to its MAC and address.
    let vmj: serde_json::Value =
        serde_json::from_str(&env.kubectl(&["get", "vm", "web-1", "-o", "json"])).expect("json");
    let tap = vmj
        .pointer("/status/interfaces/0/tap")
        .and_then(serde_json::Value::as_str)
        .expect("tap in status")
        .to_string();
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).expect("master");
    assert!(master.ends_with(&nets.bridge), "{master:?}");
    let leases = std::fs::read_to_string(env.state.join("network/leases.json")).expect("leases");
    assert!(leases.contains(&uid), "{leases}");
    let rules = net_env::sh("nft", &["list", "table", "bridge", &nets.bridge]);
    assert!(rules.contains(&format!("nic_{tap}")), "{rules}");

    // Root: a qcow2 overlay in the VM's disk directory over the cached base.
    let disks = env.state.join("disks").join(&uid);
    let chain = qemu_img_json(
        &["info", "-U", "--backing-chain", "--output=json"],
        &disks.join("disk-root.qcow2"),
    );
    let chain = chain.as_array().expect("chain");
    assert_eq!(chain.len(), 2, "overlay and base: {chain:?}");
    assert_eq!(chain[0]["format"], "qcow2");
    assert!(
        chain[0]["backing-filename"]
            .as_str()
            .is_some_and(|b| b.contains("/images/sha256-")),
        "{chain:?}"
    );
    // Scratch: 1Gi, sparse.
    let scratch = std::fs::metadata(disks.join("disk-scratch.img")).expect("scratch");
    assert_eq!(scratch.len(), 1 << 30);
    assert!(
        scratch.blocks() * 512 < 1 << 20,
        "sparse: {} blocks",
        scratch.blocks()
    );
    // Seed: NoCloud, label cidata, the example's user-data.
    let seed = env.vm_dir(&uid).join("seed-seed.img");
    let label = Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(&seed)
        .output()
        .expect("blkid");
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "cidata");
    let user_data = Command::new("mcopy")
        .arg("-i")
        .arg(&seed)
        .args(["::user-data", "-"])
        .output()
        .expect("mcopy");
    assert!(
        String::from_utf8_lossy(&user_data.stdout).contains("packages: [nginx]"),
        "{}",
        String::from_utf8_lossy(&user_data.stdout)
    );
    // The images say where they are and what they are.
    let img: serde_json::Value =
        serde_json::from_str(&env.kubectl(&["get", "vmimage", "debian-12", "-o", "json"]))
            .expect("json");
    assert_eq!(img["status"]["format"], "qcow2", "{}", img["status"]);
    assert_eq!(
        img["status"]["virtualSize"], "67108864",
        "{}",
        img["status"]
    );

    env.kubectl(&["delete", "vm", "web-1", "--wait=true", "--timeout=120s"]);
    wait_for(
        30,
        "web-1's disks to go with it",
        || (!disks.exists()).then_some(()),
        || agent_env::tail(&env.agent.output()),
    );
}
