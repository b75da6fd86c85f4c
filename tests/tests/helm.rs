//! The Helm chart (`charts/kubevmm`) against a private control plane:
//! lint, server-side dry-run of the rendered manifests for several value
//! sets, install → upgrade → uninstall, what each service account may do
//! (`kubectl auth can-i`), and the node-restriction admission policy with
//! real Pod-bound service-account tokens.
//!
//! `helm` is built from the Go module proxy by `hack/helm-build.sh`
//! (`hack/install-deps.sh` runs it) into `~/.cache/kubevmm/helm-<version>/`.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use kubevmm_e2e::{bin_path, free_port, repo_root, run_with_input, wait_for, ControlPlane, Daemon};
use support::{
    apply_as, as_token, bind_as_operator, can_i, chart, create_as, ensure_lease_namespace,
    get_json, helm, node_tokens, ok, outcome, sa_kubeconfig, status_patch, token_kubeconfig,
};

/// Installs share cluster-scoped objects (the Lease namespace, Nodes): one
/// at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn chart_crds_are_the_repository_crds() {
    let repo = repo_root().join("crds");
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| Path::new(n).extension().is_some_and(|e| e == "yaml"))
            .collect();
        v.sort();
        v
    };
    let ours = chart().join("crds");
    assert_eq!(
        names(&repo),
        names(&ours),
        "charts/kubevmm/crds must hold exactly crds/*.yaml (cp crds/*.yaml charts/kubevmm/crds/)"
    );
    for n in names(&repo) {
        let a = std::fs::read(repo.join(&n)).expect("read crd");
        let b = std::fs::read(ours.join(&n)).expect("read chart crd");
        assert!(
            a == b,
            "charts/kubevmm/crds/{n} differs from crds/{n}: cp crds/*.yaml charts/kubevmm/crds/"
        );
    }
}

#[test]
fn helm_lint_passes_for_default_and_other_values() {
    let cp = ControlPlane::shared();
    ok(helm(cp).arg("lint").arg("--strict").arg(chart()));
    ok(helm(cp).arg("lint").arg("--strict").arg(chart()).args([
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,grafanaDashboard.enabled=true,createNamespace=true,nodeRestriction.enabled=false",
    ]));
    // The schema refuses what the templates cannot use.
    let bad = outcome(
        helm(cp)
            .arg("lint")
            .arg(chart())
            .args(["--set", "operator.image.pullPolicy=Sometimes"]),
    );
    assert!(
        !bad.success,
        "a bad pullPolicy passed lint:\n{}",
        bad.stdout
    );
    assert!(
        (bad.stdout + &bad.stderr).contains("pullPolicy"),
        "the schema error names the field"
    );
}

/// Minimal stand-ins for prometheus-operator's CRDs (the real ones are
/// not vendored): enough for the API server to accept the objects.
const MONITORING_CRDS: &str = r"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule, listKind: PrometheusRuleList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

fn install_monitoring_crds(cp: &ControlPlane) {
    let o = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), MONITORING_CRDS);
    assert!(o.success, "monitoring CRDs: {}", o.stderr);
    for crd in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        ok(cp.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ]));
    }
}

/// Renders the chart and has the API server validate every object.
fn template_and_dry_run(cp: &ControlPlane, ns: &str, extra: &[&str]) -> String {
    let rendered = ok(helm(cp)
        // Without a cluster helm assumes Kubernetes 1.20; the chart needs 1.30+.
        .args(["template", "rel", "--namespace", ns, "--include-crds"])
        .args(["--kube-version", "1.33.13"])
        .arg(chart())
        .args(extra));
    let o = run_with_input(
        // Every namespaced object names its namespace (the Roles live in
        // kubevmm-system), so no -n here.
        cp.kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
        &rendered,
    );
    assert!(
        o.success,
        "the API server refused the rendered chart ({extra:?}):\n{}\n{}",
        o.stderr, o.stdout
    );
    rendered
}

#[test]
fn rendered_chart_is_accepted_by_the_api_server() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("tmpl");

    let default = template_and_dry_run(cp, &ns, &[]);
    for kind in [
        "kind: Deployment",
        "kind: DaemonSet",
        "kind: ValidatingAdmissionPolicy\n",
        "kind: ValidatingAdmissionPolicyBinding",
        "kind: CustomResourceDefinition",
    ] {
        assert!(default.contains(kind), "default render lacks {kind}");
    }
    assert!(!default.contains("kind: ServiceMonitor"));
    assert!(!default.contains("kind: Namespace\n"));

    // Asked for, but the monitoring API is not served: left out, not broken.
    let monitoring = [
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    ];
    let without = template_and_dry_run(cp, &ns, &monitoring);
    assert!(!without.contains("kind: ServiceMonitor"));
    assert!(!without.contains("kind: PrometheusRule"));

    install_monitoring_crds(cp);
    let mut args = monitoring.to_vec();
    args.extend([
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
        "--set",
        "grafanaDashboard.enabled=true,createNamespace=true,operator.replicas=3,nodeVmm.hostPID=false",
        "--set",
        "operator.image.tag=test,nodeVmm.image.pullPolicy=Always,nodeRestriction.enabled=false,bindingRestriction.enabled=false",
    ]);
    let full = template_and_dry_run(cp, &ns, &args);
    for want in [
        "kind: ServiceMonitor",
        "kind: PrometheusRule",
        "kubevmm.json",
        "kind: Namespace",
        "replicas: 3",
        "ghcr.io/kubevmm/operator:test",
        "imagePullPolicy: Always",
        "hostPID: false",
    ] {
        assert!(full.contains(want), "non-default render lacks {want:?}");
    }
    assert!(!full.contains("kind: ValidatingAdmissionPolicy"));
}

fn pods_of(cp: &ControlPlane, ns: &str, selector: &str) -> usize {
    get_json(cp, &["get", "pods", "-n", ns, "-l", selector])
        .and_then(|v| v["items"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn install_upgrade_uninstall() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("inst");
    let op_sel = "app.kubernetes.io/name=kubevmm-operator,app.kubernetes.io/instance=life";
    ok(helm(cp).args(["install", "life", "-n", &ns]).arg(chart()));
    let dep = get_json(cp, &["get", "deployment", "-n", &ns, "life-operator"])
        .expect("the operator Deployment exists");
    assert_eq!(dep["spec"]["replicas"], 2);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    let ds = get_json(cp, &["get", "daemonset", "-n", &ns, "life-node-vmm"])
        .expect("the node-vmm DaemonSet exists");
    assert_eq!(
        ds["spec"]["template"]["spec"]["nodeSelector"]["kubevmm.io/hypervisor"],
        "true"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    // kube-controller-manager creates the ReplicaSet and its Pods (they
    // never run: there is no kubelet).
    wait_for(
        60,
        "the operator's ReplicaSet and 2 Pods",
        || {
            let rs = get_json(cp, &["get", "replicasets", "-n", &ns, "-l", op_sel])?;
            (rs["items"].as_array()?.len() == 1 && pods_of(cp, &ns, op_sel) == 2).then_some(())
        },
        || outcome(cp.kubectl().args(["get", "rs,pods,events", "-n", &ns])).stdout,
    );

    // The subresource API's certificates: made at install, trusted by the
    // APIService, kept by the upgrade (clients and nodes keep trusting them).
    let ca_of = |secret: &str| {
        get_json(cp, &["get", "secret", "-n", &ns, secret])
            .and_then(|s| s["data"]["ca.crt"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("secret {secret} with ca.crt"))
    };
    let access_ca = ca_of("life-access-serving");
    let node_ca = ca_of("life-node-serving");
    assert_eq!(
        ca_of("life-node-client"),
        node_ca,
        "one node CA for both ends"
    );
    let api = get_json(
        cp,
        &["get", "apiservice", "v1alpha1.subresources.kubevmm.io"],
    )
    .expect("the APIService exists");
    assert_eq!(api["spec"]["caBundle"].as_str(), Some(access_ca.as_str()));
    ok(helm(cp)
        .args(["upgrade", "life", "-n", &ns])
        .arg(chart())
        .args(["--set", "operator.replicas=3"]));
    assert_eq!(
        ca_of("life-access-serving"),
        access_ca,
        "upgrade replaced the serving CA"
    );
    assert_eq!(
        ca_of("life-node-serving"),
        node_ca,
        "upgrade replaced the node CA"
    );
    wait_for(
        60,
        "3 operator Pods after the upgrade",
        || (pods_of(cp, &ns, op_sel) == 3).then_some(()),
        || outcome(cp.kubectl().args(["get", "rs,pods", "-n", &ns])).stdout,
    );
    let history = ok(helm(cp).args(["history", "life", "-n", &ns]));
    assert!(history.contains("deployed") && history.contains("superseded"));

    // No kubelet here to run the pre-delete hook's Job (templates/
    // uninstall-hook.yaml; tests/tests/deploy.rs runs it on a real one).
    ok(helm(cp).args(["uninstall", "--no-hooks", "life", "-n", &ns, "--wait"]));
    for (kind, name, namespaced) in [
        ("deployment", "life-operator", true),
        ("daemonset", "life-node-vmm", true),
        ("clusterrole", "life-kubevmm-operator", false),
        (
            "validatingadmissionpolicy",
            "life-kubevmm-node-restriction",
            false,
        ),
        ("apiservice", "v1alpha1.subresources.kubevmm.io", false),
        ("secret", "life-node-serving", true),
    ] {
        let mut args = vec!["get", kind, name];
        if namespaced {
            args.extend(["-n", &ns]);
        }
        assert!(get_json(cp, &args).is_none(), "{kind} {name} left behind");
    }
    // The Lease namespace stays: it holds the heartbeats.
    assert!(get_json(cp, &["get", "namespace", "kubevmm-system"]).is_some());
}

/// `who | kubectl auth can-i arguments | yes/no`: what the binaries need
/// (templates/rbac.yaml says why) and a sample of what they must not do.
const RBAC_CASES: &str = "
    op    | list virtualmachines.kubevmm.io -A                         | yes
    op    | watch virtualmachines.kubevmm.io -A                        | yes
    op    | patch virtualmachines.kubevmm.io -n default                | yes
    op    | patch virtualmachines.kubevmm.io --subresource=status -n x | yes
    op    | delete virtualmachines.kubevmm.io -n default               | no
    op    | create virtualmachines.kubevmm.io -n default               | no
    op    | list hypervisornodes.kubevmm.io                            | yes
    op    | watch hypervisornodes.kubevmm.io                           | yes
    op    | patch hypervisornodes.kubevmm.io                           | no
    op    | patch hypervisornodes.kubevmm.io --subresource=status      | no
    op    | update leases.coordination.k8s.io -n kubevmm-system        | yes
    op    | create leases.coordination.k8s.io -n kubevmm-system        | yes
    op    | watch leases.coordination.k8s.io -n kubevmm-system         | yes
    op    | update leases.coordination.k8s.io -n default               | no
    op    | create events.events.k8s.io -n default                     | yes
    op    | create namespaces                                          | no
    op    | get secrets -n kubevmm-system                              | no
    op    | create subjectaccessreviews.authorization.k8s.io           | yes
    op    | get configmaps/extension-apiserver-authentication -n kube-system | yes
    op    | get configmaps -n default                                  | no
    op    | get nodes                                                  | no
    agent | watch virtualmachines.kubevmm.io -A                        | yes
    agent | patch virtualmachines.kubevmm.io -n default                | yes
    agent | patch virtualmachines.kubevmm.io --subresource=status -n x | yes
    agent | create virtualmachines.kubevmm.io -n default               | no
    agent | delete virtualmachines.kubevmm.io -n default               | no
    agent | create hypervisornodes.kubevmm.io                          | yes
    agent | patch hypervisornodes.kubevmm.io                           | no
    agent | update hypervisornodes.kubevmm.io                          | no
    agent | patch hypervisornodes.kubevmm.io --subresource=status      | yes
    agent | delete hypervisornodes.kubevmm.io                          | no
    agent | list hypervisornodes.kubevmm.io                            | no
    agent | get virtualmachineimages.kubevmm.io -n default             | yes
    agent | list virtualmachineimages.kubevmm.io -A                    | no
    agent | patch virtualmachineimages.kubevmm.io -n default           | no
    agent | patch virtualmachineimages.kubevmm.io --subresource=status -n x | yes
    agent | delete virtualmachineimages.kubevmm.io -n default          | no
    op    | get virtualmachineimages.kubevmm.io -n default             | no
    agent | get nodes                                                  | yes
    agent | list nodes                                                 | no
    agent | patch nodes                                                | no
    agent | patch leases.coordination.k8s.io -n kubevmm-system         | yes
    agent | patch leases.coordination.k8s.io -n default                | no
    agent | delete leases.coordination.k8s.io -n kubevmm-system        | no
    agent | create events.events.k8s.io -n default                     | yes
    agent | get secrets -n kubevmm-system                              | no
    agent | create pods -n default                                     | no
    agent | create namespaces                                          | no
";

#[test]
fn service_accounts_may_do_what_the_binaries_need_and_no_more() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("rbac");
    ok(helm(cp).args(["install", "perm", "-n", &ns]).arg(chart()));
    let op = format!("system:serviceaccount:{ns}:perm-operator");
    let agent = format!("system:serviceaccount:{ns}:perm-node-vmm");
    let wrong = rbac_mismatches(cp, RBAC_CASES, &ns, |who| {
        if who == "op" {
            op.clone()
        } else {
            agent.clone()
        }
    });
    assert!(wrong.is_empty(), "RBAC differs:\n{}", wrong.join("\n"));
    ok(helm(cp).args(["uninstall", "--no-hooks", "perm", "-n", &ns]));
}

/// `who | kubectl auth can-i arguments | yes/no` for people bound to the
/// built-in roles in namespace NS: the chart's user roles are aggregated
/// into them (templates/user-roles.yaml).
const USER_CASES: &str = "
    editor | create virtualmachines.kubevmm.io -n NS                                | yes
    editor | patch virtualmachines.kubevmm.io -n NS                                 | yes
    editor | delete virtualmachines.kubevmm.io -n NS                                | yes
    editor | create virtualmachineimages.kubevmm.io -n NS                           | yes
    editor | get virtualmachines.subresources.kubevmm.io --subresource=console -n NS | yes
    editor | get virtualmachines.subresources.kubevmm.io --subresource=logs -n NS    | yes
    editor | get virtualmachines.subresources.kubevmm.io --subresource=portforward -n NS | yes
    editor | patch virtualmachines.kubevmm.io --subresource=status -n NS            | no
    editor | patch virtualmachines.kubevmm.io -n default                            | no
    editor | patch hypervisornodes.kubevmm.io                                       | no
    viewer | list virtualmachines.kubevmm.io -n NS                                  | yes
    viewer | get virtualmachineimages.kubevmm.io -n NS                              | yes
    viewer | patch virtualmachines.kubevmm.io -n NS                                 | no
    viewer | get virtualmachines.subresources.kubevmm.io --subresource=console -n NS | no
    viewer | get virtualmachines.subresources.kubevmm.io --subresource=logs -n NS    | no
    viewer | get virtualmachines.subresources.kubevmm.io --subresource=stats -n NS   | yes
    editor | get virtualmachines.subresources.kubevmm.io --subresource=stats -n NS   | yes
    viewer | list virtualmachines.kubevmm.io -n default                             | no
";

/// The rows of a `who | arguments | yes/no` table (`NS` in the arguments
/// is `ns`) that the API server answers otherwise, `user` naming who.
fn rbac_mismatches(
    cp: &ControlPlane,
    table: &str,
    ns: &str,
    user: impl Fn(&str) -> String,
) -> Vec<String> {
    table
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut f = l.split('|').map(str::trim);
            let (who, args, want) = (f.next()?, f.next()?, f.next()? == "yes");
            let args = args.replace(" NS", &format!(" {ns}"));
            let args: Vec<&str> = args.split_whitespace().collect();
            (allowed(cp, &user(who), &args) != want)
                .then(|| format!("{who} {args:?}: expected {want}"))
        })
        .collect()
}

/// [`can_i`], except for the subresource API's group, which no server
/// serves yet, so kubectl would not resolve it: a `SubjectAccessReview` of
/// `VERB virtualmachines.subresources.kubevmm.io --subresource=S -n NS`.
fn allowed(cp: &ControlPlane, user: &str, args: &[&str]) -> bool {
    let [verb, resource, sub, "-n", ns] = args else {
        return can_i(cp, user, args);
    };
    let (Some(resource), Some(sub)) = (
        resource.strip_suffix(".subresources.kubevmm.io"),
        sub.strip_prefix("--subresource="),
    ) else {
        return can_i(cp, user, args);
    };
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {
            "group": "subresources.kubevmm.io", "resource": resource,
            "subresource": sub, "verb": verb, "namespace": ns}},
    });
    let out = run_with_input(
        cp.kubectl().args(["create", "-o", "json", "-f", "-"]),
        &review.to_string(),
    );
    assert!(out.success, "SubjectAccessReview: {}", out.stderr);
    let answer: serde_json::Value = serde_json::from_str(&out.stdout).expect("review JSON");
    answer["status"]["allowed"] == true
}

#[test]
fn people_get_vm_rights_through_the_builtin_edit_and_view_roles() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("users");
    ok(helm(cp).args(["install", "people", "-n", &ns]).arg(chart()));
    for (who, role) in [("editor", "edit"), ("viewer", "view")] {
        ok(cp.kubectl().args([
            "create",
            "rolebinding",
            who,
            &format!("--clusterrole={role}"),
            &format!("--serviceaccount={ns}:{who}"),
            "-n",
            &ns,
        ]));
    }
    let sa = |who: &str| format!("system:serviceaccount:{ns}:{who}");
    // kube-controller-manager aggregates the chart's roles into edit and view.
    let first = ["patch", "virtualmachines.kubevmm.io", "-n", &ns];
    wait_for(
        60,
        "the chart's user roles aggregated into edit",
        || can_i(cp, &sa("editor"), &first).then_some(()),
        || {
            outcome(
                cp.kubectl()
                    .args(["get", "clusterrole", "edit", "-o", "yaml"]),
            )
            .stdout
        },
    );
    let wrong = rbac_mismatches(cp, USER_CASES, &ns, sa);
    assert!(wrong.is_empty(), "user RBAC differs:\n{}", wrong.join("\n"));
    ok(helm(cp).args(["uninstall", "--no-hooks", "people", "-n", &ns]));
    assert!(
        get_json(cp, &["get", "clusterrole", "people-vm-user"]).is_none(),
        "the user role outlived the release"
    );
}

fn vm_manifest(name: &str) -> String {
    format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n\
         spec:\n  cpus: 1\n  memory: 64Mi\n  boot:\n    kernel: {{path: /var/lib/kubevmm/boot/k}}\n"
    )
}

#[test]
fn node_vmm_may_write_only_its_own_node_objects() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("nr");
    ok(helm(cp).args(["install", "nr", "-n", &ns]).arg(chart()));
    let (mine, other) = (format!("{ns}-a"), format!("{ns}-b"));

    let (bound, unbound) = node_tokens(cp, "nr", &ns, &mine, &other);

    // The token says which node (ServiceAccountTokenPodNodeInfo).
    let who = ok(as_token(&bound).args(["auth", "whoami", "-o", "json"]));
    assert!(
        who.contains("authentication.kubernetes.io/node-name") && who.contains(&mine),
        "the Pod-bound token carries no node name:\n{who}"
    );

    // Only the operator binds (binding-restriction.yaml): bind as it does.
    let op = sa_kubeconfig(cp, &ns, "nr-operator");
    for (vm, node) in [("vm-mine", &mine), ("vm-other", &other)] {
        let o = run_with_input(
            cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
            &vm_manifest(vm),
        );
        assert!(o.success, "create {vm}: {}", o.stderr);
        bind_as_operator(&op, &ns, vm, node);
    }

    // Policies take effect once the API server has loaded them.
    let refused = wait_for(
        30,
        "the policy to refuse a cross-node status write",
        || {
            let o = status_patch(&bound, &ns, "vm-other");
            (!o.success).then_some(o.stderr)
        },
        || "the write kept succeeding".into(),
    );
    assert!(
        refused.contains("may only update VirtualMachines bound to"),
        "unexpected refusal: {refused}"
    );
    let own = status_patch(&bound, &ns, "vm-mine");
    assert!(own.success, "own-node status write refused: {}", own.stderr);

    // Relabelling a VM onto its own node is refused too.
    let steal = outcome(as_token(&bound).args([
        "label",
        "vm",
        "vm-other",
        "-n",
        &ns,
        "--overwrite",
        &format!("kubevmm.io/node={mine}"),
    ]));
    assert!(!steal.success, "node-vmm relabelled another node's VM");

    // HypervisorNode and Lease: its own, not another node's.
    let hv = |n: &str| {
        format!("apiVersion: kubevmm.io/v1alpha1\nkind: HypervisorNode\nmetadata:\n  name: {n}\nspec: {{}}\n")
    };
    // Registration creates it (node-vmm may not patch the object itself).
    let o = create_as(&bound, &hv(&mine));
    assert!(o.success, "own HypervisorNode refused: {}", o.stderr);
    let o = create_as(&bound, &hv(&other));
    assert!(
        !o.success && o.stderr.contains("may only write HypervisorNode"),
        "{}",
        o.stderr
    );
    let lease = |n: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: node-vmm-{n}\n  namespace: kubevmm-system\nspec:\n  holderIdentity: {n}\n  leaseDurationSeconds: 40\n"
        )
    };
    let o = apply_as(&bound, &lease(&mine));
    assert!(o.success, "own Lease refused: {}", o.stderr);
    let o = apply_as(&bound, &lease(&other));
    assert!(
        !o.success && o.stderr.contains("may only write Lease"),
        "{}",
        o.stderr
    );

    // A token not bound to a Pod on a node writes nothing.
    let o = status_patch(&unbound, &ns, "vm-mine");
    assert!(
        !o.success && o.stderr.contains("bound to a Pod"),
        "unbound token: {}",
        o.stderr
    );

    ok(helm(cp).args(["uninstall", "--no-hooks", "nr", "-n", &ns]));
    for n in [&mine, &other] {
        let _ = outcome(cp.kubectl().args(["delete", "node", n, "--wait=false"]));
        let _ = outcome(cp.kubectl().args([
            "delete",
            "hvnode",
            n,
            "--ignore-not-found",
            "--wait=false",
        ]));
    }
}

/// The real binaries, authenticated as the chart's service accounts (the
/// agent with a token bound to a Pod on its node, as the kubelet would give
/// it), under the chart's RBAC and node-restriction policy: the agent
/// registers and heartbeats, the operator takes its leader Lease and binds
/// a VM, the agent reports that VM's phase, and neither is ever refused.
#[test]
fn binaries_run_under_the_chart_rbac_and_policy() {
    let cp = ControlPlane::shared();
    let _serial = serial();
    ensure_lease_namespace(cp);
    let ns = cp.namespace("run");
    ok(helm(cp).args(["install", "run", "-n", &ns]).arg(chart()));
    let (node, other) = (format!("{ns}-a"), format!("{ns}-b"));
    let (agent_kc, _) = node_tokens(cp, "run", &ns, &node, &other);
    let op_token = ok(cp
        .kubectl()
        .args(["create", "token", "run-operator", "-n", &ns]));
    let op_kc = token_kubeconfig(cp, &format!("{ns}-operator"), op_token.trim());

    let state = std::env::temp_dir().join(format!("kubevmm-e2e-{ns}"));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("state dir");
    let mut agent_cmd = Command::new(bin_path("node-vmm"));
    agent_cmd
        .env("KUBECONFIG", &agent_kc)
        .args(["agent", "--node-name", &node, "--state-dir"])
        .arg(state.join("run"))
        .args(["--lease-seconds", "6", "--metrics-addr"])
        .arg(format!("127.0.0.1:{}", free_port().expect("port")));
    let agent = Daemon::start(agent_cmd, state.join("agent.log"));
    let lease = format!("node-vmm-{node}");
    wait_for(
        60,
        "the agent's HypervisorNode (with the Node's labels) and heartbeat Lease",
        || {
            let hv = get_json(cp, &["get", "hvnode", &node])?;
            get_json(cp, &["get", "lease", "-n", "kubevmm-system", &lease])?;
            (hv["metadata"]["labels"]["kubevmm.io/test-node"] == node.as_str()
                && hv["status"].is_object())
            .then_some(())
        },
        || agent.output(),
    );

    let mut op_cmd = Command::new(bin_path("kubevmm-operator"));
    op_cmd
        .arg("--kubeconfig")
        .arg(&op_kc)
        .args(["--namespace", &ns, "--node-selector"])
        .arg(format!("kubevmm.io/test-node={node}"))
        .args(["--leader-lease", &format!("op-{ns}"), "--metrics-addr"])
        .arg(format!("127.0.0.1:{}", free_port().expect("port")));
    let operator = Daemon::start(op_cmd, state.join("operator.log"));

    // A kernel path outside the agent's allow-list: the agent reports the VM
    // Failed without needing /dev/kvm, which is all this test needs.
    let vm = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: vm\nspec:\n  runStrategy: Once\n  cpus: 1\n  memory: 64Mi\n  \
         nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: /etc/hostname}}\n"
    );
    let o = run_with_input(cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]), &vm);
    assert!(o.success, "apply: {}", o.stderr);
    let status = || get_json(cp, &["get", "vm", "vm", "-n", &ns]).map(|v| v["status"].clone());
    wait_for(
        60,
        "the operator to bind the VM, the agent to report it Failed, the operator to release it",
        || {
            let s = status()?;
            let conds = s["conditions"].as_array()?;
            let cond = |t: &str| conds.iter().find(|c| c["type"] == t).cloned();
            // Ready/InvalidSpec is the agent's; Released from <node> the
            // operator's, after it had bound the VM there.
            (s["phase"] == "Failed"
                && cond("Ready")?["reason"] == "InvalidSpec"
                && cond("Scheduled")?["reason"] == "Released"
                && cond("Scheduled")?["message"].as_str()?.contains(&node))
            .then_some(())
        },
        || format!("{:?}\n{}\n{}", status(), agent.output(), operator.output()),
    );
    let lease = get_json(
        cp,
        &["get", "lease", "-n", "kubevmm-system", &format!("op-{ns}")],
    )
    .expect("the operator's leader Lease");
    assert!(lease["spec"]["holderIdentity"].is_string());
    for (who, log) in [("agent", agent.output()), ("operator", operator.output())] {
        // The operator's attempt to create kubevmm-system is refused by
        // design (it carries on); nothing else may be.
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                (l.contains("forbidden") || l.contains("denied"))
                    && !l.contains("cannot create namespace kubevmm-system")
            })
            .collect();
        assert!(
            refused.is_empty(),
            "the {who} was refused something:\n{log}"
        );
    }
    drop(operator);
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
    let _ = outcome(
        cp.kubectl()
            .args(["delete", "vm", "vm", "-n", &ns, "--wait=false"]),
    );
    ok(helm(cp).args(["uninstall", "--no-hooks", "run", "-n", &ns]));
}
