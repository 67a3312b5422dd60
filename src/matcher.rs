//! kubelet `matchImages` semantics: which image references a pattern covers.
//!
//! Follows `URLsMatch` in kubelet's `pkg/credentialprovider/keyring.go`: the
//! pattern and the image are both read as schemeless URLs; hosts must have the
//! same number of DNS labels and each label must match its glob (Go's
//! `filepath.Match`: `*`, `?`, `[...]`); ports must be equal (no port in the
//! pattern means no port in the image); the pattern's path, if any, must be a
//! prefix of the image's path.

use std::fmt;

use crate::image_ref::{host_without_port, port_of};

/// A compiled `matchImages` pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    labels: Vec<String>,
    port: Option<String>,
    path: String,
}

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is empty or has no host.
    #[error("pattern {0:?} has no host")]
    NoHost(String),
    /// The pattern has a scheme, which kubelet does not accept either.
    #[error("pattern {0:?} must not have a scheme (drop the `://` part)")]
    Scheme(String),
    /// A label has a malformed glob (e.g. an unclosed `[`).
    #[error("pattern {pattern:?} has a malformed glob in label {label:?}")]
    BadGlob {
        /// The whole pattern.
        pattern: String,
        /// The label that does not compile.
        label: String,
    },
    /// The port is not a number.
    #[error("pattern {0:?} has a port that is not a number")]
    BadPort(String),
    /// The pattern has a character that cannot appear in a host name.
    #[error("pattern {0:?} has characters that cannot appear in a registry host")]
    BadChars(String),
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Pattern {
    /// Compiles a pattern such as `*.dkr.ecr.*.amazonaws.com` or
    /// `mirror.internal:5000/team`.
    pub fn new(source: &str) -> Result<Self, PatternError> {
        if source.contains("://") {
            return Err(PatternError::Scheme(source.to_owned()));
        }
        if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::BadChars(source.to_owned()));
        }
        let (domain, path) = match source.find('/') {
            Some(i) => (&source[..i], &source[i..]),
            None => (source, ""),
        };
        let host = host_without_port(domain);
        if host.is_empty() {
            return Err(PatternError::NoHost(source.to_owned()));
        }
        let port = port_of(domain).map(str::to_owned);
        if let Some(p) = &port {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PatternError::BadPort(source.to_owned()));
            }
        }
        let labels: Vec<String> = host.split('.').map(str::to_ascii_lowercase).collect();
        for label in &labels {
            if label.is_empty() || glob_match(label, "").is_err() {
                return Err(PatternError::BadGlob {
                    pattern: source.to_owned(),
                    label: label.clone(),
                });
            }
        }
        Ok(Pattern {
            source: source.to_owned(),
            labels,
            port,
            path: path.to_owned(),
        })
    }

    /// Whether the image `domain` (host with optional port) and `path` (the
    /// normalised repository path, without tag or digest, as kubelet's
    /// keyring compares it) match this pattern.
    pub fn matches(&self, domain: &str, path: &str) -> bool {
        if port_of(domain) != self.port.as_deref() {
            return false;
        }
        let host = host_without_port(domain);
        let count = host.split('.').count();
        if count != self.labels.len() {
            return false;
        }
        let labels_match = self
            .labels
            .iter()
            .zip(host.split('.'))
            .all(|(glob, label)| glob_match(glob, &label.to_ascii_lowercase()).unwrap_or(false));
        labels_match && format!("/{path}").starts_with(&self.path)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Go's `filepath.Match` for one label: `*` (any run), `?` (one character),
/// `[...]`/`[^...]` classes with ranges, `\` escapes. `Err` for a malformed
/// pattern, like Go's `ErrBadPattern`.
fn glob_match(pattern: &str, name: &str) -> Result<bool, ()> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Validate the whole pattern first so that a bad glob is always an error,
    // not only when matching reaches it.
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '[' => i = class_end(&p, i).ok_or(())?,
            '\\' => {
                if i + 1 >= p.len() {
                    return Err(());
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    Ok(match_from(&p, 0, &n, 0))
}

fn match_from(p: &[char], mut pi: usize, n: &[char], mut ni: usize) -> bool {
    // Iterative with a single backtrack point for the last '*'.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' if ni < n.len() => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' if ni < n.len() => {
                    let end = class_end(p, pi).expect("validated");
                    if class_matches(&p[pi + 1..end - 1], n[ni]) {
                        pi = end;
                        ni += 1;
                        continue;
                    }
                }
                '\\' if ni < n.len() && p[pi + 1] == n[ni] => {
                    pi += 2;
                    ni += 1;
                    continue;
                }
                c if c != '?' && c != '[' && c != '\\' && ni < n.len() && c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        } else if ni == n.len() {
            return true;
        }
        match star {
            Some((sp, sn)) if sn < n.len() => {
                star = Some((sp, sn + 1));
                pi = sp + 1;
                ni = sn + 1;
            }
            _ => return false,
        }
    }
}

/// Index just past the `]` closing the class that opens at `start`.
fn class_end(p: &[char], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if p.get(i) == Some(&'^') {
        i += 1;
    }
    let first = i;
    while i < p.len() {
        match p[i] {
            ']' if i > first => return Some(i + 1),
            '\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

fn class_matches(body: &[char], c: char) -> bool {
    let (negated, body) = match body.first() {
        Some('^') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut i = 0;
    let mut hit = false;
    while i < body.len() {
        let mut lo = body[i];
        if lo == '\\' && i + 1 < body.len() {
            i += 1;
            lo = body[i];
        }
        let mut hi = lo;
        if i + 2 < body.len() && body[i + 1] == '-' {
            hi = body[i + 2];
            if hi == '\\' && i + 3 < body.len() {
                hi = body[i + 3];
                i += 1;
            }
            i += 2;
        }
        if lo <= c && c <= hi {
            hit = true;
        }
        i += 1;
    }
    hit != negated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, image: &str) -> bool {
        let r = crate::image_ref::ImageRef::parse(image).expect("valid image");
        let path = match &r.tag {
            Some(t) => format!("{}:{t}", r.path),
            None => r.path.clone(),
        };
        Pattern::new(pattern).unwrap().matches(&r.domain, &path)
    }

    #[test]
    fn kubelet_match_images_table() {
        let ecr = "*.dkr.ecr.*.amazonaws.com";
        let cases: &[(&str, &str, bool)] = &[
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                true,
            ),
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1",
                true,
            ),
            // Look-alikes: more labels, the host in the path, a different suffix.
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example/app",
                false,
            ),
            (
                ecr,
                "evil.example/123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                false,
            ),
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com.cn/app",
                false,
            ),
            (ecr, "dkr.ecr.us-east-1.amazonaws.com/app", false),
            // Port must match exactly.
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:443/app",
                false,
            ),
            ("registry.example:5000", "registry.example:5000/app", true),
            ("registry.example:5000", "registry.example/app", false),
            ("registry.example:5000", "registry.example:5001/app", false),
            // Path is a prefix.
            ("registry.example/team", "registry.example/team/app", true),
            ("registry.example/team", "registry.example/other/app", false),
            (
                "registry.example/team/app",
                "registry.example/team/app:v1",
                true,
            ),
            // Globs per label.
            ("*.example", "registry.example/app", true),
            ("*.example", "a.registry.example/app", false),
            ("reg?stry.example", "registry.example/app", true),
            ("reg[a-j]stry.example", "registry.example/app", true),
            ("reg[^i]stry.example", "registry.example/app", false),
            ("*-mirror.example", "ecr-mirror.example/app", true),
            ("*-mirror.example", "ecr-mirrors.example/app", false),
            // Case-insensitive host.
            ("Registry.Example", "registry.example/app", true),
        ];
        for (pattern, image, want) in cases {
            assert_eq!(m(pattern, image), *want, "{pattern} vs {image}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        assert!(matches!(Pattern::new(""), Err(PatternError::NoHost(_))));
        assert!(matches!(
            Pattern::new("https://x.example"),
            Err(PatternError::Scheme(_))
        ));
        assert!(matches!(
            Pattern::new("reg[istry.example"),
            Err(PatternError::BadGlob { .. })
        ));
        assert!(matches!(
            Pattern::new("x..example"),
            Err(PatternError::BadGlob { .. })
        ));
        assert!(matches!(
            Pattern::new("x.example:ab"),
            Err(PatternError::BadPort(_))
        ));
        assert!(matches!(
            Pattern::new("x .example"),
            Err(PatternError::BadChars(_))
        ));
    }

    #[test]
    fn glob_matches_like_go_filepath_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "abc", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbb", false),
            ("a*b*c", "axxbyyc", true),
            ("?", "", false),
            ("[abc]", "b", true),
            ("[a-c]x", "cx", true),
            ("[^a-c]", "d", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), Ok(*want), "{p} vs {n}");
        }
        assert_eq!(glob_match("[", "a"), Err(()));
        assert_eq!(glob_match("a\\", "a"), Err(()));
    }
}
