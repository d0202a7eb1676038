//! `distproxy epmd …`: the command line of OTP's `epmd`, so the binary can
//! stand in for it (installed as `epmd`, or started by `erl` in its place).
//!
//! Supported, as documented for `epmd`: `-port N`, `-address LIST`,
//! `-daemon`, `-relaxed_command_check`, `-names`, `-dump`, `-kill`,
//! `-stop NAME`, `-packet_timeout SECONDS` (the idle deadline of an
//! incomplete request), `-d`/`-debug` and the debugging delays
//! `-delay_accept`/`-delay_write SECONDS` (accepted, ignored), and the
//! environment variables `ERL_EPMD_PORT`, `ERL_EPMD_ADDRESS` and
//! `ERL_EPMD_RELAXED_COMMAND_CHECK`. `-systemd` (sockets passed by systemd)
//! is refused with the reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::client::{self, ClientError, KillReply, StopReply};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpmdAction {
    /// Serve (optionally detached).
    Serve {
        listen: Vec<SocketAddr>,
        daemon: bool,
        relaxed_command_check: bool,
        /// `-packet_timeout`: how long an incomplete request may wait
        /// (`epmd.idle_timeout_ms` when not given).
        packet_timeout: Option<Duration>,
    },
    Names {
        port: u16,
    },
    Dump {
        port: u16,
    },
    Kill {
        port: u16,
    },
    Stop {
        port: u16,
        name: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EpmdUsageError {
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// A port that is not 1–65535; `from`: `-port` or `ERL_EPMD_PORT`.
    #[error("invalid port {value:?} in {from}")]
    BadPort { value: String, from: &'static str },
    /// `from`: `-address` or `ERL_EPMD_ADDRESS`.
    #[error("invalid address {value:?} in {from}")]
    BadAddress { value: String, from: &'static str },
    /// `-packet_timeout` and the debugging delays take whole seconds.
    #[error("invalid number of seconds {value:?} for {option}")]
    BadSeconds { value: String, option: String },
    #[error("unknown option {0}")]
    Unknown(String),
    #[error("{option} is not supported: {why}")]
    Unsupported {
        option: &'static str,
        why: &'static str,
    },
}

/// Parses `epmd`'s arguments (without the program name). `env` looks up
/// environment variables (injected for tests).
pub fn parse(
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<EpmdAction, EpmdUsageError> {
    // The environment counts only where no option says otherwise (a bad
    // ERL_EPMD_PORT does not stop `-port N`).
    let mut port: Option<u16> = None;
    let mut addresses: Option<(String, &'static str)> = None;
    let mut relaxed = env("ERL_EPMD_RELAXED_COMMAND_CHECK").is_some();
    let mut daemon = false;
    let mut packet_timeout = None;
    let mut command: Option<(&str, Option<String>)> = None;

    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |opt: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| EpmdUsageError::MissingValue(opt.to_string()))
        };
        match arg.as_str() {
            "-port" => port = Some(parse_port(value("-port")?, "-port")?),
            "-address" => addresses = Some((value("-address")?, "-address")),
            "-daemon" | "-detached" => daemon = true,
            "-relaxed_command_check" => relaxed = true,
            "-d" | "-debug" => {}
            "-packet_timeout" => {
                let secs = parse_seconds(value(arg)?, arg)?;
                packet_timeout = Some(Duration::from_secs(secs.max(1)));
            }
            // `epmd`'s simulations of a busy server, for debugging it.
            "-delay_accept" | "-delay_write" => {
                parse_seconds(value(arg)?, arg)?;
            }
            "-systemd" => {
                return Err(EpmdUsageError::Unsupported {
                    option: "-systemd",
                    why: "distproxy binds its own sockets; start it without -systemd \
                          (and without the epmd.socket unit)",
                })
            }
            "-names" => command = Some(("names", None)),
            "-dump" => command = Some(("dump", None)),
            "-kill" => command = Some(("kill", None)),
            "-stop" => command = Some(("stop", Some(value("-stop")?))),
            other => return Err(EpmdUsageError::Unknown(other.to_string())),
        }
    }
    let port = match (port, env("ERL_EPMD_PORT")) {
        (Some(p), _) => p,
        (None, Some(p)) => parse_port(p, "ERL_EPMD_PORT")?,
        (None, None) => 4369,
    };
    if addresses.is_none() {
        addresses = env("ERL_EPMD_ADDRESS")
            .filter(|a| !a.trim().is_empty())
            .map(|a| (a, "ERL_EPMD_ADDRESS"));
    }
    Ok(match command {
        Some(("names", _)) => EpmdAction::Names { port },
        Some(("dump", _)) => EpmdAction::Dump { port },
        Some(("kill", _)) => EpmdAction::Kill { port },
        Some((_, Some(name))) => EpmdAction::Stop { port, name },
        _ => EpmdAction::Serve {
            listen: listen_addrs(
                addresses.as_ref().map(|(a, from)| (a.as_str(), *from)),
                port,
            )?,
            daemon,
            relaxed_command_check: relaxed,
            packet_timeout,
        },
    })
}

/// Whole seconds for `option`.
fn parse_seconds(value: String, option: &str) -> Result<u64, EpmdUsageError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| EpmdUsageError::BadSeconds {
            value,
            option: option.to_string(),
        })
}

/// A port of `-port` or `ERL_EPMD_PORT` (`from`).
fn parse_port(value: String, from: &'static str) -> Result<u16, EpmdUsageError> {
    match value.trim().parse::<u16>() {
        Ok(p) => Ok(p),
        Err(_) => Err(EpmdUsageError::BadPort { value, from }),
    }
}

/// `-address` lists where to listen (`list` and where it came from:
/// `-address` or `ERL_EPMD_ADDRESS`); like `epmd`, loopback is added when
/// missing. Without `-address`, all interfaces (IPv4 and IPv6).
fn listen_addrs(
    list: Option<(&str, &'static str)>,
    port: u16,
) -> Result<Vec<SocketAddr>, EpmdUsageError> {
    let Some((list, from)) = list else {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ]);
    };
    let mut ips = Vec::new();
    for part in list
        .split([',', ' '])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let ip: IpAddr = part.parse().map_err(|_| EpmdUsageError::BadAddress {
            value: part.to_string(),
            from,
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let any_v6 = ips.iter().any(IpAddr::is_ipv6);
    let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if !ips
        .iter()
        .any(|ip| ip.is_loopback() && ip.is_ipv4() || ip.is_unspecified() && ip.is_ipv4())
    {
        ips.push(lo4);
    }
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if any_v6
        && !ips
            .iter()
            .any(|ip| ip.is_ipv6() && (ip.is_loopback() || ip.is_unspecified()))
    {
        ips.push(lo6);
    }
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

/// `epmd`'s usage line, printed on a usage error.
pub const USAGE: &str = "usage: epmd [-port No] [-address List] [-daemon] \
     [-relaxed_command_check] [-packet_timeout Seconds] \
     [-names | -dump | -kill | -stop Name]";

/// Runs a client action (`-names`, `-dump`, `-kill`, `-stop`) against the
/// EPMD on the local host and prints what `epmd` prints. `Serve` is not a
/// client action (the caller serves): it fails.
pub async fn run_client(action: &EpmdAction) -> ExitCode {
    let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // `epmd`'s own words on stderr, nothing more: scripts match them.
    let cannot_connect = |e: ClientError| {
        tracing::debug!(error = %e, "cannot connect to the local epmd");
        eprintln!("epmd: Cannot connect to local epmd");
        ExitCode::FAILURE
    };
    match action {
        EpmdAction::Serve { .. } => {
            eprintln!("epmd: serving is not a client action");
            ExitCode::FAILURE
        }
        EpmdAction::Names { port } => match client::names(local(*port)).await {
            Ok((epmd_port, text)) => {
                print!("epmd: up and running on port {epmd_port} with data:\n{text}");
                ExitCode::SUCCESS
            }
            Err(e) => cannot_connect(e),
        },
        EpmdAction::Dump { port } => match client::dump(local(*port)).await {
            Ok((port, text)) => {
                print!("epmd: up and running on port {port} with data:\n{text}");
                ExitCode::SUCCESS
            }
            Err(e @ ClientError::BadReply { .. }) => {
                println!("epmd: no response from local epmd ({e})");
                ExitCode::FAILURE
            }
            Err(e) => cannot_connect(e),
        },
        EpmdAction::Kill { port } => match client::kill(local(*port)).await {
            Ok(KillReply::Killed) => {
                println!("Killed");
                ExitCode::SUCCESS
            }
            Ok(KillReply::Refused) => {
                println!("Killing not allowed - living nodes in database.");
                ExitCode::FAILURE
            }
            Err(ClientError::UnexpectedReply { reply, .. }) => responded_with(&reply),
            Err(e @ ClientError::BadReply { .. }) => {
                println!("epmd: {e}");
                ExitCode::FAILURE
            }
            Err(e) => cannot_connect(e),
        },
        EpmdAction::Stop { port, name } => match client::stop(local(*port), name).await {
            // Like `epmd`, both answers are printed and exit 0.
            Ok(StopReply::Stopped) => {
                println!("STOPPED");
                ExitCode::SUCCESS
            }
            Ok(StopReply::NoExist) => {
                println!("NOEXIST");
                ExitCode::SUCCESS
            }
            // Also a STOP refused without relaxed_command_check: no reply.
            Err(ClientError::UnexpectedReply { reply, .. }) => responded_with(&reply),
            Err(e @ ClientError::BadReply { .. }) => {
                println!("epmd: {e}");
                ExitCode::FAILURE
            }
            Err(e) => cannot_connect(e),
        },
    }
}

/// `epmd`'s words for a KILL or STOP answer it does not know.
fn responded_with(reply: &str) -> ExitCode {
    println!("epmd: local epmd responded with <{reply}>");
    ExitCode::FAILURE
}

/// Prints an EPMD's `NAMES` listing as `epmd -names` does (also
/// `distproxy names`).
///
/// The host's addresses are tried in turn while the connection is refused
/// (a dual-stack host whose EPMD listens on one family only).
pub async fn print_names(addrs: &[SocketAddr]) -> ExitCode {
    match client::each_address_while_refused(addrs, client::names).await {
        (_, Ok((epmd_port, text))) => {
            println!("epmd: up and running on port {epmd_port} with data:");
            print!("{text}");
            ExitCode::SUCCESS
        }
        (addr, Err(client::ClientError::Connect { source, .. })) => {
            eprintln!("epmd: Cannot connect to epmd at {addr}: {source}");
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            eprintln!("epmd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `-daemon`: starts a detached copy of this program without `-daemon`, in
/// its own process group, and returns at once (as `epmd -daemon` does).
/// `args` are the `epmd` arguments.
pub fn daemonize(args: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let rest = args.iter().filter(|a| *a != "-daemon" && *a != "-detached");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("epmd: cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spawned = std::process::Command::new(exe)
        .arg("epmd")
        .args(rest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("epmd: cannot start daemon: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Hosts without IPv6 cannot bind `[::]`; keep IPv4 only there, like `epmd`.
pub fn drop_unavailable_ipv6(listen: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        return listen;
    }
    let v4: Vec<SocketAddr> = listen.iter().copied().filter(SocketAddr::is_ipv4).collect();
    if v4.is_empty() {
        listen
    } else {
        v4
    }
}

/// A `--host` value as name resolution wants it: an IPv6 literal may be
/// given in brackets (`[fd00::1]`, as in `HOST:PORT` or a URL), which
/// `getaddrinfo` does not accept; anything else is returned as it is.
pub fn unbracket_host(host: &str) -> &str {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) if inner.parse::<Ipv6Addr>().is_ok() => inner,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bracketed_ipv6_host_loses_its_brackets_and_nothing_else_changes() {
        assert_eq!(unbracket_host("[fd00:d157::12]"), "fd00:d157::12");
        assert_eq!(unbracket_host("[::1]"), "::1");
        for unchanged in [
            "fd00:d157::12",
            "198.18.0.12",
            "pod-b.dp.test",
            "[pod-b.dp.test]",
            "[198.18.0.12]",
            "[::1",
            "[]",
        ] {
            assert_eq!(unbracket_host(unchanged), unchanged);
        }
        // What the resolver then gets resolves.
        use std::net::ToSocketAddrs;
        let addr = (unbracket_host("[::1]"), 4369)
            .to_socket_addrs()
            .unwrap()
            .next();
        assert_eq!(addr, Some("[::1]:4369".parse().unwrap()));
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }
    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn serve_defaults_listen_everywhere_on_4369() {
        let a = parse(&args(&["-daemon"]), no_env).unwrap();
        assert_eq!(
            a,
            EpmdAction::Serve {
                listen: vec![
                    "0.0.0.0:4369".parse().unwrap(),
                    "[::]:4369".parse().unwrap()
                ],
                daemon: true,
                relaxed_command_check: false,
                packet_timeout: None,
            }
        );
    }

    /// `epmd`'s other server options: `-packet_timeout` sets the idle
    /// deadline, the debugging delays are accepted with their value, and
    /// `-systemd` is refused with its reason rather than as unknown.
    #[test]
    fn packet_timeout_applies_debug_delays_pass_and_systemd_is_refused() {
        let a = parse(
            &args(&[
                "-d",
                "-packet_timeout",
                "3",
                "-delay_accept",
                "1",
                "-delay_write",
                "2",
            ]),
            no_env,
        )
        .unwrap();
        let EpmdAction::Serve { packet_timeout, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(packet_timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            parse(&args(&["-packet_timeout", "soon"]), no_env),
            Err(EpmdUsageError::BadSeconds {
                value: "soon".into(),
                option: "-packet_timeout".into()
            })
        );
        assert_eq!(
            parse(&args(&["-delay_write"]), no_env),
            Err(EpmdUsageError::MissingValue("-delay_write".into()))
        );
        let err = parse(&args(&["-systemd"]), no_env).unwrap_err();
        assert!(
            err.to_string().starts_with("-systemd is not supported: "),
            "{err}"
        );
    }

    #[test]
    fn address_list_gets_loopback_added_and_port_applies() {
        let a = parse(
            &args(&["-port", "4400", "-address", "10.1.2.3,fd00::1"]),
            no_env,
        )
        .unwrap();
        let EpmdAction::Serve { listen, .. } = a else {
            panic!()
        };
        let want: Vec<SocketAddr> = [
            "10.1.2.3:4400",
            "[fd00::1]:4400",
            "127.0.0.1:4400",
            "[::1]:4400",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(listen, want);
    }

    #[test]
    fn client_commands_and_environment() {
        let env = |k: &str| match k {
            "ERL_EPMD_PORT" => Some("4500".to_string()),
            "ERL_EPMD_RELAXED_COMMAND_CHECK" => Some("1".to_string()),
            _ => None,
        };
        assert_eq!(
            parse(&args(&["-names"]), env).unwrap(),
            EpmdAction::Names { port: 4500 }
        );
        assert_eq!(
            parse(&args(&["-kill"]), no_env).unwrap(),
            EpmdAction::Kill { port: 4369 }
        );
        assert_eq!(
            parse(&args(&["-stop", "a1"]), no_env).unwrap(),
            EpmdAction::Stop {
                port: 4369,
                name: "a1".into()
            }
        );
        let EpmdAction::Serve {
            relaxed_command_check,
            ..
        } = parse(&[], env).unwrap()
        else {
            panic!()
        };
        assert!(relaxed_command_check);
    }

    #[test]
    fn usage_errors() {
        assert_eq!(
            parse(&args(&["-port"]), no_env),
            Err(EpmdUsageError::MissingValue("-port".into()))
        );
        assert_eq!(
            parse(&args(&["-port", "x"]), no_env),
            Err(EpmdUsageError::BadPort {
                value: "x".into(),
                from: "-port"
            })
        );
        assert_eq!(
            parse(&args(&["-bogus"]), no_env),
            Err(EpmdUsageError::Unknown("-bogus".into()))
        );
        assert_eq!(
            parse(&args(&["-address", "nope"]), no_env),
            Err(EpmdUsageError::BadAddress {
                value: "nope".into(),
                from: "-address"
            })
        );
    }

    /// A bad value from the environment is named as such (it was blamed
    /// on `-address`, an option not given), and an option overrides the
    /// variable: a bad ERL_EPMD_PORT does not stop `-port N -names`.
    #[test]
    fn environment_errors_name_the_variable_and_options_override_it() {
        let bad_env = |k: &str| match k {
            "ERL_EPMD_PORT" => Some("abc".to_string()),
            "ERL_EPMD_ADDRESS" => Some("zz".to_string()),
            _ => None,
        };
        let err = parse(&args(&["-names"]), bad_env).unwrap_err();
        assert_eq!(err.to_string(), "invalid port \"abc\" in ERL_EPMD_PORT");
        assert_eq!(
            parse(&args(&["-port", "5", "-names"]), bad_env),
            Ok(EpmdAction::Names { port: 5 })
        );
        let err = parse(&args(&["-port", "5"]), bad_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address \"zz\" in ERL_EPMD_ADDRESS"
        );
        assert!(parse(&args(&["-port", "5", "-address", "127.0.0.1"]), bad_env).is_ok());
    }
}
