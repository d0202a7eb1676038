//! Logs that the network can neither forge nor flood.
//!
//! Node names, initiator names, preamble names and HTTP paths come from
//! peers; a `\n` or an ESC in one would start a fake log line or drive the
//! reader's terminal. Every log line passes through [`EscapingWriter`], in
//! both formats: control characters (C0, DEL, C1) are written as `\xNN`,
//! except the newline that ends the line. (The JSON format already escapes
//! them inside strings; the writer is a second guard, and the one place
//! for the text format.)
//!
//! A peer can also repeat a bad request as fast as it can connect: each
//! warning about peer input goes through
//! [`warn_throttled!`](crate::warn_throttled), at most ten lines per call
//! site per second, each carrying how many were left out before it (the
//! counters still count every one).

use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lets the first [`Throttle::BURST`] events of each [`Throttle::PERIOD`]
/// through and counts the others, so that a few events are all logged and
/// a flood costs a few lines a second.
#[derive(Debug, Default)]
pub struct Throttle {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Milliseconds (of [`clock_ms`]) at which the current period began.
    began_ms: Option<u64>,
    let_through: u32,
    skipped: u64,
}

impl Throttle {
    pub const PERIOD: Duration = Duration::from_secs(1);
    pub const BURST: u32 = 10;

    pub const fn new() -> Throttle {
        Throttle {
            window: Mutex::new(Window {
                began_ms: None,
                let_through: 0,
                skipped: 0,
            }),
        }
    }

    /// `Some(events skipped since the last one let through)` for an event
    /// to log now, `None` for one to skip.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(clock_ms())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let period = Self::PERIOD.as_millis() as u64;
        if w.began_ms.is_none_or(|began| now_ms >= began + period) {
            w.began_ms = Some(now_ms);
            w.let_through = 0;
        }
        if w.let_through < Self::BURST {
            w.let_through += 1;
            Some(std::mem::take(&mut w.skipped))
        } else {
            w.skipped += 1;
            None
        }
    }
}

/// Monotonic milliseconds since the first call.
fn clock_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// `tracing::warn!` for events a peer can cause at will: at most
/// [`Throttle::BURST`] lines per second from this call site, each with a
/// `skipped` field counting the lines left out since the previous one.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::log_safe::Throttle = $crate::log_safe::Throttle::new();
        if let Some(skipped) = THROTTLE.allow() {
            ::tracing::warn!(skipped, $($arg)+);
        }
    }};
}

/// Appends `bytes` to `out` with control characters escaped as `\xNN`.
pub fn escape_controls(bytes: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        // C1 controls (U+0080..=U+009F) are 0xC2 0x80..=0x9F in UTF-8.
        if b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)) {
            out.extend_from_slice(format!("\\xc2\\x{:02x}", bytes[i + 1]).as_bytes());
            i += 2;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
        i += 1;
    }
}

/// Wraps a log sink; each `write` is one formatted event (tracing's fmt
/// layer writes an event in one call), whose final `\n` is kept.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (buf, false),
        };
        let mut out = Vec::with_capacity(buf.len() + 16);
        escape_controls(body, &mut out);
        if newline {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_a_burst_through_per_period_and_counts_the_rest() {
        let t = Throttle::new();
        for i in 0..Throttle::BURST as u64 {
            assert_eq!(t.allow_at(5 + i), Some(0), "event {i} of the burst");
        }
        assert_eq!(t.allow_at(20), None);
        assert_eq!(t.allow_at(1004), None, "still the first period");
        assert_eq!(t.allow_at(1005), Some(2), "a new period, with the count");
        assert_eq!(t.allow_at(1006), Some(0));
        for _ in 2..Throttle::BURST {
            assert!(t.allow_at(1500).is_some());
        }
        assert_eq!(t.allow_at(1501), None);
        assert_eq!(t.allow_at(9000), Some(1));
    }

    #[test]
    fn a_name_with_newline_or_escape_stays_on_one_line() {
        let mut w = EscapingWriter(Vec::new());
        let line = "INFO node registered node=evil\nINFO forged \x1b[2Jx\u{85}y\n";
        w.write_all(line.as_bytes()).unwrap();
        let text = String::from_utf8(w.0).unwrap();
        assert_eq!(
            text,
            "INFO node registered node=evil\\x0aINFO forged \\x1b[2Jx\\xc2\\x85y\n"
        );
        assert_eq!(text.lines().count(), 1);
        // Ordinary text, including non-ASCII names, is untouched.
        let mut w = EscapingWriter(Vec::new());
        w.write_all("node=a1@hôst\n".as_bytes()).unwrap();
        assert_eq!(w.0, "node=a1@hôst\n".as_bytes());
    }
}
