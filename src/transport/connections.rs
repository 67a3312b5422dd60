//! Who holds the client connections, and which one gives way when a new
//! one arrives at the limit.
//!
//! Connections are bounded ([`super::server::MAX_CONNECTIONS`]) so that the
//! memory budget holds, but a new connection is not the one that waits: a
//! local tool that leaks connections (critest opens a client per spec and
//! never closes the old ones) would otherwise park kubelet's or crictl's
//! connection in the backlog, and kubelet exits when its start-up
//! `ImageFsInfo` times out. At the limit, the connection that has been
//! idle longest (no call in flight) among those of the process holding the
//! most connections is closed (GOAWAY, which an idle gRPC channel answers
//! by dialling again when it next needs to); only when every connection
//! has a call in flight does the new one wait. Processes are told apart by
//! the socket's peer credentials (`SO_PEERCRED`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who is at the other end of a connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The process that connected, when the kernel says.
    pub pid: Option<i32>,
    /// Its user.
    pub uid: u32,
}

impl Peer {
    /// The peer of `stream`.
    pub fn of(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
            },
            Err(_) => Peer::default(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid} uid {}", self.uid),
            None => write!(f, "pid ? uid {}", self.uid),
        }
    }
}

/// One client connection's activity, shared by its calls and the registry.
pub struct Activity {
    peer: Peer,
    base: Instant,
    /// Calls started and not yet answered in full.
    in_flight: AtomicUsize,
    /// When a call last started or finished, in ms since `base`.
    last_active_ms: AtomicU64,
    /// Set once this connection was chosen to give way.
    closing: AtomicBool,
    close: tokio::sync::Notify,
}

impl Activity {
    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// A call started; the guard ends it when dropped (with its answer).
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        CallGuard(self.clone())
    }

    /// Resolves when the registry asks this connection to close.
    pub async fn closing(&self) {
        self.close.notified().await
    }

    fn idle_for(&self, now_ms: u64) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 || self.closing.load(Ordering::Relaxed) {
            return None;
        }
        let last = self.last_active_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_ms.saturating_sub(last)))
    }
}

/// Ends a call's activity when dropped.
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open client connections.
pub struct Registry {
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
    /// What every connection's activity times are counted from.
    base: Instant,
}

/// What [`Registry::make_room`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Room {
    /// The connection of `peer`, idle for `idle`, was asked to close;
    /// `held` is how many connections that process held.
    Closing {
        /// Its process.
        peer: Peer,
        /// How long it had been idle.
        idle: Duration,
        /// Connections its process held.
        held: usize,
    },
    /// Every connection has a call in flight: the new one waits.
    NoneIdle,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            open: Mutex::default(),
            next: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a connection of `peer`; it is forgotten when the returned
    /// handle is dropped.
    pub fn register(self: &Arc<Self>, peer: Peer) -> Registered {
        let base = self.base;
        let activity = Arc::new(Activity {
            peer,
            base,
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(base.elapsed().as_millis() as u64),
            closing: AtomicBool::new(false),
            close: tokio::sync::Notify::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .expect("connections lock")
            .insert(id, activity.clone());
        Registered {
            id,
            registry: self.clone(),
            activity,
        }
    }

    /// Asks one idle connection to close so that a new one can be served:
    /// the longest-idle connection of the process that holds the most
    /// connections (among processes that have an idle one).
    pub fn make_room(&self) -> Room {
        let open = self.open.lock().expect("connections lock");
        let now_ms = self.base.elapsed().as_millis() as u64;
        let mut held: HashMap<Peer, usize> = HashMap::new();
        for a in open.values() {
            *held.entry(a.peer).or_default() += 1;
        }
        let victim = open
            .values()
            .filter_map(|a| a.idle_for(now_ms).map(|idle| (a, idle)))
            .max_by_key(|(a, idle)| (held[&a.peer], *idle));
        match victim {
            Some((a, idle)) => {
                a.closing.store(true, Ordering::Relaxed);
                a.close.notify_one();
                Room::Closing {
                    peer: a.peer,
                    idle,
                    held: held[&a.peer],
                }
            }
            None => Room::NoneIdle,
        }
    }
}

/// A registered connection: its activity, forgotten when dropped.
pub struct Registered {
    id: u64,
    registry: Arc<Registry>,
    activity: Arc<Activity>,
}

impl Registered {
    /// Its activity.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: i32) -> Peer {
        Peer {
            pid: Some(pid),
            uid: 0,
        }
    }

    #[test]
    fn the_longest_idle_connection_of_the_busiest_process_gives_way() {
        let r = Arc::new(Registry::new());
        let kubelet = r.register(peer(1));
        let leaker: Vec<_> = (0..3)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(3));
                r.register(peer(2))
            })
            .collect();
        // The leaker's middle connection was used last; kubelet's is busy.
        let _busy = kubelet.activity().call();
        std::thread::sleep(Duration::from_millis(3));
        drop(leaker[1].activity().call());
        match r.make_room() {
            Room::Closing { peer: p, held, .. } => {
                assert_eq!(p, peer(2));
                assert_eq!(held, 3);
            }
            other => panic!("{other:?}"),
        }
        // The one chosen is the leaker's first (idle longest), and it is
        // not chosen twice.
        assert!(leaker[0].activity().closing.load(Ordering::Relaxed));
        assert!(!leaker[1].activity().closing.load(Ordering::Relaxed));
        assert!(matches!(r.make_room(), Room::Closing { .. }));
        assert!(leaker[2].activity().closing.load(Ordering::Relaxed));
        // The leaker's last is recently used; kubelet's is busy.
        assert!(matches!(r.make_room(), Room::Closing { .. }));
        assert!(leaker[1].activity().closing.load(Ordering::Relaxed));
        assert_eq!(r.make_room(), Room::NoneIdle);
        assert!(!kubelet.activity().closing.load(Ordering::Relaxed));
    }
}
