//! Table tests of the pure plan.

use super::*;
use crate::agent::taps::stable_mac;
use std::path::Path;

fn spec(yaml: &str) -> VirtualMachineSpec {
    serde_yaml::from_str(yaml).expect("spec")
}

fn id(uid: &str) -> VmId<'_> {
    VmId {
        uid,
        name: "vm-1",
        namespace: "ns",
    }
}

fn disk_dir() -> DiskDir {
    DiskDir(PathBuf::from("/state/disks/u"))
}

fn ctx() -> NodeContext {
    NodeContext {
        allowed_dirs: vec![PathBuf::from("/var/lib/kubevmm")],
        allowed_bridges: vec!["br0".into()],
        max_empty_disk: 1 << 40,
        images: BTreeMap::from([
            (
                "k".to_string(),
                CachedImage {
                    path: PathBuf::from("/state/images/sha256-aa"),
                    format: ImageFormat::Raw,
                },
            ),
            (
                "disk".to_string(),
                CachedImage {
                    path: PathBuf::from("/state/images/sha256-bb"),
                    format: ImageFormat::Qcow2,
                },
            ),
        ]),
        masquerade_bridge: Some("kubevmm0".into()),
    }
}

#[test]
fn builds_config_with_disks_and_bridge() {
    let s = spec(
        "memory: 128Mi\ncpus: 2\nboot: {kernel: {path: /var/lib/kubevmm/boot/k.elf}, cmdline: x}\n\
         disks: [{name: data, hostDisk: {path: /var/lib/kubevmm/disks/d.img}, readOnly: true}, {name: scratch, emptyDisk: {size: 1Gi}}]\n\
         networks: [{name: lan, bridge: {name: br0}}]\n",
    );
    let dir = VmDir(PathBuf::from("/run/vm1"));
    let p = plan(&s, id("0a1b2c3d-4e5f"), &dir, &disk_dir(), &ctx()).expect("plan");
    assert_eq!(p.config.cpus, 2);
    assert_eq!(p.config.memory, 128 << 20);
    assert_eq!(p.config.disks.len(), 2);
    assert!(p.config.disks[0].read_only);
    assert_eq!(p.config.disks[0].format, None, "a user's file is probed");
    assert_eq!(
        p.config.disks[1].format,
        Some(kubevmm_vmm::image::ImageFormat::Raw),
        "an empty disk is raw whatever the guest writes into it"
    );
    assert_eq!(
        p.sparse_files,
        vec![SparseFile {
            field: "spec.disks[1].emptyDisk.size".into(),
            path: PathBuf::from("/state/disks/u/disk-scratch.img"),
            size: 1 << 30
        }]
    );
    assert_eq!(
        p.opens.disks,
        vec![
            FileSource::User {
                field: "spec.disks[0].hostDisk.path".into(),
                path: "/var/lib/kubevmm/disks/d.img".into()
            },
            FileSource::State(PathBuf::from("/state/disks/u/disk-scratch.img")),
        ]
    );
    assert_eq!(p.taps[0].bridge, "br0");
    assert!(p.taps[0].name.len() <= 15);
    assert_eq!(p.interfaces[0].mac, stable_mac("0a1b2c3d-4e5f", "lan"));
    assert!(
        p.leases.is_empty(),
        "no address from us on an admin's bridge"
    );
}

#[test]
fn the_console_is_a_socket_and_a_ring_in_the_state_directory() {
    let s = spec("memory: 64Mi\ncpus: 1\nboot: {kernel: {path: /var/lib/kubevmm/boot/k.elf}}\n");
    let dir = VmDir(PathBuf::from("/run/vm1"));
    let p = plan(&s, id("u"), &dir, &disk_dir(), &ctx()).expect("plan");
    assert_eq!(
        p.config.serial,
        SerialConfig {
            mode: SerialMode::Socket,
            path: Some(PathBuf::from("/run/vm1/console.sock")),
            log: Some(PathBuf::from("/run/vm1/console.ring")),
            max_file_bytes: 1 << 20,
            file_format: SerialFileFormat::Ring,
        }
    );
}

#[test]
fn refuses_paths_outside_the_allow_list() {
    let s = spec("memory: 128Mi\nboot: {kernel: {path: /etc/shadow}}\n");
    let e = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &ctx(),
    )
    .unwrap_err();
    assert!(e
        .to_string()
        .contains("spec.boot.kernel.path: /etc/shadow is outside the allowed directories"));
}

#[test]
fn refuses_bridges_and_empty_disks_beyond_the_node_limits() {
    let base = "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n";
    let cases = [
        (
            "networks: [{name: lan, bridge: {name: br1}}]\n",
            "spec.networks[0].bridge.name: bridge br1 is not in the allowed bridges (br0)",
        ),
        (
            "disks: [{name: big, emptyDisk: {size: 2Ti}}]\n",
            "spec.disks[0].emptyDisk.size: 2199023255552 bytes is more than this node allows",
        ),
    ];
    for (extra, want) in cases {
        let s = spec(&format!("{base}{extra}"));
        let e = plan(
            &s,
            id("u"),
            &VmDir(PathBuf::from("/x")),
            &disk_dir(),
            &ctx(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with(want), "{e}");
    }
}

#[test]
fn a_mac_that_is_not_six_hex_pairs_is_refused() {
    for bad in [
        "52:54:00:12:34",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:56\" drop",
        "52-54-00-12-34-56",
    ] {
        let s = spec(&format!(
            "memory: 128Mi\nboot: {{kernel: {{path: /var/lib/kubevmm/k}}}}\nnetworks: [{{name: lan, bridge: {{name: br0}}, macAddress: '{bad}'}}]\n"
        ));
        let e = plan(
            &s,
            id("u"),
            &VmDir(PathBuf::from("/x")),
            &disk_dir(),
            &ctx(),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("spec.networks[0].macAddress"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn masquerade_nics_go_on_the_node_bridge_with_an_address_to_reserve() {
    let s = spec("memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\nnetworks: [{name: default, masquerade: {}}, {name: lan, bridge: {name: br0}}]\n");
    let p = plan(
        &s,
        id("u1"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &ctx(),
    )
    .expect("plan");
    assert_eq!(p.taps[0].bridge, "kubevmm0");
    assert_eq!(p.taps[1].bridge, "br0");
    assert_eq!(
        p.leases,
        vec![nics::LeaseRequest {
            field: "spec.networks[0]".into(),
            network: "default".into(),
            mac: stable_mac("u1", "default"),
        }]
    );
    assert!(p.interfaces[0].masquerade && !p.interfaces[1].masquerade);
    // Without the agent (node-vmm run): refused, naming the field.
    let standalone = NodeContext {
        masquerade_bridge: None,
        ..ctx()
    };
    let e = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &standalone,
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("spec.networks[0].masquerade"),
        "{e}"
    );
}

#[test]
fn cloud_init_disks_are_generated_read_only_seeds() {
    let base = "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n";
    let cases = [
        ("readOnly: false", "user-data", "#cloud-config\n"),
        ("readOnly: true", "user-data", "#cloud-config\n"),
    ];
    for (ro, file, contents) in cases {
        let s = spec(&format!(
            "{base}disks: [{{name: root, emptyDisk: {{size: 1Gi}}}}, {{name: seed, {ro}, cloudInit: {{userData: \"#cloud-config\\n\", networkData: \"version: 2\\n\"}}}}]\n"
        ));
        let dir = VmDir(PathBuf::from("/run/vm1"));
        let p = plan(&s, id("0a1b2c3d"), &dir, &disk_dir(), &ctx()).expect("plan");
        let path = PathBuf::from("/run/vm1/seed-seed.img");
        assert!(
            p.config.disks[1].read_only,
            "{ro}: the guest never writes its seed"
        );
        assert!(!p.config.disks[0].read_only);
        assert_eq!(p.config.disks[1].path, path);
        assert_eq!(p.opens.disks[1], FileSource::State(path.clone()));
        assert_eq!(p.seeds.len(), 1);
        assert_eq!(p.seeds[0].path, path);
        assert_eq!(p.seeds[0].volume_id, seed::volume_id("0a1b2c3d"));
        let names: Vec<&str> = p.seeds[0].files.iter().map(|f| f.name).collect();
        assert_eq!(names, ["user-data", "meta-data", "network-config"]);
        assert_eq!(p.seeds[0].files[0].name, file);
        assert_eq!(p.seeds[0].files[0].contents, contents);
        assert_eq!(
            p.seeds[0].files[1].contents,
            "instance-id: 0a1b2c3d\nlocal-hostname: vm-1\n"
        );
    }
}

#[test]
fn image_disks_are_qcow2_overlays_of_the_cached_image() {
    let s = spec(
        "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n\
         disks: [{name: root, image: {name: disk}}, {name: other, image: {name: missing}}]\n",
    );
    let e = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &ctx(),
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "spec.disks[1].image.name: VirtualMachineImage missing is not in this node's image cache yet"
        ),
        "{e}"
    );
    let s = spec(
        "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\ndisks: [{name: root, image: {name: disk}}]\n",
    );
    let p = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/run/vm1")),
        &disk_dir(),
        &ctx(),
    )
    .expect("plan");
    let overlay = PathBuf::from("/state/disks/u/disk-root.qcow2");
    let local = p.local_disks.as_ref().expect("an overlay is a local disk");
    assert_eq!(local.dir, disk_dir());
    assert_eq!(local.owner.namespace, "ns");
    assert_eq!(p.config.disks[0].path, overlay);
    assert_eq!(
        p.config.disks[0].format,
        Some(kubevmm_vmm::image::ImageFormat::Qcow2),
        "the overlay the agent made is never probed"
    );
    assert_eq!(
        p.opens.disks[0],
        FileSource::Overlay {
            overlay,
            base: PathBuf::from("/state/images/sha256-bb"),
        }
    );
}

#[test]
fn boot_images_resolve_to_raw_cached_files() {
    let s = spec("memory: 128Mi\nboot: {kernel: {image: k}, initrd: {image: k}}\n");
    let p = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &ctx(),
    )
    .expect("plan");
    let cached = PathBuf::from("/state/images/sha256-aa");
    assert_eq!(p.config.kernel, cached);
    assert_eq!(p.opens.kernel, FileSource::State(cached.clone()));
    assert_eq!(p.opens.initrd, Some(FileSource::State(cached)));
    let cases = [
        (
            "boot: {kernel: {image: disk}}",
            "spec.boot.kernel.image: VirtualMachineImage disk is a qcow2 disk image; a kernel or initrd must be a raw file",
        ),
        (
            "boot: {kernel: {image: k}, initrd: {image: disk}}",
            "spec.boot.initrd.image: VirtualMachineImage disk is a qcow2",
        ),
        (
            "boot: {kernel: {image: other}}",
            "spec.boot.kernel.image: VirtualMachineImage other is not in this node's image cache",
        ),
    ];
    for (boot, want) in cases {
        let s = spec(&format!("memory: 128Mi\n{boot}\n"));
        let e = plan(
            &s,
            id("u"),
            &VmDir(PathBuf::from("/x")),
            &disk_dir(),
            &ctx(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with(want), "{e}");
    }
}

#[test]
fn cloud_init_meta_data_that_is_not_a_mapping_is_refused() {
    let s = spec(
        "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n\
         disks: [{name: seed, cloudInit: {metaData: \"- a\\n\"}}]\n",
    );
    let e = plan(
        &s,
        id("u"),
        &VmDir(PathBuf::from("/x")),
        &disk_dir(),
        &ctx(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("spec.disks[0].cloudInit.metaData: meta-data must be a YAML mapping"),
        "{e}"
    );
}

#[test]
fn the_examples_prepare_their_seed_disks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
            if v.get("kind").and_then(serde_yaml::Value::as_str) != Some("VirtualMachine") {
                continue;
            }
            let vm: kubevmm_crds::VirtualMachine =
                serde_yaml::from_value(v).expect("a VirtualMachine");
            let cloud_init = vm.spec.disks.iter().any(|d| d.cloud_init.is_some());
            let ctx = NodeContext {
                allowed_dirs: vec![PathBuf::from("/")],
                ..ctx()
            };
            match plan(
                &vm.spec,
                id("u"),
                &VmDir(PathBuf::from("/x")),
                &disk_dir(),
                &ctx,
            ) {
                Ok(p) => seeds += p.seeds.len(),
                Err(e) => {
                    let text = e.to_string();
                    assert!(!text.contains("cloudInit"), "{}: {text}", path.display());
                    // Images and masquerade are other work; the seed is not.
                    assert!(
                        matches!(e, PrepareError::Unsupported { .. }),
                        "{}: {e}",
                        path.display()
                    );
                    if cloud_init {
                        let mut only_seeds = vm.spec.clone();
                        only_seeds.disks.retain(|d| d.cloud_init.is_some());
                        only_seeds.networks.clear();
                        only_seeds.boot.kernel.image = None;
                        only_seeds.boot.kernel.path = Some("/k".into());
                        only_seeds.boot.initrd = None;
                        let p = plan(
                            &only_seeds,
                            id("u"),
                            &VmDir(PathBuf::from("/x")),
                            &disk_dir(),
                            &ctx,
                        )
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        seeds += p.seeds.len();
                    }
                }
            }
        }
    }
    assert!(seeds > 0, "no example has a cloudInit disk");
}

#[test]
fn macs_are_stable_unicast_and_local() {
    let m = stable_mac("uid", "lan");
    assert_eq!(m, stable_mac("uid", "lan"));
    assert_ne!(m, stable_mac("uid", "wan"));
    assert!(m.starts_with("52:54:00:"));
}

#[test]
fn each_preparation_failure_names_its_reason() {
    let s = String::new;
    let table = [
        (
            PrepareError::Host {
                what: s(),
                why: s(),
            },
            reason::HOST_SETUP_FAILED,
        ),
        (
            PrepareError::NoSpace {
                field: s(),
                need: 2,
                free: 1,
                dir: s(),
            },
            reason::INSUFFICIENT_SPACE,
        ),
        (
            PrepareError::Network {
                field: s(),
                reason: reason::SUBNET_OVERLAP,
                what: s(),
            },
            reason::SUBNET_OVERLAP,
        ),
        (
            PrepareError::Unsupported {
                field: s(),
                what: s(),
            },
            reason::INVALID_SPEC,
        ),
        (
            PrepareError::BridgeNotAllowed {
                field: s(),
                bridge: s(),
                allowed: s(),
            },
            reason::INVALID_SPEC,
        ),
    ];
    for (err, want) in table {
        assert_eq!(err.reason(), want, "{err:?}");
    }
}
