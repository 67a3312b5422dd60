//! The socket never exists with a wider mode than configured, even when the
//! proxy inherits umask 000. A watcher polls the path's mode while the
//! proxy starts, and the proxy is stopped only once the watcher has seen
//! the socket at least once (on a busy machine the watcher thread may not
//! run at all before the proxy listens). (Its own file: umask is
//! process-wide.)

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn socket_is_never_more_open_than_its_mode() {
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    for round in 0..20 {
        let dir = support::short_tempdir();
        // Under umask 000 the directory itself would be world-writable,
        // which the daemon refuses; only the socket is under test here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = dir.path().join("p.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let watcher = {
            let (stop, seen, sock) = (stop.clone(), seen.clone(), sock.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&sock) {
                        seen.lock().unwrap().insert(m.permissions().mode() & 0o777);
                    }
                }
            })
        };
        let mut child = support::bare_proxy(&sock).spawn().unwrap();
        support::wait_until(Duration::from_secs(10), "proxy to listen", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        support::wait_until(Duration::from_secs(10), "watcher to see the socket", || {
            !seen.lock().unwrap().is_empty()
        });
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let seen = seen.lock().unwrap();
        for m in seen.iter() {
            assert_eq!(
                m & !0o660,
                0,
                "round {round}: socket was {m:o} at some point"
            );
        }
    }
}
