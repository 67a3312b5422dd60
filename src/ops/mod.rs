//! The operator's side, apart from the path of a call: metrics and the
//! `/healthz` `/readyz` endpoint, `check`, and SIGHUP reload.

pub mod admin;
pub mod check;
pub mod metrics;
pub mod reload;
