//! What the image tests share: a node agent and operator (`agent_env`), a
//! loopback HTTP server, and helpers to make, serve and inspect images.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};

use super::agent_env::{self, Env};
use kubevmm_e2e::http_server::FileServer;
use kubevmm_e2e::{run_with_input, wait_for};
use serde_json::Value;

pub fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// A file of `len` pseudo-random bytes (no format magic).
pub fn random_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

pub fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(st.success(), "qemu-img {args:?}");
}

/// A qcow2 with compressed clusters and holes, of a 4 MiB raw disk whose
/// first MiB holds a pattern.
pub fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().take(1 << 20).enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&raw, data).expect("raw");
    let out = dir.join(name);
    let (r, o) = (raw.display().to_string(), out.display().to_string());
    qemu_img(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", &r, &o]);
    out
}

pub struct World {
    pub env: Env,
    pub srv: FileServer,
    pub dir: PathBuf,
}

impl World {
    pub fn new(test: &str) -> Self {
        Self::with_agent_args(test, &[])
    }

    pub fn with_agent_args(test: &str, agent: &[&str]) -> Self {
        // Most VMs here wait for an image and never run a guest: let many fit.
        let env = Env::with_args(test, agent, &["--cpu-overcommit", "16"]);
        let dir = env.state.join("served");
        std::fs::create_dir_all(&dir).expect("served dir");
        Self {
            env,
            srv: FileServer::start().expect("http server"),
            dir,
        }
    }

    pub fn image(&self, name: &str, source: &str) {
        let m = format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachineImage\nmetadata: {{name: {name}}}\nspec:\n  source: {source}\n"
        );
        let o = run_with_input(
            self.env
                .cp
                .kubectl()
                .args(["apply", "-n", &self.env.ns, "-f", "-"]),
            &m,
        );
        assert!(o.success, "image {name}: {}", o.stderr);
    }

    pub fn http_image(&self, name: &str, url: &str, sha: Option<&str>) {
        let sha = sha
            .map(|s| format!(", sha256: \"{s}\""))
            .unwrap_or_default();
        self.image(name, &format!("{{http: {{url: \"{url}\"{sha}}}}}"));
    }

    pub fn vm(&self, name: &str, kernel_image: &str) {
        let m = format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: 1\n  memory: 64Mi\n  \
             terminationGracePeriodSeconds: 5\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{image: {kernel_image}}}\n",
            node = self.env.node
        );
        let o = run_with_input(
            self.env
                .cp
                .kubectl()
                .args(["apply", "-n", &self.env.ns, "-f", "-"]),
            &m,
        );
        assert!(o.success, "vm {name}: {}", o.stderr);
    }

    pub fn image_json(&self, name: &str) -> Value {
        serde_json::from_str(&self.env.kubectl(&["get", "vmimage", name, "-o", "json"]))
            .expect("json")
    }

    /// This node's entry of the image's status.
    pub fn entry(&self, name: &str) -> Value {
        let img = self.image_json(name);
        img.pointer("/status/nodes")
            .and_then(Value::as_array)
            .and_then(|n| {
                n.iter()
                    .find(|e| e["node"] == self.env.node.as_str())
                    .cloned()
            })
            .unwrap_or(Value::Null)
    }

    pub fn wait_entry(&self, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(
            90,
            &format!("image {name}: {what}"),
            || Some(self.entry(name)).filter(|e| f(e)),
            || {
                format!(
                    "{}\n{}",
                    self.image_json(name)["status"],
                    agent_env::tail(&self.env.agent.output())
                )
            },
        )
    }

    pub fn cache(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.env.state.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "index" && n != "published")
            .collect();
        v.sort();
        v
    }
}
