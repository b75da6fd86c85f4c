//! Front-proxy authentication of the subresource API: kube-apiserver
//! proxies each request with its proxy client certificate (issued by the
//! request-header CA, with one of the allowed names) and says who the user
//! is in request headers. What to trust comes from the `ConfigMap`
//! `kube-system/extension-apiserver-authentication`, as for every
//! aggregated API server. Pure: the `ConfigMap`'s data and the headers in,
//! the user out.

use std::collections::BTreeMap;

use http::HeaderMap;

/// Namespace and name of the `ConfigMap` kube-apiserver publishes.
pub const CONFIGMAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

/// What the front proxy is trusted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontProxy {
    /// PEM of the CA that issues the proxy's client certificate.
    pub client_ca_pem: String,
    /// Common names the proxy's certificate may have; empty: any.
    pub allowed_names: Vec<String>,
    /// Headers naming the user, first present wins.
    pub username_headers: Vec<String>,
    /// Headers naming the groups (each may repeat).
    pub group_headers: Vec<String>,
    /// Prefixes of the headers carrying extra attributes.
    pub extra_prefixes: Vec<String>,
}

/// Who made a request, as the front proxy says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// The user name.
    pub user: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Extra attributes (e.g. the service account's pod).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why the front proxy cannot be trusted or the user is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontProxyError {
    /// The `ConfigMap` lacks the request-header CA.
    #[error(
        "ConfigMap kube-system/extension-apiserver-authentication has no requestheader-client-ca-file: \
         start kube-apiserver with --requestheader-client-ca-file (and the other --requestheader-* flags)"
    )]
    NoClientCa,
    /// A list entry of the `ConfigMap` is not a JSON list of strings.
    #[error("ConfigMap kube-system/extension-apiserver-authentication: {key} is not a JSON list of strings: {value:?}")]
    List {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
    },
    /// No username header: not proxied by kube-apiserver.
    #[error("the request names no user (none of the headers {0:?}): only kube-apiserver may call this server")]
    NoUser(Vec<String>),
}

fn list(
    data: &BTreeMap<String, String>,
    key: &'static str,
) -> Result<Vec<String>, FrontProxyError> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.trim().is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|_| FrontProxyError::List {
            key,
            value: v.clone(),
        }),
    }
}

/// `%2f` and the like in extra header names decoded (Kubernetes encodes
/// extra keys that way); invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FrontProxy {
    /// Reads the `ConfigMap`'s data.
    pub fn from_configmap(data: &BTreeMap<String, String>) -> Result<Self, FrontProxyError> {
        let client_ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .ok_or(FrontProxyError::NoClientCa)?
            .clone();
        Ok(Self {
            client_ca_pem,
            allowed_names: list(data, "requestheader-allowed-names")?,
            username_headers: list(data, "requestheader-username-headers")?,
            group_headers: list(data, "requestheader-group-headers")?,
            extra_prefixes: list(data, "requestheader-extra-headers-prefix")?,
        })
    }

    /// Whether a client certificate with common name `cn` may act as the proxy.
    pub fn name_allowed(&self, cn: Option<&str>) -> bool {
        self.allowed_names.is_empty()
            || cn.is_some_and(|cn| self.allowed_names.iter().any(|n| n == cn))
    }

    /// The user the proxy names in `headers`.
    pub fn identity(&self, headers: &HeaderMap) -> Result<UserInfo, FrontProxyError> {
        let value = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string)
                .collect()
        };
        let user = self
            .username_headers
            .iter()
            .find_map(|h| value(h).into_iter().find(|u| !u.is_empty()))
            .ok_or_else(|| FrontProxyError::NoUser(self.username_headers.clone()))?;
        let groups = self.group_headers.iter().flat_map(|h| value(h)).collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, v) in headers {
            let lower = name.as_str();
            let key = self
                .extra_prefixes
                .iter()
                .find_map(|p| lower.strip_prefix(p.to_ascii_lowercase().as_str()));
            if let (Some(key), Ok(v)) = (key, v.to_str()) {
                extra
                    .entry(percent_decode(key))
                    .or_default()
                    .push(v.to_string());
            }
        }
        Ok(UserInfo {
            user,
            groups,
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn proxy() -> FrontProxy {
        FrontProxy::from_configmap(&data(&[
            (
                "requestheader-client-ca-file",
                "-----BEGIN CERTIFICATE-----\n...",
            ),
            ("requestheader-allowed-names", "[\"front-proxy-client\"]"),
            ("requestheader-username-headers", "[\"X-Remote-User\"]"),
            ("requestheader-group-headers", "[\"X-Remote-Group\"]"),
            (
                "requestheader-extra-headers-prefix",
                "[\"X-Remote-Extra-\"]",
            ),
        ]))
        .unwrap()
    }

    #[test]
    fn the_configmap_is_read_or_refused_with_the_fix() {
        let p = proxy();
        assert_eq!(p.allowed_names, ["front-proxy-client"]);
        assert_eq!(
            FrontProxy::from_configmap(&data(&[])),
            Err(FrontProxyError::NoClientCa)
        );
        let bad = data(&[
            ("requestheader-client-ca-file", "pem"),
            ("requestheader-allowed-names", "front-proxy-client"),
        ]);
        assert!(matches!(
            FrontProxy::from_configmap(&bad),
            Err(FrontProxyError::List {
                key: "requestheader-allowed-names",
                ..
            })
        ));
    }

    #[test]
    fn only_allowed_proxy_names_pass() {
        let p = proxy();
        assert!(p.name_allowed(Some("front-proxy-client")));
        assert!(!p.name_allowed(Some("kubelet")));
        assert!(!p.name_allowed(None));
        let open = FrontProxy {
            allowed_names: Vec::new(),
            ..p
        };
        assert!(open.name_allowed(Some("anything")));
    }

    #[test]
    fn the_user_groups_and_extras_come_from_the_headers() {
        let p = proxy();
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", HeaderValue::from_static("alice"));
        h.append("x-remote-group", HeaderValue::from_static("devs"));
        h.append(
            "x-remote-group",
            HeaderValue::from_static("system:authenticated"),
        );
        h.append(
            "x-remote-extra-authentication.kubernetes.io%2fpod-name",
            HeaderValue::from_static("p1"),
        );
        h.append("x-remote-extra-scopes", HeaderValue::from_static("a"));
        h.append("x-remote-extra-scopes", HeaderValue::from_static("b"));
        let u = p.identity(&h).unwrap();
        assert_eq!(u.user, "alice");
        assert_eq!(u.groups, ["devs", "system:authenticated"]);
        assert_eq!(u.extra["authentication.kubernetes.io/pod-name"], ["p1"]);
        assert_eq!(u.extra["scopes"], ["a", "b"]);
        assert_eq!(
            p.identity(&HeaderMap::new()),
            Err(FrontProxyError::NoUser(vec!["X-Remote-User".into()]))
        );
    }

    #[test]
    fn percent_escapes_decode_and_bad_ones_stay() {
        for (input, want) in [
            ("a%2fb", "a/b"),
            ("%", "%"),
            ("a%2", "a%2"),
            ("%zz", "%zz"),
            ("x%41", "xA"),
        ] {
            assert_eq!(percent_decode(input), want, "{input}");
        }
    }
}
