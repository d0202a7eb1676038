//! Logs that names from the network cannot forge.
//!
//! Node names, initiator names, preamble names and HTTP paths come from
//! peers; a `\n` or an ESC in one would start a fake log line or drive the
//! reader's terminal. Every log line passes through [`EscapingWriter`], in
//! both formats: control characters (C0, DEL, C1) are written as `\xNN`,
//! except the newline that ends the line. (The JSON format already escapes
//! them inside strings; the writer is a second guard, and the one place
//! for the text format.)

use std::io::{self, Write};

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
