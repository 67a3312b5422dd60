//! The listening Unix socket: creation with its final mode and group,
//! stale-socket handling, the accept loop, systemd readiness and the drain
//! on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::stat::Mode;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use crate::proxy::{
    boxed, Proxy, CONNECTION_WINDOW, DIAL_TIMEOUT, MAX_HEADER_LIST_SIZE, STREAM_WINDOW,
};

/// Mode of the socket's parent directory when the proxy creates it.
pub const SOCKET_DIR_MODE: u32 = 0o755;
/// Most concurrent calls per client connection (containerd allows more;
/// kubelet uses one connection).
pub const MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A bound socket, removed again by [`Listening::remove`].
pub struct Listening {
    listener: UnixListener,
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
    fn remove(&self) {
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
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<Listening, ServerError> {
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
            return Err(ServerError::UnsafeDirectory(dir.to_owned()));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::AlreadyServing(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket left by a previous process");
                    std::fs::remove_file(path)
                        .map_err(io_err("cannot remove stale socket", path))?;
                }
                Err(e) => return Err(io_err("cannot check existing socket", path)(e)),
            }
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_owned())),
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

/// A client that hangs up (a readiness probe that connects and leaves, a
/// killed kubelet) is normal; only protocol errors are worth a warning.
fn is_disconnect(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        // `transparent` hides the relay's own io::Error from `source()`.
        let io = match e.downcast_ref::<crate::relay::RelayError>() {
            Some(crate::relay::RelayError::Io(io)) => Some(io),
            _ => e.downcast_ref::<io::Error>(),
        };
        if let Some(io) = io {
            return matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
            );
        }
        cur = e.source();
    }
    false
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

/// Accepts connections and serves them with `proxy` until `shutdown`
/// resolves; then stops accepting, removes the socket and lets in-flight
/// calls finish within `grace`.
///
/// Each connection is relayed frame by frame to a connection of its own to
/// the upstream ([`crate::relay`]). When the upstream cannot be dialled,
/// the connection is served by the HTTP/2 server instead, which answers each
/// call with `Unavailable` naming the upstream until it is back.
pub async fn serve(
    listening: Listening,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        // Byte for byte: containerd's answers reach the caller without a
        // `date` header of ours.
        .auto_date_header(false);
    let (drain, draining) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listening.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let proxy = proxy.clone();
                    let builder = builder.clone();
                    let draining = draining.clone();
                    tokio::spawn(serve_connection(stream, proxy, builder, draining));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = &e as &dyn std::error::Error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    listening.remove();
    let Listening { listener, .. } = listening;
    drop(listener);
    drop(draining);
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopped accepting; draining in-flight calls"
    );
    // Every connection task holds a receiver: all gone means all drained.
    let _ = drain.send(true);
    match tokio::time::timeout(grace, drain.closed()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("grace period over; cutting the calls still in flight"),
    }
}

async fn serve_connection(
    stream: UnixStream,
    proxy: Proxy,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    draining: watch::Receiver<bool>,
) {
    let upstream = tokio::time::timeout(DIAL_TIMEOUT, UnixStream::connect(proxy.upstream().path()));
    let result = match upstream.await {
        Ok(Ok(upstream)) => {
            proxy.upstream().mark_up();
            crate::relay::relay(stream, upstream, proxy, draining)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        }
        Ok(Err(e)) => {
            tracing::debug!(upstream = %proxy.upstream().path().display(), error = &e as &dyn std::error::Error, "cannot dial upstream; serving this connection without it");
            serve_http2(stream, proxy, builder, draining).await
        }
        Err(_) => serve_http2(stream, proxy, builder, draining).await,
    };
    if let Err(e) = result {
        if is_disconnect(&*e) {
            tracing::debug!(error = %crate::proxy::error_chain(&*e), "client went away");
        } else {
            tracing::warn!(error = %crate::proxy::error_chain(&*e), "closed a client connection");
        }
    }
}

/// Serves a connection with the HTTP/2 server, each call through
/// [`Proxy::handle`], until the client leaves or `draining` turns true.
/// Meanwhile it checks whether the upstream answers again
/// ([`Upstream::answers_again`](crate::proxy::Upstream::answers_again),
/// nudged by each call); once it does, the client is asked (GOAWAY) to
/// reconnect, so that its next connection gets the relay.
async fn serve_http2(
    stream: UnixStream,
    proxy: Proxy,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    mut draining: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let nudge = Arc::new(Notify::new());
    let svc_proxy = proxy.clone();
    let svc_nudge = nudge.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        svc_nudge.notify_one();
        let proxy = svc_proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req.map(boxed)).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let back = proxy
        .upstream()
        .answers_again(tokio::time::Instant::now(), &nudge);
    let mut back = std::pin::pin!(back);
    let mut closing = *draining.borrow_and_update();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                return result.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            _ = draining.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = back.as_mut(), if !closing => {
                tracing::info!(
                    upstream = %proxy.upstream().path().display(),
                    "upstream answers again; asking a client served without it to reconnect"
                );
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelayError;

    #[test]
    fn a_client_hanging_up_on_the_relay_is_a_disconnect_not_a_warning() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            let err = RelayError::Io(io::Error::from(kind));
            assert!(is_disconnect(&err), "{kind:?}");
        }
        assert!(!is_disconnect(&RelayError::Preface));
        assert!(!is_disconnect(&RelayError::Io(io::Error::from(
            io::ErrorKind::InvalidData
        ))));
    }
}
