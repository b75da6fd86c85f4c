//! Helpers shared by the tests that install the Helm chart (`helm.rs`,
//! `admission.rs`): the pinned `helm` binary, commands bound to the test
//! control plane, and service-account tokens (plain or bound to a Pod on a
//! node, as the kubelet gives node-vmm).

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kubevmm_e2e::{repo_root, run_with_input, ControlPlane, Outcome};
use serde_json::Value;

/// A pinned version from `hack/helm-build.sh` (`NAME=v...`).
pub fn pinned(var: &str) -> String {
    let script = repo_root().join("hack/helm-build.sh");
    let text = std::fs::read_to_string(&script).expect("read hack/helm-build.sh");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {var}= in {}", script.display()))
        .to_string()
}

/// A tool built by `hack/helm-build.sh`; fails (never skips) when missing.
pub fn cached_tool(name: &str, var: &str) -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    let path = Path::new(&home)
        .join(".cache/kubevmm")
        .join(format!("{name}-{}", pinned(var)))
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run hack/helm-build.sh (hack/install-deps.sh and make test do)",
        path.display()
    );
    path
}

pub fn chart() -> PathBuf {
    repo_root().join("charts/kubevmm")
}

/// `helm` bound to the control plane, with private config/cache dirs.
pub fn helm(cp: &ControlPlane) -> Command {
    let mut c = Command::new(cached_tool("helm", "HELM_VERSION"));
    let home = cp.dir().join("helm");
    c.env("KUBECONFIG", cp.kubeconfig())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

pub fn outcome(cmd: &mut Command) -> Outcome {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = outcome(cmd);
    assert!(
        o.success,
        "{desc} failed:\n{}\n{}",
        o.stderr,
        tail(&o.stdout)
    );
    o.stdout
}

pub use kubevmm_e2e::tail;

/// The Lease namespace the binaries use; install releases expect it.
pub fn ensure_lease_namespace(cp: &ControlPlane) {
    let o = outcome(cp.kubectl().args(["create", "namespace", "kubevmm-system"]));
    assert!(
        o.success || o.stderr.contains("AlreadyExists"),
        "create namespace kubevmm-system: {}",
        o.stderr
    );
}

pub fn get_json(cp: &ControlPlane, args: &[&str]) -> Option<Value> {
    let o = outcome(cp.kubectl().args(args).args(["-o", "json"]));
    o.success
        .then(|| serde_json::from_str(&o.stdout).expect("kubectl printed JSON"))
}

/// A kubeconfig for this control plane that authenticates with `token`.
pub fn token_kubeconfig(cp: &ControlPlane, name: &str, token: &str) -> PathBuf {
    let server = ok(cp.kubectl().args([
        "config",
        "view",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]));
    let ca = ok(cp.kubectl().args([
        "config",
        "view",
        "--minify",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]));
    let path = cp.dir().join(format!("{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

pub fn as_token(kubeconfig: &Path) -> Command {
    let mut c = Command::new("kubectl");
    c.env("KUBECONFIG", kubeconfig);
    c
}

/// Nodes `mine` and `other`, a Pod of node-vmm on `mine` (never run: no
/// kubelet), and kubeconfigs with a token bound to that Pod and an unbound one.
pub fn node_tokens(
    cp: &ControlPlane,
    release: &str,
    ns: &str,
    mine: &str,
    other: &str,
) -> (PathBuf, PathBuf) {
    for n in [mine, other] {
        // Labelled so an operator scoped by --node-selector sees only it.
        let o = run_with_input(
            cp.kubectl().args(["apply", "-f", "-"]),
            &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  labels: {{kubevmm.io/test-node: {n}}}\n"),
        );
        assert!(o.success, "create node {n}: {}", o.stderr);
    }
    // One Pod per node: tests sharing a release namespace run in parallel.
    let pod_name = format!("agent-{mine}");
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod_name}\n  namespace: {ns}\nspec:\n  nodeName: {mine}\n  \
         serviceAccountName: {release}-node-vmm\n  containers:\n  - name: c\n    image: example.invalid/none\n"
    );
    let o = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &pod);
    assert!(o.success, "create pod: {}", o.stderr);
    let uid = ok(cp.kubectl().args([
        "get",
        "pod",
        &pod_name,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]));
    let bound = ok(cp.kubectl().args([
        "create",
        "token",
        &format!("{release}-node-vmm"),
        "-n",
        ns,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        &pod_name,
        "--bound-object-uid",
        &uid,
    ]));
    let bound = token_kubeconfig(cp, &format!("{ns}-{mine}-bound"), bound.trim());
    let unbound =
        ok(cp
            .kubectl()
            .args(["create", "token", &format!("{release}-node-vmm"), "-n", ns]));
    let unbound = token_kubeconfig(cp, &format!("{ns}-{mine}-unbound"), unbound.trim());

    (bound, unbound)
}

/// `kubectl auth can-i VERB RESOURCE [extra] --as SA` → allowed?
pub fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let o = outcome(
        cp.kubectl()
            .args(["auth", "can-i"])
            .args(args)
            .arg(format!("--as={sa}")),
    );
    match o.stdout.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {args:?}: {other} {}", o.stderr),
    }
}

/// A token for service account `sa` of namespace `ns` (not bound to a Pod)
/// in a kubeconfig of its own.
pub fn sa_kubeconfig(cp: &ControlPlane, ns: &str, sa: &str) -> PathBuf {
    let token = ok(cp.kubectl().args(["create", "token", sa, "-n", ns]));
    token_kubeconfig(cp, &format!("{ns}-{sa}"), token.trim())
}

/// A new service account `sa` of namespace `ns` bound there to `role`
/// (`role/NAME` or `clusterrole/NAME`), in a kubeconfig of its own.
pub fn bound_sa_kubeconfig(cp: &ControlPlane, ns: &str, sa: &str, role: &str) -> PathBuf {
    ok(cp
        .kubectl()
        .args(["create", "serviceaccount", sa, "-n", ns]));
    let (kind, name) = role.split_once('/').expect("role/NAME or clusterrole/NAME");
    ok(cp.kubectl().args([
        "create",
        "rolebinding",
        sa,
        &format!("--{kind}={name}"),
        &format!("--serviceaccount={ns}:{sa}"),
        "-n",
        ns,
    ]));
    sa_kubeconfig(cp, ns, sa)
}

/// Binds `vm` to `node` as the operator does (status.nodeName by server-side
/// apply as field manager kubevmm-operator, then the label), with the
/// operator's kubeconfig.
pub fn bind_as_operator(op: &Path, ns: &str, vm: &str, node: &str) {
    let status = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {vm}\n  namespace: {ns}\n\
         status:\n  nodeName: {node}\n  phase: Scheduled\n"
    );
    let o = run_with_input(
        as_token(op).args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubevmm-operator",
            "--subresource=status",
            "-f",
            "-",
        ]),
        &status,
    );
    assert!(
        o.success,
        "bind {vm} (status) as the operator: {}",
        o.stderr
    );
    ok(as_token(op).args([
        "label",
        "vm",
        vm,
        "-n",
        ns,
        "--overwrite",
        &format!("kubevmm.io/node={node}"),
    ]));
}

pub fn status_patch(kubeconfig: &Path, ns: &str, vm: &str) -> Outcome {
    outcome(as_token(kubeconfig).args([
        "patch",
        "vm",
        vm,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]))
}

pub fn apply_as(kubeconfig: &Path, manifest: &str) -> Outcome {
    run_with_input(
        as_token(kubeconfig).args([
            "apply",
            "--server-side",
            "--field-manager=test-node-vmm",
            "-f",
            "-",
        ]),
        manifest,
    )
}

/// `kubectl create -f -` of `manifest` with the given kubeconfig.
pub fn create_as(kubeconfig: &Path, manifest: &str) -> Outcome {
    run_with_input(as_token(kubeconfig).args(["create", "-f", "-"]), manifest)
}
