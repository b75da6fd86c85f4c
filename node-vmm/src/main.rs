//! `node-vmm`: kubevmm's node agent and standalone runner.
//!
//! Subcommands: `doctor` (what this host has for guests), and the runners
//! added alongside (`run FILE.yaml` for standalone mode).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use node_vmm::{agent, console_log, doctor, standalone};

/// kubevmm node agent: boots `VirtualMachine`s on this host with KVM.
#[derive(Debug, Parser)]
#[command(name = "node-vmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this machine has and lacks for running guests; exits 1
    /// when guests cannot run.
    Doctor,
    /// Run the node agent (what the `DaemonSet` runs): keep this node's
    /// `HypervisorNode` and Lease current and converge the VMs bound to it.
    Agent(Box<AgentArgs>),
    /// Import an image into this node's cache ahead of time (what the agent
    /// does when a VM needs it): fetch, verify, detect the format, commit.
    /// Prints the cache entry as JSON.
    ImageImport(ImportArgs),
    /// Internal: supervise one VMM process (started by the agent).
    #[command(hide = true)]
    Shim {
        /// The VM's state directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The `kubevmm-vmm` binary.
        #[arg(long)]
        vmm: std::path::PathBuf,
        /// cgroup directories to join (repeatable: one per hierarchy).
        #[arg(long)]
        cgroup: Vec<std::path::PathBuf>,
        /// How many descriptors (from 3 on) belong to the VMM.
        #[arg(long, default_value_t = 0)]
        fds: usize,
    },
    /// Print a VM's serial console from its console ring on this node
    /// (`<state-dir>/vms/<uid>/console.ring`, which keeps the newest 1 MiB).
    ConsoleLog {
        /// The console ring, or the VM's state directory.
        path: std::path::PathBuf,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing what the guest writes, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Boot one `VirtualMachine` manifest on this host (standalone mode):
    /// console on the terminal, exits 0 when the guest powers off.
    Run {
        /// The `VirtualMachine` manifest (YAML).
        manifest: std::path::PathBuf,
        /// Also append the guest console to this file.
        #[arg(long)]
        console_log: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// An http(s) URL, or an absolute path beneath an --allowed-dir.
    source: String,
    /// Expected SHA-256 of the bytes (http sources).
    #[arg(long)]
    sha256: Option<String>,
    /// The agent's state directory (the cache is `<dir>/images`).
    #[arg(long, default_value = "/var/lib/kubevmm-node")]
    state_dir: std::path::PathBuf,
    /// Directory path sources may use (repeatable).
    #[arg(long = "allowed-dir", default_values = ["/var/lib/kubevmm"])]
    allowed_dirs: Vec<std::path::PathBuf>,
}

fn run_import(args: ImportArgs) -> ExitCode {
    use kubevmm_crds::image::{HttpSource, ImageSource};
    let http = args.source.starts_with("http://") || args.source.starts_with("https://");
    let source = ImageSource {
        http: http.then(|| HttpSource {
            url: args.source.clone(),
            sha256: args.sha256.clone(),
        }),
        path: (!http).then(|| args.source.clone()),
    };
    let store = match agent::images::store::Store::open(&args.state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "node-vmm image-import: image cache in {}: {e}",
                args.state_dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        eprintln!("node-vmm image-import: cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    let started = std::time::Instant::now();
    let key = agent::images::store::key(&source);
    // As in the agent: the import runs on a blocking thread.
    let result = rt.block_on(async move {
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let client = agent::images::fetch::client();
            let progress = agent::images::fetch::Progress::default();
            handle.block_on(agent::images::import_into(
                &store,
                &client,
                &args.allowed_dirs,
                &key,
                &source,
                &progress,
            ))
        })
        .await
    });
    match result {
        Ok(Ok(entry)) => {
            let mut v = serde_json::to_value(&entry).unwrap_or_default();
            v["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(Err(f)) => {
            eprintln!("node-vmm image-import: {}: {}", f.reason, f.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("node-vmm image-import: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Kubernetes node name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Per-VM state (`<dir>/vms/<uid>`): configs, sockets, consoles, exit
    /// records, empty disks. Must lie outside every --allowed-dir.
    #[arg(long, default_value = "/var/lib/kubevmm-node")]
    state_dir: std::path::PathBuf,
    /// The `kubevmm-vmm` binary (default: next to this one).
    #[arg(long)]
    vmm_binary: Option<std::path::PathBuf>,
    /// Directory `hostDisk` and boot `path` sources may use (repeatable).
    #[arg(long = "allowed-dir", default_values = ["/var/lib/kubevmm"])]
    allowed_dirs: Vec<std::path::PathBuf>,
    /// Host bridge `bridge:` networks may use (repeatable; none by default).
    #[arg(long = "allowed-bridge")]
    allowed_bridges: Vec<String>,
    /// Largest `emptyDisk` this node creates (a quantity).
    #[arg(long, default_value = "1Ti")]
    max_empty_disk: String,
    /// First uid/gid of the range VMMs run as (one id per VM).
    #[arg(long, default_value_t = agent::jail_ids::DEFAULT_BASE)]
    vmm_uid_base: u32,
    /// Size of that range.
    #[arg(long, default_value_t = agent::jail_ids::DEFAULT_COUNT)]
    vmm_uid_count: u32,
    /// Memory a VM's cgroup allows beyond guest RAM (a quantity).
    #[arg(long, default_value = "64Mi")]
    vmm_memory_overhead: String,
    /// vCPUs held back for the host.
    #[arg(long, default_value_t = 1)]
    reserved_cpus: u32,
    /// Memory held back for the host (a quantity).
    #[arg(long, default_value = "1Gi")]
    reserved_memory: String,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9101")]
    metrics_addr: std::net::SocketAddr,
    /// Leave VMMs in the shim's cgroup instead of one cgroup (with limits) per VM.
    #[arg(long)]
    no_cgroups: bool,
    /// Leave the cgroup2 mount's options alone. By default the agent turns
    /// `favordynmods` on, so that moving a VMM into its cgroups does not wait
    /// for an RCU grace period (5-16 ms per VM start), at the price of
    /// slightly dearer forks host-wide.
    #[arg(long)]
    no_cgroup_favordynmods: bool,
    /// Validity of the heartbeat Lease in seconds (renewed every third of it).
    #[arg(long, default_value_t = agent::node::DEFAULT_LEASE_SECONDS)]
    lease_seconds: i32,
    /// Seconds a cached `VirtualMachineImage` that no VM on this node uses is
    /// kept before it is deleted (never while a VMM holds it).
    #[arg(long, default_value_t = 24 * 3600)]
    image_cache_grace_seconds: u64,
    /// The bridge `masquerade` networks use (made by the agent).
    #[arg(long, default_value = agent::masquerade::DEFAULT_BRIDGE)]
    masquerade_bridge: String,
    /// Private IPv4 subnet of that bridge; the gateway is its first address.
    #[arg(long, default_value = agent::masquerade::DEFAULT_SUBNET)]
    masquerade_subnet: String,
    /// Interface masquerade NAT goes out of (default: the default route's).
    #[arg(long)]
    uplink: Option<String>,
    /// DNS server for masquerade guests (repeatable; default: the node's
    /// non-loopback resolvers in /etc/resolv.conf).
    #[arg(long = "dns")]
    dns: Vec<std::net::Ipv4Addr>,
    /// DHCP lease time of masquerade guests, in seconds.
    #[arg(long, default_value_t = 3600)]
    dhcp_lease_seconds: u64,
    /// MTU handed to masquerade guests by DHCP (default: none sent).
    #[arg(long)]
    guest_mtu: Option<u16>,
    /// A start step (image import, disk and network preparation, VMM
    /// start) slower than this many milliseconds gets a `SlowStartStep`
    /// Event naming the step and its duration.
    #[arg(long, default_value_t = 2000)]
    slow_start_step_ms: u64,
    /// Serve the console, logs and port-forward streams of this node's VMs
    /// to the operator on this address (mutual TLS), e.g. `0.0.0.0:10260`.
    #[arg(long, value_name = "ADDR:PORT")]
    access_listen: Option<std::net::SocketAddr>,
    /// Address advertised in `HypervisorNode.status.accessEndpoint`
    /// [default: the listening address, or this host's first non-loopback IPv4].
    #[arg(long, requires = "access_listen")]
    access_address: Option<String>,
    /// Serving certificate of the access server (PEM), for the name
    /// node-vmm.kubevmm.internal.
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    access_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    access_key: Option<std::path::PathBuf>,
    /// CA of the operator's client certificate (PEM): only its holders get in.
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    access_client_ca: Option<std::path::PathBuf>,
}

/// The access server's settings, when `--access-listen` is given.
fn access_settings(args: &AgentArgs) -> Result<Option<agent::access::AccessSettings>, String> {
    let Some(listen) = args.access_listen else {
        return Ok(None);
    };
    let need = |v: &Option<std::path::PathBuf>, flag: &str| {
        v.clone()
            .ok_or_else(|| format!("--access-listen needs {flag} too"))
    };
    let tls = kubevmm_access::tls::Files {
        cert: need(&args.access_cert, "--access-cert")?,
        key: need(&args.access_key, "--access-key")?,
        ca: need(&args.access_client_ca, "--access-client-ca")?,
    };
    let advertise = agent::access::advertised(
        listen,
        args.access_address.as_deref(),
        &agent::access::host_ips(),
    )
    .map_err(|e| e.to_string())?;
    Ok(Some(agent::access::AccessSettings {
        listen,
        advertise,
        tls,
    }))
}

/// `--reserved-memory`, `--max-empty-disk` and `--vmm-memory-overhead` in bytes.
fn sizes(args: &AgentArgs) -> Result<(u64, u64, u64), String> {
    let quantity = |flag: &str, v: &str| {
        kubevmm_crds::quantity::parse_bytes(v).map_err(|e| format!("{flag}: {e}"))
    };
    match (
        quantity("--reserved-memory", &args.reserved_memory),
        quantity("--max-empty-disk", &args.max_empty_disk),
        quantity("--vmm-memory-overhead", &args.vmm_memory_overhead),
    ) {
        (Ok(a), Ok(b), Ok(c)) => Ok((a, b, c)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
    }
}

/// The per-VM cgroup layout; with cgroups, migrations made fast first
/// (unless `--no-cgroup-favordynmods`).
fn cgroup_layout(args: &AgentArgs, root: bool) -> agent::cgroups::Layout {
    if args.no_cgroups {
        return agent::cgroups::Layout::None;
    }
    if root && !args.no_cgroup_favordynmods {
        agent::favordynmods::ensure_and_log();
    }
    agent::cgroups::Layout::detect()
}

fn run_agent(args: AgentArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let fail = |msg: String| {
        eprintln!("node-vmm agent: {msg}");
        ExitCode::FAILURE
    };
    let access = match access_settings(&args) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => match std::fs::read_to_string("/proc/sys/kernel/hostname") {
            Ok(h) => h.trim().to_string(),
            Err(e) => return fail(format!("no --node-name and cannot read the host name: {e}")),
        },
    };
    let (reserved_memory, max_empty_disk, vmm_memory_overhead) = match sizes(&args) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if args.vmm_uid_base == 0 || args.vmm_uid_count == 0 {
        return fail("--vmm-uid-base and --vmm-uid-count must be positive".into());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cgroups = cgroup_layout(&args, root);
    let vmm_binary = args.vmm_binary.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("kubevmm-vmm")))
            .unwrap_or_else(|| "kubevmm-vmm".into())
    });
    if !vmm_binary.is_file() {
        return fail(format!(
            "VMM binary {} not found; pass --vmm-binary",
            vmm_binary.display()
        ));
    }
    let cfg = agent::AgentConfig {
        node_name,
        state_dir: args.state_dir,
        vmm_binary,
        allowed_dirs: args.allowed_dirs,
        allowed_bridges: args.allowed_bridges,
        max_empty_disk,
        jail: root.then_some(agent::jail_ids::Range {
            base: args.vmm_uid_base,
            count: args.vmm_uid_count,
        }),
        vmm_memory_overhead,
        reserve: agent::node::Reserve {
            cpus: args.reserved_cpus,
            memory: reserved_memory,
        },
        metrics_addr: args.metrics_addr,
        cgroups,
        lease_seconds: args.lease_seconds.max(3),
        image_grace: std::time::Duration::from_secs(args.image_cache_grace_seconds),
        slow_start_step: std::time::Duration::from_millis(args.slow_start_step_ms),
        access,
        masquerade: agent::network::Settings {
            bridge: match agent::masquerade::bridge_name(&args.masquerade_bridge) {
                Ok(b) => b,
                Err(e) => return fail(e.to_string()),
            },
            subnet: match agent::masquerade::Subnet::parse(&args.masquerade_subnet) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            },
            uplink: match args.uplink.as_deref().map(agent::masquerade::uplink_name) {
                None => None,
                Some(Ok(u)) => Some(u),
                Some(Err(e)) => return fail(e.to_string()),
            },
            dns: (!args.dns.is_empty()).then_some(args.dns),
            lease_time: std::time::Duration::from_secs(args.dhcp_lease_seconds),
            mtu: args.guest_mtu,
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            manifest,
            console_log,
        } => match standalone::run(&manifest, console_log.as_deref()) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("node-vmm: {e}");
                ExitCode::from(kubevmm_vmm::exit::code::VMM_ERROR as u8)
            }
        },
        Command::Agent(args) => run_agent(*args),
        Command::ConsoleLog { path, tail, follow } => console_log::run(&path, tail, follow),
        Command::ImageImport(args) => run_import(args),
        Command::Shim {
            dir,
            vmm,
            cgroup,
            fds,
        } => agent::supervisor::shim_main(&dir, &vmm, &cgroup, fds),
        Command::Doctor => {
            let findings = doctor::examine();
            print!("{}", doctor::render(&findings));
            if doctor::can_run(&findings) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
