//! The memory budget for `PullImage` messages, the one request the daemon
//! reads whole before forwarding it. Every byte of such a message being
//! read is taken from its connection's share and from the daemon's total;
//! past either, or past one message's size, or past the time a message may
//! take to arrive, the call ends with a clear status and nothing else is
//! held. What HTTP/2 itself may buffer for a caller (windows, send
//! buffers, streams, connections) is bounded by the limits in
//! [`crate::transport`]; README "Memory budget" adds the two up.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest `PullImageRequest` accepted. A real one is a few KiB: the image
/// reference, the pod's sandbox config and credentials. Its largest part,
/// the pod's labels and annotations, is bounded by the pod object itself,
/// which etcd stores in at most 1.5 MiB (its default request limit;
/// annotations alone are capped at 256 KiB), so any real pod fits.
pub const MAX_PULL_MESSAGE_SIZE: usize = 2 * 1024 * 1024;
/// Most bytes of `PullImage` messages being read on one connection at
/// once: two of the largest, or a thousand real ones. kubelet pulls one
/// image at a time by default, a few with `serializeImagePulls: false`.
pub const PULL_BUFFER_PER_CONNECTION: usize = 2 * MAX_PULL_MESSAGE_SIZE;
/// Bytes of each connection's share that are its own, never taken from
/// the total: a hundred real messages. So a caller whose messages are
/// real-sized (kubelet) is never refused because others flood.
pub const PULL_BUFFER_RESERVED: usize = 256 * 1024;
/// Most bytes of `PullImage` messages being read at once beyond the
/// connections' reserved parts, all connections together: eight
/// connections' shares.
pub const PULL_BUFFER_TOTAL: usize = 8 * PULL_BUFFER_PER_CONNECTION;
/// How long a `PullImage` message may take to arrive once its call has
/// started. kubelet sends the whole message with the request headers.
pub const PULL_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's budget. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    total: Arc<Semaphore>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            total: Arc::new(Semaphore::new(PULL_BUFFER_TOTAL)),
        }
    }
}

impl Budget {
    /// A new share for one client connection.
    pub fn connection(&self) -> ConnectionBudget {
        ConnectionBudget {
            total: self.total.clone(),
            used: Arc::new(Mutex::new(0)),
        }
    }

    /// Bytes of the total in use now.
    pub fn in_use(&self) -> usize {
        PULL_BUFFER_TOTAL - self.total.available_permits()
    }
}

/// One connection's share of the budget. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionBudget {
    total: Arc<Semaphore>,
    /// Bytes this connection holds now.
    used: Arc<Mutex<usize>>,
}

/// Which bound a message ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// The connection's share ([`PULL_BUFFER_PER_CONNECTION`]).
    Connection,
    /// The daemon's total ([`PULL_BUFFER_TOTAL`]).
    Total,
}

impl Exhausted {
    /// The bound, in bytes.
    pub fn limit(self) -> usize {
        match self {
            Exhausted::Connection => PULL_BUFFER_PER_CONNECTION,
            Exhausted::Total => PULL_BUFFER_TOTAL,
        }
    }

    /// What the bound covers, for messages.
    pub fn scope(self) -> &'static str {
        match self {
            Exhausted::Connection => "this connection",
            Exhausted::Total => "all connections",
        }
    }
}

/// Bytes one message holds of its connection's share (and of the total);
/// given back when dropped.
#[derive(Default)]
pub struct Held {
    /// The connection's count, once something was taken from it.
    connection: Option<Arc<Mutex<usize>>>,
    bytes: usize,
    /// What was taken beyond the reserved part, as one permit.
    total: Option<OwnedSemaphorePermit>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(used) = &self.connection {
            *used.lock().expect("budget lock") -= self.bytes;
        }
    }
}

impl ConnectionBudget {
    /// Takes `n` more bytes for a message being read into `held` (which
    /// holds bytes of this connection only), or says which bound it would
    /// pass. Never waits: a caller that floods gets its answer at once and
    /// holds nothing. What takes the connection past its reserved part is
    /// taken from the total too.
    pub fn take(&self, held: &mut Held, n: usize) -> Result<(), Exhausted> {
        if n == 0 {
            return Ok(());
        }
        debug_assert!(held
            .connection
            .as_ref()
            .is_none_or(|c| Arc::ptr_eq(c, &self.used)));
        let mut used = self.used.lock().expect("budget lock");
        if *used + n > PULL_BUFFER_PER_CONNECTION {
            return Err(Exhausted::Connection);
        }
        let over = (*used + n).saturating_sub(PULL_BUFFER_RESERVED)
            - used.saturating_sub(PULL_BUFFER_RESERVED);
        if over > 0 {
            let permit = u32::try_from(over)
                .ok()
                .and_then(|over| self.total.clone().try_acquire_many_owned(over).ok())
                .ok_or(Exhausted::Total)?;
            match &mut held.total {
                Some(total) => total.merge(permit),
                None => held.total = Some(permit),
            }
        }
        *used += n;
        held.bytes += n;
        held.connection.get_or_insert_with(|| self.used.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVER_RESERVE: usize = PULL_BUFFER_PER_CONNECTION - PULL_BUFFER_RESERVED;

    #[test]
    fn a_connection_gets_its_share_and_no_more() {
        let budget = Budget::default();
        let c = budget.connection();
        let mut held = Held::default();
        c.take(&mut held, PULL_BUFFER_PER_CONNECTION).unwrap();
        assert_eq!(c.take(&mut held, 1), Err(Exhausted::Connection));
        assert_eq!(budget.in_use(), OVER_RESERVE);
        drop(held);
        assert_eq!(budget.in_use(), 0);
        c.take(&mut Held::default(), PULL_BUFFER_PER_CONNECTION)
            .unwrap();
    }

    #[test]
    fn the_total_bounds_what_connections_hold_beyond_their_reserve() {
        let budget = Budget::default();
        let mut held = Vec::new();
        let mut n = 0;
        loop {
            let mut h = Held::default();
            match budget.connection().take(&mut h, PULL_BUFFER_PER_CONNECTION) {
                Ok(()) => held.push(h),
                Err(e) => {
                    assert_eq!(e, Exhausted::Total);
                    break;
                }
            }
            n += 1;
        }
        assert_eq!(n, PULL_BUFFER_TOTAL / OVER_RESERVE);
        // A real-sized message still fits in a connection's reserve.
        budget
            .connection()
            .take(&mut Held::default(), 8 * 1024)
            .unwrap();
        held.pop();
        budget
            .connection()
            .take(&mut Held::default(), PULL_BUFFER_PER_CONNECTION)
            .unwrap();
    }
}
