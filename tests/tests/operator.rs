//! The operator against a real control plane. The test plays the node side
//! (node-vmm): it creates `HypervisorNode`s with status and renews their
//! heartbeat Leases, and runs the real `kubevmm-operator` binary (built
//! beforehand: `cargo build -p kubevmm-operator`, which `make test` does).
//!
//! Each test is isolated in the shared control plane: its own namespace,
//! nodes labelled `kubevmm.io/test=<namespace>`, and operators started with
//! `--namespace`, `--node-selector` and their own leader Lease.
//! Every wait polls the API with a deadline; nothing asserts on timing.

// Scenario tests read best as one story each; node names a/b match the docs.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod operator_env;

#[allow(clippy::wildcard_imports)]
use operator_env::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_vm_to_the_node_with_room() {
    let (cp, client, ns, nodes) = setup("op-bind").await;
    let small = nodes.add("small", 2, 2 * GI, &[]).await;
    let big = nodes.add("big", 8, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "web", 4, "1Gi", json!({})).await;
    let node = wait_bound(&client, &ns, "web", &[&op]).await;
    assert_eq!(node, big, "4 vCPUs only fit on {big}, not {small}");
    let vm = get_vm(&client, &ns, "web").await.expect("vm");
    assert!(
        vm.finalizers().iter().any(|f| f == contract::FINALIZER),
        "{}",
        describe(&vm)
    );
    // A Scheduled Event was published.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("a Scheduled Event", &[&op], || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("Scheduled"))
            .map(|_| ())
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;
    // Metrics answer.
    let metrics = op.http_get("/metrics").unwrap_or_default();
    assert_eq!(leader_gauge(&op), Some(1), "{metrics}");
    assert!(
        metrics.contains("kubevmm_operator_scheduling_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(op
        .http_get("/readyz")
        .unwrap_or_default()
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_until_another_vm_is_deleted() {
    let (cp, client, ns, nodes) = setup("op-pending").await;
    let node = nodes.add("only", 2, 2 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "first", 2, "1Gi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "first", &[&op]).await, node);
    create_vm(&client, &ns, "second", 2, "1Gi", json!({})).await;
    let msg = wait_unschedulable(
        &client,
        &ns,
        "second",
        &[&op],
        &[
            "0/1 nodes can run 2 vCPUs and 1Gi",
            &format!("{node} has 0 vCPUs free"),
        ],
    )
    .await;
    assert_eq!(
        msg,
        format!("0/1 nodes can run 2 vCPUs and 1Gi: {node} has 0 vCPUs free")
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("a FailedScheduling Event", &[&op], || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("FailedScheduling"))
            .map(|_| ())
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;

    // Delete the first VM; play node-vmm stopping it and releasing the finalizer.
    Api::<VirtualMachine>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .expect("delete first");
    node_releases(&client, &ns, "first").await;
    assert_eq!(wait_bound(&client, &ns, "second", &[&op]).await, node);
}

/// The operator decides from watch caches that lag its own writes; a burst
/// of VMs must still never be bound past a node's capacity (its ledger of
/// unseen writes counts them). Nothing ever unbinds an over-booked VM, so
/// the settled state shows any double-counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_vms_never_overbooks_a_node() {
    let (cp, client, ns, nodes) = setup("op-burst").await;
    let node = nodes.add("three", 3, 3 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    let names: Vec<String> = (0..12).map(|i| format!("vm-{i:02}")).collect();
    futures::future::join_all(
        names
            .iter()
            .map(|n| create_vm(&client, &ns, n, 1, "128Mi", json!({}))),
    )
    .await;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    let settle = |bound: usize| {
        let api = api.clone();
        let node = node.clone();
        async move {
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let on_node = list
                .items
                .iter()
                .filter(|v| v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node))
                .count();
            let pending = list
                .items
                .iter()
                .filter(|v| cond(v, contract::condition::SCHEDULED).is_some_and(|c| c.0 == "False"))
                .count();
            let summary = || {
                list.items
                    .iter()
                    .map(placement)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert!(on_node <= 3, "node {node} over-booked:\n{}", summary());
            if on_node == bound && pending + bound == list.items.len() {
                Ok(())
            } else {
                Err(format!(
                    "{on_node} bound, {pending} pending:\n{}",
                    summary()
                ))
            }
        }
    };
    wait_for("3 bound, 9 pending", &[&op], || settle(3)).await;
    await_full_pass(&op, &[]).await;
    settle(3).await.expect("still 3 bound after another pass");

    // Freeing one slot binds exactly one more.
    let first = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .find(|v| v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node))
        .expect("a bound VM")
        .name_any();
    api.delete(&first, &DeleteParams::default())
        .await
        .expect("delete");
    node_releases(&client, &ns, &first).await;
    wait_for("3 bound again, 8 pending", &[&op], || settle(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_selector_and_cordon_are_honoured() {
    let (cp, client, ns, nodes) = setup("op-select").await;
    let cordoned = nodes.add("cordoned", 16, 32 * GI, &[("zone", "x")]).await;
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cordoned": true}})),
        )
        .await
        .expect("cordon");
    let zone_x = nodes.add("zonex", 4, 4 * GI, &[("zone", "x")]).await;
    let plain = nodes.add("plain", 8, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");

    create_vm(
        &client,
        &ns,
        "in-x",
        1,
        "512Mi",
        json!({"nodeSelector": {"zone": "x"}}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "in-x", &[&op]).await, zone_x);
    create_vm(&client, &ns, "anywhere", 1, "512Mi", json!({})).await;
    assert_eq!(
        wait_bound(&client, &ns, "anywhere", &[&op]).await,
        plain,
        "the cordoned node has the most memory but must not be chosen"
    );
    create_vm(
        &client,
        &ns,
        "in-y",
        1,
        "512Mi",
        json!({"nodeSelector": {"zone": "y"}}),
    )
    .await;
    let msg = wait_unschedulable(&client, &ns, "in-y", &[&op], &[]).await;
    assert!(
        msg.starts_with("0/3 nodes can run 1 vCPU and 512Mi: "),
        "{msg}"
    );
    assert!(msg.contains(&format!("{cordoned} is cordoned")), "{msg}");
    assert!(
        msg.contains(&format!("{zone_x} does not match nodeSelector zone=y")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_heartbeat_marks_node_lost_and_fencing_replaces_always_vms() {
    let (cp, client, ns, nodes) = setup("op-lost").await;
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
    create_vm(
        &client,
        &ns,
        "once",
        1,
        "1Gi",
        json!({"runStrategy": "Once"}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, a);
    assert_eq!(wait_bound(&client, &ns, "once", &[&op]).await, a);
    // node-vmm on a starts both: Running, Ready=True under its own manager
    // (the operator later takes Ready's fields to say the state is unknown).
    for name in ["keep", "once"] {
        node_reports_running(&client, &ns, name).await;
    }
    // A second node appears only now, so both VMs are on a.
    let b = nodes.add("b", 4, 4 * GI, &[]).await;

    // a stops heartbeating: NodeLost, Ready=Unknown, phase and binding kept.
    nodes.stop_heartbeat(&a);
    for name in ["keep", "once"] {
        wait_for(&format!("NodeLost on {name}"), &[&op], || async {
            let vm = get_vm(&client, &ns, name).await.ok_or("absent")?;
            let lost = cond(&vm, contract::condition::NODE_LOST);
            let ready = cond(&vm, contract::condition::READY);
            match (lost, ready) {
                (Some((s, r, m)), Some((rs, _, _)))
                    if s == "True"
                        && r == "HeartbeatExpired"
                        && m.contains("last heartbeat at")
                        && rs == "Unknown" =>
                {
                    Ok(())
                }
                _ => Err(describe(&vm)),
            }
        })
        .await;
        let vm = get_vm(&client, &ns, name).await.expect("vm");
        assert_eq!(
            vm.labels().get(contract::LABEL_NODE),
            Some(&a),
            "{}",
            describe(&vm)
        );
        assert_eq!(
            vm.status.as_ref().and_then(|s| s.phase),
            Some(VmPhase::Running),
            "phase is left alone: {}",
            describe(&vm)
        );
    }

    // Heartbeat back: NodeLost cleared; the operator keeps its
    // Ready=Unknown until node-vmm, seeing it, writes its own Ready again.
    nodes.resume_heartbeat(&a);
    wait_for("NodeLost cleared", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, _)) if s == "False" => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        cond(&vm, contract::condition::READY).map(|c| (c.0, c.1)),
        Some(("Unknown".into(), "NodeLost".into())),
        "{}",
        describe(&vm)
    );
    for name in ["keep", "once"] {
        node_reports_running(&client, &ns, name).await;
    }
    wait_for("node-vmm's Ready back", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::READY) {
            Some((s, r, _)) if s == "True" && r == "GuestRunning" => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;

    // Lost again, then fenced: the Always VM moves to b, the Once VM fails.
    nodes.stop_heartbeat(&a);
    wait_for("NodeLost again", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, _)) if s == "True" => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "not moved before fencing"
    );
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &a,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {contract::ANNOTATION_FENCED: "true"}}}),
            ),
        )
        .await
        .expect("fence");
    wait_for("the Always VM re-placed on b", &[&op], || async {
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
    assert_eq!(
        vm.status.as_ref().map(|s| s.restart_count),
        Some(1),
        "{}",
        describe(&vm)
    );
    // Ready says the guest is gone (its fields were the operator's since
    // the node was lost: dropping them would leave an invalid condition).
    assert_eq!(
        cond(&vm, contract::condition::READY).map(|c| (c.0, c.1)),
        Some(("False".into(), "Rescheduled".into())),
        "{}",
        describe(&vm)
    );
    wait_for("the Once VM failed and released", &[&op], || async {
        let vm = get_vm(&client, &ns, "once").await.ok_or("absent")?;
        let s = vm.status.clone().unwrap_or_default();
        if s.phase == Some(VmPhase::Failed)
            && s.node_name.is_none()
            && vm.labels().get(contract::LABEL_NODE).is_none()
            && cond(&vm, contract::condition::READY)
                .is_some_and(|c| c.0 == "False" && c.1 == "NodeGone")
        {
            Ok(())
        } else {
            Err(describe(&vm))
        }
    })
    .await;
    // node-vmm on b starts it; the operator lets Ready go to it, with no
    // write refused on the way.
    node_reports_running(&client, &ns, "keep").await;
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        cond(&vm, contract::condition::READY).map(|c| (c.0, c.1)),
        Some(("True".into(), "GuestRunning".into())),
        "{}",
        describe(&vm)
    );
    assert_eq!(
        metric_sum(
            &op,
            "kubevmm_operator_reconcile_errors_total{kind=\"write\"}"
        ),
        Some(0),
        "no write refused: {}",
        op.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vm_is_released_and_placed_again_when_asked_to_run() {
    let (cp, client, ns, nodes) = setup("op-release").await;
    let a = nodes.add("a", 2, 2 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "vm", 2, "1Gi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "vm", &[&op]).await, a);
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
    )
    .await
    .expect("halt");
    // node-vmm stops the guest and reports it.
    api.patch_status(
        "vm",
        &PatchParams::apply(contract::MANAGER_NODE).force(),
        &Patch::Apply(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "status": {"phase": "Stopped"}
        })),
    )
    .await
    .expect("node-vmm status");
    wait_for("the binding released", &[&op], || async {
        let vm = get_vm(&client, &ns, "vm").await.ok_or("absent")?;
        let s = vm.status.clone().unwrap_or_default();
        match cond(&vm, contract::condition::SCHEDULED) {
            Some((st, r, _))
                if st == "False"
                    && r == "Released"
                    && s.node_name.is_none()
                    && s.phase == Some(VmPhase::Stopped)
                    && vm.labels().get(contract::LABEL_NODE).is_none() =>
            {
                Ok(())
            }
            _ => Err(describe(&vm)),
        }
    })
    .await;
    api.patch(
        "vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"runStrategy": "Always"}})),
    )
    .await
    .expect("run again");
    assert_eq!(wait_bound(&client, &ns, "vm", &[&op]).await, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unbound_vm_removes_the_finalizer() {
    let (cp, client, ns, _nodes) = setup("op-delete").await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "nowhere", 1, "128Mi", json!({})).await;
    wait_unschedulable(
        &client,
        &ns,
        "nowhere",
        &[&op],
        &["no HypervisorNode exists"],
    )
    .await;
    let vm = get_vm(&client, &ns, "nowhere").await.expect("vm");
    assert!(
        vm.finalizers().iter().any(|f| f == contract::FINALIZER),
        "{}",
        describe(&vm)
    );
    Api::<VirtualMachine>::namespaced(client.clone(), &ns)
        .delete("nowhere", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the VM to be gone", &[&op], || async {
        match get_vm(&client, &ns, "nowhere").await {
            None => Ok(()),
            Some(vm) => Err(describe(&vm)),
        }
    })
    .await;
}

async fn lease_holder(client: &kube::Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), contract::LEASE_NAMESPACE)
        .get_opt(&format!("kubevmm-operator-{ns}"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_failover_without_duplicates() {
    let (cp, client, ns, nodes) = setup("op-leader").await;
    // Room for exactly five 1-vCPU VMs in total.
    let n1 = nodes.add("n1", 3, 8 * GI, &[]).await;
    let n2 = nodes.add("n2", 2, 8 * GI, &[]).await;
    let mut one = Operator::start(cp, &ns, "one");
    let mut two = Operator::start(cp, &ns, "two");
    let leader = wait_for("a leader", &[&one, &two], || async {
        lease_holder(&client, &ns)
            .await
            .filter(|h| h == "one" || h == "two")
            .ok_or_else(|| "no holder".to_string())
    })
    .await;
    // Exactly one replica reports itself leader.
    wait_for("leader gauges", &[&one, &two], || async {
        let g = [leader_gauge(&one), leader_gauge(&two)];
        let mut sorted = g;
        sorted.sort_unstable();
        if sorted == [Some(0), Some(1)] {
            Ok(())
        } else {
            Err(format!("{g:?}"))
        }
    })
    .await;
    for i in 0..3 {
        create_vm(&client, &ns, &format!("vm-{i}"), 1, "256Mi", json!({})).await;
    }
    for i in 0..3 {
        wait_bound(&client, &ns, &format!("vm-{i}"), &[&one, &two]).await;
    }
    // SIGKILL the leader; create more VMs than fit while nobody leads.
    let (dead, survivor) = if leader == "one" {
        one.kill();
        (&one, &two)
    } else {
        two.kill();
        (&two, &one)
    };
    for i in 3..6 {
        create_vm(&client, &ns, &format!("vm-{i}"), 1, "256Mi", json!({})).await;
    }
    wait_for(
        "the other replica to take over",
        &[dead, survivor],
        || async {
            lease_holder(&client, &ns)
                .await
                .filter(|h| *h == survivor.id)
                .map(|_| ())
                .ok_or_else(|| "old holder".to_string())
        },
    )
    .await;
    // Converges: five bound, one pending, no node over its capacity, each
    // binding consistent (label == nodeName).
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    wait_for("five bound and one pending", &[dead, survivor], || async {
        let vms = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        let mut pending = 0;
        for vm in &vms.items {
            let s = vm.status.clone().unwrap_or_default();
            match (vm.labels().get(contract::LABEL_NODE), &s.node_name) {
                (Some(l), Some(n)) if l == n && s.phase == Some(VmPhase::Scheduled) => {
                    *per_node.entry(l.clone()).or_default() += 1;
                }
                (None, None) if s.phase == Some(VmPhase::Pending) => pending += 1,
                _ => return Err(describe(vm)),
            }
        }
        let ok = per_node.get(&n1) == Some(&3) && per_node.get(&n2) == Some(&2) && pending == 1;
        if ok {
            Ok(())
        } else {
            Err(format!("{per_node:?}, {pending} pending"))
        }
    })
    .await;
    // Stable: a later pass does not move or duplicate anything. Wait for
    // full passes of the survivor in between, or the check proves nothing
    // (node heartbeats trigger passes every 500 ms).
    let list = || async {
        let mut v: Vec<String> = api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .map(placement)
            .collect();
        v.sort();
        v
    };
    let before = list().await;
    assert_eq!(
        leader_gauge(survivor),
        Some(1),
        "the survivor reports itself leader"
    );
    await_full_pass(survivor, &[dead]).await;
    let after = list().await;
    assert_eq!(before.len(), 6);
    assert_eq!(before, after, "a pass changed a converged state");
}
