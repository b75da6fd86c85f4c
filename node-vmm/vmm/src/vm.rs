//! The machine: KVM VM, guest RAM, interrupt controllers, devices, vCPUs.
//! `Vm::build` sets everything up; `Vm::run` starts the vCPUs and runs the
//! event loop until the guest powers off, crashes or is stopped.

use crate::boot_trace::{self as trace, Step};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, cpuid, irq, layout, regs};
use crate::boot::{self, BootSpec};
use crate::coalesced::{Ring, Zone};
use crate::config::{SerialMode, VmConfig};
use crate::console::Console;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;
use crate::devices::legacy::{PostPort, PvPanic};
use crate::devices::serial::{SerialDevice, SerialFile, SerialQueue, SerialSink};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{Bus, BusDevice};
use crate::exit::ExitSignal;
use crate::vcpu::{self, PauseGate, VcpuContext, VcpuHandle};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it? try `node-vmm doctor`)")]
    NoKvm(kvm_ioctls::Error),
    #[error("/dev/kvm lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest RAM of {requested} bytes is more than this host has ({available} bytes)")]
    RamTooBig { requested: u64, available: u64 },
    #[error("cannot allocate {0} bytes of guest RAM: {1}")]
    Memory(u64, String),
    #[error("cpus = {requested} exceeds what KVM supports here ({max})")]
    TooManyCpus { requested: u8, max: usize },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] crate::arch::mptable::MptableError),
    #[error(transparent)]
    Smbios(#[from] crate::arch::smbios::SmbiosError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Irq(#[from] irq::IrqError),
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialError),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("cannot create {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] crate::devices::BusOverlap),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// What a virtio device is, for stats and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Disk,
    Net,
    Rng,
}

/// A virtio device and the eventfds its queues notify.
#[derive(Debug)]
pub struct VirtioSlot {
    pub id: String,
    pub kind: DeviceKind,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_events: Vec<EventFd>,
}

/// A built machine, ready to run.
pub struct Vm {
    pub config: VmConfig,
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub exit: ExitSignal,
    pub gate: Arc<PauseGate>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// COM1 transmit writes KVM queues for us, when it can.
    pub serial_queue: Option<Arc<SerialQueue>>,
    /// The clients of the console socket (`socket` mode).
    pub console: Console,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub virtio: Vec<VirtioSlot>,
    pub post_writes: Arc<std::sync::atomic::AtomicU64>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pending_vcpus: Vec<kvm_ioctls::VcpuFd>,
    pub vcpus: Vec<VcpuHandle>,
    // Keeps /dev/kvm open for the VM's lifetime.
    _kvm: Kvm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn open_kvm(handed: Option<i32>) -> Result<Kvm, VmError> {
    let kvm = match handed {
        // SAFETY: the parent opened /dev/kvm and handed this fd over for it;
        // `validate` checked it and it is taken only here.
        Some(fd) => unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        None => Kvm::new().map_err(VmError::NoKvm)?,
    };
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(size, e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory(size, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the Vm
        // keeps for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("map guest RAM"))?;
        // Guest RAM never goes into a core dump of the VMM.
        // SAFETY: advice on a mapping `mem` owns; it changes no contents.
        unsafe {
            libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTDUMP);
        }
    }
    Ok(mem)
}

/// COM1, ACPI PM, i8042, pvpanic and the POST port on the port I/O bus.
struct LegacyDevices {
    pio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    console: Console,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    post_writes: Arc<std::sync::atomic::AtomicU64>,
}

/// The serial output or log file: handed over as `fd`, or opened at `path`.
fn serial_file(
    fd: Option<i32>,
    path: Option<&std::path::Path>,
    config: &crate::config::SerialConfig,
) -> Result<Option<SerialFile>, VmError> {
    let (format, limit) = (config.file_format, config.max_file_bytes);
    Ok(match (fd, path) {
        (Some(fd), _) => {
            // SAFETY: the parent handed this fd over for this file;
            // `validate` checked it and it is taken only here.
            let file = unsafe { crate::config::take_handed(fd) };
            let name = path.map_or_else(|| format!("fd {fd}").into(), std::path::Path::to_owned);
            Some(SerialFile::from_file(file, &name, format, limit)?)
        }
        (None, Some(path)) => Some(SerialFile::open(path, format, limit)?),
        (None, None) => None,
    })
}

impl LegacyDevices {
    fn create(vm_fd: &Arc<VmFd>, exit: &ExitSignal, config: &VmConfig) -> Result<Self, VmError> {
        let mut pio = Bus::default();
        let console = Console::new().map_err(io_err("the console eventfd"))?;
        let serial_config = &config.serial;
        let sink = match serial_config.mode {
            SerialMode::File => serial_file(
                config.fds.serial,
                serial_config.path.as_deref(),
                serial_config,
            )?
            .map_or(SerialSink::Null, SerialSink::File),
            SerialMode::Socket => SerialSink::Socket(console.clone()),
            SerialMode::Null => SerialSink::Null,
            SerialMode::Stdout => SerialSink::Stdout,
        };
        let log = serial_file(
            config.fds.serial_log,
            serial_config.log.as_deref(),
            serial_config,
        )?;
        let (serial, serial_irq) = SerialDevice::new(sink, log)?;
        vm_fd
            .register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(kvm_err("wire the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(u64::from(layout::COM1_PORT), 8, serial.clone())?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(vm_fd.clone(), exit.clone())));
        pio.insert(
            u64::from(layout::PM1_EVT_PORT),
            AcpiPm::LEN,
            acpi_pm.clone(),
        )?;
        pio.insert(
            u64::from(layout::I8042_PORT),
            I8042::LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        pio.insert(
            u64::from(layout::PVPANIC_PORT),
            1,
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
        )?;
        let post = PostPort::default();
        let post_writes = post.writes.clone();
        pio.insert(u64::from(layout::POST_PORT), 1, Arc::new(Mutex::new(post)))?;
        Ok(Self {
            pio,
            serial,
            console,
            acpi_pm,
            post_writes,
        })
    }
}

/// Lets KVM queue the guest's writes to COM1's transmit register rather
/// than exit for each byte (see `coalesced`). Without `KVM_CAP_COALESCED_PIO`,
/// or if it cannot be set up, every write exits as before.
fn queue_serial_writes(
    kvm: &Kvm,
    vm_fd: &Arc<VmFd>,
    vcpus: &[kvm_ioctls::VcpuFd],
    serial: &Arc<Mutex<SerialDevice>>,
) -> Option<Arc<SerialQueue>> {
    if !kvm.check_extension(Cap::CoalescedPio) {
        return None;
    }
    let vcpu = vcpus.first()?;
    let start = || -> Result<SerialQueue, String> {
        let ring = Ring::map(vcpu).map_err(|e| e.to_string())?;
        let zone = Zone::register(vm_fd.clone(), layout::COM1_PORT).map_err(|e| e.to_string())?;
        SerialQueue::start(ring, zone, serial.clone(), layout::COM1_PORT)
            .map_err(|e| format!("the console drain timer: {e}"))
    };
    match start() {
        Ok(q) => Some(Arc::new(q)),
        Err(e) => {
            eprintln!("kubevmm-vmm: console writes exit one by one: {e}");
            None
        }
    }
}

/// Disks, NICs and the RNG as virtio-mmio devices with irqfds and ioeventfds.
fn create_virtio_devices(
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mmio: &mut Bus,
) -> Result<(Vec<VirtioSlot>, Vec<acpi::MmioDeviceInfo>), VmError> {
    let mut devices: Vec<(String, DeviceKind, Box<dyn VirtioDevice>)> = Vec::new();
    for d in &config.disks {
        let blk = Block::open(d)?;
        devices.push((d.id.clone(), DeviceKind::Disk, Box::new(blk)));
    }
    for n in &config.nets {
        let net = crate::devices::virtio::net::Net::open(n)?;
        devices.push((n.id.clone(), DeviceKind::Net, Box::new(net)));
    }
    if config.rng {
        devices.push(("rng".into(), DeviceKind::Rng, Box::new(Rng::new())));
    }
    let mut virtio = Vec::new();
    let mut infos = Vec::new();
    for (index, (id, kind, device)) in devices.into_iter().enumerate() {
        let addr = layout::virtio_mmio_addr(index);
        let irq = layout::virtio_irq(index);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("a virtio irqfd"))?;
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(kvm_err("wire a virtio interrupt"))?;
        let transport = MmioTransport::new(device, mem.clone(), Interrupt::new(irqfd));
        let mut queue_events = Vec::new();
        for q in 0..transport.queue_count() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("a virtio queue eventfd"))?;
            vm_fd
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("register a virtio queue notifier"))?;
            queue_events.push(evt);
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(
            addr,
            layout::VIRTIO_MMIO_SIZE,
            transport.clone() as Arc<Mutex<dyn BusDevice>>,
        )?;
        infos.push(acpi::MmioDeviceInfo { addr, irq });
        virtio.push(VirtioSlot {
            id,
            kind,
            transport,
            queue_events,
        });
    }
    Ok((virtio, infos))
}

/// Creates the vCPUs with CPUID, MSRs, FPU and LAPIC set; the BSP gets the
/// boot entry state.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    cpus: u8,
    entry: regs::EntryMode,
) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let mut vcpus = Vec::new();
    for i in 0..cpus {
        let vcpu = vm_fd
            .create_vcpu(u64::from(i))
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(&mut cpuid, i, cpus);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        regs::setup_msrs(&vcpu)?;
        regs::setup_fpu(&vcpu)?;
        regs::setup_lapic(&vcpu)?;
        if i == 0 {
            regs::setup_sregs(mem, &vcpu, entry)?;
            regs::setup_regs(&vcpu, entry)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

impl Vm {
    /// Lets every virtio device write back what it caches before the
    /// process exits (a vCPU still running only waits on the lock).
    pub fn shutdown_devices(&self) {
        for slot in &self.virtio {
            slot.transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .device_mut()
                .shutdown();
        }
    }

    /// Sets up the whole machine. Nothing runs until `run`.
    pub fn build(config: VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        if let Some(available) = host_memory() {
            if config.memory > available {
                return Err(VmError::RamTooBig {
                    requested: config.memory,
                    available,
                });
            }
        }
        let kvm = open_kvm(config.fds.kvm)?;
        trace::mark(Step::Kvm);
        let max = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max {
            return Err(VmError::TooManyCpus {
                requested: config.cpus,
                max,
            });
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        trace::mark(Step::VmCreated);
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        irq::set_routing(&vm_fd)?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("create the in-kernel PIT"))?;
        trace::mark(Step::Irqchip);
        let mem = create_memory(&vm_fd, config.memory)?;
        trace::mark(Step::Memory);
        let exit = ExitSignal::new().map_err(io_err("the exit eventfd"))?;

        let legacy = LegacyDevices::create(&vm_fd, &exit, &config)?;
        let mut mmio = Bus::default();
        let (virtio, infos) = create_virtio_devices(&vm_fd, &mem, &config, &mut mmio)?;
        trace::mark(Step::Devices);
        let rsdp_addr = acpi::write_tables(&mem, config.cpus, &infos)?;
        crate::arch::mptable::write(&mem, config.cpus)?;
        crate::arch::smbios::write(&mem, &config.uuid.map_or([0; 16], |u| *u.as_bytes()))?;
        let entry = boot::load(
            &mem,
            &BootSpec {
                kernel: &config.kernel,
                kernel_fd: config.fds.kernel,
                initrd: config.initrd.as_deref(),
                initrd_fd: config.fds.initrd,
                cmdline: &config.cmdline,
                mem_size: config.memory,
                rsdp_addr,
            },
        )?;

        trace::mark(Step::Kernel);
        let pending_vcpus = create_vcpus(&kvm, &vm_fd, &mem, config.cpus, entry)?;
        let serial_queue = queue_serial_writes(&kvm, &vm_fd, &pending_vcpus, &legacy.serial);
        trace::mark(Step::Vcpus);

        Ok(Self {
            config,
            vm_fd,
            mem,
            exit,
            gate: Arc::new(PauseGate::default()),
            serial: legacy.serial,
            serial_queue,
            console: legacy.console,
            acpi_pm: legacy.acpi_pm,
            virtio,
            post_writes: legacy.post_writes,
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(mmio),
            pending_vcpus,
            vcpus: Vec::new(),
            _kvm: kvm,
        })
    }

    /// Starts one thread per vCPU.
    pub fn start_vcpus(&mut self, filters: Option<crate::seccomp::Filters>) -> Result<(), VmError> {
        vcpu::install_kick_handler()?;
        let ctx = VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            mem: self.mem.clone(),
            exit: self.exit.clone(),
            gate: self.gate.clone(),
            filters,
            serial_queue: self.serial_queue.clone(),
        };
        for (i, fd) in std::mem::take(&mut self.pending_vcpus)
            .into_iter()
            .enumerate()
        {
            self.vcpus
                .push(VcpuHandle::spawn(i as u8, fd, ctx.clone())?);
        }
        Ok(())
    }

    pub fn pause(&self) {
        vcpu::pause_all(&self.gate, &self.vcpus);
    }

    pub fn resume(&self) {
        vcpu::resume_all(&self.gate);
    }

    /// Presses the ACPI power button.
    pub fn request_shutdown(&self) {
        self.acpi_pm
            .lock()
            .expect("acpi lock poisoned")
            .press_power_button();
    }
}

/// The path of a unix socket the VMM creates, removing a stale one first.
pub fn bind_unix(path: &PathBuf) -> std::io::Result<std::os::unix::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
