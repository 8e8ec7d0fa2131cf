//! Fuzz target: a request path (network input) against a route's path
//! prefixes (`[[route.paths]]`), and prefix text as config gives it.
//!
//! Invariants checked beyond "no panic":
//! * a prefix that parses parses again to itself, and matches itself;
//! * the chosen prefix matches the path and no longer prefix does;
//! * a stripped request target is still a valid request target (it starts
//!   with one `/`, never `//`, and `http` accepts it), and keeps the query;
//! * a path that passes the dot-segment check has no `.` or `..` segment
//!   once `%2e` is read as a dot and `%2f`, `%5c` and `\` as `/`.
#![no_main]

use gatewire::proxy::paths::{has_dot_segment, longest_match, PathPrefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line: prefixes separated by spaces; the rest: a request target.
    let text = String::from_utf8_lossy(data);
    let (head, target) = text.split_once('\n').unwrap_or(("/api /api/v2", &text));
    let prefixes: Vec<PathPrefix> = head
        .split(' ')
        .filter_map(|p| PathPrefix::parse(p).ok())
        .collect();
    for p in &prefixes {
        assert_eq!(PathPrefix::parse(p.as_str()).as_ref(), Ok(p));
        assert!(p.matches(p.as_str()));
    }
    let Ok(pq) = http::uri::PathAndQuery::try_from(target) else {
        return;
    };
    let path = pq.path();
    if let Some(i) = longest_match(&prefixes, path) {
        let chosen = &prefixes[i];
        assert!(chosen.matches(path));
        for o in &prefixes {
            assert!(!o.matches(path) || o.as_str().len() <= chosen.as_str().len());
        }
        let stripped = chosen.strip(path, pq.query());
        assert!(stripped.starts_with('/') && !stripped.starts_with("//"));
        let back = http::uri::PathAndQuery::try_from(stripped.as_str()).expect("valid target");
        assert_eq!(back.query(), pq.query());
    }
    if !has_dot_segment(path) {
        let lowered = path
            .to_ascii_lowercase()
            .replace("%2e", ".")
            .replace("%2f", "/")
            .replace("%5c", "/")
            .replace('\\', "/");
        assert!(!lowered.split('/').any(|s| s == "." || s == ".."), "{path}");
    }
});
