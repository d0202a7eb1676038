//! Relaying between two plaintext TCP sockets with `splice(2)` (Linux).
//!
//! Each direction moves bulk bytes socket → pipe → socket inside the kernel
//! (<https://man7.org/linux/man-pages/man2/splice.2.html>): nothing is copied
//! to user space. `nix` wraps `splice`, `pipe2` and `fcntl` in safe
//! functions, so this module needs no `unsafe`.
//!
//! Small messages, the usual distribution traffic, are cheaper to copy: a
//! burst (what a socket has when it becomes readable) starts with an
//! ordinary read into a [`SMALL`]-byte buffer, taken from a per-thread pool
//! for the read and given back while the socket has nothing to read. A short read means the socket
//! is drained (tokio then clears its readiness, so there is no extra probe
//! for `EAGAIN`), and the bytes are written on: the same three system calls
//! per message as a read/write relay. Only a full read, which means more is
//! waiting, turns to splicing for the rest of the burst. (Splicing a small
//! message costs more: its bytes are copied into a page for the pipe, and
//! the end of the burst needs a `splice` that fails with `EAGAIN`; the
//! bench measured about 2.5 µs more per round trip.)
//!
//! Readiness comes from tokio: the sockets stay registered with its reactor;
//! a splice burst reads with `try_io` (which clears the readiness when the
//! socket would block) and drains the pipe with `async_io(WRITABLE, ..)`.
//! The pipe is drained completely before the next read from the socket, so a
//! `splice` into it never fails because it is full, and an `EAGAIN` from the
//! source socket means just that.
//!
//! Pipes come from a small process-wide pool: a direction takes one for a
//! burst and gives it back, empty, at the burst's end. An idle relayed
//! connection therefore holds no pipe and no buffer (its cost is its two
//! sockets and its task), and the pipes open at once are about the number of
//! directions moving bulk bytes at that moment. A pipe that may still hold
//! bytes (an error, or the relay dropped at shutdown) is closed, never
//! pooled. When no pipe can be had (file-descriptor limit) or the kernel
//! refuses to splice, the direction goes on with small reads and writes,
//! slower but correct.
//!
//! `splice` into a socket whose peer has gone can raise `SIGPIPE`, like a
//! `write`; the Rust runtime ignores `SIGPIPE` in binaries, so it shows up
//! as an `EPIPE` error that ends the relay.
//!
//! A write that cannot proceed (the destination, a stopped node, takes
//! nothing) keeps its direction from reading its source, so the source's
//! close would go unseen and `relay.half_close_timeout_ms` would never
//! start: the connection would be held until the destination woke (or
//! `TCP_USER_TIMEOUT` gave up on it). A blocked write therefore looks at its
//! source's readiness now and then ([`super::Watch`]); once the source has
//! closed, a destination that takes nothing for the half-close timeout ends
//! the relay.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use metrics::Counter;
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::{AsyncWriteExt, Interest};

use super::pool::Slot;
use super::{tcp_read_closed as source_closed, Watch};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Pipe capacity asked for. With the default 64 KiB, benches/relay.rs
/// measured about three times the CPU per byte and a third less throughput;
/// 1 MiB is `/proc/sys/fs/pipe-max-size`'s default. Pipe pages are charged to the
/// user (`pipe-user-pages-soft`, 64 MiB by default, shared by every process
/// of the uid): over it, the kernel refuses the size and the pipe keeps a
/// small one, which still works, only slower, and is not pooled.
const PIPE_SIZE: i32 = 1 << 20;
/// Bytes asked of one `splice` from a socket; it stops early when the pipe
/// is full or the socket has nothing more.
const SPLICE_LEN: usize = 1 << 20;
/// Empty pipes kept for reuse (each saves `pipe2`, `fcntl` and two `close`
/// calls per burst); more are closed. Small, as pooled pipes count against
/// the user's pipe pages.
const POOL_MAX: usize = 16;
/// The first read of each burst: messages up to this size are copied, not
/// spliced. The buffer is taken only for the read ([`super::pool`]).
const SMALL: usize = super::SMALL_READ;

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

/// An anonymous pipe, both ends non-blocking.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Got [`PIPE_SIZE`]; a smaller pipe is not pooled.
    full_size: bool,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

fn pool() -> MutexGuard<'static, Vec<Pipe>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = pool().pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let full_size = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).is_ok();
        Ok(Pipe { r, w, full_size })
    }

    /// Returns a pipe that is known to be empty to the pool.
    fn give_back(self) {
        if !self.full_size {
            return;
        }
        let mut pool = pool();
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// Errors that mean "these file descriptors cannot be spliced", raised
/// before any byte moved.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

/// How a burst ended.
enum Burst {
    /// The source would block; wait for readiness again.
    Drained,
    /// The source reached EOF.
    Eof,
    /// The kernel will not splice from the source; copy from now on.
    Unsupported,
}

/// Copies `src` to `dst` until EOF, then shuts `dst` down for writing.
/// Bytes are counted (in `counted` and `total`) once written to `dst`.
/// A write blocked while `src` has closed fails after `watch`'s linger.
pub(super) async fn copy_one_way(
    src: ReadHalf<'_>,
    dst: WriteHalf<'_>,
    counted: &Counter,
    total: &mut u64,
    watch: Watch,
) -> io::Result<()> {
    copy_with(src, dst, counted, total, true, watch).await
}

async fn copy_with(
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    counted: &Counter,
    total: &mut u64,
    mut can_splice: bool,
    mut watch: Watch,
) -> io::Result<()> {
    let mut small = Slot::default();
    loop {
        let n = small.read(&mut src, SMALL).await?;
        if n == 0 {
            return dst.shutdown().await;
        }
        let source = src.as_ref();
        watch
            .write(dst.write_all(small.filled(n)), || source_closed(source))
            .await?;
        *total += n as u64;
        counted.increment(n as u64);
        if n < SMALL || !can_splice {
            continue;
        }
        // A full read: more is waiting. Splice the rest of the burst.
        small.release();
        let Ok(pipe) = Pipe::take() else {
            continue;
        };
        // Boxed: the burst's state exists only while it runs, instead of
        // enlarging every relayed connection's task for its whole life.
        match Box::pin(splice_burst(
            src.as_ref(),
            dst.as_ref(),
            pipe,
            counted,
            total,
            &mut watch,
        ))
        .await?
        {
            Burst::Drained => {}
            Burst::Unsupported => can_splice = false,
            Burst::Eof => return dst.shutdown().await,
        }
    }
}

/// Splices from `src` into `pipe` and on into `dst` until `src` would
/// block or ends.
async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: Pipe,
    counted: &Counter,
    total: &mut u64,
    watch: &mut Watch,
) -> io::Result<Burst> {
    loop {
        let filled = src.try_io(Interest::READABLE, || {
            Ok(splice(src, None, &pipe.w, None, SPLICE_LEN, flags())?)
        });
        match filled {
            Ok(0) => {
                pipe.give_back();
                return Ok(Burst::Eof);
            }
            Ok(n) => {
                // On error the pipe may hold bytes: it is dropped (closed).
                drain(&pipe, n, src, dst, counted, total, watch).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                return Ok(Burst::Drained);
            }
            Err(e) if unsupported(&e) => {
                pipe.give_back();
                return Ok(Burst::Unsupported);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Moves the `n` bytes in `pipe` to `dst`.
async fn drain(
    pipe: &Pipe,
    mut n: usize,
    src: &TcpStream,
    dst: &TcpStream,
    counted: &Counter,
    total: &mut u64,
    watch: &mut Watch,
) -> io::Result<()> {
    while n > 0 {
        // Exactly the bytes in the pipe: asking for more would make the
        // kernel send the last piece with MSG_MORE and hold it back.
        let spliced = dst.async_io(Interest::WRITABLE, || {
            Ok(splice(&pipe.r, None, dst, None, n, flags())?)
        });
        let m = watch.write(spliced, || source_closed(src)).await?;
        if m == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n -= m;
        *total += m as u64;
        counted.increment(m as u64);
        #[cfg(test)]
        SPLICED.fetch_add(m as u64, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// Bytes moved by `splice` in this process (tests check the path taken).
#[cfg(test)]
pub(super) static SPLICED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Without splice (no pipe, or a kernel that refuses), the small reads
    /// and writes carry everything.
    #[tokio::test]
    async fn copies_every_byte_when_it_cannot_splice() {
        let (mut a, mut src) = pair().await;
        let (mut dst, mut b) = pair().await;
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let p2 = payload.clone();
        let w = tokio::spawn(async move {
            a.write_all(&p2).await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut total = 0;
        let (sr, _) = src.split();
        let (_, dw) = dst.split();
        let noop = Counter::noop();
        let copier = copy_with(sr, dw, &noop, &mut total, false, Watch::off());
        let mut got = Vec::new();
        let (c, r) = tokio::join!(copier, b.read_to_end(&mut got));
        c.unwrap();
        r.unwrap();
        w.await.unwrap();
        assert!(got == payload, "{} bytes of {}", got.len(), payload.len());
        assert_eq!(total, payload.len() as u64);
    }

    #[test]
    fn only_refusals_count_as_unsupported() {
        assert!(unsupported(&io::Error::from_raw_os_error(
            Errno::EINVAL as i32
        )));
        assert!(!unsupported(&io::Error::from_raw_os_error(
            Errno::EPIPE as i32
        )));
        assert!(!unsupported(&io::ErrorKind::WouldBlock.into()));
    }
}
