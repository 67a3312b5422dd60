//! The listening Unix socket: created with its final mode and group, a
//! stale socket from an earlier process replaced, a live one or another
//! file never taken over; and systemd's readiness notice.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use tokio::net::UnixListener;

/// Mode of the socket's parent directory when the proxy creates it.
pub const SOCKET_DIR_MODE: u32 = 0o755;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the socket.
    #[error("{} is in use by a running process (another ecr-pull-proxy?); stop it or choose another --listen path", .0.display())]
    AlreadyServing(PathBuf),
    /// The socket's directory lets any user replace the socket.
    #[error("{} is world-writable, so any local user could replace the socket; use a directory only root can write, such as /run/ecr-pull-proxy", .0.display())]
    UnsafeDirectory(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket; remove it or choose another --listen path", .0.display())]
    NotASocket(PathBuf),
    /// A filesystem operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A bound socket, removed again by [`Listening::remove`].
pub struct Listening {
    pub(super) listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl Listening {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, for a server of another protocol on the same kind of
    /// socket (the metrics endpoint).
    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    /// Removes the socket file, unless another process has replaced it.
    pub(super) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = &e as &dyn std::error::Error, "cannot remove socket");
                }
            }
            _ => {}
        }
    }
}

/// Binds `path` with `mode` and `group`. The socket never exists with a
/// wider mode: the umask is narrowed around `bind`, then the group and the
/// exact mode are set before anything is accepted.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<Listening, SocketError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(SOCKET_DIR_MODE)
                .create(dir)
                .map_err(io_err("cannot create directory", dir))?;
        }
    }
    if let Some(dir) = path.parent() {
        let meta = std::fs::metadata(dir).map_err(io_err("cannot inspect", dir))?;
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(SocketError::UnsafeDirectory(dir.to_owned()));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::AlreadyServing(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket left by a previous process");
                    std::fs::remove_file(path)
                        .map_err(io_err("cannot remove stale socket", path))?;
                }
                Err(e) => return Err(io_err("cannot check existing socket", path)(e)),
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
    }

    // umask is process-wide; nothing else creates files while we start.
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let std_listener = bound.map_err(io_err("cannot bind", path))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io_err("cannot set group of", path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set mode of", path))?;
    let ino = std::fs::symlink_metadata(path)
        .map_err(io_err("cannot inspect", path))?
        .ino();
    std_listener
        .set_nonblocking(true)
        .map_err(io_err("cannot configure", path))?;
    let listener = UnixListener::from_std(std_listener).map_err(io_err("cannot register", path))?;
    Ok(Listening {
        listener,
        path: path.to_owned(),
        ino,
    })
}

/// Tells systemd the proxy is ready (a no-op outside systemd).
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "cannot notify systemd"
        );
    }
}
