//! The operator under attack and faults, against a real control plane (see
//! operator.rs for the setting): a node label it did not write, the real
//! agent and operator-bound VMs, node clocks off by an hour, a deleted
//! `HypervisorNode`, a VM whose writes an admission policy refuses.

// Scenario tests read best as one story each.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod operator_env;

#[allow(clippy::wildcard_imports)]
use operator_env::*;

/// Writes `status.nodeName` of `vm` by server-side apply as field manager
/// `manager` (the operator's, or an impostor's).
async fn apply_node_name(client: &kube::Client, ns: &str, vm: &str, node: &str, manager: &str) {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .patch_status(
            vm,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(json!({
                "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
                "status": {"nodeName": node, "phase": "Scheduled"}
            })),
        )
        .await
        .expect("write status.nodeName");
}

async fn set_node_label(client: &kube::Client, ns: &str, vm: &str, node: &str) {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .patch(
            vm,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {contract::LABEL_NODE: node}}})),
        )
        .await
        .expect("set the node label");
}

async fn events_with_reason(client: &kube::Client, ns: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// Item 2 (operator side): the label alone is not a binding. A VM labelled
/// for a cordoned node by somebody else (no admission policy here), or
/// labelled and given a `status.nodeName` by another field manager, is
/// placed by the scheduler like any other, and its label corrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_label_the_operator_did_not_write_binds_nothing() {
    let (cp, client, ns, nodes) = setup("op-forged").await;
    let cordoned = nodes.add("cordoned", 16, 32 * GI, &[]).await;
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cordoned": true}})),
        )
        .await
        .expect("cordon");
    let open = nodes.add("open", 2, 2 * GI, &[]).await;
    // Self-binding, before any operator runs: the label only...
    create_vm(&client, &ns, "label-only", 1, "256Mi", json!({})).await;
    set_node_label(&client, &ns, "label-only", &cordoned).await;
    // ...and the label plus status.nodeName under another field manager.
    create_vm(&client, &ns, "both", 1, "256Mi", json!({})).await;
    apply_node_name(&client, &ns, "both", &cordoned, "attacker").await;
    set_node_label(&client, &ns, "both", &cordoned).await;

    let op = Operator::start(cp, &ns, "a");
    for vm in ["label-only", "both"] {
        assert_eq!(
            wait_bound(&client, &ns, vm, &[&op]).await,
            open,
            "{vm}: the cordoned node must not be used because of a label"
        );
    }
    wait_for("NodeLabelIgnored Events", &[&op], || async {
        let n = events_with_reason(&client, &ns, "NodeLabelIgnored")
            .await
            .len();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} events"))
        }
    })
    .await;
}

/// Item 2 (agent side): the real node agent runs only VMs whose
/// `status.nodeName` the operator wrote, whatever their label says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_only_vms_the_operator_bound() {
    let (cp, client, ns, _nodes) = setup("op-agent").await;
    let node = format!("{ns}-agent");
    // A kernel path outside the agent's allow-list: a VM the agent takes on
    // is reported Failed (reason InvalidSpec) without needing /dev/kvm.
    let spec = json!({"runStrategy": "Once", "boot": {"kernel": {"path": "/etc/hostname"}}});
    for vm in ["bound", "label-only", "foreign-status"] {
        create_vm(&client, &ns, vm, 1, "64Mi", spec.clone()).await;
    }
    apply_node_name(&client, &ns, "bound", &node, contract::MANAGER_OPERATOR).await;
    set_node_label(&client, &ns, "bound", &node).await;
    set_node_label(&client, &ns, "label-only", &node).await;
    apply_node_name(&client, &ns, "foreign-status", &node, "attacker").await;
    set_node_label(&client, &ns, "foreign-status", &node).await;

    let state = std::env::temp_dir().join(format!("kubevmm-e2e-{ns}"));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("state dir");
    let mut cmd = Command::new(kubevmm_e2e::bin_path("node-vmm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .args(["agent", "--node-name", &node, "--state-dir"])
        .arg(state.join("run"))
        .args(["--lease-seconds", "6", "--metrics-addr"])
        .arg(format!(
            "127.0.0.1:{}",
            kubevmm_e2e::free_port().expect("port")
        ));
    let agent = kubevmm_e2e::Daemon::start(cmd, state.join("agent.log"));

    let start = Instant::now();
    let verdict = |name: &str| {
        agent.output().lines().any(|l| {
            l.contains("not bound to this node by the operator")
                && l.contains(&format!("vm={name}"))
        })
    };
    loop {
        let bound = get_vm(&client, &ns, "bound").await.expect("vm");
        let ran = cond(&bound, contract::condition::READY).is_some_and(|c| c.1 == "InvalidSpec");
        if ran && verdict("label-only") && verdict("foreign-status") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the agent did not take on the bound VM and refuse the others: {}\n{}",
            describe(&bound),
            agent.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in ["label-only", "foreign-status"] {
        let vm = get_vm(&client, &ns, name).await.expect("vm");
        let phase = vm.status.as_ref().and_then(|s| s.phase);
        assert!(
            cond(&vm, contract::condition::READY).is_none()
                && matches!(phase, None | Some(VmPhase::Scheduled)),
            "the agent acted on {name}: {}",
            describe(&vm)
        );
    }
    drop(agent);
    kubevmm_e2e::kill_guests(&state);
    let _ = Api::<HypervisorNode>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
}

/// Renews `node`'s Lease every 500 ms with `renewTime` = now + `skew`
/// seconds (a node agent whose clock is off), until the returned flag is
/// cleared.
fn skewed_heartbeat(client: &kube::Client, node: &str, skew: i64) -> Arc<Mutex<bool>> {
    let run = Arc::new(Mutex::new(true));
    let leases: Api<Lease> = Api::namespaced(client.clone(), contract::LEASE_NAMESPACE);
    let (name, flag) = (contract::node_lease_name(node), run.clone());
    tokio::spawn(async move {
        while *flag.lock().expect("lock") {
            let t = Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(skew))
                .expect("time");
            let patch = json!({"spec": {"renewTime": MicroTime(t)}});
            let _ = leases
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    run
}

/// Item 11a: liveness is measured on the operator's clock. A node whose
/// clock is an hour behind but which heartbeats is ready; one whose clock
/// is an hour ahead and stopped heartbeating is lost after a Lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_liveness_uses_the_operators_clock_not_the_nodes() {
    let (cp, client, ns, nodes) = setup("op-clock").await;
    let a = nodes.add("a", 4, 4 * GI, &[]).await;
    nodes.stop_heartbeat(&a);
    let behind = skewed_heartbeat(&client, &a, -3600);
    let op = Operator::start(cp, &ns, "a");
    create_vm(
        &client,
        &ns,
        "vm",
        1,
        "256Mi",
        json!({"runStrategy": "Always"}),
    )
    .await;
    assert_eq!(
        wait_bound(&client, &ns, "vm", &[&op]).await,
        a,
        "a heartbeating node is ready whatever its clock says"
    );
    // One last renewal stamped an hour ahead, then silence.
    *behind.lock().expect("lock") = false;
    let ahead = skewed_heartbeat(&client, &a, 3600);
    tokio::time::sleep(Duration::from_millis(700)).await;
    *ahead.lock().expect("lock") = false;
    wait_for(
        "NodeLost despite a renewTime in the future",
        &[&op],
        || async {
            let vm = get_vm(&client, &ns, "vm").await.ok_or("absent")?;
            match cond(&vm, contract::condition::NODE_LOST) {
                Some((s, r, m))
                    if s == "True" && r == "HeartbeatExpired" && m.contains("no renewal seen") =>
                {
                    Ok(())
                }
                _ => Err(describe(&vm)),
            }
        },
    )
    .await;
}

/// Item 11c: deleting a `HypervisorNode` is not proof that its guests are
/// dead: its VMs stay bound while it heartbeats, get `NodeLost` when it stops,
/// and move only once the node is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_hypervisornode_does_not_move_its_vms_until_fenced() {
    let (cp, client, ns, nodes) = setup("op-deleted").await;
    let a = nodes.add("a", 4, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(
        &client,
        &ns,
        "keep",
        1,
        "1Gi",
        json!({"runStrategy": "Always"}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, a);
    let b = nodes.add("b", 4, 8 * GI, &[]).await;

    let hv: Api<HypervisorNode> = Api::all(client.clone());
    hv.delete(&a, &DeleteParams::default())
        .await
        .expect("delete HypervisorNode a");
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "moved while the old node still heartbeats: {}",
        describe(&vm)
    );
    assert!(
        cond(&vm, contract::condition::NODE_LOST).is_none_or(|c| c.0 != "True"),
        "{}",
        describe(&vm)
    );

    nodes.stop_heartbeat(&a);
    wait_for("NodeLost on the deleted node's VM", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, m)) if s == "True" && m.contains("was deleted") => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "moved before fencing: {}",
        describe(&vm)
    );

    // Fenced: recreate it with the annotation; the VM moves to b.
    let fenced: HypervisorNode = serde_json::from_value(json!({
        "apiVersion": "kubevmm.io/v1alpha1", "kind": "HypervisorNode",
        "metadata": {"name": a, "labels": {"kubevmm.io/test": ns},
                     "annotations": {contract::ANNOTATION_FENCED: "true"}},
        "spec": {}
    }))
    .expect("node");
    hv.create(&PostParams::default(), &fenced)
        .await
        .expect("recreate fenced");
    wait_for("the VM re-placed on b", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        if vm.labels().get(contract::LABEL_NODE) == Some(&b) {
            Ok(())
        } else {
            Err(describe(&vm))
        }
    })
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, b);
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(vm.status.as_ref().map(|s| s.restart_count), Some(1));
}

/// Item 11b: one VM whose writes are refused (here by an admission policy)
/// is retried on its own with backoff and reported; the others are bound as
/// promptly as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_vm_does_not_stall_the_others() {
    let (cp, client, ns, nodes) = setup("op-poison").await;
    let a = nodes.add("a", 8, 8 * GI, &[]).await;
    create_vm(&client, &ns, "poison", 1, "256Mi", json!({})).await;
    let policy = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: poison-{ns}}}\n\
         spec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules:\n    - apiGroups: [kubevmm.io]\n      \
         apiVersions: [\"*\"]\n      operations: [UPDATE]\n      resources: [virtualmachines, virtualmachines/status]\n  \
         matchConditions:\n  - name: poison\n    expression: 'request.namespace == \"{ns}\" && request.name == \"poison\"'\n  \
         validations:\n  - expression: 'false'\n    message: test refuses every write to this VM\n---\n\
         apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: poison-{ns}}}\n\
         spec: {{policyName: poison-{ns}, validationActions: [Deny]}}\n"
    );
    let o = kubevmm_e2e::run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &policy);
    assert!(o.success, "poison policy: {}", o.stderr);
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    wait_for("the poison policy to be in force", &[], || async {
        match api
            .patch(
                "poison",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"probe": "1"}}})),
            )
            .await
        {
            Err(e) if e.to_string().contains("test refuses") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let op = Operator::start(cp, &ns, "a");
    // Let the failures pile up: eight failed writes take 25 s of backoff, so
    // a stalled loop would now sleep 25.6 s between passes.
    wait_for("the poison VM to fail eight times", &[&op], || async {
        match metric_sum(
            &op,
            "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
        ) {
            Some(n) if n >= 8 => Ok(()),
            other => Err(format!("{other:?} write errors")),
        }
    })
    .await;
    let created = Instant::now();
    create_vm(&client, &ns, "good", 1, "256Mi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "good", &[&op]).await, a);
    let took = created.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a healthy VM waited {took:?} behind a failing one\n{}",
        op.log_tail()
    );
    // Events go out in the background, after the writes.
    wait_for(
        "a ReconcileFailed Event on the poison VM",
        &[&op],
        || async {
            let events = events_with_reason(&client, &ns, "ReconcileFailed").await;
            if events.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("poison")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("test refuses"))
            }) {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
    // Still retried (not given up on), with backoff.
    let before = metric_sum(
        &op,
        "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
    );
    wait_for("another retry of the poison VM", &[&op], || async {
        let now = metric_sum(
            &op,
            "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
        );
        if now > before {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    let _ = cp
        .kubectl()
        .args([
            "delete",
            "validatingadmissionpolicy,validatingadmissionpolicybinding",
            &format!("poison-{ns}"),
        ])
        .output();
}
