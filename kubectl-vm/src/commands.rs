//! The thin executor: read from the API server, call the pure module that
//! decides, write the outcome, print. Every error names the cause and the fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory as _;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use kubevmm_crds::{HypervisorNode, RunStrategy, VirtualMachine};
use serde::Serialize;

use crate::connect::{connect, explain, Attempt, ConnectError, Target};
use crate::create::{manifest, CreateError, Request};
use crate::listing::{render, row, Columns};
use crate::power::{plan, PowerError, Verb};
use crate::sshargs::Tool;
use crate::streams::{self, StreamError};
use crate::{info, version, Cli, Command, CreateArgs, DryRun, Output, Shell};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The cluster cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A request failed (already explained).
    #[error("{0}")]
    Api(String),
    /// The verb does not apply to the VM as it is.
    #[error(transparent)]
    Power(#[from] PowerError),
    /// `create` flags that make no valid VM.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// A flag's value that is not valid.
    #[error("{0}")]
    Flag(String),
    /// A file named by a flag cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The output cannot be written.
    #[error("cannot print the result: {0}")]
    Print(String),
    /// A streaming verb (console, logs, port-forward, ssh, scp) failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// `top` failed.
    #[error(transparent)]
    Top(#[from] crate::top::TopError),
}

type Result<T> = std::result::Result<T, CommandError>;

/// Runs the command line.
pub async fn run(cli: Cli) -> Result<()> {
    let target = Target {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
        namespace: cli.namespace.clone(),
    };
    match cli.command {
        Command::Completion { shell } => {
            completion(shell);
            Ok(())
        }
        Command::Create(args) if args.dry_run == DryRun::Client => {
            let namespace = match &target.namespace {
                Some(n) => n.clone(),
                None => connect(&target)
                    .await
                    .map_or_else(|_| "default".into(), |(_, n)| n),
            };
            let vm = build(&args, &namespace)?;
            print(&vm, args.output.unwrap_or(Output::Yaml))
        }
        // OpenSSH replaces this process; its ProxyCommand connects.
        Command::Ssh(p) => Ok(streams::openssh(Tool::Ssh, &p.args, &target).await?),
        Command::Scp(p) => Ok(streams::openssh(Tool::Scp, &p.args, &target).await?),
        command => {
            let (client, namespace) = connect(&target).await?;
            dispatch(command, &client, &namespace).await
        }
    }
}

async fn dispatch(command: Command, client: &Client, ns: &str) -> Result<()> {
    match command {
        Command::List {
            all_namespaces,
            output,
        } => list(client, ns, all_namespaces, output).await,
        Command::Info(n) => show(client, ns, &n.name).await,
        Command::Start(n) => power(client, ns, &n.name, Verb::Start).await,
        Command::Stop {
            name,
            grace_period,
            force,
        } => {
            let grace = match (force, grace_period) {
                (true, Some(g)) if g > 0 => {
                    return Err(CommandError::Flag(format!(
                        "--force stops at once; it cannot go with --grace-period {g}"
                    )))
                }
                (true, _) => Some(0),
                (false, g) => g,
            };
            power(client, ns, &name, Verb::Stop { grace }).await
        }
        Command::Restart(n) => power(client, ns, &n.name, Verb::Restart).await,
        Command::Pause(n) => power(client, ns, &n.name, Verb::Pause).await,
        Command::Resume(n) => power(client, ns, &n.name, Verb::Resume).await,
        Command::Create(args) => create(client, ns, &args).await,
        Command::Version => versions(client).await,
        Command::Top { name } => Ok(crate::top::top(client, ns, name.as_deref()).await?),
        Command::Console {
            name,
            detach_on_eof,
        } => Ok(streams::console(client, ns, &name, detach_on_eof).await?),
        Command::Logs { name, follow, tail } => {
            Ok(streams::logs(client, ns, &name, follow, tail).await?)
        }
        Command::PortForward {
            name,
            ports,
            stdio,
            address,
        } => Ok(streams::port_forward(client, ns, &name, &ports, stdio, address.as_deref()).await?),
        Command::Completion { .. } | Command::Ssh(_) | Command::Scp(_) => Ok(()),
    }
}

fn api_error<'a>(
    verb: &'static str,
    name: Option<&'a str>,
    ns: Option<&'a str>,
) -> impl Fn(kube::Error) -> CommandError + 'a {
    move |e| {
        CommandError::Api(explain(
            &e,
            Attempt {
                verb,
                resource: "virtualmachines",
                name,
                namespace: ns,
            },
        ))
    }
}

fn print<T: Serialize>(value: &T, output: Output) -> Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| CommandError::Print(e.to_string()))?,
        Output::Yaml | Output::Wide => {
            serde_yaml::to_string(value).map_err(|e| CommandError::Print(e.to_string()))?
        }
    };
    print!("{text}");
    Ok(())
}

async fn list(client: &Client, ns: &str, all: bool, output: Option<Output>) -> Result<()> {
    let api: Api<VirtualMachine> = if all {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    };
    let scope = (!all).then_some(ns);
    let vms = api
        .list(&ListParams::default())
        .await
        .map_err(api_error("list", None, scope))?;
    match output {
        Some(o @ (Output::Yaml | Output::Json)) => {
            let items: Vec<serde_json::Value> = vms
                .items
                .iter()
                .map(|v| serde_json::to_value(v).unwrap_or_default())
                .collect();
            print(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}),
                o,
            )
        }
        wide => {
            if vms.items.is_empty() {
                match scope {
                    Some(n) => eprintln!("No VirtualMachines in namespace {n}."),
                    None => eprintln!("No VirtualMachines in any namespace."),
                }
                return Ok(());
            }
            let now = Timestamp::now();
            let rows: Vec<_> = vms.items.iter().map(|v| row(v, now)).collect();
            let columns = Columns {
                namespace: all,
                wide: wide == Some(Output::Wide),
            };
            print!("{}", render(&rows, columns));
            Ok(())
        }
    }
}

async fn show(client: &Client, ns: &str, name: &str) -> Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let vm = api
        .get(name)
        .await
        .map_err(api_error("get", Some(name), Some(ns)))?;
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "involvedObject.kind=VirtualMachine,involvedObject.name={name}{}",
        vm.uid()
            .map(|u| format!(",involvedObject.uid={u}"))
            .unwrap_or_default()
    );
    // Events are a help, not the point: without the right to read them, say so.
    let events = match events.list(&ListParams::default().fields(&selector)).await {
        Ok(l) => l.items,
        Err(e) => {
            eprintln!(
                "note: events not shown: {}",
                explain(
                    &e,
                    Attempt {
                        verb: "list",
                        resource: "events",
                        name: None,
                        namespace: Some(ns),
                    }
                )
            );
            Vec::new()
        }
    };
    print!("{}", info::render(&vm, &events, Timestamp::now()));
    Ok(())
}

async fn power(client: &Client, ns: &str, name: &str, verb: Verb) -> Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    // The patch carries the resourceVersion it was planned on: a change in
    // between is a conflict, planned again on the new state.
    for attempt in 0..3 {
        let vm = api
            .get(name)
            .await
            .map_err(api_error("get", Some(name), Some(ns)))?;
        let patch = plan(verb, &vm, Timestamp::now())?;
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                println!("virtualmachine.kubevmm.io/{name} {}", done_word(verb));
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 2 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(api_error("patch", Some(name), Some(ns))(e)),
        }
    }
    unreachable!("the last attempt returns")
}

fn done_word(verb: Verb) -> &'static str {
    match verb {
        Verb::Start => "start requested",
        Verb::Stop { grace: Some(0) } => "stop requested (by force, at once)",
        Verb::Stop { .. } => "stop requested",
        Verb::Restart => "restart requested",
        Verb::Pause => "pause requested",
        Verb::Resume => "resume requested",
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CommandError::Read {
        path: path.into(),
        source,
    })
}

/// A `--ssh-key` value: a key as typed, else a file of keys (one per line).
fn ssh_keys(values: &[String]) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for v in values {
        let looks_like_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| v.starts_with(p));
        if looks_like_key {
            keys.push(v.trim().to_string());
        } else {
            let text = read(Path::new(v))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
        }
    }
    Ok(keys)
}

fn build(args: &CreateArgs, namespace: &str) -> Result<VirtualMachine> {
    let run_strategy: RunStrategy = serde_json::from_value(serde_json::Value::String(
        args.run_strategy.clone(),
    ))
    .map_err(|_| {
        CommandError::Flag(format!(
            "--run-strategy {:?}: use Always, RerunOnFailure, Manual, Halted or Once",
            args.run_strategy
        ))
    })?;
    let request = Request {
        name: args.name.clone(),
        namespace: namespace.into(),
        image: args.image.clone(),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        cpus: args.cpus,
        memory: args.memory.clone(),
        disks: args.disks.clone(),
        networks: args.networks.clone(),
        ssh_keys: ssh_keys(&args.ssh_keys)?,
        user_data: args.user_data.as_deref().map(read).transpose()?,
        run_strategy,
    };
    Ok(manifest(&request)?)
}

async fn create(client: &Client, ns: &str, args: &CreateArgs) -> Result<()> {
    let vm = build(args, ns)?;
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let params = PostParams {
        dry_run: args.dry_run == DryRun::Server,
        field_manager: Some("kubectl-vm".into()),
    };
    let made = api.create(&params, &vm).await.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 409 => CommandError::Api(format!(
            "VirtualMachine {} already exists in namespace {ns}: delete it or choose another name",
            args.name
        )),
        _ => api_error("create", Some(&args.name), Some(ns))(e),
    })?;
    if let Some(o @ (Output::Yaml | Output::Json)) = args.output {
        return print(&made, o);
    }
    let suffix = if params.dry_run {
        " (server dry run)"
    } else {
        ""
    };
    println!("virtualmachine.kubevmm.io/{} created{suffix}", args.name);
    Ok(())
}

async fn versions(client: &Client) -> Result<()> {
    let mine = env!("CARGO_PKG_VERSION");
    println!("Client Version: kubectl-vm {mine}");
    let server = client
        .apiserver_version()
        .await
        .map_err(|e| CommandError::Api(format!("cannot read the API server's version: {e}")))?;
    println!("Server Version: Kubernetes {}", server.git_version);
    let nodes: Api<HypervisorNode> = Api::all(client.clone());
    let agents: Vec<(String, String)> = match nodes.list(&ListParams::default()).await {
        Ok(l) => l
            .items
            .iter()
            .map(|n| {
                let v = n.status.as_ref().and_then(|s| s.agent_version.clone());
                (n.name_any(), v.unwrap_or_else(|| "unknown".into()))
            })
            .collect(),
        Err(e) => {
            eprintln!("note: node-vmm versions not shown: {e}");
            Vec::new()
        }
    };
    for (node, v) in &agents {
        println!("node-vmm {v} on node {node}");
    }
    for w in version::skew_warnings(mine, &agents) {
        eprintln!("{w}");
    }
    Ok(())
}

fn completion(shell: Shell) {
    let mut cmd = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
    };
    clap_complete::generate(shell, &mut cmd, "kubectl-vm", &mut std::io::stdout());
}
