//! `--via pod/NAME[.NAMESPACE]`: `kubectl port-forward` to the pod's
//! distribution port on a random local port, owned for the session.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// Whether `program` is an executable file in a `PATH` directory.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A pod named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub namespace: Option<String>,
}

impl PodRef {
    /// `pod/NAME` or `pod/NAME.NAMESPACE`; `None` if `via` does not start
    /// with `pod/`.
    pub fn parse(via: &str) -> Option<Result<PodRef, String>> {
        let rest = via.strip_prefix("pod/")?;
        let (name, namespace) = match rest.split_once('.') {
            Some((n, ns)) => (n, Some(ns)),
            None => (rest, None),
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        if !ok(name) || namespace.is_some_and(|ns| !ok(ns)) {
            return Some(Err(format!(
                "{via:?}: expected pod/NAME or pod/NAME.NAMESPACE (lowercase letters, digits, '-')"
            )));
        }
        Some(Ok(PodRef {
            name: name.to_string(),
            namespace: namespace.map(String::from),
        }))
    }
}

/// Why the port forward could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("kubectl is not on PATH: install it, or run `kubectl port-forward` yourself and pass --via 127.0.0.1:PORT")]
    NoKubectl,
    #[error("cannot start kubectl: {0}")]
    Spawn(std::io::Error),
    #[error("kubectl port-forward failed: {0}")]
    Failed(String),
    #[error("kubectl port-forward printed no local port within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// A running `kubectl port-forward`; killed when dropped.
pub struct PortForward {
    pub local_port: u16,
    _child: Child,
}

/// The local port in kubectl's `Forwarding from 127.0.0.1:PORT -> REMOTE`.
pub fn parse_forwarding_line(line: &str) -> Option<u16> {
    let rest = line.trim().strip_prefix("Forwarding from ")?;
    let addr = rest.split_whitespace().next()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

/// Starts `kubectl port-forward pod/NAME [-n NS] --address 127.0.0.1
/// :REMOTE_PORT` and waits for the local port it chose.
pub async fn port_forward(
    pod: &PodRef,
    remote_port: u16,
    timeout: Duration,
) -> Result<PortForward, ForwardError> {
    if !on_path("kubectl") {
        return Err(ForwardError::NoKubectl);
    }
    let mut cmd = Command::new("kubectl");
    cmd.arg("port-forward").arg(format!("pod/{}", pod.name));
    if let Some(ns) = &pod.namespace {
        cmd.args(["-n", ns]);
    }
    cmd.args(["--address", "127.0.0.1"])
        .arg(format!(":{remote_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(ForwardError::Spawn)?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(port) = parse_forwarding_line(&line) {
                return Some(port);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(local_port)) => {
            // Keep draining kubectl's output so it never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = stderr.read_to_end(&mut sink).await;
            });
            Ok(PortForward {
                local_port,
                _child: child,
            })
        }
        Ok(None) => {
            let mut err = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), stderr.read_to_string(&mut err)).await;
            let _ = child.kill().await;
            Err(ForwardError::Failed(err.trim().to_string()))
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(ForwardError::Timeout(timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_references() {
        assert_eq!(PodRef::parse("127.0.0.1:43691"), None);
        assert_eq!(
            PodRef::parse("pod/myapp-0"),
            Some(Ok(PodRef {
                name: "myapp-0".into(),
                namespace: None
            }))
        );
        assert_eq!(
            PodRef::parse("pod/myapp-0.prod"),
            Some(Ok(PodRef {
                name: "myapp-0".into(),
                namespace: Some("prod".into())
            }))
        );
        assert!(matches!(PodRef::parse("pod/"), Some(Err(_))));
        assert!(matches!(PodRef::parse("pod/My_Pod"), Some(Err(_))));
        assert!(matches!(PodRef::parse("pod/a."), Some(Err(_))));
    }

    #[test]
    fn kubectl_output() {
        assert_eq!(
            parse_forwarding_line("Forwarding from 127.0.0.1:38211 -> 43691"),
            Some(38211)
        );
        assert_eq!(
            parse_forwarding_line("Forwarding from [::1]:38211 -> 43691"),
            Some(38211)
        );
        assert_eq!(parse_forwarding_line("Handling connection for 38211"), None);
    }
}
