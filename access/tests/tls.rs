//! Mutual TLS as the access paths use it, with certificates made by openssl
//! (as the chart and `make cluster-up` make them): a client with the right
//! CA's certificate gets in, one without a certificate or from another CA
//! does not, and the front-proxy name is read from the certificate.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kubevmm_access::tls::{certs, client_config, common_name, key, read, roots, server_config};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (installed by hack/install-deps.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `name.crt`/`name.key` signed by `ca` (self-signed CA when `ca` is None).
fn cert(dir: &Path, name: &str, cn: &str, ca: Option<&str>, ext: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
    );
    match ca {
        None => openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ),
        Some(ca) => {
            openssl(
                dir,
                &[
                    "req",
                    "-new",
                    "-key",
                    &format!("{name}.key"),
                    "-subj",
                    &format!("/CN={cn}"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.crt"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.crt"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
    }
}

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
    std::fs::create_dir_all(&dir).expect("dir");
    let server_ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
    let client_ext = "extendedKeyUsage=clientAuth\n";
    cert(&dir, "ca", "kubevmm-node-ca", None, "");
    cert(&dir, "other-ca", "someone-else", None, "");
    cert(&dir, "server", "node-a", Some("ca"), server_ext);
    cert(&dir, "client", "kubevmm-operator", Some("ca"), client_ext);
    cert(
        &dir,
        "stranger",
        "kubevmm-operator",
        Some("other-ca"),
        client_ext,
    );
    let pem = |n: &str| read("test", &dir.join(n)).expect("pem");

    let server = server_config(
        certs("server", &pem("server.crt")).unwrap(),
        key("server", &pem("server.key")).unwrap(),
        roots("ca", &pem("ca.crt")).unwrap(),
    )
    .unwrap();
    let client_with = |name: &str| {
        client_config(
            certs("client", &pem(&format!("{name}.crt"))).unwrap(),
            key("client", &pem(&format!("{name}.key"))).unwrap(),
            roots("ca", &pem("ca.crt")).unwrap(),
        )
        .unwrap()
    };
    let ip = ServerName::try_from("127.0.0.1").unwrap();
    let connect = |config: Arc<rustls::ClientConfig>| {
        handshake(
            ClientConnection::new(config, ip.clone()).unwrap(),
            ServerConnection::new(server.clone()).unwrap(),
        )
    };
    assert!(connect(client_with("client")).is_ok());
    assert!(
        connect(client_with("stranger")).is_err(),
        "a client of another CA got in"
    );
    let anonymous = rustls::ClientConfig::builder_with_provider(kubevmm_access::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots("ca", &pem("ca.crt")).unwrap())
        .with_no_client_auth();
    assert!(
        connect(Arc::new(anonymous)).is_err(),
        "a client without a certificate got in"
    );

    let c = &certs("client", &pem("client.crt")).unwrap()[0];
    assert_eq!(common_name(c).as_deref(), Some("kubevmm-operator"));
    let _ = std::fs::remove_dir_all(&dir);
}
