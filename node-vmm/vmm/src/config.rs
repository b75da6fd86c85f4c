//! The VMM configuration (`VmConfig`), read from JSON by the binary and built
//! directly by the node agent and `node-vmm run`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::layout;

/// Smallest guest RAM we accept: room for boot structures and a kernel.
pub const MIN_MEMORY: u64 = 8 << 20;
/// vCPU limit (the MADT and our APIC id scheme use 8-bit ids).
pub const MAX_CPUS: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not a valid VM config: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u8),
    #[error("memory must be at least {min} MiB, got {0} bytes", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("memory must be a multiple of 4 KiB, got {0} bytes")]
    MemoryAlignment(u64),
    #[error("kernel {0} does not exist or is not a file")]
    Kernel(PathBuf),
    #[error("initrd {0} does not exist or is not a file")]
    Initrd(PathBuf),
    #[error("disk {id}: file {path} does not exist")]
    DiskMissing { id: String, path: PathBuf },
    #[error("duplicate device id {0:?}: disk and network ids must be unique")]
    DuplicateId(String),
    #[error("at most {max} virtio devices are supported, {0} configured", max = layout::VIRTIO_MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("network {0}: give exactly one of tap or fd")]
    NetBackend(String),
    #[error("network {id}: bad MAC address {mac:?} (want six hex octets like 52:54:00:12:34:56)")]
    Mac { id: String, mac: String },
    #[error("kernel command line is {0} bytes, the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("serial output {0:?}: a file or socket path is required")]
    SerialPath(SerialMode),
    #[error("serial max_file_bytes {0}: a console ring holds {min} to {max} bytes", min = crate::ring::MIN_CAPACITY, max = crate::ring::MAX_CAPACITY)]
    SerialRingSize(u64),
    #[error("a jailed VMM opens no paths: {0} must be handed over as an fd")]
    JailNeedsFd(String),
    #[error("jail: uid and gid must not be 0 (got uid {uid}, gid {gid})")]
    JailRoot { uid: u32, gid: u32 },
    #[error("jail: root {0} must be an absolute directory")]
    JailDir(PathBuf),
    #[error("fd {fd} for {what} is not an inherited descriptor above stderr")]
    BadFd { what: String, fd: i32 },
}

/// What to do when the guest reboots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// Exit the VMM with the reboot exit code; the supervisor decides.
    #[default]
    Exit,
    /// Reset the machine and boot the kernel again in the same process.
    Restart,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// Guest output to the VMM's stdout, the VMM's stdin to the guest.
    #[default]
    Stdout,
    /// Guest output to a file (see `SerialFileFormat`).
    File,
    /// A unix socket; every connected client sees output from when it
    /// attached and may type (`console` module).
    Socket,
    /// Serial port present but output discarded.
    Null,
}

/// What the serial output and log files hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialFileFormat {
    /// Plain text, appended; when it would pass `max_file_bytes` its older
    /// half is dropped. For people: `cat`, `tail -f`.
    #[default]
    Text,
    /// A `ring` of `max_file_bytes` data bytes after a 64-byte header,
    /// written in place: readers follow it by stream offset while it is
    /// written, and a new VMM on the same file continues its stream. What
    /// the node agent uses (read it with `node-vmm console-log`).
    Ring,
}

/// Default cap of a serial output or log file.
pub const DEFAULT_SERIAL_FILE_LIMIT: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub mode: SerialMode,
    /// File or socket path for `file` and `socket` (with a handed fd,
    /// only named in messages).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Also write all guest output to this file (any mode).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// A serial output or log file never grows past this many bytes (a
    /// ring's data area is this size; a text file drops its older half when
    /// a write would pass it). A guest cannot fill the host's disk through
    /// its console.
    #[serde(default = "default_serial_limit")]
    pub max_file_bytes: u64,
    /// The format of the output and log files.
    #[serde(default)]
    pub file_format: SerialFileFormat,
}

fn default_serial_limit() -> u64 {
    DEFAULT_SERIAL_FILE_LIMIT
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            mode: SerialMode::default(),
            path: None,
            log: None,
            max_file_bytes: DEFAULT_SERIAL_FILE_LIMIT,
            file_format: SerialFileFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Name of the disk; also the default serial.
    pub id: String,
    /// Image file (or block device): raw or qcow2, told apart by its bytes.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial reported to the guest (`VIRTIO_BLK_T_GET_ID`, 20 bytes max).
    #[serde(default)]
    pub serial: Option<String>,
    /// An already-open file descriptor for `path` (inherited from the parent).
    #[serde(default)]
    pub fd: Option<i32>,
    /// The backing chain of a qcow2 image as inherited descriptors, in chain
    /// order: the image's backing file first, the base last. The VMM never
    /// opens the names recorded in qcow2 headers; a qcow2 naming a backing
    /// file with no fd here for it is refused, and so are fds left over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_fds: Vec<i32>,
    /// The format, when the caller knows it (a disk it created): then the
    /// bytes are not probed. A guest that writes a qcow2 header into a raw
    /// disk must not turn it into a qcow2 at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::image::ImageFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub id: String,
    /// Name of a tap device to open.
    #[serde(default)]
    pub tap: Option<String>,
    /// An already-open tap file descriptor (inherited from the parent).
    #[serde(default)]
    pub fd: Option<i32>,
    /// Guest MAC address, `52:54:00:xx:xx:xx`.
    pub mac: String,
}

/// Descriptors the parent opened and handed over (inherited, numbered by the
/// parent). Each replaces opening the matching path; a jailed VMM needs all
/// of those it uses, since it can open nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedFds {
    /// `/dev/kvm`.
    #[serde(default)]
    pub kvm: Option<i32>,
    /// The kernel image (read only).
    #[serde(default)]
    pub kernel: Option<i32>,
    /// The initrd (read only).
    #[serde(default)]
    pub initrd: Option<i32>,
    /// The serial output file (`file` mode). A text file is opened for
    /// appending, a ring for reading and writing.
    #[serde(default)]
    pub serial: Option<i32>,
    /// The control API's listening unix socket.
    #[serde(default)]
    pub api: Option<i32>,
    /// The serial log file (`serial.log`; opened as the output file is).
    #[serde(default)]
    pub serial_log: Option<i32>,
    /// The console's listening unix socket (`socket` mode).
    #[serde(default)]
    pub console: Option<i32>,
}

/// Where and as whom the VMM confines itself before it touches guest input
/// (see `jail`): own mount and IPC namespaces, chroot into `root`, `uid`/`gid`
/// with no capabilities and `no_new_privs`. The caller provides the PID
/// namespace (the process is started in a new one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// Unprivileged user id.
    pub uid: u32,
    /// Unprivileged group id.
    pub gid: u32,
    /// Empty directory that becomes `/`.
    pub root: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Control API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    #[serde(default)]
    pub on_reboot: OnReboot,
    /// Apply seccomp filters once the machine is set up (default on).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Descriptors opened by the parent.
    #[serde(default)]
    pub fds: HandedFds,
    /// Confine the process before building the machine.
    #[serde(default)]
    pub jail: Option<JailConfig>,
    /// The machine's SMBIOS system UUID, as the guest reads it in
    /// `/sys/class/dmi/id/product_uuid` (the agent passes the VM's UID).
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
}

fn default_true() -> bool {
    true
}

impl VmConfig {
    /// A config with one vCPU, the given RAM and kernel, and defaults elsewhere.
    pub fn new(kernel: impl Into<PathBuf>, memory: u64) -> Self {
        Self {
            cpus: 1,
            memory,
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            serial: SerialConfig::default(),
            api_socket: None,
            on_reboot: OnReboot::Exit,
            seccomp: true,
            fds: HandedFds::default(),
            jail: None,
            uuid: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks everything that can be checked without opening KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if self.memory % 4096 != 0 {
            return Err(ConfigError::MemoryAlignment(self.memory));
        }
        self.validate_fds()?;
        if self.fds.kernel.is_none() && !self.kernel.is_file() {
            return Err(ConfigError::Kernel(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if self.fds.initrd.is_none() && !initrd.is_file() {
                return Err(ConfigError::Initrd(initrd.clone()));
            }
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.disks {
            if !ids.insert(d.id.as_str()) {
                return Err(ConfigError::DuplicateId(d.id.clone()));
            }
            if d.fd.is_none() && !d.path.exists() {
                return Err(ConfigError::DiskMissing {
                    id: d.id.clone(),
                    path: d.path.clone(),
                });
            }
        }
        for n in &self.nets {
            if !ids.insert(n.id.as_str()) {
                return Err(ConfigError::DuplicateId(n.id.clone()));
            }
            if n.tap.is_some() == n.fd.is_some() {
                return Err(ConfigError::NetBackend(n.id.clone()));
            }
            parse_mac(&n.mac).ok_or_else(|| ConfigError::Mac {
                id: n.id.clone(),
                mac: n.mac.clone(),
            })?;
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.rng);
        if devices > layout::VIRTIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        let serial_fd = match self.serial.mode {
            SerialMode::File => self.fds.serial.is_some(),
            SerialMode::Socket => self.fds.console.is_some(),
            SerialMode::Stdout | SerialMode::Null => true,
        };
        if self.serial.path.is_none() && !serial_fd {
            return Err(ConfigError::SerialPath(self.serial.mode));
        }
        let ring_size = crate::ring::MIN_CAPACITY..=crate::ring::MAX_CAPACITY;
        if self.serial.file_format == SerialFileFormat::Ring
            && !ring_size.contains(&self.serial.max_file_bytes)
        {
            return Err(ConfigError::SerialRingSize(self.serial.max_file_bytes));
        }
        Ok(())
    }

    /// Every handed fd is above stderr; a jailed VMM has an fd for
    /// everything it would otherwise open by path.
    fn validate_fds(&self) -> Result<(), ConfigError> {
        let handed = [
            ("kvm", self.fds.kvm),
            ("kernel", self.fds.kernel),
            ("initrd", self.fds.initrd),
            ("serial", self.fds.serial),
            ("api", self.fds.api),
            ("serial log", self.fds.serial_log),
            ("console socket", self.fds.console),
        ]
        .into_iter()
        .map(|(w, fd)| (w.to_string(), fd))
        .chain(self.disks.iter().map(|d| (format!("disk {}", d.id), d.fd)))
        .chain(self.disks.iter().flat_map(|d| {
            d.backing_fds
                .iter()
                .enumerate()
                .map(|(i, &fd)| (format!("disk {} backing file {}", d.id, i + 1), Some(fd)))
        }))
        .chain(
            self.nets
                .iter()
                .map(|n| (format!("network {}", n.id), n.fd)),
        );
        for (what, fd) in handed {
            if let Some(fd) = fd.filter(|fd| *fd <= 2) {
                return Err(ConfigError::BadFd { what, fd });
            }
        }
        let Some(jail) = &self.jail else {
            return Ok(());
        };
        if jail.uid == 0 || jail.gid == 0 {
            return Err(ConfigError::JailRoot {
                uid: jail.uid,
                gid: jail.gid,
            });
        }
        if !jail.root.is_absolute() {
            return Err(ConfigError::JailDir(jail.root.clone()));
        }
        let need = |what: &str, fd: Option<i32>| {
            fd.map(|_| ())
                .ok_or_else(|| ConfigError::JailNeedsFd(what.to_string()))
        };
        need("/dev/kvm", self.fds.kvm)?;
        need("the kernel", self.fds.kernel)?;
        if self.initrd.is_some() {
            need("the initrd", self.fds.initrd)?;
        }
        if self.serial.mode == SerialMode::File {
            need("the serial output file", self.fds.serial)?;
        }
        if self.serial.mode == SerialMode::Socket {
            need("the console socket", self.fds.console)?;
        }
        if self.serial.log.is_some() {
            need("the serial log", self.fds.serial_log)?;
        }
        if self.api_socket.is_some() {
            need("the API socket", self.fds.api)?;
        }
        for d in &self.disks {
            need(&format!("disk {}", d.id), d.fd)?;
        }
        for n in &self.nets {
            need(&format!("network {}", n.id), n.fd)?;
        }
        Ok(())
    }
}

/// Takes ownership of an fd the parent handed over.
///
/// # Safety
/// `fd` must be an open descriptor this process inherited for this one use,
/// taken exactly once (`VmConfig::validate` checks it is above stderr).
pub unsafe fn take_handed(fd: i32) -> std::fs::File {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the caller guarantees `fd` is open, ours, and taken once.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:0a:0B:ff"),
            Some([0x52, 0x54, 0, 0xa, 0xb, 0xff])
        );
        assert_eq!(parse_mac("52:54:00:0a:0b"), None);
        assert_eq!(parse_mac("52:54:00:0a:0b:ff:00"), None);
        assert_eq!(parse_mac("5g:54:00:0a:0b:ff"), None);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<VmConfig>(
            r#"{"cpus":1,"memory":67108864,"kernel":"/k","bogus":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn disk_json_without_backing_fds_still_parses() {
        let d: DiskConfig = serde_json::from_str(
            r#"{"id":"root","path":"/d","read_only":false,"serial":null,"fd":3}"#,
        )
        .unwrap();
        assert!(d.backing_fds.is_empty());
        assert!(!serde_json::to_string(&d).unwrap().contains("backing_fds"));
        let d: DiskConfig =
            serde_json::from_str(r#"{"id":"root","path":"/d","fd":3,"backing_fds":[4,5]}"#)
                .unwrap();
        assert_eq!(d.backing_fds, [4, 5]);
    }

    #[test]
    fn validation_names_the_bad_item() {
        let mut c = VmConfig::new(kernel(), 64 << 20);
        c.validate().unwrap();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
        c.cpus = 1;
        c.memory = 1 << 20;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(_))));
        c.memory = 64 << 20;
        c.disks.push(DiskConfig {
            id: "data".into(),
            path: "/nonexistent/disk.img".into(),
            read_only: false,
            serial: None,
            fd: None,
            backing_fds: Vec::new(),
            format: None,
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("data") && err.contains("/nonexistent/disk.img"),
            "{err}"
        );
        c.disks.clear();
        c.kernel = "/nonexistent/vmlinux".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn a_jailed_vmm_needs_every_file_as_an_fd() {
        let mut c = VmConfig::new("/nonexistent/kernel", 64 << 20);
        c.jail = Some(JailConfig {
            uid: 3_000_000,
            gid: 3_000_000,
            root: "/run/x/root".into(),
        });
        let err = |c: &VmConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(&c).contains("/dev/kvm must be handed over as an fd"),
            "{}",
            err(&c)
        );
        c.fds.kvm = Some(3);
        assert!(
            err(&c).contains("the kernel must be handed over"),
            "{}",
            err(&c)
        );
        c.fds.kernel = Some(4);
        c.disks.push(DiskConfig {
            id: "root".into(),
            path: "/d".into(),
            read_only: false,
            serial: None,
            fd: None,
            backing_fds: Vec::new(),
            format: None,
        });
        assert!(
            err(&c).contains("disk root must be handed over"),
            "{}",
            err(&c)
        );
        c.disks[0].fd = Some(2);
        assert!(
            err(&c).contains("fd 2 for disk root is not an inherited descriptor"),
            "{}",
            err(&c)
        );
        c.disks[0].fd = Some(5);
        c.validate().unwrap();
        c.disks[0].backing_fds = vec![6, 1];
        assert!(
            err(&c).contains("fd 1 for disk root backing file 2 is not an inherited descriptor"),
            "{}",
            err(&c)
        );
        c.disks[0].backing_fds = vec![6, 7];
        c.validate().unwrap();
        c.jail.as_mut().unwrap().uid = 0;
        assert!(err(&c).contains("uid and gid must not be 0"), "{}", err(&c));
    }

    #[test]
    fn a_jailed_console_socket_is_handed_over_and_a_ring_has_a_bounded_size() {
        let mut c = VmConfig::new("/nonexistent/kernel", 64 << 20);
        c.fds.kvm = Some(3);
        c.fds.kernel = Some(4);
        c.serial = SerialConfig {
            mode: SerialMode::Socket,
            path: Some("/run/x/console.sock".into()),
            ..SerialConfig::default()
        };
        c.jail = Some(JailConfig {
            uid: 3_000_000,
            gid: 3_000_000,
            root: "/run/x/root".into(),
        });
        let err = |c: &VmConfig| c.validate().unwrap_err().to_string();
        assert!(
            err(&c).contains("the console socket must be handed over"),
            "{}",
            err(&c)
        );
        c.fds.console = Some(5);
        c.validate().unwrap();
        // Without a path, the fd is enough; without either, nothing works.
        c.serial.path = None;
        c.validate().unwrap();
        c.jail = None;
        c.fds.console = None;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SerialPath(SerialMode::Socket))
        ));
        c.fds.console = Some(5);
        c.serial.file_format = SerialFileFormat::Ring;
        for bad in [0, 63, crate::ring::MAX_CAPACITY + 1] {
            c.serial.max_file_bytes = bad;
            assert!(matches!(c.validate(), Err(ConfigError::SerialRingSize(b)) if b == bad));
        }
        c.serial.max_file_bytes = 64;
        c.validate().unwrap();
        let json = serde_json::to_string(&c.serial).unwrap();
        assert!(json.contains(r#""file_format":"ring""#), "{json}");
        let old: SerialConfig = serde_json::from_str(r#"{"mode":"file","path":"/x"}"#).unwrap();
        assert_eq!(old.file_format, SerialFileFormat::Text, "text unless asked");
    }
}
