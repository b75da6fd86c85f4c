//! The paths of the subresource API `subresources.kubevmm.io/v1alpha1` as
//! kube-apiserver proxies them, its discovery documents and its error
//! bodies. Pure: a method and a target in, a route or a `metav1.Status` out.

use kubevmm_access::node_api::{query_pairs, Stream};
use serde_json::{json, Value};

/// The API group.
pub const GROUP: &str = "subresources.kubevmm.io";
/// Its only version.
pub const VERSION: &str = "v1alpha1";

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /apis/subresources.kubevmm.io`: the `APIGroup`.
    Group,
    /// `GET /apis/subresources.kubevmm.io/v1alpha1`: the `APIResourceList`.
    Resources,
    /// A stream of one VM.
    Vm {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Which stream.
        stream: Stream,
    },
}

/// A request this server does not serve, as an HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Reject {
    /// The HTTP status.
    pub code: u16,
    /// The `metav1.Status` reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl Reject {
    /// A rejection.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `metav1.Status` body.
    pub fn body(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

fn bad(message: String) -> Reject {
    Reject::new(400, "BadRequest", message)
}

/// The longest name segment accepted (a DNS subdomain).
const MAX_NAME: usize = 253;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Routes `method` `target` (path and query).
pub fn route(method: &str, target: &str) -> Result<Route, Reject> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let not_found = || Reject::new(404, "NotFound", format!("the server could not find {path}"));
    if method != "GET" {
        return Err(Reject::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported: console, logs and portforward are GET"),
        ));
    }
    match parts.as_slice() {
        ["", "apis", GROUP] => Ok(Route::Group),
        ["", "apis", GROUP, VERSION] => Ok(Route::Resources),
        ["", "apis", GROUP, VERSION, "namespaces", ns, "virtualmachines", name, sub] => {
            if !valid_name(ns) || !valid_name(name) {
                return Err(bad(format!("malformed namespace or name in {path}")));
            }
            let params = query_pairs(query);
            let get = |k: &str| params.iter().find(|(p, _)| *p == k).map(|(_, v)| *v);
            let stream = match *sub {
                "console" => Stream::Console,
                "stats" => Stream::Stats,
                "logs" => Stream::Logs {
                    tail_lines: get("tailLines")
                        .map(|v| {
                            v.parse().map_err(|_| {
                                bad(format!("tailLines={v:?}: give a number of lines"))
                            })
                        })
                        .transpose()?,
                    follow: match get("follow") {
                        None | Some("false" | "0") => false,
                        Some("true" | "1") => true,
                        Some(v) => return Err(bad(format!("follow={v:?}: give true or false"))),
                    },
                },
                "portforward" => {
                    let port = get("port")
                        .ok_or_else(|| bad("portforward needs ?port=N, the guest port".into()))?;
                    match port.parse::<u16>() {
                        Ok(p) if p > 0 => Stream::PortForward { port: p },
                        _ => return Err(bad(format!("port={port:?}: give a guest port 1-65535"))),
                    }
                }
                _ => return Err(not_found()),
            };
            Ok(Route::Vm {
                namespace: (*ns).into(),
                name: (*name).into(),
                stream,
            })
        }
        _ => Err(not_found()),
    }
}

/// The `APIGroup` document.
pub fn group_doc() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [gv],
        "preferredVersion": gv,
    })
}

/// The `APIResourceList` document: the subresources of `virtualmachines`
/// (console, logs, portforward and the VMM's stats for `kubectl vm top`),
/// each reached with `get`.
pub fn resources_doc() -> Value {
    let sub = |s: &str| {
        json!({
            "name": format!("virtualmachines/{s}"),
            "singularName": "",
            "namespaced": true,
            "kind": "VirtualMachine",
            "verbs": ["get"],
        })
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [sub("console"), sub("logs"), sub("portforward"), sub("stats")],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "/apis/subresources.kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/web";

    #[test]
    fn every_path_routes_or_says_why_not() {
        let ok: &[(&str, Route)] = &[
            ("/apis/subresources.kubevmm.io", Route::Group),
            ("/apis/subresources.kubevmm.io/v1alpha1/", Route::Resources),
            (
                "/apis/subresources.kubevmm.io/v1alpha1/namespaces/dev/virtualmachines/web/console",
                Route::Vm {
                    namespace: "dev".into(),
                    name: "web".into(),
                    stream: Stream::Console,
                },
            ),
        ];
        for (target, want) in ok {
            assert_eq!(route("GET", target).as_ref(), Ok(want), "{target}");
        }
        let logs = route("GET", &format!("{VM}/logs?tailLines=10&follow=true")).unwrap();
        assert!(matches!(
            logs,
            Route::Vm {
                stream: Stream::Logs {
                    tail_lines: Some(10),
                    follow: true
                },
                ..
            }
        ));
        let pf = route("GET", &format!("{VM}/portforward?port=22")).unwrap();
        assert!(matches!(
            pf,
            Route::Vm {
                stream: Stream::PortForward { port: 22 },
                ..
            }
        ));

        let bad: &[(&str, &str, u16)] = &[
            ("POST", "/apis/subresources.kubevmm.io", 405),
            ("GET", "/apis/other.io/v1", 404),
            ("GET", "/openapi/v2", 404),
            ("GET", &format!("{VM}/shell"), 404),
            ("GET", &format!("{VM}/portforward"), 400),
            ("GET", &format!("{VM}/portforward?port=0"), 400),
            ("GET", &format!("{VM}/logs?tailLines=x"), 400),
            ("GET", &format!("{VM}/logs?follow=maybe"), 400),
            (
                "GET",
                "/apis/subresources.kubevmm.io/v1alpha1/namespaces/Dev/virtualmachines/web/console",
                400,
            ),
        ];
        for (method, target, code) in bad {
            let r = route(method, target).unwrap_err();
            assert_eq!(r.code, *code, "{method} {target}: {r}");
            assert_eq!(r.body()["code"], *code);
        }
    }

    #[test]
    fn discovery_lists_the_subresources() {
        let r = resources_doc();
        let names: Vec<&str> = r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "virtualmachines/console",
                "virtualmachines/logs",
                "virtualmachines/portforward",
                "virtualmachines/stats"
            ]
        );
        assert_eq!(group_doc()["preferredVersion"]["version"], VERSION);
    }
}
