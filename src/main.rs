//! The `distproxy` binary: command line, logging, exit codes.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 usage or configuration
//! error (sysexits `EX_USAGE`).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use distproxy::config::Config;
use distproxy::sidecar::{self, Sidecar};
use tracing::{error, info, warn};

const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "distproxy",
    version,
    about = "EPMD and single-port Erlang distribution router for multi-node BEAM pods"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (embedded default configuration unless --config).
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// EPMD listen address (repeatable; replaces `epmd.listen`).
        #[arg(long = "epmd-listen", value_name = "ADDR")]
        epmd_listen: Vec<SocketAddr>,
        /// Distribution listen address (replaces `dist.listen`).
        #[arg(long = "dist-listen", value_name = "ADDR")]
        dist_listen: Option<SocketAddr>,
        /// Port announced to remote lookups (`dist.advertise_port`).
        #[arg(long = "advertise-port", value_name = "N")]
        advertise_port: Option<u16>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Behave like OTP's `epmd` (`-port N -address LIST -daemon
    /// -relaxed_command_check -names -dump -kill -stop NAME`); the rest of
    /// the configuration comes from $DISTPROXY_CONFIG or the defaults.
    #[command(disable_help_flag = true)]
    Epmd {
        #[arg(allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Print every node of every pod, as the local sidecar's discovery knows
    /// them (`[discovery]`), one full name per line.
    Members {
        /// Host of the sidecar's EPMD (the request is answered to local peers
        /// only; an IPv6 address may be written in brackets).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port of the sidecar's EPMD.
        #[arg(long, default_value_t = 4369)]
        port: u16,
        /// Also list hidden nodes (marked `hidden`).
        #[arg(long)]
        all: bool,
    },
    /// A remote shell into NODE of a pod through one forwarded distribution
    /// port (`kubectl port-forward`), no root, no local DNS: see docs/remsh.md.
    Remsh(distproxy::remsh::RemshOptions),
    /// Write the BEAM helper module `distproxy_epmd.beam` (embedded in this
    /// binary) into DIR, for nodes started with `-pa DIR -epmd_module
    /// distproxy_epmd` (e.g. from an init container into a shared volume).
    InstallModule {
        /// Directory to write `distproxy_epmd.beam` into (created if missing).
        dir: PathBuf,
    },
    /// Print the nodes registered with an EPMD server, as `epmd -names` does.
    Names {
        /// Host of the EPMD server (name or address; an IPv6 address may be
        /// written in brackets).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port of the EPMD server.
        #[arg(long, default_value_t = 4369)]
        port: u16,
    },
}

fn init_logging(format: LogFormat) {
    init_logging_at(format, "info")
}

/// Logging with `default` as the filter unless `DISTPROXY_LOG` is set.
/// An empty `DISTPROXY_LOG` counts as unset; an invalid one is said in the
/// log (and `default` used), not ignored silently.
fn init_logging_at(format: LogFormat, default: &str) {
    let (filter, invalid) = log_filter(std::env::var("DISTPROXY_LOG").ok(), default);
    use distproxy::log_safe::EscapingWriter;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // No colours: every control character from the network is escaped
        // (`log_safe`), and ANSI colours are control sequences too.
        .with_ansi(false);
    match format {
        LogFormat::Text => builder
            .fmt_fields(distproxy::log_safe::TextFields)
            .with_writer(|| EscapingWriter::text(std::io::stderr()))
            .init(),
        LogFormat::Json => {
            builder
                .json()
                .with_writer(|| EscapingWriter::json(std::io::stderr()))
                .init();
            // A panic is a bug; its report stays a JSON line too.
            std::panic::set_hook(Box::new(|info| {
                let (message, location) = distproxy::log_safe::panic_report(info);
                // With RUST_BACKTRACE set; the field is left out otherwise.
                let backtrace = std::backtrace::Backtrace::capture();
                let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
                    .then(|| backtrace.to_string());
                let thread = std::thread::current();
                error!(%location, thread = thread.name().unwrap_or("unnamed"),
                    backtrace, "panic: {message}");
            }));
        }
    }
    if let Some((value, e)) = invalid {
        warn!(DISTPROXY_LOG = %value, error = %e, filter = default,
            "DISTPROXY_LOG is not a valid log filter; using the default");
    }
}

/// The filter for `DISTPROXY_LOG`'s `value`, and the value with its error
/// when it is invalid (`default` is used then).
fn log_filter(
    value: Option<String>,
    default: &str,
) -> (
    tracing_subscriber::EnvFilter,
    Option<(String, tracing_subscriber::filter::ParseError)>,
) {
    use tracing_subscriber::EnvFilter;
    match value.filter(|v| !v.trim().is_empty()) {
        None => (EnvFilter::new(default), None),
        Some(v) => match EnvFilter::try_new(&v) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default), Some((v, e))),
        },
    }
}

fn main() -> ExitCode {
    // Installed or invoked as `epmd`: speak epmd's command line.
    let args: Vec<String> = std::env::args().collect();
    let invoked_as_epmd = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "epmd");
    if invoked_as_epmd {
        return epmd_main(&args[1..], LogFormat::Text);
    }
    if args.get(1).map(String::as_str) == Some("epmd") {
        return epmd_main(&args[2..], LogFormat::Text);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    match cli.command {
        // The shell owns the terminal: only warnings and errors.
        Command::Remsh(_) => init_logging_at(cli.log_format, "warn"),
        // Sets up its logging itself, once it knows it serves.
        Command::Epmd { .. } => {}
        _ => init_logging(cli.log_format),
    }
    match cli.command {
        Command::Remsh(opts) => remsh(opts),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", config.to_toml());
                eprintln!("configuration {} is valid", file.display());
                for note in start_notes(&config) {
                    eprintln!("note: {note}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("distproxy: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::InstallModule { dir } => match distproxy::beam::install(&dir) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("distproxy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Names { host, port } => names(&host, port),
        Command::Members { host, port, all } => members(&host, port, all),
        Command::Epmd { args } => epmd_main(&args, cli.log_format),
        Command::Run {
            config,
            epmd_listen,
            dist_listen,
            advertise_port,
        } => {
            let config_file = config.clone();
            let mut config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => return config_error(cli.log_format, &e),
                },
                None => Config::embedded_default(),
            };
            if !epmd_listen.is_empty() {
                config.epmd.listen = epmd_listen;
            }
            if let Some(addr) = dist_listen {
                config.dist.listen = vec![addr];
            }
            if advertise_port.is_some() {
                config.dist.advertise_port = advertise_port;
            }
            if let Err(e) = config.validate() {
                return config_error(cli.log_format, &e);
            }
            run(config, config_file, false)
        }
    }
}

/// A configuration error that stops `run`: said on stderr, as a JSON log
/// line with `--log-format json` (a log collector reads every line of the
/// container's output); exit 64.
fn config_error(format: LogFormat, e: &dyn std::fmt::Display) -> ExitCode {
    match format {
        LogFormat::Text => eprintln!("distproxy: {e}"),
        LogFormat::Json => error!(error = %e, "invalid configuration; not starting"),
    }
    ExitCode::from(EX_USAGE)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Installs the Prometheus recorder (binary only; the library just records).
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let builder = distproxy::metrics::prometheus_builder();
    match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => {
            distproxy::metrics::describe();
            Some(handle)
        }
        Err(e) => {
            error!(error = %e, "failed to install metrics recorder; /metrics disabled");
            None
        }
    }
}

/// Raises the soft limit on open files to the hard one, and warns when even
/// that is below what the configured connection limits need.
fn raise_open_files(config: &Config) {
    let need = distproxy::net::open_files_needed(
        config.dist.max_connections,
        config.limits.epmd_max_connections,
        config.tunnel.max_egress_listeners,
    );
    match distproxy::net::raise_open_files_limit() {
        Ok(limit) if limit < need => warn!(
            limit,
            need,
            "the limit on open files is below what the connection limits need \
             (two per relayed connection, two per egress listener): connections \
             beyond it fail; raise the hard limit (nofile) or lower dist.max_connections \
             or tunnel.max_egress_listeners"
        ),
        Ok(limit) => info!(limit, "open files limit"),
        Err(e) => warn!(error = %e, "cannot raise the limit on open files"),
    }
}

/// Serves until a signal or KILL_REQ, then shuts down gracefully.
/// `in_use_is_ok`: like `epmd`, exit 0 when the port is already taken.
fn run(config: Config, config_file: Option<PathBuf>, in_use_is_ok: bool) -> ExitCode {
    raise_open_files(&config);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("distproxy: failed to start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Before binding: `bind` loads the TLS files and sets the
        // certificate's expiry gauge, which is lost without a recorder.
        let prometheus = install_metrics();
        let listeners = match sidecar::bind(&config) {
            Ok(l) => l,
            Err(e) => {
                // Like `epmd`: a second instance on the same port is not an error.
                if in_use_is_ok && e.is_addr_in_use() {
                    info!("{e}; another EPMD is already running");
                    return ExitCode::SUCCESS;
                }
                error!("{e}");
                // Files named by `[tls]` that cannot be loaded, an unset
                // `${VAR}` in `[discovery]`: the configuration's fault.
                return if e.is_config_error() {
                    ExitCode::from(EX_USAGE)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        let grace = config.dist.shutdown_grace_ms.duration();
        let sidecar = Sidecar::start_with(config, listeners, prometheus);
        if let Some(path) = &config_file {
            sidecar.watch_config(path);
        }
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        loop {
            tokio::select! {
                hangup = signals.next_or_hangup() => {
                    if !hangup {
                        info!(grace_ms = grace.as_millis() as u64, "signal received; draining connections");
                        break;
                    }
                    sidecar.reload().await;
                }
                _ = sidecar.shutdown_requested() => {
                    info!("shutdown requested");
                    break;
                }
            }
        }
        tokio::select! {
            _ = sidecar.shutdown(grace) => {
                info!("shutdown complete");
                ExitCode::SUCCESS
            }
            _ = signals.next() => {
                info!("second signal; exiting at once");
                ExitCode::from(130)
            }
        }
    })
}

/// SIGTERM and SIGINT as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM/SIGINT (`false`) or SIGHUP (`true`: reload).
    async fn next_or_hangup(&mut self) -> bool {
        tokio::select! {
            _ = self.term.recv() => false,
            _ = self.int.recv() => false,
            _ = self.hup.recv() => true,
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn names(host: &str, port: u16) -> ExitCode {
    let Some(addrs) = resolve_all(host, port) else {
        return ExitCode::from(EX_USAGE);
    };
    block_on(distproxy::epmd::cli::print_names(&addrs))
}

/// Every address of `host` in the system's order (at least one), or `None`
/// (said on stderr). An IPv6 literal may be written in brackets
/// (`[fd00::1]`); `HOST:PORT` is refused saying to use `--port`.
fn resolve_all(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    if host.parse::<SocketAddr>().is_ok() {
        eprintln!(
            "distproxy: --host {host} has a port; give the host alone and the port with --port"
        );
        return None;
    }
    let addrs: Vec<SocketAddr> = (distproxy::epmd::cli::unbracket_host(host), port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if addrs.is_empty() {
        eprintln!("distproxy: cannot resolve host {host}");
        return None;
    }
    Some(addrs)
}

/// Runs a client command on a fresh runtime.
fn block_on(command: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match runtime() {
        Ok(rt) => rt.block_on(command),
        Err(e) => {
            eprintln!("distproxy: failed to start runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `distproxy remsh`: the shell's exit code, or 64/1 with the reason.
fn remsh(opts: distproxy::remsh::RemshOptions) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("distproxy: failed to start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(distproxy::remsh::run(opts)) {
        Ok(status) => ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8)),
        Err(e) => {
            eprintln!("distproxy remsh: {e}");
            ExitCode::from(if e.is_usage() { EX_USAGE } else { 1 })
        }
    }
}

/// `distproxy members`: the members request, printed one name a line.
fn members(host: &str, port: u16, all: bool) -> ExitCode {
    use distproxy::discovery::wire::MembersReply;
    let Some(addrs) = resolve_all(host, port) else {
        return ExitCode::from(EX_USAGE);
    };
    block_on(async move {
        let (addr, reply) = distproxy::client::each_address_while_refused(&addrs, |addr| {
            distproxy::client::members(addr, 0, 0)
        })
        .await;
        match reply {
            Ok(MembersReply::List { members, .. }) => {
                for m in members {
                    if !m.hidden() {
                        println!("{}", m.name);
                    } else if all {
                        println!("{} hidden", m.name);
                    }
                }
                ExitCode::SUCCESS
            }
            Ok(MembersReply::Disabled { .. }) => {
                eprintln!(
                    "distproxy: discovery is not configured on the sidecar at {addr} (set discovery.service)"
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("distproxy: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// What `run` would refuse at start in this environment although the file
/// is valid: what the file names but only `run` loads (an unset `${VAR}` in
/// `discovery.host`, `[tls]` files that are not there). `check-config`
/// says so and still exits 0: the file may be checked where the pod's
/// environment and Secrets are not.
fn start_notes(config: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    if let Err(e) =
        distproxy::discovery::Settings::from_config(&config.discovery, |k| std::env::var(k).ok())
    {
        notes.push(format!(
            "{e}: `run` refuses to start unless it is set (in a pod, by its env or the downward API)"
        ));
    }
    let tls = &config.tls;
    for (key, path) in [
        ("tls.cert_file", &tls.cert_file),
        ("tls.key_file", &tls.key_file),
        ("tls.ca_file", &tls.ca_file),
    ] {
        if let Some(path) = path.as_ref().filter(|p| !p.exists()) {
            notes.push(format!(
                "`{key}` {} does not exist here: `run` refuses to start without it",
                path.display()
            ));
        }
    }
    notes
}

/// `distproxy epmd …` / invoked as `epmd`: serves, or runs one of `epmd`'s
/// client commands (`distproxy::epmd::cli`).
/// `log_format`: `distproxy --log-format json epmd …`.
fn epmd_main(args: &[String], log_format: LogFormat) -> ExitCode {
    use distproxy::epmd::cli::{self, EpmdAction};
    let action = match cli::parse(args, |k| std::env::var(k).ok()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("epmd: {e}");
            eprintln!("{}", cli::USAGE);
            return ExitCode::from(EX_USAGE);
        }
    };
    let EpmdAction::Serve {
        listen,
        daemon,
        relaxed_command_check,
        packet_timeout,
    } = action
    else {
        return block_on(async move { cli::run_client(&action).await });
    };
    // Read before `-daemon` detaches: the daemon's output goes nowhere, so
    // a bad configuration is said here, by the command that was run.
    let mut config = match std::env::var_os("DISTPROXY_CONFIG") {
        Some(path) => match Config::load(std::path::Path::new(&path)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("distproxy: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        None => Config::embedded_default(),
    };
    if let Some(timeout) = packet_timeout {
        config.epmd.idle_timeout_ms =
            distproxy::config::Millis(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        if let Err(e) = config.validate() {
            eprintln!("epmd: -packet_timeout: {e}");
            return ExitCode::from(EX_USAGE);
        }
    }
    if daemon {
        return cli::daemonize(args);
    }
    init_logging(log_format);
    config.epmd.listen = cli::drop_unavailable_ipv6(listen);
    config.epmd.relaxed_command_check |= relaxed_command_check;
    run(config, None, true)
}
