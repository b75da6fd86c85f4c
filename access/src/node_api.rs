//! The node stream protocol: what the operator asks a node-vmm for, over
//! HTTP/1.1 on mutually authenticated TLS (only the operator's client
//! certificate is accepted).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /v1/vms/{uid}/console`, `Upgrade: kubevmm-stream` | `101`, then the guest serial, raw, both ways |
//! | `GET /v1/vms/{uid}/logs?tailLines=N&follow=true` | `200 text/plain`, the serial ring buffer (then new output while `follow`) |
//! | `GET /v1/vms/{uid}/portforward?port=P`, `Upgrade: kubevmm-stream` | `101`, then a TCP stream the agent dialled to the guest's port `P` |
//! | `GET /v1/vms/{uid}/stats` | `200 application/json`, the VMM's counters (`GET /vm/stats`, docs/vmm-api.md) |
//!
//! Errors are a status with a JSON body `{"message": "..."}`: 404 no such
//! VM on this node, 409 the guest is not running, 502 the guest port
//! refused, 400 a malformed request.

/// The `Upgrade` protocol token of the raw streams.
pub const UPGRADE: &str = "kubevmm-stream";

/// The name node-vmm's serving certificate is issued for and the operator
/// checks, whatever address it dials: one certificate (one CA) for every
/// node, as nodes are equally trusted, and no per-node IP SANs to manage.
pub const SERVER_NAME: &str = "node-vmm.kubevmm.internal";

/// The longest VM uid accepted (Kubernetes uids are 36 characters).
const MAX_UID: usize = 64;

/// One stream of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// The serial console, both ways.
    Console,
    /// The serial ring buffer: the last `tail_lines` lines (all when
    /// `None`), then new output while `follow`.
    Logs {
        /// How many of the newest lines.
        tail_lines: Option<u64>,
        /// Keep streaming.
        follow: bool,
    },
    /// A TCP stream to the guest's `port`.
    PortForward {
        /// The guest port.
        port: u16,
    },
    /// The VMM's counters (CPU time, disk and network bytes, memory).
    Stats,
}

/// A request to a node-vmm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRequest {
    /// The VM's `metadata.uid`.
    pub uid: String,
    /// Which stream.
    pub stream: Stream,
}

/// A request path that is not one of the protocol's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not `/v1/vms/{uid}/{console|logs|portforward}`.
    #[error("no such path {0:?}: use /v1/vms/UID/console, /logs or /portforward")]
    Path(String),
    /// A uid with characters other than letters, digits and '-', or too long.
    #[error("malformed VM uid {0:?}")]
    Uid(String),
    /// A query parameter that cannot be read.
    #[error("query parameter {name}={value:?}: {why}")]
    Query {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

impl Stream {
    /// Whether the stream is an HTTP upgrade (else a streamed response).
    pub fn upgrades(&self) -> bool {
        matches!(self, Self::Console | Self::PortForward { .. })
    }

    /// The path segment naming the stream.
    pub fn segment(&self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Logs { .. } => "logs",
            Self::PortForward { .. } => "portforward",
            Self::Stats => "stats",
        }
    }
}

impl NodeRequest {
    /// The request target: path and query.
    pub fn target(&self) -> String {
        let base = format!("/v1/vms/{}/{}", self.uid, self.stream.segment());
        match &self.stream {
            Stream::Console | Stream::Stats => base,
            Stream::Logs { tail_lines, follow } => {
                let mut q = vec![format!("follow={follow}")];
                if let Some(n) = tail_lines {
                    q.insert(0, format!("tailLines={n}"));
                }
                format!("{base}?{}", q.join("&"))
            }
            Stream::PortForward { port } => format!("{base}?port={port}"),
        }
    }

    /// Reads a request target (`path?query`).
    pub fn parse(target: &str) -> Result<Self, ProtocolError> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let parts: Vec<&str> = path.split('/').collect();
        let ["", "v1", "vms", uid, which] = parts.as_slice() else {
            return Err(ProtocolError::Path(path.into()));
        };
        let uid_ok = !uid.is_empty()
            && uid.len() <= MAX_UID
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !uid_ok {
            return Err(ProtocolError::Uid((*uid).into()));
        }
        let params = query_pairs(query);
        let get = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let stream = match *which {
            "console" => Stream::Console,
            "stats" => Stream::Stats,
            "logs" => Stream::Logs {
                tail_lines: get("tailLines")
                    .map(|v| parse_query("tailLines", v, "a number of lines"))
                    .transpose()?,
                follow: get("follow")
                    .map(|v| parse_query("follow", v, "true or false"))
                    .transpose()?
                    .unwrap_or(false),
            },
            "portforward" => Stream::PortForward {
                port: get("port").map_or_else(
                    || {
                        Err(ProtocolError::Query {
                            name: "port",
                            value: String::new(),
                            why: "a guest port 1-65535 is required",
                        })
                    },
                    |v| {
                        parse_query::<u16>("port", v, "a guest port 1-65535").and_then(|p| {
                            if p == 0 {
                                Err(ProtocolError::Query {
                                    name: "port",
                                    value: v.into(),
                                    why: "a guest port 1-65535",
                                })
                            } else {
                                Ok(p)
                            }
                        })
                    },
                )?,
            },
            _ => return Err(ProtocolError::Path(path.into())),
        };
        Ok(Self {
            uid: (*uid).into(),
            stream,
        })
    }
}

/// `a=1&b=2` into pairs (no percent-decoding: every value here is ASCII).
pub fn query_pairs(query: &str) -> Vec<(&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

fn parse_query<T: std::str::FromStr>(
    name: &'static str,
    value: &str,
    why: &'static str,
) -> Result<T, ProtocolError> {
    value.parse().map_err(|_| ProtocolError::Query {
        name,
        value: value.into(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "4f8e2c1a-0b7d-4c55-9a1e-0123456789ab";

    #[test]
    fn requests_survive_the_round_trip() {
        let cases = [
            Stream::Console,
            Stream::Logs {
                tail_lines: Some(20),
                follow: true,
            },
            Stream::Logs {
                tail_lines: None,
                follow: false,
            },
            Stream::PortForward { port: 22 },
            Stream::Stats,
        ];
        for stream in cases {
            let r = NodeRequest {
                uid: UID.into(),
                stream,
            };
            assert_eq!(
                NodeRequest::parse(&r.target()),
                Ok(r.clone()),
                "{}",
                r.target()
            );
        }
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("/v1/vms", "no such path"),
            ("/v1/vms/x/shell", "no such path"),
            ("/v2/vms/x/console", "no such path"),
            ("/v1/vms/../console", "malformed VM uid"),
            ("/v1/vms//console", "malformed VM uid"),
            ("/v1/vms/a%2fb/console", "malformed VM uid"),
            (
                "/v1/vms/x/portforward",
                "port=\"\": a guest port 1-65535 is required",
            ),
            ("/v1/vms/x/portforward?port=0", "port=\"0\""),
            ("/v1/vms/x/portforward?port=70000", "port=\"70000\""),
            ("/v1/vms/x/logs?tailLines=-1", "tailLines=\"-1\""),
            ("/v1/vms/x/logs?follow=yes", "follow=\"yes\""),
        ];
        for (target, want) in cases {
            let e = NodeRequest::parse(target).unwrap_err().to_string();
            assert!(e.contains(want), "{target}: {e}");
        }
        let long = format!("/v1/vms/{}/console", "a".repeat(65));
        assert!(NodeRequest::parse(&long).is_err());
    }

    #[test]
    fn only_logs_and_stats_are_a_plain_response() {
        assert!(Stream::Console.upgrades());
        assert!(Stream::PortForward { port: 1 }.upgrades());
        assert!(!Stream::Stats.upgrades());
        assert!(!Stream::Logs {
            tail_lines: None,
            follow: true
        }
        .upgrades());
    }
}
