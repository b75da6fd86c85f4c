//! `VirtualMachineImage` import on a real node agent, from a loopback HTTP
//! server the test starts (Range, throttling and failure injection), with
//! images the test builds: checksum, format and size in status, progress of
//! a throttled download, resume after the server closes mid-transfer, one
//! download however many VMs wait, a VM booting its kernel from an image,
//! and every bad input with its reason and nothing half-made left behind.

// Each test is one story told in order, over one agent.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod agent_env;

mod images_env;

use std::path::Path;

use agent_env::start_agent_args;
use images_env::{qcow2, qemu_img, random_file, sha256, World};
use kubevmm_e2e::http_server::{Fault, Served};
use kubevmm_e2e::{crc32, free_port, run_with_input, wait_for};
use serde_json::Value;

#[test]
fn a_vm_boots_its_kernel_from_an_imported_image_and_qcow2_kernels_are_refused() {
    let w = World::new("img-boot");
    let kernel = w.env.guests.join("counter.elf");
    let len = std::fs::metadata(&kernel).expect("guest").len();
    let sha = sha256(&kernel);
    w.srv.serve(
        "counter.elf",
        Served {
            file: kernel,
            ..Served::default()
        },
    );
    w.http_image(
        "counter",
        &w.srv.url("counter.elf"),
        Some(&sha.to_uppercase()),
    );
    // Two VMs wait for the same image: one download.
    w.vm("web", "counter");
    w.vm("web2", "counter");
    w.env.wait_phase("web", "Running", 90);
    w.env.wait_phase("web2", "Running", 90);
    let uid = w.env.uid("web");
    wait_for(
        30,
        "the guest's marker on its console",
        || {
            w.env
                .console(&uid)
                .contains("counter running")
                .then_some(())
        },
        || w.env.console(&uid),
    );
    assert_eq!(w.srv.seen("counter.elf").len(), 1, "one download per node");

    let img = w.image_json("counter");
    let st = &img["status"];
    assert_eq!(st["phase"], "Ready", "{st}");
    assert_eq!(st["format"], "raw", "{st}");
    assert_eq!(st["virtualSize"], len.to_string(), "{st}");
    let e = w.entry("counter");
    assert_eq!(e["phase"], "Ready", "{e}");
    assert_eq!(e["reason"], "Imported", "{e}");
    assert_eq!(e["bytesDone"], len, "{e}");
    assert_eq!(e["bytesTotal"], len, "{e}");
    assert_eq!(e["digest"], format!("sha256:{sha}"), "{e}");
    let cond = st["conditions"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["type"] == format!("{}/Ready", w.env.node))
                .cloned()
        })
        .expect("node condition");
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("True"), Some("Imported"))
    );
    let cached = w.env.state.join("images").join(format!("sha256-{sha}"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cached).expect("cached").permissions(),
    );
    assert_eq!(mode & 0o777, 0o444, "cached images are read-only");
    let events = w.env.events_mentioning("counter", "Imported");
    assert!(events.contains("Imported"), "{events}");

    // A qcow2 named as a kernel: imported (format and size in status), refused naming the field.
    let q = qcow2(&w.dir, "disk.qcow2");
    w.srv.serve(
        "disk.qcow2",
        Served {
            file: q,
            ..Served::default()
        },
    );
    w.http_image("disk", &w.srv.url("disk.qcow2"), None);
    w.vm("qk", "disk");
    w.wait_entry("disk", "Ready", |e| e["phase"] == "Ready");
    let st = w.image_json("disk")["status"].clone();
    assert_eq!(
        (st["format"].as_str(), st["virtualSize"].as_str()),
        (Some("qcow2"), Some("4194304")),
        "{st}"
    );
    let ready = wait_for(
        60,
        "the qcow2 kernel to be refused",
        || {
            w.env
                .condition("qk", "Ready")
                .filter(|c| c["reason"] == "InvalidSpec")
        },
        || w.env.describe("qk"),
    );
    let msg = ready["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("spec.boot.kernel.image: VirtualMachineImage disk is a qcow2"),
        "{msg}"
    );
    assert_eq!(
        w.env.phase("web").as_deref(),
        Some("Running"),
        "other VMs are unaffected"
    );
}

#[test]
fn progress_is_reported_and_a_broken_transfer_resumes() {
    let w = World::new("img-progress");
    // 12 MiB at 1 MiB/s: several progress updates, on the image and (every
    // 5 s) in the VM's Ready message.
    let slow = random_file(&w.dir, "slow.img", 12 << 20);
    w.srv.serve(
        "slow.img",
        Served {
            file: slow,
            rate: Some(1 << 20),
            ..Served::default()
        },
    );
    w.http_image("slow", &w.srv.url("slow.img"), None);
    w.vm("slow", "slow");
    let e = w.wait_entry("slow", "progress between 0 and the total", |e| {
        e["phase"] == "Importing"
            && e["bytesDone"]
                .as_i64()
                .is_some_and(|d| d > 0 && d < 12 << 20)
            && e["bytesTotal"] == 12 << 20
    });
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("MiB of 12.0 MiB"),
        "{e}"
    );
    let c = w.env.condition("slow", "Ready").expect("Ready");
    assert_eq!(c["reason"], "ImageImporting", "{c}");
    assert_eq!(w.image_json("slow")["status"]["phase"], "Importing");
    // `kubectl get vm` says Importing; describe gives the percent.
    let vm = w.env.vm("slow").expect("vm");
    assert_eq!(vm["status"]["printableStatus"], "Importing", "{vm}");
    wait_for(
        30,
        "the VM's Ready message to give the import's percent",
        || {
            let c = w.env.condition("slow", "Ready")?;
            let m = c["message"].as_str()?.to_string();
            (m.contains("MiB of 12.0 MiB (") && m.contains("%)")).then_some(())
        },
        || w.env.describe("slow"),
    );
    w.wait_entry("slow", "Ready", |e| {
        e["phase"] == "Ready" && e["bytesDone"] == 12 << 20
    });

    // The server closes the connection after 1.5 MiB of 4 MiB, twice.
    let cut = random_file(&w.dir, "cut.img", 4 << 20);
    let sha = sha256(&cut);
    w.srv.serve(
        "cut.img",
        Served {
            file: cut,
            fault: Fault::CloseAfter {
                bytes: 3 << 19,
                times: 2,
            },
            ..Served::default()
        },
    );
    w.http_image("cut", &w.srv.url("cut.img"), Some(&sha));
    w.vm("cut", "cut");
    let e = w.wait_entry("cut", "Ready", |e| e["phase"] == "Ready");
    assert_eq!(e["digest"], format!("sha256:{sha}"), "{e}");
    let seen = w.srv.seen("cut.img");
    assert!(
        seen.iter()
            .any(|s| s.range.as_deref() == Some(&format!("bytes={}-", 3 << 19))),
        "a request resumed at the cut: {seen:?}"
    );
    assert!(
        seen.len() <= 4,
        "resumed, not restarted in a loop: {seen:?}"
    );
    assert!(
        !w.cache().iter().any(|n| n.starts_with(".partial-")),
        "{:?}",
        w.cache()
    );
}

#[test]
fn each_bad_input_has_its_reason_and_leaves_nothing_behind() {
    let w = World::new("img-bad");
    let ok_len = 1 << 20;
    let plain = random_file(&w.dir, "plain.img", ok_len);
    w.srv.serve(
        "plain.img",
        Served {
            file: plain.clone(),
            ..Served::default()
        },
    );
    w.srv.serve(
        "fails.img",
        Served {
            file: plain.clone(),
            fault: Fault::Status(500),
            ..Served::default()
        },
    );
    w.srv.serve(
        "huge.img",
        Served {
            file: plain,
            fault: Fault::ClaimLength(1 << 52),
            ..Served::default()
        },
    );
    // A qcow2 header with 1 GiB clusters, and a real qcow2 with incompatible feature bit 5.
    let mut corrupt = vec![0u8; 4096];
    corrupt[..4].copy_from_slice(b"QFI\xfb");
    corrupt[7] = 3;
    corrupt[23] = 30;
    std::fs::write(w.dir.join("corrupt.qcow2"), corrupt).expect("write");
    w.srv.serve(
        "corrupt.qcow2",
        Served {
            file: w.dir.join("corrupt.qcow2"),
            ..Served::default()
        },
    );
    let feat = qcow2(&w.dir, "feature.qcow2");
    let mut b = std::fs::read(&feat).expect("read");
    b[79] |= 1 << 5;
    std::fs::write(&feat, b).expect("write");
    w.srv.serve(
        "feature.qcow2",
        Served {
            file: feat,
            ..Served::default()
        },
    );
    // A symlink in the allowed directory that leads out of it.
    let link = w.env.guests.join(format!("escape-{}", w.env.ns));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");

    let dead = format!("http://127.0.0.1:{}/x.img", free_port().expect("port"));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "unreachable",
            format!("{{http: {{url: \"{dead}\"}}}}"),
            "HostUnreachable",
            "cannot reach",
        ),
        (
            "notfound",
            format!("{{http: {{url: \"{}\"}}}}", w.srv.url("missing.img")),
            "HttpNotFound",
            "HTTP 404",
        ),
        (
            "servererror",
            format!("{{http: {{url: \"{}\"}}}}", w.srv.url("fails.img")),
            "HttpServerError",
            "HTTP 500",
        ),
        (
            "checksum",
            format!(
                "{{http: {{url: \"{}\", sha256: \"{}\"}}}}",
                w.srv.url("plain.img"),
                "0".repeat(64)
            ),
            "ChecksumMismatch",
            "the download was discarded",
        ),
        (
            "corrupt",
            format!("{{http: {{url: \"{}\"}}}}", w.srv.url("corrupt.qcow2")),
            "CorruptImage",
            "cluster_bits 30",
        ),
        (
            "feature",
            format!("{{http: {{url: \"{}\"}}}}", w.srv.url("feature.qcow2")),
            "UnsupportedImage",
            "incompatible feature bit 5",
        ),
        (
            "huge",
            format!("{{http: {{url: \"{}\"}}}}", w.srv.url("huge.img")),
            "InsufficientSpace",
            "needs 4503599627370496 bytes",
        ),
        (
            "outside",
            "{path: /etc/hostname}".into(),
            "PathNotAllowed",
            "outside the allowed directories",
        ),
        (
            "escape",
            format!("{{path: {}}}", link.display()),
            "PathEscapesAllowedDir",
            "resolves outside the allowed directory",
        ),
    ];
    for (name, source, _, _) in &cases {
        w.image(name, source);
        w.vm(name, name);
    }
    for (name, _, reason, words) in &cases {
        let e = w.wait_entry(name, reason, |e| {
            e["phase"] == "Failed" && e["reason"] == *reason
        });
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{name}: {msg}");
        let c = wait_for(
            60,
            &format!("VM {name} to show the failure"),
            || {
                w.env
                    .condition(name, "Ready")
                    .filter(|c| c["reason"] == "ImageFailed")
            },
            || w.env.describe(name),
        );
        let m = c["message"].as_str().unwrap_or_default();
        assert!(
            m.starts_with(&format!("spec.boot.kernel.image: {reason}: ")),
            "{name}: {m}"
        );
        assert_eq!(w.image_json(name)["status"]["phase"], "Failed");
        let ev = w.env.events_mentioning(name, reason);
        assert!(ev.contains(reason), "{name}: no {reason} event:\n{ev}");
    }
    // Nothing half-made: once no VM asks any more, no partial file is left
    // and nothing entered the cache.
    w.env
        .kubectl(&["delete", "vm", "--all", "--wait=true", "--timeout=60s"]);
    wait_for(
        40,
        "no partial download left",
        || w.cache().is_empty().then_some(()),
        || format!("{:?}", w.cache()),
    );
    let _ = std::fs::remove_file(&link);
}

#[test]
fn the_cache_survives_agent_restarts_and_unused_images_are_collected() {
    let mut w = World::with_agent_args("img-cache", &["--image-cache-grace-seconds", "3"]);
    let kernel = w.env.guests.join("counter.elf");
    let sha = sha256(&kernel);
    w.srv.serve(
        "k.elf",
        Served {
            file: kernel,
            ..Served::default()
        },
    );
    w.http_image("k", &w.srv.url("k.elf"), Some(&sha));
    w.vm("a", "k");
    w.env.wait_phase("a", "Running", 90);
    let cached = w.env.state.join("images").join(format!("sha256-{sha}"));
    assert!(cached.is_file());

    // A restarted agent finds the image in its cache: no second download.
    w.env.agent.kill();
    w.env.agent = start_agent_args(
        w.env.cp,
        &w.env.node,
        &w.env.state,
        &w.env.guests,
        "agent2.log",
        "1",
        &["--image-cache-grace-seconds", "3"],
    );
    w.vm("b", "k");
    w.env.wait_phase("b", "Running", 90);
    assert_eq!(
        w.srv.seen("k.elf").len(),
        1,
        "the cache survived the restart"
    );

    // Past the grace period, but VMMs hold it: kept.
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert!(cached.is_file(), "an image in use is never collected");

    // No VM left: collected after the grace period, index and all.
    w.env
        .kubectl(&["delete", "vm", "a", "b", "--wait=true", "--timeout=90s"]);
    wait_for(
        30,
        "the unused image to be collected",
        || (!cached.exists() && w.cache().is_empty()).then_some(()),
        || {
            format!(
                "{:?}\n{}",
                w.cache(),
                agent_env::tail(&w.env.agent.output())
            )
        },
    );
    assert!(
        std::fs::read_dir(w.env.state.join("images/index"))
            .expect("index")
            .next()
            .is_none(),
        "the index entry went with the file"
    );
    // The image no longer says this node holds it.
    let status = wait_for(
        30,
        "this node's entry to leave the image's status",
        || {
            let s = w.image_json("k")["status"].clone();
            (w.entry("k").is_null()).then_some(s)
        },
        || w.image_json("k")["status"].to_string(),
    );
    let conds = status["conditions"].as_array().cloned().unwrap_or_default();
    assert!(
        !conds.iter().any(|c| c["type"]
            .as_str()
            .is_some_and(|t| t.contains(w.env.node.as_str()))),
        "{status}"
    );
}

#[test]
fn an_image_disk_is_a_qcow2_overlay_over_the_untouched_cached_base() {
    let w = World::new("img-disk");
    let base = qcow2(&w.dir, "root.qcow2");
    let sha = sha256(&base);
    w.srv.serve(
        "root.qcow2",
        Served {
            file: base.clone(),
            ..Served::default()
        },
    );
    w.http_image("root", &w.srv.url("root.qcow2"), Some(&sha));
    // The blk guest reads its disk (CRC of the first 64 KiB), writes and
    // flushes sector 200, discards 300..307, and powers off.
    let m = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: d\nspec:\n  cpus: 1\n  memory: 64Mi\n  \
         runStrategy: Once\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: {kernel}}}\n  \
         disks:\n  - name: root\n    image: {{name: root}}\n",
        node = w.env.node,
        kernel = w.env.guests.join("blk.elf").display(),
    );
    let o = run_with_input(
        w.env
            .cp
            .kubectl()
            .args(["apply", "-n", &w.env.ns, "-f", "-"]),
        &m,
    );
    assert!(o.success, "{}", o.stderr);
    w.env.wait_phase("d", "Succeeded", 120);
    let uid = w.env.uid("d");
    let console = w.env.console(&uid);
    let raw =
        std::fs::read(w.dir.join("root.qcow2.raw")).expect("the raw disk the qcow2 was made of");
    let want = format!("disk crc32 {:#018x}", crc32(&raw[..64 * 1024]));
    assert!(console.contains(&want), "{want} not in:\n{console}");
    assert!(
        console.contains("blk test passed"),
        "write, flush, read-back and discard on the overlay:\n{console}"
    );

    // The overlay lives with the VM; its backing file is the cached base.
    let overlay = w.env.state.join("disks").join(&uid).join("disk-root.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let chain: Value = serde_json::from_slice(&info.stdout).expect("json");
    let chain = chain.as_array().expect("chain");
    assert_eq!(chain.len(), 2, "overlay and base: {chain:?}");
    assert_eq!(chain[0]["format"], "qcow2");
    let backing = chain[0]["full-backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        backing.contains("/images/sha256-"),
        "backed by the cache: {backing}"
    );
    assert_eq!(
        sha256(Path::new(&backing)),
        sha,
        "the cached base is never written"
    );
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(&overlay)
        .output()
        .expect("qemu-img check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The guest's write went to the overlay (sector 200 holds its pattern).
    let out = w.dir.join("overlay.raw");
    let (o_in, o_out) = (overlay.display().to_string(), out.display().to_string());
    qemu_img(&["convert", "-U", "-O", "raw", &o_in, &o_out]);
    let flat = std::fs::read(&out).expect("flattened overlay");
    let pattern: Vec<u8> = (0..4096u32)
        .map(|i| 0x5au8.wrapping_add((i * 7) as u8))
        .collect();
    assert_eq!(
        flat[200 * 512..200 * 512 + 4096],
        pattern[..],
        "the guest's write is in the overlay"
    );
    assert_eq!(
        flat[..100 * 512],
        raw[..100 * 512],
        "unwritten data comes from the base"
    );
}

/// Runs `openssl` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
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

/// `openssl s_server -WWW`: serves the files of its directory over https.
struct TlsServer(std::process::Child);

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_imports_trust_the_nodes_certificate_authorities_only() {
    let mut w = World::new("img-https");
    let tls = w.dir.join("tls");
    std::fs::create_dir_all(&tls).expect("dir");
    let kernel = w.env.guests.join("counter.elf");
    std::fs::copy(&kernel, tls.join("k.elf")).expect("copy");
    let sha = sha256(&kernel);
    // A private CA and a certificate for 127.0.0.1 signed by it.
    openssl(
        &tls,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=kubevmm test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        &tls,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        tls.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        &tls,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = free_port().expect("port").to_string();
    let _server = TlsServer(
        std::process::Command::new("openssl")
            .current_dir(&tls)
            .args(["s_server", "-quiet", "-accept", &port, "-cert", "srv.pem"])
            .args(["-key", "srv.key", "-WWW"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_for(
        10,
        "the https server to listen",
        || std::net::TcpStream::connect(format!("127.0.0.1:{port}")).ok(),
        String::new,
    );
    w.http_image("k", &format!("https://127.0.0.1:{port}/k.elf"), Some(&sha));

    // The node does not trust that CA: refused, the reason says why.
    w.vm("a", "k");
    let e = w.wait_entry("k", "refused over an untrusted certificate", |e| {
        e["phase"] == "Failed"
    });
    let msg = e["message"].as_str().unwrap_or_default();
    assert_eq!(e["reason"], "HostUnreachable", "{e}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(w.cache().is_empty(), "nothing cached: {:?}", w.cache());
    w.env
        .kubectl(&["delete", "vm", "a", "--wait=true", "--timeout=60s"]);

    // A node that trusts it (SSL_CERT_FILE, as rustls-native-certs reads
    // it; on a real node the CA goes into the system bundle): imported,
    // verified, and the VM boots from it.
    w.env.agent.kill();
    w.env.agent = agent_env::start_agent_env(
        w.env.cp,
        &w.env.node,
        &w.env.state,
        &w.env.guests,
        "agent2.log",
        "1",
        &[],
        &[("SSL_CERT_FILE", &tls.join("ca.pem"))],
    );
    w.vm("b", "k");
    let e = w.wait_entry("k", "imported over https", |e| e["phase"] == "Ready");
    assert_eq!(e["digest"], format!("sha256:{sha}"), "{e}");
    w.env.wait_phase("b", "Running", 90);
}
