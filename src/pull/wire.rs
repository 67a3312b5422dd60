//! Reading and rewriting a `PullImageRequest` at the protobuf wire level.
//!
//! The message is never decoded into generated types and re-encoded: prost
//! drops fields it does not know, and kubelet sends `sandbox_config` and
//! fields newer than any proto we vendor. Instead the top-level fields are
//! walked as bytes; the rewrite drops every occurrence of field 2 (`auth`) and
//! puts one new `AuthConfig` where the first one stood (or at the end), copying
//! every other byte unchanged and in order.
//!
//! A body that is not exactly one uncompressed gRPC frame holding a
//! well-formed message is reported as [`WireError`]; the proxy then forwards
//! it untouched so that containerd answers it with its own error.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// `PullImageRequest.image` (an `ImageSpec`).
const FIELD_IMAGE: u32 = 1;
/// `PullImageRequest.auth` (an `AuthConfig`).
const FIELD_AUTH: u32 = 2;
/// `ImageSpec.image`.
const SPEC_IMAGE: u32 = 1;
/// `AuthConfig` fields that carry a credential: username, password, auth,
/// identity_token, registry_token (not server_address = 4).
const AUTH_CREDENTIAL_FIELDS: [u32; 5] = [1, 2, 3, 5, 6];
/// `AuthConfig.username`, `AuthConfig.password` and
/// `AuthConfig.server_address`.
const AUTH_USERNAME: u32 = 1;
const AUTH_PASSWORD: u32 = 2;
const AUTH_SERVER_ADDRESS: u32 = 4;

/// Length of the gRPC message prefix: compressed flag + 4-byte length.
pub const GRPC_HEADER_LEN: usize = 5;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The body is not exactly one length-prefixed gRPC frame.
    #[error("request body is not a single gRPC frame")]
    Framing,
    /// The frame is compressed; we do not negotiate compression with callers.
    #[error("request message is compressed")]
    Compressed,
    /// The protobuf bytes are truncated or use an invalid wire type.
    #[error("request message is not valid protobuf")]
    Malformed,
    /// `ImageSpec.image` is not valid UTF-8.
    #[error("image name is not valid UTF-8")]
    NotUtf8,
}

/// What the proxy needs to know about a `PullImageRequest`.
#[derive(Clone, PartialEq, Eq)]
pub struct PullRequestInfo {
    /// `image.image`, empty when absent.
    pub image: String,
    /// Whether `auth` carries any credential (username, password, auth,
    /// identity token or registry token).
    pub has_credentials: bool,
}

// The image name is not secret, but the struct stays explicit about it.
impl fmt::Debug for PullRequestInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullRequestInfo")
            .field("image", &self.image)
            .field("has_credentials", &self.has_credentials)
            .finish()
    }
}

pub use crate::ecr::Credentials;

/// Splits a gRPC request body into its single message.
pub fn unframe(body: &[u8]) -> Result<&[u8], WireError> {
    if body.len() < GRPC_HEADER_LEN {
        return Err(WireError::Framing);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - GRPC_HEADER_LEN != len {
        return Err(WireError::Framing);
    }
    match body[0] {
        0 => Ok(&body[GRPC_HEADER_LEN..]),
        1 => Err(WireError::Compressed),
        _ => Err(WireError::Framing),
    }
}

/// Frames `message` as one uncompressed gRPC message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(GRPC_HEADER_LEN + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Reads the image name and whether credentials are present.
pub fn read(message: &[u8]) -> Result<PullRequestInfo, WireError> {
    let mut image: Option<&[u8]> = None;
    // Protobuf merges repeated occurrences of a message field, and the last
    // value of a scalar wins; track the last value of each credential field.
    let mut creds: [Option<bool>; 7] = [None; 7];
    for field in Fields::new(message) {
        let field = field?;
        match (field.number, field.value) {
            (FIELD_IMAGE, Value::Len(spec)) => {
                for inner in Fields::new(spec) {
                    let inner = inner?;
                    if let (SPEC_IMAGE, Value::Len(name)) = (inner.number, inner.value) {
                        image = Some(name);
                    }
                }
            }
            (FIELD_AUTH, Value::Len(auth)) => {
                for inner in Fields::new(auth) {
                    let inner = inner?;
                    if let Value::Len(v) = inner.value {
                        if AUTH_CREDENTIAL_FIELDS.contains(&inner.number) {
                            creds[inner.number as usize] = Some(!v.is_empty());
                        }
                    }
                }
            }
            (FIELD_IMAGE | FIELD_AUTH, _) => return Err(WireError::Malformed),
            _ => {}
        }
    }
    let image = match image {
        Some(b) => std::str::from_utf8(b)
            .map_err(|_| WireError::NotUtf8)?
            .to_owned(),
        None => String::new(),
    };
    Ok(PullRequestInfo {
        image,
        has_credentials: creds.contains(&Some(true)),
    })
}

/// Returns `message` with `auth` replaced by `credentials` (username and
/// password) for `server_address`, the one host containerd may give them
/// to (a URL with its scheme; containerd gives credentials with an empty
/// one to every host it tries). Every other field is copied byte for byte,
/// in order.
pub fn with_credentials(
    message: &[u8],
    credentials: &Credentials,
    server_address: &str,
) -> Result<Vec<u8>, WireError> {
    let auth = encode_auth(credentials, server_address);
    let mut out = Vec::with_capacity(message.len() + auth.len() + 8);
    let mut placed = false;
    for field in Fields::new(message) {
        let field = field?;
        if field.number == FIELD_AUTH {
            if !placed {
                out.extend_from_slice(&auth);
                placed = true;
            }
            continue;
        }
        out.extend_from_slice(field.raw);
    }
    if !placed {
        out.extend_from_slice(&auth);
    }
    Ok(out)
}

/// Encodes field 2 (`auth`) holding username, password and server address.
fn encode_auth(credentials: &Credentials, server_address: &str) -> Vec<u8> {
    let mut inner = Vec::with_capacity(
        credentials.username.len() + credentials.password.len() + server_address.len() + 12,
    );
    put_len_field(&mut inner, AUTH_USERNAME, credentials.username.as_bytes());
    put_len_field(&mut inner, AUTH_PASSWORD, credentials.password.as_bytes());
    if !server_address.is_empty() {
        put_len_field(&mut inner, AUTH_SERVER_ADDRESS, server_address.as_bytes());
    }
    let mut out = Vec::with_capacity(inner.len() + 6);
    put_len_field(&mut out, FIELD_AUTH, &inner);
    out
}

fn put_len_field(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// === wire-level field walker ===

enum Value<'a> {
    Varint,
    Fixed,
    Len(&'a [u8]),
}

struct Field<'a> {
    number: u32,
    value: Value<'a>,
    /// The whole field: tag, length and payload.
    raw: &'a [u8],
}

/// Iterates over the top-level fields of a protobuf message. Yields one
/// error and then stops on malformed input.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields {
            buf,
            pos: 0,
            failed: false,
        }
    }

    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.pos;
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| WireError::Malformed)?;
        if number == 0 || number > 536_870_911 {
            return Err(WireError::Malformed);
        }
        let value = match tag & 7 {
            0 => {
                self.varint()?;
                Value::Varint
            }
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| WireError::Malformed)?;
                let from = self.pos;
                self.skip(len)?;
                Value::Len(&self.buf[from..self.pos])
            }
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            // Groups (3, 4) are not used by CRI; 6 and 7 do not exist.
            _ => return Err(WireError::Malformed),
        };
        Ok(Field {
            number,
            value,
            raw: &self.buf[start..self.pos],
        })
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or(WireError::Malformed)?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(WireError::Malformed);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(WireError::Malformed)
    }

    fn skip(&mut self, n: usize) -> Result<(), WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Malformed)?;
        if end > self.buf.len() {
            return Err(WireError::Malformed);
        }
        self.pos = end;
        Ok(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::{
        AuthConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    };
    use prost::Message;

    fn creds() -> Credentials {
        Credentials {
            username: "AWS".into(),
            password: "s3cr3t-pass".into(),
        }
    }

    fn request(image: &str, auth: Option<AuthConfig>) -> PullImageRequest {
        PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "pod".into(),
                    uid: "u1".into(),
                    namespace: "ns".into(),
                    attempt: 1,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn read_finds_image_and_absent_credentials() {
        let msg =
            request("123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1", None).encode_to_vec();
        let info = read(&msg).unwrap();
        assert_eq!(
            info.image,
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1"
        );
        assert!(!info.has_credentials);
    }

    #[test]
    fn empty_auth_or_server_address_only_is_no_credentials() {
        let auth = AuthConfig {
            server_address: "x.example".into(),
            ..Default::default()
        };
        let msg = request("app", Some(auth)).encode_to_vec();
        assert!(!read(&msg).unwrap().has_credentials);
        // An explicitly present but empty AuthConfig: field 2 with length 0.
        let mut msg = request("app", None).encode_to_vec();
        msg.extend_from_slice(&[0x12, 0x00]);
        assert!(!read(&msg).unwrap().has_credentials);
    }

    #[test]
    fn each_credential_field_counts_as_credentials() {
        let variants = [
            AuthConfig {
                username: "u".into(),
                ..Default::default()
            },
            AuthConfig {
                password: "p".into(),
                ..Default::default()
            },
            AuthConfig {
                auth: "dTpw".into(),
                ..Default::default()
            },
            AuthConfig {
                identity_token: "t".into(),
                ..Default::default()
            },
            AuthConfig {
                registry_token: "t".into(),
                ..Default::default()
            },
        ];
        for auth in variants {
            let msg = request("app", Some(auth)).encode_to_vec();
            assert!(read(&msg).unwrap().has_credentials);
        }
    }

    #[test]
    fn rewrite_inserts_auth_and_keeps_every_other_byte() {
        let req = request("app", None);
        let mut msg = req.encode_to_vec();
        // A field from a newer CRI (number 99, varint) that prost would drop.
        msg.extend_from_slice(&[0x98, 0x06, 0x2a]);
        let out = with_credentials(&msg, &creds(), "https://r.example:8443").unwrap();
        // Everything before is unchanged; the new field 2 is appended.
        assert_eq!(&out[..msg.len()], &msg[..]);
        let decoded = PullImageRequest::decode(&out[..]).unwrap();
        let auth = decoded.auth.unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("AWS", "s3cr3t-pass")
        );
        assert_eq!(auth.server_address, "https://r.example:8443");
        assert_eq!(decoded.sandbox_config, req.sandbox_config);
        assert!(read(&out).unwrap().has_credentials);
    }

    #[test]
    fn rewrite_replaces_every_auth_occurrence_in_place() {
        let old = AuthConfig {
            username: "u".into(),
            password: "wrong".into(),
            ..Default::default()
        };
        let mut msg = request("app", Some(old.clone())).encode_to_vec();
        // A second occurrence, which protobuf would merge.
        let mut extra = Vec::new();
        put_len_field(&mut extra, 2, &old.encode_to_vec());
        msg.extend_from_slice(&extra);
        let out = with_credentials(&msg, &creds(), "").unwrap();
        let decoded = PullImageRequest::decode(&out[..]).unwrap();
        let auth = decoded.auth.unwrap();
        assert_eq!(auth.password, "s3cr3t-pass");
        // No server address: none is encoded.
        assert_eq!(auth.server_address, "");
        assert!(!out.windows(5).any(|w| w == b"wrong"));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let good = request("app", None).encode_to_vec();
        assert_eq!(read(&good[..good.len() - 1]), Err(WireError::Malformed));
        assert_eq!(read(&[0x0b]), Err(WireError::Malformed)); // group start
        assert_eq!(read(&[0x00, 0x01]), Err(WireError::Malformed)); // field 0
        assert_eq!(read(&[0x10]), Err(WireError::Malformed)); // truncated varint
    }

    #[test]
    fn field_one_with_the_wrong_wire_type_is_malformed() {
        // 0x08 = field 1, varint: ImageSpec must be length-delimited.
        assert_eq!(read(&[0x08, 0x01]), Err(WireError::Malformed));
        // Image name that is not UTF-8.
        assert_eq!(
            read(&[0x0a, 0x03, 0x0a, 0x01, 0xff]),
            Err(WireError::NotUtf8)
        );
    }

    #[test]
    fn framing_is_checked() {
        let framed = frame(b"abc");
        assert_eq!(unframe(&framed), Ok(&b"abc"[..]));
        assert_eq!(unframe(&framed[..4]), Err(WireError::Framing));
        assert_eq!(unframe(&framed[..7]), Err(WireError::Framing));
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(unframe(&compressed), Err(WireError::Compressed));
        let mut two = framed.to_vec();
        two.extend_from_slice(&framed);
        assert_eq!(unframe(&two), Err(WireError::Framing));
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let s = format!("{:?}", creds());
        assert!(!s.contains("s3cr3t"), "{s}");
        assert!(s.contains("<redacted>"));
    }
}
