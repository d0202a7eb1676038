//! What `distproxy remsh` runs, decided without I/O: the local node's name,
//! and the `erl` (or `iex`) command line and environment.

use crate::node_name::NodeName;

/// Everything the shell's command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellPlan {
    /// The node to open a shell on (`name@host`).
    pub target: String,
    /// This side's node name (`name@host`).
    pub local: String,
    /// `iex --remsh` instead of `erl -remsh`.
    pub iex: bool,
    /// Start the local node hidden (`-hidden`): no global name sync, not in
    /// the remote's `nodes()` (observer, diagnostics).
    pub hidden: bool,
    /// Directory holding `distproxy_epmd.beam`.
    pub ebin: String,
    /// Port of the ephemeral EPMD (`ERL_EPMD_PORT`).
    pub epmd_port: u16,
    /// The local node runs `-proto_dist inet6_tcp` on `::1` (see
    /// [`needs_inet6`]); its EPMD listens on `::1`.
    pub inet6: bool,
    /// The cookie, if given (else `erl` reads `~/.erlang.cookie`).
    pub cookie: Option<String>,
    /// Arguments after `--`, passed through.
    pub extra: Vec<String>,
}

/// Why the names cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0:?} is not a full node name (expected name@host, e.g. a1@myapp-0.myapp-headless.ns.svc.cluster.local)")]
    BadTarget(String),
    #[error("{0:?} is not a node name for this side (expected name@host)")]
    BadLocal(String),
    #[error("the cookie contains whitespace or control characters, which `erl` cannot take")]
    BadCookie,
}

/// The target, checked: `name@host`, both parts valid.
pub fn parse_target(target: &str) -> Result<NodeName, PlanError> {
    NodeName::parse(target).map_err(|_| PlanError::BadTarget(target.to_string()))
}

/// Whether the shell's node must run `inet6_tcp` to reach a node of
/// `host`: an IPv6 address (`fd00::5`, also in brackets), which OTP's
/// `inet_tcp` refuses as an illegal host name when it connects.
pub fn needs_inet6(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<std::net::Ipv6Addr>().is_ok()
}

/// This side's default name: `remsh-<pid>@<host>`, with the host the first
/// DNS SAN of the TLS certificate (so `tls.bind_node_names` on the pod
/// accepts it), else its first IP SAN, else `127.0.0.1`.
pub fn default_local_name(pid: u32, cert_dns: &[String], cert_ips: &[String]) -> String {
    let host = cert_dns
        .iter()
        .find(|d| !d.starts_with('*'))
        .or(cert_ips.first())
        .map(String::as_str)
        .unwrap_or("127.0.0.1");
    format!("remsh-{pid}@{host}")
}

impl ShellPlan {
    /// Checks the names and the cookie.
    pub fn validate(&self) -> Result<(), PlanError> {
        parse_target(&self.target)?;
        NodeName::parse(&self.local).map_err(|_| PlanError::BadLocal(self.local.clone()))?;
        if let Some(c) = &self.cookie {
            if c.is_empty() || c.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(PlanError::BadCookie);
            }
        }
        Ok(())
    }

    /// The VM flags that make the local node use the ephemeral sidecar:
    /// the module, no epmd of its own, distribution on loopback only, and
    /// no attempt to mesh with the rest of the cluster.
    fn vm_flags(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            "-pa",
            &self.ebin,
            "-epmd_module",
            "distproxy_epmd",
            "-start_epmd",
            "false",
            "-connect_all",
            "false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let listen: &[&str] = if self.inet6 {
            &[
                "-proto_dist",
                "inet6_tcp",
                "-kernel",
                "inet_dist_use_interface",
                "{0,0,0,0,0,0,0,1}",
            ]
        } else {
            &["-kernel", "inet_dist_use_interface", "{127,0,0,1}"]
        };
        v.extend(listen.iter().map(|s| s.to_string()));
        if self.hidden {
            v.push("-hidden".into());
        }
        v
    }

    /// The program and its arguments.
    pub fn command(&self) -> (String, Vec<String>) {
        if self.iex {
            let mut args: Vec<String> = vec![
                "--name".into(),
                self.local.clone(),
                "--remsh".into(),
                self.target.clone(),
                "--erl".into(),
                self.vm_flags().join(" "),
            ];
            args.extend(self.extra.iter().cloned());
            ("iex".into(), args)
        } else {
            let mut args: Vec<String> = vec![
                "-name".into(),
                self.local.clone(),
                "-remsh".into(),
                self.target.clone(),
            ];
            args.extend(self.vm_flags());
            args.extend(self.extra.iter().cloned());
            ("erl".into(), args)
        }
    }

    /// Environment for the shell: the ephemeral EPMD's port, and the cookie
    /// through `ERL_AFLAGS` (environment, not argv: other users can read a
    /// command line in `ps`, not another user's environment).
    pub fn env(&self, inherited_aflags: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![("ERL_EPMD_PORT".to_string(), self.epmd_port.to_string())];
        if let Some(cookie) = &self.cookie {
            let mut aflags = format!("-setcookie {cookie}");
            if let Some(prev) = inherited_aflags.filter(|s| !s.trim().is_empty()) {
                aflags = format!("{prev} {aflags}");
            }
            env.push(("ERL_AFLAGS".to_string(), aflags));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ShellPlan {
        ShellPlan {
            target: "a2@myapp-0.myapp-headless.ns.svc.cluster.local".into(),
            local: "remsh-7@127.0.0.1".into(),
            iex: false,
            hidden: false,
            ebin: "/tmp/e".into(),
            epmd_port: 40001,
            inet6: false,
            cookie: Some("SECRET".into()),
            extra: vec!["-kernel".into(), "shell_history".into(), "enabled".into()],
        }
    }

    #[test]
    fn erl_command_line() {
        let (prog, args) = plan().command();
        assert_eq!(prog, "erl");
        let line = args.join(" ");
        assert!(line.starts_with(
            "-name remsh-7@127.0.0.1 -remsh a2@myapp-0.myapp-headless.ns.svc.cluster.local -pa /tmp/e -epmd_module distproxy_epmd -start_epmd false"
        ), "{line}");
        assert!(line.ends_with("-kernel shell_history enabled"), "{line}");
        assert!(
            !line.contains("SECRET"),
            "the cookie is not on the command line"
        );
        assert!(!line.contains("-hidden"));
        let hidden = ShellPlan {
            hidden: true,
            ..plan()
        };
        assert!(hidden.command().1.contains(&"-hidden".to_string()));
    }

    /// A target named by an IPv6 address needs an `inet6_tcp` local node
    /// on `::1`; any other host keeps `inet_tcp` on 127.0.0.1.
    #[test]
    fn an_ipv6_address_target_gets_an_inet6_local_node() {
        for host in ["fd00:d157::2", "[fd00:d157::2]", "::1"] {
            assert!(needs_inet6(host), "{host}");
        }
        for host in [
            "10.1.2.3",
            "pod-a.dp.test",
            "fd00-d157--2.ns.pod",
            "[10.1.2.3]",
        ] {
            assert!(!needs_inet6(host), "{host}");
        }
        let line = ShellPlan {
            target: "a6@fd00:d157::2".into(),
            inet6: true,
            ..plan()
        }
        .command()
        .1
        .join(" ");
        assert!(
            line.contains(
                "-proto_dist inet6_tcp -kernel inet_dist_use_interface {0,0,0,0,0,0,0,1}"
            ),
            "{line}"
        );
        assert!(!line.contains("{127,0,0,1}"), "{line}");
        let (_, iex) = ShellPlan {
            inet6: true,
            iex: true,
            ..plan()
        }
        .command();
        assert!(iex[5].contains("-proto_dist inet6_tcp"), "{}", iex[5]);
        assert!(!plan().command().1.join(" ").contains("inet6_tcp"));
    }

    #[test]
    fn iex_command_line() {
        let (prog, args) = ShellPlan {
            iex: true,
            ..plan()
        }
        .command();
        assert_eq!(prog, "iex");
        assert_eq!(
            &args[..4],
            [
                "--name",
                "remsh-7@127.0.0.1",
                "--remsh",
                "a2@myapp-0.myapp-headless.ns.svc.cluster.local"
            ]
        );
        assert_eq!(args[4], "--erl");
        assert!(
            args[5].contains("-epmd_module distproxy_epmd"),
            "{}",
            args[5]
        );
    }

    #[test]
    fn environment() {
        let env = plan().env(None);
        assert!(env.contains(&("ERL_EPMD_PORT".into(), "40001".into())));
        assert!(env.contains(&("ERL_AFLAGS".into(), "-setcookie SECRET".into())));
        let env = plan().env(Some("+pc unicode"));
        assert!(env.contains(&("ERL_AFLAGS".into(), "+pc unicode -setcookie SECRET".into())));
        let none = ShellPlan {
            cookie: None,
            ..plan()
        };
        assert_eq!(none.env(None).len(), 1);
    }

    #[test]
    fn names_and_cookies_are_checked() {
        assert_eq!(plan().validate(), Ok(()));
        for bad in ["a2", "a2@", "@host", ""] {
            let p = ShellPlan {
                target: bad.into(),
                ..plan()
            };
            assert!(
                matches!(p.validate(), Err(PlanError::BadTarget(_))),
                "{bad}"
            );
        }
        let p = ShellPlan {
            cookie: Some("two words".into()),
            ..plan()
        };
        assert_eq!(p.validate(), Err(PlanError::BadCookie));
    }

    #[test]
    fn default_local_name_follows_the_certificate() {
        assert_eq!(default_local_name(7, &[], &[]), "remsh-7@127.0.0.1");
        assert_eq!(
            default_local_name(7, &["*.ops.test".into(), "me.ops.test".into()], &[]),
            "remsh-7@me.ops.test"
        );
        assert_eq!(
            default_local_name(7, &[], &["10.0.0.9".into()]),
            "remsh-7@10.0.0.9"
        );
    }
}
