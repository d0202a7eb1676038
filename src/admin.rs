//! The admin endpoint: `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz`, `/nodes` (JSON).
//!
//! A deliberately small HTTP/1.1 server: GET/HEAD only, one request per
//! connection, a bounded request head and a deadline for it. Probes and
//! scrapers need nothing more, and the sidecar stays free of a web stack.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::distribution::forward::OpenConnections;
use crate::epmd::registry::Registry;
use crate::net::{accept_loop, AdmitAll};

/// What the admin endpoint needs.
pub struct AdminCtx {
    pub registry: Arc<Registry>,
    /// Renders `/metrics`; `None` when no Prometheus recorder is installed.
    pub prometheus: Option<PrometheusHandle>,
    /// `/readyz` fails once this is cancelled.
    pub shutdown: CancellationToken,
    /// Ends the endpoint (after the grace period, so probes see shutdown).
    pub hard_stop: CancellationToken,
    /// `admin.ready_nodes`.
    pub ready_nodes: Vec<String>,
    pub open_connections: Arc<OpenConnections>,
}

const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts admin connections until the hard stop. Its connections are on
/// a tracker of their own: an admin request must not hold up shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<AdminCtx>) {
    let stop = shared.hard_stop.clone();
    accept_loop(
        "admin",
        listener,
        stop,
        TaskTracker::new(),
        AdmitAll,
        move |stream, _, ()| {
            let shared = Arc::clone(&shared);
            async move { handle(stream, &shared).await }
        },
    )
    .await
}

/// A response: status line, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

async fn handle(mut stream: TcpStream, shared: &AdminCtx) {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return true;
            }
            if head.len() >= MAX_HEAD {
                return false;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let complete = tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .unwrap_or(false);
    let (is_head, response) = if complete {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(method @ ("GET" | "HEAD")), Some(target)) => {
                let path = target.split('?').next().unwrap_or(target);
                (method == "HEAD", route(path, shared))
            }
            (Some(_), Some(_)) => (false, Response::text(405, "only GET and HEAD\n")),
            _ => (false, Response::text(400, "bad request\n")),
        }
    } else {
        (
            false,
            Response::text(400, "incomplete or oversized request\n"),
        )
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(response.body.as_bytes());
    }
    if let Err(e) = stream.write_all(&out).await {
        debug!(error = %e, "admin response not delivered");
    }
    let _ = stream.shutdown().await;
}

/// Answers one path.
pub fn route(path: &str, shared: &AdminCtx) -> Response {
    match path {
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => match readiness(shared) {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(503, format!("not ready: {why}\n")),
        },
        "/metrics" => match &shared.prometheus {
            Some(handle) => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: handle.render(),
            },
            None => Response::text(503, "metrics recorder not installed\n"),
        },
        "/nodes" => Response {
            status: 200,
            content_type: "application/json",
            body: nodes_json(shared),
        },
        _ => Response::text(404, "not found; try /metrics /healthz /readyz /nodes\n"),
    }
}

/// Ready when serving (listeners are bound before serving starts), not
/// shutting down, and every `admin.ready_nodes` name is registered.
pub fn readiness(shared: &AdminCtx) -> Result<(), String> {
    if shared.shutdown.is_cancelled() {
        return Err("shutting down".into());
    }
    let missing: Vec<&str> = shared
        .ready_nodes
        .iter()
        .filter(|n| shared.registry.get(n).is_none())
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("waiting for nodes {}", missing.join(", ")))
    }
}

fn nodes_json(shared: &AdminCtx) -> String {
    let nodes: Vec<serde_json::Value> = shared
        .registry
        .list()
        .into_iter()
        .map(|n| {
            serde_json::json!({
                "name": n.spec.name,
                "port": n.spec.port,
                "addr": n.addr.to_string(),
                "node_type": n.spec.node_type,
                "hidden": n.spec.node_type == 72,
                "protocol": n.spec.protocol,
                "highest_version": n.spec.highest_version,
                "lowest_version": n.spec.lowest_version,
                "creation": n.creation,
                "adopted": n.adopted,
                "open_connections": shared.open_connections.get(&n.spec.name),
            })
        })
        .collect();
    serde_json::to_string_pretty(&nodes).unwrap_or_else(|_| "[]".into()) + "\n"
}
