//! The `distproxy` binary: command line, logging, exit codes.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 usage or configuration
//! error (sysexits `EX_USAGE`).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use distproxy::config::Config;
use distproxy::server::{self, Sidecar};
use tracing::{error, info};

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
    /// Print the nodes registered with an EPMD server, as `epmd -names` does.
    Names {
        /// Host of the EPMD server.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port of the EPMD server.
        #[arg(long, default_value_t = 4369)]
        port: u16,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("DISTPROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
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
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", config.to_toml());
                eprintln!("configuration {} is valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("distproxy: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Names { host, port } => names(&host, port),
        Command::Run {
            config,
            epmd_listen,
            dist_listen,
            advertise_port,
        } => {
            let mut config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("distproxy: {e}");
                        return ExitCode::from(EX_USAGE);
                    }
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
                eprintln!("distproxy: {e}");
                return ExitCode::from(EX_USAGE);
            }
            run(config)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run(config: Config) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("distproxy: failed to start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        distproxy::metrics::describe();
        let listeners = match server::bind(&config) {
            Ok(l) => l,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let sidecar = Sidecar::start(config, listeners);
        tokio::select! {
            _ = shutdown_signal() => info!("signal received; shutting down"),
            _ = sidecar.shutdown_requested() => info!("shutdown requested"),
        }
        sidecar.shutdown(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn names(host: &str, port: u16) -> ExitCode {
    let addr = match (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            eprintln!("distproxy: cannot resolve host {host}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("distproxy: failed to start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(distproxy::client::names(addr)) {
        Ok((epmd_port, text)) => {
            println!("epmd: up and running on port {epmd_port} with data:");
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("epmd: Cannot connect to epmd at {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
