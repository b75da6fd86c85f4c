//! Reaching the cluster as kubectl does (`--kubeconfig`, `KUBECONFIG`,
//! `--context`, `-n`), and API errors turned into what the user should do.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where to connect, from the global flags.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--kubeconfig`: else `KUBECONFIG`, else `~/.kube/config`, else in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// `-n`: else the context's namespace, else `default`.
    pub namespace: Option<String>,
}

/// Why the cluster cannot be reached or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The kubeconfig cannot be read or has no such context.
    #[error("cannot use the kubeconfig{}: {source} (check --kubeconfig, KUBECONFIG and --context)", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Kubeconfig {
        /// The file, when given.
        path: Option<PathBuf>,
        /// What went wrong.
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig at all and not in a pod.
    #[error("no kubeconfig found and not running in a cluster: {0} (give --kubeconfig or set KUBECONFIG)")]
    Infer(kube::config::InferConfigError),
    /// The client could not be built.
    #[error("cannot build an API client: {0}")]
    Client(kube::Error),
}

/// A client and the namespace to work in.
pub async fn connect(t: &Target) -> Result<(Client, String), ConnectError> {
    let options = KubeConfigOptions {
        context: t.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &t.kubeconfig {
        Some(path) => {
            let err = |source| ConnectError::Kubeconfig {
                path: Some(path.clone()),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(err)?
        }
        None if t.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|source| ConnectError::Kubeconfig { path: None, source })?,
        None => Config::infer().await.map_err(ConnectError::Infer)?,
    };
    // kube's default client retries 429, 503 and 504 up to 15 times with
    // exponential backoff, minutes in all: a command a person waits for
    // reports the answer at once instead (the subresource API says 503 for
    // a VM whose node is lost), as kubectl does without a Retry-After.
    let mut config = config;
    config.default_retry = false;
    let namespace = t
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(ConnectError::Client)?;
    Ok((client, namespace))
}

/// What a failed request was trying to do, for its message.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The RBAC verb (`get`, `list`, `patch`, `create`).
    pub verb: &'a str,
    /// The resource, e.g. `virtualmachines`.
    pub resource: &'a str,
    /// The object's name, if one.
    pub name: Option<&'a str>,
    /// The namespace; `None` for cluster-wide.
    pub namespace: Option<&'a str>,
}

/// A failed request in words that name the cause and the fix.
pub fn explain(e: &kube::Error, a: Attempt<'_>) -> String {
    let place = a.namespace.map_or_else(
        || "cluster-wide".to_string(),
        |n| format!("in namespace {n}"),
    );
    match e {
        kube::Error::Api(s) if s.code == 404 => match a.name {
            Some(name) => format!(
                "VirtualMachine {name} not found {place} (`kubectl vm list -A` lists them all)"
            ),
            None => format!("{} not found {place}: {}", a.resource, s.message),
        },
        kube::Error::Api(s) if s.code == 403 => format!(
            "forbidden: you may not {} {}.kubevmm.io {place}; ask an administrator to bind \
             you the edit role there (or the chart's kubevmm-vm-user). The API server said: {}",
            a.verb, a.resource, s.message
        ),
        kube::Error::Api(s) if s.code == 401 => format!(
            "not logged in: the API server refused the credentials of this kubeconfig ({})",
            s.message
        ),
        kube::Error::Api(s) if s.code == 409 => {
            format!(
                "{}: someone else changed it meanwhile; run the command again",
                s.message
            )
        }
        kube::Error::Api(s) => format!(
            "the API server refused to {} {}: {}",
            a.verb, a.resource, s.message
        ),
        other => format!("cannot reach the API server: {other} (check --kubeconfig and --context)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": message, "reason": "", "code": code
        }))
        .unwrap();
        kube::Error::Api(status.into())
    }

    #[test]
    fn errors_name_the_cause_and_the_fix() {
        let a = Attempt {
            verb: "patch",
            resource: "virtualmachines",
            name: Some("web"),
            namespace: Some("dev"),
        };
        assert_eq!(
            explain(&api(404, "not found"), a),
            "VirtualMachine web not found in namespace dev (`kubectl vm list -A` lists them all)"
        );
        let forbidden = explain(&api(403, "user \"bob\" cannot patch"), a);
        assert!(
            forbidden.starts_with(
                "forbidden: you may not patch virtualmachines.kubevmm.io in namespace dev"
            ),
            "{forbidden}"
        );
        assert!(explain(&api(409, "conflict"), a).contains("run the command again"));
    }
}
