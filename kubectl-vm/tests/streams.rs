//! The streaming verbs of the real `kubectl-vm` binary against a stand-in
//! for the subresource API: a small HTTP/1.1 server on 127.0.0.1 speaking
//! the protocol of DESIGN.md "Access" (WebSocket subprotocol
//! `plain.kubevmm.io`, raw bytes in binary messages, pings, close frames
//! with reasons, `metav1.Status` errors). It proves the client's plumbing:
//! the upgrade through the kube client, pongs, detaching, the end of input,
//! relaying, many connections at once, errors word for word, and ssh's
//! `ProxyCommand` running this binary. The real server is tested with it in
//! the end-to-end suite.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-vm");
const GROUP: &str = "/apis/subresources.kubevmm.io/v1alpha1/namespaces/";
const VMS: &str = "/apis/kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/";

/// The stand-in API server and a kubeconfig that points at it.
struct Fake {
    kubeconfig: PathBuf,
    dir: PathBuf,
    /// What the server saw, in order: "console web pong", "logs tailLines=5&follow=false", …
    seen: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    async fn start(test: &str) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(handle(s, log.clone()));
            }
        });
        let dir = std::env::temp_dir().join(format!("kubectl-vm-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: dev}}}}]\n"
            ),
        )
        .unwrap();
        Fake {
            kubeconfig,
            dir,
            seen,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Runs the binary with `input` on stdin (then its end).
    async fn run(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.command(args).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).await.unwrap();
        drop(stdin);
        tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl-vm {args:?} did not end"))
            .unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `metav1.Status` error response.
async fn status(mut s: TcpStream, code: u16, message: &str) {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "Whatever", "code": code,
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 {code} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
}

/// One request per connection.
async fn handle(s: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(s);
    let mut request = String::new();
    let mut headers = Vec::new();
    reader.read_line(&mut request).await.unwrap();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    assert!(
        reader.buffer().is_empty(),
        "a body or a frame before the answer"
    );
    let s = reader.into_inner();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let log = |event: String| seen.lock().unwrap().push(event);
    let target = request.split(' ').nth(1).unwrap_or("").to_string();
    if let Some(vm) = target.strip_prefix(VMS) {
        // `port-forward` looks the VM up first.
        return match vm {
            "ghost" => status(s, 404, "virtualmachines.kubevmm.io \"ghost\" not found").await,
            _ => status(s, 403, "no matter").await,
        };
    }
    let Some(rest) = target.strip_prefix(GROUP) else {
        return status(s, 404, "the server could not find the requested resource").await;
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let parts: Vec<&str> = path.split('/').collect();
    let [ns, "virtualmachines", name, sub] = parts[..] else {
        return status(s, 404, "the server could not find the requested resource").await;
    };
    if ns == "nogroup" {
        return status(s, 404, "the server could not find the requested resource").await;
    }
    if name == "stopped" {
        let message = format!("VirtualMachine {name} is not running (status Stopped)");
        return status(s, 409, &message).await;
    }
    if sub == "logs" {
        log(format!("logs {query}"));
        let body = "boot line 1\nboot line 2\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        let mut s = s;
        let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
        return;
    }
    assert_eq!(header("upgrade"), "websocket");
    assert_eq!(header("sec-websocket-protocol"), "plain.kubevmm.io");
    let mut s = s;
    let accept = derive_accept_key(header("sec-websocket-key").as_bytes());
    s.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: plain.kubevmm.io\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    serve_ws(s, sub, name, query, &log).await;
}

/// The stand-in console (`web` answers in capitals, later; `quiet` never
/// does) and guest port (an echo).
async fn serve_ws(s: TcpStream, sub: &str, name: &str, query: &str, log: &(dyn Fn(String) + Sync)) {
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
    if sub == "portforward" {
        log(format!("portforward {name} {query}"));
    }
    ws.send(Message::Ping(b"heartbeat".to_vec().into()))
        .await
        .unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Pong(_) => log(format!("{sub} {name} pong")),
            Message::Close(frame) => {
                let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                log(format!("{sub} {name} closed: {reason}"));
            }
            Message::Binary(b) if sub == "portforward" => {
                ws.send(Message::Binary(b)).await.unwrap();
            }
            Message::Binary(b) => {
                log(format!("{sub} {name} got {:?}", text(&b)));
                if name == "quiet" {
                    continue;
                }
                // The guest answers later than the input ends.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let reply = text(&b).to_uppercase();
                ws.send(Message::binary(reply.into_bytes())).await.unwrap();
                if text(&b).contains("quit") {
                    let frame = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "VirtualMachine web stopped".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn console_without_a_terminal_shows_the_reply_after_the_input_ends() {
    let fake = Fake::start("console-pipe").await;
    let out = fake.run(&["console", "web"], b"hello, quit\n").await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "HELLO, QUIT\n");
    assert_eq!(
        stderr,
        "Connected to web (escape character is ^])\n\
         Console of web closed: VirtualMachine web stopped\n"
    );
    let seen = fake.seen();
    assert!(seen.contains(&"console web pong".to_string()), "{seen:?}");
    assert!(
        seen.contains(&"console web got \"hello, quit\\n\"".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn console_detaches_at_the_end_of_input_when_asked() {
    let fake = Fake::start("console-eof").await;
    // Without a terminal ^] is a byte like any other.
    let out = fake
        .run(&["console", "quiet", "--detach-on-eof"], b"a\x1db")
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = fake.seen();
    assert!(
        seen.contains(&"console quiet got \"a\\u{1d}b\"".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"console quiet closed: end of input".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn console_at_a_terminal_is_raw_and_restored_and_detaches_at_the_escape() {
    if std::process::Command::new("script")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("note: no script (util-linux) on PATH; the terminal was not tried");
        return;
    }
    let fake = Fake::start("console-tty").await;
    // `script` gives the command a terminal; stty -g before and after
    // shows the settings are restored.
    let inner = format!(
        "stty -g; {BIN} --kubeconfig {} console quiet; echo rc=$?; stty -g",
        fake.kubeconfig.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(sleep 2; printf 'ls\\r\\035'; sleep 2) | script -qec '{inner}' /dev/null"
        ))
        .output()
        .await
        .unwrap();
    let all = text(&out.stdout);
    assert!(
        all.contains("Connected to quiet (escape character is ^])"),
        "{all}"
    );
    assert!(all.contains("Detached from quiet."), "{all}");
    assert!(all.contains("rc=0"), "{all}");
    let settings: Vec<&str> = all
        .lines()
        .map(str::trim)
        .filter(|l| l.len() > 20 && l.split(':').count() > 10)
        .collect();
    assert_eq!(settings.len(), 2, "{all}");
    assert_eq!(settings[0], settings[1], "the terminal was not restored");
    let seen = fake.seen();
    // Raw mode: "ls\r" arrives as typed, not as a cooked line ending in \n.
    assert!(
        seen.contains(&"console quiet got \"ls\\r\"".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"console quiet closed: detached".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn errors_are_the_servers_words() {
    let fake = Fake::start("errors").await;
    let out = fake.run(&["console", "stopped"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: VirtualMachine stopped is not running (status Stopped)\n"
    );
    let out = fake.run(&["logs", "stopped"], b"").await;
    assert_eq!(
        text(&out.stderr),
        "error: VirtualMachine stopped is not running (status Stopped)\n"
    );
    let out = fake.run(&["-n", "nogroup", "console", "web"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "error: the subresource API subresources.kubevmm.io/v1alpha1 is not available"
        ),
        "{stderr}"
    );
    let out = fake.run(&["port-forward", "ghost", "8080:80"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: VirtualMachine ghost not found in namespace dev (`kubectl vm list -A` lists them all)\n"
    );
    let out = fake.run(&["port-forward", "web", "80:http"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("error: PORTS \"80:http\""));
}

#[tokio::test]
async fn logs_stream_to_stdout() {
    let fake = Fake::start("logs").await;
    let out = fake.run(&["logs", "web", "--tail", "5"], b"").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "boot line 1\nboot line 2\n");
    let out = fake.run(&["logs", "-f", "web"], b"").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fake.seen(),
        vec!["logs tailLines=5&follow=false", "logs follow=true"]
    );
}

#[tokio::test]
async fn port_forward_stdio_relays_until_the_input_ends() {
    let fake = Fake::start("pf-stdio").await;
    let input: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let out = fake
        .run(&["port-forward", "--stdio", "web", "22"], &input)
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        out.stdout == input,
        "{} bytes back of {}",
        out.stdout.len(),
        input.len()
    );
    assert!(fake.seen().contains(&"portforward web port=22".to_string()));
}

#[tokio::test]
async fn port_forward_listens_and_serves_many_connections_at_once() {
    let fake = Fake::start("pf-listen").await;
    let mut child = fake
        .command(&["port-forward", "web", ":2222"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let port: u16 = first
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.strip_suffix(" -> 2222"))
        .unwrap_or_else(|| panic!("{first}"))
        .parse()
        .unwrap();
    let conns = (0..5).map(|i| async move {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let data = format!("connection {i} ").repeat(1000).into_bytes();
        c.write_all(&data).await.unwrap();
        let mut back = vec![0; data.len()];
        c.read_exact(&mut back).await.unwrap();
        assert!(back == data, "connection {i}");
    });
    tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(conns))
        .await
        .unwrap();
    let pid = child.id().unwrap().to_string();
    // The shell's kill: no procps needed.
    Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let opened = fake
        .seen()
        .iter()
        .filter(|e| *e == "portforward web port=2222")
        .count();
    assert_eq!(opened, 5);
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn ssh_runs_openssh_with_this_binary_as_proxy_command() {
    let fake = Fake::start("ssh").await;
    // An `ssh` that records its arguments and, like OpenSSH, runs the
    // ProxyCommand through the shell with %p expanded.
    let bin = fake.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let args_file = fake.dir.join("args");
    write_script(
        &bin.join("ssh"),
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n\
             pc=$(printf '%s' \"$2\" | sed -e 's/^ProxyCommand=//' -e 's/%p/22/' -e 's/%%/%/g')\n\
             echo through the proxy | sh -c \"exec $pc\"\nexit 42\n",
            args_file.display()
        ),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = fake
        .command(&["ssh", "-p", "22", "root@web", "uname", "-a"])
        .env("PATH", path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through the proxy\n");
    let args = std::fs::read_to_string(&args_file).unwrap();
    let expected = format!(
        "-o\nProxyCommand={BIN} --kubeconfig {} -n dev port-forward --stdio web %p\n\
         -o\nHostKeyAlias=vm/dev/web\n-p\n22\nroot@web.dev.kubevmm\nuname\n-a\n",
        fake.kubeconfig.display()
    );
    assert_eq!(args, expected);
    assert!(fake.seen().contains(&"portforward web port=22".to_string()));
}

#[tokio::test]
async fn ssh_without_openssh_says_what_to_install() {
    let fake = Fake::start("no-ssh").await;
    let out = fake
        .command(&["scp", "web:/etc/hostname", "."])
        .env("PATH", fake.dir.join("empty"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: cannot run scp: scp is not on PATH; install"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn the_real_openssh_runs_the_proxy_command() {
    if std::process::Command::new("ssh")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("note: no ssh on PATH; the real OpenSSH was not tried");
        return;
    }
    let fake = Fake::start("real-ssh").await;
    // The stand-in guest port echoes: ssh reads its own banner back as the
    // server's (which proves bytes flowed both ways through the proxy),
    // then fails the key exchange.
    let mut cmd = fake.command(&[
        "ssh",
        "-v",
        "-o",
        "BatchMode=yes",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-F",
        "/dev/null",
        "root@web",
        "true",
    ]);
    let mut child = cmd.spawn().unwrap();
    // It would wait for ever in the key exchange: read up to the host key alias.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    let banner = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
            if line.contains("using hostkeyalias") {
                return true;
            }
        }
        false
    })
    .await;
    child.kill().await.unwrap();
    assert_eq!(banner, Ok(true), "{stderr}");
    assert!(
        stderr.contains(&format!("Executing proxy command: exec {BIN} --kubeconfig")),
        "{stderr}"
    );
    assert!(
        stderr.contains("port-forward --stdio web 22\n"),
        "%p is not 22: {stderr}"
    );
    assert!(
        stderr.contains("using hostkeyalias: vm/dev/web"),
        "{stderr}"
    );
    assert!(fake.seen().contains(&"portforward web port=22".to_string()));
}
