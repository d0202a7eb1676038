//! The distribution port: routing incoming connections to local nodes.
//!
//! - [`handshake`]: the handshake's first frames (no I/O).
//! - [`router`]: lookup correlation.
//! - [`mirror`]: same-pod lookups of stock nodes, exact by port.
//! - [`forward`]: the connection-setup layer shared with the tunnel
//!   (first-frame reads, setup errors, connecting to a node, counted relays).
//! - [`listener`]: accept, first-byte dispatch, routing.
//! - [`node_stats`]: per-node connection and byte counts (`/nodes`, the
//!   node-labelled metrics), forgotten some time after a node left.
//! - [`beam_tls`]: nodes' own TLS distribution, told from the tunnel's and
//!   relayed undecrypted.
//! - [`relay`]: opaque byte copying.

pub mod beam_tls;
pub mod forward;
pub mod handshake;
pub mod listener;
pub mod mirror;
pub mod node_stats;
pub mod relay;
pub mod router;
