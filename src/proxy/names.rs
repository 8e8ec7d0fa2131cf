#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
//! Validated host names and the route-name table used by the reverse proxy.
//!
//! Pure: no I/O, no clocks, no allocation on lookup.
//!
//! # The name model
//!
//! * A **name route** is one DNS label under a gateway-owned domain: the route
//!   `(gw.example.com, app)` serves the host `app.gw.example.com`. Multi-label names
//!   (`a.b.gw.example.com`) are not name routes.
//! * An **fqdn route** is a custom domain matched exactly.
//! * Names are normalised to lowercase with any single trailing dot removed, so
//!   `App.GW.example.com.` and `app.gw.example.com` are the same [`DomainName`].
//! * Suffix checks ([`DomainName::is_within`], [`name_under`]) compare on label
//!   boundaries: `xgw.example.com` is *not* under `gw.example.com`.
//!
//! Labels follow the LDH rule (letters, digits, hyphen): 1–63 characters of
//! `[a-z0-9-]`, not starting or ending with `-`. Underscores are rejected (the zos
//! fqdn regex accepts them; we do not, because they are not valid host names and
//! TLS clients disagree on whether to send them as SNI).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// Maximum length of a [`DomainName`] in its textual form, without a trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Maximum length of one DNS label.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a valid [`DomainName`] or [`Label`].
///
/// The messages name the offending label, e.g. ``label `Foo_` contains `_` ``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty (or only a dot).
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] characters.
    #[error("name is {len} characters long; the limit is 253")]
    TooLong {
        /// Length of the name (without a trailing dot).
        len: usize,
    },
    /// Two consecutive dots, or a leading dot.
    #[error("name `{}` has an empty label", .name.escape_debug())]
    EmptyLabel {
        /// The whole name as given.
        name: String,
    },
    /// A label is longer than [`MAX_LABEL_LEN`] characters.
    #[error("label `{label}` is {len} characters long; the limit is 63")]
    LabelTooLong {
        /// The offending label as given.
        label: String,
        /// Its length.
        len: usize,
    },
    /// A label contains a character outside `[A-Za-z0-9-]`.
    #[error("label `{}` contains `{}`", .label.escape_debug(), .ch.escape_debug())]
    InvalidChar {
        /// The offending label as given.
        label: String,
        /// The first invalid character.
        ch: char,
    },
    /// A label starts or ends with `-`.
    #[error("label `{label}` starts or ends with `-`")]
    EdgeHyphen {
        /// The offending label as given.
        label: String,
    },
    /// The rightmost label is all digits, so the name looks like an IPv4 address.
    #[error(
        "name `{name}` ends in the all-digit label `{label}`; IP addresses are not domain names"
    )]
    NumericTld {
        /// The whole name as given.
        name: String,
        /// The rightmost label.
        label: String,
    },
    /// The bytes are not UTF-8 (only reported by [`DomainName::from_ascii`]).
    #[error("name is not valid UTF-8")]
    NotUtf8,
}

impl NameError {
    /// A short, stable identifier suitable as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            NameError::Empty => "empty",
            NameError::TooLong { .. } => "too_long",
            NameError::EmptyLabel { .. } => "empty_label",
            NameError::LabelTooLong { .. } => "label_too_long",
            NameError::InvalidChar { .. } => "invalid_char",
            NameError::EdgeHyphen { .. } => "edge_hyphen",
            NameError::NumericTld { .. } => "numeric_tld",
            NameError::NotUtf8 => "not_utf8",
        }
    }
}

/// Checks one label (1–63 chars of `[A-Za-z0-9-]`, no hyphen at either end).
/// `whole` is the name the label came from, for the error message.
fn check_label(label: &str, whole: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::EmptyLabel {
            name: whole.to_owned(),
        });
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(NameError::InvalidChar {
            label: label.to_owned(),
            ch,
        });
    }
    // All ASCII from here on, so byte length == character count.
    if label.len() > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong {
            label: label.to_owned(),
            len: label.len(),
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::EdgeHyphen {
            label: label.to_owned(),
        });
    }
    Ok(())
}

/// A validated, normalised DNS host name: lowercase LDH labels joined by dots,
/// at most 253 characters, no trailing dot, rightmost label not all digits.
///
/// `Hash`/`Eq` agree with `str`, and `DomainName: Borrow<str>`, so maps keyed by
/// `DomainName` can be queried with a `&str` that is already normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// Validates and normalises `input` (lowercases, strips one trailing dot).
    ///
    /// ```
    /// use gatewire::proxy::names::DomainName;
    /// let n = DomainName::parse("App.GW.example.com.").unwrap();
    /// assert_eq!(n.as_str(), "app.gw.example.com");
    /// assert_eq!(
    ///     DomainName::parse("Foo_.example.com").unwrap_err().to_string(),
    ///     "label `Foo_` contains `_`"
    /// );
    /// ```
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let s = input.strip_suffix('.').unwrap_or(input);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: s.len() });
        }
        let mut last = "";
        for label in s.split('.') {
            check_label(label, input)?;
            last = label;
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NameError::NumericTld {
                name: input.to_owned(),
                label: last.to_owned(),
            });
        }
        Ok(DomainName(s.to_ascii_lowercase()))
    }

    /// Like [`DomainName::parse`] for raw bytes from the wire (TLS SNI).
    pub fn from_ascii(bytes: &[u8]) -> Result<Self, NameError> {
        let s = std::str::from_utf8(bytes).map_err(|_| NameError::NotUtf8)?;
        Self::parse(s)
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The labels, leftmost first.
    pub fn labels(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.split('.')
    }

    /// Splits off the leftmost label: `app.gw.example.com` →
    /// (`app`, `Some("gw.example.com")`); a single-label name gives `None`.
    pub fn split_first_label(&self) -> (&str, Option<&str>) {
        match self.0.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (&self.0, None),
        }
    }

    /// True if `self` equals `domain` or is a subdomain of it, compared on label
    /// boundaries (`xgw.example.com` is not within `gw.example.com`).
    pub fn is_within(&self, domain: &DomainName) -> bool {
        match self.0.strip_suffix(domain.as_str()) {
            Some("") => true,
            Some(prefix) => prefix.ends_with('.'),
            None => false,
        }
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DomainName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DomainName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for DomainName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for DomainName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<DomainName> for String {
    fn from(n: DomainName) -> String {
        n.0
    }
}

/// One validated, lowercased DNS label (the name part of a name route).
///
/// `Label: Borrow<str>` with matching `Hash`/`Eq`, like [`DomainName`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// Validates and lowercases one label. Dots are rejected.
    ///
    /// ```
    /// use gatewire::proxy::names::Label;
    /// assert_eq!(Label::parse("MyApp").unwrap().as_str(), "myapp");
    /// assert_eq!(
    ///     Label::parse("a.b").unwrap_err().to_string(),
    ///     "label `a.b` contains `.`"
    /// );
    /// ```
    pub fn parse(input: &str) -> Result<Self, NameError> {
        if input.is_empty() {
            return Err(NameError::Empty);
        }
        check_label(input, input)?;
        Ok(Label(input.to_ascii_lowercase()))
    }

    /// The normalised label.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host this label names under `domain`: `<label>.<domain>`.
    ///
    /// Returns `None` if the result would exceed [`MAX_NAME_LEN`].
    pub fn under(&self, domain: &DomainName) -> Option<DomainName> {
        let len = self.0.len() + 1 + domain.0.len();
        (len <= MAX_NAME_LEN).then(|| DomainName(format!("{}.{}", self.0, domain.0)))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Label {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for Label {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Label {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

/// If `host` is exactly `<label>.<domain>` (one label, on a label boundary),
/// returns that label.
///
/// ```
/// use gatewire::proxy::names::{name_under, DomainName};
/// let d = DomainName::parse("gw.example.com").unwrap();
/// let h = |s| DomainName::parse(s).unwrap();
/// assert_eq!(name_under(&h("app.gw.example.com"), &d).unwrap().as_str(), "app");
/// assert!(name_under(&h("a.b.gw.example.com"), &d).is_none());
/// assert!(name_under(&h("appgw.example.com"), &d).is_none());
/// assert!(name_under(&h("gw.example.com"), &d).is_none());
/// ```
pub fn name_under(host: &DomainName, domain: &DomainName) -> Option<Label> {
    match host.split_first_label() {
        // `first` is a label of a validated name, so it is a valid Label already.
        (first, Some(rest)) if rest == domain.as_str() => Some(Label(first.to_owned())),
        _ => None,
    }
}

/// Which kind of route a [`NameTable`] lookup matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch<'a, T> {
    /// An exact custom-domain (fqdn) route.
    Fqdn(&'a T),
    /// A name route: `label` under the gateway domain `domain`.
    Name {
        /// The gateway domain.
        domain: &'a DomainName,
        /// The label (leftmost label of the host).
        label: &'a Label,
        /// The route value.
        value: &'a T,
    },
}

impl<'a, T> RouteMatch<'a, T> {
    /// The route value, whatever the kind.
    pub fn value(&self) -> &'a T {
        match *self {
            RouteMatch::Fqdn(v) => v,
            RouteMatch::Name { value, .. } => value,
        }
    }
}

/// Maps host names to route values: exact fqdns plus `(gateway domain, label)` pairs.
///
/// Lookup is two or three hash probes and never allocates:
/// 1. the host as an exact fqdn;
/// 2. otherwise split the host at its first dot into `label` and `rest`, and look up
///    `label` among the names registered under the gateway domain `rest`.
///
/// An fqdn route therefore wins over a name route for the same host.
#[derive(Debug, Clone)]
pub struct NameTable<T> {
    fqdns: HashMap<DomainName, T>,
    names: HashMap<DomainName, HashMap<Label, T>>,
    len: usize,
}

impl<T> Default for NameTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> NameTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        NameTable {
            fqdns: HashMap::new(),
            names: HashMap::new(),
            len: 0,
        }
    }

    /// Number of routes (fqdn and name).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces an fqdn route; returns the previous value.
    pub fn insert_fqdn(&mut self, fqdn: DomainName, value: T) -> Option<T> {
        let old = self.fqdns.insert(fqdn, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Adds or replaces the name route `label.domain`; returns the previous value.
    pub fn insert_name(&mut self, domain: DomainName, label: Label, value: T) -> Option<T> {
        let old = self.names.entry(domain).or_default().insert(label, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes an fqdn route.
    pub fn remove_fqdn(&mut self, fqdn: &DomainName) -> Option<T> {
        let old = self.fqdns.remove(fqdn.as_str());
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Removes a name route. Drops the domain's map when it becomes empty.
    pub fn remove_name(&mut self, domain: &DomainName, label: &Label) -> Option<T> {
        let inner = self.names.get_mut(domain.as_str())?;
        let old = inner.remove(label.as_str());
        if inner.is_empty() {
            self.names.remove(domain.as_str());
        }
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The route for `host`, if any (fqdn first, then name route).
    pub fn lookup(&self, host: &DomainName) -> Option<&T> {
        self.lookup_match(host).map(|m| m.value())
    }

    /// Like [`NameTable::lookup`] but also says which kind of route matched.
    pub fn lookup_match(&self, host: &DomainName) -> Option<RouteMatch<'_, T>> {
        if let Some(v) = self.fqdns.get(host.as_str()) {
            return Some(RouteMatch::Fqdn(v));
        }
        let (label, Some(rest)) = host.split_first_label() else {
            return None;
        };
        let (domain, inner) = self.names.get_key_value(rest)?;
        let (label, value) = inner.get_key_value(label)?;
        Some(RouteMatch::Name {
            domain,
            label,
            value,
        })
    }

    /// True if at least one name route exists under `domain`.
    pub fn has_domain(&self, domain: &DomainName) -> bool {
        self.names.contains_key(domain.as_str())
    }

    /// Iterates over the fqdn routes (arbitrary order).
    pub fn fqdns(&self) -> impl Iterator<Item = (&DomainName, &T)> + '_ {
        self.fqdns.iter()
    }

    /// Iterates over the name routes as `(domain, label, value)` (arbitrary order).
    pub fn names(&self) -> impl Iterator<Item = (&DomainName, &Label, &T)> + '_ {
        self.names
            .iter()
            .flat_map(|(d, inner)| inner.iter().map(move |(l, v)| (d, l, v)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dn(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn normalises() {
        assert_eq!(dn("Example.COM.").as_str(), "example.com");
        assert_eq!(dn("localhost").as_str(), "localhost");
        assert_eq!(
            dn("xn--bcher-kva.example").as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(dn("a-b.c1").as_str(), "a-b.c1");
        assert_eq!(dn("1.2.3.example").as_str(), "1.2.3.example");
    }

    #[test]
    fn error_messages() {
        let e = |s: &str| DomainName::parse(s).unwrap_err().to_string();
        assert_eq!(e("Foo_.example.com"), "label `Foo_` contains `_`");
        assert_eq!(e(""), "name is empty");
        assert_eq!(e("."), "name is empty");
        assert_eq!(e("a..b"), "name `a..b` has an empty label");
        assert_eq!(e(".a"), "name `.a` has an empty label");
        assert_eq!(e("a.b.."), "name `a.b..` has an empty label");
        assert_eq!(e("-a.com"), "label `-a` starts or ends with `-`");
        assert_eq!(e("a-.com"), "label `a-` starts or ends with `-`");
        assert_eq!(e("a b.com"), "label `a b` contains ` `");
        assert_eq!(e("*.example.com"), "label `*` contains `*`");
        assert_eq!(e("bücher.de"), "label `bücher` contains `ü`");
        assert_eq!(e("a\n.com"), "label `a\\n` contains `\\n`");
        assert_eq!(
            e("1.2.3.4"),
            "name `1.2.3.4` ends in the all-digit label `4`; IP addresses are not domain names"
        );
        let long = "a".repeat(64);
        assert_eq!(
            e(&format!("{long}.com")),
            format!("label `{long}` is 64 characters long; the limit is 63")
        );
        let too_long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(too_long.len(), 254);
        assert_eq!(
            e(&too_long),
            "name is 254 characters long; the limit is 253"
        );
        // 253 exactly is fine, with or without a trailing dot.
        assert!(DomainName::parse(&too_long[1..]).is_ok());
        assert!(DomainName::parse(&format!("{}.", &too_long[1..])).is_ok());
        assert_eq!(DomainName::from_ascii(b"\xff.com"), Err(NameError::NotUtf8));
    }

    #[test]
    fn labels() {
        assert_eq!(Label::parse("MyApp").unwrap().as_str(), "myapp");
        assert_eq!(
            Label::parse("a.b").unwrap_err().to_string(),
            "label `a.b` contains `.`"
        );
        assert_eq!(Label::parse("").unwrap_err(), NameError::Empty);
        assert!(Label::parse("123").is_ok());
        assert!(Label::parse(&"a".repeat(63)).is_ok());
        assert!(Label::parse(&"a".repeat(64)).is_err());
        assert_eq!(
            Label::parse("x")
                .unwrap()
                .under(&dn("gw.example.com"))
                .unwrap()
                .as_str(),
            "x.gw.example.com"
        );
    }

    #[test]
    fn within_and_under_use_label_boundaries() {
        let gw = dn("gw.example.com");
        assert!(dn("gw.example.com").is_within(&gw));
        assert!(dn("a.gw.example.com").is_within(&gw));
        assert!(dn("a.b.gw.example.com").is_within(&gw));
        assert!(!dn("xgw.example.com").is_within(&gw));
        assert!(!dn("example.com").is_within(&gw));
        assert_eq!(
            name_under(&dn("A.gw.example.com"), &gw).unwrap().as_str(),
            "a"
        );
        assert_eq!(name_under(&dn("a.xgw.example.com"), &gw), None);
        assert_eq!(name_under(&dn("a.b.gw.example.com"), &gw), None);
        assert_eq!(name_under(&dn("gw.example.com"), &gw), None);
        assert_eq!(name_under(&dn("com"), &gw), None);
    }

    #[test]
    fn table_basics() {
        let mut t = NameTable::new();
        let gw = dn("gw.example.com");
        assert!(t.is_empty());
        assert_eq!(
            t.insert_name(gw.clone(), Label::parse("app").unwrap(), 1),
            None
        );
        assert_eq!(t.insert_fqdn(dn("shop.customer.io"), 2), None);
        assert_eq!(t.insert_fqdn(dn("app.gw.example.com"), 3), None);
        assert_eq!(
            t.insert_name(gw.clone(), Label::parse("api").unwrap(), 4),
            None
        );
        assert_eq!(t.len(), 4);
        // fqdn wins over the name route for the same host.
        assert_eq!(t.lookup(&dn("APP.gw.example.com")), Some(&3));
        assert_eq!(t.lookup(&dn("api.gw.example.com")), Some(&4));
        assert!(matches!(
            t.lookup_match(&dn("api.gw.example.com")),
            Some(RouteMatch::Name { label, .. }) if label.as_str() == "api"
        ));
        assert_eq!(t.lookup(&dn("shop.customer.io")), Some(&2));
        assert_eq!(t.lookup(&dn("x.shop.customer.io")), None);
        assert_eq!(t.lookup(&dn("gw.example.com")), None);
        assert_eq!(t.lookup(&dn("a.api.gw.example.com")), None);
        assert_eq!(t.remove_fqdn(&dn("app.gw.example.com")), Some(3));
        assert_eq!(t.lookup(&dn("app.gw.example.com")), Some(&1));
        assert_eq!(t.remove_name(&gw, &Label::parse("app").unwrap()), Some(1));
        assert_eq!(t.remove_name(&gw, &Label::parse("app").unwrap()), None);
        assert!(t.has_domain(&gw));
        assert_eq!(t.remove_name(&gw, &Label::parse("api").unwrap()), Some(4));
        assert!(!t.has_domain(&gw));
        assert_eq!(t.len(), 1);
        assert_eq!(t.fqdns().count(), 1);
        assert_eq!(t.names().count(), 0);
    }

    fn label_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?"
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(label_strategy(), 0..4),
            "[a-zA-Z][a-zA-Z0-9]{0,5}",
            any::<bool>(),
        )
            .prop_map(|(mut labels, tld, dot)| {
                labels.push(tld);
                let mut s = labels.join(".");
                if dot {
                    s.push('.');
                }
                s
            })
    }

    /// Small alphabet so that generated hosts often collide with routes.
    fn small_label() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "gw", "x-1", "com"]).prop_map(str::to_owned)
    }

    fn small_domain() -> impl Strategy<Value = String> {
        prop::collection::vec(small_label(), 1..4).prop_map(|v| v.join("."))
    }

    #[derive(Debug, Clone)]
    enum Entry {
        Fqdn(String),
        Name(String, String),
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            small_domain().prop_map(Entry::Fqdn),
            (small_domain(), small_label()).prop_map(|(d, l)| Entry::Name(d, l)),
        ]
    }

    proptest! {
        #[test]
        fn valid_names_roundtrip(s in name_strategy()) {
            let n = DomainName::parse(&s).unwrap();
            let expect = s.strip_suffix('.').unwrap_or(&s).to_ascii_lowercase();
            prop_assert_eq!(n.as_str(), expect.as_str());
            prop_assert_eq!(DomainName::parse(n.as_str()).unwrap(), n.clone());
            prop_assert_eq!(n.to_string().parse::<DomainName>().unwrap(), n.clone());
            prop_assert_eq!(n.labels().collect::<Vec<_>>().join("."), n.as_str());
        }

        #[test]
        fn valid_labels_roundtrip(s in label_strategy()) {
            let l = Label::parse(&s).unwrap();
            prop_assert_eq!(l.as_str(), s.to_ascii_lowercase());
            prop_assert_eq!(Label::parse(l.as_str()).unwrap(), l);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,300}", b in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(n) = DomainName::parse(&s) {
                prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
                prop_assert!(n.as_str().bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'));
                prop_assert_eq!(DomainName::parse(n.as_str()).unwrap(), n);
            }
            let _ = Label::parse(&s);
            let _ = DomainName::from_ascii(&b);
        }

        #[test]
        fn name_under_matches_string_oracle(host in small_domain(), domain in small_domain()) {
            let (h, d) = (dn(&host), dn(&domain));
            let got = name_under(&h, &d).map(|l| l.as_str().to_owned());
            let want = host
                .strip_suffix(domain.as_str())
                .and_then(|p| p.strip_suffix('.'))
                .filter(|l| !l.is_empty() && !l.contains('.'))
                .map(str::to_owned);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn lookup_equals_linear_scan(
            entries in prop::collection::vec((entry(), any::<u8>()), 0..20),
            hosts in prop::collection::vec(small_domain(), 1..20),
        ) {
            let mut table = NameTable::new();
            for (e, v) in &entries {
                match e {
                    Entry::Fqdn(f) => { table.insert_fqdn(dn(f), *v); }
                    Entry::Name(d, l) => { table.insert_name(dn(d), Label::parse(l).unwrap(), *v); }
                }
            }
            // Oracle: last write wins; exact fqdn first, then `label.domain` == host.
            let scan = |host: &str| -> Option<u8> {
                let fqdn = entries.iter().rev().find_map(|(e, v)| match e {
                    Entry::Fqdn(f) if f == host => Some(*v),
                    _ => None,
                });
                fqdn.or_else(|| entries.iter().rev().find_map(|(e, v)| match e {
                    Entry::Name(d, l) if format!("{l}.{d}") == host => Some(*v),
                    _ => None,
                }))
            };
            for h in &hosts {
                prop_assert_eq!(table.lookup(&dn(h)).copied(), scan(h), "host {}", h);
            }
            let distinct: std::collections::HashSet<String> = entries.iter().map(|(e, _)| match e {
                Entry::Fqdn(f) => format!("F {f}"),
                Entry::Name(d, l) => format!("N {l} {d}"),
            }).collect();
            prop_assert_eq!(table.len(), distinct.len());
        }
    }
}
