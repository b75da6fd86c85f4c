//! The subresource API `subresources.kubevmm.io/v1alpha1`, served by every
//! operator replica (not only the leader) behind kube-apiserver's
//! aggregation layer: `virtualmachines/console` and `/portforward` as
//! WebSocket upgrades, `/logs` as a streaming GET. Each request is
//! authenticated as front-proxied (`frontproxy`), authorized with a
//! `SubjectAccessReview`, placed (`target`) and relayed to the VM's node-vmm
//! over mutual TLS (`relay`). docs/access.md.

mod frontproxy;
mod relay;
mod routes;
mod target;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kubevmm_access::node_api::{NodeRequest, Stream};
use kubevmm_access::tls::{self, TlsError};
use kubevmm_crds::{HypervisorNode, VirtualMachine};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use frontproxy::{FrontProxy, UserInfo, CONFIGMAP};
use relay::{Framing, NodeAnswer};
use routes::{Reject, Route, GROUP};

/// How often the front-proxy trust is read again.
const TRUST_REFRESH: Duration = Duration::from_secs(60);

/// The flags of the subresource API.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Where to listen (a non-loopback address: kube-apiserver dials it).
    pub listen: String,
    /// Serving certificate and key (the `APIService`'s caBundle signs it).
    pub serving_cert: std::path::PathBuf,
    /// Its key.
    pub serving_key: std::path::PathBuf,
    /// Client certificate, key and the CA of node-vmm's serving certificates.
    pub nodes: tls::Files,
}

/// Why the subresource API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Certificates or keys.
    #[error("subresource API TLS: {0}")]
    Tls(#[from] TlsError),
    /// The listen address.
    #[error("subresource API: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The front proxy trusted now, with the server configuration built on it.
struct Trust {
    proxy: FrontProxy,
    server: Arc<rustls::ServerConfig>,
}

struct Shared {
    client: kube::Client,
    node_tls: Arc<rustls::ClientConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: RwLock<Option<Arc<Trust>>>,
}

impl Shared {
    fn trust(&self) -> Option<Arc<Trust>> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the front-proxy trust; keeps the old one when it fails.
    async fn refresh_trust(&self) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), CONFIGMAP.0);
        let data = match api.get(CONFIGMAP.1).await {
            Ok(cm) => cm.data.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "subresource API: cannot read {}/{}", CONFIGMAP.0, CONFIGMAP.1);
                return;
            }
        };
        let built = FrontProxy::from_configmap(&data)
            .map_err(|e| e.to_string())
            .and_then(|proxy| {
                let roots = tls::roots("request-header CA", proxy.client_ca_pem.as_bytes())
                    .map_err(|e| e.to_string())?;
                let server = tls::server_config(self.chain.clone(), self.key.clone_key(), roots)
                    .map_err(|e| e.to_string())?;
                Ok(Trust { proxy, server })
            });
        match built {
            Ok(t) => {
                let mut slot = self
                    .trust
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let changed = slot.as_ref().is_none_or(|old| old.proxy != t.proxy);
                if changed {
                    tracing::info!(allowed = ?t.proxy.allowed_names, "subresource API: front-proxy trust loaded");
                }
                *slot = Some(Arc::new(t));
            }
            Err(e) => tracing::warn!(error = %e, "subresource API: front-proxy trust not usable"),
        }
    }
}

/// Starts serving; the returned future runs until the process ends.
pub async fn start(
    client: kube::Client,
    cfg: AccessConfig,
) -> Result<impl std::future::Future<Output = ()>, AccessError> {
    let chain = tls::certs(
        "serving certificate",
        &tls::read("serving certificate", &cfg.serving_cert)?,
    )?;
    let key = tls::key("serving key", &tls::read("serving key", &cfg.serving_key)?)?;
    let node_tls = cfg.nodes.client()?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| AccessError::Bind {
            addr: cfg.listen.clone(),
            source,
        })?;
    let shared = Arc::new(Shared {
        client,
        node_tls,
        chain,
        key,
        trust: RwLock::new(None),
    });
    shared.refresh_trust().await;
    let refresher = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TRUST_REFRESH).await;
            refresher.refresh_trust().await;
        }
    });
    tracing::info!(listen = %cfg.listen, "subresource API {GROUP} serving");
    Ok(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move { connection(shared, tcp, peer).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "subresource API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn connection(shared: Arc<Shared>, tcp: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    let Some(trust) = shared.trust() else {
        shared.refresh_trust().await;
        tracing::warn!(%peer, "subresource API: no front-proxy trust yet; connection refused");
        return;
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio_rustls::TlsAcceptor::from(trust.server.clone())
        .accept(tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "subresource API: TLS handshake refused");
            return;
        }
    };
    let cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::common_name);
    if !trust.proxy.name_allowed(cn.as_deref()) {
        tracing::warn!(%peer, ?cn, "subresource API: client certificate name not allowed as front proxy");
        return;
    }
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let trust = trust.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &trust, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "subresource API connection ended");
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json(code: u16, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn reject(r: &Reject) -> Response<Body> {
    json(r.code, &r.body())
}

async fn handle(shared: &Shared, trust: &Trust, req: Request<Incoming>) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    match routes::route(req.method().as_str(), &target) {
        Err(r) => reject(&r),
        Ok(Route::Group) => json(200, &routes::group_doc()),
        Ok(Route::Resources) => json(200, &routes::resources_doc()),
        Ok(Route::Vm {
            namespace,
            name,
            stream,
        }) => match vm_stream(shared, trust, req, &namespace, &name, stream).await {
            Ok(r) => r,
            Err(r) => reject(&r),
        },
    }
}

/// The `Forbidden` message kube-apiserver would write, naming what is missing.
fn forbidden_message(user: &str, sub: &str, name: &str, ns: &str, reason: &str) -> String {
    let mut m = format!(
        "virtualmachines.{GROUP} \"{name}\" is forbidden: User \"{user}\" cannot get resource \
         \"virtualmachines/{sub}\" in API group \"{GROUP}\" in the namespace \"{ns}\""
    );
    if !reason.is_empty() {
        m.push_str(": ");
        m.push_str(reason);
    }
    m
}

async fn authorize(
    shared: &Shared,
    user: &UserInfo,
    ns: &str,
    name: &str,
    sub: &str,
) -> Result<(), Reject> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.user.clone()),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()).filter(|e: &BTreeMap<_, _>| !e.is_empty()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some("virtualmachines".into()),
                subresource: Some(sub.into()),
                verb: Some("get".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(shared.client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| {
            Reject::new(
                503,
                "ServiceUnavailable",
                format!("authorization check failed: {e}"),
            )
        })?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        Ok(())
    } else {
        let reason = status.reason.unwrap_or_default();
        Err(Reject::new(
            403,
            "Forbidden",
            forbidden_message(&user.user, sub, name, ns, &reason),
        ))
    }
}

async fn vm_stream(
    shared: &Shared,
    trust: &Trust,
    req: Request<Incoming>,
    ns: &str,
    name: &str,
    stream: Stream,
) -> Result<Response<Body>, Reject> {
    let user = trust
        .proxy
        .identity(req.headers())
        .map_err(|e| Reject::new(401, "Unauthorized", e.to_string()))?;
    authorize(shared, &user, ns, name, stream.segment()).await?;
    let framing = if stream.upgrades() {
        Some(websocket_offer(&req)?)
    } else {
        None
    };
    let vms: Api<VirtualMachine> = Api::namespaced(shared.client.clone(), ns);
    let vm = vms
        .get_opt(name)
        .await
        .map_err(|e| {
            Reject::new(
                503,
                "ServiceUnavailable",
                format!("cannot read VirtualMachine {name}: {e}"),
            )
        })?
        .ok_or_else(|| {
            Reject::new(
                404,
                "NotFound",
                format!("virtualmachines.kubevmm.io \"{name}\" not found in namespace {ns}"),
            )
        })?;
    let node = match vm.status.as_ref().and_then(|s| s.node_name.clone()) {
        Some(n) => Api::<HypervisorNode>::all(shared.client.clone())
            .get_opt(&n)
            .await
            .map_err(|e| {
                Reject::new(
                    503,
                    "ServiceUnavailable",
                    format!("cannot read HypervisorNode {n}: {e}"),
                )
            })?,
        None => None,
    };
    let t = target::node_target(&vm, node.as_ref(), &stream)?;
    let request = NodeRequest {
        uid: t.uid.clone(),
        stream,
    };
    match relay::ask_node(&shared.node_tls, &t.endpoint, &t.node, &request).await? {
        NodeAnswer::Body(body) => {
            let mut r = Response::new(body.boxed());
            let kind = if request.stream == Stream::Stats {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(kind),
            );
            Ok(r)
        }
        NodeAnswer::Stream(node_stream) => {
            let (framing, accept) =
                framing.ok_or_else(|| Reject::new(500, "InternalError", "no WebSocket offer"))?;
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            Some(client_limits()),
                        )
                        .await;
                        relay::bridge(ws, node_stream, framing).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "subresource API: client upgrade failed"),
                }
            });
            switching(framing, &accept)
        }
    }
}

/// The largest WebSocket message a client may send: keystrokes and
/// port-forward chunks are small, and tungstenite's 64 MiB default would let
/// one client make the operator buffer that much.
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Limits on what a client sends over its WebSocket.
fn client_limits() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade.
fn switching(framing: Framing, accept: &str) -> Result<Response<Body>, Reject> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::SEC_WEBSOCKET_ACCEPT,
        http::HeaderValue::from_str(accept)
            .map_err(|e| Reject::new(500, "InternalError", e.to_string()))?,
    );
    h.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(framing.name()),
    );
    Ok(r)
}

/// The framing and `Sec-WebSocket-Accept` of a WebSocket upgrade request.
fn websocket_offer(req: &Request<Incoming>) -> Result<(Framing, String), Reject> {
    let h = req.headers();
    let is_ws = h
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h.get(http::header::SEC_WEBSOCKET_KEY);
    let (true, Some(key)) = (is_ws, key) else {
        return Err(Reject::new(
            400,
            "BadRequest",
            "console and portforward are WebSocket upgrades (kubectl vm console / port-forward)",
        ));
    };
    let offer = h
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let framing = Framing::choose(&offer).ok_or_else(|| {
        Reject::new(
            400,
            "BadRequest",
            format!("WebSocket subprotocol {offer:?} not supported: offer v5.channel.k8s.io, v4.channel.k8s.io or plain.kubevmm.io"),
        )
    })?;
    Ok((framing, derive_accept_key(key.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_missing_permission() {
        assert_eq!(
            forbidden_message("bob", "console", "web", "dev", ""),
            "virtualmachines.subresources.kubevmm.io \"web\" is forbidden: User \"bob\" cannot get \
             resource \"virtualmachines/console\" in API group \"subresources.kubevmm.io\" in the \
             namespace \"dev\""
        );
        assert!(
            forbidden_message("bob", "logs", "web", "dev", "no RBAC policy matched")
                .ends_with("\"dev\": no RBAC policy matched")
        );
    }
}
