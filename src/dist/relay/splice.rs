//! Relaying between two plaintext TCP sockets with `splice(2)` (Linux).
//!
//! Each direction moves bytes socket → pipe → socket inside the kernel
//! (<https://man7.org/linux/man-pages/man2/splice.2.html>): nothing is copied
//! to user space, and the relay has no buffer of its own. `nix` wraps
//! `splice`, `pipe2` and `fcntl` in safe functions, so this module needs no
//! `unsafe`.
//!
//! Readiness comes from tokio: the sockets stay registered with its reactor;
//! a direction waits with `readable()`, moves a burst with `try_io` (which
//! clears the readiness when the socket would block) and drains the pipe
//! with `async_io(WRITABLE, ..)`. The pipe is drained completely before the
//! next read from the socket, so a `splice` into it never fails because it
//! is full, and an `EAGAIN` from the source socket means just that.
//!
//! Pipes come from a small process-wide pool: a direction takes one when its
//! socket has bytes and gives it back, empty, when the socket has no more.
//! An idle relayed connection therefore holds no pipe (its cost is its two
//! sockets), and the pipes open at once are about the number of directions
//! moving bytes at that moment. A pipe that may still hold bytes (an error,
//! or the relay dropped at shutdown) is closed, never pooled. When no pipe
//! can be had (file-descriptor limit) or the kernel refuses to splice, the
//! direction copies through a small buffer instead, so the relay degrades
//! rather than fails.
//!
//! `splice` into a socket whose peer has gone can raise `SIGPIPE`, like a
//! `write`; the Rust runtime ignores `SIGPIPE` in binaries, so it shows up
//! as an `EPIPE` error that ends the relay.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use metrics::Counter;
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for (the default is 64 KiB); the kernel may refuse,
/// and the pipe keeps its default size.
const PIPE_SIZE: i32 = 256 * 1024;
/// Bytes asked of one `splice` from a socket; it stops early when the pipe
/// is full or the socket has nothing more.
const SPLICE_LEN: usize = 1 << 20;
/// Empty pipes kept for reuse; more are closed.
const POOL_MAX: usize = 64;
/// Buffer of the copying fallback, allocated only when it is used.
const FALLBACK_BUF: usize = 16 * 1024;

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

/// An anonymous pipe, both ends non-blocking.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
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
        // Fewer splices per megabyte; best effort (limited by
        // /proc/sys/fs/pipe-max-size and the per-user pipe page limits).
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe { r, w })
    }

    /// Returns a pipe that is known to be empty to the pool.
    fn give_back(self) {
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
pub(super) async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    counted: &Counter,
    total: &mut u64,
) -> io::Result<()> {
    let mut can_splice = true;
    let mut buf: Option<Box<[u8]>> = None;
    loop {
        src.readable().await?;
        let pipe = if can_splice { Pipe::take().ok() } else { None };
        let burst = match pipe {
            Some(pipe) => splice_burst(src, dst, pipe, counted, total).await?,
            None => {
                let buf = buf.get_or_insert_with(|| vec![0u8; FALLBACK_BUF].into_boxed_slice());
                copy_burst(src, dst, buf, counted, total).await?
            }
        };
        match burst {
            Burst::Drained => {}
            Burst::Unsupported => can_splice = false,
            Burst::Eof => {
                socket2::SockRef::from(dst).shutdown(Shutdown::Write)?;
                return Ok(());
            }
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
                drain(&pipe, n, dst, counted, total).await?;
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
    dst: &TcpStream,
    counted: &Counter,
    total: &mut u64,
) -> io::Result<()> {
    while n > 0 {
        // Exactly the bytes in the pipe: asking for more would make the
        // kernel send the last piece with MSG_MORE and hold it back.
        let m = dst
            .async_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.r, None, dst, None, n, flags())?)
            })
            .await?;
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

/// The fallback: reads and writes through `buf` until `src` would block or
/// ends.
async fn copy_burst(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    counted: &Counter,
    total: &mut u64,
) -> io::Result<Burst> {
    loop {
        let n = match src.try_read(buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            let m = dst
                .async_io(Interest::WRITABLE, || dst.try_write(&buf[sent..n]))
                .await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += m;
        }
        *total += n as u64;
        counted.increment(n as u64);
    }
}

/// Bytes moved by `splice` in this process (tests check the path taken).
#[cfg(test)]
pub(super) static SPLICED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn fallback_copy_moves_every_byte_and_sees_eof() {
        let (mut a, src) = pair().await;
        let (dst, mut b) = pair().await;
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let p2 = payload.clone();
        let w = tokio::spawn(async move {
            a.write_all(&p2).await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut total = 0;
        let mut buf = vec![0u8; 1000];
        let copier = async {
            loop {
                src.readable().await.unwrap();
                match copy_burst(&src, &dst, &mut buf, &Counter::noop(), &mut total)
                    .await
                    .unwrap()
                {
                    Burst::Eof => break,
                    Burst::Drained => {}
                    Burst::Unsupported => unreachable!(),
                }
            }
            socket2::SockRef::from(&dst).shutdown(Shutdown::Write).unwrap();
        };
        let mut got = Vec::new();
        let (_, r) = tokio::join!(copier, b.read_to_end(&mut got));
        r.unwrap();
        w.await.unwrap();
        assert_eq!(got, payload);
        assert_eq!(total, payload.len() as u64);
    }

    #[test]
    fn only_refusals_count_as_unsupported() {
        assert!(unsupported(&io::Error::from_raw_os_error(Errno::EINVAL as i32)));
        assert!(!unsupported(&io::Error::from_raw_os_error(Errno::EPIPE as i32)));
        assert!(!unsupported(&io::ErrorKind::WouldBlock.into()));
    }
}
