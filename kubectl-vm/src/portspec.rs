//! `port-forward`'s arguments: the port pair `[LOCAL:]REMOTE` and the
//! `--address` to listen on, as kubectl port-forward spells them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The ports of one forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The local port to listen on; 0 picks a free one.
    pub local: u16,
    /// The guest port, 1..=65535.
    pub remote: u16,
    /// Whether LOCAL was written (with `--stdio` it must not be).
    pub local_given: bool,
}

/// Why an argument of `port-forward` is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortSpecError {
    /// The port pair.
    #[error(
        "PORTS {given:?}: {why}; use [LOCAL:]REMOTE, e.g. 8080:80, 80 (the same port here) \
         or :80 or 0:80 (any free local port)"
    )]
    Ports {
        /// The argument as given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--stdio` with a LOCAL port.
    #[error("PORTS {0:?}: with --stdio there is no local port; give the guest port only, e.g. 22")]
    LocalWithStdio(String),
    /// `--address`.
    #[error("--address {0:?}: use an IP address such as 127.0.0.1, 0.0.0.0 or ::1, or localhost")]
    Address(String),
}

fn port(s: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    if s.is_empty() {
        return Err(format!("the {what} port is missing"));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the {what} port {s:?} is not a number"));
    }
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("the {what} port cannot be 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("the {what} port {s} is above 65535")),
    }
}

/// Parses `[LOCAL:]REMOTE`. LOCAL defaults to REMOTE; an empty LOCAL
/// (`:80`) or 0 picks a free local port.
pub fn parse(given: &str) -> Result<Ports, PortSpecError> {
    let err = |why: String| PortSpecError::Ports {
        given: given.into(),
        why,
    };
    let (local, remote) = match given.split_once(':') {
        Some((l, r)) => (Some(l), r),
        None => (None, given),
    };
    if remote.contains(':') {
        return Err(err("more than one ':'".into()));
    }
    let remote = port(remote, "remote", false).map_err(err)?;
    let ports = match local {
        None => Ports {
            local: remote,
            remote,
            local_given: false,
        },
        Some("") => Ports {
            local: 0,
            remote,
            local_given: true,
        },
        Some(l) => Ports {
            local: port(l, "local", true).map_err(err)?,
            remote,
            local_given: true,
        },
    };
    Ok(ports)
}

/// Parses `PORTS` of `port-forward --stdio`: the guest port only.
pub fn parse_stdio(given: &str) -> Result<u16, PortSpecError> {
    let ports = parse(given)?;
    if ports.local_given {
        return Err(PortSpecError::LocalWithStdio(given.into()));
    }
    Ok(ports.remote)
}

/// Parses `--address`: an IP address, or `localhost` (127.0.0.1).
pub fn address(given: &str) -> Result<IpAddr, PortSpecError> {
    match given.trim() {
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "ip6-localhost" => Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        s => s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| PortSpecError::Address(given.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::unnecessary_wraps)] // a row of the table
    fn ok(local: u16, remote: u16, local_given: bool) -> Result<Ports, String> {
        Ok(Ports {
            local,
            remote,
            local_given,
        })
    }

    #[test]
    fn port_pairs() {
        for (given, expected) in [
            ("80", ok(80, 80, false)),
            ("8080:80", ok(8080, 80, true)),
            (":80", ok(0, 80, true)),
            ("0:80", ok(0, 80, true)),
            ("65535:1", ok(65535, 1, true)),
            ("", Err("the remote port is missing".to_string())),
            ("8080:", Err("the remote port is missing".into())),
            ("0", Err("the remote port cannot be 0".into())),
            ("80:0", Err("the remote port cannot be 0".into())),
            ("ssh", Err("the remote port \"ssh\" is not a number".into())),
            ("-1", Err("the remote port \"-1\" is not a number".into())),
            ("+22", Err("the remote port \"+22\" is not a number".into())),
            (" 22", Err("the remote port \" 22\" is not a number".into())),
            ("x:22", Err("the local port \"x\" is not a number".into())),
            ("65536", Err("the remote port 65536 is above 65535".into())),
            (
                "70000:80",
                Err("the local port 70000 is above 65535".into()),
            ),
            ("1:2:3", Err("more than one ':'".into())),
        ] {
            let got = parse(given).map_err(|e| match e {
                PortSpecError::Ports { given: g, why } => {
                    assert_eq!(g, given);
                    why
                }
                other => panic!("{other}"),
            });
            assert_eq!(got, expected, "{given:?}");
        }
    }

    #[test]
    fn errors_name_the_argument_and_the_form() {
        let e = parse("ssh").unwrap_err().to_string();
        assert!(e.starts_with("PORTS \"ssh\": the remote port"), "{e}");
        assert!(e.contains("use [LOCAL:]REMOTE, e.g. 8080:80"), "{e}");
    }

    #[test]
    fn stdio_takes_the_guest_port_only() {
        assert_eq!(parse_stdio("22"), Ok(22));
        assert_eq!(
            parse_stdio("2222:22"),
            Err(PortSpecError::LocalWithStdio("2222:22".into()))
        );
        assert_eq!(
            parse_stdio(":22"),
            Err(PortSpecError::LocalWithStdio(":22".into()))
        );
        assert!(parse_stdio("x").is_err());
    }

    #[test]
    fn addresses() {
        for (given, expected) in [
            ("127.0.0.1", Some("127.0.0.1")),
            ("localhost", Some("127.0.0.1")),
            ("0.0.0.0", Some("0.0.0.0")),
            ("::1", Some("::1")),
            ("[::1]", Some("::1")),
            ("::", Some("::")),
            ("10.0.0.300", None),
            ("example.com", None),
            ("", None),
        ] {
            let got = address(given).ok().map(|a| a.to_string());
            assert_eq!(got.as_deref(), expected, "{given:?}");
        }
        assert_eq!(
            address("nope").unwrap_err().to_string(),
            "--address \"nope\": use an IP address such as 127.0.0.1, 0.0.0.0 or ::1, or localhost"
        );
    }
}
