//! A scripted ECR Public API. moto does not emulate ECR Public, so this
//! answers `GetAuthorizationToken` (JSON 1.1 protocol) itself: with a token
//! for a given password, or with a server error when told to fail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The running fake.
pub struct FakeEcrPublic {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    calls: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl FakeEcrPublic {
    /// Serves tokens that decode to `AWS:<password>`.
    pub fn start(password: &str) -> Self {
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
        let (c, f) = (calls.clone(), fail.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, f, token) = (c.clone(), f.clone(), token.clone());
                std::thread::spawn(move || serve(stream, &c, &f, &token));
            }
        });
        FakeEcrPublic {
            endpoint,
            calls,
            fail,
        }
    }

    /// From now on, answer every call with HTTP 500.
    pub fn fail(&self) {
        self.fail.store(true, Ordering::SeqCst);
    }

    /// `GetAuthorizationToken` calls answered so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn serve(mut s: TcpStream, calls: &AtomicUsize, fail: &AtomicBool, token: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let (status, body) = if !head.contains("getauthorizationtoken") {
        (
            "400 Bad Request",
            r#"{"__type":"UnknownOperationException"}"#.to_owned(),
        )
    } else {
        calls.fetch_add(1, Ordering::SeqCst);
        if fail.load(Ordering::SeqCst) {
            (
                "500 Internal Server Error",
                r#"{"__type":"ServerException","message":"scripted failure"}"#.to_owned(),
            )
        } else {
            let expires = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 12 * 3600;
            (
                "200 OK",
                format!(
                    r#"{{"authorizationData":{{"authorizationToken":"{token}","expiresAt":{expires}}}}}"#
                ),
            )
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}
