//! Placement for a whole pass (pure): every VM decided on its own
//! ([`super::decide`]), then the candidates placed oldest first into what
//! the VMs that stay bound leave free. Table-tested below, with the VMs as
//! a lagging cache and the ledger of the operator's own writes show them.

#[allow(clippy::wildcard_imports)] // the parent's types and helpers
use super::*;

/// Decides every VM and places the candidates, oldest first (first come,
/// first served); capacity is what the VMs that stay bound leave free.
pub(super) fn plan(
    vms: Vec<Arc<DynamicObject>>,
    states: &BTreeMap<String, NodeState>,
    overcommit: Overcommit,
) -> Vec<Work> {
    let mut items = vms;
    items.sort_by(|a, b| {
        let key = |o: &DynamicObject| {
            (
                o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                o.namespace(),
                o.name_any(),
            )
        };
        key(a).cmp(&key(b))
    });

    let mut works: Vec<Work> = items.into_iter().map(|obj| decide(obj, states)).collect();

    // Capacity taken by what stays bound, then placement in order.
    let bound: Vec<BoundVm> = works
        .iter()
        .filter_map(|w| {
            let node = w.bind.clone()?;
            let req = w.request.as_ref();
            Some(BoundVm {
                node,
                cpus: req.map_or(0, |r| r.cpus),
                memory: req.map_or(0, |r| r.memory),
                phase: w.status.phase.or(w.phase_now()),
                strategy: w.vm.as_ref().map(|v| v.spec.run_strategy),
                start_requested: w
                    .vm
                    .as_ref()
                    .is_some_and(|v| contract::pending_restart(v.annotations()).is_some()),
            })
        })
        .collect();
    let mut used = scheduling::usage_by_node(&bound);
    let infos: Vec<NodeInfo> = states
        .values()
        .filter(|s| !s.deleted)
        .map(|s| s.info.clone())
        .collect();
    for w in works
        .iter_mut()
        .filter(|w| w.placement == Placement::Wanted)
    {
        let Some(req) = w.request.clone() else {
            continue;
        };
        match scheduling::place(&req, &infos, &used, overcommit) {
            Ok(node) => {
                used.entry(node.clone())
                    .or_default()
                    .add(req.cpus, req.memory);
                w.placement = Placement::Placed {
                    first: w.current_status().restart_count == 0
                        && matches!(w.phase_now(), None | Some(VmPhase::Pending)),
                };
                w.status.phase = Some(VmPhase::Scheduled);
                w.status.conditions.insert(
                    condition::SCHEDULED,
                    Want::new(
                        ConditionStatus::True,
                        reason::SCHEDULED,
                        format!("bound to node {node}"),
                    ),
                );
                w.events
                    .push(Note::normal("Scheduled", format!("bound to node {node}")));
                w.bind = Some(node);
            }
            Err(u) => {
                w.status.phase = Some(VmPhase::Pending);
                let changed = w.current_condition(condition::SCHEDULED).is_none_or(|c| {
                    c.message != u.message || ConditionStatus::of(&c) != ConditionStatus::False
                });
                w.placement = Placement::Refused {
                    report: changed.then_some(u.reason),
                };
                if changed {
                    w.events
                        .push(Note::warning("FailedScheduling", u.message.clone()));
                }
                w.status.conditions.insert(
                    condition::SCHEDULED,
                    Want::new(ConditionStatus::False, reason::UNSCHEDULABLE, u.message),
                );
            }
        }
    }
    works
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::decide::tests::bound_vm;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpus: u32) -> (String, NodeState) {
        let state = NodeState {
            info: NodeInfo {
                name: name.into(),
                ready: true,
                kvm_available: true,
                allocatable_cpus: cpus,
                allocatable_memory: 8 * GI,
                ..NodeInfo::default()
            },
            liveness: Liveness::Alive {
                expires_at: Instant::now() + Duration::from_secs(30),
            },
            fenced: false,
            deleted: false,
        };
        (name.into(), state)
    }

    fn meta(mut obj: DynamicObject, name: &str, rv: &str, created: i64) -> DynamicObject {
        obj.metadata.name = Some(name.into());
        obj.metadata.uid = Some(format!("uid-{name}"));
        obj.metadata.resource_version = Some(rv.into());
        obj.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(created).expect("timestamp")));
        obj
    }

    /// A VM nobody has placed yet.
    fn unbound(name: &str, rv: &str, created: i64, cpus: u32) -> DynamicObject {
        let mut obj = DynamicObject::new(name, &vm_resource()).within("ns");
        obj.data =
            json!({"spec": {"cpus": cpus, "memory": "64Mi", "boot": {"kernel": {"path": "/k"}}}});
        meta(obj, name, rv, created)
    }

    /// The same VM once the operator bound it to `node`.
    fn written(name: &str, rv: &str, created: i64, node: &str) -> DynamicObject {
        meta(bound_vm(node, "Always"), name, rv, created)
    }

    /// A VM of a table row: name, creation second, vCPUs, node bound to.
    type Vm = (&'static str, i64, u32, Option<&'static str>);
    /// The placement a row expects: name, node.
    type Placed = (&'static str, Option<&'static str>);

    fn placements(works: &[Work]) -> BTreeMap<String, Option<String>> {
        works
            .iter()
            .map(|w| (w.name.clone(), w.bind.clone()))
            .collect()
    }

    #[test]
    fn oldest_first_into_what_stays_bound_leaves_free() {
        let states: BTreeMap<_, _> = [node("n", 2)].into();
        let overcommit = Overcommit::new(1.0, 1.0).expect("overcommit");
        // VMs | placement after the pass
        let table: &[(&[Vm], &[Placed])] = &[
            // first come, first served: the older VM takes the room
            (
                &[("b", 20, 2, None), ("a", 10, 2, None)],
                &[("a", Some("n")), ("b", None)],
            ),
            // a bound VM keeps its place and its capacity
            (
                &[
                    ("old", 5, 1, Some("n")),
                    ("a", 10, 2, None),
                    ("b", 20, 1, None),
                ],
                &[("old", Some("n")), ("a", None), ("b", Some("n"))],
            ),
        ];
        for (vms, want) in table {
            let objs = vms
                .iter()
                .map(|(name, created, cpus, bound)| {
                    Arc::new(match bound {
                        Some(n) => written(name, "1", *created, n),
                        None => unbound(name, "1", *created, *cpus),
                    })
                })
                .collect();
            let got = placements(&plan(objs, &states, overcommit));
            let want: BTreeMap<String, Option<String>> = want
                .iter()
                .map(|(n, b)| ((*n).to_string(), b.map(String::from)))
                .collect();
            assert_eq!(got, want, "VMs {vms:?}");
        }
    }

    /// The case the ledger exists for: the pass reads a cache that has not
    /// yet shown a binding the operator wrote. Alone, the cache offers the
    /// VM's capacity to an older VM, whose write would succeed (it is a
    /// write to another object): the node would be booked twice.
    #[test]
    fn a_binding_the_cache_has_not_shown_still_takes_its_room() {
        let states: BTreeMap<_, _> = [node("n", 2)].into();
        let overcommit = Overcommit::new(1.0, 1.0).expect("overcommit");
        // y (1 vCPU) was bound in the previous pass: version 5 → 6. z (2
        // vCPUs, older) could not be placed then and can now (say its
        // nodeSelector's label just arrived).
        let y_cached = Arc::new(unbound("y", "5", 20, 1));
        let z = Arc::new(unbound("z", "3", 10, 2));

        let from_cache = plan(vec![y_cached.clone(), z.clone()], &states, overcommit);
        assert_eq!(
            placements(&from_cache)["z"].as_deref(),
            Some("n"),
            "the stale cache alone over-books n"
        );

        let mut ledger = Ledger::default();
        ledger.record(Some("5".into()), written("y", "6", 20, "n"));
        let seen = vec![ledger.view(y_cached), ledger.view(z)];
        let works = plan(seen, &states, overcommit);
        let got = placements(&works);
        assert_eq!(got["y"].as_deref(), Some("n"));
        assert_eq!(got["z"], None, "z must wait: n has 1 vCPU free");
        let z = works.iter().find(|w| w.name == "z").expect("z");
        assert_eq!(
            z.status.conditions[condition::SCHEDULED].status,
            ConditionStatus::False
        );
    }
}
