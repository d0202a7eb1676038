//! Relay buffers held only while bytes are in flight.
//!
//! A relayed distribution connection is idle nearly all its life (a tick
//! every 15 s), and a sidecar may hold ten thousand of them. A direction
//! therefore owns no buffer while it waits: [`Slot::read`] takes one when
//! it polls the source and, when the read is pending (nothing to read),
//! gives it back at once. `AsyncRead::poll_read` leaves the buffer
//! untouched when it returns `Pending`, so nothing is lost. The buffer is
//! kept from a read until the bytes are written on, and across reads that
//! follow at once.
//!
//! Buffers of the [`POOLED`] sizes come from a small free list per thread
//! (no lock, no allocation once warm; at most [`KEEP`] of each size per
//! thread, so the pool holds about the buffers of the reads in progress at
//! a busy moment). A larger buffer (a direction that grew it for bulk, see
//! [`super::next_buf_len`]) is kept across pending reads until it shrinks.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

/// The buffer sizes kept in the per-thread free lists: the splice path's
/// small reads and the copy path's initial size.
pub(crate) const POOLED: [usize; 2] = [super::SMALL_READ, super::INITIAL_BUF];

/// Free buffers kept per size and thread.
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<[Vec<Box<[u8]>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

fn class(len: usize) -> Option<usize> {
    POOLED.iter().position(|&s| s == len)
}

/// A buffer of `len` bytes: a free one of this thread, or a new one.
fn take(len: usize) -> Box<[u8]> {
    class(len)
        .and_then(|c| FREE.with(|f| f.borrow_mut()[c].pop()))
        .unwrap_or_else(|| vec![0u8; len].into_boxed_slice())
}

/// Returns a buffer to this thread's free list (or frees it).
fn give_back(buf: Box<[u8]>) {
    if let Some(c) = class(buf.len()) {
        // `try_with`: during thread teardown the list may be gone; the
        // buffer is then simply freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f[c].len() < KEEP {
                f[c].push(buf);
            }
        });
    }
}

/// One direction's read buffer, present only while it is in use.
#[derive(Default)]
pub(crate) struct Slot {
    buf: Option<Box<[u8]>>,
}

impl Slot {
    /// Reads once from `r` into the held buffer, or into a buffer of `len`
    /// bytes taken for this read; returns the number of bytes read (0: EOF).
    /// While the read is pending, a pooled-size buffer is given back, so an
    /// idle direction holds none.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        len: usize,
    ) -> io::Result<usize> {
        poll_fn(|cx| {
            let buf = self.buf.get_or_insert_with(|| take(len));
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.buf.as_ref().is_some_and(|b| class(b.len()).is_some()) {
                        self.release();
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The first `n` bytes of the buffer (those the last read filled).
    pub(crate) fn filled(&self, n: usize) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[..n])
    }

    /// Size of the held buffer (0: none).
    pub(crate) fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Gives the buffer back (or frees it, if not of a pooled size).
    pub(crate) fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            give_back(b);
        }
    }

    /// Whether a buffer is held (tests).
    #[cfg(test)]
    pub(crate) fn holds(&self) -> bool {
        self.buf.is_some()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_pending_read_holds_no_buffer_and_loses_no_byte() {
        let (mut w, mut r) = tokio::io::duplex(64);
        let mut slot = Slot::default();
        let len = super::super::INITIAL_BUF;
        // Pending: the buffer taken for the poll went back.
        assert!(slot.read(&mut r, len).now_or_never().is_none());
        assert!(!slot.holds(), "an idle direction holds a buffer");
        w.write_all(b"hello").await.unwrap();
        let n = slot.read(&mut r, len).await.unwrap();
        assert_eq!(slot.filled(n), b"hello");
        assert_eq!(slot.len(), len);
        slot.release();
        assert!(!slot.holds());
    }

    #[test]
    fn only_pooled_sizes_are_kept_and_at_most_keep_of_them() {
        let len = POOLED[1];
        let bufs: Vec<_> = (0..KEEP + 10).map(|_| take(len)).collect();
        FREE.with(|f| f.borrow_mut()[1].clear());
        for b in bufs {
            give_back(b);
        }
        assert_eq!(FREE.with(|f| f.borrow()[1].len()), KEEP);
        let before = FREE.with(|f| f.borrow()[0].len());
        give_back(vec![0u8; 12345].into_boxed_slice());
        assert_eq!(FREE.with(|f| f.borrow()[0].len()), before);
        assert_eq!(FREE.with(|f| f.borrow()[1].len()), KEEP);
    }
}
