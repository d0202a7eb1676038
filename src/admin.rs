//! The admin endpoint: `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz`, `/nodes` (JSON), `/members` (JSON, [`crate::discovery`]).
//!
//! A deliberately small HTTP/1.1 server: GET/HEAD only, one request per
//! connection, a bounded request head and a deadline for it. Probes and
//! scrapers need nothing more, and the sidecar stays free of a web stack.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::distribution::node_stats::NodeStats;
use crate::epmd::registry::Registry;
use crate::net::{accept_loop, write_all_within, ConnPermit, ConnectionLimit, Stop, WriteError};

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
    /// Per-node counts: `/nodes`' `open_connections` and the node-labelled
    /// metric families, appended to the exporter's.
    pub node_stats: Arc<NodeStats>,
    /// `limits.admin_max_connections` (requests served at once) and its
    /// per-source cap.
    pub limit: ConnectionLimit,
    /// `limits.write_timeout_ms`: a scraper that does not read its response
    /// is closed after this.
    pub write_timeout: Duration,
    /// `/members`: discovery's member list as JSON (`src/discovery/`).
    pub members_json: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// The longest request head read before answering 400.
pub const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts admin connections until the hard stop. Its connections are on
/// a tracker of their own: an admin request must not hold up shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<AdminCtx>) {
    let stop = Stop {
        accepting: shared.hard_stop.clone(),
        connections: shared.hard_stop.clone(),
    };
    let limit = shared.limit.clone();
    accept_loop(
        "admin",
        listener,
        stop,
        TaskTracker::new(),
        limit,
        move |stream, _, permit| {
            let shared = Arc::clone(&shared);
            async move { handle(stream, &shared, permit).await }
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

/// The connection's place (`permit`) is never claimed: until its response
/// is written it can be closed to make room for a newer connection
/// (`limits.admin_max_connections`, an evicting limit), so peers that send
/// a request and never read its answer cannot keep the kubelet's probes
/// out for `limits.write_timeout_ms` each, any more than peers that never
/// finish their request can.
async fn handle(mut stream: TcpStream, shared: &AdminCtx, _permit: ConnPermit) {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(request) = parse_request_head(&head) {
                return request;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return HeadRequest::Incomplete,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let request = tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .unwrap_or(HeadRequest::Incomplete);
    let (is_head, response) = match request {
        HeadRequest::Get { path, head_only } => (head_only, route(&path, shared)),
        HeadRequest::MethodNotAllowed => (false, Response::text(405, "only GET and HEAD\n")),
        HeadRequest::Malformed => (false, Response::text(400, "bad request\n")),
        HeadRequest::Incomplete | HeadRequest::Oversized => (
            false,
            Response::text(400, "incomplete or oversized request\n"),
        ),
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
    match write_all_within(&mut stream, &out, shared.write_timeout, "admin response").await {
        Ok(()) => {}
        Err(e @ WriteError::Timeout { .. }) => {
            metrics::counter!(crate::metrics::WRITE_TIMEOUTS, "listener" => "admin").increment(1);
            debug!(error = %e, "closing admin connection");
        }
        Err(e) => debug!(error = %e, "admin response not delivered"),
    }
}

/// What a request head asks for, as far as this server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadRequest {
    /// `GET` or `HEAD` (`head_only`) of `path` (the target without its query).
    Get { path: String, head_only: bool },
    /// A well-formed request line with another method.
    MethodNotAllowed,
    /// A complete head whose request line has no method and target.
    Malformed,
    /// [`MAX_HEAD`] bytes without the blank line that ends a head.
    Oversized,
    /// The peer closed or timed out before the head was complete (never
    /// returned by [`parse_request_head`]).
    Incomplete,
}

/// Judges the bytes of a request head read so far: `None` while the blank
/// line that ends it (`\r\n\r\n`, or `\n\n` from lax clients) has not
/// arrived and there is room for more. Only the request line is looked at;
/// headers are ignored. The caller stops reading at the first `Some`, so a
/// head never grows much past [`MAX_HEAD`].
pub fn parse_request_head(head: &[u8]) -> Option<HeadRequest> {
    let complete =
        head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n");
    if !complete {
        return (head.len() >= MAX_HEAD).then_some(HeadRequest::Oversized);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    Some(match (parts.next(), parts.next()) {
        (Some(method @ ("GET" | "HEAD")), Some(target)) => HeadRequest::Get {
            path: target.split('?').next().unwrap_or(target).to_owned(),
            head_only: method == "HEAD",
        },
        (Some(_), Some(_)) => HeadRequest::MethodNotAllowed,
        _ => HeadRequest::Malformed,
    })
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
                body: handle.render() + &shared.node_stats.render(),
            },
            None => Response::text(503, "metrics recorder not installed\n"),
        },
        "/nodes" => Response {
            status: 200,
            content_type: "application/json",
            body: nodes_json(shared),
        },
        "/members" => Response {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(&(shared.members_json)())
                .unwrap_or_else(|_| "{}".into())
                + "\n",
        },
        _ => Response::text(
            404,
            "not found; try /metrics /healthz /readyz /nodes /members\n",
        ),
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
                "open_connections": shared.node_stats.open_connections(&n.spec.name),
            })
        })
        .collect();
    serde_json::to_string_pretty(&nodes).unwrap_or_else(|_| "[]".into()) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, head_only: bool) -> Option<HeadRequest> {
        Some(HeadRequest::Get {
            path: path.into(),
            head_only,
        })
    }

    #[test]
    fn request_heads() {
        let cases: [(&[u8], Option<HeadRequest>); 9] = [
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                get("/metrics", false),
            ),
            (b"HEAD /healthz HTTP/1.0\r\n\r\n", get("/healthz", true)),
            (b"GET /readyz?x=1 HTTP/1.1\n\n", get("/readyz", false)),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                Some(HeadRequest::MethodNotAllowed),
            ),
            (b"GET\r\n\r\n", Some(HeadRequest::Malformed)),
            (b"\r\n\r\n", Some(HeadRequest::Malformed)),
            // Not yet complete: wait for more.
            (b"GET /metrics HTTP/1.1\r\n", None),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r", None),
            (b"", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_request_head(head),
                want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_without_its_end_is_refused_at_the_limit() {
        let mut head = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD - 1, b'a');
        assert_eq!(parse_request_head(&head), None);
        head.push(b'a');
        assert_eq!(parse_request_head(&head), Some(HeadRequest::Oversized));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request_head(&head), get("/metrics", false));
    }
}
