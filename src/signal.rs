//! Signals: SIGTERM (systemd, a node drain) or SIGINT shut down; SIGHUP
//! asks for a configuration reload.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT. Handlers are installed when this
/// is called, so call it before announcing readiness.
pub fn shutdown() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

/// A stream of SIGHUPs. Installing it replaces the default action
/// (terminate), so call it before announcing readiness.
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    signal(SignalKind::hangup())
}
