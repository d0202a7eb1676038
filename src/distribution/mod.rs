//! The distribution port: routing incoming connections to local nodes.
//!
//! - [`handshake`]: the handshake's first frames (no I/O).
//! - [`router`]: lookup correlation.
//! - [`forward`]: the connection-setup layer shared with the tunnel
//!   (first-frame reads, setup errors, connecting to a node, counted relays).
//! - [`listener`]: accept, first-byte dispatch, routing.
//! - [`relay`]: opaque byte copying.

pub mod forward;
pub mod handshake;
pub mod listener;
pub mod relay;
pub mod router;
