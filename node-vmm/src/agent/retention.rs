//! How long what a VM leaves on a node is kept once the VM is no longer
//! bound here: pure rules, table-tested; the agent's sweep
//! ([`super::orphans`]) asks the API server and applies them.
//!
//! - **Run state** (`vms/<uid>/`: console ring, VMM log, exit record): kept
//!   while the VM exists and has not run anywhere else since, so the
//!   console of a stopped or failed guest can still be read; removed once
//!   the VM is deleted, re-created, or bound to another node.
//! - **Disks** (`disks/<uid>/`, [`super::disks`]): kept while the VM exists
//!   with its disks on this node (`status.diskNode`); removed once the VM is
//!   deleted, re-created, or gives them up.
//!
//! When the API server cannot be asked, everything is kept.

use std::time::Duration;

use super::disks::Owner;

/// The VM of a directory's owner record, as the API server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its uid (another one than the owner's: deleted and re-created).
    pub uid: String,
    /// `status.nodeName`: the node it is bound to, if any.
    pub node_name: Option<String>,
    /// `status.diskNode`: the node that holds its disks, if any.
    pub disk_node: Option<String>,
}

/// What the API server says of the VM a directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No VM of that namespace and name.
    Missing,
    /// The VM of that namespace and name.
    Found(Found),
    /// The API server could not be asked.
    Unknown,
}

/// What to do with a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Delete it, for this reason (logged).
    Remove(String),
}

/// How long a directory without an owner record is left alone (it may be
/// being made right now).
pub const UNOWNED_GRACE: Duration = Duration::from_secs(300);

/// The part both rules share: the VM as found when it is still the
/// directory's owner, else the verdict.
fn still_owned<'a>(
    owner: Option<&Owner>,
    lookup: &'a Lookup,
    age: Duration,
) -> Result<&'a Found, Verdict> {
    let Some(owner) = owner else {
        return Err(if age > UNOWNED_GRACE {
            Verdict::Remove("no owner record".into())
        } else {
            Verdict::Keep
        });
    };
    match lookup {
        Lookup::Unknown => Err(Verdict::Keep),
        Lookup::Missing => Err(Verdict::Remove(format!(
            "VirtualMachine {}/{} was deleted",
            owner.namespace, owner.name
        ))),
        Lookup::Found(f) if f.uid != owner.uid => Err(Verdict::Remove(format!(
            "VirtualMachine {}/{} was deleted and created anew",
            owner.namespace, owner.name
        ))),
        Lookup::Found(f) => Ok(f),
    }
}

/// The rule for the disks of a VM not bound to `node`.
pub fn disks(owner: Option<&Owner>, lookup: &Lookup, node: &str, age: Duration) -> Verdict {
    match still_owned(owner, lookup, age) {
        Err(v) => v,
        Ok(f) if f.disk_node.as_deref() == Some(node) => Verdict::Keep,
        Ok(f) => Verdict::Remove(format!(
            "the VM gave its disks on this node up (status.diskNode {})",
            f.disk_node.as_deref().unwrap_or("removed")
        )),
    }
}

/// The rule for the run state of a VM not bound to `node`.
pub fn run_state(owner: Option<&Owner>, lookup: &Lookup, node: &str, age: Duration) -> Verdict {
    match still_owned(owner, lookup, age) {
        Err(v) => v,
        Ok(Found {
            node_name: Some(n), ..
        }) if n != node => Verdict::Remove(format!("the VM runs on node {n} now")),
        Ok(_) => Verdict::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "ns".into(),
            name: "vm".into(),
            uid: "u1".into(),
        }
    }

    fn found(uid: &str, node_name: Option<&str>, disk_node: Option<&str>) -> Lookup {
        Lookup::Found(Found {
            uid: uid.into(),
            node_name: node_name.map(String::from),
            disk_node: disk_node.map(String::from),
        })
    }

    /// owner | lookup | age | disks removed because | run state removed because
    type Row<'a> = (
        Option<&'a Owner>,
        Lookup,
        Duration,
        Option<&'a str>,
        Option<&'a str>,
    );

    #[test]
    fn what_a_vm_leaves_goes_only_when_the_vm_is_gone_or_elsewhere() {
        let young = Duration::from_secs(10);
        let old = UNOWNED_GRACE + Duration::from_secs(1);
        let o = owner();
        let table: [Row; 10] = [
            (Some(&o), found("u1", None, Some("n1")), old, None, None),
            (Some(&o), Lookup::Unknown, old, None, None),
            (
                Some(&o),
                Lookup::Missing,
                young,
                Some("was deleted"),
                Some("was deleted"),
            ),
            (
                Some(&o),
                found("u2", None, Some("n1")),
                young,
                Some("created anew"),
                Some("created anew"),
            ),
            (
                Some(&o),
                found("u1", None, None),
                young,
                Some("diskNode removed"),
                None,
            ),
            (
                Some(&o),
                found("u1", Some("n2"), Some("n2")),
                young,
                Some("diskNode n2"),
                Some("runs on node n2"),
            ),
            // Bound here again (the sweep's list was older): kept.
            (
                Some(&o),
                found("u1", Some("n1"), Some("n1")),
                young,
                None,
                None,
            ),
            (None, Lookup::Unknown, young, None, None),
            (
                None,
                Lookup::Unknown,
                old,
                Some("no owner record"),
                Some("no owner record"),
            ),
            (
                None,
                Lookup::Missing,
                old,
                Some("no owner record"),
                Some("no owner record"),
            ),
        ];
        for (owner, lookup, age, disk_why, run_why) in table {
            for (rule, why) in [
                (disks as fn(_, _, _, _) -> _, disk_why),
                (run_state, run_why),
            ] {
                let v = rule(owner, &lookup, "n1", age);
                match (why, &v) {
                    (None, Verdict::Keep) => {}
                    (Some(why), Verdict::Remove(r)) => assert!(r.contains(why), "{r}"),
                    _ => panic!("{owner:?} {lookup:?} {age:?}: {v:?}, wanted {why:?}"),
                }
            }
        }
    }
}
