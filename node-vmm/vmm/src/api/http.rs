//! Just enough HTTP/1.1 for the control socket: one request per connection.

use std::io::{self, Read, Write};

/// Requests larger than this are refused.
const MAX_REQUEST: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let header_end = loop {
        if let Some(end) = find_header_end(&buf) {
            break end;
        }
        if buf.len() > MAX_REQUEST {
            return Err(HttpError::Malformed("headers too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed(
                "connection closed before end of headers",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end])
        .map_err(|_| HttpError::Malformed("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first
        .next()
        .filter(|m| !m.is_empty())
        .ok_or(HttpError::Malformed("no method"))?;
    let path = first.next().ok_or(HttpError::Malformed("no path"))?;
    let mut content_length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v
                    .trim()
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
            }
        }
    }
    if content_length > MAX_REQUEST {
        return Err(HttpError::Malformed("body too large"));
    }
    let mut body = buf[header_end..].to_vec();
    while body.len() < content_length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed before end of body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(content_length);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        body,
    })
}

/// Writes a JSON response and closes the exchange.
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    body: &serde_json::Value,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Internal Server Error",
    };
    let text = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_with_body() {
        let raw = b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let req = read_request(&mut &raw[..]).unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/vm/pause");
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn rejects_truncated_request() {
        let raw = b"GET /vm HTTP/1.1\r\n";
        assert!(read_request(&mut &raw[..]).is_err());
    }

    #[test]
    fn response_has_length_and_json() {
        let mut out = Vec::new();
        write_response(&mut out, 200, &serde_json::json!({"state": "running"})).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.ends_with("{\"state\":\"running\"}"));
        assert!(text.contains("Content-Length: 19\r\n"));
    }
}
