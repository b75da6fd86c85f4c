//! The side effects of the subresource API: asking node-vmm for a stream
//! over mutual TLS (HTTP/1.1, upgrade for console and port-forward), and
//! relaying between the client's WebSocket and the node's raw stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use kubevmm_access::node_api::{NodeRequest, SERVER_NAME, UPGRADE};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::routes::Reject;

/// How long dialling a node may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings to the client this often keep an idle console connected through
/// proxies that drop silent connections.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// The WebSocket framing a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `v4.channel.k8s.io`: a channel byte first (0 in, 1 out, 3 error).
    ChannelV4,
    /// `v5.channel.k8s.io`: as v4, plus 255 = close a channel.
    ChannelV5,
    /// `plain.kubevmm.io`: raw bytes, no channel byte.
    Plain,
}

impl Framing {
    /// Picks from a `Sec-WebSocket-Protocol` offer, best first.
    pub fn choose(offer: &str) -> Option<Self> {
        let offered: Vec<&str> = offer.split(',').map(str::trim).collect();
        [
            ("v5.channel.k8s.io", Self::ChannelV5),
            ("v4.channel.k8s.io", Self::ChannelV4),
            ("plain.kubevmm.io", Self::Plain),
        ]
        .into_iter()
        .find(|(name, _)| offered.contains(name))
        .map(|(_, f)| f)
    }

    /// The protocol name answered.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChannelV4 => "v4.channel.k8s.io",
            Self::ChannelV5 => "v5.channel.k8s.io",
            Self::Plain => "plain.kubevmm.io",
        }
    }
}

/// What a client's WebSocket message means for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Bytes for the guest.
    Data(Vec<u8>),
    /// The client will send no more (v5 close of stdin).
    EndOfInput,
    /// Nothing for the guest (a resize, an unknown channel).
    Nothing,
}

/// Decodes one binary message of the client.
pub fn inbound(framing: Framing, msg: &[u8]) -> Inbound {
    match (framing, msg) {
        (Framing::Plain, data) | (_, [0, data @ ..]) => Inbound::Data(data.to_vec()),
        (Framing::ChannelV5, [255, 0, ..]) => Inbound::EndOfInput,
        _ => Inbound::Nothing,
    }
}

/// Encodes guest output for the client.
pub fn outbound(framing: Framing, data: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Plain => data.to_vec(),
        Framing::ChannelV4 | Framing::ChannelV5 => {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(1);
            v.extend_from_slice(data);
            v
        }
    }
}

/// The answer of a node: a raw stream after an upgrade, or a body.
pub enum NodeAnswer {
    /// Console or port-forward.
    Stream(TokioIo<Upgraded>),
    /// Logs.
    Body(Incoming),
}

/// Asks the node-vmm at `endpoint` for `req`.
pub async fn ask_node(
    tls: &Arc<rustls::ClientConfig>,
    endpoint: &str,
    node: &str,
    req: &NodeRequest,
) -> Result<NodeAnswer, Reject> {
    let unreachable = |why: String| {
        Reject::new(
            503,
            "ServiceUnavailable",
            format!("node-vmm of node {node} at {endpoint} cannot be reached: {why}"),
        )
    };
    let server_name = ServerName::try_from(SERVER_NAME)
        .map_err(|e| unreachable(format!("bad server name: {e}")))?;
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(endpoint))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "node connection ended");
        }
    });
    let mut builder = http::Request::get(req.target()).header(http::header::HOST, endpoint);
    if req.stream.upgrades() {
        builder = builder
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, UPGRADE);
    }
    let request = builder
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    if status == http::StatusCode::SWITCHING_PROTOCOLS && req.stream.upgrades() {
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| unreachable(format!("upgrade: {e}")))?;
        return Ok(NodeAnswer::Stream(TokioIo::new(upgraded)));
    }
    if status.is_success() && !req.stream.upgrades() {
        return Ok(NodeAnswer::Body(response.into_body()));
    }
    // The node's error, in its words.
    let body = response
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let (code, reason) = match status.as_u16() {
        404 => (404, "NotFound"),
        409 => (409, "Conflict"),
        400 => (400, "BadRequest"),
        c if c >= 500 => (503, "ServiceUnavailable"),
        _ => (502, "BadGateway"),
    };
    Err(Reject::new(code, reason, format!("node {node}: {message}")))
}

/// Relays between the client's WebSocket and the node's stream until either
/// ends; pings the client every [`KEEPALIVE`]. Leaves nothing behind: both
/// connections are closed when this returns.
pub async fn bridge(
    ws: WebSocketStream<TokioIo<Upgraded>>,
    node: TokioIo<Upgraded>,
    framing: Framing,
) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut node_rx, mut node_tx) = tokio::io::split(node);
    let to_node = async {
        while let Some(msg) = ws_rx.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => inbound(framing, &b),
                Ok(Message::Text(t)) => inbound(framing, t.as_bytes()),
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => Inbound::Nothing,
            };
            match data {
                Inbound::Data(d) if !d.is_empty() && node_tx.write_all(&d).await.is_err() => break,
                Inbound::EndOfInput => {
                    let _ = node_tx.shutdown().await;
                }
                _ => {}
            }
        }
    };
    let to_client = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut ping = tokio::time::interval(KEEPALIVE);
        ping.tick().await;
        loop {
            tokio::select! {
                read = node_rx.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let msg = Message::Binary(outbound(framing, &buf[..n]).into());
                        if ws_tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                },
                _ = ping.tick() => {
                    if ws_tx.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "the stream ended".into(),
        };
        let _ = ws_tx.send(Message::Close(Some(close))).await;
    };
    tokio::select! {
        () = to_node => {}
        () = to_client => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_the_best_offered() {
        let cases = [
            (
                "v5.channel.k8s.io, v4.channel.k8s.io",
                Some(Framing::ChannelV5),
            ),
            ("v4.channel.k8s.io", Some(Framing::ChannelV4)),
            ("plain.kubevmm.io", Some(Framing::Plain)),
            ("base64.channel.k8s.io", None),
            ("", None),
        ];
        for (offer, want) in cases {
            assert_eq!(Framing::choose(offer), want, "{offer}");
        }
    }

    #[test]
    fn channel_bytes_are_stripped_in_and_added_out() {
        use Framing::{ChannelV4, ChannelV5, Plain};
        assert_eq!(
            inbound(ChannelV4, &[0, b'h', b'i']),
            Inbound::Data(b"hi".to_vec())
        );
        assert_eq!(inbound(ChannelV4, &[4, b'{']), Inbound::Nothing);
        assert_eq!(inbound(ChannelV4, &[]), Inbound::Nothing);
        assert_eq!(inbound(ChannelV5, &[255, 0]), Inbound::EndOfInput);
        assert_eq!(inbound(ChannelV4, &[255, 0]), Inbound::Nothing);
        assert_eq!(inbound(Plain, &[0, 1]), Inbound::Data(vec![0, 1]));
        assert_eq!(outbound(ChannelV5, b"ok"), vec![1, b'o', b'k']);
        assert_eq!(outbound(Plain, b"ok"), b"ok".to_vec());
    }
}
