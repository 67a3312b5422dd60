//! Property tests for everything that reads untrusted input: the PullImage
//! reader and rewriter, image references, ECR hosts and patterns.
//!
//! Documented behaviour for malformed PullImage messages: `read` returns an
//! error and the proxy forwards the request unchanged, for containerd to
//! answer with its own error.

use ecr_pull_proxy::cri;
use ecr_pull_proxy::ecr::EcrHost;
use ecr_pull_proxy::image_ref::ImageRef;
use ecr_pull_proxy::matcher::Pattern;
use ecr_pull_proxy::pull::{self, Credentials};
use proptest::prelude::*;
use prost::Message;

fn creds() -> Credentials {
    Credentials {
        username: "AWS".into(),
        password: "pw-0123456789".into(),
    }
}

/// Arbitrary extra top-level fields (numbers 4..1000, any wire type but
/// groups), as a newer kubelet might send.
fn unknown_fields() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            4u32..1000,
            0u8..4,
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..8,
    )
    .prop_map(|fields| {
        let mut out = Vec::new();
        for (num, kind, payload) in fields {
            let put_varint = |out: &mut Vec<u8>, mut v: u64| {
                while v >= 0x80 {
                    out.push((v as u8) | 0x80);
                    v >>= 7;
                }
                out.push(v as u8);
            };
            match kind {
                0 => {
                    put_varint(&mut out, u64::from(num) << 3);
                    put_varint(&mut out, payload.len() as u64 * 977);
                }
                1 => {
                    put_varint(&mut out, (u64::from(num) << 3) | 1);
                    out.extend_from_slice(&[7; 8]);
                }
                2 => {
                    put_varint(&mut out, (u64::from(num) << 3) | 2);
                    put_varint(&mut out, payload.len() as u64);
                    out.extend_from_slice(&payload);
                }
                _ => {
                    put_varint(&mut out, (u64::from(num) << 3) | 5);
                    out.extend_from_slice(&[9; 4]);
                }
            }
        }
        out
    })
}

fn strip_auth(msg: &[u8]) -> cri::PullImageRequest {
    let mut r = cri::PullImageRequest::decode(msg).unwrap();
    r.auth = None;
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = pull::read(&bytes);
        let _ = pull::with_credentials(&bytes, &creds(), "https://r.example");
        let _ = pull::unframe(&bytes);
    }

    #[test]
    fn read_and_rewrite_agree_on_what_is_well_formed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        // The rewrite never accepts what the reader refused, nor the reverse
        // for framing errors: the proxy relies on `read` to decide.
        if pull::read(&bytes).is_ok() {
            prop_assert!(pull::with_credentials(&bytes, &creds(), "https://r.example").is_ok());
        }
    }

    #[test]
    fn rewrite_keeps_every_byte_outside_auth(
        image in "[a-z0-9.:/-]{0,80}",
        old_password in proptest::option::of("[ -~]{1,30}"),
        hostname in "[a-z]{0,20}",
        extra in unknown_fields(),
    ) {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
            auth: old_password.clone().map(|p| cri::AuthConfig { username: "u".into(), password: p, ..Default::default() }),
            sandbox_config: Some(cri::PodSandboxConfig { hostname, ..Default::default() }),
        };
        let mut msg = req.encode_to_vec();
        msg.extend_from_slice(&extra);
        let info = pull::read(&msg).unwrap();
        prop_assert_eq!(&info.image, &image);
        prop_assert_eq!(info.has_credentials, old_password.is_some());

        let out = pull::with_credentials(&msg, &creds(), "https://r.example").unwrap();
        // Decoded: everything but auth is equal, auth is ours.
        let decoded = cri::PullImageRequest::decode(&out[..]).unwrap();
        let auth = decoded.auth.clone().unwrap();
        prop_assert_eq!(auth.username.as_str(), "AWS");
        prop_assert_eq!(auth.password.as_str(), "pw-0123456789");
        prop_assert_eq!(auth.server_address.as_str(), "https://r.example");
        prop_assert_eq!(strip_auth(&out), strip_auth(&msg));
        // Raw: the message without its auth field is a byte-for-byte
        // subsequence-free copy: removing our auth from `out` gives `msg`
        // without its auth (unknown fields included).
        let without_old = remove_field_2(&msg);
        let without_new = remove_field_2(&out);
        prop_assert_eq!(without_new, without_old);
    }

    #[test]
    fn image_references_never_panic(s in "\\PC{0,300}") {
        if let Some(r) = ImageRef::parse(&s) {
            // What parses has a host and a path, and prints back to a
            // reference that parses the same.
            prop_assert!(!r.domain.is_empty() && !r.path.is_empty());
            prop_assert_eq!(ImageRef::parse(&r.to_string()), Some(r.clone()));
        }
        let _ = EcrHost::parse(&s);
        if let Ok(p) = Pattern::new(&s) {
            let _ = p.matches("123456789012.dkr.ecr.us-east-1.amazonaws.com/app");
        }
    }

    #[test]
    fn control_characters_and_unicode_never_match_ecr(prefix in "[\\x00-\\x1f\\u{80}-\\u{10ffff}]{1,4}") {
        let image = format!("{prefix}123456789012.dkr.ecr.us-east-1.amazonaws.com/app");
        prop_assert!(ImageRef::parse(&image).is_none());
        let host = format!("{prefix}123456789012.dkr.ecr.us-east-1.amazonaws.com");
        prop_assert!(EcrHost::parse(&host).is_none());
    }
}

/// Drops every top-level field 2 occurrence, by decoding the framing by hand.
fn remove_field_2(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    let varint = |i: &mut usize| -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = msg[*i];
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    };
    while i < msg.len() {
        let start = i;
        let tag = varint(&mut i);
        match tag & 7 {
            0 => {
                varint(&mut i);
            }
            1 => i += 8,
            2 => {
                let len = varint(&mut i) as usize;
                i += len;
            }
            5 => i += 4,
            _ => unreachable!(),
        }
        if tag >> 3 != 2 {
            out.extend_from_slice(&msg[start..i]);
        }
    }
    out
}

#[test]
fn very_long_names_are_refused_quickly() {
    let long = format!(
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/{}",
        "a/".repeat(32 * 1024)
    );
    let started = std::time::Instant::now();
    assert!(ImageRef::parse(&long).is_none());
    let p = Pattern::new("*.dkr.ecr.*.amazonaws.com").unwrap();
    let host = "a".repeat(64 * 1024);
    assert!(!p.matches(&format!("{host}/app")));
    let glob = Pattern::new(&format!("{}.example", "*a".repeat(200))).unwrap();
    assert!(!glob.matches(&format!("{}b.example/app", "a".repeat(5000))));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
