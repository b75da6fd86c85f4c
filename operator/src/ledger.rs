//! The operator's own writes, remembered until its watch caches show them.
//!
//! A pass decides from watch-fed caches ([`crate::cache`]), which lag the
//! API server by one watch event. Without this ledger a VM bound in one
//! pass could still look unbound to the next one (its watch event not yet
//! in), and the capacity it took would be handed out twice: the second
//! binding is a write to *another* VM, which no `resourceVersion`
//! precondition protects.
//!
//! After each successful write the ledger keeps the object the API server
//! returned, and the `resourceVersion` the write replaced. When a pass
//! reads a VM whose cached version is one the operator itself replaced,
//! the cache is behind: the pass uses the returned object instead. Any
//! other version is the cache's news (newer than the write: the operator's
//! writes are chained on preconditions, nobody writes in between), and the
//! entry is dropped. `resourceVersion`s are only compared for equality, as
//! the API conventions require.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::api::DynamicObject;

/// What the operator last wrote to one VM.
#[derive(Debug, Clone)]
struct Entry {
    /// Versions the operator's writes replaced (the cache showing one of
    /// them has not caught up).
    replaced: BTreeSet<String>,
    /// The object as the last write returned it.
    latest: Arc<DynamicObject>,
}

/// The operator's successful writes not yet seen in the cache, by VM uid.
#[derive(Debug, Default)]
pub struct Ledger {
    by_vm: BTreeMap<String, Entry>,
}

/// A VM's uid; `None` for objects without one (never from the API).
fn uid(obj: &DynamicObject) -> Option<&str> {
    obj.metadata.uid.as_deref()
}

impl Ledger {
    /// Records a write: `replaced` was the version it was conditional on,
    /// `written` what the API server returned.
    pub fn record(&mut self, replaced: Option<String>, written: DynamicObject) {
        let Some(key) = uid(&written).map(String::from) else {
            return;
        };
        let latest = Arc::new(written);
        let entry = self.by_vm.entry(key).or_insert_with(|| Entry {
            replaced: BTreeSet::new(),
            latest: latest.clone(),
        });
        entry.replaced.extend(replaced);
        entry.latest = latest;
    }

    /// The freshest known version of `cached`: the operator's own write
    /// when the cache has not caught up with it, else the cached object
    /// (and the entry, now superseded, is forgotten).
    pub fn view(&mut self, cached: Arc<DynamicObject>) -> Arc<DynamicObject> {
        let Some(key) = uid(&cached) else {
            return cached;
        };
        let Some(entry) = self.by_vm.get(key) else {
            return cached;
        };
        let rv = cached.metadata.resource_version.as_ref();
        if rv.is_some_and(|rv| entry.replaced.contains(rv)) {
            return entry.latest.clone();
        }
        // The cache holds our write or something newer.
        self.by_vm.remove(key);
        cached
    }

    /// Forgets VMs that are no longer in the cache (deleted).
    pub fn retain(&mut self, present: &BTreeSet<String>) {
        self.by_vm.retain(|uid, _| present.contains(uid));
    }

    /// Writes not yet seen in the cache.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_vm.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn vm(uid: &str, rv: &str, node: Option<&str>) -> DynamicObject {
        DynamicObject {
            types: None,
            metadata: ObjectMeta {
                name: Some("vm".into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            data: serde_json::json!({ "status": { "nodeName": node } }),
        }
    }

    fn node_of(obj: &DynamicObject) -> Option<String> {
        obj.data["status"]["nodeName"].as_str().map(String::from)
    }

    #[test]
    fn the_cache_behind_a_write_yields_the_write() {
        // (writes recorded as (replaced rv, returned rv, node)), cached rv → (seen rv, entry kept)
        type Write = (&'static str, &'static str, Option<&'static str>);
        let table: &[(&[Write], &str, &str, bool)] = &[
            // no write: the cache as it is
            (&[], "1", "1", false),
            // one write, the cache still at the version it replaced
            (&[("1", "2", Some("n1"))], "1", "2", true),
            // the cache caught up: the entry is dropped
            (&[("1", "2", Some("n1"))], "2", "2", false),
            // the cache has something newer (an agent wrote after us)
            (&[("1", "2", Some("n1"))], "7", "7", false),
            // chained writes: the cache at the first or the middle version
            (&[("1", "2", None), ("2", "3", Some("n1"))], "1", "3", true),
            (&[("1", "2", None), ("2", "3", Some("n1"))], "2", "3", true),
            (&[("1", "2", None), ("2", "3", Some("n1"))], "3", "3", false),
        ];
        for (writes, cached, want_rv, kept) in table {
            let mut ledger = Ledger::default();
            for (before, after, node) in *writes {
                ledger.record(Some((*before).into()), vm("u", after, *node));
            }
            let seen = ledger.view(Arc::new(vm("u", cached, None)));
            assert_eq!(
                seen.metadata.resource_version.as_deref(),
                Some(*want_rv),
                "writes {writes:?}, cache at {cached}"
            );
            assert_eq!(
                ledger.len(),
                usize::from(*kept),
                "writes {writes:?}, cache at {cached}"
            );
        }
    }

    #[test]
    fn a_binding_not_yet_in_the_cache_still_counts() {
        let mut ledger = Ledger::default();
        ledger.record(Some("1".into()), vm("a", "2", Some("n1")));
        // Twice: a pass that reads it does not consume it.
        for _ in 0..2 {
            let seen = ledger.view(Arc::new(vm("a", "1", None)));
            assert_eq!(node_of(&seen).as_deref(), Some("n1"));
        }
        // Another VM is untouched.
        let other = ledger.view(Arc::new(vm("b", "1", None)));
        assert_eq!(node_of(&other), None);
    }

    #[test]
    fn deleted_vms_are_forgotten() {
        let mut ledger = Ledger::default();
        ledger.record(Some("1".into()), vm("a", "2", Some("n1")));
        ledger.record(Some("1".into()), vm("b", "2", Some("n1")));
        ledger.retain(&BTreeSet::from(["b".to_string()]));
        assert_eq!(ledger.len(), 1);
        let b = ledger.view(Arc::new(vm("b", "1", None)));
        assert_eq!(node_of(&b).as_deref(), Some("n1"));
    }

    #[test]
    fn objects_without_uid_pass_through() {
        let mut ledger = Ledger::default();
        let mut o = vm("x", "2", Some("n1"));
        o.metadata.uid = None;
        ledger.record(Some("1".into()), o.clone());
        assert_eq!(ledger.len(), 0);
        let seen = ledger.view(Arc::new(o));
        assert_eq!(seen.metadata.resource_version.as_deref(), Some("2"));
    }
}
