//! `distproxy remsh`: a remote shell into any node of a pod through one
//! forwarded port (user guide: `docs/remsh.md`).
//!
//! The laptop side of a `kubectl port-forward` to the pod's distribution
//! port. It starts an ephemeral sidecar in this process (the same
//! [`Sidecar`] as `distproxy run`, with a generated configuration: EPMD and
//! distribution on `127.0.0.1:0`, no admin endpoint, the tunnel's egress
//! pinned to the forwarded address for the target's host and to nothing
//! else), checks through the forward that the pod routes to the node
//! ([`probe`]), and runs `erl -remsh` (or `iex --remsh`) with the
//! `distproxy_epmd` module and `ERL_EPMD_PORT` pointing at the ephemeral
//! EPMD. The shell's node then reaches the target through the egress
//! listener: preamble naming the exact node, TLS when configured; the
//! node's host part is never resolved locally.
//!
//! Wiring, like `main` and `sidecar`: it assembles, it does not handle
//! protocol.

pub mod kubectl;
pub mod plan;
pub mod probe;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tracing::{debug, info};

use crate::config::Config;
use crate::sidecar::{self, Sidecar};
use plan::ShellPlan;

/// The Erlang helper module's source, compiled at run time when no
/// `.beam` is installed.
const MODULE_SRC: &str = include_str!("../../deploy/erlang/distproxy_epmd.erl");
/// Where the container image installs the compiled module.
const INSTALLED_EBIN: &str = "/opt/distproxy/ebin";
/// Deadline for each step of the check and for the port forward to start.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the command line asked for (`distproxy remsh …`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemshOptions {
    /// The node, e.g. a2@myapp-0.myapp-headless.ns.svc.cluster.local.
    pub node: String,
    /// The forwarded distribution port (HOST:PORT), or pod/NAME[.NAMESPACE]
    /// to run `kubectl port-forward` to it.
    #[arg(long, value_name = "HOST:PORT|pod/NAME[.NS]")]
    pub via: String,
    /// The pods' distribution port, for --via pod/… .
    #[arg(long, value_name = "N", default_value_t = crate::net::DEFAULT_DIST_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub remote_port: u16,
    /// The nodes' cookie.
    #[arg(long, conflicts_with = "cookie_file")]
    pub cookie: Option<String>,
    /// A file whose first line is the nodes' cookie.
    #[arg(long, value_name = "FILE")]
    pub cookie_file: Option<PathBuf>,
    /// A distproxy configuration file; its [tls] section is used.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Client certificate (PEM) for a pod that requires TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) the pod's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This side's node name (default remsh-<pid>@<first SAN of the TLS
    /// certificate, or 127.0.0.1>).
    #[arg(long, value_name = "NAME@HOST")]
    pub name: Option<String>,
    /// Directory holding distproxy_epmd.beam (default: the image's
    /// /opt/distproxy/ebin, else compiled with erlc).
    #[arg(long, value_name = "DIR")]
    pub ebin: Option<PathBuf>,
    /// `iex --remsh` instead of `erl -remsh`.
    #[arg(long)]
    pub iex: bool,
    /// Start this side as a hidden node (observer, diagnostics).
    #[arg(long)]
    pub hidden: bool,
    /// Further arguments for erl (or iex), after `--`.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// Why no shell could be started. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RemshError {
    #[error("{0}")]
    Usage(String),
    #[error("{0} is not on PATH: install Erlang/OTP (and Elixir for --iex), or put it on PATH")]
    NoShell(&'static str),
    #[error("no cookie: pass --cookie-file FILE or --cookie COOKIE (the cookie of the pod's nodes), or create ~/.erlang.cookie")]
    NoCookie,
    #[error("cannot read the cookie file {path}: {source}")]
    CookieFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Forward(#[from] kubectl::ForwardError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Bind(#[from] sidecar::BindError),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("cannot resolve the host of --via {via:?}: {error}")]
    Resolve { via: String, error: String },
    #[error("cannot get distproxy_epmd.beam: {0}")]
    Module(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

impl RemshError {
    /// Usage and configuration errors exit 64 (a `--via` host that does
    /// not resolve too, as `distproxy names --host`); the others 1.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RemshError::Usage(_)
                | RemshError::Plan(_)
                | RemshError::Config(_)
                | RemshError::Resolve { .. }
        )
    }
}

/// The cookie: `--cookie`, else the first line of `--cookie-file`, else
/// `None` when `~/.erlang.cookie` exists (erl reads it), else an error.
fn cookie(opts: &RemshOptions) -> Result<Option<String>, RemshError> {
    if let Some(c) = &opts.cookie {
        return Ok(Some(c.clone()));
    }
    if let Some(path) = &opts.cookie_file {
        let text = std::fs::read_to_string(path).map_err(|source| RemshError::CookieFile {
            path: path.display().to_string(),
            source,
        })?;
        let c = text.lines().next().unwrap_or("").trim().to_string();
        if c.is_empty() {
            return Err(RemshError::CookieFile {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            });
        }
        return Ok(Some(c));
    }
    let home_cookie = std::env::var_os("HOME").map(|h| Path::new(&h).join(".erlang.cookie"));
    if home_cookie.is_some_and(|p| p.is_file()) {
        return Ok(None);
    }
    Err(RemshError::NoCookie)
}

/// The configuration of the ephemeral sidecar. `inet6`: the shell's node
/// runs `inet6_tcp` and registers over `::1`, so EPMD listens there.
fn ephemeral_config(opts: &RemshOptions, via_port: u16, inet6: bool) -> Result<Config, RemshError> {
    let mut config = match &opts.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if opts.tls_cert.is_some() || opts.tls_key.is_some() || opts.tls_ca.is_some() {
        config.tls.cert_file = opts.tls_cert.clone().or(config.tls.cert_file);
        config.tls.key_file = opts.tls_key.clone().or(config.tls.key_file);
        config.tls.ca_file = opts.tls_ca.clone().or(config.tls.ca_file);
    }
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    config.epmd.listen = if inet6 {
        vec![SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))]
    } else {
        vec![loopback]
    };
    config.epmd.state_file = None;
    config.dist.listen = vec![loopback];
    config.dist.advertise_port = None;
    config.admin.listen = Vec::new();
    config.tunnel.egress = true;
    config.tunnel.remote_port = via_port;
    // The forwarded port is the only way out; probing it per host would
    // only add a connection the pod logs as empty.
    config.tunnel.probe_remote = false;
    config.tls.require_tls = false;
    config.discovery = Default::default();
    config.acl.clear();
    config.validate()?;
    Ok(config)
}

/// `distproxy_epmd.beam`: `--ebin`, else the image's, else compiled from
/// the embedded source with `erlc` into `tmp`.
fn module_ebin(opts: &RemshOptions, tmp: &Path) -> Result<PathBuf, RemshError> {
    let beam = |dir: &Path| dir.join("distproxy_epmd.beam").is_file();
    if let Some(dir) = &opts.ebin {
        return if beam(dir) {
            Ok(dir.clone())
        } else {
            Err(RemshError::Module(format!(
                "{} has no distproxy_epmd.beam",
                dir.display()
            )))
        };
    }
    if beam(Path::new(INSTALLED_EBIN)) {
        return Ok(INSTALLED_EBIN.into());
    }
    if !kubectl::on_path("erlc") {
        return Err(RemshError::Module(
            "erlc is not on PATH to compile it; pass --ebin DIR holding distproxy_epmd.beam".into(),
        ));
    }
    let src = tmp.join("distproxy_epmd.erl");
    std::fs::write(&src, MODULE_SRC).map_err(|e| RemshError::Module(e.to_string()))?;
    let out = std::process::Command::new("erlc")
        .arg("-o")
        .arg(tmp)
        .arg(&src)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RemshError::Module(format!("cannot run erlc: {e}")))?;
    if !out.status.success() || !beam(tmp) {
        return Err(RemshError::Module(format!(
            "erlc failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(tmp.to_path_buf())
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("distproxy-remsh-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the session: checks, ephemeral sidecar, the shell; returns the
/// shell's exit status.
pub async fn run(opts: RemshOptions) -> Result<ExitStatus, RemshError> {
    let target = plan::parse_target(&opts.node)?;
    let cookie = cookie(&opts)?;
    let pod = kubectl::PodRef::parse(&opts.via)
        .transpose()
        .map_err(RemshError::Usage)?;
    let shell = if opts.iex { "iex" } else { "erl" };
    if !kubectl::on_path(shell) {
        return Err(RemshError::NoShell(shell));
    }

    // Where the pod is: a forward we start, or an address given.
    let (_forward, via) = match pod {
        Some(pod) => {
            let fwd = kubectl::port_forward(&pod, opts.remote_port, STEP_TIMEOUT).await?;
            let via = SocketAddr::from(([127, 0, 0, 1], fwd.local_port));
            info!(pod = %pod.name, %via, "kubectl port-forward running");
            (Some(fwd), via)
        }
        None => {
            let usage = || {
                RemshError::Usage(format!(
                    "--via {:?}: expected HOST:PORT (e.g. 127.0.0.1:43691) or pod/NAME[.NAMESPACE]",
                    opts.via
                ))
            };
            // HOST:PORT whose host does not resolve is not a usage error:
            // say that it does not resolve.
            let has_port = opts
                .via
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            let via = match opts.via.to_socket_addrs() {
                Ok(mut addrs) => addrs.next().ok_or_else(|| RemshError::Resolve {
                    via: opts.via.clone(),
                    error: "no address".into(),
                })?,
                Err(e) if has_port => {
                    return Err(RemshError::Resolve {
                        via: opts.via.clone(),
                        error: e.to_string(),
                    })
                }
                Err(_) => return Err(usage()),
            };
            (None, via)
        }
    };

    // A node named by an IPv6 address (a pod IP in an IPv6 cluster) can
    // only be reached from an `inet6_tcp` node: `inet_tcp` calls that host
    // illegal.
    let inet6 = plan::needs_inet6(&target.host);
    let config = ephemeral_config(&opts, via.port(), inet6)?;
    let mut listeners = sidecar::bind(&config)?;
    let tls = listeners.tls.clone();
    let local = match &opts.name {
        Some(n) => n.clone(),
        None => {
            let (dns, ips) = match &tls {
                Some(t) => {
                    let id = t.local_identity();
                    let ips = id.ip_addrs.iter().map(|i| i.to_string()).collect();
                    (id.dns_names, ips)
                }
                None => (Vec::new(), Vec::new()),
            };
            plan::default_local_name(std::process::id(), &dns, &ips)
        }
    };
    let tmp = TempDir::new().map_err(|e| RemshError::Module(e.to_string()))?;
    let ebin = module_ebin(&opts, &tmp.0)?;

    // Through the forward: does the pod route to the node, as that node?
    probe::check(via, &opts.node, &local, tls.as_deref(), STEP_TIMEOUT).await?;
    debug!(%via, node = %opts.node, %local, "the pod routes to the node");

    listeners.pinned_host = Some((target.host.clone(), via.ip()));
    let epmd_port = listeners.epmd_addrs()[0].port();
    let sidecar = Sidecar::start(config, listeners);
    let plan = ShellPlan {
        target: opts.node.clone(),
        local,
        iex: opts.iex,
        hidden: opts.hidden,
        ebin: ebin.display().to_string(),
        epmd_port,
        inet6,
        cookie,
        extra: opts.extra.clone(),
    };
    plan.validate()?;
    let status = run_shell(&plan).await;
    sidecar.shutdown(Duration::from_millis(500)).await;
    status
}

/// Runs the shell with the terminal, until it exits. SIGINT is the
/// shell's (its break menu); SIGTERM/SIGHUP end it.
async fn run_shell(plan: &ShellPlan) -> Result<ExitStatus, RemshError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (program, args) = plan.command();
    let aflags = std::env::var("ERL_AFLAGS").ok();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .envs(plan.env(aflags.as_deref()))
        .kill_on_drop(true);
    // Ours while the shell runs: a terminal's ^C goes to the whole
    // foreground group, and must not end the session under the shell.
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut child = cmd.spawn().map_err(|source| RemshError::Spawn {
        program: program.clone(),
        source,
    })?;
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    loop {
        tokio::select! {
            status = child.wait() => {
                return status.map_err(|source| RemshError::Spawn { program, source });
            }
            _ = recv(&mut interrupt) => {}
            _ = recv(&mut terminate) => break,
            _ = recv(&mut hangup) => break,
        }
    }
    let _ = child.start_kill();
    child
        .wait()
        .await
        .map_err(|source| RemshError::Spawn { program, source })
}
