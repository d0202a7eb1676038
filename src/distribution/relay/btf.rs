//! Field offsets of the running kernel's socket structures, read from its
//! BTF (`/sys/kernel/btf/vmlinux`), for the node routes' checks: the
//! `sk_msg` program reads the node socket's `struct tcp_sock` through a
//! BTF-typed pointer and the target's `struct sock` with
//! `bpf_probe_read_kernel`, and a raw program must carry their offsets
//! for the kernel it runs on (they move between builds).
//!
//! Only what that needs: the type and string sections, structs and unions
//! with their members, anonymous members searched through.

use std::io;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// The offsets the node routes' checks read, in bytes from the start of a
/// `struct tcp_sock` (which starts with its `struct sock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockOffsets {
    /// `tcp_sock.write_seq`: the sequence number after the last byte the
    /// application queued.
    pub write_seq: u32,
    /// `sock.sk_wmem_queued`: the bytes (with their overhead) in the send
    /// queue.
    pub wmem_queued: u32,
    /// `sock.sk_sndbuf`: the send buffer's size.
    pub sndbuf: u32,
}

/// Reads the offsets from the running kernel's BTF.
pub fn sock_offsets() -> io::Result<SockOffsets> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
    Btf::parse(&data)?.sock_offsets()
}

struct Type<'a> {
    name: &'a [u8],
    kind: u32,
    /// For structs and unions: (name, type id, bit offset) of each member.
    members: Vec<(&'a [u8], u32, u32)>,
}

struct Btf<'a> {
    /// By type id; id 0 is `void`.
    types: Vec<Type<'a>>,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("kernel BTF: {what}"))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> io::Result<Btf<'a>> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(invalid("not little-endian BTF"));
        }
        let field = |o| {
            u32_at(o)
                .map(|v| v as usize)
                .ok_or_else(|| invalid("short header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (hdr_len + field(8)?, field(12)?);
        let (str_off, str_len) = (hdr_len + field(16)?, field(20)?);
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or_else(|| invalid("string section out of bounds"))?;
        let name = |off: u32| -> &'a [u8] {
            let rest = strings.get(off as usize..).unwrap_or(&[]);
            &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
        };
        let end = type_off
            .checked_add(type_len)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| invalid("type section out of bounds"))?;
        let mut types = vec![Type {
            name: b"",
            kind: 0,
            members: Vec::new(),
        }];
        let mut at = type_off;
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or_else(|| invalid("truncated type"));
            let (name_off, info) = (word(0)?, word(1)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 == 1;
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => 12 * vlen,
                6 | 13 => 8 * vlen,        // enum, function prototype
                15 | 19 => 12 * vlen,      // datasec, enum64
                2 | 7..=12 | 16 | 18 => 0, // pointer, qualifiers, ...
                _ => return Err(invalid("unknown type kind")),
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for m in 0..vlen {
                    let base = at + 12 + 12 * m;
                    let w =
                        |i: usize| u32_at(base + 4 * i).ok_or_else(|| invalid("truncated member"));
                    let offset = if bitfields { w(2)? & 0xff_ffff } else { w(2)? };
                    members.push((name(w(0)?), w(1)?, offset));
                }
            }
            types.push(Type {
                name: name(name_off),
                kind,
                members,
            });
            at += 12 + extra;
        }
        Ok(Btf { types })
    }

    fn find_struct(&self, name: &str) -> io::Result<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && t.name == name.as_bytes())
            .map(|i| i as u32)
            .ok_or_else(|| invalid(&format!("no struct {name}")))
    }

    /// Byte offset of member `name` in the struct or union `id`, looking
    /// into anonymous members.
    fn member(&self, id: u32, name: &str) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        t.members.iter().find_map(|&(m, ty, bits)| {
            if m == name.as_bytes() {
                Some(bits / 8)
            } else if m.is_empty() {
                let inner = self.types.get(ty as usize)?;
                if inner.kind == KIND_STRUCT || inner.kind == KIND_UNION {
                    self.member(ty, name).map(|o| bits / 8 + o)
                } else {
                    None
                }
            } else {
                None
            }
        })
    }

    fn offset(&self, strukt: &str, member: &str) -> io::Result<u32> {
        self.member(self.find_struct(strukt)?, member)
            .ok_or_else(|| invalid(&format!("no {strukt}.{member}")))
    }

    fn sock_offsets(&self) -> io::Result<SockOffsets> {
        let write_seq = self.offset("tcp_sock", "write_seq")?;
        // A program's load offset is 16 bits.
        if write_seq >= 1 << 15 {
            return Err(invalid("tcp_sock.write_seq beyond reach"));
        }
        Ok(SockOffsets {
            write_seq,
            wmem_queued: self.offset("sock", "sk_wmem_queued")?,
            sndbuf: self.offset("sock", "sk_sndbuf")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct outer { int a; union { int b; int c; }; }`
    /// where `c` sits at byte 4 through the anonymous union.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0c\0b\0";
        let mut types = Vec::new();
        let mut word = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // 1: int (4 bytes)
        word(1);
        word(1 << 24);
        word(4);
        word(32);
        // 2: anonymous union { b, c }
        word(0);
        word((KIND_UNION << 24) | 2);
        word(4);
        for name in [15u32, 13] {
            word(name);
            word(1);
            word(0);
        }
        // 3: struct outer { a at 0, the union at 32 bits }
        word(5);
        word((KIND_STRUCT << 24) | 2);
        word(8);
        word(11);
        word(1);
        word(0);
        word(0);
        word(2);
        word(32);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn members_are_found_through_anonymous_unions() {
        let data = blob();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset("outer", "c").unwrap(), 4);
        assert!(btf.offset("outer", "d").is_err());
        assert!(btf.offset("inner", "a").is_err());
    }

    #[test]
    fn truncated_or_foreign_data_is_refused() {
        let data = blob();
        assert!(Btf::parse(&data[..30]).is_err());
        assert!(Btf::parse(b"\x7fELF").is_err());
    }

    /// The running kernel's offsets: `write_seq` past the `struct sock` a
    /// `tcp_sock` starts with (which is far more than 512 bytes on any
    /// kernel), the two `struct sock` fields inside it.
    #[test]
    fn the_running_kernels_offsets_are_read() {
        let o = sock_offsets().expect("this kernel's BTF (/sys/kernel/btf/vmlinux)");
        assert!(
            o.sndbuf < o.write_seq && o.wmem_queued < o.write_seq,
            "{o:?}"
        );
        assert_ne!(o.sndbuf, o.wmem_queued);
        assert!(o.write_seq > 512, "{o:?}");
    }
}
