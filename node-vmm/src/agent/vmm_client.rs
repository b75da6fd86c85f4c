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

/// The longest answer read from a VMM (its stats are a few KiB).
pub const MAX_ANSWER: u64 = 1 << 20;

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
        // Bounded: a VMM (a guest that took it over) cannot make the agent
        // buffer without end.
        let mut buf = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        Ok::<_, VmmClientError>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| VmmClientError::Timeout(sock.clone()))??;
    if buf.len() as u64 > MAX_ANSWER {
        return Err(VmmClientError::Protocol {
            path: sock,
            what: format!("answer longer than {MAX_ANSWER} bytes"),
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A VMM that answers `answer` to one request.
    fn serve(answer: Vec<u8>) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "vmm-client-{}-{}",
            std::process::id(),
            answer.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("api.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let task = tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut req = [0u8; 512];
                let _ = s.read(&mut req).await;
                let _ = s.write_all(&answer).await;
            }
        });
        (sock, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_are_parsed_and_bounded() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}".to_vec();
        let (sock, t) = serve(ok);
        assert_eq!(state(&sock).await.expect("state"), GuestState::Paused);
        t.await.expect("server");

        let odd = b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"melting\"}".to_vec();
        let (sock, t) = serve(odd);
        let e = state(&sock).await.expect_err("unknown state");
        assert!(e.to_string().contains("melting"), "{e}");
        t.await.expect("server");

        let mut flood = b"HTTP/1.1 200 OK\r\n\r\n\"".to_vec();
        flood.resize(usize::try_from(MAX_ANSWER).expect("size") * 2, b'a');
        let (sock, t) = serve(flood);
        let e = request(&sock, "GET", "/vm/stats").await.expect_err("flood");
        assert!(e.to_string().contains("answer longer than"), "{e}");
        t.abort();
    }
}
