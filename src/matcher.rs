//! kubelet `matchImages` semantics: which image names a pattern covers.
//!
//! A transcription of kubelet's `URLsMatchStr` (`pkg/credentialprovider`),
//! which kubelet calls with each `matchImages` pattern and the normalised
//! repository name it is about to pull (`docker.io/library/busybox`, never a
//! tag or digest). Both strings are read as URLs the way Go's `url.Parse`
//! reads `"https://" + s`; the host is split into its port (Go's
//! `net.SplitHostPort`) and its dot-separated labels; they match when the
//! ports are equal (no port matches only no port), the label counts are
//! equal, the pattern's path is a byte prefix of the name's path, and each
//! label matches its glob under Go's `filepath.Match`.
//!
//! What follows from that, and that an operator may not expect: matching is
//! case-sensitive; `?` starts a URL *query* (so it is no wildcard, and
//! `reg?stry.example` means host `reg`); a character class (`[a-z]`) and
//! `\` are not allowed in a host (Go 1.26 refuses a `[` anywhere in it but
//! at the start of an IPv6 literal); `[::1]:5000` is an IPv6 literal with a
//! port (its one label is `::1`); a class still works in the path.
//!
//! Patterns kubelet refuses at load (`url.Parse` fails) are refused here too.
//! Patterns kubelet accepts but that can never match a valid image name —
//! a scheme (`https://x` is host `https:`), an empty label, a malformed glob,
//! whitespace — are refused here as well, so the mistake shows at start
//! rather than as pulls without a token. Go's URL parsing is followed as of
//! Go 1.26 (what kubelet 1.37 is built with): a bracketed host must be an
//! IPv6 address (Go 1.25.2), a `[` anywhere else in the host is refused,
//! and in an `https` URL the port starts at the host's first `:`.

use std::fmt;
use std::net::Ipv6Addr;

/// A compiled `matchImages` pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    url: SchemelessUrl,
}

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("pattern {0:?} is empty")]
    Empty(String),
    /// The pattern has a scheme: kubelet reads `https://x` as host `https:`
    /// and never matches it.
    #[error("pattern {0:?} must not have a scheme (drop the `://` part; kubelet would read the scheme as the host and never match)")]
    Scheme(String),
    /// kubelet refuses the pattern too: Go's `url.Parse` fails on it.
    #[error("pattern {pattern:?} is not a URL kubelet accepts: {reason}")]
    Url {
        /// The whole pattern.
        pattern: String,
        /// Go's reason, in Go's words.
        reason: String,
    },
    /// A host label is empty (`x..example`, `.example`): it can match no
    /// registry host.
    #[error("pattern {0:?} has an empty host label")]
    EmptyLabel(String),
    /// A label is a malformed glob (an unclosed `[`, `[]a]`, `[a-]`, a
    /// trailing `\`): kubelet accepts it and never matches it.
    #[error("pattern {pattern:?} has a malformed glob in host label {label:?} (Go's filepath.Match refuses it, so kubelet never matches this pattern)")]
    BadGlob {
        /// The whole pattern.
        pattern: String,
        /// The label that does not compile.
        label: String,
    },
    /// The pattern has whitespace, which no image name has.
    #[error("pattern {0:?} has whitespace, which no image name has")]
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
        if source.is_empty() {
            return Err(PatternError::Empty(source.to_owned()));
        }
        let url = SchemelessUrl::parse(source).map_err(|reason| PatternError::Url {
            pattern: source.to_owned(),
            reason,
        })?;
        // Only what precedes a query or fragment counts: kubelet drops the
        // rest.
        let kept = source.split(['?', '#']).next().unwrap_or_default();
        if kept
            .split_once("://")
            .is_some_and(|(scheme, _)| !scheme.contains('/'))
        {
            return Err(PatternError::Scheme(source.to_owned()));
        }
        if kept.chars().any(char::is_whitespace) {
            return Err(PatternError::BadChars(source.to_owned()));
        }
        let (labels, _) = url.split();
        for label in labels {
            if label.is_empty() {
                return Err(PatternError::EmptyLabel(source.to_owned()));
            }
            if glob_match(label, b"").is_err() {
                return Err(PatternError::BadGlob {
                    pattern: source.to_owned(),
                    label: String::from_utf8_lossy(label).into_owned(),
                });
            }
        }
        Ok(Pattern {
            source: source.to_owned(),
            url,
        })
    }

    /// Whether kubelet would give this pattern's credentials to `name`, the
    /// normalised repository name without tag or digest
    /// (`docker.io/library/busybox`, `registry.example:5000/team/app`).
    pub fn matches(&self, name: &str) -> bool {
        match SchemelessUrl::parse(name) {
            Ok(target) => urls_match(&self.url, &target),
            Err(_) => false,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// kubelet's `URLsMatch`.
fn urls_match(glob: &SchemelessUrl, target: &SchemelessUrl) -> bool {
    let (glob_labels, glob_port) = glob.split();
    let (target_labels, target_port) = target.split();
    glob_port == target_port
        && glob_labels.len() == target_labels.len()
        && target.path.starts_with(&glob.path)
        && glob_labels
            .iter()
            .zip(&target_labels)
            .all(|(g, t)| glob_match(g, t) == Ok(true))
}

/// What kubelet keeps of `url.Parse("https://" + s)`: the host (with port,
/// unescaped) and the path (unescaped). Bytes, as Go strings are.
#[derive(Clone, PartialEq, Eq)]
struct SchemelessUrl {
    host: Vec<u8>,
    path: Vec<u8>,
}

impl SchemelessUrl {
    /// Go's `url.Parse("https://" + s)`, keeping its errors' wording.
    fn parse(s: &str) -> Result<Self, String> {
        // The fragment goes first, the query next; neither is kept, but a
        // bad escape in the fragment fails the parse.
        let (rest, fragment) = cut(s.as_bytes(), b'#');
        if rest.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err("net/url: invalid control character in URL".into());
        }
        if let Some(f) = fragment {
            unescape(f, Mode::Fragment)?;
        }
        let (rest, _query) = cut(rest, b'?');
        let (authority, path) = match rest.iter().position(|&b| b == b'/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, &b""[..]),
        };
        let host = match authority.iter().rposition(|&b| b == b'@') {
            None => parse_host(authority)?,
            Some(i) => {
                let host = parse_host(&authority[i + 1..])?;
                let userinfo = &authority[..i];
                if !valid_userinfo(userinfo) {
                    return Err("net/url: invalid userinfo".into());
                }
                let (user, password) = cut(userinfo, b':');
                unescape(user, Mode::UserPassword)?;
                if let Some(p) = password {
                    unescape(p, Mode::UserPassword)?;
                }
                host
            }
        };
        let path = unescape(path, Mode::Path)?;
        Ok(SchemelessUrl { host, path })
    }

    /// kubelet's `SplitURL`: `net.SplitHostPort`, or the whole host and no
    /// port when that fails; then the host's labels.
    fn split(&self) -> (Vec<&[u8]>, &[u8]) {
        let (host, port) = split_host_port(&self.host).unwrap_or((&self.host, b""));
        (host.split(|&b| b == b'.').collect(), port)
    }
}

/// `strings.Cut` on a byte.
fn cut(s: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == sep) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Go's `url.parseHost` for an `https` URL (kubelet parses `https://` +
/// the pattern), as of Go 1.26.
fn parse_host(host: &[u8]) -> Result<Vec<u8>, String> {
    let last_open = host.iter().rposition(|&b| b == b'[');
    if last_open.is_some_and(|i| i > 0) {
        return Err("invalid IP-literal".into());
    }
    if last_open == Some(0) {
        let i = host
            .iter()
            .rposition(|&b| b == b']')
            .ok_or("missing ']' in host")?;
        let colon_port = &host[i + 1..];
        if !valid_optional_port(colon_port) {
            return Err(format!(
                "invalid port {:?} after host",
                String::from_utf8_lossy(colon_port)
            ));
        }
        let colon_port = unescape(colon_port, Mode::Host)?;
        let inner = &host[1..i];
        let name = match find(inner, b"%25") {
            Some(zone) => {
                let mut name = unescape(&inner[..zone], Mode::Host)?;
                name.extend(unescape(&inner[zone..], Mode::Zone)?);
                name
            }
            None => unescape(inner, Mode::Host)?,
        };
        // Go 1.25.2 and later: only an IPv6 address may be in brackets.
        if !is_ipv6_literal(&name) {
            return Err(format!(
                "invalid host: {:?} is not an IPv6 address",
                String::from_utf8_lossy(&name)
            ));
        }
        let mut out = Vec::with_capacity(name.len() + 2 + colon_port.len());
        out.push(b'[');
        out.extend(name);
        out.push(b']');
        out.extend(colon_port);
        return Ok(out);
    }
    // Strict colons for http(s) (go.dev/issue/75223): the port is all that
    // follows the first `:`, so a second `:` makes it invalid.
    if let Some(i) = host.iter().position(|&b| b == b':') {
        let colon_port = &host[i..];
        if !valid_optional_port(colon_port) {
            return Err(format!(
                "invalid port {:?} after host",
                String::from_utf8_lossy(colon_port)
            ));
        }
    }
    unescape(host, Mode::Host)
}

/// `netip.ParseAddr` accepting it and it not being IPv4: an IPv6 address,
/// optionally with a non-empty zone after `%`.
fn is_ipv6_literal(name: &[u8]) -> bool {
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    let (addr, zone) = match name.split_once('%') {
        Some((a, z)) => (a, Some(z)),
        None => (name, None),
    };
    zone != Some("") && addr.parse::<Ipv6Addr>().is_ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Go's `validOptionalPort`: empty, or `:` and digits (possibly none).
fn valid_optional_port(port: &[u8]) -> bool {
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// Go's `validUserinfo`.
fn valid_userinfo(s: &[u8]) -> bool {
    s.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._:~!$&'()*+,;=%@".contains(&b))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Host,
    Zone,
    Path,
    UserPassword,
    Fragment,
}

/// Go's `url.unescape` for the modes kubelet's parse goes through.
fn unescape(s: &[u8], mode: Mode) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(s.get(i + 1)), hex(s.get(i + 2))) else {
                    let bad = &s[i..s.len().min(i + 3)];
                    return Err(format!(
                        "invalid URL escape {:?}",
                        String::from_utf8_lossy(bad)
                    ));
                };
                // In a host, %-encoding is for non-ASCII bytes only, and
                // %25 (for an IPv6 zone).
                if mode == Mode::Host && hi < 8 && &s[i..i + 3] != b"%25" {
                    return Err(format!(
                        "invalid URL escape {:?}",
                        String::from_utf8_lossy(&s[i..i + 3])
                    ));
                }
                // In an IPv6 zone, an escape may only make a byte that could
                // stand there unescaped (or a space).
                let v = (hi * 16 + lo) as u8;
                if mode == Mode::Zone
                    && &s[i..i + 3] != b"%25"
                    && v != b' '
                    && (v >= 0x80 || !host_byte(v))
                {
                    return Err(format!(
                        "invalid URL escape {:?}",
                        String::from_utf8_lossy(&s[i..i + 3])
                    ));
                }
                out.push(v);
                i += 3;
            }
            b if matches!(mode, Mode::Host | Mode::Zone) && b < 0x80 && !host_byte(b) => {
                return Err(format!(
                    "invalid character {:?} in host name",
                    (b as char).to_string()
                ));
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// ASCII bytes Go's `shouldEscape` lets through unescaped in a host.
fn host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=:[]<>\"".contains(&b)
}

/// Go's `net.SplitHostPort`; `None` where it returns an error.
fn split_host_port(hostport: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = hostport.iter().rposition(|&b| b == b':')?;
    let (host, j, k);
    if hostport[0] == b'[' {
        let end = hostport.iter().position(|&b| b == b']')?;
        if end + 1 != i {
            return None;
        }
        host = &hostport[1..end];
        (j, k) = (1, end + 1);
    } else {
        host = &hostport[..i];
        if host.contains(&b':') {
            return None;
        }
        (j, k) = (0, 0);
    }
    if hostport[j..].contains(&b'[') || hostport[k..].contains(&b']') {
        return None;
    }
    Some((host, &hostport[i + 1..]))
}

/// Go's `filepath.Match` (separator `/`): `*`, `?`, `[...]` and `[^...]`
/// with ranges, `\` escapes. `Err` for a malformed pattern, like Go's
/// `ErrBadPattern`, whatever the name.
fn glob_match(mut pattern: &[u8], mut name: &[u8]) -> Result<bool, ()> {
    'pattern: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing '*' matches the rest unless it has a '/'.
            return Ok(!name.contains(&b'/'));
        }
        let (t, ok) = match_chunk(chunk, name)?;
        // The last chunk must use up the name.
        if ok && (t.is_empty() || !pattern.is_empty()) {
            name = t;
            continue;
        }
        if star {
            // Try skipping i+1 bytes; a '*' never skips a '/'.
            let mut i = 0;
            while i < name.len() && name[i] != b'/' {
                let (t, ok) = match_chunk(chunk, &name[i + 1..])?;
                if ok && (pattern.is_empty() && !t.is_empty()) {
                    i += 1;
                    continue;
                }
                if ok {
                    name = t;
                    continue 'pattern;
                }
                i += 1;
            }
        }
        // No match: the rest of the pattern must still be well-formed.
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, b"")?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// Go's `scanChunk`: leading stars, then up to the next star outside `[]`.
fn scan_chunk(mut pattern: &[u8]) -> (bool, &[u8], &[u8]) {
    let mut star = false;
    while pattern.first() == Some(&b'*') {
        pattern = &pattern[1..];
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            // An escape takes the next byte with it.
            b'\\' if i + 1 < pattern.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Go's `matchChunk`: `Ok((rest, true))` when `chunk` matches a prefix of
/// `s`. The whole chunk is read even after a mismatch so that a malformed
/// chunk is always an error.
fn match_chunk<'a>(mut chunk: &[u8], mut s: &'a [u8]) -> Result<(&'a [u8], bool), ()> {
    let mut failed = false;
    while !chunk.is_empty() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match chunk[0] {
            b'[' => {
                let mut r = None;
                if !failed {
                    let (c, n) = decode_rune(s);
                    r = Some(c);
                    s = &s[n..];
                }
                chunk = &chunk[1..];
                let negated = chunk.first() == Some(&b'^');
                if negated {
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut ranges = 0;
                loop {
                    if chunk.first() == Some(&b']') && ranges > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk[0] == b'-' {
                        let (h, rest) = get_esc(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if r.is_some_and(|r| lo <= r && r <= hi) {
                        matched = true;
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            b'?' => {
                if !failed {
                    if s[0] == b'/' {
                        failed = true;
                    }
                    let (_, n) = decode_rune(s);
                    s = &s[n..];
                }
                chunk = &chunk[1..];
            }
            c => {
                let c = if c == b'\\' {
                    chunk = &chunk[1..];
                    *chunk.first().ok_or(())?
                } else {
                    c
                };
                if !failed {
                    if c != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    if failed {
        Ok((b"", false))
    } else {
        Ok((s, true))
    }
}

/// Go's `getEsc`: one possibly escaped character of a class.
fn get_esc(mut chunk: &[u8]) -> Result<(char, &[u8]), ()> {
    match chunk.first() {
        None | Some(b'-') | Some(b']') => return Err(()),
        Some(b'\\') => {
            chunk = &chunk[1..];
            if chunk.is_empty() {
                return Err(());
            }
        }
        Some(_) => {}
    }
    let (r, n) = decode_rune(chunk);
    let rest = &chunk[n..];
    if (r == char::REPLACEMENT_CHARACTER && n == 1) || rest.is_empty() {
        return Err(());
    }
    Ok((r, rest))
}

/// Go's `utf8.DecodeRuneInString`: the first character and its length;
/// `(U+FFFD, 1)` for a byte that starts no valid UTF-8 sequence.
fn decode_rune(s: &[u8]) -> (char, usize) {
    for n in 1..=s.len().min(4) {
        if let Ok(text) = std::str::from_utf8(&s[..n]) {
            if let Some(c) = text.chars().next() {
                return (c, n);
            }
        }
    }
    (char::REPLACEMENT_CHARACTER, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::new(pattern).unwrap().matches(name)
    }

    #[test]
    fn kubelet_match_images_semantics() {
        let ecr = "*.dkr.ecr.*.amazonaws.com";
        let cases: &[(&str, &str, bool)] = &[
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
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
            (ecr, "dkr.ecr.us-east-1.amazonaws.com/app", false),
            // Port must match exactly.
            (
                ecr,
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:443/app",
                false,
            ),
            ("registry.example:5000", "registry.example:5000/app", true),
            ("registry.example:5000", "registry.example/app", false),
            // An empty port is no port.
            ("registry.example:", "registry.example/app", true),
            // Path is a byte prefix.
            ("registry.example/team", "registry.example/team/app", true),
            ("registry.example/team", "registry.example/teams/app", true),
            ("registry.example/team", "registry.example/other/app", false),
            ("registry.example/te%61m", "registry.example/team/app", true),
            // Globs per label, case-sensitive.
            ("*.example", "registry.example/app", true),
            ("*.example", "a.registry.example/app", false),
            ("Registry.Example", "registry.example/app", false),
            // `?` starts a query: the host is `reg`.
            ("reg?stry.example", "registry.example/app", false),
            ("localhost?x", "localhost/app", true),
            // IPv6 literals: with a port the label is the address.
            ("[::1]:5000", "[::1]:5000/app", true),
            ("[::1]", "[::1]/app", false),
            // Userinfo is dropped.
            ("user@registry.example", "registry.example/app", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(m(pattern, name), *want, "{pattern} vs {name}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_reason() {
        let refused: &[(&str, &str)] = &[
            ("", "empty"),
            ("https://x.example", "scheme"),
            ("reg[istry.example", "invalid IP-literal"),
            ("[]a].example", "not a URL"),
            ("reg[a-j]stry.example", "invalid IP-literal"),
            ("x[]a].example", "invalid IP-literal"),
            ("reg.example:5000:1", "invalid port \":5000:1\""),
            ("x..example", "empty host label"),
            ("x.example:ab", "invalid port \":ab\""),
            ("reg[^i]stry.example", "invalid IP-literal"),
            ("reg^stry.example", "invalid character \"^\""),
            // Found by the property test: in an IPv6 zone an escape may only
            // make a byte that could stand there as it is.
            ("[::%25%c3%a91]:916", "invalid URL escape \"%c3\""),
            ("reg\\*.example", "invalid character \"\\\\\""),
            ("x .example", "invalid character \" \""),
            ("x.example/a b", "whitespace"),
            ("x.example/%zz", "invalid URL escape"),
            ("x%41.example", "invalid URL escape \"%41\""),
            ("[1.2.3.4]:5000", "not an IPv6 address"),
            ("[::1", "missing ']'"),
            ("us{er}@x.example", "invalid userinfo"),
            ("x.example\n", "control character"),
        ];
        for (pattern, reason) in refused {
            let err = Pattern::new(pattern).expect_err(pattern).to_string();
            assert!(err.contains(reason), "{pattern:?}: {err}");
        }
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
            ("[\\]a]", "]", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(
                glob_match(p.as_bytes(), n.as_bytes()),
                Ok(*want),
                "{p} vs {n}"
            );
        }
        for bad in ["[", "a\\", "[]a]", "[a-]", "[-a]", "[^]", "x*[", "[a-b"] {
            assert_eq!(glob_match(bad.as_bytes(), b"zzz"), Err(()), "{bad}");
            assert_eq!(glob_match(bad.as_bytes(), b""), Err(()), "{bad}");
        }
    }
}
