//! Mutual TLS for the access paths: PEM files in, rustls configurations out
//! (ring provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN). Servers here always
//! require a client certificate from the given CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// PEM without the expected items, or malformed.
    #[error("{what}: {why}")]
    Pem {
        /// What the PEM is for.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being set up.
        what: &'static str,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client certificate verifier cannot be built (e.g. no CA).
    #[error("client certificate verification: {0}")]
    Verifier(String),
}

/// The crypto provider of every configuration here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })
}

/// Every certificate in `pem`; at least one.
pub fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn key(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what,
        why: format!("no usable private key: {e}"),
    })
}

/// A trust store of the certificates in `pem`.
pub fn roots(what: &'static str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(what, pem)? {
        store
            .add(c)
            .map_err(|source| TlsError::Rustls { what, source })?;
    }
    Ok(store)
}

/// A server that presents `chain`/`key` and accepts only clients with a
/// certificate issued by `client_roots`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: RootCertStore,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "server protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate",
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client that presents `chain`/`key` and trusts servers issued by
/// `server_roots`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_roots: RootCertStore,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "client protocol versions",
            source,
        })?
        .with_root_certificates(server_roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "client certificate",
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server and client configurations from PEM files, as the binaries' flags
/// name them.
#[derive(Debug, Clone)]
pub struct Files {
    /// The certificate chain presented.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA the peer's certificate must chain to.
    pub ca: PathBuf,
}

impl Files {
    /// A server requiring client certificates from `ca`.
    pub fn server(&self) -> Result<Arc<ServerConfig>, TlsError> {
        server_config(
            certs("certificate", &read("certificate", &self.cert)?)?,
            key("private key", &read("private key", &self.key)?)?,
            roots("client CA", &read("client CA", &self.ca)?)?,
        )
    }

    /// A client trusting servers from `ca`.
    pub fn client(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config(
            certs("certificate", &read("certificate", &self.cert)?)?,
            key("private key", &read("private key", &self.key)?)?,
            roots("server CA", &read("server CA", &self.ca)?)?,
        )
    }
}

/// The subject common name of a certificate, if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
