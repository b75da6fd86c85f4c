//! The executors of the streaming verbs: `console`, `logs`, `port-forward`
//! (listening, or `--stdio`), `ssh` and `scp`. The decisions are in pure
//! modules (`console`, `portspec`, `sshargs`, `subresource`); this module
//! moves bytes between the terminal, sockets and the API server.
//!
//! stdin is read by a thread of its own, never by tokio's blocking pool: a
//! read that waits for a key must not keep the process from exiting.

use std::io::{IsTerminal as _, Read as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{AsyncBufReadExt as _, SinkExt as _, StreamExt as _};
use kube::api::Api;
use kube::Client;
use kubevmm_crds::VirtualMachine;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::connect::{connect, explain, Attempt, ConnectError, Target};
use crate::console::{InputMode, OnEof};
use crate::portspec::{self, PortSpecError};
use crate::sshargs::{self, Proxy, SshArgsError, Tool};
use crate::subresource::{self, open_websocket, Sub, SubresourceError, Ws};
use crate::terminal::{RawMode, TerminalError};

/// How long a close waits for the server's close and the last bytes.
const DRAIN: Duration = Duration::from_secs(3);

/// Why a streaming verb failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The cluster cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The stream could not be opened (the server's message).
    #[error(transparent)]
    Subresource(#[from] SubresourceError),
    /// `port-forward`'s arguments.
    #[error(transparent)]
    Ports(#[from] PortSpecError),
    /// `ssh`/`scp`'s arguments.
    #[error(transparent)]
    SshArgs(#[from] SshArgsError),
    /// Raw mode.
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    /// The server ended the stream for a reason it gave.
    #[error("{0}")]
    Closed(String),
    /// The WebSocket broke.
    #[error("the connection to the API server broke: {0}")]
    Broken(String),
    /// Local I/O.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// OpenSSH cannot be run.
    #[error("cannot run {program}: {why}")]
    Exec {
        /// ssh or scp.
        program: &'static str,
        /// Why.
        why: String,
    },
}

type Result<T> = std::result::Result<T, StreamError>;

fn io(what: &str) -> impl FnOnce(std::io::Error) -> StreamError + '_ {
    move |source| StreamError::Io {
        what: what.into(),
        source,
    }
}

fn broken(e: impl std::fmt::Display) -> StreamError {
    StreamError::Broken(e.to_string())
}

/// The signals that end a stream as the user would: SIGINT (`^C` without
/// a terminal in raw mode), SIGTERM (`timeout`), SIGHUP (a closed terminal).
struct Signals([Signal; 3]);

impl Signals {
    fn new() -> Result<Self> {
        let one = |kind| signal(kind).map_err(io("handle signals"));
        Ok(Signals([
            one(SignalKind::interrupt())?,
            one(SignalKind::terminate())?,
            one(SignalKind::hangup())?,
        ]))
    }

    async fn recv(&mut self) {
        let [a, b, c] = &mut self.0;
        tokio::select! {
            _ = a.recv() => {}
            _ = b.recv() => {}
            _ = c.recv() => {}
        }
    }
}

/// stdin as chunks, read by a thread of its own.
fn stdin_chunks() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(4);
    let reader = move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(reader)
    {
        // The sender went with the closure: the receiver sees an end of input.
        eprintln!("error: cannot read stdin: {e}");
    }
    rx
}

/// [`stdin_chunks`] as an [`AsyncRead`].
struct StdinReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl StdinReader {
    fn new() -> Self {
        StdinReader {
            rx: stdin_chunks(),
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl AsyncRead for StdinReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at == this.chunk.len() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    this.chunk = chunk;
                    this.at = 0;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                // End of input: a read of nothing.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.chunk.len() - this.at);
        buf.put_slice(&this.chunk[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// One message from the server, as what to do with it.
enum Incoming {
    /// Bytes for the local end.
    Data(Bytes),
    /// A ping or pong (tungstenite answers pings while we read).
    Control,
    /// The server closed: an orderly end (with its reason), or a failure.
    End(std::result::Result<Option<String>, String>),
}

fn incoming(
    msg: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Incoming> {
    match msg {
        None => Err(broken("it ended without a close frame")),
        Some(Err(e)) => Err(broken(e)),
        Some(Ok(m)) => Ok(match m {
            Message::Binary(b) => Incoming::Data(b),
            Message::Text(t) => Incoming::Data(Bytes::copy_from_slice(t.as_bytes())),
            Message::Close(frame) => Incoming::End(subresource::close_outcome(frame.as_ref())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Incoming::Control,
        }),
    }
}

/// Closes our end with `reason`, then reads until the server's close (or
/// [`DRAIN`]); with `keep`, bytes still arriving go to `out`.
async fn close<W: AsyncWrite + Unpin>(ws: &mut Ws, reason: &str, out: &mut W, keep: bool) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: reason.into(),
    };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let drain = async {
        while let Some(Ok(msg)) = ws.next().await {
            if let (true, Message::Binary(b)) = (keep, &msg) {
                if out.write_all(b).await.is_err() {
                    return;
                }
            }
        }
        let _ = out.flush().await;
    };
    let _ = tokio::time::timeout(DRAIN, drain).await;
}

/// How long output must pause after the end of input before detaching.
const QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// Copies console output to `out` until none came for [`QUIET`] (at most
/// [`DRAIN`]): the server drops what is in flight once the client closes.
async fn settle<W: AsyncWrite + Unpin>(ws: &mut Ws, out: &mut W) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(QUIET, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if out.write_all(&b).await.is_err() {
                    return;
                }
                let _ = out.flush().await;
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) | Err(_) => return,
        }
    }
}

/// Sends the reply to the server's close (tungstenite queued it while
/// reading), best effort.
async fn answer_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(DRAIN, ws.flush()).await;
}

/// How `console` ended without an error.
enum Ended {
    /// The user detached (`^]`, end of input, a signal).
    Detached,
    /// The server closed the console, perhaps saying why.
    Closed(Option<String>),
}

/// `console NAME`: attach to the serial console.
pub async fn console(client: &Client, ns: &str, name: &str, detach_on_eof: bool) -> Result<()> {
    let uri = subresource::uri(ns, name, Sub::Console, &[])?;
    let mut ws = open_websocket(client, &uri, Sub::Console).await?;
    let mode = InputMode {
        tty: std::io::stdin().is_terminal(),
        detach_on_eof,
    };
    let mut signals = Signals::new()?;
    eprintln!("Connected to {name} (escape character is ^])");
    let raw = if mode.tty {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let ended = attach(&mut ws, mode, &mut signals).await;
    drop(raw);
    if mode.tty {
        // The guest's output may have left the cursor anywhere.
        eprintln!();
    }
    match ended? {
        Ended::Detached => {
            if mode.tty {
                eprintln!("Detached from {name}.");
            }
        }
        Ended::Closed(reason) => match reason {
            Some(r) => eprintln!("Console of {name} closed: {r}"),
            None => eprintln!("Console of {name} closed."),
        },
    }
    Ok(())
}

async fn attach(ws: &mut Ws, mode: InputMode, signals: &mut Signals) -> Result<Ended> {
    let mut input = stdin_chunks();
    let mut reading = true;
    let mut out = tokio::io::stdout();
    loop {
        tokio::select! {
            msg = ws.next() => match incoming(msg)? {
                Incoming::Data(b) => {
                    out.write_all(&b).await.map_err(io("write the console to stdout"))?;
                    out.flush().await.map_err(io("write the console to stdout"))?;
                }
                Incoming::Control => {}
                Incoming::End(outcome) => {
                    answer_close(ws).await;
                    return outcome.map(Ended::Closed).map_err(StreamError::Closed);
                }
            },
            chunk = input.recv(), if reading => match chunk {
                Some(Ok(bytes)) => {
                    let scanned = mode.scan(&bytes);
                    if !scanned.send.is_empty() {
                        ws.send(Message::binary(scanned.send.to_vec()))
                            .await
                            .map_err(broken)?;
                    }
                    if scanned.detach {
                        close(ws, "detached", &mut out, false).await;
                        return Ok(Ended::Detached);
                    }
                }
                Some(Err(e)) => return Err(io("read stdin")(e)),
                None => match mode.on_eof() {
                    OnEof::Detach => {
                        // The answer to the last input may be on its way:
                        // take what comes until the console is quiet.
                        settle(ws, &mut out).await;
                        close(ws, "end of input", &mut out, true).await;
                        return Ok(Ended::Detached);
                    }
                    OnEof::KeepReceiving => reading = false,
                },
            },
            () = signals.recv() => {
                close(ws, "detached", &mut out, false).await;
                return Ok(Ended::Detached);
            }
        }
    }
}

/// `logs NAME [-f] [--tail N]`: the serial ring buffer to stdout.
pub async fn logs(
    client: &Client,
    ns: &str,
    name: &str,
    follow: bool,
    tail: Option<u32>,
) -> Result<()> {
    let mut query = Vec::new();
    if let Some(n) = tail {
        query.push(("tailLines", n.to_string()));
    }
    query.push(("follow", follow.to_string()));
    let uri = subresource::uri(ns, name, Sub::Logs, &query)?;
    let mut body = subresource::open_stream(client, &uri).await?;
    let mut out = tokio::io::stdout();
    loop {
        let chunk = body
            .fill_buf()
            .await
            .map_err(|e| broken(format!("reading the log stream: {e}")))?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        let written = match out.write_all(chunk).await {
            Ok(()) => out.flush().await,
            Err(e) => Err(e),
        };
        match written {
            // `kubectl vm logs x | head`: the reader has all it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(io("write the log to stdout"))?,
        }
        body.consume_unpin(n);
    }
    Ok(())
}

/// Relays `input` to the guest and the guest to `output` until either
/// end closes. The protocol has no half-close: the end of `input` closes
/// the stream, after which the guest's last bytes still reach `output`.
async fn relay<R, W>(ws: &mut Ws, mut input: R, mut output: W) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            read = input.read(&mut buf) => match read {
                Ok(0) => {
                    close(ws, "the local end closed", &mut output, true).await;
                    let _ = output.shutdown().await;
                    return Ok(());
                }
                Ok(n) => ws.send(Message::binary(buf[..n].to_vec())).await.map_err(broken)?,
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) => {
                    close(ws, "the local end closed", &mut output, false).await;
                    return Ok(());
                }
                Err(e) => {
                    close(ws, "the local end failed", &mut output, false).await;
                    return Err(io("read the local end")(e));
                }
            },
            msg = ws.next() => match incoming(msg)? {
                Incoming::Data(b) => {
                    let written = match output.write_all(&b).await {
                        Ok(()) => output.flush().await,
                        Err(e) => Err(e),
                    };
                    if written.is_err() {
                        // The local end went away: end the stream quietly.
                        close(ws, "the local end closed", &mut output, false).await;
                        return Ok(());
                    }
                }
                Incoming::Control => {}
                Incoming::End(outcome) => {
                    answer_close(ws).await;
                    let _ = output.shutdown().await;
                    return outcome.map(|_| ()).map_err(StreamError::Closed);
                }
            },
        }
    }
}

/// Fails early, before listening, for a VM that does not exist (other
/// failures, such as no right to read VMs, are left to the stream).
async fn check_vm(client: &Client, ns: &str, name: &str) -> Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    match api.get(name).await {
        Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 404) => {
            let attempt = Attempt {
                verb: "get",
                resource: "virtualmachines",
                name: Some(name),
                namespace: Some(ns),
            };
            Err(SubresourceError::Refused(explain(&e, attempt)).into())
        }
        _ => Ok(()),
    }
}

/// `port-forward [--stdio] NAME [LOCAL:]REMOTE [--address A]`.
pub async fn port_forward(
    client: &Client,
    ns: &str,
    name: &str,
    ports: &str,
    stdio: bool,
    address: Option<&str>,
) -> Result<()> {
    if stdio {
        let remote = portspec::parse_stdio(ports)?;
        let uri = subresource::uri(ns, name, Sub::PortForward, &[("port", remote.to_string())])?;
        let mut ws = open_websocket(client, &uri, Sub::PortForward).await?;
        return relay(&mut ws, StdinReader::new(), tokio::io::stdout()).await;
    }
    let ports = portspec::parse(ports)?;
    let ip = portspec::address(address.unwrap_or("127.0.0.1"))?;
    let uri = subresource::uri(
        ns,
        name,
        Sub::PortForward,
        &[("port", ports.remote.to_string())],
    )?;
    check_vm(client, ns, name).await?;
    let wanted = SocketAddr::new(ip, ports.local);
    let listener = TcpListener::bind(wanted)
        .await
        .map_err(|source| StreamError::Io {
            what: format!("listen on {wanted} (choose another LOCAL port, or 0 for any free one)"),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(io("read the listening address"))?;
    // stdout is line-buffered: scripts can read this line at once.
    println!("Forwarding from {local} -> {}", ports.remote);
    let mut signals = Signals::new()?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let client = client.clone();
                    let uri = uri.clone();
                    tokio::spawn(async move {
                        if let Err(e) = forward(&client, &uri, tcp).await {
                            eprintln!("error: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    eprintln!("error: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            () = signals.recv() => return Ok(()),
        }
    }
}

/// One accepted connection: its own WebSocket to the guest port.
async fn forward(client: &Client, uri: &str, tcp: tokio::net::TcpStream) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut ws = open_websocket(client, uri, Sub::PortForward).await?;
    let (input, output) = tcp.into_split();
    relay(&mut ws, input, output).await
}

/// `ssh`/`scp`: runs OpenSSH in place of this process (its exit code is
/// ours), with `port-forward --stdio` of this executable as ProxyCommand.
/// Returns only if it cannot be run.
pub async fn openssh(tool: Tool, args: &[String], global: &Target) -> Result<()> {
    let parsed = sshargs::parse(tool, args)?;
    let target = Target {
        kubeconfig: parsed
            .kubeconfig
            .clone()
            .map(PathBuf::from)
            .or_else(|| global.kubeconfig.clone()),
        context: parsed.context.clone().or_else(|| global.context.clone()),
        namespace: parsed
            .namespace
            .clone()
            .or_else(|| global.namespace.clone()),
    };
    // The namespace as kubectl would choose it (nothing is sent yet).
    let (_, namespace) = connect(&target).await?;
    let exe = std::env::current_exe().map_err(io("find the path of kubectl-vm"))?;
    let kubeconfig = target
        .kubeconfig
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(io("resolve --kubeconfig"))?;
    let exe = exe.to_string_lossy();
    let kubeconfig = kubeconfig.as_ref().map(|k| k.to_string_lossy());
    let proxy = Proxy {
        exe: &exe,
        kubeconfig: kubeconfig.as_deref(),
        context: target.context.as_deref(),
        namespace: &namespace,
    };
    let argv = sshargs::argv(&parsed, &proxy);
    let program = tool.program();
    let e = std::process::Command::new(program).args(&argv).exec();
    Err(StreamError::Exec {
        program,
        why: if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{program} is not on PATH; install the OpenSSH client \
                 (Debian: apt-get install openssh-client)"
            )
        } else {
            e.to_string()
        },
    })
}
