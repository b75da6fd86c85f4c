//! The subresource API (`subresources.kubevmm.io/v1alpha1`, served by the
//! operator through kube-apiserver, DESIGN.md "Access"): the request paths,
//! the WebSocket upgrade with our subprotocol `plain.kubevmm.io`, the
//! streaming GET of `logs`, and failures in words.
//!
//! The upgrade is made here rather than with kube's `Client::connect`: that
//! one always offers `v5.channel.k8s.io, v4.channel.k8s.io` and refuses any
//! other answer, while our server speaks `plain.kubevmm.io` (binary messages
//! are raw bytes both ways). The request still goes through the kube
//! client's own stack, so TLS, credentials and the kubeconfig are kubectl's.

use futures::AsyncBufRead;
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use kube::Client;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::WebSocketStream;

/// The API group and version of the streaming subresources.
pub const GROUP_VERSION: &str = "subresources.kubevmm.io/v1alpha1";
/// The WebSocket subprotocol: binary messages carry raw bytes both ways.
pub const PROTOCOL: &str = "plain.kubevmm.io";
/// The generic 404 of kube-apiserver for a path nothing serves: here, the
/// API group itself is not registered.
const NOTHING_SERVES_IT: &str = "the server could not find the requested resource";

/// An open console or port-forward stream.
pub type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The streaming subresources of a VirtualMachine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// The serial console, both ways (WebSocket).
    Console,
    /// The serial ring buffer (plain streaming GET).
    Logs,
    /// A TCP stream to a guest port (WebSocket).
    PortForward,
    /// The VMM's counters, JSON (`kubectl vm top`).
    Stats,
}

impl Sub {
    /// The path segment.
    pub fn segment(self) -> &'static str {
        match self {
            Sub::Console => "console",
            Sub::Logs => "logs",
            Sub::PortForward => "portforward",
            Sub::Stats => "stats",
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SubresourceError {
    /// A name that cannot be a VirtualMachine's or a namespace's.
    #[error("{0:?} is not a valid {1} name (lowercase letters, digits, '-' and '.')")]
    InvalidName(String, &'static str),
    /// The API server (or our server behind it) answered with an error,
    /// already put in words.
    #[error("{0}")]
    Refused(String),
    /// The API server could not be reached.
    #[error("cannot reach the API server: {0} (check --kubeconfig and --context)")]
    Transport(String),
    /// The server answered the upgrade, but not as this protocol says.
    #[error(
        "the API server's answer to the {0} upgrade is not a {PROTOCOL} WebSocket ({1}): \
         is the kubevmm operator of the same version as this kubectl-vm?"
    )]
    Handshake(&'static str, String),
}

/// A DNS-1123 subdomain (VirtualMachine names), or with `label` a DNS-1123
/// label (namespaces): what may go into the path unescaped.
pub fn valid_name(s: &str, label: bool) -> bool {
    let max = if label { 63 } else { 253 };
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (c == '.' && !label)
        })
        && edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
}

/// The path and query of a subresource of VM `name` in namespace `ns`.
pub fn uri(
    ns: &str,
    name: &str,
    sub: Sub,
    query: &[(&str, String)],
) -> Result<String, SubresourceError> {
    if !valid_name(ns, true) {
        return Err(SubresourceError::InvalidName(ns.into(), "namespace"));
    }
    if !valid_name(name, false) {
        return Err(SubresourceError::InvalidName(name.into(), "VirtualMachine"));
    }
    let mut uri = format!(
        "/apis/{GROUP_VERSION}/namespaces/{ns}/virtualmachines/{name}/{}",
        sub.segment()
    );
    // Query values are numbers and booleans only: nothing to escape.
    for (i, (k, v)) in query.iter().enumerate() {
        uri.push(if i == 0 { '?' } else { '&' });
        uri.push_str(k);
        uri.push('=');
        uri.push_str(v);
    }
    Ok(uri)
}

/// A failed request in words: the server's `metav1.Status` message as it
/// is, except where the message is kube-apiserver's own and says nothing
/// about kubevmm (the API group not registered, its server down).
pub fn explain(code: u16, message: &str) -> String {
    let message = message.trim();
    let not_served = message == NOTHING_SERVES_IT
        || message.eq_ignore_ascii_case("404 page not found")
        || message.is_empty();
    match code {
        404 if not_served => format!(
            "the subresource API {GROUP_VERSION} is not available on this cluster: \
             console, logs and port-forward need the kubevmm operator installed with its \
             APIService (the chart charts/kubevmm does both; \
             `kubectl get apiservice v1alpha1.subresources.kubevmm.io` shows its state)"
        ),
        503 if message == "service unavailable"
            || message.starts_with("the server is currently unable to handle the request") =>
        {
            format!(
                "{message}: the subresource API {GROUP_VERSION} is registered but its server, \
                 the kubevmm operator, does not answer (`kubectl get apiservice \
                 v1alpha1.subresources.kubevmm.io` and the operator's pods say why)"
            )
        }
        _ if message.is_empty() => format!("the API server answered HTTP {code}"),
        _ => message.to_string(),
    }
}

/// A kube client error in words.
fn from_kube(e: kube::Error) -> SubresourceError {
    match e {
        kube::Error::Api(s) => SubresourceError::Refused(explain(s.code, &s.message)),
        other => SubresourceError::Transport(other.to_string()),
    }
}

/// The `message` of an error body: a `metav1.Status`, else the text itself
/// (a proxy's or a bare mux's answer).
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<kube::core::Status>(body) {
        Ok(s) => s.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// What the end of a stream means: `Ok(note)` for an orderly close (the
/// note is the server's reason, if it gave one), `Err(message)` for one
/// that reports a failure.
pub fn close_outcome(frame: Option<&CloseFrame>) -> Result<Option<String>, String> {
    let Some(frame) = frame else {
        return Ok(None);
    };
    let reason = frame.reason.as_str().trim();
    match frame.code {
        CloseCode::Normal | CloseCode::Away => Ok((!reason.is_empty()).then(|| reason.to_string())),
        code if reason.is_empty() => Err(format!(
            "the server closed the stream with code {}",
            u16::from(code)
        )),
        _ => Err(reason.to_string()),
    }
}

/// Opens the WebSocket of `uri` (from [`uri`]) with our subprotocol.
pub async fn open_websocket(client: &Client, uri: &str, sub: Sub) -> Result<Ws, SubresourceError> {
    let key = generate_key();
    let request = Request::get(uri)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_VERSION, "13")
        .header(SEC_WEBSOCKET_KEY, &key)
        .header(SEC_WEBSOCKET_PROTOCOL, PROTOCOL)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| SubresourceError::Transport(e.to_string()))?;
    let response = client.send(request).await.map_err(from_kube)?;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(from_kube)?;
        return Err(SubresourceError::Refused(explain(
            status.as_u16(),
            &error_message(&body),
        )));
    }
    let bad = |what: String| SubresourceError::Handshake(sub.segment(), what);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(bad(format!(
            "HTTP {status} instead of 101 Switching Protocols"
        )));
    }
    let headers = response.headers();
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if !header(UPGRADE).eq_ignore_ascii_case("websocket") {
        return Err(bad("no Upgrade: websocket".into()));
    }
    if header(SEC_WEBSOCKET_ACCEPT) != derive_accept_key(key.as_bytes()) {
        return Err(bad("a wrong Sec-WebSocket-Accept".into()));
    }
    let protocol = header(SEC_WEBSOCKET_PROTOCOL);
    if protocol != PROTOCOL {
        return Err(bad(format!("subprotocol {protocol:?}")));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| bad(format!("the upgrade failed: {e}")))?;
    Ok(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await)
}

/// Opens the streaming GET of `uri` (from [`uri`]).
pub async fn open_stream(
    client: &Client,
    uri: &str,
) -> Result<impl AsyncBufRead + Unpin + use<>, SubresourceError> {
    let request = Request::get(uri)
        .body(Vec::new())
        .map_err(|e| SubresourceError::Transport(e.to_string()))?;
    client.request_stream(request).await.map_err(from_kube)
}

/// GETs `uri` (from [`uri`]) as JSON.
pub async fn get_json(client: &Client, uri: &str) -> Result<serde_json::Value, SubresourceError> {
    let request = Request::get(uri)
        .body(Vec::new())
        .map_err(|e| SubresourceError::Transport(e.to_string()))?;
    client.request(request).await.map_err(from_kube)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_may_go_into_a_path() {
        for (name, label, ok) in [
            ("web", true, true),
            ("web-1", true, true),
            ("web.dev", false, true),
            ("web.dev", true, false),
            ("0", true, true),
            ("", false, false),
            ("Web", false, false),
            ("-web", false, false),
            ("web-", false, false),
            ("a/b", false, false),
            ("a?b", false, false),
            ("a%2fb", false, false),
            ("..", false, false),
        ] {
            assert_eq!(valid_name(name, label), ok, "{name:?} label={label}");
        }
        assert!(valid_name(&"a".repeat(63), true));
        assert!(!valid_name(&"a".repeat(64), true));
        assert!(valid_name(&"a".repeat(253), false));
        assert!(!valid_name(&"a".repeat(254), false));
    }

    #[test]
    fn paths_and_queries() {
        assert_eq!(
            uri("dev", "web", Sub::Console, &[]).unwrap(),
            "/apis/subresources.kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/web/console"
        );
        assert_eq!(
            uri("dev", "web", Sub::PortForward, &[("port", "22".into())]).unwrap(),
            "/apis/subresources.kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/web/portforward?port=22"
        );
        assert_eq!(
            uri(
                "dev",
                "web",
                Sub::Logs,
                &[("tailLines", "10".into()), ("follow", "true".into())]
            )
            .unwrap(),
            "/apis/subresources.kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/web/logs?tailLines=10&follow=true"
        );
        assert_eq!(
            uri("dev", "../x", Sub::Logs, &[]).unwrap_err().to_string(),
            "\"../x\" is not a valid VirtualMachine name (lowercase letters, digits, '-' and '.')"
        );
        assert!(matches!(
            uri("a.b", "web", Sub::Logs, &[]),
            Err(SubresourceError::InvalidName(_, "namespace"))
        ));
    }

    #[test]
    fn failures_in_words() {
        // Our server's messages are shown as they are.
        let ours = [
            (404, "VirtualMachine web not found in namespace dev"),
            (409, "VirtualMachine web is not running (status Stopped)"),
            (503, "node n1 is lost: the VM's node agent does not answer"),
            (
                403,
                "virtualmachines.subresources.kubevmm.io \"web\" is forbidden: User \"bob\" \
                 cannot get resource \"virtualmachines/console\" in API group \
                 \"subresources.kubevmm.io\" in the namespace \"dev\"",
            ),
            (401, "Unauthorized"),
        ];
        for (code, message) in ours {
            assert_eq!(explain(code, message), message, "{code}");
        }
        assert_eq!(explain(409, "  padded\n"), "padded");
        // kube-apiserver's own 404: the group is not served.
        for message in [NOTHING_SERVES_IT, "404 page not found", ""] {
            let text = explain(404, message);
            assert!(
                text.starts_with(
                    "the subresource API subresources.kubevmm.io/v1alpha1 is not available"
                ),
                "{text}"
            );
            assert!(text.contains("APIService"), "{text}");
        }
        // The aggregator's 503: registered, but the operator does not answer.
        let down = explain(503, "service unavailable");
        assert!(
            down.starts_with("service unavailable: the subresource API"),
            "{down}"
        );
        assert!(down.contains("operator"), "{down}");
        assert_eq!(explain(500, ""), "the API server answered HTTP 500");
    }

    #[test]
    fn error_bodies() {
        let status = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
            "message":"VirtualMachine web is not running (status Stopped)","reason":"Conflict","code":409}"#;
        assert_eq!(
            error_message(status),
            "VirtualMachine web is not running (status Stopped)"
        );
        assert_eq!(error_message(b"404 page not found\n"), "404 page not found");
        let e = from_kube(kube::Error::Api(
            serde_json::from_slice::<kube::core::Status>(status)
                .unwrap()
                .boxed(),
        ));
        assert_eq!(
            e.to_string(),
            "VirtualMachine web is not running (status Stopped)"
        );
    }

    #[test]
    fn ends_of_streams() {
        let frame = |code, reason: &str| CloseFrame {
            code,
            reason: reason.into(),
        };
        assert_eq!(close_outcome(None), Ok(None));
        assert_eq!(close_outcome(Some(&frame(CloseCode::Normal, ""))), Ok(None));
        assert_eq!(
            close_outcome(Some(&frame(
                CloseCode::Normal,
                "VirtualMachine web stopped"
            ))),
            Ok(Some("VirtualMachine web stopped".into()))
        );
        assert_eq!(
            close_outcome(Some(&frame(CloseCode::Away, "operator shutting down"))),
            Ok(Some("operator shutting down".into()))
        );
        assert_eq!(
            close_outcome(Some(&frame(CloseCode::Error, "node n1 is lost"))),
            Err("node n1 is lost".into())
        );
        assert_eq!(
            close_outcome(Some(&frame(CloseCode::Policy, ""))),
            Err("the server closed the stream with code 1008".into())
        );
    }
}
