//! A scripted ECR API for faults moto cannot produce (and for ECR Public,
//! which moto does not emulate). It answers `GetAuthorizationToken` for both
//! ECR (`AmazonEC2ContainerRegistry_V20150921`) and ECR Public
//! (`SpencerFrontendService`) in the JSON 1.1 protocol, as the current
//! [`Behaviour`] says, and counts the calls.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// A token valid for 12 hours.
    Token,
    /// HTTP 500 `ServerException`.
    ServerError,
    /// HTTP 400 `ThrottlingException`.
    Throttle400,
    /// HTTP 429 with no error type.
    Throttle429,
    /// A token, after this many seconds.
    Slow(u64),
}

/// The running fake.
pub struct FakeEcr {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    calls: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl FakeEcr {
    /// Serves tokens that decode to `AWS:<password>`.
    pub fn start(password: &str) -> Self {
        use base64::Engine;
        super::secrets::issued(password);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(Behaviour::Token));
        let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
        let (c, b) = (calls.clone(), behaviour.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, b, token) = (c.clone(), b.clone(), token.clone());
                std::thread::spawn(move || serve(stream, &c, &b, &token));
            }
        });
        FakeEcr {
            endpoint,
            calls,
            behaviour,
        }
    }

    /// Changes how the following calls are answered.
    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// From now on, answer every call with HTTP 500.
    pub fn fail(&self) {
        self.set(Behaviour::ServerError);
    }

    /// `GetAuthorizationToken` calls received so far (retries included).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn serve(mut s: TcpStream, calls: &AtomicUsize, behaviour: &Mutex<Behaviour>, token: &str) {
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    // The SDK keeps connections alive: answer requests until it hangs up.
    loop {
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
        let public = head.contains("spencerfrontendservice");
        let (status, body) = if !head.contains("getauthorizationtoken") {
            (
                "400 Bad Request",
                r#"{"__type":"UnknownOperationException"}"#.to_owned(),
            )
        } else {
            calls.fetch_add(1, Ordering::SeqCst);
            let b = *behaviour.lock().unwrap();
            match b {
                Behaviour::ServerError => (
                    "500 Internal Server Error",
                    r#"{"__type":"ServerException","message":"scripted failure"}"#.to_owned(),
                ),
                Behaviour::Throttle400 => (
                    "400 Bad Request",
                    r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.to_owned(),
                ),
                Behaviour::Throttle429 => ("429 Too Many Requests", "{}".to_owned()),
                Behaviour::Token | Behaviour::Slow(_) => {
                    if let Behaviour::Slow(secs) = b {
                        std::thread::sleep(Duration::from_secs(secs));
                    }
                    let expires = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        + 12 * 3600;
                    let data =
                        format!(r#"{{"authorizationToken":"{token}","expiresAt":{expires}}}"#);
                    let body = if public {
                        format!(r#"{{"authorizationData":{data}}}"#)
                    } else {
                        format!(r#"{{"authorizationData":[{data}]}}"#)
                    };
                    ("200 OK", body)
                }
            }
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
