//! Path prefixes of a terminated route (`[[route.paths]]`): which backends a
//! request goes to by its path, and the path the backend is sent.
//!
//! Pure: strings in, decisions out. A prefix matches whole path segments
//! (`/api` matches `/api`, `/api/` and `/api/v1`, never `/apix`), compared
//! as the client sent them (case-sensitive, no percent-decoding); the
//! longest matching prefix wins. On a route with prefixes, a request whose
//! path holds a dot-segment (`/a/../b`, also spelled `%2e%2e` or `%252e`,
//! between `%2f` or `\` separators, or followed by parameters as in
//! `/..;/`) is refused rather than matched: a backend that resolves it would
//! serve a path outside the prefix it was chosen for.
//! Clients normalise such paths before sending them (RFC 3986 §5.2.4, the
//! WHATWG URL parser), so only hand-made requests carry them.

use std::fmt;

/// Most prefixes one route may have.
pub const MAX_PATHS: usize = 64;
/// Longest prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

/// A validated prefix: starts with `/`, no trailing `/`, not `/` alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPrefix(String);

impl PathPrefix {
    /// Parses a configured prefix (`/api`, `/api/` is the same prefix).
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("prefix `{s}` must start with `/`"));
        }
        if s.len() > MAX_PREFIX_LEN {
            return Err(format!("prefix is longer than {MAX_PREFIX_LEN} bytes"));
        }
        if let Some(c) = s.chars().find(|&c| !is_path_char(c)) {
            return Err(format!(
                "prefix `{}` holds `{}`: letters, digits and -._~!$&'()*+,;=:@/ only (no query, no percent-encoding)",
                s.escape_default(),
                c.escape_default()
            ));
        }
        let trimmed = s.trim_end_matches('/');
        if trimmed.is_empty() {
            return Err(format!(
                "prefix `{s}` is every path: put those backends in the route's own `backends`"
            ));
        }
        if trimmed.contains("//") {
            return Err(format!("prefix `{s}` has an empty segment (`//`)"));
        }
        if trimmed.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(format!("prefix `{s}` has a `.` or `..` segment"));
        }
        Ok(PathPrefix(trimmed.to_string()))
    }

    /// The prefix, without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` (a request's path, without its query) lies under the
    /// prefix, on a segment boundary.
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The path and query a backend is sent when the prefix is stripped:
    /// `/api/v1?x=1` → `/v1?x=1`, `/api` → `/`, `/api?x` → `/?x`. `path`
    /// must match (see [`PathPrefix::matches`]); otherwise it is returned
    /// whole. The result starts with exactly one `/`.
    pub fn strip(&self, path: &str, query: Option<&str>) -> String {
        let rest = match path.strip_prefix(self.0.as_str()) {
            Some(r) if r.is_empty() || r.starts_with('/') => r,
            _ => path,
        };
        // One leading `/`: `/api//host/x` must not reach the backend as
        // `//host/x`, which some read as a scheme-relative URL.
        let rest = rest.trim_start_matches('/');
        match query {
            Some(q) => format!("/{rest}?{q}"),
            None => format!("/{rest}"),
        }
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 3986 `pchar` (without `%`) and `/`.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/".contains(c)
}

/// The index of the longest of `prefixes` that matches `path`.
pub fn longest_match<'a>(
    prefixes: impl IntoIterator<Item = &'a PathPrefix>,
    path: &str,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, p) in prefixes.into_iter().enumerate() {
        if p.matches(path) && best.is_none_or(|(_, len)| p.0.len() > len) {
            best = Some((i, p.0.len()));
        }
    }
    best.map(|(i, _)| i)
}

/// How a backend may read the bytes at one place of a path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    /// `/`, `\`, `%2f`, `%5c`.
    Separator,
    /// `.`, `%2e`.
    Dot,
    /// `;`, `%3b`: path parameters (`/..;x/`), which servlet containers and
    /// others drop before resolving the path.
    Params,
    Other,
}

/// The token at `b[i..]` and its length; `%XX` also encoded twice (`%25XX`).
fn token(b: &[u8], i: usize) -> (Token, usize) {
    let hex = |at: usize| -> Option<[u8; 2]> {
        let p = b.get(at..at + 2)?;
        Some([p[0].to_ascii_lowercase(), p[1].to_ascii_lowercase()])
    };
    match b[i] {
        b'/' | b'\\' => (Token::Separator, 1),
        b'.' => (Token::Dot, 1),
        b';' => (Token::Params, 1),
        b'%' => {
            let (at, len) = match hex(i + 1) {
                Some([b'2', b'5']) if hex(i + 3).is_some() => (i + 3, 5),
                _ => (i + 1, 3),
            };
            match hex(at) {
                Some([b'2', b'e']) => (Token::Dot, len),
                Some([b'2', b'f'] | [b'5', b'c']) => (Token::Separator, len),
                Some([b'3', b'b']) => (Token::Params, len),
                _ => (Token::Other, 1),
            }
        }
        _ => (Token::Other, 1),
    }
}

/// Whether `path` holds a `.` or `..` segment as a backend that decodes or
/// resolves the path could read it: `%2e` (also `%252e`) is a dot; `%2f`,
/// `%5c` and `\` (also encoded twice) separate segments; a segment's
/// parameters are ignored (`/..;x/`), as servlet containers do.
pub fn has_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    // Dots in the current segment so far (-1: it holds something else).
    let mut dots: i32 = 0;
    let mut i = 0;
    while i < b.len() {
        let (t, len) = token(b, i);
        match t {
            Token::Separator | Token::Params if dots == 1 || dots == 2 => return true,
            Token::Separator => dots = 0,
            Token::Dot if dots >= 0 => dots += 1,
            Token::Dot | Token::Params | Token::Other => dots = -1,
        }
        i += len;
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> PathPrefix {
        PathPrefix::parse(s).unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(p("/api").as_str(), "/api");
        assert_eq!(p("/api/").as_str(), "/api");
        assert_eq!(p("/a/b-c_d~e.f").as_str(), "/a/b-c_d~e.f");
        for bad in [
            "", "api", "/", "//", "/a?b", "/a#b", "/a b", "/a%2fb", "/a//b", "/a/../b", "/./a",
            "/..", "/é",
        ] {
            assert!(PathPrefix::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(PathPrefix::parse(&format!("/{}", "a".repeat(MAX_PREFIX_LEN))).is_err());
        let e = PathPrefix::parse("/a b").unwrap_err();
        assert!(e.contains("holds ` `"), "{e}");
        assert!(PathPrefix::parse("/").unwrap_err().contains("route's own"));
    }

    #[test]
    fn matches_on_segment_boundaries() {
        let api = p("/api");
        for yes in ["/api", "/api/", "/api/v1", "/api/v1/x"] {
            assert!(api.matches(yes), "{yes}");
        }
        for no in ["/", "/apix", "/ap", "/API", "/v1/api", "api", ""] {
            assert!(!api.matches(no), "{no}");
        }
        assert!(p("/a/b").matches("/a/b/c"));
        assert!(!p("/a/b").matches("/a/bc"));
    }

    #[test]
    fn longest_prefix_wins() {
        let v = [p("/api"), p("/api/v2"), p("/static")];
        assert_eq!(longest_match(&v, "/api/v2/users"), Some(1));
        assert_eq!(longest_match(&v, "/api/v1/users"), Some(0));
        assert_eq!(longest_match(&v, "/api/v2"), Some(1));
        assert_eq!(longest_match(&v, "/api/v20"), Some(0));
        assert_eq!(longest_match(&v, "/static/a.css"), Some(2));
        assert_eq!(longest_match(&v, "/"), None);
        assert_eq!(longest_match(&v, "/apiv2"), None);
        // Order does not matter.
        let w = [p("/api/v2"), p("/api")];
        assert_eq!(longest_match(&w, "/api/v2/x"), Some(0));
        assert_eq!(longest_match(&w, "/api/v1"), Some(1));
    }

    #[test]
    fn strips_the_prefix() {
        let api = p("/api");
        assert_eq!(api.strip("/api/v1", Some("x=1")), "/v1?x=1");
        assert_eq!(api.strip("/api", None), "/");
        assert_eq!(api.strip("/api/", None), "/");
        assert_eq!(api.strip("/api", Some("x")), "/?x");
        assert_eq!(api.strip("/api/a/b", None), "/a/b");
        // Not under it: unchanged.
        assert_eq!(api.strip("/apix", None), "/apix");
        // Never a `//` target.
        assert_eq!(api.strip("/api//evil.example/x", None), "/evil.example/x");
        assert_eq!(api.strip("/api///", Some("q")), "/?q");
    }

    #[test]
    fn dot_segments() {
        for yes in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/.",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a%2f..%2fb",
            "/a%2F..",
            "/a\\..\\b",
            "/a%5c..",
            "/api/%2e",
            "/static/..;/admin",
            "/static/.;x/admin",
            "/a/..%3b/b",
            "/a/%252e%252e/b",
            "/a%252f..",
            "/..;",
        ] {
            assert!(has_dot_segment(yes), "{yes}");
        }
        for no in [
            "/",
            "/a/b",
            "/a/.b",
            "/a/b.",
            "/a/...",
            "/a/..b",
            "/.well-known/x",
            "/a%2",
            "/a%",
            "/a%2e%2e%2e",
            "/%2ex",
            "/a;../b",
            "/a/...;/b",
            "/a/%25",
            "/a/%252",
            "/a/%2525",
            "",
        ] {
            assert!(!has_dot_segment(no), "{no}");
        }
    }

    proptest! {
        /// A stripped path is a path (starts with `/`) and keeps the query;
        /// re-adding the prefix gives the original path back.
        #[test]
        fn strip_round_trips(rest in "(/[a-z0-9.]{0,6}){0,4}", q in proptest::option::of("[a-z=&]{0,8}")) {
            let api = p("/api");
            let path = format!("/api{rest}");
            prop_assert!(api.matches(&path));
            let s = api.strip(&path, q.as_deref());
            prop_assert!(s.starts_with('/'));
            let (sp, sq) = match s.split_once('?') {
                Some((a, b)) => (a, Some(b)),
                None => (s.as_str(), None),
            };
            prop_assert_eq!(sq, q.as_deref());
            let back = if sp == "/" && rest.is_empty() { "/api".to_string() } else { format!("/api{sp}") };
            if rest != "/" && !rest.starts_with("//") {
                prop_assert_eq!(back, path);
            }
            prop_assert!(!s.starts_with("//"));
        }

        /// The chosen prefix matches and no longer one does.
        #[test]
        fn longest_is_longest(path in "(/[ab]{1,2}){0,4}/?") {
            let v = [p("/a"), p("/a/b"), p("/b"), p("/a/b/a"), p("/aa")];
            match longest_match(&v, &path) {
                Some(i) => {
                    prop_assert!(v[i].matches(&path));
                    for o in &v {
                        prop_assert!(!o.matches(&path) || o.as_str().len() <= v[i].as_str().len());
                    }
                }
                None => prop_assert!(v.iter().all(|o| !o.matches(&path))),
            }
        }

        /// Never panics on any input.
        #[test]
        fn dot_check_total(s in ".{0,40}") {
            let _ = has_dot_segment(&s);
        }
    }
}
