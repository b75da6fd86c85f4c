//! Client of a VMM's control socket (HTTP/1.1 + JSON, docs/vmm-api.md).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::lifecycle::GuestState;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    /// Connecting, writing or reading failed.
    #[error("VMM control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VMM did not answer in time.
    #[error("VMM control socket {0}: no answer within 5s")]
    Timeout(String),
    /// The answer was not HTTP + JSON, or an error status.
    #[error("VMM control socket {path}: {what}")]
    Protocol {
        /// The socket.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// Sends one request and returns the JSON body of a 2xx answer.
pub async fn request(socket: &Path, method: &str, path: &str) -> Result<Value, VmmClientError> {
    let sock = socket.display().to_string();
    let fut = async {
        let io = |source| VmmClientError::Io {
            path: sock.clone(),
            source,
        };
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.map_err(io)?;
        Ok::<_, VmmClientError>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| VmmClientError::Timeout(sock.clone()))??;
    let text = String::from_utf8_lossy(&buf);
    let protocol = |what: String| VmmClientError::Protocol {
        path: sock.clone(),
        what,
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| protocol("answer without an HTTP header".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol(format!("bad status line {:?}", head.lines().next())))?;
    let json: Value =
        serde_json::from_str(body.trim()).map_err(|e| protocol(format!("bad JSON body: {e}")))?;
    if (200..300).contains(&status) {
        Ok(json)
    } else {
        Err(protocol(format!("HTTP {status}: {json}")))
    }
}

/// `GET /vm`: whether the vCPUs run or are paused.
pub async fn state(socket: &Path) -> Result<GuestState, VmmClientError> {
    let v = request(socket, "GET", "/vm").await?;
    match v.get("state").and_then(Value::as_str) {
        Some("running") => Ok(GuestState::Running),
        Some("paused") => Ok(GuestState::Paused),
        other => Err(VmmClientError::Protocol {
            path: socket.display().to_string(),
            what: format!("GET /vm: state {other:?}, expected \"running\" or \"paused\""),
        }),
    }
}
