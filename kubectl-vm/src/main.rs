//! `kubectl vm`: virsh and virtctl for kubevmm, as a kubectl plugin
//! (installed on PATH as `kubectl-vm`). It reads the kubeconfig as kubectl
//! does and speaks to the API server only. Decisions live in pure modules
//! (`listing`, `info`, `power`, `create`, `version`); `commands` runs them.

// The doc comments of the clap types are the help text users read, where
// backticks around VirtualMachine would show up as such.
#![allow(clippy::doc_markdown)]

mod commands;
mod connect;
mod create;
mod info;
mod listing;
mod power;
mod version;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Manage kubevmm VirtualMachines: list, inspect, start, stop, create.
#[derive(Debug, Parser)]
#[command(name = "kubectl-vm", bin_name = "kubectl vm", version, about)]
pub struct Cli {
    /// Path to the kubeconfig file (else KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (else the context's, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of `list` and `create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The table with VCPUS and MEMORY.
    Wide,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// `--dry-run` values, as kubectl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Send it.
    None,
    /// Build it here only.
    Client,
    /// Have the API server check it without storing it.
    Server,
}

/// A VM by name.
#[derive(Debug, Args)]
pub struct Named {
    /// The VirtualMachine.
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List VirtualMachines (stopped ones too).
    #[command(alias = "ls")]
    List {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// wide, yaml or json.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Show one VirtualMachine: state, node, address, disks, networks, conditions, events.
    #[command(alias = "describe")]
    Info(Named),
    /// Start a stopped VirtualMachine.
    Start(Named),
    /// Shut a VirtualMachine down (ACPI, then by force after the grace period) and keep it stopped.
    Stop {
        /// The VirtualMachine.
        name: String,
        /// Seconds the guest gets to power off (default: its terminationGracePeriodSeconds).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(0..=3600))]
        grace_period: Option<u32>,
        /// Stop at once, without waiting for the guest (grace period 0).
        #[arg(long)]
        force: bool,
    },
    /// Shut the guest down gracefully and start it again.
    Restart(Named),
    /// Pause the vCPUs.
    Pause(Named),
    /// Resume paused vCPUs.
    Resume(Named),
    /// Make a VirtualMachine from flags (the virt-install of kubevmm).
    Create(Box<CreateArgs>),
    /// Client, API server and node-vmm versions.
    Version,
    /// Shell completion script.
    Completion {
        /// bash or zsh.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Shells `completion` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
}

/// The flags of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VirtualMachine's name.
    pub name: String,
    /// Kernel: a VirtualMachineImage name, or an absolute path on the node.
    #[arg(long, value_name = "IMAGE|PATH")]
    pub kernel: String,
    /// Initial ramdisk: a VirtualMachineImage name, or an absolute path on the node.
    #[arg(long, value_name = "IMAGE|PATH")]
    pub initrd: Option<String>,
    /// Kernel command line (default: console=ttyS0, plus root=/dev/vda1 with --image).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Root disk: a copy-on-write clone of this VirtualMachineImage (vda).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory, a quantity such as 512Mi or 2Gi.
    #[arg(long, default_value = "512Mi")]
    pub memory: String,
    /// Extra disk: name=N,size=1Gi | name=N,image=IMAGE | name=N,path=/node/file [,readonly]. Repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Network: masquerade (default) | bridge=br0 | none [,name=N][,mac=M]. Repeatable.
    #[arg(long = "network", value_name = "SPEC")]
    pub networks: Vec<String>,
    /// An SSH public key, or a file holding keys, for cloud-init. Repeatable.
    #[arg(long = "ssh-key", value_name = "KEY|FILE")]
    pub ssh_keys: Vec<String>,
    /// A cloud-init user-data file (#cloud-config, #! script or MIME multipart).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Always, RerunOnFailure, Manual, Halted or Once.
    #[arg(long, default_value = "Always")]
    pub run_strategy: String,
    /// none (create it), client (print it only) or server (check it on the API server).
    #[arg(long, value_enum, default_value = "none", num_args = 0..=1, default_missing_value = "client", require_equals = true)]
    pub dry_run: DryRun,
    /// Print the VirtualMachine as yaml or json.
    #[arg(short, long, value_enum)]
    pub output: Option<Output>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
