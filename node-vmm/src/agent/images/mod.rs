//! `VirtualMachineImage`s on this node, imported lazily when a VM bound
//! here needs one (as the kubelet pulls container images): fetched into a
//! partial file ([`fetch`]), verified against `sha256`, its format detected
//! from the bytes ([`format`]), then moved into the content-addressed cache
//! ([`store`]). One import per source however many VMs wait; each waiting VM
//! is woken when it ends. Progress and failures go to the image's status,
//! in this node's own entry (server-side apply, field manager
//! `node-vmm-<node>`), and to Events.

pub mod fetch;
pub mod format;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};

use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource as _, ResourceExt as _};
use kubevmm_crds::contract::ConditionStatus;
use kubevmm_crds::events::{EventSink, Note};
use kubevmm_crds::image::{
    aggregate_phase, node_condition, ImageFormat, ImagePhase, NodeImageStatus, VirtualMachineImage,
};
use kubevmm_crds::VirtualMachine;
use serde_json::json;

use self::fetch::{FetchError, Progress};
use self::format::FormatError;
use self::store::{Entry, Store};
use super::metrics::Metrics;

/// A cached image a VM may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// The verified, read-only file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
}

/// Why an import failed: the condition reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Condition and Event reason.
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// What a VM learns about an image it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// In the cache.
    Ready(CachedImage),
    /// Being imported (the VM is woken when it ends).
    Importing(String),
    /// The last import failed (retried with backoff).
    Failed(Failure),
}

enum JobState {
    Running,
    Failed(Failure, Instant),
}

struct Job {
    state: JobState,
    failures: u32,
    progress: Arc<Progress>,
    /// Image objects (namespace, name) that use this source.
    images: BTreeSet<(String, String)>,
    /// VMs (and their uids) to wake when the import ends.
    waiters: Vec<(ObjectRef<VirtualMachine>, String)>,
}

/// The node's importer.
pub struct Importer {
    store: Store,
    vms_dir: PathBuf,
    /// `<state>/disks`: overlays keep their bases.
    disks_dir: PathBuf,
    client: Result<fetch::HttpClient, String>,
    allowed_dirs: Vec<PathBuf>,
    node: String,
    kube: Client,
    events: EventSink,
    metrics: Arc<Metrics>,
    grace: Duration,
    jobs: Mutex<HashMap<String, Job>>,
    /// Uids of VMs whose awaited import ended since they last looked.
    woken: Mutex<BTreeSet<String>>,
    trigger: UnboundedSender<ObjectRef<VirtualMachine>>,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Settings of the importer.
#[derive(Debug, Clone)]
pub struct ImporterConfig {
    /// The agent's state directory (the cache is `<state>/images`).
    pub state_dir: PathBuf,
    /// Where `path:` sources may be.
    pub allowed_dirs: Vec<PathBuf>,
    /// This node.
    pub node: String,
    /// How long an unused cached image is kept.
    pub grace: Duration,
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs((5u64 << failures.min(6)).min(300))
}

fn mib(b: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let m = b as f64 / f64::from(1 << 20);
    format!("{m:.1} MiB")
}

/// "3.0 MiB of 6.0 MiB (50%)", or "3.0 MiB of unknown" before the size is known.
fn progress_text(done: u64, total: u64) -> String {
    if total == 0 {
        return format!("{} of unknown", mib(done));
    }
    let pct = done.min(total).saturating_mul(100) / total;
    format!("{} of {} ({pct}%)", mib(done), mib(total))
}

impl Importer {
    /// The importer of this node; creates the cache directory.
    pub fn new(
        cfg: &ImporterConfig,
        kube: Client,
        events: EventSink,
        metrics: Arc<Metrics>,
        trigger: UnboundedSender<ObjectRef<VirtualMachine>>,
    ) -> std::io::Result<Self> {
        let store = Store::open(&cfg.state_dir)?;
        metrics.image_cache(store.size());
        Ok(Self {
            store,
            vms_dir: cfg.state_dir.join("vms"),
            disks_dir: super::disks::root(&cfg.state_dir),
            client: fetch::client(),
            allowed_dirs: cfg.allowed_dirs.clone(),
            node: cfg.node.clone(),
            kube,
            events,
            metrics,
            grace: cfg.grace,
            jobs: Mutex::new(HashMap::new()),
            woken: Mutex::new(BTreeSet::new()),
            trigger,
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The image `name` in `vm`'s namespace, for `vm`: cached, importing
    /// (started here when nobody imports it yet), or failed.
    pub async fn resolve(self: &Arc<Self>, vm: &VirtualMachine, name: &str) -> Resolved {
        let ns = vm.namespace().unwrap_or_default();
        let api: Api<VirtualMachineImage> = Api::namespaced(self.kube.clone(), &ns);
        let img = match api.get_opt(name).await {
            Ok(Some(img)) => img,
            Ok(None) => {
                return Resolved::Failed(Failure {
                    reason: "ImageNotFound".into(),
                    message: format!("VirtualMachineImage {ns}/{name} does not exist"),
                })
            }
            Err(e) => {
                return Resolved::Importing(format!(
                    "cannot read VirtualMachineImage {ns}/{name}: {e}"
                ))
            }
        };
        let key = store::key(&img.spec.source);
        if let Some(entry) = self.store.lookup(&key) {
            self.store.touch(&key);
            if !self.status_shows_ready(&img, &entry) {
                self.write_ready(&ns, name, &entry).await;
            }
            return Resolved::Ready(CachedImage {
                path: self.store.file(&entry.sha256),
                format: entry.format,
            });
        }
        let start = {
            let mut jobs = self.jobs();
            let job = jobs.entry(key.clone()).or_insert_with(|| Job {
                state: JobState::Failed(
                    Failure {
                        reason: String::new(),
                        message: String::new(),
                    },
                    Instant::now(),
                ),
                failures: 0,
                progress: Arc::default(),
                images: BTreeSet::new(),
                waiters: Vec::new(),
            });
            job.images.insert((ns.clone(), name.to_string()));
            let me = (ObjectRef::from_obj(vm), vm.uid().unwrap_or_default());
            if !job.waiters.contains(&me) {
                job.waiters.push(me);
            }
            match &job.state {
                JobState::Running => {
                    let (d, t) = (
                        job.progress.done.load(Ordering::Relaxed),
                        job.progress.total.load(Ordering::Relaxed),
                    );
                    return Resolved::Importing(format!(
                        "VirtualMachineImage {ns}/{name} is being imported on node {}: {}",
                        self.node,
                        progress_text(d, t)
                    ));
                }
                JobState::Failed(f, retry_at) if Instant::now() < *retry_at => {
                    return Resolved::Failed(f.clone());
                }
                JobState::Failed(..) => {
                    job.state = JobState::Running;
                    job.progress = Arc::default();
                    job.progress.clone()
                }
            }
        };
        let this = self.clone();
        let source = img.spec.source.clone();
        tokio::spawn(async move { this.run(key, source, start).await });
        Resolved::Importing(format!(
            "VirtualMachineImage {ns}/{name}: import started on node {}",
            self.node
        ))
    }

    fn status_shows_ready(&self, img: &VirtualMachineImage, e: &Entry) -> bool {
        img.status.as_ref().is_some_and(|s| {
            s.nodes.iter().any(|n| {
                n.node == self.node
                    && n.phase == Some(ImagePhase::Ready)
                    && n.digest.as_deref() == Some(&format!("sha256:{}", e.sha256))
            })
        })
    }

    /// Writes progress to status about every second while an import runs.
    fn ticker(
        self: Arc<Self>,
        key: String,
        progress: Arc<Progress>,
        what: String,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = (u64::MAX, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = (
                    progress.done.load(Ordering::Relaxed),
                    progress.total.load(Ordering::Relaxed),
                );
                if now != last {
                    last = now;
                    let msg = format!("importing {what}: {}", progress_text(now.0, now.1));
                    self.publish(&key, ImagePhase::Importing, "Importing", &msg, None)
                        .await;
                }
            }
        })
    }

    /// One import, from start to the status it leaves.
    async fn run(
        self: Arc<Self>,
        key: String,
        source: kubevmm_crds::image::ImageSource,
        progress: Arc<Progress>,
    ) {
        let started = Instant::now();
        let kind = if source.http.is_some() {
            "http"
        } else {
            "path"
        };
        let what = source.http.as_ref().map_or_else(
            || source.path.clone().unwrap_or_default(),
            |h| h.url.clone(),
        );
        self.publish(
            &key,
            ImagePhase::Importing,
            "Importing",
            &format!("importing {what}"),
            None,
        )
        .await;
        let ticker = self
            .clone()
            .ticker(key.clone(), progress.clone(), what.clone());
        let this = self.clone();
        let (k, p) = (key.clone(), progress.clone());
        let handle = tokio::runtime::Handle::current();
        let result =
            tokio::task::spawn_blocking(move || handle.block_on(this.import(&k, &source, &p)))
                .await
                .unwrap_or_else(|e| {
                    Err(Failure {
                        reason: "ImportFailed".into(),
                        message: format!("import task failed: {e}"),
                    })
                });
        ticker.abort();
        self.metrics
            .image_bytes(kind, progress.fetched.load(Ordering::Relaxed));
        let waiters = match &result {
            Ok(entry) => {
                self.metrics
                    .image_imported(kind, started.elapsed().as_secs_f64());
                self.metrics.image_cache(self.store.size());
                let msg = format!(
                    "imported {what} on node {}: {} {}, virtual size {} bytes, sha256 {}",
                    self.node,
                    mib(entry.size),
                    format_name(entry.format),
                    entry.virtual_size,
                    entry.sha256
                );
                self.publish(&key, ImagePhase::Ready, "Imported", &msg, Some(entry))
                    .await;
                self.jobs()
                    .remove(&key)
                    .map(|j| j.waiters)
                    .unwrap_or_default()
            }
            Err(f) => {
                self.metrics.image_failed(&f.reason);
                let _ = std::fs::remove_file(self.store.partial(&key));
                self.publish(&key, ImagePhase::Failed, &f.reason, &f.message, None)
                    .await;
                let mut jobs = self.jobs();
                jobs.get_mut(&key)
                    .map(|j| {
                        j.failures += 1;
                        j.state =
                            JobState::Failed(f.clone(), Instant::now() + backoff(j.failures - 1));
                        std::mem::take(&mut j.waiters)
                    })
                    .unwrap_or_default()
            }
        };
        for (obj, uid) in waiters {
            self.woken
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(uid);
            let _ = self.trigger.unbounded_send(obj);
        }
    }

    /// Fetches, verifies, detects and commits (on a blocking thread).
    async fn import(
        &self,
        key: &str,
        source: &kubevmm_crds::image::ImageSource,
        progress: &Progress,
    ) -> Result<Entry, Failure> {
        import_into(
            &self.store,
            &self.client,
            &self.allowed_dirs,
            key,
            source,
            progress,
        )
        .await
    }

    async fn write_ready(&self, ns: &str, name: &str, e: &Entry) {
        let msg = format!("cached on node {}: sha256 {}", self.node, e.sha256);
        let entry = self.node_entry(ImagePhase::Ready, "Imported", &msg, e.size, e.size, Some(e));
        self.apply(ns, name, Some(&entry), Some(e)).await;
    }

    fn node_entry(
        &self,
        phase: ImagePhase,
        reason: &str,
        message: &str,
        done: u64,
        total: u64,
        entry: Option<&Entry>,
    ) -> NodeImageStatus {
        NodeImageStatus {
            node: self.node.clone(),
            phase: Some(phase),
            bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
            bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
            reason: Some(reason.into()),
            message: Some(message.into()),
            digest: entry.map(|e| format!("sha256:{}", e.sha256)),
        }
    }

    /// Writes this node's state to every image object of `key`, with an
    /// Event on a phase change.
    async fn publish(
        &self,
        key: &str,
        phase: ImagePhase,
        reason: &str,
        message: &str,
        entry: Option<&Entry>,
    ) {
        let (images, done, total) = {
            let jobs = self.jobs();
            let Some(j) = jobs.get(key) else { return };
            (
                j.images.clone(),
                j.progress.done.load(Ordering::Relaxed),
                j.progress.total.load(Ordering::Relaxed),
            )
        };
        let total = entry.map_or(total, |e| e.size);
        let done = entry.map_or(done, |e| e.size);
        let node = self.node_entry(phase, reason, message, done, total, entry);
        for (ns, name) in images {
            let changed = self.apply(&ns, &name, Some(&node), entry).await;
            if changed {
                self.event(&ns, &name, phase == ImagePhase::Failed, reason, message)
                    .await;
            }
        }
    }

    /// Server-side apply of this node's entry and condition (`None`: both
    /// removed, the image collected), and of the image-wide phase computed
    /// from every node's entry (optimistically locked on the
    /// resourceVersion, so the last writer saw all entries). Returns
    /// whether this node's phase changed.
    async fn apply(
        &self,
        ns: &str,
        name: &str,
        mine: Option<&NodeImageStatus>,
        entry: Option<&Entry>,
    ) -> bool {
        if let (Some(m), Some(e)) = (mine, entry) {
            if m.phase == Some(ImagePhase::Ready) {
                if let Err(err) = self.store.record_published(&e.sha256, ns, name) {
                    tracing::warn!(image = %format!("{ns}/{name}"), "cannot record it: {err}");
                }
            }
        }
        let api: Api<VirtualMachineImage> = Api::namespaced(self.kube.clone(), ns);
        let manager = format!("node-vmm-{}", self.node);
        for _ in 0..5 {
            let Ok(Some(live)) = api.get_opt(name).await else {
                return false;
            };
            let status = live.status.clone().unwrap_or_default();
            let before = status
                .nodes
                .iter()
                .find(|n| n.node == self.node)
                .and_then(|n| n.phase);
            let mut nodes: Vec<NodeImageStatus> = status
                .nodes
                .into_iter()
                .filter(|n| n.node != self.node)
                .collect();
            nodes.extend(mine.cloned());
            let ready = mine.is_some_and(|m| m.phase == Some(ImagePhase::Ready));
            let mut st = json!({ "phase": aggregate_phase(&nodes) });
            if let Some(mine) = mine {
                let since = status
                    .conditions
                    .iter()
                    .find(|c| {
                        c.type_ == node_condition(&self.node)
                            && (ConditionStatus::of(c) == ConditionStatus::True) == ready
                    })
                    .map_or_else(
                        || Time(Timestamp::now()),
                        |c| c.last_transition_time.clone(),
                    );
                let cond = Condition {
                    type_: node_condition(&self.node),
                    status: ConditionStatus::from_bool(ready).as_str().into(),
                    reason: mine.reason.clone().unwrap_or_default(),
                    message: mine.message.clone().unwrap_or_default(),
                    last_transition_time: since,
                    observed_generation: live.metadata.generation,
                };
                st["nodes"] = json!([mine]);
                st["conditions"] = json!([cond]);
            }
            if let Some(e) = entry {
                st["format"] = json!(e.format);
                st["virtualSize"] = json!(Quantity(e.virtual_size.to_string()));
            }
            let body = json!({
                "apiVersion": kubevmm_crds::API_VERSION,
                "kind": "VirtualMachineImage",
                "metadata": {"name": name, "resourceVersion": live.resource_version()},
                "status": st,
            });
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(&manager).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => return before != mine.and_then(|m| m.phase),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(image = %format!("{ns}/{name}"), "status not written: {e}");
                    return false;
                }
            }
        }
        false
    }

    async fn event(&self, ns: &str, name: &str, warning: bool, reason: &str, note: &str) {
        let api: Api<VirtualMachineImage> = Api::namespaced(self.kube.clone(), ns);
        let Ok(Some(img)) = api.get_opt(name).await else {
            return;
        };
        let note = Note::new(warning, reason, note).with_action("Import");
        self.events.send(img.object_ref(&()), note);
    }

    /// Whether an import VM `uid` waited for ended since it last asked.
    pub fn take_woken(&self, uid: &str) -> bool {
        self.woken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid)
    }

    /// Removes cached images unused for the grace period, forever.
    pub async fn collect_garbage(self: Arc<Self>) {
        let every = (self.grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::time::sleep(every).await;
            let busy: BTreeSet<String> = self
                .jobs()
                .iter()
                .filter(|(_, j)| matches!(j.state, JobState::Running))
                .map(|(k, _)| k.clone())
                .collect();
            let in_use = images_in_use(&[&self.vms_dir, &self.disks_dir]);
            let removed = self
                .store
                .collect(self.grace, &|k| busy.contains(k), &in_use);
            if !removed.is_empty() {
                tracing::info!(
                    ?removed,
                    "unused cached images removed after {:?}",
                    self.grace
                );
                self.metrics.image_cache(self.store.size());
            }
            // Their status entries go too: the node holds them no longer.
            for sha in &removed {
                for (ns, name) in self.store.take_published(sha) {
                    self.apply(&ns, &name, None, None).await;
                }
            }
        }
    }
}

/// Imports `source` into `store` under `key`: fetch (resuming a partial
/// file), verify the digest, detect and check the format, commit. Run it on
/// a blocking thread (the file writes and hashing are synchronous).
pub async fn import_into(
    store: &Store,
    client: &Result<fetch::HttpClient, String>,
    allowed_dirs: &[PathBuf],
    key: &str,
    source: &kubevmm_crds::image::ImageSource,
    progress: &Progress,
) -> Result<Entry, Failure> {
    let partial = store.partial(key);
    let fail = |e: &FetchError| Failure {
        reason: e.reason().into(),
        message: e.to_string(),
    };
    let (fetched, what, expected) = if let Some(h) = &source.http {
        let client = client.as_ref().map_err(|e| Failure {
            reason: "HostUnreachable".into(),
            message: e.clone(),
        })?;
        let f = fetch::http(client, &h.url, &partial, progress)
            .await
            .map_err(|e| fail(&e))?;
        (
            f,
            h.url.clone(),
            h.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
        )
    } else {
        let p = source.path.clone().unwrap_or_default();
        let f = fetch::path(allowed_dirs, &p, &partial, progress).map_err(|e| fail(&e))?;
        (f, p, None)
    };
    if let Some(want) = expected {
        if want != fetched.sha256 {
            return Err(Failure {
                reason: "ChecksumMismatch".into(),
                message: format!(
                    "{what}: sha256 is {} but spec.source.http.sha256 is {want}; the download was discarded",
                    fetched.sha256
                ),
            });
        }
    }
    let mut head = Vec::with_capacity(format::PROBE_LEN);
    std::fs::File::open(&partial)
        .and_then(|f| f.take(format::PROBE_LEN as u64).read_to_end(&mut head))
        .map_err(|e| Failure {
            reason: "ImportFailed".into(),
            message: format!("read {}: {e}", partial.display()),
        })?;
    let bad = |e: FormatError| Failure {
        reason: e.reason().into(),
        message: format!("{what}: {e}"),
    };
    let info = format::detect(&head, fetched.size).map_err(bad)?;
    if let Some(b) = &info.backing_file {
        return Err(bad(FormatError::Unsupported(format!(
            "the qcow2 has a backing file ({b}) that is not part of the import; flatten it first (qemu-img convert -O qcow2)"
        ))));
    }
    let entry = Entry {
        sha256: fetched.sha256,
        format: info.format,
        virtual_size: info.virtual_size,
        size: fetched.size,
        source: what,
    };
    store.commit(key, &partial, &entry).map_err(|e| Failure {
        reason: "ImportFailed".into(),
        message: format!("move into the image cache: {e}"),
    })?;
    Ok(entry)
}

/// The file a VM's directory lists the cached images it uses in.
pub const IMAGES_FILE: &str = "images";

/// Records in a VM's directory the cached images it uses (one file name a
/// line): they stay in the cache as long as the VM is on the node, whether
/// its VMM runs or not (a kernel is read at start, not held).
pub fn record_use(
    vm_dir: &std::path::Path,
    images: &BTreeMap<String, CachedImage>,
) -> std::io::Result<()> {
    let names: Vec<String> = images
        .values()
        .filter_map(|c| c.path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    super::supervisor::write_atomic(&vm_dir.join(IMAGES_FILE), names.join("\n").as_bytes())
        .map_err(std::io::Error::other)
}

/// Every cached file a VM on this node records (`<vms>/<uid>/images`,
/// `<disks>/<uid>/images`).
fn images_in_use(dirs: &[&std::path::Path]) -> std::collections::HashSet<String> {
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join(IMAGES_FILE)).ok())
        .flat_map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `raw` or `qcow2`.
pub fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    }
}

/// What the boot sources of a VM resolve to.
#[derive(Debug)]
pub enum BootImages {
    /// Every image is cached: name → file.
    Ready(BTreeMap<String, CachedImage>),
    /// Some image is importing.
    Waiting(String),
    /// Some image failed: (the field, the failure).
    Failed(String, Failure),
}

/// Resolves the `{image: NAME}` kernel and initrd of `vm`, and its `image`
/// disks' bases.
pub async fn boot_images(importer: &Arc<Importer>, vm: &VirtualMachine) -> BootImages {
    let boot = &vm.spec.boot;
    let mut wanted: Vec<(String, &str)> = [
        ("spec.boot.kernel.image", Some(&boot.kernel)),
        ("spec.boot.initrd.image", boot.initrd.as_ref()),
    ]
    .into_iter()
    .filter_map(|(field, src)| Some((field.to_string(), src?.image.as_deref()?)))
    .collect();
    // `image` disks: their overlays are backed by the cached image.
    for (i, d) in vm.spec.disks.iter().enumerate() {
        if let Some(img) = &d.image {
            wanted.push((format!("spec.disks[{i}].image.name"), img.name.as_str()));
        }
    }
    let mut out = BTreeMap::new();
    let mut waiting = Vec::new();
    for (field, name) in wanted {
        match importer.resolve(vm, name).await {
            Resolved::Ready(c) => {
                out.insert(name.to_string(), c);
            }
            Resolved::Importing(m) => waiting.push(m),
            Resolved::Failed(f) => return BootImages::Failed(field, f),
        }
    }
    if waiting.is_empty() {
        BootImages::Ready(out)
    } else {
        BootImages::Waiting(waiting.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_reads_in_mib_and_percent() {
        assert_eq!(
            super::progress_text(3 << 20, 6 << 20),
            "3.0 MiB of 6.0 MiB (50%)"
        );
        assert_eq!(super::progress_text(1 << 20, 0), "1.0 MiB of unknown");
        assert_eq!(
            super::progress_text(7 << 20, 6 << 20),
            "7.0 MiB of 6.0 MiB (100%)"
        );
    }
}
