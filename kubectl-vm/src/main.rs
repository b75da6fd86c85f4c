//! `kubectl vm`: virsh and virtctl for kubevmm, as a kubectl plugin
//! (installed on PATH as `kubectl-vm`). It reads the kubeconfig as kubectl
//! does and speaks to the API server only. Decisions live in pure modules
//! (`listing`, `info`, `power`, `create`, `version`, and for the streaming
//! verbs `console`, `portspec`, `sshargs`, `subresource`); `commands` and
//! `streams` run them.

// The doc comments of the clap types are the help text users read, where
// backticks around VirtualMachine would show up as such.
#![allow(clippy::doc_markdown)]

mod commands;
mod connect;
mod console;
mod create;
mod info;
mod listing;
mod portspec;
mod power;
mod sshargs;
mod streams;
mod subresource;
mod terminal;
mod top;
mod version;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Manage kubevmm VirtualMachines: list, inspect, start, stop, create; reach their console, log, ports and ssh.
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

/// The arguments of `ssh` and `scp`, passed on to OpenSSH.
#[derive(Debug, Args)]
pub struct Passthrough {
    /// OpenSSH's options and operands; the VM is [USER@]NAME (scp: [USER@]NAME:PATH).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
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
    /// Attach to the serial console; ^] detaches.
    #[command(
        after_help = "With a terminal on stdin, it is put in raw mode (every key, ^C \
        included, goes to the guest) and ^] detaches. Without one (a pipe or a file), input \
        is sent byte for byte and the end of it does not detach, so `echo uname | kubectl vm \
        console NAME` shows the reply: the console stays until the server closes it, ^C or \
        SIGTERM (`timeout 10 kubectl vm console NAME`), or with --detach-on-eof until the \
        input ends."
    )]
    Console {
        /// The VirtualMachine.
        name: String,
        /// Without a terminal on stdin: detach when stdin ends.
        #[arg(long)]
        detach_on_eof: bool,
    },
    /// Print the serial console's output (the buffer node-vmm keeps, also while detached).
    Logs {
        /// The VirtualMachine.
        name: String,
        /// Keep streaming new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
    },
    /// Forward a local port (or, with --stdio, stdin and stdout) to a port of the guest.
    #[command(after_help = "Examples:\n  kubectl vm port-forward web 8080:80   \
        # 127.0.0.1:8080 to the guest's port 80\n  kubectl vm port-forward web :80       \
        # any free local port (printed)\n  kubectl vm port-forward --stdio web 22  \
        # an ssh ProxyCommand (kubectl vm ssh does this)")]
    PortForward {
        /// The VirtualMachine.
        name: String,
        /// LOCAL defaults to REMOTE; 0 or nothing (:80) picks a free local port.
        #[arg(value_name = "[LOCAL:]REMOTE")]
        ports: String,
        /// Relay stdin and stdout to one connection instead of listening.
        #[arg(long)]
        stdio: bool,
        /// The local address to listen on [default: 127.0.0.1].
        #[arg(long, value_name = "IP", conflicts_with = "stdio")]
        address: Option<String>,
    },
    /// ssh to a VM: the local OpenSSH, through the API server.
    #[command(
        override_usage = "kubectl vm ssh [SSH OPTIONS] [USER@]NAME [COMMAND...]",
        after_help = "OpenSSH runs with -o ProxyCommand='kubectl-vm -n NS port-forward --stdio \
            NAME %p' (so -p chooses the guest port, 22 by default) and -o \
            HostKeyAlias=vm/NS/NAME (known_hosts entries per VM); the host it is given is \
            NAME.NS.kubevmm (for `Host *.kubevmm` in ~/.ssh/config). -n NS, --context and \
            --kubeconfig may stand among ssh's options; ssh's own -n is written < /dev/null. \
            The exit code is ssh's."
    )]
    Ssh(Passthrough),
    /// Copy files to or from a VM: the local scp, through the API server.
    #[command(
        override_usage = "kubectl vm scp [SCP OPTIONS] SOURCE... TARGET   (the VM's files: [USER@]NAME:PATH)",
        after_help = "As kubectl vm ssh: -o ProxyCommand and -o HostKeyAlias for the VM, whose \
            operands [USER@]NAME:PATH become [USER@]NAME.NS.kubevmm:PATH; -P chooses the guest \
            port. One VM per command. The exit code is scp's."
    )]
    Scp(Passthrough),
    /// CPU, memory, disk and network use of running VMs (node-vmm's figures).
    Top {
        /// One VirtualMachine (default: every running one in the namespace).
        name: Option<String>,
    },
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
    let result = runtime.block_on(commands::run(cli));
    // Whatever is still running (a read of stdin that waits for a key) must
    // not keep the process from exiting.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Cli {
        Cli::try_parse_from(std::iter::once("kubectl-vm").chain(line.split_whitespace()))
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// `ssh`/`scp` arguments as clap hands them over, and the namespace.
    fn passed(line: &str) -> (Vec<String>, Option<String>) {
        let cli = parse(line);
        match cli.command {
            Command::Ssh(p) | Command::Scp(p) => (p.args, cli.namespace),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn ssh_and_scp_take_openssh_arguments_as_they_are() {
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        for (line, args, ns) in [
            ("ssh web", "web", None),
            (
                "ssh -i key -p 2222 root@web ls -l",
                "-i key -p 2222 root@web ls -l",
                None,
            ),
            ("ssh -v web -n x", "-v web -n x", None),
            ("ssh web uname --all", "web uname --all", None),
            // Our flags before OpenSSH's are clap's; later ones sshargs takes out.
            ("ssh -n dev web", "web", Some("dev")),
            ("-n dev ssh -t web", "-t web", Some("dev")),
            ("scp -r dir web:/tmp", "-r dir web:/tmp", None),
            ("scp -P 2222 web:a .", "-P 2222 web:a .", None),
        ] {
            assert_eq!(
                passed(line),
                (words(args), ns.map(str::to_string)),
                "{line}"
            );
        }
    }

    #[test]
    fn streaming_verbs() {
        match parse("logs web -f --tail 20").command {
            Command::Logs { name, follow, tail } => {
                assert_eq!((name.as_str(), follow, tail), ("web", true, Some(20)));
            }
            other => panic!("{other:?}"),
        }
        match parse("port-forward --stdio web 22").command {
            Command::PortForward {
                name,
                ports,
                stdio,
                address,
            } => assert_eq!(
                (name.as_str(), ports.as_str(), stdio, address),
                ("web", "22", true, None)
            ),
            other => panic!("{other:?}"),
        }
        match parse("console web --detach-on-eof").command {
            Command::Console {
                name,
                detach_on_eof,
            } => assert_eq!((name.as_str(), detach_on_eof), ("web", true)),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from([
            "kubectl-vm",
            "port-forward",
            "--stdio",
            "--address",
            "::1",
            "web",
            "22"
        ])
        .is_err());
    }
}
