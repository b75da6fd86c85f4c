//! Reaching a guest through the Kubernetes API server only, as users do:
//! `kubectl vm console`, `logs` and the errors and refusals around them, on
//! the private control plane with kube-apiserver's aggregation layer, the
//! operator serving `subresources.kubevmm.io` (registered with an
//! `APIService`) and node-vmm serving the streams over mutual TLS.
mod agent_env;
mod net_env;
mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_env::{start_agent_args, Env};
use kubevmm_e2e::pki::{host_ip, register_api_service, AccessPki};
use kubevmm_e2e::{bin_path, free_port, run_with_input, wait_for, Outcome};

/// A test's world: [`Env`] whose operator and agent serve access, the
/// `APIService` pointing at this operator.
struct World {
    env: Env,
    pki: AccessPki,
    node_port: u16,
    agent_flags: Vec<String>,
}

fn world(test: &str) -> World {
    world_with(test, &[])
}

/// [`world`] with extra agent flags (e.g. a masquerade network's).
fn world_with(test: &str, agent_extra: &[String]) -> World {
    let ip = host_ip();
    let (op_port, node_port) = (free_port().expect("port"), free_port().expect("port"));
    let dir = std::env::temp_dir().join(format!("kubevmm-access-{test}-{}", std::process::id()));
    let pki = AccessPki::new(&dir, &ip);
    let mut agent = pki_flags(&pki, &ip, node_port);
    agent.extend(agent_extra.iter().cloned());
    let op = pki.operator_flags(&format!("{ip}:{op_port}"));
    let agent: Vec<&str> = agent.iter().map(String::as_str).collect();
    let op: Vec<&str> = op.iter().map(String::as_str).collect();
    let env = Env::with_args(test, &agent, &op);
    register_api_service(env.cp, &pki, &ip, op_port, || env.operator.output());
    user_roles(&env);
    let mut agent_flags = pki_flags(&pki, &ip, node_port);
    agent_flags.extend(agent_extra.iter().cloned());
    World {
        env,
        pki,
        node_port,
        agent_flags,
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // An APIService whose server is gone slows kube-apiserver's
        // discovery (and its shutdown) down: take it away with the operator.
        let _ = self
            .env
            .cp
            .kubectl()
            .args([
                "delete",
                "apiservice",
                "v1alpha1.subresources.kubevmm.io",
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
        let _ = std::fs::remove_dir_all(self.pki.dir());
    }
}

fn pki_flags(pki: &AccessPki, ip: &str, port: u16) -> Vec<String> {
    pki.agent_flags(&format!("{ip}:{port}"))
}

/// The chart's `ClusterRole`s for people (aggregated into edit and view).
fn user_roles(env: &Env) {
    let rendered = support::ok(
        support::helm(env.cp)
            .args(["template", "access"])
            .arg(support::chart())
            .args([
                "--kube-version",
                "1.33.0",
                "--show-only",
                "templates/user-roles.yaml",
            ]),
    );
    let out = run_with_input(env.cp.kubectl().args(["apply", "-f", "-"]), &rendered);
    assert!(out.success, "user roles: {}", out.stderr);
}

/// `kubectl-vm` as the cluster admin in the test's namespace.
fn vm_cmd(env: &Env, kubeconfig: Option<&std::path::Path>) -> Command {
    let mut c = Command::new(bin_path("kubectl-vm"));
    c.arg("--kubeconfig")
        .arg(kubeconfig.unwrap_or(env.cp.kubeconfig()))
        .args(["-n", &env.ns]);
    c
}

fn vm_cli(env: &Env, args: &[&str]) -> Outcome {
    run_with_input(vm_cmd(env, None).args(args), "")
}

fn wait_status(env: &Env, name: &str, want: &str) {
    wait_for(
        60,
        &format!("{name} to show STATUS {want}"),
        || {
            let vm = env.vm(name)?;
            (vm.pointer("/status/printableStatus")? == want).then_some(())
        },
        || env.describe(name),
    );
}

/// A console client without a TTY: its stdout lines arrive on a channel.
struct Console {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Console {
    fn attach(env: &Env, name: &str) -> Self {
        let mut child = vm_cmd(env, None)
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl-vm console");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write to console");
        stdin.flush().expect("flush");
    }

    /// Waits up to `seconds` for a line containing `want`.
    fn expect(&mut self, want: &str, seconds: u64) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let hit = l.contains(want);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut err = String::new();
        let _ = self.child.kill();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!(
            "no console line with {want:?}; saw {:?}; stderr: {err}",
            self.seen
        );
    }
}

impl Console {
    /// Reads a `flood KIB` until its "flood done <n> lines" line; checks
    /// each line against the guest's pattern and their number.
    fn collect_flood(&mut self, kib: usize, seconds: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut lines = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "the flood did not end: {} lines",
                lines.len()
            );
            let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) else {
                continue;
            };
            if let Some(done) = l.trim().strip_prefix("flood done ") {
                for (n, line) in lines.iter().enumerate() {
                    assert_eq!(line, &flood_line(n), "flood line {n}");
                }
                assert_eq!(done, format!("{} lines", kib * 16), "the guest's count");
                assert_eq!(lines.len(), kib * 16, "every flood line");
                return lines;
            }
            if l.len() == 63 && l.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
                lines.push(l);
            }
        }
    }
}

/// Line `n` of the echo guest's flood, without its newline.
fn flood_line(n: usize) -> String {
    let mut l = format!("{:08} ", n % 100_000_000);
    l.extend((9..63).map(|i| char::from(b'a' + ((n + i) % 26) as u8)));
    l
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn console_through_the_api_server_echoes_for_every_client() {
    let w = world("acc-console");
    let env = &w.env;
    env.apply("echo", "echo", "");
    wait_status(env, "echo", "Running");
    wait_for(
        30,
        "the banner through kubectl vm logs",
        || {
            let out = vm_cli(env, &["logs", "echo"]);
            (out.success && out.stdout.contains("echo guest ready")).then_some(())
        },
        || {
            let out = vm_cli(env, &["logs", "echo"]);
            format!(
                "{}\n{}\noperator: {}\nagent: {}",
                out.stdout,
                out.stderr,
                support::tail(&env.operator.output()),
                support::tail(&env.agent.output())
            )
        },
    );

    let mut a = Console::attach(env, "echo");
    let mut b = Console::attach(env, "echo");
    // Let both attach before typing (the connect message is on stderr).
    std::thread::sleep(Duration::from_secs(2));
    a.send("hello from a\n");
    a.expect("echo: hello from a", 30);
    b.expect("echo: hello from a", 30);
    b.send("and from b\n");
    a.expect("echo: and from b", 30);
    drop(b);
    // The client that left leaves nothing behind: a stays attached, and
    // the VMM serves one console client (its counters, through the API).
    a.send("still here\n");
    a.expect("echo: still here", 30);
    wait_console_clients(env, "echo", 1);

    // Heavy output reaches a non-TTY client complete and in order: 10 MiB
    // of the echo guest's flood (64-byte numbered lines, then their
    // number), through kube-apiserver, the operator and the agent. The
    // limit is a hang guard, not a speed check (~150 KiB/s on software KVM).
    let kib = 10 << 10;
    let started = Instant::now();
    a.send(&format!("flood {kib}\n"));
    let flood = a.collect_flood(kib, 1200);
    eprintln!(
        "flood: {kib} KiB through the API server in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(flood.len(), kib * 16, "every flood line");

    // A script pipes a line in and gets the answer before detaching.
    let piped = run_with_input(
        vm_cmd(env, None).args(["console", "echo", "--detach-on-eof"]),
        "piped and answered\n",
    );
    assert!(piped.success, "{}", piped.stderr);
    assert!(
        piped.stdout.contains("echo: piped and answered"),
        "{}",
        piped.stdout
    );

    // With a terminal (script gives it one): raw mode, ^] detaches, exit 0.
    let mut tty = Command::new("script")
        .args(["-qfec"])
        .arg(format!(
            "{} --kubeconfig {} -n {} console echo",
            bin_path("kubectl-vm").display(),
            env.cp.kubeconfig().display(),
            env.ns
        ))
        .arg("/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    std::thread::sleep(Duration::from_secs(2));
    let stdin = tty.stdin.as_mut().expect("stdin");
    stdin.write_all(b"typed at a tty\r").expect("type");
    stdin.flush().expect("flush");
    a.expect("echo: typed at a tty", 30);
    stdin.write_all(&[0x1d]).expect("escape");
    stdin.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = tty.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "^] did not detach the console");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "console exit after ^]: {status}");
    drop(a);
    wait_console_clients(env, "echo", 0);
}

/// Waits until the VMM of `name` serves `n` console clients, as its
/// counters say through `virtualmachines/stats`.
fn wait_console_clients(env: &Env, name: &str, n: u64) {
    let path = format!(
        "/apis/subresources.kubevmm.io/v1alpha1/namespaces/{}/virtualmachines/{name}/stats",
        env.ns
    );
    let clients = || {
        let out = env
            .cp
            .kubectl()
            .args(["get", "--raw", &path])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["console_clients"].as_u64()
    };
    wait_for(
        30,
        &format!("{n} console clients on the VMM of {name}"),
        || (clients() == Some(n)).then_some(()),
        || format!("{:?}", clients()),
    );
}

#[test]
fn logs_show_what_no_one_attached_to_saw_and_survive_an_agent_restart() {
    let mut w = world("acc-logs");
    w.env.apply("quiet", "echo", "");
    wait_status(&w.env, "quiet", "Running");
    // Nobody attached: the boot banner is in the ring.
    wait_for(
        30,
        "the banner in kubectl vm logs",
        || {
            let out = vm_cli(&w.env, &["logs", "quiet"]);
            (out.success && out.stdout.contains("echo guest ready")).then_some(())
        },
        || vm_cli(&w.env, &["logs", "quiet"]).stderr,
    );
    let tail = vm_cli(&w.env, &["logs", "quiet", "--tail", "1"]);
    assert!(tail.success, "{}", tail.stderr);
    assert_eq!(tail.stdout.lines().count(), 1, "{}", tail.stdout);

    // -f follows: a line typed on the console shows up in the followed logs.
    let mut follow = vm_cmd(&w.env, None)
        .args(["logs", "-f", "quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let out = follow.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut c = Console::attach(&w.env, "quiet");
    std::thread::sleep(Duration::from_secs(1));
    c.send("followed line\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("echo: followed line"))
    {
        assert!(
            Instant::now() < deadline,
            "logs -f did not follow: {seen:?}"
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    drop(c);

    // The agent restarts; the guest runs on and its output is still there.
    let pid = w.env.vmm_pid(&w.env.uid("quiet"));
    w.env.agent.kill();
    let flags: Vec<&str> = w.agent_flags.iter().map(String::as_str).collect();
    w.env.agent = start_agent_args(
        w.env.cp,
        &w.env.node,
        &w.env.state,
        &w.env.guests,
        "agent2.log",
        "1",
        &flags,
    );
    wait_for(
        60,
        "the logs through the new agent",
        || {
            let out = vm_cli(&w.env, &["logs", "quiet"]);
            (out.success
                && out.stdout.contains("echo guest ready")
                && out.stdout.contains("echo: followed line"))
            .then_some(())
        },
        || {
            let out = vm_cli(&w.env, &["logs", "quiet"]);
            format!("{}\n{}\n{}", out.stdout, out.stderr, w.env.agent.output())
        },
    );
    assert_eq!(
        w.env.vmm_pid(&w.env.uid("quiet")),
        pid,
        "the guest was restarted"
    );
}

/// An idle console stays attached: ten minutes without a byte either way
/// (the WebSocket pings every 30 s keep kube-apiserver's proxy, the
/// operator and the agent from dropping it), then a line is still answered.
#[test]
fn an_idle_console_stays_connected_for_ten_minutes() {
    let w = world("acc-idle");
    let env = &w.env;
    env.apply("quiet", "echo", "");
    wait_status(env, "quiet", "Running");
    let mut c = Console::attach(env, "quiet");
    std::thread::sleep(Duration::from_secs(2));
    c.send("before the idle minutes\n");
    c.expect("echo: before the idle minutes", 30);
    let idle = Duration::from_secs(10 * 60 + 10);
    let start = Instant::now();
    while start.elapsed() < idle {
        std::thread::sleep(Duration::from_secs(5));
        if let Some(status) = c.child.try_wait().expect("wait for the console") {
            let mut err = String::new();
            if let Some(mut e) = c.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "the idle console ended after {:?} ({status}): {err}",
                start.elapsed()
            );
        }
    }
    c.send("after ten idle minutes\n");
    c.expect("echo: after ten idle minutes", 30);
    wait_console_clients(env, "quiet", 1);
}

/// The guest of a lost node (its agent gone, no heartbeat) cannot be
/// reached: console and logs fail at once, naming the lost node, and do not
/// hang on the unreachable agent.
#[test]
fn a_vm_on_a_lost_node_gives_a_clear_error_not_a_hang() {
    let mut w = world("acc-lost");
    w.env.apply("web", "echo", "");
    wait_status(&w.env, "web", "Running");
    w.env.agent.kill();
    wait_for(
        60,
        "the operator to find web's node lost",
        || (w.env.condition("web", "NodeLost")?["status"] == "True").then_some(()),
        || w.env.describe("web"),
    );
    let want = format!("the node {} of VirtualMachine web is lost", w.env.node);
    for verb in ["console", "logs"] {
        let t0 = Instant::now();
        let out = vm_cli(&w.env, &[verb, "web"]);
        assert!(
            !out.success,
            "{verb} of a VM on a lost node: {}",
            out.stdout
        );
        assert!(out.stderr.contains(&want), "{verb}: {}", out.stderr);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{verb} took {:?} to fail",
            t0.elapsed()
        );
    }
}

#[test]
fn refusals_name_the_cause_and_strangers_are_turned_away() {
    let w = world("acc-refuse");
    let env = &w.env;
    env.apply("web", "echo", "");
    env.apply("halted", "echo", "  runStrategy: Halted\n");
    wait_status(env, "web", "Running");
    wait_status(env, "halted", "Stopped");

    // A stopped VM: a clear error, not a hang.
    let out = vm_cli(env, &["console", "halted"]);
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("VirtualMachine halted is not running (status Stopped)"),
        "{}",
        out.stderr
    );
    let out = vm_cli(env, &["console", "nosuch"]);
    assert!(
        !out.success && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );

    // A viewer may list VMs but not reach their consoles; the message names
    // the missing permission.
    let viewer = support::bound_sa_kubeconfig(env.cp, &env.ns, "viewer", "clusterrole/view");
    let out = run_with_input(vm_cmd(env, Some(&viewer)).args(["console", "web"]), "");
    assert!(!out.success);
    let want = format!(
        "User \"system:serviceaccount:{}:viewer\" cannot get resource \"virtualmachines/console\" \
         in API group \"subresources.kubevmm.io\" in the namespace \"{}\"",
        env.ns, env.ns
    );
    assert!(
        out.stderr.contains(&want),
        "want {want:?} in {}",
        out.stderr
    );
    println!("403 as a viewer: {}", out.stderr.trim());
    // Figures are no guest content: a viewer may see them (kubectl vm top).
    top_shows_web_only(env, &viewer);
    let out = vm_cli(env, &["top", "halted"]);
    assert!(
        !out.success && out.stderr.contains("is not running"),
        "{}",
        out.stderr
    );
    // An editor may.
    let editor = support::bound_sa_kubeconfig(env.cp, &env.ns, "editor", "clusterrole/edit");
    wait_for(
        60,
        "an editor to read the VM's logs",
        || {
            let out = run_with_input(vm_cmd(env, Some(&editor)).args(["logs", "web"]), "");
            (out.success && out.stdout.contains("echo guest ready")).then_some(())
        },
        || run_with_input(vm_cmd(env, Some(&editor)).args(["logs", "web"]), "").stderr,
    );
    // ... in its own namespace only.
    let elsewhere = run_with_input(
        Command::new(bin_path("kubectl-vm"))
            .arg("--kubeconfig")
            .arg(&editor)
            .args(["-n", "default", "console", "web"]),
        "",
    );
    assert!(!elsewhere.success);
    assert!(
        elsewhere
            .stderr
            .contains("cannot get resource \"virtualmachines/console\" in API group \"subresources.kubevmm.io\" in the namespace \"default\""),
        "{}",
        elsewhere.stderr
    );

    // The node's access port takes only the operator's certificate: a
    // client without one gets a TLS alert, never an HTTP answer.
    let stranger = run_with_input(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("{}:{}", host_ip(), w.node_port))
            .args(["-servername", "node-vmm.kubevmm.internal", "-CAfile"])
            .arg(w.pki.file("node-ca.crt")),
        &format!(
            "GET /v1/vms/{}/logs HTTP/1.1\r\nHost: node\r\n\r\n",
            env.uid("web")
        ),
    );
    let text = format!("{}{}", stranger.stdout, stranger.stderr);
    assert!(
        !text.contains("HTTP/1.1"),
        "a client without the operator's certificate got an answer: {text}"
    );
    assert!(
        text.contains("alert"),
        "no TLS alert for a client without a certificate: {text}"
    );
}

/// `kubectl vm top` as the user of `kubeconfig`: figures for the running
/// `web`, none for the stopped `halted`.
fn top_shows_web_only(env: &Env, kubeconfig: &std::path::Path) {
    let top = run_with_input(vm_cmd(env, Some(kubeconfig)).args(["top"]), "");
    assert!(top.success, "top as a viewer: {}", top.stderr);
    let header = top.stdout.lines().next().unwrap_or_default();
    assert!(
        header.split_whitespace().eq([
            "NAME",
            "CPU",
            "MEMORY",
            "DISK-READ",
            "DISK-WRITE",
            "NET-RX",
            "NET-TX"
        ]),
        "{}",
        top.stdout
    );
    let row = top
        .stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_default();
    assert!(
        row.contains("Mi") || row.contains("Ki"),
        "a memory figure for web: {}",
        top.stdout
    );
    assert!(
        !top.stdout.contains("halted"),
        "a stopped VM has no figures: {}",
        top.stdout
    );
}

/// Waits until the one-connection-at-a-time TCP echo of the dhcpnet guest
/// has ended every connection it reported on its serial (tests/guests/
/// tcpecho.c names the first ten): a client that went away must leave no
/// connection open in the guest, and the next client is not refused as
/// "busy" by a teardown still in flight.
fn wait_guest_tcp_closed(env: &Env, name: &str) {
    wait_for(
        60,
        "the guest to end every TCP connection it accepted",
        || {
            let log = vm_cli(env, &["logs", name]).stdout;
            let opened = log.matches("tcp: connection from").count();
            let ended = log.lines().filter(|l| l.starts_with("tcp: ")).count() - opened;
            (opened > 0 && opened == ended).then_some(())
        },
        || vm_cli(env, &["logs", name]).stdout,
    );
}

#[test]
fn port_forward_reaches_a_guest_service_through_the_api_server() {
    // The dhcpnet guest answers TCP echo on port 7 once it has its lease,
    // on a masquerade network this test makes (tests/tests/net_env).
    let nets = net_env::Nets::new(3);
    let w = world_with("acc-pf", &nets.agent_args());
    let env = &w.env;
    let manifest = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: svc\nspec:\n  memory: 64Mi\n  \
         terminationGracePeriodSeconds: 1\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: {kernel}}}\n  \
         networks:\n  - name: default\n    masquerade: {{}}\n",
        node = env.node,
        kernel = env.guests.join("dhcpnet.elf").display(),
    );
    let out = run_with_input(
        env.cp.kubectl().args(["apply", "-n", &env.ns, "-f", "-"]),
        &manifest,
    );
    assert!(out.success, "apply: {}", out.stderr);
    wait_for(
        120,
        "the guest's address in status",
        || {
            env.vm("svc")?
                .pointer("/status/interfaces/0/ipAddress")
                .cloned()
        },
        || env.describe("svc"),
    );

    // --stdio, as ssh's ProxyCommand uses it.
    let line = "through kube-apiserver to port 7\n";
    let piped = wait_for(
        60,
        "an echo through port-forward --stdio",
        || {
            let out = run_with_input(
                vm_cmd(env, None).args(["port-forward", "--stdio", "svc", "7"]),
                line,
            );
            out.stdout.contains(line.trim_end()).then_some(out)
        },
        || {
            let out = run_with_input(
                vm_cmd(env, None).args(["port-forward", "--stdio", "svc", "7"]),
                line,
            );
            format!("{}\n{}", out.stderr, support::tail(&env.agent.output()))
        },
    );
    assert!(piped.success, "{}", piped.stderr);
    wait_guest_tcp_closed(env, "svc");

    // A local port, as kubectl port-forward: connect, write, read the echo.
    let mut pf = vm_cmd(env, None)
        .args(["port-forward", "svc", "0:7"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("port-forward");
    let mut first = String::new();
    BufReader::new(pf.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("the Forwarding line");
    let port: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no local port in {first:?}"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    conn.write_all(b"over a local port\n").expect("write");
    let mut got = vec![0u8; 18];
    conn.read_exact(&mut got).expect("the echo");
    assert_eq!(got, b"over a local port\n");
    drop(conn);
    let _ = pf.kill();
    let _ = pf.wait();
    wait_guest_tcp_closed(env, "svc");

    // A port nothing listens on: the guest refuses, the user is told.
    let out = run_with_input(
        vm_cmd(env, None).args(["port-forward", "--stdio", "svc", "8"]),
        "x",
    );
    assert!(!out.success, "port 8 has no listener: {}", out.stdout);
    assert!(out.stderr.contains("guest port"), "{}", out.stderr);
    drop(w);
    drop(nets);
}
