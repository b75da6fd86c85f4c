//! Getting an image's bytes into its partial file, hashing every byte as it
//! is written: over HTTP(S) with retries and resume (`Range`, guarded by
//! `If-Range` so a changed file restarts from zero), or copied from an
//! allow-listed node path opened beneath its directory.

use std::fs::File;
use std::io::{BufWriter, Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

use super::store::{free_space, hex};
use crate::agent::hostfs::{self, Access, HostFsError};

/// The HTTP(S) client (rustls with ring, the system's roots).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Builds the client; fails only when the node has no CA certificates.
pub fn client() -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no CA certificates for https: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Bytes written and expected, read by the status writer while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes in the partial file.
    pub done: AtomicU64,
    /// Expected total (0 while unknown).
    pub total: AtomicU64,
    /// Bytes received over the network (metric).
    pub fetched: AtomicU64,
}

/// Why an import failed; [`FetchError::reason`] is the condition reason.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting failed (DNS, refused, TLS, timeout).
    #[error("cannot reach {url}: {why}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The error chain.
        why: String,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The transfer broke off and retries did not complete it.
    #[error("{url}: transfer interrupted after {done} bytes: {why}")]
    Interrupted {
        /// The URL.
        url: String,
        /// Bytes kept.
        done: u64,
        /// The error.
        why: String,
    },
    /// Not enough free space in the image cache.
    #[error("{what} needs {needed} bytes but the image cache at {dir} has {free} bytes free")]
    NoSpace {
        /// What was being imported.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
        /// The cache directory.
        dir: String,
    },
    /// A node path that cannot be used.
    #[error(transparent)]
    Path(#[from] HostFsError),
    /// A local I/O error.
    #[error("{what}: {why}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        why: String,
    },
}

impl FetchError {
    /// The condition (and Event) reason.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Unreachable { .. } => "HostUnreachable",
            FetchError::Status { status: 404, .. } => "HttpNotFound",
            FetchError::Status { status, .. } if *status >= 500 => "HttpServerError",
            FetchError::Status { .. } => "HttpError",
            FetchError::Interrupted { .. } => "TransferInterrupted",
            FetchError::NoSpace { .. } => "InsufficientSpace",
            FetchError::Path(HostFsError::NotAllowed { .. }) => "PathNotAllowed",
            FetchError::Path(HostFsError::Escapes { .. }) => "PathEscapesAllowedDir",
            FetchError::Path(_) => "PathUnusable",
            FetchError::Io { .. } => "ImportFailed",
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            FetchError::Unreachable { .. } | FetchError::Interrupted { .. }
        ) || matches!(self, FetchError::Status { status, .. } if *status >= 500 || *status == 429)
    }
}

fn io_err(what: &str, e: &std::io::Error, dir: &Path, needed: u64) -> FetchError {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        return FetchError::NoSpace {
            what: what.into(),
            needed,
            free: free_space(dir).unwrap_or(0),
            dir: dir.display().to_string(),
        };
    }
    FetchError::Io {
        what: what.into(),
        why: e.to_string(),
    }
}

/// What was fetched into the partial file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// SHA-256 of every byte, hex.
    pub sha256: String,
    /// Length.
    pub size: u64,
}

/// The partial file, the bytes hashed so far and their count.
struct Partial {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    len: u64,
}

impl Partial {
    /// Opens (or creates) `path`; bytes already there (a download cut
    /// short by an agent restart) are hashed and kept for resuming.
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let mut hash = Sha256::new();
        let len = std::io::copy(&mut f, &mut HashWriter(&mut hash))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
            hash,
            len,
        })
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.hash.update(b);
        self.len += b.len() as u64;
        Ok(())
    }

    /// Back to zero bytes (the server sent the whole file again).
    fn reset(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_mut().set_len(0)?;
        self.out.get_mut().rewind()?;
        self.hash = Sha256::new();
        self.len = 0;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<Fetched> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        Ok(Fetched {
            sha256: hex(&self.hash.finalize()),
            size: self.len,
        })
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL); `bytes */TOTAL` → (None, TOTAL).
fn content_range(v: &str) -> Option<(Option<u64>, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = total.parse().ok();
    if range == "*" {
        return Some((None, total));
    }
    Some((Some(range.split_once('-')?.0.parse().ok()?), total))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// How long a silent server is waited for (headers, then each chunk).
const STALL: Duration = Duration::from_secs(30);
/// Attempts without progress before giving up.
const ATTEMPTS: u32 = 5;

/// What a response promises.
enum Expect {
    /// The file is already complete.
    Complete,
    /// A body; the file's total length when the server says.
    Body(Option<u64>),
}

/// What a response promises.
fn expected(
    status: StatusCode,
    hdr: &dyn Fn(header::HeaderName) -> Option<String>,
    p: &mut Partial,
    url: &str,
    dir: &Path,
) -> Result<Expect, FetchError> {
    let total = match status {
        StatusCode::PARTIAL_CONTENT if p.len > 0 => {
            let (start, total) = hdr(header::CONTENT_RANGE)
                .as_deref()
                .and_then(content_range)
                .unwrap_or((None, None));
            if start != Some(p.len) {
                return Err(FetchError::Interrupted {
                    url: url.into(),
                    done: p.len,
                    why: format!("the server resumed at {start:?}, not at {}", p.len),
                });
            }
            total
        }
        StatusCode::RANGE_NOT_SATISFIABLE if p.len > 0 => {
            // Nothing after our last byte: complete if the total agrees.
            let total = hdr(header::CONTENT_RANGE)
                .as_deref()
                .and_then(content_range)
                .and_then(|r| r.1);
            if total == Some(p.len) {
                return Ok(Expect::Complete);
            }
            p.reset()
                .map_err(|e| io_err("restart the download", &e, dir, 0))?;
            return Err(FetchError::Interrupted {
                url: url.into(),
                done: 0,
                why: "the server refused to resume; restarting".into(),
            });
        }
        StatusCode::OK => {
            if p.len > 0 {
                p.reset()
                    .map_err(|e| io_err("restart the download", &e, dir, 0))?;
            }
            hdr(header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
        }
        s => {
            return Err(FetchError::Status {
                url: url.into(),
                status: s.as_u16(),
            })
        }
    };
    Ok(Expect::Body(total))
}

/// One request; appends to `p`. `Ok` when the file is complete.
async fn attempt(
    client: &HttpClient,
    url: &str,
    p: &mut Partial,
    validator: &mut Option<String>,
    progress: &Progress,
) -> Result<(), FetchError> {
    let dir = p.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut req = Request::get(url).header(
        header::USER_AGENT,
        concat!("node-vmm/", env!("CARGO_PKG_VERSION")),
    );
    if p.len > 0 {
        req = req.header(header::RANGE, format!("bytes={}-", p.len));
        if let Some(v) = validator.as_deref() {
            req = req.header(header::IF_RANGE, v);
        }
    }
    let req = req.body(Empty::new()).map_err(|e| FetchError::Io {
        what: format!("request for {url}"),
        why: e.to_string(),
    })?;
    let unreachable = |why: String| FetchError::Unreachable {
        url: url.into(),
        why,
    };
    let resp = tokio::time::timeout(STALL, client.request(req))
        .await
        .map_err(|_| unreachable(format!("no response within {}s", STALL.as_secs())))?
        .map_err(|e| unreachable(chain(&e)))?;
    let hdr = |n: header::HeaderName| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Expect::Body(total) = expected(resp.status(), &hdr, p, url, &dir)? else {
        return Ok(());
    };
    *validator = hdr(header::ETAG)
        .filter(|e| !e.starts_with("W/"))
        .or_else(|| hdr(header::LAST_MODIFIED));
    if let Some(total) = total {
        progress.total.store(total, Ordering::Relaxed);
        let needed = total.saturating_sub(p.len);
        let free = free_space(&dir).map_err(|e| io_err("free space", &e, &dir, needed))?;
        if needed > free {
            return Err(FetchError::NoSpace {
                what: url.into(),
                needed,
                free,
                dir: dir.display().to_string(),
            });
        }
    }
    let mut body = resp.into_body();
    loop {
        let frame = tokio::time::timeout(STALL, body.frame()).await;
        let frame = match frame {
            Err(_) => Err(format!("no data for {}s", STALL.as_secs())),
            Ok(None) => break,
            Ok(Some(Err(e))) => Err(chain(&e)),
            Ok(Some(Ok(f))) => Ok(f),
        };
        let frame = frame.map_err(|why| FetchError::Interrupted {
            url: url.into(),
            done: p.len,
            why,
        })?;
        if let Some(data) = frame.data_ref() {
            p.write(data)
                .map_err(|e| io_err(url, &e, &dir, total.unwrap_or(0).saturating_sub(p.len)))?;
            progress.done.store(p.len, Ordering::Relaxed);
            progress
                .fetched
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
    p.out.flush().map_err(|e| io_err(url, &e, &dir, 0))?;
    match total {
        Some(t) if t != p.len => Err(FetchError::Interrupted {
            url: url.into(),
            done: p.len,
            why: format!("the body ended at {} of {t} bytes", p.len),
        }),
        _ => Ok(()),
    }
}

/// Downloads `url` into `partial` (resuming what is there), retrying
/// broken transfers and server errors with backoff.
pub async fn http(
    client: &HttpClient,
    url: &str,
    partial: &Path,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let dir = partial.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut p = Partial::open(partial).map_err(|e| io_err("partial download", &e, &dir, 0))?;
    progress.done.store(p.len, Ordering::Relaxed);
    let mut validator = None;
    let mut failures = 0;
    let mut total_attempts = 0;
    loop {
        let before = p.len;
        match attempt(client, url, &mut p, &mut validator, progress).await {
            Ok(()) => break,
            Err(e) if e.retryable() && failures + 1 < ATTEMPTS && total_attempts < 100 => {
                // Progress resets the count: a flaky server still finishes.
                failures = if p.len > before { 0 } else { failures + 1 };
                total_attempts += 1;
                let delay = Duration::from_millis(250 << failures.min(4));
                tracing::info!(url, done = p.len, "retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
    p.finish()
        .map_err(|e| io_err("partial download", &e, &dir, 0))
}

/// Copies an allow-listed node file into `partial`.
pub fn path(
    allowed: &[PathBuf],
    src: &str,
    partial: &Path,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let dir = partial.parent().unwrap_or(Path::new("/")).to_path_buf();
    let fd = hostfs::open_user_path(allowed, "spec.source.path", src, Access::Boot)?;
    let mut f = File::from(fd);
    let size = f.metadata().map_err(|e| io_err(src, &e, &dir, 0))?.len();
    progress.total.store(size, Ordering::Relaxed);
    let free = free_space(&dir).map_err(|e| io_err("free space", &e, &dir, size))?;
    if size > free {
        return Err(FetchError::NoSpace {
            what: src.into(),
            needed: size,
            free,
            dir: dir.display().to_string(),
        });
    }
    let mut p = Partial::open(partial).map_err(|e| io_err("partial copy", &e, &dir, 0))?;
    p.reset().map_err(|e| io_err("partial copy", &e, &dir, 0))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(src, &e, &dir, 0))?;
        if n == 0 {
            break;
        }
        p.write(&buf[..n])
            .map_err(|e| io_err(src, &e, &dir, size))?;
        progress.done.store(p.len, Ordering::Relaxed);
    }
    p.finish().map_err(|e| io_err("partial copy", &e, &dir, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-file HTTP server honouring `Range` (unless `ranges` is off);
    /// returns its URL and the `Range` headers it saw.
    fn serve(
        body: Vec<u8>,
        ranges: bool,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/f", l.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                let mut start = 0;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h
                        .strip_prefix("range: bytes=")
                        .or_else(|| h.strip_prefix("Range: bytes="))
                    {
                        s2.lock().unwrap().push(v.trim().to_string());
                        if ranges {
                            start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                        }
                    }
                }
                let mut c = c;
                let head = if start > 0 {
                    format!(
                        "HTTP/1.1 206 Partial\r\nContent-Range: bytes {start}-{}/{}\r\n",
                        body.len() - 1,
                        body.len()
                    )
                } else {
                    "HTTP/1.1 200 OK\r\n".to_string()
                };
                let _ = write!(
                    c,
                    "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len() - start
                );
                let _ = c.write_all(&body[start..]);
            }
        });
        (url, seen)
    }

    /// An agent restart leaves a partial file: the next import hashes it,
    /// asks for the rest, and gets the digest of the whole; a server that
    /// ignores `Range` makes it start over, with the same result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resumes_a_partial_file_left_by_a_restart() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want = hex(&Sha256::digest(&body));
        let dir = std::env::temp_dir().join(format!("kubevmm-fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client = client().unwrap();
        for ranges in [true, false] {
            let partial = dir.join(format!("p-{ranges}"));
            std::fs::write(&partial, &body[..100_000]).unwrap();
            let (url, seen) = serve(body.clone(), ranges);
            let progress = Progress::default();
            let got = http(&client, &url, &partial, &progress).await.unwrap();
            assert_eq!(
                (got.sha256.as_str(), got.size),
                (want.as_str(), 300_000),
                "ranges {ranges}"
            );
            assert_eq!(std::fs::read(&partial).unwrap(), body);
            assert_eq!(
                seen.lock().unwrap().as_slice(),
                ["100000-"],
                "ranges {ranges}"
            );
            let fetched = progress.fetched.load(Ordering::Relaxed);
            assert_eq!(fetched, if ranges { 200_000 } else { 300_000 });
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_content_range() {
        assert_eq!(
            content_range("bytes 10-99/100"),
            Some((Some(10), Some(100)))
        );
        assert_eq!(content_range("bytes 10-99/*"), Some((Some(10), None)));
        assert_eq!(content_range("bytes */100"), Some((None, Some(100))));
        assert_eq!(content_range("items 1-2/3"), None);
        assert_eq!(content_range("bytes x-2/3"), None);
    }

    #[test]
    fn reasons_name_each_failure() {
        let s = |status| FetchError::Status {
            url: "u".into(),
            status,
        };
        assert_eq!(s(404).reason(), "HttpNotFound");
        assert_eq!(s(500).reason(), "HttpServerError");
        assert_eq!(s(403).reason(), "HttpError");
        assert!(s(503).retryable() && !s(404).retryable());
    }
}
