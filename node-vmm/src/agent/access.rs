//! node-vmm's access server: the console, logs, port-forward streams and
//! VMM counters (`kubectl vm top`) of this node's VMs, for the operator only (mutual TLS; the client must hold
//! a certificate of the access CA). The protocol is
//! `kubevmm_access::node_api`; the subresource API in the operator relays
//! users' requests here after authorizing them. docs/access.md.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kubevmm_access::node_api::{NodeRequest, Stream, UPGRADE};
use kubevmm_access::tls::{Files, TlsError};
use kubevmm_vmm::ring::{Chunk, RingError, RingReader};

use super::ctx::Ctx;

/// How often a followed log looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// The most a log read takes at once.
const READ_STEP: usize = 256 * 1024;
/// How long dialling a guest port may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the access server listens.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// The listening address.
    pub listen: SocketAddr,
    /// `address:port` written into `HypervisorNode.status.accessEndpoint`.
    pub advertise: String,
    /// Serving certificate, key, and the CA of the operator's client certificate.
    pub tls: Files,
}

/// Why the access server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Certificates.
    #[error("access server TLS: {0}")]
    Tls(#[from] TlsError),
    /// The port.
    #[error("access server: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No address to advertise.
    #[error(
        "access server: --access-listen {0} is a wildcard and this host has no non-loopback IPv4 \
         address to advertise: give --access-address"
    )]
    NoAddress(SocketAddr),
}

/// The endpoint to advertise: `address` when given, else the listening IP
/// when it is a specific one, else the first of `host_ips` that is not
/// loopback. Pure.
pub fn advertised(
    listen: SocketAddr,
    address: Option<&str>,
    host_ips: &[IpAddr],
) -> Result<String, AccessError> {
    let port = listen.port();
    let host = match address {
        Some(a) if !a.is_empty() => a.to_string(),
        _ if !listen.ip().is_unspecified() => listen.ip().to_string(),
        _ => host_ips
            .iter()
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
            .ok_or(AccessError::NoAddress(listen))?
            .to_string(),
    };
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// This host's addresses (for [`advertised`]).
pub fn host_ips() -> Vec<IpAddr> {
    // The kernel's table of IPv4 routes is enough: a local route per address.
    let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let t = line.trim_start_matches([' ', '|', '-', '+', '`']);
        if let Ok(ip) = t.trim().parse::<IpAddr>() {
            last = Some(ip);
        } else if t.contains("/32 host LOCAL") {
            if let Some(ip) = last.filter(|ip| !out.contains(ip)) {
                out.push(ip);
            }
        }
    }
    out
}

type Body = BoxBody<Bytes, Infallible>;

/// Starts the server; the future serves until the process ends.
pub async fn serve(
    settings: &AccessSettings,
    ctx: Arc<Ctx>,
) -> Result<impl std::future::Future<Output = ()>, AccessError> {
    let tls = settings.tls.server()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| AccessError::Bind {
            addr: settings.listen,
            source,
        })?;
    tracing::info!(listen = %settings.listen, advertise = %settings.advertise, "access server (console, logs, port-forward) listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "access server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                // Without the operator's certificate the handshake fails here.
                let stream = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "access server: TLS refused");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(%peer, error = %e, "access connection ended");
                }
            });
        }
    })
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn error(code: u16, message: &str) -> Response<Body> {
    let mut r = Response::new(full(serde_json::json!({ "message": message }).to_string()));
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(ctx: &Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    if req.method() != http::Method::GET {
        return error(405, "only GET");
    }
    let request = match NodeRequest::parse(&target) {
        Ok(r) => r,
        Err(e) => return error(400, &e.to_string()),
    };
    let dir = ctx.dir(&request.uid);
    if !dir.0.is_dir() {
        return error(
            404,
            &format!(
                "VM {} has no state on node {}",
                request.uid, ctx.cfg.node_name
            ),
        );
    }
    match request.stream {
        Stream::Logs { tail_lines, follow } => logs(dir.console_ring(), tail_lines, follow),
        Stream::Stats => {
            match super::vmm_client::request(&dir.api_socket(), "GET", "/vm/stats").await {
                Ok(stats) => {
                    let mut r = Response::new(full(stats.to_string()));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(_) => error(
                    409,
                    &format!(
                        "the guest of VM {} is not running on node {}",
                        request.uid, ctx.cfg.node_name
                    ),
                ),
            }
        }
        Stream::Console => match tokio::net::UnixStream::connect(dir.console_socket()).await {
            Ok(sock) => upgrade(req, sock),
            Err(_) => error(
                409,
                &format!(
                    "the guest of VM {} is not running on node {}",
                    request.uid, ctx.cfg.node_name
                ),
            ),
        },
        Stream::PortForward { port } => {
            let ip = ctx
                .lock()
                .get(&request.uid)
                .filter(|l| l.proc.is_some())
                .map(|l| {
                    l.interfaces
                        .iter()
                        .find_map(|i| i.ip_address.as_deref()?.parse::<IpAddr>().ok())
                });
            let ip =
                match ip {
                    None => {
                        return error(
                            409,
                            &format!(
                                "the guest of VM {} is not running on node {}",
                                request.uid, ctx.cfg.node_name
                            ),
                        )
                    }
                    Some(None) => return error(
                        409,
                        "the guest has no IP address yet (no DHCP lease on a masquerade network): \
                         port-forward needs one",
                    ),
                    Some(Some(ip)) => ip,
                };
            let addr = SocketAddr::new(ip, port);
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    upgrade(req, tcp)
                }
                Ok(Err(e)) => error(502, &format!("guest port {addr}: {e}")),
                Err(_) => error(
                    502,
                    &format!(
                        "guest port {addr}: no answer within {}s",
                        DIAL_TIMEOUT.as_secs()
                    ),
                ),
            }
        }
    }
}

/// Answers `101` and relays between the upgraded connection and `stream`
/// until either side ends; nothing is left behind.
fn upgrade<S>(req: Request<Incoming>, mut stream: S) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut io = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut io, &mut stream).await;
            }
            Err(e) => tracing::debug!(error = %e, "access: upgrade failed"),
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    r.headers_mut().insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static(UPGRADE),
    );
    r
}

/// Where a log response is in the ring.
struct LogCursor {
    reader: RingReader,
    path: std::path::PathBuf,
    next: u64,
    pending: Option<Chunk>,
    keep_following: bool,
    done: bool,
}

/// The console ring as a response: its last `tail` lines (all it holds
/// without), then with `follow` what the guest writes next, until the
/// client goes away or the VM's state does.
fn logs(path: std::path::PathBuf, tail: Option<u64>, follow: bool) -> Response<Body> {
    let reader = match RingReader::open(&path) {
        Ok(r) => r,
        Err(RingError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return error(404, "the VM has no console output on this node yet");
        }
        Err(e) => return error(500, &e.to_string()),
    };
    let first = match tail {
        Some(n) => reader.tail_lines(usize::try_from(n).unwrap_or(usize::MAX)),
        None => reader
            .read_from(0, READ_STEP)
            .or_else(|_| reader.tail_lines(usize::MAX)),
    };
    let first = match first {
        Ok(c) => c,
        Err(e) => return error(500, &e.to_string()),
    };
    let state = LogCursor {
        reader,
        path,
        next: first.next,
        pending: Some(first),
        keep_following: follow,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(c) = s.pending.take() {
                if !c.bytes.is_empty() {
                    return Some((Ok(Frame::data(Bytes::from(c.bytes))), s));
                }
            }
            if s.done {
                return None;
            }
            match s.reader.read_from(s.next, READ_STEP) {
                Ok(c) if !c.bytes.is_empty() || c.next != s.next => {
                    s.next = c.next;
                    s.pending = Some(c);
                }
                Ok(_) if !s.keep_following => s.done = true,
                Ok(_) => {
                    if !s.path.exists() {
                        return None;
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                // A ring made anew (the VMM started again with a fresh one):
                // read it from its start.
                Err(RingError::Recreated) => match RingReader::open(&s.path) {
                    Ok(r) => {
                        s.reader = r;
                        s.next = 0;
                    }
                    Err(_) => return None,
                },
                Err(_) => return None,
            }
        }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_endpoint_is_an_address_the_operator_can_dial() {
        let any: SocketAddr = "0.0.0.0:10260".parse().unwrap();
        let one: SocketAddr = "192.0.2.2:10260".parse().unwrap();
        let ips: Vec<IpAddr> = ["127.0.0.1", "192.0.2.2", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            advertised(any, Some("198.51.100.7"), &ips).unwrap(),
            "198.51.100.7:10260"
        );
        assert_eq!(advertised(one, None, &[]).unwrap(), "192.0.2.2:10260");
        assert_eq!(advertised(any, None, &ips).unwrap(), "192.0.2.2:10260");
        assert_eq!(
            advertised(any, Some("fd00::2"), &ips).unwrap(),
            "[fd00::2]:10260"
        );
        let loopback_only = [IpAddr::from([127, 0, 0, 1])];
        assert!(matches!(
            advertised(any, None, &loopback_only),
            Err(AccessError::NoAddress(_))
        ));
    }
}
