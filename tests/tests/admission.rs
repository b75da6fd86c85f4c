//! The chart's admission policies, attacked with real tokens on a real API
//! server (this binary's own control plane, with one release of the chart):
//!
//! - `binding-restriction.yaml`: only the operator binds. A user with full
//!   rights on VirtualMachines (and their status) may neither place a VM by
//!   setting the `kubevmm.io/node` label nor by writing `status.nodeName`;
//!   the operator's service account may.
//! - `node-restriction.yaml`: a node agent, with a token bound to a Pod on
//!   its node as the kubelet gives it, may write only the status of the VMs
//!   bound to its node, remove its finalizer and set the restart-handled
//!   annotation; only create its own HypervisorNode and then write its
//!   status; only its own Lease. Every other write is refused.
//!
//! Each forbidden write is an attack that succeeds without the policy.

// Each test is one attack story; kind names read as in kubectl.
#![allow(clippy::too_many_lines, clippy::doc_markdown)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kubevmm_e2e::{run_with_input, wait_for, ControlPlane, Outcome};
use support::{
    apply_as, as_token, bind_as_operator, chart, create_as, ensure_lease_namespace, get_json, helm,
    node_tokens, ok, outcome, sa_kubeconfig, status_patch,
};

/// The release every test here shares (policies are cluster-wide: a second
/// release's binding policy would refuse the first one's operator).
const RELEASE: &str = "adm";

/// Installs the chart once; returns the release namespace once its
/// policies are in force (the API server loads them asynchronously).
fn release() -> &'static str {
    static NS: OnceLock<String> = OnceLock::new();
    NS.get_or_init(|| {
        let cp = ControlPlane::shared();
        ensure_lease_namespace(cp);
        let ns = cp.namespace("adm-release");
        ok(helm(cp).args(["install", RELEASE, "-n", &ns]).arg(chart()));
        let probe = cp.namespace("adm-probe");
        let n = std::cell::Cell::new(0);
        wait_for(
            60,
            "the binding policy to be in force",
            || {
                n.set(n.get() + 1);
                let name = format!("probe-{}", n.get());
                let vm = vm_manifest(&probe, &name, "kubevmm.io/node: x", "");
                let o = run_with_input(cp.kubectl().args(["create", "-f", "-"]), &vm);
                o.stderr.contains(LABEL_MSG).then_some(())
            },
            || format!("{} labelled VMs were created", n.get()),
        );
        ns
    })
}

fn vm_manifest(ns: &str, name: &str, labels: &str, metadata_extra: &str) -> String {
    format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         labels: {{{labels}}}\n{metadata_extra}spec:\n  cpus: 1\n  memory: 64Mi\n  boot:\n    kernel: {{path: /var/lib/kubevmm/boot/k}}\n"
    )
}

/// A user (service account `alice` of `ns`) allowed everything on
/// VirtualMachines and their status in `ns`, like an editor.
fn vm_editor(cp: &ControlPlane, ns: &str) -> PathBuf {
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: alice, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: vm-editor, namespace: {ns}}}\n\
         rules:\n- apiGroups: [kubevmm.io]\n  resources: [virtualmachines, virtualmachines/status]\n  \
         verbs: [get, list, watch, create, update, patch, delete]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: alice, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: vm-editor}}\n\
         subjects: [{{kind: ServiceAccount, name: alice, namespace: {ns}}}]\n"
    );
    let o = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &rbac);
    assert!(o.success, "RBAC for alice: {}", o.stderr);
    sa_kubeconfig(cp, ns, "alice")
}

fn refused(what: &str, o: &Outcome, message: &str) {
    assert!(
        !o.success && o.stderr.contains(message),
        "{what}: expected a refusal saying {message:?}, got success={} {}{}",
        o.success,
        o.stderr,
        o.stdout
    );
}

fn allowed(what: &str, o: &Outcome) {
    assert!(o.success, "{what} was refused: {}", o.stderr);
}

fn kubectl_as(kc: &Path, args: &[&str]) -> Outcome {
    outcome(as_token(kc).args(args))
}

fn merge_patch(kc: &Path, ns: &str, kind: &str, name: &str, patch: &str, status: bool) -> Outcome {
    let mut args = vec!["patch", kind, name, "--type=merge", "-p", patch];
    if !ns.is_empty() {
        args.extend(["-n", ns]);
    }
    if status {
        args.push("--subresource=status");
    }
    kubectl_as(kc, &args)
}

fn vm_json(cp: &ControlPlane, ns: &str, name: &str) -> serde_json::Value {
    get_json(cp, &["get", "vm", name, "-n", ns]).expect("the VM exists")
}

const LABEL_MSG: &str =
    "only the kubevmm operator may set, change or remove the label kubevmm.io/node";
const NODE_NAME_MSG: &str = "only the kubevmm operator may write status.nodeName";

#[test]
fn users_cannot_bind_vms_only_the_operator_can() {
    let cp = ControlPlane::shared();
    let rel = release();
    let ns = cp.namespace("bind");
    let alice = vm_editor(cp, &ns);
    let op = sa_kubeconfig(cp, rel, &format!("{RELEASE}-operator"));
    let node = format!("{ns}-hv");

    // Attack 1: create a VM already labelled for a node of one's choosing
    // (node-vmm watches that label).
    let forged = vm_manifest(&ns, "forged", &format!("kubevmm.io/node: {node}"), "");
    let o = create_as(&alice, &forged);
    refused("create a VM with the node label", &o, LABEL_MSG);
    assert!(
        o.stderr.contains("status.nodeName shows the node"),
        "{}",
        o.stderr
    );

    // Ordinary use is untouched: create, relabel otherwise, edit the spec.
    allowed(
        "create an unlabelled VM",
        &create_as(&alice, &vm_manifest(&ns, "web", "app: web", "")),
    );
    allowed(
        "add another label",
        &kubectl_as(&alice, &["label", "vm", "web", "-n", &ns, "tier=front"]),
    );
    allowed(
        "edit the spec",
        &merge_patch(&alice, &ns, "vm", "web", r#"{"spec":{"cpus":2}}"#, false),
    );

    // Attack 2: label an existing VM.
    let o = kubectl_as(
        &alice,
        &[
            "label",
            "vm",
            "web",
            "-n",
            &ns,
            &format!("kubevmm.io/node={node}"),
        ],
    );
    refused("label a VM onto a node", &o, LABEL_MSG);

    // Attack 3: write the binding into the status, by patch and by
    // server-side apply under the operator's field-manager name.
    let o = merge_patch(
        &alice,
        &ns,
        "vm",
        "web",
        &format!(r#"{{"status":{{"nodeName":"{node}"}}}}"#),
        true,
    );
    refused("patch status.nodeName", &o, NODE_NAME_MSG);
    let o = run_with_input(
        as_token(&alice).args([
            "apply",
            "--server-side",
            "--field-manager=kubevmm-operator",
            "--subresource=status",
            "-f",
            "-",
        ]),
        &format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: web, namespace: {ns}}}\nstatus: {{nodeName: {node}}}\n"
        ),
    );
    refused(
        "apply status.nodeName as 'kubevmm-operator'",
        &o,
        NODE_NAME_MSG,
    );
    let vm = vm_json(cp, &ns, "web");
    assert!(
        vm["metadata"]["labels"]["kubevmm.io/node"].is_null(),
        "{vm}"
    );
    assert!(vm["status"]["nodeName"].is_null(), "{vm}");
    // Status fields other than the binding remain writable by whoever RBAC allows.
    allowed(
        "patch status.phase",
        &merge_patch(
            &alice,
            &ns,
            "vm",
            "web",
            r#"{"status":{"phase":"Pending"}}"#,
            true,
        ),
    );

    // The operator's service account binds.
    bind_as_operator(&op, &ns, "web", &node);
    let vm = vm_json(cp, &ns, "web");
    assert_eq!(vm["metadata"]["labels"]["kubevmm.io/node"], node.as_str());
    assert_eq!(vm["status"]["nodeName"], node.as_str());

    // Attack 4: move a bound VM, or unbind it, as the user, even as cluster admin.
    let o = kubectl_as(
        &alice,
        &[
            "label",
            "vm",
            "web",
            "-n",
            &ns,
            "--overwrite",
            "kubevmm.io/node=elsewhere",
        ],
    );
    refused("relabel a bound VM", &o, LABEL_MSG);
    assert!(
        o.stderr.contains(&format!("(it is {node})")),
        "{}",
        o.stderr
    );
    let o = kubectl_as(
        &alice,
        &["label", "vm", "web", "-n", &ns, "kubevmm.io/node-"],
    );
    refused("remove the node label", &o, LABEL_MSG);
    let o = merge_patch(
        &alice,
        &ns,
        "vm",
        "web",
        r#"{"status":{"nodeName":null}}"#,
        true,
    );
    refused("clear status.nodeName", &o, NODE_NAME_MSG);
    let o = outcome(cp.kubectl().args([
        "label",
        "vm",
        "web",
        "-n",
        &ns,
        "--overwrite",
        "kubevmm.io/node=elsewhere",
    ]));
    refused("relabel as cluster admin", &o, LABEL_MSG);

    // The operator unbinds (status first, then the label).
    allowed(
        "unbind as the operator",
        &merge_patch(
            &op,
            &ns,
            "vm",
            "web",
            r#"{"status":{"nodeName":null}}"#,
            true,
        ),
    );
    allowed(
        "remove the label as the operator",
        &kubectl_as(&op, &["label", "vm", "web", "-n", &ns, "kubevmm.io/node-"]),
    );
}

#[test]
fn node_vmm_writes_only_status_its_finalizer_and_restart_handled() {
    let cp = ControlPlane::shared();
    let rel = release();
    let ns = cp.namespace("agent");
    let op = sa_kubeconfig(cp, rel, &format!("{RELEASE}-operator"));
    let (mine, other) = (format!("{ns}-mine"), format!("{ns}-other"));
    let (agent, _) = node_tokens(cp, RELEASE, rel, &mine, &other);

    let extra = "  annotations: {kubevmm.io/restart-requested: \"1\", note: keep}\n  \
                 finalizers: [kubevmm.io/guest-cleanup, example.com/keep]\n";
    for (vm, node) in [("vm", &mine), ("vm-other", &other)] {
        let o = run_with_input(
            cp.kubectl().args(["create", "-f", "-"]),
            &vm_manifest(&ns, vm, "app: db", extra),
        );
        assert!(o.success, "create {vm}: {}", o.stderr);
        bind_as_operator(&op, &ns, vm, node);
    }

    // Another node's VM: nothing, not even its status.
    let o = wait_for(
        60,
        "the node policy to refuse a cross-node status write",
        || {
            let o = status_patch(&agent, &ns, "vm-other");
            (!o.success).then_some(o)
        },
        || "the write kept succeeding".into(),
    );
    refused(
        "status of another node's VM",
        &o,
        &format!("node-vmm on {mine} may only"),
    );

    // What the agent needs on its own VMs.
    allowed("status of its VM", &status_patch(&agent, &ns, "vm"));
    allowed(
        "set restart-handled",
        &merge_patch(
            &agent,
            &ns,
            "vm",
            "vm",
            r#"{"metadata":{"annotations":{"kubevmm.io/restart-handled":"1"}}}"#,
            false,
        ),
    );

    // What it must not do to them.
    let forbidden: &[(&str, &str, bool, &str)] = &[
        (
            "change the spec",
            r#"{"spec":{"cpus":4}}"#,
            false,
            "may not change the spec of a VirtualMachine",
        ),
        (
            "add a label",
            r#"{"metadata":{"labels":{"stolen":"yes"}}}"#,
            false,
            "may not change the labels of a VirtualMachine",
        ),
        (
            "change a label",
            r#"{"metadata":{"labels":{"app":"web"}}}"#,
            false,
            "may not change the labels of a VirtualMachine",
        ),
        (
            "add an annotation",
            r#"{"metadata":{"annotations":{"other":"x"}}}"#,
            false,
            "may only set the annotation kubevmm.io/restart-handled",
        ),
        (
            "change the restart request",
            r#"{"metadata":{"annotations":{"kubevmm.io/restart-requested":"2"}}}"#,
            false,
            "may only set the annotation kubevmm.io/restart-handled",
        ),
        (
            "remove an annotation",
            r#"{"metadata":{"annotations":{"note":null}}}"#,
            false,
            "may only set the annotation kubevmm.io/restart-handled",
        ),
        (
            "add a finalizer",
            r#"{"metadata":{"finalizers":["kubevmm.io/guest-cleanup","example.com/keep","evil"]}}"#,
            false,
            "may only remove the finalizer kubevmm.io/guest-cleanup",
        ),
        (
            "remove another finalizer",
            r#"{"metadata":{"finalizers":["kubevmm.io/guest-cleanup"]}}"#,
            false,
            "may only remove the finalizer kubevmm.io/guest-cleanup",
        ),
        (
            "set owner references",
            r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"ConfigMap","name":"x","uid":"00000000-0000-0000-0000-000000000000"}]}}"#,
            false,
            "may not change the owner references",
        ),
        (
            "move the VM (label)",
            r#"{"metadata":{"labels":{"kubevmm.io/node":"elsewhere"}}}"#,
            false,
            // Both policies refuse it; either may answer first.
            "kubevmm.io/node",
        ),
        (
            "move the VM (status.nodeName)",
            r#"{"status":{"nodeName":"elsewhere"}}"#,
            true,
            "status.nodeName",
        ),
    ];
    for (what, patch, status, message) in forbidden {
        let o = merge_patch(&agent, &ns, "vm", "vm", patch, *status);
        refused(what, &o, message);
    }
    let vm = vm_json(cp, &ns, "vm");
    assert_eq!(vm["spec"]["cpus"], 1, "{vm}");
    assert_eq!(vm["metadata"]["labels"]["app"], "db", "{vm}");
    assert_eq!(vm["metadata"]["labels"]["kubevmm.io/node"], mine.as_str());

    // Its own finalizer: removable (the last step of a deletion).
    allowed(
        "remove kubevmm.io/guest-cleanup",
        &merge_patch(
            &agent,
            &ns,
            "vm",
            "vm",
            r#"{"metadata":{"finalizers":["example.com/keep"]}}"#,
            false,
        ),
    );

    // HypervisorNode: created once (no annotations), then status only.
    let hv = |n: &str, annotations: &str| {
        format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: HypervisorNode\nmetadata:\n  name: {n}\n  \
             labels: {{zone: a}}\n  annotations: {{{annotations}}}\nspec: {{}}\n"
        )
    };
    refused(
        "create its HypervisorNode pre-fenced",
        &create_as(&agent, &hv(&mine, "kubevmm.io/fenced: \"true\"")),
        "may only create HypervisorNode",
    );
    refused(
        "create another node's HypervisorNode",
        &create_as(&agent, &hv(&other, "")),
        &format!("may only write HypervisorNode {mine}"),
    );
    allowed(
        "register its HypervisorNode",
        &create_as(&agent, &hv(&mine, "")),
    );
    allowed(
        "write its HypervisorNode status",
        &merge_patch(
            &agent,
            "",
            "hvnode",
            &mine,
            r#"{"status":{"runningVms":1}}"#,
            true,
        ),
    );
    ok(cp.kubectl().args([
        "patch",
        "hvnode",
        &mine,
        "--type=merge",
        "-p",
        r#"{"spec":{"cordoned":true}}"#,
    ]));
    for (what, patch) in [
        ("un-cordon itself", r#"{"spec":{"cordoned":false}}"#),
        ("relabel itself", r#"{"metadata":{"labels":{"zone":"b"}}}"#),
        (
            "fence itself",
            r#"{"metadata":{"annotations":{"kubevmm.io/fenced":"true"}}}"#,
        ),
    ] {
        // RBAC refuses first (no patch on the object); the policy would too.
        refused(
            what,
            &merge_patch(&agent, "", "hvnode", &mine, patch, false),
            "orbidden",
        );
    }
    // Through the status subresource only the status changes.
    allowed(
        "status write carrying spec and labels",
        &merge_patch(
            &agent,
            "",
            "hvnode",
            &mine,
            r#"{"metadata":{"labels":{"zone":"b"}},"spec":{"cordoned":false},"status":{"runningVms":2}}"#,
            true,
        ),
    );
    let hvj = get_json(cp, &["get", "hvnode", &mine]).expect("hvnode");
    assert_eq!(hvj["spec"]["cordoned"], true, "{hvj}");
    assert_eq!(hvj["metadata"]["labels"]["zone"], "a", "{hvj}");
    assert_eq!(hvj["status"]["runningVms"], 2, "{hvj}");

    // Its Lease, not another's; no namespaces.
    let lease = |n: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: node-vmm-{n}\n  namespace: kubevmm-system\n\
             spec:\n  holderIdentity: {n}\n  leaseDurationSeconds: 40\n"
        )
    };
    allowed("its Lease", &apply_as(&agent, &lease(&mine)));
    refused(
        "another node's Lease",
        &apply_as(&agent, &lease(&other)),
        &format!("may only write Lease kubevmm-system/node-vmm-{mine}"),
    );
    refused(
        "create a namespace",
        &kubectl_as(&agent, &["create", "namespace", &format!("{ns}-x")]),
        "orbidden",
    );

    for n in [&mine, &other] {
        let _ = outcome(cp.kubectl().args([
            "delete",
            "hvnode",
            n,
            "--ignore-not-found",
            "--wait=false",
        ]));
        let _ = outcome(cp.kubectl().args(["delete", "node", n, "--wait=false"]));
    }
}

#[test]
fn node_vmm_writes_only_its_own_entry_of_an_image_status() {
    let cp = ControlPlane::shared();
    let rel = release();
    let ns = cp.namespace("img");
    let (mine, other) = (format!("{ns}-mine"), format!("{ns}-other"));
    let (agent, _) = node_tokens(cp, RELEASE, rel, &mine, &other);
    let o = run_with_input(
        cp.kubectl().args(["create", "-f", "-"]),
        &format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachineImage\nmetadata: {{name: img, namespace: {ns}}}\n\
             spec: {{source: {{http: {{url: \"http://example.invalid/a.img\"}}}}}}\n"
        ),
    );
    assert!(o.success, "create image: {}", o.stderr);
    // The other node already reported.
    let theirs = format!(
        r#"{{"status":{{"phase":"Ready","nodes":[{{"node":"{other}","phase":"Ready","bytesDone":5,"bytesTotal":5}}],
        "conditions":[{{"type":"{other}/Ready","status":"True","reason":"Imported","message":"m","lastTransitionTime":"2025-01-01T00:00:00Z"}}]}}}}"#
    );
    ok(cp.kubectl().args([
        "patch",
        "vmimage",
        "img",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &theirs,
    ]));
    let json_patch = |patch: String| {
        kubectl_as(
            &agent,
            &[
                "patch",
                "vmimage",
                "img",
                "-n",
                &ns,
                "--subresource=status",
                "--type=json",
                "-p",
                &patch,
            ],
        )
    };
    let mine_entry = format!(
        r#"[{{"op":"add","path":"/status/nodes/-","value":{{"node":"{mine}","phase":"Importing","bytesDone":1,"bytesTotal":5}}}},
        {{"op":"add","path":"/status/conditions/-","value":{{"type":"{mine}/Ready","status":"False","reason":"Importing","message":"m","lastTransitionTime":"2025-01-01T00:00:00Z"}}}}]"#
    );
    let o = wait_for(
        60,
        "the node policy to refuse writing another node's image entry",
        || {
            let o = json_patch(
                r#"[{"op":"replace","path":"/status/nodes/0/phase","value":"Failed"}]"#.into(),
            );
            (!o.success).then_some(o)
        },
        || "the write kept succeeding".into(),
    );
    refused(
        "another node's image entry",
        &o,
        &format!(
            "node-vmm on {mine} may only write its own entry of a VirtualMachineImage's status"
        ),
    );
    allowed("its own image entry and condition", &json_patch(mine_entry));
    allowed(
        "the image-wide phase",
        &json_patch(r#"[{"op":"replace","path":"/status/phase","value":"Importing"}]"#.into()),
    );
    for (what, patch) in [
        (
            "another node's condition",
            r#"[{"op":"replace","path":"/status/conditions/0/reason","value":"Forged"}]"#,
        ),
        (
            "remove another node's entry",
            r#"[{"op":"remove","path":"/status/nodes/0"}]"#,
        ),
    ] {
        refused(
            what,
            &json_patch(patch.into()),
            "may only write its own entry",
        );
    }
    // The source is the user's: RBAC grants no write on the object.
    refused(
        "change the image source",
        &merge_patch(
            &agent,
            &ns,
            "vmimage",
            "img",
            r#"{"spec":{"source":{"http":{"url":"http://evil.invalid/x"}}}}"#,
            false,
        ),
        "orbidden",
    );
    let img = get_json(cp, &["get", "vmimage", "img", "-n", &ns]).expect("image");
    assert_eq!(img["status"]["nodes"][0]["phase"], "Ready", "{img}");
    assert_eq!(img["status"]["nodes"][1]["node"], mine.as_str(), "{img}");
    for n in [&mine, &other] {
        let _ = outcome(cp.kubectl().args(["delete", "node", n, "--wait=false"]));
    }
}
