//! `kubectl vm create`: the virt-install of kubevmm. Flags in, a
//! `VirtualMachine` out, checked against every rule of the CRD before it is
//! printed or sent. Pure: file contents (keys, user-data) are read by the
//! caller.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kubevmm_crds::validation::validate_vm_spec;
use kubevmm_crds::vm::{
    Boot, BootSource, BridgeBinding, CloudInit, Disk, EmptyDisk, HostDisk, ImageDisk, Masquerade,
    Network,
};
use kubevmm_crds::{RunStrategy, VirtualMachine, VirtualMachineSpec};
use serde_yaml::Value as Yaml;

/// What `create` was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The VM's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// `--image`: a `VirtualMachineImage` cloned as the root disk (`vda`).
    pub image: Option<String>,
    /// `--kernel`: an image name or an absolute node path.
    pub kernel: String,
    /// `--initrd`: an image name or an absolute node path.
    pub initrd: Option<String>,
    /// `--cmdline`; `None`: `console=ttyS0`, plus `root=/dev/vda1` with `--image`.
    pub cmdline: Option<String>,
    /// `--cpus`.
    pub cpus: u32,
    /// `--memory`.
    pub memory: String,
    /// `--disk` specs, in order.
    pub disks: Vec<String>,
    /// `--network` specs; empty: one `default` masquerade interface.
    pub networks: Vec<String>,
    /// `--ssh-key` public keys.
    pub ssh_keys: Vec<String>,
    /// `--user-data` contents.
    pub user_data: Option<String>,
    /// `--run-strategy`.
    pub run_strategy: RunStrategy,
}

/// What is wrong with a `create` request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CreateError {
    /// A `--disk` spec that cannot be read.
    #[error("--disk {spec:?}: {why} (forms: name=N,size=1Gi | name=N,image=IMAGE | name=N,path=/node/file; add ,readonly to share read-only)")]
    Disk {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A `--network` spec that cannot be read.
    #[error("--network {spec:?}: {why} (forms: masquerade | bridge=br0 | none; add ,name=N or ,mac=52:54:00:..)")]
    Network {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// `--user-data` that keys cannot be added to.
    #[error("--ssh-key needs --user-data to be a #cloud-config YAML mapping to add ssh_authorized_keys to: {0}")]
    UserData(String),
    /// The VM breaks a rule of the CRD.
    #[error("the VirtualMachine would be rejected: {0}")]
    Invalid(String),
}

/// A boot source: a path when absolute, else a `VirtualMachineImage` name.
fn source(s: &str) -> BootSource {
    if s.starts_with('/') {
        BootSource {
            image: None,
            path: Some(s.into()),
        }
    } else {
        BootSource {
            image: Some(s.into()),
            path: None,
        }
    }
}

/// `key=value,flag,...` into pairs (a bare word has an empty value).
fn fields(spec: &str) -> Vec<(&str, &str)> {
    spec.split(',')
        .filter(|f| !f.trim().is_empty())
        .map(|f| f.split_once('=').unwrap_or((f, "")))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// One `--disk` spec; `index` names it `diskN` when it has no name.
pub fn disk(spec: &str, index: usize) -> Result<Disk, CreateError> {
    let err = |why: &str| CreateError::Disk {
        spec: spec.into(),
        why: why.into(),
    };
    let mut d = Disk {
        name: format!("disk{index}"),
        image: None,
        empty_disk: None,
        cloud_init: None,
        host_disk: None,
        read_only: false,
    };
    for (k, v) in fields(spec) {
        match (k, v) {
            ("name", n) if !n.is_empty() => d.name = n.into(),
            ("size", q) if !q.is_empty() => {
                d.empty_disk = Some(EmptyDisk {
                    size: Quantity(q.into()),
                });
            }
            ("image", i) if !i.is_empty() => d.image = Some(ImageDisk { name: i.into() }),
            ("path", p) if !p.is_empty() => d.host_disk = Some(HostDisk { path: p.into() }),
            ("readonly" | "ro", "" | "true") => d.read_only = true,
            _ => return Err(err(&format!("unknown or empty field {k:?}"))),
        }
    }
    let sources = [
        d.empty_disk.is_some(),
        d.image.is_some(),
        d.host_disk.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(err("give exactly one of size=, image= or path="));
    }
    Ok(d)
}

/// One `--network` spec; `None` for `none`.
pub fn network(spec: &str, index: usize) -> Result<Option<Network>, CreateError> {
    let err = |why: &str| CreateError::Network {
        spec: spec.into(),
        why: why.into(),
    };
    let mut n = Network {
        name: if index == 0 {
            "default".into()
        } else {
            format!("net{index}")
        },
        masquerade: None,
        bridge: None,
        mac_address: None,
    };
    for (k, v) in fields(spec) {
        match (k, v) {
            ("none", "") => return Ok(None),
            ("masquerade", "") => n.masquerade = Some(Masquerade {}),
            ("bridge", b) if !b.is_empty() => n.bridge = Some(BridgeBinding { name: b.into() }),
            ("name", v) if !v.is_empty() => n.name = v.into(),
            ("mac", v) if !v.is_empty() => n.mac_address = Some(v.into()),
            _ => return Err(err(&format!("unknown or empty field {k:?}"))),
        }
    }
    if n.masquerade.is_some() == n.bridge.is_some() {
        return Err(err("give exactly one of masquerade or bridge="));
    }
    Ok(Some(n))
}

/// The cloud-init user-data: `--user-data` as given, with the `--ssh-key`s
/// added to its `ssh_authorized_keys` (a `#cloud-config` made when there is
/// no user-data).
pub fn user_data(user_data: Option<&str>, keys: &[String]) -> Result<Option<String>, CreateError> {
    if keys.is_empty() {
        return Ok(user_data.map(str::to_string));
    }
    let mut doc = match user_data {
        None => Yaml::Mapping(serde_yaml::Mapping::new()),
        Some(u) if u.starts_with("#cloud-config") => serde_yaml::from_str(u)
            .map_err(|e| CreateError::UserData(format!("it is not valid YAML: {e}")))?,
        Some(_) => return Err(CreateError::UserData("it is not #cloud-config".into())),
    };
    let Yaml::Mapping(map) = &mut doc else {
        return Err(CreateError::UserData(
            "its top level is not a mapping".into(),
        ));
    };
    let entry = map
        .entry(Yaml::String("ssh_authorized_keys".into()))
        .or_insert_with(|| Yaml::Sequence(Vec::new()));
    let Yaml::Sequence(list) = entry else {
        return Err(CreateError::UserData(
            "its ssh_authorized_keys is not a list".into(),
        ));
    };
    list.extend(keys.iter().map(|k| Yaml::String(k.trim().into())));
    let body = serde_yaml::to_string(&doc)
        .map_err(|e| CreateError::UserData(format!("it cannot be written back: {e}")))?;
    Ok(Some(format!("#cloud-config\n{body}")))
}

/// The `VirtualMachine` for `req`, valid by the CRD's rules.
pub fn manifest(req: &Request) -> Result<VirtualMachine, CreateError> {
    let mut disks = Vec::new();
    if let Some(image) = &req.image {
        disks.push(Disk {
            name: "root".into(),
            image: Some(ImageDisk {
                name: image.clone(),
            }),
            empty_disk: None,
            cloud_init: None,
            host_disk: None,
            read_only: false,
        });
    }
    for (i, spec) in req.disks.iter().enumerate() {
        disks.push(disk(spec, i + 1)?);
    }
    if let Some(user_data) = user_data(req.user_data.as_deref(), &req.ssh_keys)? {
        disks.push(Disk {
            name: "cloudinit".into(),
            image: None,
            empty_disk: None,
            cloud_init: Some(CloudInit {
                user_data: Some(user_data),
                meta_data: None,
                network_data: None,
            }),
            host_disk: None,
            read_only: false,
        });
    }
    let networks = if req.networks.is_empty() {
        vec![network("masquerade", 0)?.expect("masquerade is a network")]
    } else {
        let mut nets = Vec::new();
        for (i, spec) in req.networks.iter().enumerate() {
            nets.extend(network(spec, i)?);
        }
        nets
    };
    let cmdline = req.cmdline.clone().unwrap_or_else(|| {
        if req.image.is_some() {
            "console=ttyS0 root=/dev/vda1".into()
        } else {
            "console=ttyS0".into()
        }
    });
    let spec = VirtualMachineSpec {
        run_strategy: req.run_strategy,
        cpus: req.cpus,
        memory: Quantity(req.memory.clone()),
        paused: false,
        boot: Boot {
            kernel: source(&req.kernel),
            initrd: req.initrd.as_deref().map(source),
            cmdline: Some(cmdline),
        },
        disks,
        networks,
        node_selector: BTreeMap::new(),
        termination_grace_period_seconds: 30,
    };
    validate_vm_spec(&spec).map_err(|e| CreateError::Invalid(e.to_string()))?;
    let mut vm = VirtualMachine::new(&req.name, spec);
    vm.metadata.namespace = Some(req.namespace.clone());
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        Request {
            name: "web".into(),
            namespace: "dev".into(),
            kernel: "debian-6.1".into(),
            cpus: 2,
            memory: "512Mi".into(),
            ..Request::default()
        }
    }

    #[test]
    fn a_disk_spec_has_one_source() {
        let d = disk("name=data,size=1Gi", 1).unwrap();
        assert_eq!(
            (d.name.as_str(), d.empty_disk.unwrap().size.0),
            ("data", "1Gi".into())
        );
        let d = disk("image=debian-12,readonly", 2).unwrap();
        assert_eq!((d.name.as_str(), d.read_only), ("disk2", true));
        let d = disk("path=/srv/d.img,ro", 3).unwrap();
        assert_eq!(d.host_disk.unwrap().path, "/srv/d.img");
        for bad in ["name=x", "size=1Gi,image=i", "size=", "colour=red,size=1Gi"] {
            let e = disk(bad, 1).unwrap_err();
            assert!(e.to_string().starts_with(&format!("--disk {bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_network_spec_has_one_binding() {
        let n = network("masquerade", 0).unwrap().unwrap();
        assert_eq!(n.name, "default");
        let n = network("bridge=br0,name=lan,mac=52:54:00:00:00:01", 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                n.name.as_str(),
                n.bridge.unwrap().name.as_str(),
                n.mac_address.as_deref()
            ),
            ("lan", "br0", Some("52:54:00:00:00:01"))
        );
        assert_eq!(network("none", 0).unwrap(), None);
        assert!(network("masquerade,bridge=br0", 0).is_err());
        assert!(network("tap", 0).is_err());
    }

    #[test]
    fn ssh_keys_join_the_user_data() {
        let key = "ssh-ed25519 AAAAC3Nza alice@laptop".to_string();
        let made = user_data(None, std::slice::from_ref(&key))
            .unwrap()
            .unwrap();
        assert!(made.starts_with("#cloud-config\n"), "{made}");
        let back: Yaml = serde_yaml::from_str(&made).unwrap();
        assert_eq!(back["ssh_authorized_keys"][0].as_str(), Some(key.as_str()));

        let given = "#cloud-config\nhostname: web\nssh_authorized_keys: [ssh-rsa AAAA bob]\n";
        let merged = user_data(Some(given), std::slice::from_ref(&key))
            .unwrap()
            .unwrap();
        let back: Yaml = serde_yaml::from_str(&merged).unwrap();
        assert_eq!(back["hostname"].as_str(), Some("web"));
        assert_eq!(back["ssh_authorized_keys"].as_sequence().unwrap().len(), 2);

        assert!(user_data(Some("#!/bin/sh\necho hi\n"), std::slice::from_ref(&key)).is_err());
        assert_eq!(
            user_data(Some("#!/bin/sh\n"), &[]).unwrap().as_deref(),
            Some("#!/bin/sh\n")
        );
    }

    #[test]
    fn the_manifest_is_what_virt_install_users_expect() {
        let mut r = req();
        r.image = Some("debian-12".into());
        r.initrd = Some("/var/lib/kubevmm/images/initrd".into());
        r.disks = vec!["name=scratch,size=1Gi".into()];
        r.ssh_keys = vec!["ssh-ed25519 AAAA alice".into()];
        let vm = manifest(&r).unwrap();
        assert_eq!(vm.metadata.namespace.as_deref(), Some("dev"));
        let s = &vm.spec;
        assert_eq!(s.boot.kernel.image.as_deref(), Some("debian-6.1"));
        assert_eq!(
            s.boot.initrd.as_ref().unwrap().path.as_deref(),
            Some("/var/lib/kubevmm/images/initrd")
        );
        assert_eq!(
            s.boot.cmdline.as_deref(),
            Some("console=ttyS0 root=/dev/vda1")
        );
        let names: Vec<&str> = s.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["root", "scratch", "cloudinit"]);
        assert_eq!(s.networks.len(), 1);
        assert!(s.networks[0].masquerade.is_some());

        let mut plain = req();
        plain.networks = vec!["none".into()];
        let vm = manifest(&plain).unwrap();
        assert!(vm.spec.networks.is_empty() && vm.spec.disks.is_empty());
        assert_eq!(vm.spec.boot.cmdline.as_deref(), Some("console=ttyS0"));
    }

    #[test]
    fn the_crd_rules_are_checked_before_anything_is_sent() {
        let mut r = req();
        r.memory = "12Mi".into();
        let e = manifest(&r).unwrap_err();
        assert!(
            e.to_string().contains("spec.memory must be at least 64Mi"),
            "{e}"
        );
        let mut r = req();
        r.disks = vec!["name=Bad_Name,size=1Gi".into()];
        assert!(matches!(manifest(&r), Err(CreateError::Invalid(_))));
    }
}
