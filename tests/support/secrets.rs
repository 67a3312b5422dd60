//! Every secret any part of a test stack issues, in one list, and the one
//! scan for them. Parts register what they hand out as they start
//! (registry passwords, ECR Public's password, the instance role's keys,
//! a role's external id); what moto issues is read from moto itself
//! (`/moto-api/data.json`: the secret keys and session tokens of every
//! `AssumeRole`) each time a text is scanned, from every moto still
//! running in this test binary. The scan is then as strict for a test
//! that did not think of a secret as for one that did.

use std::sync::Mutex;

use base64::Engine;

use super::real::{try_http_get, MOTO_PASSWORD, MOTO_TOKEN_B64, NODE_SECRET_KEY};
use super::stack::CALLER_PASSWORD;

/// Secrets registered at run time, by the parts that issued them.
static ISSUED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// `127.0.0.1:PORT` of every moto running in this test binary.
static MOTOS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The prefix of every session token moto's STS issues
/// (`moto/sts/utils.py`, `SESSION_TOKEN_PREFIX`).
pub const MOTO_SESSION_TOKEN_PREFIX: &str = "FQoGZXIvYXdzEBYaD";

/// Registers `secret`: from now on no scanned text may contain it. Too
/// short a string would match by chance and is refused.
pub fn issued(secret: impl Into<String>) {
    let secret = secret.into();
    assert!(
        secret.len() >= 8,
        "a test secret should be distinctive (8 characters or more): {secret:?}"
    );
    let mut issued = ISSUED.lock().unwrap();
    if !issued.contains(&secret) {
        issued.push(secret);
    }
}

/// A moto whose issued credentials each scan reads.
pub fn moto_started(addr: &str) {
    MOTOS.lock().unwrap().push(addr.to_owned());
}

/// The moto at `addr` is gone.
pub fn moto_stopped(addr: &str) {
    MOTOS.lock().unwrap().retain(|a| a != addr);
}

/// Every secret known now: the stack's fixed ones, the registered ones,
/// and what each running moto has issued.
pub fn all() -> Vec<String> {
    let caller_b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("AWS:{CALLER_PASSWORD}"));
    let mut all: Vec<String> = [
        // moto's ECR password (`<account>-auth-token`, whichever account
        // asked) and its base64 `AWS:…` form, whose prefix is the same
        // for every password.
        MOTO_PASSWORD,
        "-auth-token",
        &MOTO_TOKEN_B64[..5],
        MOTO_SESSION_TOKEN_PREFIX,
        NODE_SECRET_KEY,
        CALLER_PASSWORD,
        caller_b64.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(ISSUED.lock().unwrap().iter().cloned());
    let motos = MOTOS.lock().unwrap().clone();
    for addr in motos {
        all.extend(moto_issued(&addr));
    }
    all
}

/// The secret access keys and session tokens moto has issued: every
/// `secret_access_key`, `session_token` and `external_id` in its model
/// data. A moto that
/// stopped meanwhile has nothing to add.
pub fn moto_issued(addr: &str) -> Vec<String> {
    let Some(body) = try_http_get(addr, "/moto-api/data.json") else {
        return Vec::new();
    };
    let Ok(data) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    collect(&data, &mut found);
    found
}

fn collect(v: &serde_json::Value, found: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v.as_str()) {
                    ("secret_access_key" | "session_token" | "external_id", Some(s))
                        if s.len() >= 8 =>
                    {
                        found.push(s.to_owned())
                    }
                    _ => collect(v, found),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, found)),
        _ => {}
    }
}

/// No secret of any stack appears in `text` (`what` names it in the
/// failure).
pub fn assert_none_in(what: &str, text: &str) {
    for secret in all() {
        assert!(
            !text.contains(&secret),
            "a secret ({secret}) was written to {what}: {text}"
        );
    }
}
