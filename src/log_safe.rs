//! Logs that the network can neither forge nor flood.
//!
//! Node names, initiator names, preamble names and HTTP paths come from
//! peers; a `\n` or an ESC in one would start a fake log line or drive the
//! reader's terminal. Every log line passes through [`EscapingWriter`], in
//! both formats: control characters (C0, DEL, C1) are escaped, except the
//! newline that ends the line: as `\xNN` in text lines, as `\u00NN` in JSON
//! lines, so that every JSON line stays one valid JSON object (the JSON
//! format escapes C0 inside strings itself, but not DEL and C1, and `\x` is
//! no JSON escape).
//!
//! A peer can also repeat a bad request as fast as it can connect: each
//! warning about peer input goes through
//! [`warn_throttled!`](crate::warn_throttled), at most ten lines per call
//! site per second, each carrying how many were left out before it (the
//! counters still count every one).

use std::fmt;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

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

/// How [`escape_controls`] writes a control character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Escape {
    /// `\xNN` for each byte (a C1 character is two: `\xc2\x85`), for the
    /// text format.
    #[default]
    Text,
    /// `\u00NN` for each character (`\u0085`), for the JSON format: a
    /// JSON line is all ASCII outside its strings, and inside a string
    /// `\u00NN` is the escape JSON defines, so the line stays valid JSON
    /// and decodes to the original text.
    Json,
}

/// Appends `bytes` to `out` with control characters escaped as `style`
/// says.
pub fn escape_controls(bytes: &[u8], out: &mut Vec<u8>, style: Escape) {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        // C1 controls (U+0080..=U+009F) are 0xC2 0x80..=0x9F in UTF-8.
        if b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)) {
            let escaped = match style {
                Escape::Text => format!("\\xc2\\x{:02x}", bytes[i + 1]),
                Escape::Json => format!("\\u{:04x}", bytes[i + 1]),
            };
            out.extend_from_slice(escaped.as_bytes());
            i += 2;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            let escaped = match style {
                Escape::Text => format!("\\x{b:02x}"),
                Escape::Json => format!("\\u{b:04x}"),
            };
            out.extend_from_slice(escaped.as_bytes());
        } else {
            out.push(b);
        }
        i += 1;
    }
}

/// Wraps a log sink; each `write` is one formatted event (tracing's fmt
/// layer writes an event in one call), whose final `\n` is kept.
pub struct EscapingWriter<W> {
    inner: W,
    style: Escape,
}

impl<W> EscapingWriter<W> {
    /// For text lines (`\xNN`).
    pub fn text(inner: W) -> EscapingWriter<W> {
        EscapingWriter {
            inner,
            style: Escape::Text,
        }
    }

    /// For JSON lines (`\u00NN`, valid inside JSON strings).
    pub fn json(inner: W) -> EscapingWriter<W> {
        EscapingWriter {
            inner,
            style: Escape::Json,
        }
    }

    /// The wrapped sink.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (buf, false),
        };
        let mut out = Vec::with_capacity(buf.len() + 16);
        escape_controls(body, &mut out, self.style);
        if newline {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The text format's fields: `name=value` pairs separated by spaces, as
/// tracing's default, except that a value written through `Display` or
/// `Debug` (`%peer`, `?identity`) is quoted when it holds a space, `=`, `"`
/// or nothing, as string fields always are. A peer-supplied name `x y=z`
/// then stays one field (`target="x y=z"`) instead of adding a fake `y`
/// field to the line for a log parser.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Writes one field, `value` already formatted, after a space unless
    /// it is the first.
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // `log` records' metadata, which the event's header already shows.
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let pad = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = if name == "message" {
            write!(self.writer, "{pad}{value}")
        } else {
            write!(self.writer, "{pad}{name}={value}")
        };
    }

    /// Writes a field whose text came from `Display` or `Debug`, quoted
    /// if it needs to be.
    fn write_text(&mut self, field: &Field, text: &str) {
        let needs_quotes = field.name() != "message"
            && (text.is_empty()
                || text.contains(|c: char| c.is_whitespace() || c == '=' || c == '"'));
        if needs_quotes {
            let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
            self.write(field, format_args!("\"{escaped}\""));
        } else {
            self.write(field, format_args!("{text}"));
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            // Quoted and escaped, as tracing's default writes strings.
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        self.write_text(field, &text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write_text(field, &format!("{value:?}"));
    }
}

/// What a panic says: its message and where it happened. With
/// `--log-format json` the binary logs a panic through `tracing` with these
/// fields, so a log collector gets one more JSON line instead of the
/// default hook's plain text (which it would drop or split).
pub fn panic_report(info: &std::panic::PanicHookInfo<'_>) -> (String, String) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_string());
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    (message, location)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_panic_report_has_the_message_and_where_it_happened() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        // Only this thread's panic is recorded: other tests may panic on
        // purpose while the hook is set.
        let me = std::thread::current().id();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == me {
                sink.lock().unwrap().push(panic_report(info));
            }
        }));
        let line = line!() + 1;
        let _ = std::panic::catch_unwind(|| panic!("boom {}", 42));
        let _ = std::panic::catch_unwind(|| std::panic::panic_any(7u8));
        std::panic::set_hook(previous);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "boom 42");
        assert!(
            seen[0].1.starts_with(&format!("src/log_safe.rs:{line}:")),
            "{:?}",
            seen[0].1
        );
        assert_eq!(seen[1].0, "(a panic without a message)");
    }
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
        let mut w = EscapingWriter::text(Vec::new());
        let line = "INFO node registered node=evil\nINFO forged \x1b[2Jx\u{85}y\n";
        w.write_all(line.as_bytes()).unwrap();
        let text = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(
            text,
            "INFO node registered node=evil\\x0aINFO forged \\x1b[2Jx\\xc2\\x85y\n"
        );
        assert_eq!(text.lines().count(), 1);
        // Ordinary text, including non-ASCII names, is untouched.
        let mut w = EscapingWriter::text(Vec::new());
        w.write_all("node=a1@hôst\n".as_bytes()).unwrap();
        assert_eq!(w.into_inner(), "node=a1@hôst\n".as_bytes());
    }

    /// One text line logged through [`TextFields`], without time or level.
    fn text_line(log: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(TextFields)
            .with_writer(move || writer.clone())
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A peer-supplied value written with `%` used to go out raw, so a name
    /// `x y=z` read as two fields; now it is one quoted field, and plain
    /// values, strings and the message are written as before.
    #[test]
    fn a_displayed_value_with_a_space_or_equals_sign_stays_one_field() {
        let target = "b1 rule=allow-all";
        let line = text_line(|| {
            tracing::warn!(peer = %"198.18.1.3:4000", target = %target, name = "s\"q",
                identity = ?Some("ops"), empty = %"", n = 3, "refused; closing")
        });
        assert_eq!(
            line,
            "refused; closing peer=198.18.1.3:4000 target=\"b1 rule=allow-all\" \
             name=\"s\\\"q\" identity=\"Some(\\\"ops\\\")\" empty=\"\" n=3\n"
        );
    }

    /// The JSON format leaves DEL and C1 characters raw in its strings;
    /// escaped as in text lines (`\x7f`) they made the line invalid JSON.
    #[test]
    fn a_json_line_with_del_and_c1_stays_valid_json_and_decodes_to_the_name() {
        let name = "evil\x7fname\u{85}x\u{9f}\"q\\";
        let line = serde_json::json!({"fields": {"node": name}}).to_string() + "\n";
        assert!(line.contains('\x7f'), "serde_json writes DEL raw: {line}");
        let mut w = EscapingWriter::json(Vec::new());
        w.write_all(line.as_bytes()).unwrap();
        let text = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(
            text.trim_end()
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) || b >= 0xa0),
            "no control character left: {text:?}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["fields"]["node"], name);
    }
}
