//! A small HTTP/1.1 file server on loopback for image-import tests and
//! benchmarks: `GET` with `Range` (206 / 416), `ETag`, throttling and
//! failure injection per path (a status, a connection closed mid-transfer,
//! a `Content-Length` larger than the body). Every request is recorded.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a path misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serves the file.
    #[default]
    None,
    /// Answers this status with an empty body.
    Status(u16),
    /// The first `n` requests close the connection after this many body bytes.
    CloseAfter {
        /// Body bytes sent before the close.
        bytes: u64,
        /// How many requests do it.
        times: u32,
    },
    /// Claims this `Content-Length`, sends the file, closes.
    ClaimLength(u64),
}

/// One served file.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The file.
    pub file: PathBuf,
    /// Bytes per second (unthrottled when `None`).
    pub rate: Option<u64>,
    /// The fault.
    pub fault: Fault,
}

/// A recorded request: path and `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Request path.
    pub path: String,
    /// `Range` header, if any.
    pub range: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    files: HashMap<String, Served>,
    seen: Vec<Seen>,
}

/// The server; runs until the process ends.
#[derive(Debug, Clone)]
pub struct FileServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FileServer {
    /// Listens on 127.0.0.1 (a free port).
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        Ok(Self { addr, state })
    }

    /// `http://127.0.0.1:PORT/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Serves `served` at `/NAME`.
    pub fn serve(&self, name: &str, served: Served) {
        self.lock().files.insert(format!("/{name}"), served);
    }

    /// Requests seen for `/NAME`.
    pub fn seen(&self, name: &str) -> Vec<Seen> {
        let p = format!("/{name}");
        self.lock()
            .seen
            .iter()
            .filter(|s| s.path == p)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn handle(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let served = {
        let mut st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
        });
        let s = st.files.get(&path).cloned();
        if let Some(Served {
            fault: Fault::CloseAfter { bytes, times },
            ..
        }) = s
        {
            if let Some(f) = st.files.get_mut(&path) {
                f.fault = if times > 1 {
                    Fault::CloseAfter {
                        bytes,
                        times: times - 1,
                    }
                } else {
                    Fault::None
                };
            }
        }
        s
    };
    let mut out = conn;
    let Some(served) = served else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    if let Fault::Status(code) = served.fault {
        return write!(
            out,
            "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    let mut file = std::fs::File::open(&served.file)?;
    let len = file.metadata()?.len();
    let etag = format!("\"{len:x}\"");
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, _)| s.parse::<u64>().ok());
    let (status, start) = match start {
        Some(s) if s >= len => {
            return write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        Some(s) => (
            format!(
                "206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}",
                len - 1
            ),
            s,
        ),
        None => ("200 OK".to_string(), 0),
    };
    let claimed = match served.fault {
        Fault::ClaimLength(n) => n,
        _ => len - start,
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {claimed}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
    )?;
    let limit = match served.fault {
        Fault::CloseAfter { bytes, .. } => bytes.saturating_sub(start).max(1),
        _ => u64::MAX,
    };
    send(&mut out, &mut file, start, limit, served.rate)?;
    out.flush()
}

/// Sends `file` from `start`, at most `limit` bytes, at `rate` bytes/s.
fn send(
    out: &mut TcpStream,
    file: &mut std::fs::File,
    start: u64,
    limit: u64,
    rate: Option<u64>,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sent, began) = (0u64, Instant::now());
    loop {
        let want = buf
            .len()
            .min(usize::try_from(limit - sent).unwrap_or(usize::MAX));
        let chunk = match rate {
            Some(r) => want.min(usize::try_from(r / 20).unwrap_or(usize::MAX).max(1)),
            None => want,
        };
        let n = file.read(&mut buf[..chunk])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        sent += n as u64;
        if sent >= limit {
            break; // the injected close
        }
        if let Some(r) = rate {
            #[allow(clippy::cast_precision_loss)]
            let due = Duration::from_secs_f64(sent as f64 / r as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}
