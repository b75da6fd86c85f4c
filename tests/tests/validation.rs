//! The API server refuses bad `VirtualMachine`s with a message naming the
//! field and the rule, and accepts every example. Each bad manifest is
//! applied with `kubectl` to a real kube-apiserver carrying our CRDs, and
//! checked by the client-side validator of standalone mode as well: both
//! must refuse it, with the same words.

use kubevmm_crds::validation::validate_vm_spec;
use kubevmm_crds::VirtualMachine;
use kubevmm_e2e::{repo_root, run_with_input, ControlPlane};

/// A manifest with the given spec body (YAML, indented by 2).
fn vm(name: &str, spec: &str) -> String {
    format!("apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

const BOOT: &str = "  boot:\n    kernel: {path: /var/lib/kubevmm/boot/vmlinux}\n";

/// What standalone mode says about a manifest: a parse or a validation error.
fn client_side_error(manifest: &str) -> Option<String> {
    match serde_yaml::from_str::<VirtualMachine>(manifest) {
        Err(e) => Some(e.to_string()),
        Ok(vm) => validate_vm_spec(&vm.spec).err().map(|e| e.to_string()),
    }
}

fn assert_refused(name: &str, spec: &str, expect: &[&str]) {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("validation");
    let manifest = vm(name, spec);
    let out = run_with_input(
        cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
        &manifest,
    );
    assert!(
        !out.success,
        "API server accepted a bad manifest:\n{manifest}\n{}",
        out.stdout
    );
    for e in expect {
        assert!(
            out.stderr.contains(e),
            "API server refused\n{manifest}\nbut its message lacks {e:?}:\n{}",
            out.stderr
        );
    }
    let local = client_side_error(&manifest).unwrap_or_else(|| {
        panic!("client-side validation accepted a manifest the API server refuses:\n{manifest}")
    });
    for e in expect {
        assert!(
            local.contains(e),
            "client-side message lacks {e:?}: {local}"
        );
    }
}

macro_rules! refused {
    ($($test:ident: $spec:expr => [$($expect:expr),+];)+) => {$(
        #[test]
        fn $test() {
            let spec: String = $spec.into();
            assert_refused(&stringify!($test).replace('_', "-"), &spec, &[$($expect),+]);
        }
    )+};
}

refused! {
    zero_cpus: format!("  cpus: 0\n  memory: 128Mi\n{BOOT}") => ["spec.cpus", "spec.cpus must be between 1 and 256"];
    too_many_cpus: format!("  cpus: 257\n  memory: 128Mi\n{BOOT}") => ["spec.cpus must be between 1 and 256"];
    memory_too_small: format!("  memory: 32Mi\n{BOOT}") => ["spec.memory", "spec.memory must be at least 64Mi"];
    memory_not_a_quantity: format!("  memory: lots\n{BOOT}") => ["spec.memory must be a Kubernetes quantity"];
    memory_missing: BOOT => ["memory"];
    memory_as_integer: format!("  memory: 134217728\n{BOOT}") => ["spec.memory", "string"];
    kernel_missing: "  memory: 128Mi\n  boot: {cmdline: console=ttyS0}\n".to_string() => ["kernel"];
    kernel_two_sources: "  memory: 128Mi\n  boot:\n    kernel: {path: /boot/vmlinux, image: debian-6-1}\n"
        => ["spec.boot.kernel", "exactly one of image or path must be set"];
    initrd_no_source: format!("  memory: 128Mi\n{BOOT}    initrd: {{}}\n") => ["spec.boot.initrd", "exactly one of image or path must be set"];
    kernel_relative_path: "  memory: 128Mi\n  boot:\n    kernel: {path: boot/vmlinux}\n"
        => ["spec.boot.kernel.path", "path must be absolute and must not contain '..'"];
    kernel_dotdot_path: "  memory: 128Mi\n  boot:\n    kernel: {path: /var/lib/kubevmm/../../etc/shadow}\n"
        => ["spec.boot.kernel.path", "path must be absolute and must not contain '..'"];
    cmdline_too_long: format!("  memory: 128Mi\n{BOOT}    cmdline: \"{}\"\n", "x".repeat(2049)) => ["spec.boot.cmdline", "2048"];
    bad_run_strategy: format!("  runStrategy: Sometimes\n  memory: 128Mi\n{BOOT}") => ["runStrategy", "Sometimes", "Always"];
    duplicate_disk_names: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: root, emptyDisk: {{size: 1Gi}}}}\n  - {{name: root, emptyDisk: {{size: 2Gi}}}}\n")
        => ["spec.disks", "disk names must be unique"];
    disk_two_sources: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: root, emptyDisk: {{size: 1Gi}}, hostDisk: {{path: /var/lib/kubevmm/disks/a.img}}}}\n")
        => ["spec.disks[0]", "each disk needs exactly one source: image, emptyDisk, cloudInit or hostDisk"];
    disk_no_source: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: root, readOnly: true}}\n")
        => ["spec.disks[0]", "each disk needs exactly one source"];
    disk_name_not_dns_label: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: Root_Disk, emptyDisk: {{size: 1Gi}}}}\n")
        => ["spec.disks[0].name", "disk name must be a DNS label"];
    empty_disk_zero_size: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: scratch, emptyDisk: {{size: \"0\"}}}}\n")
        => ["spec.disks[0].emptyDisk.size", "emptyDisk.size must be greater than zero"];
    host_disk_relative: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: data, hostDisk: {{path: disks/data.img}}}}\n")
        => ["spec.disks[0].hostDisk.path", "hostDisk.path must be absolute and must not contain '..'"];
    host_disk_dotdot: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: data, hostDisk: {{path: /var/lib/kubevmm/disks/../../../etc/passwd}}}}\n")
        => ["spec.disks[0].hostDisk.path", "hostDisk.path must be absolute"];
    cloud_init_empty: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: seed, cloudInit: {{}}}}\n")
        => ["spec.disks[0].cloudInit", "cloudInit needs at least one of userData"];
    cloud_init_user_data_plain_yaml: format!("  memory: 128Mi\n{BOOT}  disks:\n  - name: seed\n    cloudInit:\n      userData: |\n        packages: [nginx]\n")
        => ["spec.disks[0].cloudInit.userData", "cloudInit.userData must be a #cloud-config document"];
    cloud_init_user_data_indented_header: format!("  memory: 128Mi\n{BOOT}  disks:\n  - name: seed\n    cloudInit: {{userData: \" #cloud-config\\nusers: []\\n\"}}\n")
        => ["spec.disks[0].cloudInit.userData", "#! script or MIME multipart"];
    cloud_init_user_data_cloud_config_archive: format!("  memory: 128Mi\n{BOOT}  disks:\n  - {{name: root, emptyDisk: {{size: 1Gi}}}}\n  - name: seed\n    cloudInit: {{userData: \"#cloud-config-archive\\n- type: text/x-shellscript\\n\"}}\n")
        => ["spec.disks[1].cloudInit.userData", "cloudInit.userData must be"];
    cloud_init_user_data_mime_not_multipart: format!("  memory: 128Mi\n{BOOT}  disks:\n  - name: seed\n    cloudInit: {{userData: \"MIME-Version: 1.0\\nContent-Type: text/plain\\n\\nhello\\n\"}}\n")
        => ["spec.disks[0].cloudInit.userData", "Content-Type: multipart/"];
    network_two_bindings: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, masquerade: {{}}, bridge: {{name: br0}}}}\n")
        => ["spec.networks[0]", "each network needs exactly one binding: masquerade or bridge"];
    network_no_binding: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan}}\n")
        => ["spec.networks[0]", "each network needs exactly one binding"];
    duplicate_network_names: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, masquerade: {{}}}}\n  - {{name: lan, bridge: {{name: br0}}}}\n")
        => ["spec.networks", "network names must be unique"];
    multicast_mac: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, masquerade: {{}}, macAddress: \"01:00:5e:00:00:01\"}}\n")
        => ["spec.networks[0].macAddress", "macAddress must be a unicast MAC"];
    malformed_mac: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, masquerade: {{}}, macAddress: \"52:54:00:12:34\"}}\n")
        => ["spec.networks[0].macAddress", "macAddress must be a unicast MAC"];
    bridge_name_too_long: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, bridge: {{name: a-very-long-bridge-name}}}}\n")
        => ["spec.networks[0].bridge.name", "15"];
    bridge_name_bad_chars: format!("  memory: 128Mi\n{BOOT}  networks:\n  - {{name: lan, bridge: {{name: \"br 0\"}}}}\n")
        => ["spec.networks[0].bridge.name", "bridge.name must be a Linux interface name"];
    negative_grace_period: format!("  memory: 128Mi\n  terminationGracePeriodSeconds: -1\n{BOOT}")
        => ["spec.terminationGracePeriodSeconds must be between 0 and 3600"];
    unknown_field: format!("  memory: 128Mi\n  colour: blue\n{BOOT}") => ["colour"];
}

/// Defaults are filled in by the API server and the stored object parses back.
#[test]
fn defaults_are_applied_by_the_api_server() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("validation");
    let manifest = vm("defaults", &format!("  memory: 128Mi\n{BOOT}"));
    let out = run_with_input(
        cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
        &manifest,
    );
    assert!(out.success, "refused: {}", out.stderr);
    assert_eq!(client_side_error(&manifest), None);
    let got = cp
        .kubectl()
        .args(["get", "vm", "defaults", "-n", &ns, "-o", "yaml"])
        .output()
        .expect("kubectl get");
    let back: VirtualMachine = serde_yaml::from_slice(&got.stdout).expect("stored VM parses back");
    assert_eq!(back.spec.cpus, 1);
    assert_eq!(back.spec.termination_grace_period_seconds, 30);
    assert_eq!(back.spec.run_strategy, kubevmm_crds::RunStrategy::Always);
    assert!(!back.spec.paused);
}

/// Every manifest in examples/ is accepted by the API server (and by the
/// client-side validator), and `kubectl get vm` shows our printer columns.
#[test]
fn examples_are_accepted_and_listed_with_printer_columns() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("examples");
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    let mut vms = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("example is YAML");
            if value.get("kind").and_then(|k| k.as_str()) == Some("VirtualMachine") {
                let vm: VirtualMachine = serde_yaml::from_value(value)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                validate_vm_spec(&vm.spec).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                vms += 1;
            }
        }
        let out = run_with_input(cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]), &text);
        assert!(
            out.success,
            "{} refused by the API server:\n{}",
            file.display(),
            out.stderr
        );
    }
    assert!(vms > 0, "examples/ holds no VirtualMachine");
    let out = cp
        .kubectl()
        .args(["get", "vm", "-n", &ns])
        .output()
        .expect("kubectl get vm");
    let header = String::from_utf8_lossy(&out.stdout);
    let header = header.lines().next().unwrap_or_default();
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        cols,
        ["NAME", "STATUS", "READY", "RESTARTS", "NODE", "IP", "AGE"],
        "printer columns of `kubectl get vm`"
    );
    let out = cp
        .kubectl()
        .args(["get", "vm", "-A"])
        .output()
        .expect("kubectl get vm -A");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("NAMESPACE"),
        "kubectl get vm -A works"
    );
}

use serde::Deserialize as _;

/// Every kind of user-data cloud-init runs is accepted, by the API server and
/// by the client-side validator, and a full-size one stays within the CEL
/// cost budget.
#[test]
fn cloud_init_user_data_kinds_are_accepted() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("userdata");
    let big = format!(
        "#cloud-config\nwrite_files: [{{path: /x, content: {}}}]\n",
        "a".repeat(60_000)
    );
    let multipart = "Content-Type: multipart/mixed; boundary=\"==b==\"\nMIME-Version: 1.0\n\n--==b==\nContent-Type: text/cloud-config\n\n#cloud-config\n--==b==--\n";
    let mime_first = "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b--\n";
    for (name, user_data) in [
        ("cloud-config", "#cloud-config\npackages: [nginx]\n"),
        ("cloud-config-crlf", "#cloud-config\r\nusers: []\r\n"),
        ("script", "#!/bin/sh\necho hello\n"),
        ("multipart", multipart),
        ("mime-version-first", mime_first),
        ("big", big.as_str()),
    ] {
        let spec = format!(
            "  memory: 128Mi\n{BOOT}  disks:\n  - name: seed\n    cloudInit:\n      userData: {}\n",
            serde_json::to_string(user_data).expect("json string")
        );
        let manifest = vm(&format!("ud-{name}"), &spec);
        let out = run_with_input(
            cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
            &manifest,
        );
        assert!(
            out.success,
            "{name} refused by the API server: {}",
            out.stderr
        );
        assert_eq!(client_side_error(&manifest), None, "{name}");
    }
}

/// `VirtualMachineImage` sources are checked by the API server too.
#[test]
fn bad_images_are_refused() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("images");
    let cases = [
        ("two-sources", "source:\n    path: /var/lib/kubevmm/images/a.img\n    http: {url: \"https://example.org/a.img\"}", "source needs exactly one of http or path"),
        ("no-source", "source: {}", "source needs exactly one of http or path"),
        ("bad-url", "source:\n    http: {url: \"ftp://example.org/a.img\"}", "source.http.url must be an http:// or https:// URL"),
        ("bad-sha", "source:\n    http: {url: \"https://example.org/a.img\", sha256: abc}", "source.http.sha256 must be 64 hex digits"),
        ("relative-path", "source:\n    path: images/a.img", "source.path must be absolute and must not contain '..'"),
    ];
    for (name, spec, expect) in cases {
        let manifest = format!("apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachineImage\nmetadata:\n  name: {name}\nspec:\n  {spec}\n");
        let out = run_with_input(
            cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
            &manifest,
        );
        assert!(!out.success, "API server accepted\n{manifest}");
        assert!(
            out.stderr.contains(expect),
            "{name}: message lacks {expect:?}:\n{}",
            out.stderr
        );
    }
}
