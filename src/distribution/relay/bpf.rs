//! The system calls of the kernel fast path, and nothing else: `bpf(2)`
//! (a sockhash map, the verdict program, attaching it), and the socket
//! queries the fast path needs (`SO_COOKIE`, `TCP_INFO`, queue sizes, a
//! one-byte peek). This is the crate's only `unsafe` code: `bpf(2)` has no
//! safe wrapper in `nix` or `socket2`.
//!
//! The verdict program is seventeen instructions, emitted here as raw BPF
//! bytecode (see [`verdict_program`]), so the build needs neither clang nor
//! a BPF linker nor nightly Rust, and what runs in the kernel is visible in
//! this file. The kernel's verifier checks it when it is loaded.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// Elements freed after an RCU grace period, not recycled at once: a
/// program still reading a replaced route sees its old value whole.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_SK_MSG_VERDICT: u32 = 7;
/// Update flags: any, or fail if the key exists.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_MAP_UPDATE_ELEM: i32 = 2;
const BPF_FUNC_SKC_TO_TCP_SOCK: i32 = 137;
const BPF_FUNC_SETSOCKOPT: i32 = 49;
const SOL_TCP: i32 = 6;
const TCP_NOTSENT_LOWAT: i32 = 25;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
const BPF_FUNC_SOCK_HASH_UPDATE: i32 = 70;
const BPF_FUNC_MSG_REDIRECT_HASH: i32 = 71;
const BPF_FUNC_SK_REDIRECT_HASH: i32 = 72;
const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;
const BPF_FUNC_PROBE_READ_KERNEL: i32 = 113;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

const SO_COOKIE: libc::c_int = 57;
const SO_NETNS_COOKIE: libc::c_int = 71;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// A program under construction, with named jump targets.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, i: Insn) -> &mut Asm {
        self.code.push(i);
        self
    }

    /// A jump instruction to `label` (defined before or after).
    fn jump(&mut self, i: Insn, label: &'static str) -> &mut Asm {
        self.jumps.push((self.code.len(), label));
        self.op(i)
    }

    fn label(&mut self, name: &'static str) -> &mut Asm {
        self.labels.push((name, self.code.len()));
        self
    }

    /// `dst` = the map `fd` (two slots).
    fn map(&mut self, dst: u8, fd: i32) -> &mut Asm {
        self.op(insn(LD_MAP_FD, dst, 1, 0, fd))
            .op(insn(0, 0, 0, 0, 0))
    }

    /// `bpf_map_update_elem(map, fp + key, fp + value, BPF_ANY)`, key
    /// and value on the stack.
    fn map_update(&mut self, map: i32, key: i16, value: i16) -> &mut Asm {
        self.map(1, map)
            .op(insn(MOV64_REG, 2, 10, 0, 0))
            .op(insn(ADD64_IMM, 2, 0, 0, key.into()))
            .op(insn(MOV64_REG, 3, 10, 0, 0))
            .op(insn(ADD64_IMM, 3, 0, 0, value.into()))
            .op(insn(MOV64_IMM, 4, 0, 0, BPF_ANY as i32))
            .op(insn(CALL, 0, 0, 0, BPF_FUNC_MAP_UPDATE_ELEM))
    }

    /// Jumps to `label` unless the socket of the context in `ctx` lives in
    /// the network namespace `netns` (a cookie).
    fn unless_netns(&mut self, ctx: u8, netns: u64, label: &'static str) -> &mut Asm {
        self.op(insn(MOV64_REG, 1, ctx, 0, 0))
            .op(insn(CALL, 0, 0, 0, BPF_FUNC_GET_NETNS_COOKIE))
            .op(insn(LD_IMM64, 2, 0, 0, netns as u32 as i32))
            .op(insn(0, 0, 0, 0, (netns >> 32) as u32 as i32))
            .jump(insn(JNE_REG, 0, 2, 0, 0), label)
    }

    fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let to = self
                .labels
                .iter()
                .find(|(l, _)| *l == label)
                .map(|&(_, to)| to)
                .unwrap_or_else(|| panic!("undefined label {label}"));
            self.code[at].off = (to as isize - at as isize - 1) as i16;
        }
        self.code
    }
}

/// `BPF_LD | BPF_IMM | BPF_DW` with `BPF_PSEUDO_MAP_FD`: a map's address,
/// two instruction slots.
const LD_MAP_FD: u8 = 0x18;
/// The same opcode with src 0: a 64-bit constant.
const LD_IMM64: u8 = 0x18;
/// `BPF_LDX | BPF_MEM | BPF_W`: `skb->len` is the first field.
const LDX_W: u8 = 0x61;
const LDX_DW: u8 = 0x79;
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const ADD64_REG: u8 = 0x0f;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const CALL: u8 = 0x85;
const JA: u8 = 0x05;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JNE_REG: u8 = 0x5d;
/// Unsigned `>` between registers.
const JGT_REG: u8 = 0x2d;
/// `BPF_ALU` (32-bit) subtraction of a register.
const SUB32_REG: u8 = 0x1c;
/// `BPF_JMP32`: the low 32 bits only.
const JEQ32_IMM: u8 = 0x16;
const JNE32_IMM: u8 = 0x56;
const JNE32_REG: u8 = 0x5e;
const EXIT: u8 = 0x95;
/// `BPF_SOCK_OPS_*_ESTABLISHED_CB`.
const ACTIVE_ESTABLISHED: i32 = 4;
const PASSIVE_ESTABLISHED: i32 = 5;
const AF_INET: i32 = 2;

/// The stream-verdict program, for a sockhash `map_fd` keyed by socket
/// cookie whose value is that socket's partner:
///
/// ```text
/// if skb->len == 0: return SK_DROP         ; a bare FIN: nothing to move
/// r6 = r1                                  ; the skb
/// r0 = bpf_get_socket_cookie(r1)           ; the receiving socket
/// *(u64 *)(r10 - 8) = r0                   ; key on the stack
/// r0 = bpf_sk_redirect_hash(r6, map, r10 - 8, 0)  ; to the partner's egress
/// if r0 == SK_DROP: r0 = SK_PASS           ; no partner: keep the bytes
/// exit
/// ```
///
/// A bare FIN is not redirected: the sidecar sees the end itself and
/// shuts the partner down once its bytes are out, and a FIN redirected
/// after that would fail the partner with `EPIPE`.
///
/// A socket without a partner in the map (its partner has been removed)
/// keeps its bytes in its own receive queue, where the sidecar reads them,
/// instead of dropping them.
pub(super) fn verdict_program(map_fd: i32) -> Vec<Insn> {
    vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(JNE_IMM, 2, 0, 2, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_DROP),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(LD_MAP_FD, 2, 1, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 3, 10, 0, 0),
        insn(ADD64_IMM, 3, 0, 0, -8),
        insn(MOV64_IMM, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_REDIRECT_HASH),
        insn(JNE_IMM, 0, 0, 1, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The key of a node socket in the node sockhash and in the routes: the
/// socket's IPv4 four-tuple from its own side, each field as the kernel's
/// context loads it (`local_ip4`, `remote_ip4`, `local_port`,
/// `remote_port`), so the two programs and the sidecar build the same
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeKey([u32; 4]);

impl NodeKey {
    /// The key of the socket whose local end is `local` and remote end
    /// `remote`; None for IPv6 (the node sockets are IPv4 only).
    pub fn new(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<NodeKey> {
        match (local, remote) {
            (std::net::SocketAddr::V4(l), std::net::SocketAddr::V4(r)) => Some(NodeKey([
                u32::from_ne_bytes(l.ip().octets()),
                u32::from_ne_bytes(r.ip().octets()),
                u32::from(l.port()),
                remote_port_field(r.port()),
            ])),
            _ => None,
        }
    }

    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// A remote port as the `sock_ops` and `sk_msg` contexts give it: network
/// order, in the upper half of a u32 (on little-endian machines).
pub(super) fn remote_port_field(port: u16) -> u32 {
    let raw = u32::from(u16::from_ne_bytes(port.to_be_bytes()));
    if cfg!(target_endian = "little") {
        raw << 16
    } else {
        raw
    }
}

/// The `sock_ops` program, attached to the cgroup of the BEAM nodes: when
/// a TCP connection of the sidecar's network namespace is established, it
/// puts the socket into the node sockhash `nodes` (under its [`NodeKey`])
/// if it is a node's end of a relayed connection, and notes where its
/// sequence numbers start in `bases` (the back-pressure check counts the
/// bytes the node queued on its own socket from there):
///
/// ```text
/// if family != AF_INET or netns cookie != netns: return 1
/// key = (local_ip4, remote_ip4, local_port, remote_port)   ; on the stack
/// active (the node dialled):   remote_port in dist_ports and local_ip4 == remote_ip4
/// passive (the node accepted): key in expected              ; the sidecar dialled it
/// bpf_sock_hash_update(ctx, nodes, key, BPF_ANY)
/// bases[key] = snd_nxt                                      ; nothing sent yet
/// return 1
/// ```
pub(super) fn sock_ops_program(
    nodes: i32,
    expected: i32,
    dist_ports: i32,
    bases: i32,
    netns: u64,
) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(insn(MOV64_REG, 6, 1, 0, 0))
        .op(insn(LDX_W, 2, 6, 20, 0))
        .jump(insn(JNE32_IMM, 2, 0, 0, AF_INET), "out")
        .unless_netns(6, netns, "out");
    for (field, slot) in [(28, -16), (24, -12), (68, -8), (64, -4)] {
        a.op(insn(LDX_W, 2, 6, field, 0))
            .op(insn(STX_W, 10, 2, slot, 0));
    }
    a.op(insn(LDX_W, 2, 6, 0, 0))
        .jump(insn(JEQ32_IMM, 2, 0, 0, PASSIVE_ESTABLISHED), "passive")
        .jump(insn(JNE32_IMM, 2, 0, 0, ACTIVE_ESTABLISHED), "out")
        // active: a local connection to a distribution port
        .op(insn(LDX_W, 2, 10, -16, 0))
        .op(insn(LDX_W, 3, 10, -12, 0))
        .jump(insn(JNE32_REG, 2, 3, 0, 0), "out")
        .map(1, dist_ports)
        .op(insn(MOV64_REG, 2, 10, 0, 0))
        .op(insn(ADD64_IMM, 2, 0, 0, -4))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM))
        .jump(insn(JA, 0, 0, 0, 0), "found")
        // passive: a connection the sidecar announced
        .label("passive")
        .map(1, expected)
        .op(insn(MOV64_REG, 2, 10, 0, 0))
        .op(insn(ADD64_IMM, 2, 0, 0, -16))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM))
        .label("found")
        .jump(insn(JEQ_IMM, 0, 0, 0, 0), "out")
        .op(insn(MOV64_REG, 1, 6, 0, 0))
        .map(2, nodes)
        .op(insn(MOV64_REG, 3, 10, 0, 0))
        .op(insn(ADD64_IMM, 3, 0, 0, -16))
        .op(insn(MOV64_IMM, 4, 0, 0, BPF_ANY as i32))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_SOCK_HASH_UPDATE))
        // bases[key] = snd_nxt
        .op(insn(LDX_W, 2, 6, SOCK_OPS_SND_NXT, 0))
        .op(insn(STX_W, 10, 2, -20, 0))
        .map_update(bases, -16, -20)
        // TCP_NOTSENT_LOWAT = 1
        .op(insn(MOV64_IMM, 2, 0, 0, 1))
        .op(insn(STX_W, 10, 2, -24, 0))
        .op(insn(MOV64_REG, 1, 6, 0, 0))
        .op(insn(MOV64_IMM, 2, 0, 0, SOL_TCP))
        .op(insn(MOV64_IMM, 3, 0, 0, TCP_NOTSENT_LOWAT))
        .op(insn(MOV64_REG, 4, 10, 0, 0))
        .op(insn(ADD64_IMM, 4, 0, 0, -24))
        .op(insn(MOV64_IMM, 5, 0, 0, 4))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_SETSOCKOPT))
        .label("out")
        .op(insn(MOV64_IMM, 0, 0, 0, 1))
        .op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

/// `bpf_sock_ops.snd_nxt`.
const SOCK_OPS_SND_NXT: i16 = 104;
/// `bpf_sock_ops.sk`.
const SOCK_OPS_SK: i16 = 184;

/// The `sock_ops` program attached to the sidecar's own cgroup: notes the
/// kernel address of each TCP socket of the sidecar's network namespace
/// as it is established, under
/// the socket's cookie, so a route can name its target's `struct sock`
/// for the `sk_msg` program to read (storing a pointer in a map needs
/// CAP_PERFMON):
///
/// ```text
/// if op not in (active established, passive established): return 1
/// if netns cookie != netns: return 1
/// sockets[cookie(ctx)] = ctx->sk
/// return 1
/// ```
pub(super) fn socket_address_program(sockets: i32, netns: u64) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(insn(MOV64_REG, 6, 1, 0, 0))
        .op(insn(LDX_W, 2, 6, 0, 0))
        .jump(insn(JEQ32_IMM, 2, 0, 0, PASSIVE_ESTABLISHED), "note")
        .jump(insn(JNE32_IMM, 2, 0, 0, ACTIVE_ESTABLISHED), "out")
        .label("note")
        .unless_netns(6, netns, "out")
        .op(insn(MOV64_REG, 1, 6, 0, 0))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE))
        .op(insn(STX_DW, 10, 0, -8, 0))
        .op(insn(LDX_DW, 2, 6, SOCK_OPS_SK, 0))
        .jump(insn(JEQ_IMM, 2, 0, 0, 0), "out")
        .op(insn(STX_DW, 10, 2, -16, 0))
        .map_update(sockets, -8, -16)
        .label("out")
        .op(insn(MOV64_IMM, 0, 0, 0, 1))
        .op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}
/// `sk_msg_md.sk`.
const MSG_SK: i16 = 72;

/// `sk_msg_md.size`.
const MSG_SIZE: i16 = 68;
/// Room a routed message leaves in its target's send buffer: what the
/// kernel charges beyond the payload (socket buffer overhead).
const TARGET_MARGIN: i32 = 64 * 1024;

/// A route's value in the routes hash: where the node's messages go, and
/// how far the sidecar has relayed what the node wrote to its own socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RouteValue {
    /// Cookie of the sidecar socket (in the targets sockhash) the
    /// messages go out of.
    pub target: u64,
    /// The node socket's first sequence number (from `bases`).
    pub base: u32,
    /// Bytes of the node's own socket the sidecar has written to the
    /// target, from the start of the connection (low 32 bits).
    pub relayed: u32,
    /// The target's `struct sock`, whose send queue the program reads
    /// (from [`socket_address_program`]; the sidecar holds the socket
    /// open for as long as the route lives).
    pub target_sock: u64,
}

impl RouteValue {
    pub const SIZE: u32 = 24;

    pub fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.target.to_ne_bytes());
        b[8..12].copy_from_slice(&self.base.to_ne_bytes());
        b[12..16].copy_from_slice(&self.relayed.to_ne_bytes());
        b[16..].copy_from_slice(&self.target_sock.to_ne_bytes());
        b
    }
}

/// The `sk_msg` verdict program of the node sockhash: a node's message
/// whose socket has a route goes straight to the send side of the
/// sidecar socket the route names, in the node's own `sendmsg`, unless
/// that would overtake bytes or overfill the target; then it passes,
/// into the node's own socket, whose bytes the sidecar relays.
///
/// ```text
/// key = (local_ip4, remote_ip4, local_port, remote_port)
/// route = routes[key]; if none: return SK_PASS
/// ; every byte the node wrote to its own socket must be in the target
/// ; already, or this message would overtake it
/// if (u32)(tcp_sock(msg->sk).write_seq - route.base) != route.relayed: return SK_PASS
/// ; a full target would refuse the message, and the node, whose own
/// ; socket stays writable, would retry at once: pass it instead, so the
/// ; sidecar wakes, and while the target is full the node's own socket
/// ; fills and the node sleeps
/// queued, sndbuf = probe_read_kernel(route.target_sock: sk_wmem_queued, sk_sndbuf)
/// if queued + msg->size + TARGET_MARGIN > sndbuf: return SK_PASS
/// bpf_msg_redirect_hash(msg, targets, route.target, 0)
/// return SK_PASS
/// ```
///
/// Reading `write_seq` and the target needs their offsets in the running
/// kernel ([`super::btf`]) and CAP_PERFMON.
pub(super) fn msg_program(routes: i32, targets: i32, o: &super::btf::SockOffsets) -> Vec<Insn> {
    let mut a = Asm::default();
    a.op(insn(MOV64_REG, 6, 1, 0, 0));
    for (field, slot) in [(24, -16), (20, -12), (64, -8), (60, -4)] {
        a.op(insn(LDX_W, 2, 6, field, 0))
            .op(insn(STX_W, 10, 2, slot, 0));
    }
    a.map(1, routes)
        .op(insn(MOV64_REG, 2, 10, 0, 0))
        .op(insn(ADD64_IMM, 2, 0, 0, -16))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM))
        .jump(insn(JEQ_IMM, 0, 0, 0, 0), "pass")
        .op(insn(MOV64_REG, 7, 0, 0, 0))
        // bytes the node queued on its own socket, against those relayed
        .op(insn(LDX_DW, 1, 6, MSG_SK, 0))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_SKC_TO_TCP_SOCK))
        .jump(insn(JEQ_IMM, 0, 0, 0, 0), "pass")
        .op(insn(LDX_W, 2, 0, o.write_seq as i16, 0))
        .op(insn(LDX_W, 3, 7, 8, 0))
        .op(insn(SUB32_REG, 2, 3, 0, 0))
        .op(insn(LDX_W, 3, 7, 12, 0))
        .jump(insn(JNE32_REG, 2, 3, 0, 0), "pass");
    // the target's send queue and buffer
    for (field, slot) in [(o.wmem_queued, -24), (o.sndbuf, -20)] {
        a.op(insn(MOV64_REG, 1, 10, 0, 0))
            .op(insn(ADD64_IMM, 1, 0, 0, slot))
            .op(insn(MOV64_IMM, 2, 0, 0, 4))
            .op(insn(LDX_DW, 3, 7, 16, 0))
            .op(insn(ADD64_IMM, 3, 0, 0, field as i32))
            .op(insn(CALL, 0, 0, 0, BPF_FUNC_PROBE_READ_KERNEL))
            .jump(insn(JNE_IMM, 0, 0, 0, 0), "pass");
    }
    a.op(insn(LDX_W, 2, 10, -24, 0))
        .op(insn(LDX_W, 3, 6, MSG_SIZE, 0))
        .op(insn(ADD64_REG, 2, 3, 0, 0))
        .op(insn(ADD64_IMM, 2, 0, 0, TARGET_MARGIN))
        .op(insn(LDX_W, 3, 10, -20, 0))
        .jump(insn(JGT_REG, 2, 3, 0, 0), "pass")
        .op(insn(MOV64_REG, 1, 6, 0, 0))
        .map(2, targets)
        .op(insn(MOV64_REG, 3, 7, 0, 0))
        .op(insn(MOV64_IMM, 4, 0, 0, 0))
        .op(insn(CALL, 0, 0, 0, BPF_FUNC_MSG_REDIRECT_HASH))
        .label("pass")
        .op(insn(MOV64_IMM, 0, 0, 0, SK_PASS))
        .op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

/// `e` with what failed in front, for the start-up log.
pub(super) fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`, valid for `size_of::<T>()` bytes; the kernel reads no more
    // than that size, and every pointer inside it points to memory that
    // outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` is a new file descriptor the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A sockhash map: 8-byte keys (socket cookies), sockets as values.
pub(super) fn create_sockhash(max_entries: u32) -> io::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_SOCKHASH, 8, 4, max_entries)
}

/// The node sockhash: [`NodeKey`]s, sockets as values (8 bytes, so a
/// lookup from here returns the socket's cookie).
pub(super) fn create_node_sockhash(max_entries: u32) -> io::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_SOCKHASH, 16, 8, max_entries)
}

/// A hash map of `key_size`-byte keys and `value_size`-byte values.
pub(super) fn create_hash(key_size: u32, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_HASH, key_size, value_size, max_entries)
}

/// A hash map whose replaced values stay whole for programs still
/// reading them (freed after a grace period, not recycled).
pub(super) fn create_rcu_hash(
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    create_map_flags(
        BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries,
        BPF_F_NO_PREALLOC,
    )
}

/// A hash map that forgets its least recently used entries when full.
pub(super) fn create_lru_hash(
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_LRU_HASH, key_size, value_size, max_entries)
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    create_map_flags(map_type, key_size, value_size, max_entries, 0)
}

fn create_map_flags(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Loads the stream-verdict program for `map`.
pub(super) fn load_verdict(map: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let insns = verdict_program(map.as_raw_fd());
    load(BPF_PROG_TYPE_SK_SKB, 0, b"distproxy_relay", &insns)
}

/// Loads the `sock_ops` program ([`sock_ops_program`]).
pub(super) fn load_sock_ops(
    nodes: BorrowedFd<'_>,
    expected: BorrowedFd<'_>,
    dist_ports: BorrowedFd<'_>,
    bases: BorrowedFd<'_>,
    netns: u64,
) -> io::Result<OwnedFd> {
    let insns = sock_ops_program(
        nodes.as_raw_fd(),
        expected.as_raw_fd(),
        dist_ports.as_raw_fd(),
        bases.as_raw_fd(),
        netns,
    );
    load(
        BPF_PROG_TYPE_SOCK_OPS,
        BPF_CGROUP_SOCK_OPS,
        b"distproxy_nodes",
        &insns,
    )
}

/// Loads the `sock_ops` program of the sidecar's own sockets
/// ([`socket_address_program`]).
pub(super) fn load_socket_addresses(sockets: BorrowedFd<'_>, netns: u64) -> io::Result<OwnedFd> {
    let insns = socket_address_program(sockets.as_raw_fd(), netns);
    load(
        BPF_PROG_TYPE_SOCK_OPS,
        BPF_CGROUP_SOCK_OPS,
        b"distproxy_socks",
        &insns,
    )
}

/// Loads the `sk_msg` program ([`msg_program`]).
pub(super) fn load_msg(
    routes: BorrowedFd<'_>,
    targets: BorrowedFd<'_>,
    offsets: &super::btf::SockOffsets,
) -> io::Result<OwnedFd> {
    let insns = msg_program(routes.as_raw_fd(), targets.as_raw_fd(), offsets);
    load(BPF_PROG_TYPE_SK_MSG, 0, b"distproxy_route", &insns)
}

/// Loads a program; a refusal carries the end of the verifier's log.
fn load(prog_type: u32, attach: u32, name: &[u8], insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name[..n]);
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach,
    };
    bpf(BPF_PROG_LOAD, &mut attr).map(owned).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        if last.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{e} (verifier: {last})"))
        }
    })
}

/// Attaches `prog` as the `sk_msg` verdict of every socket in `map`.
pub(super) fn attach_msg(map: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    attach(map, prog, BPF_SK_MSG_VERDICT)
}

/// Attaches the `sock_ops` program `prog` to the cgroup `dir` (its open
/// directory) through a BPF link: the attachment ends when the returned
/// link is closed, so a sidecar that exits leaves nothing behind.
pub(super) fn link_sock_ops(dir: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: dir.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_SOCK_OPS,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Sets `key` to `value` in the hash `map`.
pub(super) fn hash_set(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: BPF_ANY,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Removes `key` from `map` (absent is fine).
pub(super) fn hash_remove(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// The cookie of the socket under `key` in the node sockhash, if any.
pub(super) fn node_socket(map: BorrowedFd<'_>, key: &NodeKey) -> io::Result<Option<u64>> {
    hash_get_u64(map, &key.bytes())
}

/// The 4-byte value under `key` in the hash `map`, if any.
pub(super) fn hash_get_u32(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<Option<u32>> {
    let mut value = [0u8; 4];
    Ok(lookup(map, key, &mut value)?.then(|| u32::from_ne_bytes(value)))
}

/// The 8-byte value under `key` in the hash `map`, if any.
pub(super) fn hash_get_u64(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<Option<u64>> {
    let mut value = [0u8; 8];
    Ok(lookup(map, key, &mut value)?.then(|| u64::from_ne_bytes(value)))
}

/// Reads the value under `key` into `value` (its size is the map's value
/// size); false when the key is absent.
fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The cookie of the network namespace `fd` (a socket) lives in.
pub(super) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    getsockopt_bytes(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Attaches `prog` as the stream verdict of every socket in `map`.
pub(super) fn attach_verdict(map: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    attach(map, prog, BPF_SK_SKB_STREAM_VERDICT)
}

fn attach(map: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = ProgAttach {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Puts `sock` into `map` under `key` (which must be new).
pub(super) fn map_insert(map: BorrowedFd<'_>, key: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
    let value: u32 = sock.as_raw_fd() as u32;
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u64 as u64,
        value: &value as *const u32 as u64,
        flags: BPF_NOEXIST,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Removes `key` from `map` (absent is fine: a closed socket leaves the
/// map by itself).
pub(super) fn map_remove(map: BorrowedFd<'_>, key: u64) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u64 as u64,
        value: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(|_| ()),
    }
}

fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes and the kernel writes at most
    // `len` bytes, returning the length written in `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}

/// The socket's cookie: a number the kernel never reuses while it runs.
pub(super) fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    getsockopt_bytes(fd, libc::SOL_SOCKET, SO_COOKIE, &mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// What `TCP_INFO` tells the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TcpCounts {
    /// `tcpi_state` (1: established).
    pub state: u8,
    /// Bytes sent and acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Bytes received in order, a FIN counting one (`tcpi_bytes_received`).
    pub received: u64,
}

pub(super) const TCP_ESTABLISHED: u8 = 1;

pub(super) fn tcp_counts(fd: BorrowedFd<'_>) -> io::Result<TcpCounts> {
    let mut buf = [0u8; 256];
    let n = getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    // struct tcp_info: 8 one-byte fields, 24 u32, then u64 pacing rates,
    // bytes_acked at 120 and bytes_received at 128 (Linux 4.1+).
    if n < 136 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO without byte counters",
        ));
    }
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    Ok(TcpCounts {
        state: buf[0],
        acked: u64_at(120),
        received: u64_at(128),
    })
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ and SIOCOUTQ write one int to the pointer given.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v.max(0) as u64)
    }
}

/// Bytes received and not yet read.
pub(super) fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, SIOCINQ)
}

/// Bytes written and not yet acknowledged (sent or not).
pub(super) fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, SIOCOUTQ)
}

/// Peeks at one byte without waiting: `Ok(0)` is EOF, `WouldBlock` none.
pub(super) fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    peek_into(fd, &mut [0u8; 1])
}

/// Copies what the socket has received (as much as fits in `buf`) without
/// consuming it or waiting: `Ok(0)` is EOF, `WouldBlock` nothing.
pub(super) fn peek_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// Consumes as many received bytes as `buf` is long, without copying
/// them (`MSG_TRUNC`).
pub(super) fn discard(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_TRUNC | libc::MSG_DONTWAIT)
}

fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// An epoll instance registered with tokio's reactor.
pub(super) struct Ends(pub nix::sys::epoll::Epoll);

impl std::os::fd::AsRawFd for Ends {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// Registers `ep` with tokio, to wait until it has events.
pub(super) fn register(ep: nix::sys::epoll::Epoll) -> io::Result<tokio::io::unix::AsyncFd<Ends>> {
    // SAFETY: the file descriptor is owned by `Ends`, which the `AsyncFd`
    // owns, so it stays open for as long as it is registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(Ends(ep), tokio::io::Interest::READABLE)
            .map_err(|e| e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_expects() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<MapElem>(), 32);
        assert_eq!(std::mem::size_of::<ProgLoad>(), 72);
        let p = verdict_program(7);
        assert_eq!(p.len(), 17);
        // r3 = r10: dst 3, src 10.
        assert_eq!(p[10].regs, 0xa3);
        // The map load carries the fd, with src = BPF_PSEUDO_MAP_FD (1).
        assert_eq!((p[8].code, p[8].regs, p[8].imm), (0x18, 0x12, 7));
        assert_eq!(p[9], insn(0, 0, 0, 0, 0));
        assert_eq!(p.last().unwrap().code, EXIT);
    }
}
