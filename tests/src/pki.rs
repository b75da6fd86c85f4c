//! Certificates for the access paths, made with openssl as `make
//! cluster-up` and the chart make them: the subresource API's serving
//! certificate (trusted by kube-apiserver through the `APIService`'s
//! `caBundle`), node-vmm's serving certificate and the operator's client
//! certificate for nodes (one node CA for both).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{run_with_input, wait_for, ControlPlane};

/// The Service the tests register the subresource API's `APIService` with.
pub const SERVICE: &str = "subresource-api";
/// Its namespace (exists while the operator runs: it holds the Leases).
pub const SERVICE_NAMESPACE: &str = "kubevmm-system";

/// The files of one test's access PKI.
#[derive(Debug, Clone)]
pub struct AccessPki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (hack/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `name.key`: a P-256 private key.
fn key(dir: &Path, name: &str) {
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
}

fn ca(dir: &Path, name: &str) {
    key(dir, name);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "7",
            "-out",
            &format!("{name}.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

fn leaf(dir: &Path, name: &str, cn: &str, ca: &str, ext: &str) {
    key(dir, name);
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
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("extension file");
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
            "7",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

impl AccessPki {
    /// Where the keys and certificates are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the CAs and certificates in `dir`: the subresource API's valid
    /// for `ip` (the machine's non-loopback address) and 127.0.0.1.
    pub fn new(dir: &Path, ip: &str) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        // kube-apiserver checks the name of the APIService's Service.
        let serving = format!(
            "subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost,DNS:{SERVICE}.{SERVICE_NAMESPACE}.svc\n\
             extendedKeyUsage=serverAuth\n"
        );
        ca(dir, "access-ca");
        leaf(
            dir,
            "access-serving",
            "kubevmm-access",
            "access-ca",
            &serving,
        );
        ca(dir, "node-ca");
        // One name for every node (kubevmm_access::node_api::SERVER_NAME).
        leaf(
            dir,
            "node-serving",
            "node-vmm",
            "node-ca",
            "subjectAltName=DNS:node-vmm.kubevmm.internal\nextendedKeyUsage=serverAuth\n",
        );
        leaf(
            dir,
            "operator-client",
            "kubevmm-operator",
            "node-ca",
            "extendedKeyUsage=clientAuth\n",
        );
        Self { dir: dir.into() }
    }

    /// `name.crt` / `name.key` in the PKI directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The operator's flags for the subresource API on `listen`.
    pub fn operator_flags(&self, listen: &str) -> Vec<String> {
        let f = |n: &str| self.file(n).display().to_string();
        vec![
            "--access-listen".into(),
            listen.into(),
            "--access-cert".into(),
            f("access-serving.crt"),
            "--access-key".into(),
            f("access-serving.key"),
            "--node-client-cert".into(),
            f("operator-client.crt"),
            "--node-client-key".into(),
            f("operator-client.key"),
            "--node-ca".into(),
            f("node-ca.crt"),
        ]
    }

    /// node-vmm's flags for its access server on `listen`.
    pub fn agent_flags(&self, listen: &str) -> Vec<String> {
        let f = |n: &str| self.file(n).display().to_string();
        vec![
            "--access-listen".into(),
            listen.into(),
            "--access-cert".into(),
            f("node-serving.crt"),
            "--access-key".into(),
            f("node-serving.key"),
            "--access-client-ca".into(),
            f("node-ca.crt"),
        ]
    }

    /// The PEM of the CA that signed the subresource API's certificate.
    pub fn ca_bundle(&self) -> String {
        std::fs::read_to_string(self.file("access-ca.crt")).expect("access CA")
    }
}

/// This machine's first non-loopback IPv4 address: kube-apiserver refuses
/// loopback endpoints for the aggregated API.
pub fn host_ip() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            cidr.split('/').next().map(str::to_string)
        })
        .expect("a non-loopback IPv4 address on this machine (the aggregated API needs one)")
}

/// The `APIService` of the subresource API, its Service and Endpoints,
/// pointing at an operator (a host process, so a selector-less
/// Service with the machine's address).
pub fn register_api_service(
    cp: &ControlPlane,
    pki: &AccessPki,
    ip: &str,
    port: u16,
    logs: impl Fn() -> String,
) {
    use std::io::Write as _;
    let ca = {
        let mut b64 = Command::new("base64")
            .args(["-w0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("base64");
        b64.stdin
            .take()
            .expect("stdin")
            .write_all(pki.ca_bundle().as_bytes())
            .expect("write");
        let out = b64.wait_with_output().expect("base64");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (name, ns) = (SERVICE, SERVICE_NAMESPACE);
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  ports: [{{name: https, port: 443, targetPort: {port}}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         subsets: [{{addresses: [{{ip: {ip}}}], ports: [{{name: https, port: {port}}}]}}]\n---\n\
         apiVersion: apiregistration.k8s.io/v1\nkind: APIService\n\
         metadata: {{name: v1alpha1.subresources.kubevmm.io}}\n\
         spec:\n  group: subresources.kubevmm.io\n  version: v1alpha1\n  groupPriorityMinimum: 1000\n  \
         versionPriority: 15\n  service: {{name: {name}, namespace: {ns}, port: 443}}\n  caBundle: {ca}\n"
    );
    let out = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &manifest);
    assert!(out.success, "registering the APIService: {}", out.stderr);
    wait_for(
        60,
        "the APIService to be Available",
        || {
            let out = cp
                .kubectl()
                .args([
                    "get",
                    "apiservice",
                    "v1alpha1.subresources.kubevmm.io",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Available')].status}",
                ])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout) == "True").then_some(())
        },
        || {
            let out = cp
                .kubectl()
                .args([
                    "get",
                    "apiservice",
                    "v1alpha1.subresources.kubevmm.io",
                    "-o",
                    "yaml",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            format!("{out}\n{}", logs())
        },
    );
}
