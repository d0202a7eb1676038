//! distproxy: a sidecar that is a pod's EPMD and owns one Erlang
//! distribution port, so many BEAM nodes can share a pod behind two ports.
//!
//! Architecture (see `docs/ARCHITECTURE.md`):
//!
//! - [`epmd`]: the EPMD protocol as OTP's `epmd` speaks it — [`epmd::proto`]
//!   (messages, no I/O), [`epmd::codec`] (framing), [`epmd::registry`]
//!   (registrations owned by their ALIVE2 connections), [`epmd::server`].
//! - [`distribution`]: the distribution port — [`distribution::handshake`] (first frames, no
//!   I/O), [`distribution::router`] (lookup correlation), [`distribution::mirror`]
//!   (same-pod lookups, exact by port), [`distribution::listener`] (accept,
//!   route, verify), [`distribution::relay`] (opaque byte copying).
//! - [`server`]: binding and wiring; [`config`]: configuration;
//!   [`metrics`]: metric names; [`client`]: small EPMD client (`names`).
//! - [`tunnel`]: sidecar-to-sidecar connections routed exactly by a
//!   preamble — [`tunnel::preamble`] (no I/O), [`tunnel::egress`] (loopback
//!   egress listeners for local nodes), [`tunnel::resolve`] (hickory),
//!   [`tunnel::tls`] (mutual TLS).
//! - [`discovery`]: every node of every pod behind a headless Service —
//!   [`discovery::wire`] (pod-info and members replies, no I/O),
//!   [`discovery::naming`] (host parts), [`discovery::query`] (asking one pod).
//! - [`acl`]: distribution ACLs — [`acl::pattern`] (globs, no I/O), the
//!   rules in force and their reload.
//! - [`remsh`]: `distproxy remsh`, a remote shell through one forwarded port.
//! - [`beam`]: the compiled `distproxy_epmd` module, embedded, and
//!   `install-module`.
#![deny(unsafe_code)]

pub mod acl;
pub mod admin;
pub mod beam;
pub mod client;
pub mod config;
pub mod discovery;
pub mod distribution;
pub mod epmd;
pub mod log_safe;
pub mod metrics;
pub mod net;
pub mod node_name;
pub mod remsh;
pub mod sidecar;
pub mod tunnel;
