//! `masquerade` networks end to end: a real agent makes its bridge, NAT,
//! anti-spoofing rules and DHCP server; our `dhcpnet` guest takes a lease
//! over virtio-net and answers ARP, ICMP, UDP and TCP echo. Every network
//! here is one the test makes: the bridge has a name and subnet of its own,
//! the "outside" is a namespace joined by a veth that the agent is told is
//! its uplink, and traffic goes only to addresses inside them.
mod agent_env;
mod net_env;

use agent_env::{start_agent_args, Env};
use kubevmm_e2e::{run_with_input, wait_for};
use net_env::{sh, try_sh, Nets};
use serde_json::Value;

fn apply_vm(env: &Env, name: &str, cmdline: &str) {
    apply_manifest(env, name, cmdline, "");
}

/// A dhcpnet VM with one masquerade NIC; `nic` adds lines to it.
fn apply_manifest(env: &Env, name: &str, cmdline: &str, nic: &str) {
    let manifest = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: 1\n  memory: 64Mi\n  \
         terminationGracePeriodSeconds: 1\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: {kernel}}}\n    \
         cmdline: \"{cmdline}\"\n  networks:\n  - name: default\n    masquerade: {{}}\n{nic}",
        node = env.node,
        kernel = env.guests.join("dhcpnet.elf").display(),
    );
    let out = run_with_input(
        env.cp.kubectl().args(["apply", "-n", &env.ns, "-f", "-"]),
        &manifest,
    );
    assert!(out.success, "apply refused: {}", out.stderr);
}

/// The guest's `dhcp: bound ...` line, parsed into words.
fn bound(env: &Env, name: &str, after: usize) -> Vec<String> {
    let uid = env.uid(name);
    wait_for(
        120,
        &format!("{name} to take a DHCP lease"),
        || {
            // Whole lines only: the guest may be in the middle of one.
            let c = env.console(&uid);
            let whole = &c[..c.rfind('\n').map_or(0, |i| i + 1)];
            whole
                .lines()
                .filter(|l| l.starts_with("dhcp: bound "))
                .nth(after)
                .map(|l| l.split_whitespace().map(String::from).collect())
        },
        || format!("{}\n{}", env.console(&uid), env.describe(name)),
    )
}

fn status_ip(env: &Env, name: &str) -> Option<String> {
    env.vm(name)?
        .pointer("/status/interfaces/0/ipAddress")?
        .as_str()
        .map(String::from)
}

fn console_has(env: &Env, name: &str, what: &str) {
    let uid = env.uid(name);
    wait_for(
        90,
        &format!("{name} to print {what:?}"),
        || env.console(&uid).contains(what).then_some(()),
        || env.console(&uid),
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one network's story
fn masquerade_guests_get_stable_addresses_talk_and_reach_the_outside_through_nat() {
    let nets = Nets::new(0);
    let args = nets.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = Env::with_args("net", &args, &["--cpu-overcommit", "8"]);

    // A guest takes its lease with the options it should; the address is
    // in status and the IP column; the host reaches it (ICMP, UDP, TCP).
    apply_vm(&env, "g1", &format!("ping={}", nets.peer()));
    let words = bound(&env, "g1", 0);
    let ip = words[2].clone();
    assert!(
        ip.starts_with(&format!("10.252.{}.", nets.third)),
        "{words:?}"
    );
    let field = |k: &str| {
        let i = words.iter().position(|w| w == k).expect(k);
        words[i + 1].clone()
    };
    assert_eq!(field("mask"), "255.255.255.0");
    assert_eq!(field("router"), nets.gateway());
    assert_eq!(field("dns"), "10.251.0.53");
    assert_eq!(field("hostname"), "g1");
    assert_eq!(field("lease"), "3600");
    wait_for(
        30,
        "the leased address in status",
        || (status_ip(&env, "g1").as_deref() == Some(ip.as_str())).then_some(()),
        || env.describe("g1"),
    );
    let table = env.kubectl(&["get", "vm", "g1"]);
    assert!(table.contains("IP") && table.contains(&ip), "{table}");
    sh("busybox", &["ping", "-c", "1", "-W", "5", &ip]);
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
    udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    udp.send_to(b"hello-udp", format!("{ip}:7")).expect("send");
    let mut buf = [0u8; 256];
    let (n, _) = udp.recv_from(&mut buf).expect("the guest's UDP echo");
    assert_eq!(&buf[..n], b"echo: hello-udp");
    let mut tcp = std::net::TcpStream::connect_timeout(
        &format!("{ip}:7").parse().expect("addr"),
        std::time::Duration::from_secs(10),
    )
    .expect("TCP connect to the guest");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(&mut tcp, b"hello-tcp").expect("write");
    let mut got = [0u8; 9];
    std::io::Read::read_exact(&mut tcp, &mut got).expect("the guest's TCP echo");
    assert_eq!(&got, b"hello-tcp");
    drop(tcp);

    // NAT: the peer outside answers the guest's pings. It has no route to
    // the masquerade subnet, so only packets rewritten to the uplink
    // address (10.251.T.1) can be answered.
    let uid1 = env.uid("g1");
    wait_for(
        90,
        "g1 to reach the outside peer",
        || {
            env.console(&uid1)
                .contains(&format!("ping: reply from {}", nets.peer()))
                .then_some(())
        },
        || {
            format!(
                "{}\n{}\n{}",
                env.console(&uid1),
                try_sh("nft", &["list", "ruleset"]).unwrap_or_default(),
                try_sh("ip", &["route"]).unwrap_or_default()
            )
        },
    );
    assert!(
        nets.peer_saw_from_uplink() >= 1,
        "the peer sees the uplink address as the source"
    );
    let nat = sh("nft", &["list", "table", "ip", &nets.bridge]);
    assert!(
        nat.contains(&format!("oifname \"{}\" masquerade", nets.uplink)),
        "{nat}"
    );

    // A second guest gets another address and reaches the first.
    apply_vm(&env, "g2", &format!("ping={ip}"));
    let ip2 = bound(&env, "g2", 0)[2].clone();
    assert_ne!(ip, ip2, "two VMs never share an address");
    console_has(&env, "g2", &format!("ping: reply from {ip}"));

    // A MAC another VM on the node uses: refused, naming the holder.
    let g1_mac = env
        .vm("g1")
        .and_then(|v| {
            v.pointer("/status/interfaces/0/mac")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .expect("mac");
    apply_manifest(
        &env,
        "dup",
        "poweroff",
        &format!("    macAddress: \"{g1_mac}\"\n"),
    );
    let dup = env.wait_ready_reason("dup", "MacAddressInUse", 60);
    assert!(
        dup["message"].as_str().unwrap_or_default().contains("/g1/"),
        "{dup}"
    );
    env.kubectl(&["delete", "vm", "dup", "--wait=true", "--timeout=60s"]);

    // The bridge deleted behind the agent's back: made again, the tap
    // re-attached, the guest reachable again.
    sh("ip", &["link", "del", &nets.bridge]);
    wait_for(
        40,
        "the bridge to be made again with the guest's tap",
        || try_sh("busybox", &["ping", "-c", "1", "-W", "2", &ip]),
        || try_sh("ip", &["-br", "link"]).unwrap_or_default(),
    );

    // A standard client on the bridge (busybox udhcpc in a namespace joined
    // by a veth) gets a lease with the right options.
    let veth = format!("kvmc{}", nets.id);
    sh("ip", &["netns", "add", &nets.client_ns]);
    sh(
        "ip",
        &[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "kvmcl",
            "netns",
            &nets.client_ns,
        ],
    );
    sh("ip", &["link", "set", &veth, "master", &nets.bridge, "up"]);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &nets.client_ns,
            "ip",
            "link",
            "set",
            "kvmcl",
            "up",
        ],
    );
    let script = env.state.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip subnet=$subnet router=$router dns=$dns lease=$lease\"\nexit 0\n",
    )
    .expect("script");
    sh("chmod", &["+x", &script.display().to_string()]);
    let lease = sh(
        "ip",
        &[
            "netns",
            "exec",
            &nets.client_ns,
            "busybox",
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-t",
            "5",
            "-i",
            "kvmcl",
            "-s",
            &script.display().to_string(),
        ],
    );
    assert!(
        lease.contains(&format!(
            "subnet=255.255.255.0 router={} dns=10.251.0.53 lease=3600",
            nets.gateway()
        )),
        "{lease}"
    );
    assert!(
        !lease.contains(&format!("ip={ip} ")) && !lease.contains(&format!("ip={ip2} ")),
        "{lease}"
    );

    // Stable: the same address after stop/start and after an agent restart.
    let restart = |env: &Env| {
        env.kubectl(&[
            "patch",
            "vm",
            "g1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"runStrategy":"Halted"}}"#,
        ]);
        env.wait_phase("g1", "Stopped", 60);
        env.kubectl(&[
            "patch",
            "vm",
            "g1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"runStrategy":"Always"}}"#,
        ]);
    };
    restart(&env);
    assert_eq!(bound(&env, "g1", 0)[2], ip, "after stop/start");
    env.agent.kill();
    env.agent = start_agent_args(
        env.cp,
        &env.node,
        &env.state,
        &env.guests,
        "agent2.log",
        "1",
        &args,
    );
    restart(&env);
    assert_eq!(bound(&env, "g1", 0)[2], ip, "after an agent restart");
    let rules = sh("nft", &["list", "table", "bridge", &nets.bridge]);
    let g1_tap = env
        .vm("g1")
        .and_then(|v| {
            v.pointer("/status/interfaces/0/tap")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .expect("tap");
    assert_eq!(
        rules.matches(&format!("jump nic_{g1_tap}")).count(),
        1,
        "one rule per NIC after the restart:\n{rules}"
    );

    // Guests that forge their source address or MAC are dropped and counted.
    let mut liar_taps = Vec::new();
    for (name, how) in [("liar", "ip"), ("liar-mac", "mac")] {
        apply_vm(&env, name, &format!("spoof={how} poweroff"));
        console_has(&env, name, "spoof: sent 3 genuine frames");
        let tap = env
            .vm(name)
            .and_then(|v| {
                v.pointer("/status/interfaces/0/tap")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .expect("tap");
        let counter = sh(
            "nft",
            &[
                "list",
                "counter",
                "bridge",
                &nets.bridge,
                &format!("spoof_{tap}"),
            ],
        );
        assert!(
            net_env::packets(&counter) >= 20,
            "{how}: forged frames dropped and counted: {counter}"
        );
        liar_taps.push(tap);
    }

    // An exhausted pool: every free address reserved (for VMs of another
    // kind of owner), then a new VM.
    env.agent.kill();
    fill_pool(&env, &nets);
    env.agent = start_agent_args(
        env.cp,
        &env.node,
        &env.state,
        &env.guests,
        "agent3.log",
        "1",
        &args,
    );
    apply_vm(&env, "full", "poweroff");
    let full = env.wait_ready_reason("full", "AddressPoolExhausted", 60);
    assert!(
        full["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&nets.subnet()),
        "{full}"
    );

    // Deleted: taps, leases and rules go.
    let uids: Vec<String> = ["g1", "g2", "liar", "liar-mac", "full"]
        .iter()
        .map(|n| env.uid(n))
        .collect();
    env.kubectl(&[
        "delete",
        "vm",
        "g1",
        "g2",
        "liar",
        "liar-mac",
        "full",
        "--wait=true",
        "--timeout=90s",
    ]);
    wait_for(
        40,
        "no tap, lease or rule of the deleted VMs",
        || {
            let rules =
                try_sh("nft", &["list", "table", "bridge", &nets.bridge]).unwrap_or_default();
            let leases =
                std::fs::read_to_string(env.state.join("network/leases.json")).unwrap_or_default();
            let left = liar_taps.iter().chain([&g1_tap]).any(|t| {
                std::path::Path::new("/sys/class/net").join(t).exists()
                    || rules.contains(t.as_str())
            }) || uids.iter().any(|u| leases.contains(u.as_str()));
            (!left).then_some(())
        },
        || {
            format!(
                "{}\n{}",
                try_sh("nft", &["list", "table", "bridge", &nets.bridge]).unwrap_or_default(),
                std::fs::read_to_string(env.state.join("network/leases.json")).unwrap_or_default()
            )
        },
    );
}

/// Reserves every free address of the test's subnet in the agent's lease
/// table (the agent is stopped meanwhile), for owners that are not VMs here.
fn fill_pool(env: &Env, nets: &Nets) {
    let third = nets.third;
    let cfg = kubevmm_dhcp::Config::new(
        std::net::Ipv4Addr::new(10, 252, third, 0),
        24,
        std::net::Ipv4Addr::new(10, 252, third, 1),
        vec![std::net::Ipv4Addr::new(10, 251, 0, 53)],
        std::time::Duration::from_secs(3600),
        None,
        None,
    )
    .expect("config");
    let path = env.state.join("network/leases.json");
    let mut t = kubevmm_dhcp::Leases::load(&path, &cfg).expect("leases");
    let mut i = 0u16;
    while t
        .reserve(
            [0x02, 0, 0, 0x77, (i >> 8) as u8, i as u8],
            &format!("elsewhere/fill-{i}/fill-{i}/n"),
            "fill",
        )
        .is_ok()
    {
        i += 1;
    }
    t.save().expect("save");
}

#[test]
fn a_subnet_that_overlaps_the_hosts_is_refused_with_a_reason() {
    let nets = Nets::new(1);
    // The uplink's own network as the masquerade subnet.
    let clash = format!("10.251.{}.0/24", nets.third);
    let mut args = nets.agent_args();
    args[3].clone_from(&clash);
    args.extend(["--allowed-bridge".to_string(), "kvmnobr0".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = Env::with_args("net-overlap", &args, &["--cpu-overcommit", "4"]);
    apply_vm(&env, "o", "poweroff");
    let ready = env.wait_ready_reason("o", "SubnetOverlap", 90);
    let msg = ready["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&clash) && msg.contains(&nets.uplink), "{msg}");
    assert!(msg.contains("--masquerade-subnet"), "{msg}");
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&nets.bridge)
            .exists(),
        "nothing half-made"
    );
    // An allow-listed bridge the node does not have.
    env.apply(
        "nobr",
        "dhcpnet",
        "    cmdline: poweroff\n  networks:\n  - name: lan\n    bridge: {name: kvmnobr0}\n",
    );
    let nobr = env.wait_ready_reason("nobr", "HostSetupFailed", 60);
    assert!(
        nobr["message"]
            .as_str()
            .unwrap_or_default()
            .contains("bridge kvmnobr0 does not exist on this node"),
        "{nobr}"
    );
    // The node says so too, for the administrator.
    let cond = wait_for(
        30,
        "MasqueradeReady=False on the HypervisorNode",
        || {
            let n: Value =
                serde_json::from_str(&env.kubectl(&["get", "hvnode", &env.node, "-o", "json"]))
                    .ok()?;
            n.pointer("/status/conditions")?
                .as_array()?
                .iter()
                .find(|c| c["type"] == "MasqueradeReady" && c["status"] == "False")
                .cloned()
        },
        || env.kubectl(&["get", "hvnode", &env.node, "-o", "yaml"]),
    );
    assert_eq!(cond["reason"], "SubnetOverlap", "{cond}");
}
