//! Image reference → registry host and repository path, read the way
//! containerd and kubelet read them (distribution's `ParseNormalizedNamed`):
//! `docker.io` when no host is given, `index.docker.io` as `docker.io`, and
//! `library/` before a bare Docker Hub name, so `busybox` is
//! `docker.io/library/busybox` — the name kubelet's keyring matches.
//!
//! The whole grammar is followed (domain, path components, tag, digest as
//! go-digest checks it, the 255-character limit on the repository path, no
//! bare image IDs) as `github.com/distribution/reference` v0.6 has it, the
//! parser of kubelet and containerd 2.x; tests/matching.rs compares it with
//! that parser and with docker/distribution 2.8.2 (containerd 1.6) on random
//! references. Two rules are newer than 2.8.2: an upper-case first
//! component is a host, and the length limit counts the path alone (2.8.2
//! counted the normalised name, so containerd 1.6 refuses some names this
//! accepts; a token added to such a pull harms nothing). A reference that does not parse is never matched, and goes to
//! containerd untouched so that containerd rejects it with its own error.

use std::fmt;

/// Host used for references without one, as containerd's normaliser does.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's legacy host, normalised to [`DEFAULT_DOMAIN`].
pub const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Prefix of Docker Hub's official images (`busybox` → `library/busybox`).
pub const OFFICIAL_REPO_PREFIX: &str = "library/";

/// The longest repository path accepted (distribution/reference's
/// `NameTotalLengthMax`, which v0.6 applies to the path without its host).
pub const MAX_NAME_LEN: usize = 255;

/// A parsed image reference.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, with `:port` when one was given.
    pub domain: String,
    /// Repository path below the host, without tag or digest.
    pub path: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`algorithm:hex`), if any.
    pub digest: Option<String>,
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl ImageRef {
    /// Parses `reference`; `None` when it is not a valid image reference.
    pub fn parse(reference: &str) -> Option<Self> {
        let (name_tag, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        if let Some(d) = digest {
            if !is_digest(d) {
                return None;
            }
        }
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(&name_tag[at + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            if !is_tag(t) {
                return None;
            }
        }
        // A bare 64-hex string is an image ID, not a name.
        if name_tag.len() == 64
            && name_tag
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        if name.is_empty() {
            return None;
        }
        let (domain, path) = split_domain(name);
        // A first component with a '.' that is no host name but is a path
        // component (`a_b.c/app`) still parses: distribution's grammar reads
        // the whole name as a path, and its name keeps that component first,
        // which kubelet and containerd then take for the host.
        if !(is_domain(domain) || domain != DEFAULT_DOMAIN && is_path_component(domain))
            || !is_path(path)
        {
            return None;
        }
        // distribution's splitDockerDomain.
        let domain = if domain == LEGACY_DEFAULT_DOMAIN {
            DEFAULT_DOMAIN
        } else {
            domain
        };
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_REPO_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        // The limit applies to the normalised name.
        if path.len() > MAX_NAME_LEN {
            return None;
        }
        Some(ImageRef {
            domain: domain.to_owned(),
            path,
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }

    /// The registry host without its port.
    pub fn host(&self) -> &str {
        host_without_port(&self.domain)
    }

    /// The port, when the reference names one.
    pub fn port(&self) -> Option<&str> {
        port_of(&self.domain)
    }
}

/// `host[:port]` → `host` (IPv6 literals keep their brackets).
pub fn host_without_port(domain: &str) -> &str {
    match port_split(domain) {
        Some((h, _)) => h,
        None => domain,
    }
}

/// `host[:port]` → `port`.
pub fn port_of(domain: &str) -> Option<&str> {
    port_split(domain).map(|(_, p)| p)
}

fn port_split(domain: &str) -> Option<(&str, &str)> {
    let i = domain.rfind(':')?;
    // `[::1]` has colons inside the brackets and no port.
    if domain[i..].contains(']') {
        return None;
    }
    Some((&domain[..i], &domain[i + 1..]))
}

/// Splits a name into domain and path the way `ParseNormalizedNamed` does: the
/// first component is a domain when it has a '.' or ':', or is `localhost`.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

fn is_domain(domain: &str) -> bool {
    let (host, port) = match port_split(domain) {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    }
    !host.is_empty() && host.split('.').all(is_domain_label)
}

fn is_domain_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// Path components: `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`.
fn is_path(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(is_path_component)
}

fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Tags: `[\w][\w.-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|x| word(*x) || *x == b'.' || *x == b'-')
}

/// Digests as containerd accepts them (go-digest's `Parse`): an algorithm
/// containerd knows and exactly its length of lower-case hex. Anything else
/// (a 32-digit sha256, upper-case hex, an unknown algorithm) containerd
/// refuses, so it is never matched here either.
fn is_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == len && hex.bytes().all(|x| matches!(x, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_to_host_path_tag_digest() {
        let d = DIGEST;
        type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let cases: &[Case] = &[
            // Docker Hub names are normalised as kubelet's keyring sees them.
            ("busybox", "docker.io", "library/busybox", None, None),
            (
                "busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                None,
            ),
            (
                "index.docker.io/team/app",
                "docker.io",
                "team/app",
                None,
                None,
            ),
            (
                "index.docker.io/busybox",
                "docker.io",
                "library/busybox",
                None,
                None,
            ),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                None,
                None,
            ),
            // Only Docker Hub gets `library/`.
            ("quay.io/app", "quay.io", "app", None, None),
            (
                "library/busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                None,
            ),
            (
                "docker.io/library/busybox",
                "docker.io",
                "library/busybox",
                None,
                None,
            ),
            ("localhost/app", "localhost", "app", None, None),
            (
                "localhost:5000/app:v1",
                "localhost:5000",
                "app",
                Some("v1"),
                None,
            ),
            (
                "registry.example:5000/team/app",
                "registry.example:5000",
                "team/app",
                None,
                None,
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:latest",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                "app",
                Some("latest"),
                None,
            ),
            ("[::1]:5000/app", "[::1]:5000", "app", None, None),
            (
                "evil.example/123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                "evil.example",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                None,
                None,
            ),
            (
                "a.b/c__d/e---f/g.h_i",
                "a.b",
                "c__d/e---f/g.h_i",
                None,
                None,
            ),
        ];
        for (input, domain, path, tag, digest) in cases {
            let r = ImageRef::parse(input).unwrap_or_else(|| panic!("{input} should parse"));
            assert_eq!(r.domain, *domain, "{input}");
            assert_eq!(r.path, *path, "{input}");
            assert_eq!(r.tag.as_deref(), *tag, "{input}");
            assert_eq!(r.digest.as_deref(), *digest, "{input}");
        }
        let sha512 = format!("quay.io/app@sha512:{}", "ab".repeat(64));
        assert!(ImageRef::parse(&sha512).is_some());
        let with_digest = format!("quay.io/app:v1@{d}");
        let r = ImageRef::parse(&with_digest).unwrap();
        assert_eq!(
            (r.domain.as_str(), r.tag.as_deref(), r.digest.as_deref()),
            ("quay.io", Some("v1"), Some(d))
        );
    }

    #[test]
    fn invalid_references_do_not_parse() {
        let long = format!("example.com/{}", "a".repeat(300));
        let cases = [
            "",
            "UPPER.example/App",
            "example.com/App",
            "example.com/app:",
            "example.com/app:-bad",
            "example.com/app@sha256:short",
            // Digests containerd refuses (go-digest): 32-digit sha256,
            // upper-case hex, an algorithm it does not know.
            "example.com/app@sha256:0123456789abcdef0123456789abcdef",
            "example.com/app@sha256:0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF",
            "example.com/app@md5:0123456789abcdef0123456789abcdef",
            "example.com/app@sha256+b64:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "example.com//app",
            "example.com/app/",
            "-example.com/app",
            "example.com:port/app",
            "exa mple.com/app",
            "example.com/ap\u{0}p",
            "example.com/app\n",
            "exämple.com/app",
            long.as_str(),
        ];
        for input in cases {
            assert!(
                ImageRef::parse(input).is_none(),
                "{input:?} should not parse"
            );
        }
    }

    #[test]
    fn host_and_port_are_split() {
        let r = ImageRef::parse("registry.example:5000/app").unwrap();
        assert_eq!((r.host(), r.port()), ("registry.example", Some("5000")));
        let r = ImageRef::parse("[::1]/app").unwrap();
        assert_eq!((r.host(), r.port()), ("[::1]", None));
    }
}
