//! `ssh` and `scp`: the local OpenSSH, reaching the guest through
//! `kubectl vm port-forward --stdio NAME PORT` as its `ProxyCommand`. This
//! module rewrites the user's command line, and decides nothing else:
//!
//! - our own flags among ssh's options (`-n NS`, `--namespace`,
//!   `--context`, `--kubeconfig`) are taken out; ssh's own `-n` is
//!   therefore not available (write `< /dev/null`);
//! - the VM operand (`[USER@]NAME`, `ssh://[USER@]NAME[:PORT]`, for scp
//!   `[USER@]NAME:PATH` and `scp://…`) names the VM, and its host becomes
//!   `NAME.NS.kubevmm`, unique per VM for ssh's `ControlPath` and
//!   matchable in `~/.ssh/config` (`Host *.kubevmm`);
//! - `-o ProxyCommand=…` (with ssh's `%p`, so `-p`/`-P` choose the guest
//!   port, 22 by default) and `-o HostKeyAlias=vm/NS/NAME` (known_hosts
//!   entries per VM, whatever the address) come first, so they win over
//!   the same options in the user's arguments or config;
//! - everything else reaches ssh as it was typed.
//!
//! ssh's options are parsed as OpenSSH does: options, the destination,
//! options again, then the command (the first word after them, or after
//! `--`). scp's end at the first operand.

use std::borrow::Cow;

use crate::subresource::valid_name;

/// Which OpenSSH program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `ssh`.
    Ssh,
    /// `scp`.
    Scp,
}

impl Tool {
    /// The program run from PATH.
    pub fn program(self) -> &'static str {
        match self {
            Tool::Ssh => "ssh",
            Tool::Scp => "scp",
        }
    }

    /// The option letters that take a value (OpenSSH 9).
    fn with_value(self) -> &'static str {
        match self {
            Tool::Ssh => "BbcDEeFIiJLlmOoPpQRSWw",
            Tool::Scp => "cDFiJlMoPSX",
        }
    }
}

/// Why the command line cannot be rewritten.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SshArgsError {
    /// An option without its value.
    #[error("{tool} option {option} needs a value")]
    MissingValue {
        /// ssh or scp.
        tool: &'static str,
        /// The option.
        option: String,
    },
    /// A long option that is neither ours nor OpenSSH's (which has none).
    #[error(
        "{tool}: unknown option {0}; kubectl vm takes --namespace, --context and --kubeconfig \
         here, and OpenSSH has no long options",
        tool = .1
    )]
    UnknownLong(String, &'static str),
    /// No VM named.
    #[error("ssh needs a VM: kubectl vm ssh [SSH OPTIONS] [USER@]NAME [COMMAND...]")]
    NoSshVm,
    /// No remote operand.
    #[error(
        "scp needs a VM operand: kubectl vm scp [SCP OPTIONS] [USER@]NAME:PATH... LOCAL, \
         or LOCAL... [USER@]NAME:PATH"
    )]
    NoScpVm,
    /// A host that is not a VM name.
    #[error(
        "{operand:?}: {host:?} is not a VirtualMachine name (lowercase letters, digits, '-' \
         and '.'); kubectl vm {tool} reaches VMs only"
    )]
    NotAVm {
        /// ssh or scp.
        tool: &'static str,
        /// The argument.
        operand: String,
        /// Its host part.
        host: String,
    },
    /// scp between two VMs.
    #[error("scp copies between this machine and one VM; {0} and {1} are two: copy in two steps")]
    TwoVms(String, String),
}

/// One argument for OpenSSH.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    /// Passed as it is.
    Plain(String),
    /// The VM operand: `before` + the host alias + `after`.
    Host { before: String, after: String },
}

/// The user's command line, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// ssh or scp.
    pub tool: Tool,
    /// `-n`/`--namespace` found among the options.
    pub namespace: Option<String>,
    /// `--context`.
    pub context: Option<String>,
    /// `--kubeconfig`.
    pub kubeconfig: Option<String>,
    /// The VM.
    pub vm: String,
    args: Vec<Arg>,
}

/// How the `ProxyCommand` reaches the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Proxy<'a> {
    /// This executable.
    pub exe: &'a str,
    /// `--kubeconfig`, if given (an absolute path).
    pub kubeconfig: Option<&'a str>,
    /// `--context`, if given.
    pub context: Option<&'a str>,
    /// The VM's namespace.
    pub namespace: &'a str,
}

/// The host ssh is told: unique per VM, for `ControlPath` and config `Host`.
pub fn host_alias(ns: &str, vm: &str) -> String {
    format!("{vm}.{ns}.kubevmm")
}

/// The known_hosts name of the VM's host keys.
pub fn host_key_alias(ns: &str, vm: &str) -> String {
    format!("vm/{ns}/{vm}")
}

/// `s` as one word for the shell that runs the `ProxyCommand`.
pub fn sh_quote(s: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

/// The `ProxyCommand`: this executable's `port-forward --stdio` to the
/// VM's port `%p`. Each word is quoted for the shell, then `%` doubled
/// (ssh expands `%` tokens before the shell runs it).
pub fn proxy_command(p: &Proxy<'_>, vm: &str) -> String {
    let mut words: Vec<&str> = vec![p.exe];
    if let Some(k) = p.kubeconfig {
        words.extend(["--kubeconfig", k]);
    }
    if let Some(c) = p.context {
        words.extend(["--context", c]);
    }
    words.extend(["-n", p.namespace, "port-forward", "--stdio", vm]);
    let mut command: Vec<String> = words
        .iter()
        .map(|w| sh_quote(w).replace('%', "%%"))
        .collect();
    command.push("%p".into());
    command.join(" ")
}

/// Splits `[USER@]HOST` at its last `@`: (`USER@`, `HOST`).
fn split_user(s: &str) -> (&str, &str) {
    match s.rfind('@') {
        Some(i) => (&s[..=i], &s[i + 1..]),
        None => ("", s),
    }
}

/// Where the host of a remote scp operand ends, by scp's own rule
/// (`colon()` in scp.c): at the first ':' before any '/', outside
/// `[...]`; never at a leading ':'.
fn scp_colon(w: &str) -> Option<usize> {
    let b = w.as_bytes();
    if b.first() == Some(&b':') {
        return None;
    }
    let mut bracket = b.first() == Some(&b'[');
    for (i, &c) in b.iter().enumerate() {
        let next = b.get(i + 1).copied();
        if c == b'@' && next == Some(b'[') {
            bracket = true;
        }
        if c == b']' && next == Some(b':') && bracket {
            return Some(i + 1);
        }
        if c == b':' && !bracket {
            return Some(i);
        }
        if c == b'/' {
            return None;
        }
    }
    None
}

/// The VM operand `w` as (VM, `before`, `after`), or `None` for a local
/// scp operand.
fn operand(tool: Tool, w: &str) -> Result<Option<(String, String, String)>, SshArgsError> {
    let uri = match tool {
        Tool::Ssh => "ssh://",
        Tool::Scp => "scp://",
    };
    let (before, host, after) = if let Some(rest) = w.strip_prefix(uri) {
        let end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (user, hostport) = split_user(authority);
        let colon = hostport.find(':').unwrap_or(hostport.len());
        let (host, port) = hostport.split_at(colon);
        (format!("{uri}{user}"), host, format!("{port}{path}"))
    } else if tool == Tool::Ssh {
        let (user, host) = split_user(w);
        (user.to_string(), host, String::new())
    } else {
        match scp_colon(w) {
            Some(i) => {
                let (user, host) = split_user(&w[..i]);
                (user.to_string(), host, w[i..].to_string())
            }
            _ => return Ok(None),
        }
    };
    if !valid_name(host, false) {
        return Err(SshArgsError::NotAVm {
            tool: tool.program(),
            operand: w.into(),
            host: host.into(),
        });
    }
    Ok(Some((host.to_string(), before, after)))
}

/// Understands the arguments after `kubectl vm ssh` or `kubectl vm scp`.
pub fn parse(tool: Tool, args: &[String]) -> Result<Parsed, SshArgsError> {
    let mut parsed = Parsed {
        tool,
        namespace: None,
        context: None,
        kubeconfig: None,
        vm: String::new(),
        args: Vec::new(),
    };
    let missing = |option: &str| SshArgsError::MissingValue {
        tool: tool.program(),
        option: option.into(),
    };
    let mut vm: Option<String> = None;
    let mut options = true;
    let mut words = args.iter();
    while let Some(w) = words.next() {
        let is_option = options && w.len() > 1 && w.starts_with('-');
        if !is_option {
            let first_ssh_word = tool == Tool::Ssh && vm.is_none();
            let found = if tool == Tool::Scp || first_ssh_word {
                operand(tool, w)?
            } else {
                None
            };
            match found {
                Some((name, before, after)) => {
                    if let Some(other) = vm.as_ref().filter(|v| **v != name) {
                        return Err(SshArgsError::TwoVms(other.clone(), name));
                    }
                    vm = Some(name);
                    parsed.args.push(Arg::Host { before, after });
                }
                None => parsed.args.push(Arg::Plain(w.clone())),
            }
            // ssh parses options again after the destination, until the
            // command; scp's options end at the first operand.
            options = first_ssh_word && options;
            continue;
        }
        if w == "--" {
            parsed.args.push(Arg::Plain(w.clone()));
            options = false;
            continue;
        }
        if let Some(long) = w.strip_prefix("--") {
            let (flag, inline) = match long.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (long, None),
            };
            let slot = match flag {
                "namespace" => &mut parsed.namespace,
                "context" => &mut parsed.context,
                "kubeconfig" => &mut parsed.kubeconfig,
                _ => return Err(SshArgsError::UnknownLong(w.clone(), tool.program())),
            };
            let value = match inline {
                Some(v) => v,
                None => words.next().ok_or_else(|| missing(w))?.clone(),
            };
            *slot = Some(value);
            continue;
        }
        if let Some(ns) = w.strip_prefix("-n") {
            let ns = if ns.is_empty() {
                words.next().ok_or_else(|| missing("-n"))?.clone()
            } else {
                ns.to_string()
            };
            parsed.namespace = Some(ns);
            continue;
        }
        parsed.args.push(Arg::Plain(w.clone()));
        // A cluster of letters: the first that takes a value takes the
        // rest of the word, or the next word.
        let letters = &w[1..];
        if let Some(i) = letters.find(|c| tool.with_value().contains(c)) {
            if i + 1 == letters.len() {
                let value = words
                    .next()
                    .ok_or_else(|| missing(&format!("-{}", &letters[i..])))?;
                parsed.args.push(Arg::Plain(value.clone()));
            }
        }
    }
    parsed.vm = vm.ok_or(match tool {
        Tool::Ssh => SshArgsError::NoSshVm,
        Tool::Scp => SshArgsError::NoScpVm,
    })?;
    Ok(parsed)
}

/// The arguments for OpenSSH: our two options first, then the user's with
/// the VM's host replaced by its alias.
pub fn argv(parsed: &Parsed, p: &Proxy<'_>) -> Vec<String> {
    let alias = host_alias(p.namespace, &parsed.vm);
    let mut out = vec![
        "-o".to_string(),
        format!("ProxyCommand={}", proxy_command(p, &parsed.vm)),
        "-o".to_string(),
        format!("HostKeyAlias={}", host_key_alias(p.namespace, &parsed.vm)),
    ];
    out.extend(parsed.args.iter().map(|a| match a {
        Arg::Plain(s) => s.clone(),
        Arg::Host { before, after } => format!("{before}{alias}{after}"),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const PROXY: Proxy<'static> = Proxy {
        exe: "/usr/local/bin/kubectl-vm",
        kubeconfig: None,
        context: None,
        namespace: "dev",
    };

    /// The user's arguments after our two options, with the VM name.
    fn rewritten(tool: Tool, line: &str) -> Result<(String, String), SshArgsError> {
        let parsed = parse(tool, &words(line))?;
        let ns = parsed.namespace.clone().unwrap_or_else(|| "dev".into());
        let proxy = Proxy {
            namespace: &ns,
            ..PROXY
        };
        let all = argv(&parsed, &proxy);
        assert_eq!(all[0], "-o");
        assert!(all[1].starts_with("ProxyCommand="), "{all:?}");
        assert_eq!(all[3], format!("HostKeyAlias=vm/{ns}/{}", parsed.vm));
        Ok((parsed.vm, all[4..].join(" ")))
    }

    #[test]
    fn ssh_command_lines() {
        let ok = |vm: &str, args: &str| Ok((vm.to_string(), args.to_string()));
        for (line, expected) in [
            ("web", ok("web", "web.dev.kubevmm")),
            ("debian@web", ok("web", "debian@web.dev.kubevmm")),
            ("a@b@web", ok("web", "a@b@web.dev.kubevmm")),
            ("web uname -a", ok("web", "web.dev.kubevmm uname -a")),
            (
                "-i key -p 2222 -v root@web ls -l",
                ok("web", "-i key -p 2222 -v root@web.dev.kubevmm ls -l"),
            ),
            // Attached values and clusters ending in a value-taking letter.
            (
                "-p2222 -vvl root web",
                ok("web", "-p2222 -vvl root web.dev.kubevmm"),
            ),
            (
                "-L 8080:localhost:80 web",
                ok("web", "-L 8080:localhost:80 web.dev.kubevmm"),
            ),
            (
                "-o StrictHostKeyChecking=accept-new web",
                ok("web", "-o StrictHostKeyChecking=accept-new web.dev.kubevmm"),
            ),
            // Options after the destination are still ssh's; the command's are not.
            ("web -t top -n 1", ok("web", "web.dev.kubevmm -t top -n 1")),
            ("web -- ls -n", ok("web", "web.dev.kubevmm -- ls -n")),
            ("-- web ls", ok("web", "-- web.dev.kubevmm ls")),
            // Our flags, before or after the destination, are taken out.
            ("-n prod web", ok("web", "web.dev.kubevmm")),
            ("web -n prod", ok("web", "web.dev.kubevmm")),
            ("--context kind -v web", ok("web", "-v web.dev.kubevmm")),
            ("--kubeconfig=/k web", ok("web", "web.dev.kubevmm")),
            // The URI form, with its port.
            (
                "ssh://root@web:2222",
                ok("web", "ssh://root@web.dev.kubevmm:2222"),
            ),
            ("ssh://web.x", ok("web.x", "ssh://web.x.dev.kubevmm")),
            // A word that looks like a host but follows the destination.
            ("web other", ok("web", "web.dev.kubevmm other")),
        ] {
            let got = rewritten(Tool::Ssh, line).map(|(vm, args)| {
                // -n prod moved the alias to prod
                (vm, args.replace(".prod.kubevmm", ".dev.kubevmm"))
            });
            assert_eq!(got, expected, "{line:?}");
        }
    }

    #[test]
    fn our_flags_among_ssh_options() {
        let p = parse(
            Tool::Ssh,
            &words("-nprod --context=kind --kubeconfig /tmp/k web"),
        )
        .unwrap();
        assert_eq!(p.namespace.as_deref(), Some("prod"));
        assert_eq!(p.context.as_deref(), Some("kind"));
        assert_eq!(p.kubeconfig.as_deref(), Some("/tmp/k"));
        assert_eq!(
            parse(Tool::Ssh, &words("web -n x ls -n y"))
                .unwrap()
                .namespace
                .as_deref(),
            Some("x")
        );
    }

    #[test]
    fn ssh_errors() {
        for (line, expected) in [
            ("", SshArgsError::NoSshVm),
            ("-v -p 22", SshArgsError::NoSshVm),
            ("-- ", SshArgsError::NoSshVm),
            (
                "-p",
                SshArgsError::MissingValue {
                    tool: "ssh",
                    option: "-p".into(),
                },
            ),
            (
                "-vvi",
                SshArgsError::MissingValue {
                    tool: "ssh",
                    option: "-i".into(),
                },
            ),
            (
                "web -n",
                SshArgsError::MissingValue {
                    tool: "ssh",
                    option: "-n".into(),
                },
            ),
            (
                "--context",
                SshArgsError::MissingValue {
                    tool: "ssh",
                    option: "--context".into(),
                },
            ),
            (
                "--verbose web",
                SshArgsError::UnknownLong("--verbose".into(), "ssh"),
            ),
            (
                "root@Web",
                SshArgsError::NotAVm {
                    tool: "ssh",
                    operand: "root@Web".into(),
                    host: "Web".into(),
                },
            ),
            (
                "10.0.0.1:22",
                SshArgsError::NotAVm {
                    tool: "ssh",
                    operand: "10.0.0.1:22".into(),
                    host: "10.0.0.1:22".into(),
                },
            ),
        ] {
            assert_eq!(parse(Tool::Ssh, &words(line)), Err(expected), "{line:?}");
        }
        assert!(SshArgsError::NoSshVm.to_string().contains("[USER@]NAME"));
    }

    #[test]
    fn scp_command_lines() {
        let ok = |vm: &str, args: &str| Ok((vm.to_string(), args.to_string()));
        for (line, expected) in [
            (
                "web:/etc/hosts .",
                ok("web", "web.dev.kubevmm:/etc/hosts ."),
            ),
            ("a b root@web:", ok("web", "a b root@web.dev.kubevmm:")),
            (
                "-r -P 2222 -i key dir web:dir",
                ok("web", "-r -P 2222 -i key dir web.dev.kubevmm:dir"),
            ),
            (
                "web:a web:b /tmp",
                ok("web", "web.dev.kubevmm:a web.dev.kubevmm:b /tmp"),
            ),
            // scp: a '/' before the ':' makes it a local path; ':' first too.
            ("./web:x web:y", ok("web", "./web:x web.dev.kubevmm:y")),
            (":x web:y", ok("web", ":x web.dev.kubevmm:y")),
            // Options end at the first operand: -n after it is a file name.
            ("-n prod f web:", ok("web", "f web.dev.kubevmm:")),
            ("web:f -n", ok("web", "web.dev.kubevmm:f -n")),
            ("-- -file web:", ok("web", "-- -file web.dev.kubevmm:")),
            (
                "scp://root@web:2222/tmp/f .",
                ok("web", "scp://root@web.dev.kubevmm:2222/tmp/f ."),
            ),
            ("f scp://web", ok("web", "f scp://web.dev.kubevmm")),
        ] {
            let got = rewritten(Tool::Scp, line)
                .map(|(vm, args)| (vm, args.replace(".prod.kubevmm", ".dev.kubevmm")));
            assert_eq!(got, expected, "{line:?}");
        }
    }

    #[test]
    fn scp_errors() {
        assert_eq!(parse(Tool::Scp, &words("a b")), Err(SshArgsError::NoScpVm));
        assert_eq!(
            parse(Tool::Scp, &words("web:a db:b")),
            Err(SshArgsError::TwoVms("web".into(), "db".into()))
        );
        assert_eq!(
            parse(Tool::Scp, &words("f [::1]:x")),
            Err(SshArgsError::NotAVm {
                tool: "scp",
                operand: "[::1]:x".into(),
                host: "[::1]".into()
            })
        );
        assert_eq!(
            parse(Tool::Scp, &words("f u@[h]:x")),
            Err(SshArgsError::NotAVm {
                tool: "scp",
                operand: "u@[h]:x".into(),
                host: "[h]".into()
            })
        );
        assert_eq!(
            parse(Tool::Scp, &words("-P")),
            Err(SshArgsError::MissingValue {
                tool: "scp",
                option: "-P".into()
            })
        );
    }

    #[test]
    fn scp_remote_operands() {
        for (w, colon) in [
            ("web:x", Some(3)),
            ("web:", Some(3)),
            ("u@web:/a:b", Some(5)),
            (":x", None),
            ("./web:x", None),
            ("/abs/path", None),
            ("file", None),
            ("[::1]:x", Some(5)),
            ("u@[::1]:x", Some(7)),
            ("[::1]/x:y", None),
        ] {
            assert_eq!(scp_colon(w), colon, "{w:?}");
        }
    }

    #[test]
    fn the_proxy_command() {
        assert_eq!(
            proxy_command(&PROXY, "web"),
            "/usr/local/bin/kubectl-vm -n dev port-forward --stdio web %p"
        );
        let odd = Proxy {
            exe: "/opt/my tools/kubectl-vm",
            kubeconfig: Some("/home/o'neil/100%.yaml"),
            context: Some("kind-kind"),
            namespace: "dev",
        };
        assert_eq!(
            proxy_command(&odd, "web.x"),
            "'/opt/my tools/kubectl-vm' --kubeconfig '/home/o'\\''neil/100%%.yaml' \
             --context kind-kind -n dev port-forward --stdio web.x %p"
        );
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a$b"), "'a$b'");
        assert_eq!(sh_quote("plain-word_1.2"), "plain-word_1.2");
    }

    #[test]
    fn the_whole_argv() {
        let parsed = parse(Tool::Ssh, &words("-v debian@web")).unwrap();
        assert_eq!(
            argv(&parsed, &PROXY),
            vec![
                "-o",
                "ProxyCommand=/usr/local/bin/kubectl-vm -n dev port-forward --stdio web %p",
                "-o",
                "HostKeyAlias=vm/dev/web",
                "-v",
                "debian@web.dev.kubevmm",
            ]
        );
    }
}
