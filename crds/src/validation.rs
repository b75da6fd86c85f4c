//! Client-side validation of a `VirtualMachineSpec` with the rules the API
//! server enforces through the CRD schema and CEL (see [`crate::vm`]).
//!
//! Standalone mode (`node-vmm run`) has no API server, so it checks a
//! manifest here. Messages are word for word those of the CEL rules; the
//! end-to-end validation tests apply every bad manifest to the real API
//! server *and* to this function and require both to refuse it with the same
//! message, so the two cannot drift apart.

use std::collections::HashSet;
use std::fmt;

use crate::quantity::{parse_bytes, QuantityError};
use crate::vm::{BootSource, VirtualMachineSpec};

/// Smallest guest RAM, in bytes (64Mi).
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest RAM, in bytes (16Ti).
pub const MAX_MEMORY: u64 = 16 << 40;
/// Longest kernel command line, in bytes.
pub const MAX_CMDLINE: usize = 2048;
/// Most vCPUs.
pub const MAX_CPUS: u32 = 256;

/// One violated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, e.g. `spec.disks[1]`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule a manifest broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VirtualMachine: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationError(pub Vec<FieldError>);

fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

fn absolute_clean_path(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "..")
}

fn unicast_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

fn ifname(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// What cloud-init makes of a user-data string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDataKind {
    /// First line `#cloud-config`.
    CloudConfig,
    /// A `#!` script.
    Script,
    /// MIME multipart.
    Multipart,
}

/// The kind of `user_data`, or `None` when the API server refuses it;
/// exactly the CEL rule on `cloudInit.userData` (prefix tests).
pub fn user_data_kind(user_data: &str) -> Option<UserDataKind> {
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| user_data.starts_with(p));
    if starts(&["#!"]) {
        Some(UserDataKind::Script)
    } else if user_data == "#cloud-config" || starts(&["#cloud-config\n", "#cloud-config\r\n"]) {
        Some(UserDataKind::CloudConfig)
    } else if starts(&[
        "Content-Type: multipart/",
        "MIME-Version: 1.0\nContent-Type: multipart/",
        "MIME-Version: 1.0\r\nContent-Type: multipart/",
    ]) {
        Some(UserDataKind::Multipart)
    } else {
        None
    }
}

struct Collector(Vec<FieldError>);

impl Collector {
    fn check(&mut self, ok: bool, field: impl Into<String>, message: &str) {
        if !ok {
            self.0.push(FieldError {
                field: field.into(),
                message: message.to_string(),
            });
        }
    }

    fn boot_source(&mut self, src: &BootSource, field: &str) {
        self.check(
            src.image.is_some() != src.path.is_some(),
            field,
            "exactly one of image or path must be set",
        );
        if let Some(image) = &src.image {
            self.check(
                dns_subdomain(image),
                format!("{field}.image"),
                "image must be a VirtualMachineImage name (lowercase RFC 1123 subdomain)",
            );
        }
        if let Some(path) = &src.path {
            self.check(
                absolute_clean_path(path),
                format!("{field}.path"),
                "path must be absolute and must not contain '..'",
            );
        }
    }

    fn disks(&mut self, spec: &VirtualMachineSpec) {
        let mut seen = HashSet::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let f = format!("spec.disks[{i}]");
            self.check(dns_label(&d.name), format!("{f}.name"), "disk name must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit");
            self.check(
                seen.insert(d.name.as_str()),
                "spec.disks",
                "disk names must be unique",
            );
            let sources = [
                d.image.is_some(),
                d.empty_disk.is_some(),
                d.cloud_init.is_some(),
                d.host_disk.is_some(),
            ];
            self.check(
                sources.iter().filter(|s| **s).count() == 1,
                f.as_str(),
                "each disk needs exactly one source: image, emptyDisk, cloudInit or hostDisk",
            );
            if let Some(img) = &d.image {
                self.check(
                    dns_subdomain(&img.name),
                    format!("{f}.image.name"),
                    "image name must be a VirtualMachineImage name (lowercase RFC 1123 subdomain)",
                );
            }
            if let Some(e) = &d.empty_disk {
                let field = format!("{f}.emptyDisk.size");
                if let Some(size) = self.quantity(
                    &e.size.0,
                    &field,
                    "emptyDisk.size must be a Kubernetes quantity such as 1Gi",
                ) {
                    self.check(size > 0, field, "emptyDisk.size must be greater than zero");
                }
            }
            if let Some(ci) = &d.cloud_init {
                self.check(
                    ci.user_data.is_some() || ci.meta_data.is_some() || ci.network_data.is_some(),
                    format!("{f}.cloudInit"),
                    "cloudInit needs at least one of userData, metaData or networkData",
                );
                if let Some(user_data) = &ci.user_data {
                    self.check(
                        user_data_kind(user_data).is_some(),
                        format!("{f}.cloudInit.userData"),
                        crate::vm::USER_DATA_MESSAGE,
                    );
                }
            }
            if let Some(h) = &d.host_disk {
                self.check(
                    absolute_clean_path(&h.path),
                    format!("{f}.hostDisk.path"),
                    "hostDisk.path must be absolute and must not contain '..'",
                );
            }
        }
    }

    fn networks(&mut self, spec: &VirtualMachineSpec) {
        let mut seen = HashSet::new();
        for (i, n) in spec.networks.iter().enumerate() {
            let f = format!("spec.networks[{i}]");
            self.check(dns_label(&n.name), format!("{f}.name"), "network name must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit");
            self.check(
                seen.insert(n.name.as_str()),
                "spec.networks",
                "network names must be unique",
            );
            self.check(
                n.masquerade.is_some() != n.bridge.is_some(),
                f.as_str(),
                "each network needs exactly one binding: masquerade or bridge",
            );
            if let Some(b) = &n.bridge {
                self.check(ifname(&b.name), format!("{f}.bridge.name"), "bridge.name must be a Linux interface name: 1 to 15 of letters, digits, '_', '.', '-'");
            }
            if let Some(mac) = &n.mac_address {
                self.check(unicast_mac(mac), format!("{f}.macAddress"), "macAddress must be a unicast MAC such as 52:54:00:12:34:56 (six hex pairs separated by ':', lowest bit of the first octet clear)");
            }
        }
    }

    fn quantity(&mut self, q: &str, field: &str, syntax_msg: &str) -> Option<u64> {
        match parse_bytes(q) {
            Ok(v) => Some(v),
            Err(QuantityError::Overflow(_)) => Some(u64::MAX),
            Err(_) => {
                self.check(false, field, syntax_msg);
                None
            }
        }
    }
}

/// Checks a spec against every rule of the CRD; `Ok` when the API server
/// would accept it.
pub fn validate_vm_spec(spec: &VirtualMachineSpec) -> Result<(), ValidationError> {
    let mut c = Collector(Vec::new());
    c.check(
        (1..=MAX_CPUS).contains(&spec.cpus),
        "spec.cpus",
        "spec.cpus must be between 1 and 256",
    );
    if let Some(mem) = c.quantity(
        &spec.memory.0,
        "spec.memory",
        "spec.memory must be a Kubernetes quantity such as 512Mi or 2Gi",
    ) {
        c.check(
            mem >= MIN_MEMORY,
            "spec.memory",
            "spec.memory must be at least 64Mi",
        );
        c.check(
            mem <= MAX_MEMORY,
            "spec.memory",
            "spec.memory must be at most 16Ti",
        );
    }
    c.check(
        (0..=3600).contains(&spec.termination_grace_period_seconds),
        "spec.terminationGracePeriodSeconds",
        "spec.terminationGracePeriodSeconds must be between 0 and 3600",
    );
    c.boot_source(&spec.boot.kernel, "spec.boot.kernel");
    if let Some(initrd) = &spec.boot.initrd {
        c.boot_source(initrd, "spec.boot.initrd");
    }
    if let Some(cmdline) = &spec.boot.cmdline {
        c.check(
            cmdline.len() <= MAX_CMDLINE,
            "spec.boot.cmdline",
            "spec.boot.cmdline must be at most 2048 bytes",
        );
    }

    c.disks(spec);
    c.networks(spec);
    if c.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationError(c.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert!(dns_label("root-1"));
        assert!(!dns_label("Root"));
        assert!(!dns_label("-a"));
        assert!(dns_subdomain("debian-12.v1"));
        assert!(absolute_clean_path("/var/lib/x.img"));
        assert!(!absolute_clean_path("/var/../etc/shadow"));
        assert!(!absolute_clean_path("rel/x"));
        assert!(absolute_clean_path("/var/x..y"));
        assert!(unicast_mac("52:54:00:12:34:56"));
        assert!(!unicast_mac("01:00:5e:00:00:01"));
        assert!(!unicast_mac("52:54:00:12:34"));
        assert!(ifname("br0"));
        assert!(!ifname("a-very-long-bridge-name"));
    }

    #[test]
    fn user_data_kinds() {
        use UserDataKind::{CloudConfig, Multipart, Script};
        let cases: &[(&str, Option<UserDataKind>)] = &[
            ("#cloud-config\npackages: [nginx]\n", Some(CloudConfig)),
            ("#cloud-config", Some(CloudConfig)),
            ("#cloud-config\r\nusers: []\r\n", Some(CloudConfig)),
            ("#cloud-config \nusers: []\n", None),
            ("#cloud-config-archive\n- type: text/x-shellscript\n", None),
            ("#!/bin/sh\necho hi\n", Some(Script)),
            ("#!", Some(Script)),
            (
                "Content-Type: multipart/mixed; boundary=\"xx\"\nMIME-Version: 1.0\n\n--xx\n",
                Some(Multipart),
            ),
            (
                "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=x\n",
                Some(Multipart),
            ),
            (
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n",
                Some(Multipart),
            ),
            ("content-type: multipart/mixed\n", None),
            (
                "MIME-Version: 1.0\nContent-Type: text/plain\n\nhello\n",
                None,
            ),
            ("MIME-Version: 1.0\n\nContent-Type: multipart/mixed\n", None),
            ("Content-Type: multipart", None),
            ("packages: [nginx]\n", None),
            (" #cloud-config\n", None),
            ("", None),
            ("hello world", None),
        ];
        for (text, want) in cases {
            assert_eq!(user_data_kind(text), *want, "{text:?}");
        }
    }
}
