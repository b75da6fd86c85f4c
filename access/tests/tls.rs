//! Mutual TLS as the access paths use it, with certificates made by openssl
//! (as the chart and `make cluster-up` make them): a client with the right
//! CA's certificate gets in, one without a certificate or from another CA
//! does not, and the front-proxy name is read from the certificate.

use std::sync::Arc;

use kubevmm_access::node_api::SERVER_NAME;
use kubevmm_access::tls::{certs, client_config, common_name, key, read, roots, server_config};
use kubevmm_e2e::pki::AccessPki;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

/// Runs a handshake between the two ends in memory; `Err` with the first failure.
fn handshake(
    mut client: ClientConnection,
    mut server: ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("write");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("read");
            server.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("write");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("read");
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn only_clients_of_the_ca_get_in() {
    let dir = std::env::temp_dir().join(format!("kubevmm-access-tls-{}", std::process::id()));
    let pki = AccessPki::new(&dir, "127.0.0.1");
    let pem = |n: &str| read("test", &pki.file(n)).expect("pem");
    // node-vmm's end: its certificate, the node CA for clients.
    let server = server_config(
        certs("server", &pem("node-serving.crt")).unwrap(),
        key("server", &pem("node-serving.key")).unwrap(),
        roots("ca", &pem("node-ca.crt")).unwrap(),
    )
    .unwrap();
    let client_with = |name: &str| {
        client_config(
            certs("client", &pem(&format!("{name}.crt"))).unwrap(),
            key("client", &pem(&format!("{name}.key"))).unwrap(),
            roots("ca", &pem("node-ca.crt")).unwrap(),
        )
        .unwrap()
    };
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let connect = |config: Arc<rustls::ClientConfig>| {
        handshake(
            ClientConnection::new(config, name.clone()).unwrap(),
            ServerConnection::new(server.clone()).unwrap(),
        )
    };
    assert!(connect(client_with("operator-client")).is_ok());
    // A certificate of another CA (the subresource API's) is refused.
    assert!(
        connect(client_with("access-serving")).is_err(),
        "a client of another CA got in"
    );
    let anonymous = rustls::ClientConfig::builder_with_provider(kubevmm_access::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots("ca", &pem("node-ca.crt")).unwrap())
        .with_no_client_auth();
    assert!(
        connect(Arc::new(anonymous)).is_err(),
        "a client without a certificate got in"
    );
    let c = &certs("client", &pem("operator-client.crt")).unwrap()[0];
    assert_eq!(common_name(c).as_deref(), Some("kubevmm-operator"));
    let _ = std::fs::remove_dir_all(&dir);
}
