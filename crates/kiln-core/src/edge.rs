//! Routes on a shared listener (issue 26, `docs/design/007-edge.md`): many
//! services on one address, told apart by host (`app.example.com`,
//! `*.app.example.com`, or any) and path prefix (`/api`, kept or
//! stripped). The most specific route wins: an exact host over a wildcard,
//! a longer wildcard over a shorter one, any host last; then the longest
//! prefix, on segment boundaries (`/api` matches `/api` and `/api/x`,
//! never `/apix`). Two routes with the same host and prefix conflict, and
//! are refused naming both.
//!
//! Pure: the spec names a service's place with a [`RouteSpec`]; the spec
//! check and the agent refuse conflicts with [`check`]; the router builds
//! [`Routes`] once per table and looks a request up after its head is
//! parsed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Which hosts a route answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostPattern {
    /// `app.example.com`.
    Exact(String),
    /// `*.app.example.com`: any name below `app.example.com` (not itself),
    /// kept as its suffix `.app.example.com`.
    Wildcard(String),
    /// No `hosts`: any.
    Any,
}

/// Why a route's host or prefix was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "host `{0}` is not a host name (letters, digits, `-`, dots; `*.` only as its first label)"
    )]
    BadHost(String),
    #[error("path prefix `{0}` must start with `/` and hold no `?`, `#`, `//` or `..`")]
    BadPrefix(String),
    #[error("{https} serves HTTPS on {on} and {plain} plain HTTP: an address is one or the other")]
    MixedTls {
        https: String,
        plain: String,
        on: String,
    },
    #[error("{first} and {second} both route {host} {prefix}{on}")]
    Conflict {
        first: String,
        second: String,
        host: String,
        prefix: String,
        /// ` on ADDRESS`, when known.
        on: String,
    },
}

/// A host as requests name it: lower case, without a trailing dot or a
/// port (`Example.COM.:443` → `example.com`); `None` when it is not a host
/// name.
pub fn normalize_host(authority: &str) -> Option<String> {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    crate::names::is_host_name(&host).then_some(host)
}

impl HostPattern {
    /// `app.example.com`, `*.app.example.com`; any case, a trailing dot.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let bad = || RouteError::BadHost(s.to_owned());
        match s.strip_prefix("*.") {
            Some(rest) => {
                let name = normalize_host(rest)
                    .filter(|n| n.as_str() != "")
                    .ok_or_else(bad)?;
                if rest.contains(':') {
                    return Err(bad());
                }
                Ok(Self::Wildcard(format!(".{name}")))
            }
            None if s.contains(':') => Err(bad()),
            None => normalize_host(s).map(Self::Exact).ok_or_else(bad),
        }
    }

    /// Whether it answers `host` (normalized: it never starts with a dot,
    /// so a wildcard's suffix never matches the name itself).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Wildcard(suffix) => host.ends_with(suffix.as_str()),
            Self::Any => true,
        }
    }
}

impl TryFrom<String> for HostPattern {
    type Error = RouteError;
    fn try_from(s: String) -> Result<Self, RouteError> {
        Self::parse(&s)
    }
}

impl From<HostPattern> for String {
    /// As a spec writes it.
    fn from(h: HostPattern) -> String {
        match h {
            HostPattern::Exact(h) => h,
            HostPattern::Wildcard(s) => format!("*{s}"),
            HostPattern::Any => "*".to_owned(),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(h) => write!(f, "host {h}"),
            Self::Wildcard(s) => write!(f, "host *{s}"),
            Self::Any => f.write_str("any host"),
        }
    }
}

/// A path prefix: `/` (everything) or `/seg/seg` without a trailing slash.
pub fn parse_prefix(s: &str) -> Result<String, RouteError> {
    let bad = || RouteError::BadPrefix(s.to_owned());
    if !s.starts_with('/') || s.contains(['?', '#']) || s.contains("//") {
        return Err(bad());
    }
    if s.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(bad());
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// A `path_prefix` as the spec gives it, checked by [`parse_prefix`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = RouteError;
    fn try_from(s: String) -> Result<Self, RouteError> {
        parse_prefix(&s).map(Self)
    }
}

impl From<PathPrefix> for String {
    fn from(p: PathPrefix) -> String {
        p.0
    }
}

/// Where a service attaches on its `listen` address: a service's settings
/// (`hosts`, `path_prefix`, `strip_prefix`), changed without a release.
/// The default (no key) is every host and every path: `listen` alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<PathPrefix>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_prefix: bool,
    /// The peers whose word on the client's address is taken (the load
    /// balancers in front): `10.0.0.0/8`, `192.0.2.7`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// A connection from a trusted proxy begins with a PROXY protocol
    /// header (v1 or v2) naming the client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

impl RouteSpec {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// A service's own mistakes: a host twice, `strip_prefix` with nothing
    /// to strip.
    pub fn check(&self) -> Result<(), String> {
        for (i, h) in self.hosts.iter().enumerate() {
            if self.hosts[..i].contains(h) {
                return Err(format!("hosts lists {h} twice"));
            }
        }
        if self.strip_prefix && self.prefix() == "/" {
            return Err("strip_prefix needs a path_prefix other than /".to_owned());
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            return Err("proxy_protocol needs trusted_proxies: the load balancers whose PROXY header is believed".to_owned());
        }
        Ok(())
    }

    fn prefix(&self) -> &str {
        self.path_prefix.as_ref().map_or("/", PathPrefix::as_str)
    }

    /// Its routes, one per host, each answered by `target`.
    pub fn routes<T: Clone>(&self, target: T) -> Vec<Route<T>> {
        let any = [HostPattern::Any];
        let hosts = if self.hosts.is_empty() {
            &any[..]
        } else {
            &self.hosts[..]
        };
        hosts
            .iter()
            .map(|h| Route {
                host: h.clone(),
                prefix: self.prefix().to_owned(),
                strip: self.strip_prefix,
                target: target.clone(),
            })
            .collect()
    }
}

impl std::fmt::Display for RouteSpec {
    /// `app.example.com,*.app.example.com/api (stripped)`; `*/` for all.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hosts.is_empty() {
            f.write_str("*")?;
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&String::from(h.clone()))?;
        }
        f.write_str(self.prefix())?;
        if self.strip_prefix {
            f.write_str(" (stripped)")?;
        }
        if !self.trusted_proxies.is_empty() {
            let from: Vec<String> = self.trusted_proxies.iter().map(|c| c.to_string()).collect();
            let how = if self.proxy_protocol {
                "PROXY protocol from"
            } else {
                "trusting"
            };
            write!(f, " ({how} {})", from.join(", "))?;
        }
        Ok(())
    }
}

/// The first two routes with the same host and prefix.
fn first_conflict<'r, T: std::fmt::Display + 'r>(
    routes: impl IntoIterator<Item = &'r Route<T>>,
    on: String,
) -> Result<(), RouteError> {
    let mut seen: HashMap<(&HostPattern, &str), &T> = HashMap::new();
    for r in routes {
        if let Some(first) = seen.insert((&r.host, r.prefix.as_str()), &r.target) {
            return Err(RouteError::Conflict {
                first: first.to_string(),
                second: r.target.to_string(),
                host: r.host.to_string(),
                prefix: r.prefix.clone(),
                on,
            });
        }
    }
    Ok(())
}

/// Refuse two routes with the same host and prefix on one address (the
/// spec's check, and the agent's across every service it runs), naming
/// both and the address.
pub fn check<A: Ord + std::fmt::Display, T: std::fmt::Display>(
    routes: impl IntoIterator<Item = (A, Route<T>)>,
) -> Result<(), RouteError> {
    let mut by_addr: BTreeMap<A, Vec<Route<T>>> = BTreeMap::new();
    for (a, r) in routes {
        by_addr.entry(a).or_default().push(r);
    }
    for (a, list) in &by_addr {
        first_conflict(list, format!(" on {a}"))?;
    }
    Ok(())
}

/// Refuse an address where one service serves HTTPS and another plain
/// HTTP (a listener is one or the other), naming both.
pub fn check_tls<A: Ord + std::fmt::Display, T: std::fmt::Display>(
    items: impl IntoIterator<Item = (A, T, bool)>,
) -> Result<(), RouteError> {
    let mut first: BTreeMap<A, (T, bool)> = BTreeMap::new();
    for (a, t, tls) in items {
        match first.get(&a) {
            Some((other, was)) if *was != tls => {
                let (https, plain) = if tls {
                    (t.to_string(), other.to_string())
                } else {
                    (other.to_string(), t.to_string())
                };
                return Err(RouteError::MixedTls {
                    https,
                    plain,
                    on: a.to_string(),
                });
            }
            Some(_) => {}
            None => {
                first.insert(a, (t, tls));
            }
        }
    }
    Ok(())
}

/// Whether a request path holds a `.` or `..` segment (also written
/// `%2e`): on a listener with path routes such a path is refused, so that
/// `/public/../api` can never reach the service of `/public` and be read as
/// `/api` by it (routing is on the path as sent, as HAProxy's `path_beg`).
pub fn has_dot_segment(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.split('/').any(|seg| {
        let mut rest = seg;
        let mut dots = 0;
        loop {
            if let Some(r) = rest.strip_prefix('.') {
                rest = r;
            } else if let Some(r) = rest
                .get(..3)
                .filter(|p| p.eq_ignore_ascii_case("%2e"))
                .map(|_| &rest[3..])
            {
                rest = r;
            } else {
                break;
            }
            dots += 1;
        }
        rest.is_empty() && (dots == 1 || dots == 2)
    })
}

/// Whether `path` (a request's, query included or not) is under `prefix`.
fn under(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with(['/', '?']),
        None => false,
    }
}

/// One route of a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route<T> {
    pub host: HostPattern,
    /// From [`parse_prefix`].
    pub prefix: String,
    /// The instance sees the path without the prefix (`/api/x` → `/x`).
    pub strip: bool,
    /// Who answers it (a service), and how it is named in errors.
    pub target: T,
}

/// What a request was routed to.
#[derive(Debug, PartialEq, Eq)]
pub struct Found<'a, 'p, T> {
    pub target: &'a T,
    /// The path the instance gets (borrowed when it is the request's).
    pub path: Cow<'p, str>,
    /// The prefix taken off the path, when the route strips it.
    pub stripped: Option<&'a str>,
}

/// A listener's routes, ready for lookups.
#[derive(Debug)]
pub struct Routes<T> {
    exact: HashMap<String, Vec<Route<T>>>,
    /// Longest suffix first, each list longest prefix first.
    wildcards: Vec<(String, Vec<Route<T>>)>,
    any: Vec<Route<T>>,
    /// Whether any route has a prefix other than `/` (asked per request).
    by_path: bool,
}

impl<T: std::fmt::Display> Routes<T> {
    /// The routes of one listener; two with the same host and prefix are
    /// refused, naming both.
    pub fn build(routes: Vec<Route<T>>) -> Result<Self, RouteError> {
        first_conflict(&routes, String::new())?;
        let mut exact: HashMap<String, Vec<Route<T>>> = HashMap::new();
        let mut wild: HashMap<String, Vec<Route<T>>> = HashMap::new();
        let mut any = Vec::new();
        for r in routes {
            match &r.host {
                HostPattern::Exact(h) => exact.entry(h.clone()).or_default().push(r),
                HostPattern::Wildcard(s) => wild.entry(s.clone()).or_default().push(r),
                HostPattern::Any => any.push(r),
            }
        }
        let longest_first =
            |v: &mut Vec<Route<T>>| v.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        exact.values_mut().for_each(longest_first);
        longest_first(&mut any);
        let mut wildcards: Vec<(String, Vec<Route<T>>)> = wild.into_iter().collect();
        for (_, v) in &mut wildcards {
            longest_first(v);
        }
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let prefixed = |l: &Vec<Route<T>>| l.iter().any(|r| r.prefix != "/");
        let by_path = exact.values().any(prefixed)
            || wildcards.iter().any(|(_, l)| prefixed(l))
            || prefixed(&any);
        Ok(Self {
            exact,
            wildcards,
            any,
            by_path,
        })
    }
}

impl<T> Routes<T> {
    /// Whether any route names a host: if not, a request's host need not
    /// even be read.
    pub fn by_host(&self) -> bool {
        !self.exact.is_empty() || !self.wildcards.is_empty()
    }

    /// Whether any route has a prefix other than `/`.
    pub fn by_path(&self) -> bool {
        self.by_path
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Route<T>> {
        self.exact
            .values()
            .chain(self.wildcards.iter().map(|(_, l)| l))
            .chain(std::iter::once(&self.any))
            .flatten()
    }

    /// The route of a request for `host` (normalized) and `path` (from its
    /// target, starting with `/`): the most specific host that has a
    /// prefix covering the path, then its longest such prefix.
    pub fn lookup<'p>(&self, host: &str, path: &'p str) -> Option<Found<'_, 'p, T>> {
        fn first<'r, T>(list: &'r [Route<T>], path: &str) -> Option<&'r Route<T>> {
            list.iter().find(|r| under(&r.prefix, path))
        }
        let route = self
            .exact
            .get(host)
            .and_then(|l| first(l, path))
            .or_else(|| {
                self.wildcards
                    .iter()
                    .filter(|(suffix, _)| host.ends_with(suffix.as_str()))
                    .find_map(|(_, l)| first(l, path))
            })
            .or_else(|| first(&self.any, path))?;
        let stripped = (route.strip && route.prefix != "/").then_some(route.prefix.as_str());
        let path = match stripped {
            Some(prefix) => {
                let rest = &path[prefix.len()..];
                if rest.starts_with('/') {
                    Cow::Borrowed(rest)
                } else {
                    Cow::Owned(format!("/{rest}"))
                }
            }
            None => Cow::Borrowed(path),
        };
        Some(Found {
            target: &route.target,
            path,
            stripped,
        })
    }
}

/// The reference the property test holds [`Routes::lookup`] to: every
/// route that matches, the most specific by (host rank, prefix length).
#[cfg(test)]
fn reference<'a, T>(routes: &'a [Route<T>], host: &str, path: &str) -> Option<&'a Route<T>> {
    routes
        .iter()
        .filter(|r| r.host.matches(host) && under(&r.prefix, path))
        .max_by_key(|r| {
            // Exact first, then wildcards by length, any host last.
            let rank = match &r.host {
                HostPattern::Exact(_) => (2, 0),
                HostPattern::Wildcard(s) => (1, s.len()),
                HostPattern::Any => (0, 0),
            };
            (rank, r.prefix.len())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(host: &str, prefix: &str, strip: bool, target: &str) -> Route<String> {
        Route {
            host: if host.is_empty() {
                HostPattern::Any
            } else {
                HostPattern::parse(host).unwrap()
            },
            prefix: parse_prefix(prefix).unwrap(),
            strip,
            target: target.to_owned(),
        }
    }

    #[test]
    fn hosts_are_read_as_requests_name_them() {
        assert_eq!(normalize_host("Example.COM"), Some("example.com".into()));
        assert_eq!(
            normalize_host("example.com.:8443"),
            Some("example.com".into())
        );
        assert_eq!(normalize_host("a-b.c1"), Some("a-b.c1".into()));
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "a_b.com",
            "[::1]:80",
            "é.com",
            "a:b:c",
            "a.com:http",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad}");
        }
        assert_eq!(normalize_host(&format!("{}.com", "a".repeat(64))), None);
        assert!(normalize_host(&format!("{}.com", "a".repeat(63))).is_some());
        let long = vec!["a".repeat(50); 5].join(".");
        assert_eq!(long.len(), 254);
        assert_eq!(normalize_host(&long), None);
        assert!(normalize_host(long[..253].trim_end_matches('.')).is_some());
        assert_eq!(
            HostPattern::parse("*.App.example.com"),
            Ok(HostPattern::Wildcard(".app.example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("app.example.com."),
            Ok(HostPattern::Exact("app.example.com".into()))
        );
        for bad in ["*", "*.", "a.*.com", "**.a", "a.com:80", "*.a.com:80", ""] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_are_paths_on_segment_boundaries() {
        assert_eq!(parse_prefix("/api/"), Ok("/api".into()));
        assert_eq!(parse_prefix("/"), Ok("/".into()));
        assert_eq!(parse_prefix("/a/b"), Ok("/a/b".into()));
        for bad in ["api", "/a?x", "/a#x", "//a", "/a/../b", "/./a", ""] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        assert!(under("/api", "/api"));
        assert!(under("/api", "/api/x"));
        assert!(under("/api", "/api?q=1"));
        assert!(!under("/api", "/apix"));
        assert!(!under("/api", "/"));
        assert!(under("/", "/anything"));
    }

    #[test]
    fn the_most_specific_route_wins_and_strips_its_prefix() {
        let routes = Routes::build(vec![
            route("", "/", false, "catch-all"),
            route("app.example.com", "/", false, "app"),
            route("app.example.com", "/api", true, "api"),
            route("*.example.com", "/", false, "tenants"),
            route("*.eu.example.com", "/", false, "eu"),
        ])
        .unwrap();
        let at = |h: &str, p: &str| {
            routes
                .lookup(h, p)
                .map(|f| (f.target.clone(), f.path.into_owned()))
                .unwrap()
        };
        assert_eq!(at("app.example.com", "/"), ("app".into(), "/".into()));
        assert_eq!(at("app.example.com", "/api"), ("api".into(), "/".into()));
        assert_eq!(
            at("app.example.com", "/api/v1?x=1"),
            ("api".into(), "/v1?x=1".into())
        );
        assert_eq!(
            at("app.example.com", "/api?x=1"),
            ("api".into(), "/?x=1".into())
        );
        assert_eq!(
            routes
                .lookup("app.example.com", "/api/v1")
                .unwrap()
                .stripped,
            Some("/api")
        );
        assert_eq!(
            routes.lookup("app.example.com", "/v1").unwrap().stripped,
            None
        );
        assert_eq!(
            at("app.example.com", "/apix"),
            ("app".into(), "/apix".into())
        );
        assert_eq!(at("a.example.com", "/x"), ("tenants".into(), "/x".into()));
        assert_eq!(at("a.eu.example.com", "/x"), ("eu".into(), "/x".into()));
        // A wildcard is for the names below it, not the name itself.
        assert_eq!(at("example.com", "/"), ("catch-all".into(), "/".into()));
        assert_eq!(at("other.org", "/z"), ("catch-all".into(), "/z".into()));
        // A host whose own routes do not cover the path falls through.
        let narrow = Routes::build(vec![
            route("app.example.com", "/api", false, "api"),
            route("", "/", false, "rest"),
        ])
        .unwrap();
        // Kept when not asked to strip.
        assert_eq!(
            narrow.lookup("app.example.com", "/api/v1").map(|f| f.path),
            Some("/api/v1".into())
        );
        // A long host that does not end with a wildcard's name.
        assert_eq!(
            routes
                .lookup("example.company.org", "/")
                .map(|f| f.target.clone()),
            Some("catch-all".into())
        );
        assert_eq!(
            narrow
                .lookup("app.example.com", "/web")
                .map(|f| f.target.clone()),
            Some("rest".into())
        );
        let none = Routes::build(vec![route("app.example.com", "/", false, "app")]).unwrap();
        assert!(none.lookup("else.example.com", "/").is_none());
    }

    #[test]
    fn the_same_host_and_prefix_twice_is_refused_naming_both() {
        let err = Routes::build(vec![
            route("app.example.com", "/api", false, "service web"),
            route("App.Example.com.", "/api/", true, "service api"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service web and service api both route host app.example.com /api"
        );
        assert!(
            Routes::build(vec![
                route("app.example.com", "/api", false, "a"),
                route("*.example.com", "/api", false, "b"),
                route("", "/api", false, "c"),
            ])
            .is_ok()
        );
    }

    #[derive(Deserialize)]
    struct Svc {
        #[serde(flatten)]
        route: RouteSpec,
    }

    fn spec(toml_text: &str) -> Result<RouteSpec, String> {
        toml::from_str::<Svc>(toml_text)
            .map(|s| s.route)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn a_route_spec_is_read_checked_and_shown_as_written() {
        let r = spec("hosts = [\"App.example.com\", \"*.app.example.com\"]\npath_prefix = \"/api/\"\nstrip_prefix = true\n").unwrap();
        assert_eq!(
            r.to_string(),
            "app.example.com,*.app.example.com/api (stripped)"
        );
        assert_eq!(r.check(), Ok(()));
        assert!(!r.is_default());
        let routes = r.routes("web");
        assert_eq!(routes.len(), 2);
        assert!(
            routes
                .iter()
                .all(|x| x.prefix == "/api" && x.strip && x.target == "web")
        );
        assert_eq!(
            routes[1].host,
            HostPattern::Wildcard(".app.example.com".into())
        );
        // Written back as the spec had it (normalized), and read again.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"hosts":["app.example.com","*.app.example.com"],"path_prefix":"/api","strip_prefix":true}"#
        );
        assert_eq!(serde_json::from_str::<RouteSpec>(&json).unwrap(), r);
        // None of the keys: every host and path, as `listen` alone.
        let all = spec("").unwrap();
        assert!(all.is_default());
        assert_eq!(all.to_string(), "*/");
        assert_eq!(serde_json::to_string(&all).unwrap(), "{}");
        let one = all.routes(1u8);
        assert_eq!(
            (
                one.len(),
                &one[0].host,
                one[0].prefix.as_str(),
                one[0].strip
            ),
            (1, &HostPattern::Any, "/", false)
        );
        // Bad values name themselves.
        assert!(
            spec("hosts = [\"a b\"]")
                .unwrap_err()
                .contains("host `a b` is not a host name")
        );
        assert!(
            spec("path_prefix = \"api\"")
                .unwrap_err()
                .contains("path prefix `api`")
        );
        assert!(spec("hosts = [\"*\"]").is_err());
        // A service's own mistakes.
        let twice = spec("hosts = [\"a.com\", \"A.com\"]").unwrap();
        assert_eq!(
            twice.check(),
            Err("hosts lists host a.com twice".to_owned())
        );
        for bad in [
            "strip_prefix = true",
            "strip_prefix = true\npath_prefix = \"/\"",
        ] {
            assert_eq!(
                spec(bad).unwrap().check(),
                Err("strip_prefix needs a path_prefix other than /".to_owned()),
                "{bad}"
            );
        }
        assert_eq!(spec("path_prefix = \"/\"").unwrap().check(), Ok(()));
    }

    #[test]
    fn a_conflict_is_refused_per_address_naming_both_services_and_the_address() {
        let web = spec("hosts = [\"a.com\"]").unwrap();
        let api = spec("hosts = [\"b.com\", \"a.com\"]").unwrap();
        let other = spec("").unwrap();
        let on = |addr: &'static str, r: &RouteSpec, name: &'static str| {
            r.routes(format!("service {name}"))
                .into_iter()
                .map(move |x| (addr, x))
        };
        let err = check(on(":80", &web, "web").chain(on(":80", &api, "api"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service web and service api both route host a.com / on :80"
        );
        // Apart on two addresses, or on different hosts: no conflict.
        assert_eq!(
            check(on(":80", &web, "web").chain(on(":81", &api, "api"))),
            Ok(())
        );
        assert_eq!(
            check(on(":80", &web, "web").chain(on(":80", &other, "rest"))),
            Ok(())
        );
        let err = check(on(":80", &other, "a").chain(on(":80", &other, "b"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service a and service b both route any host / on :80"
        );
    }

    #[test]
    fn an_address_serves_https_or_plain_http_never_both() {
        assert_eq!(
            check_tls([
                (":443", "a", true),
                (":443", "b", true),
                (":80", "c", false)
            ]),
            Ok(())
        );
        let err = check_tls([
            (":443", "a", true),
            (":80", "c", false),
            (":443", "b", false),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a serves HTTPS on :443 and b plain HTTP: an address is one or the other"
        );
        let err = check_tls([(":443", "b", false), (":443", "a", true)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a serves HTTPS on :443 and b plain HTTP: an address is one or the other"
        );
    }

    #[test]
    fn dot_segments_are_found_however_written() {
        for dotted in [
            "/a/../b",
            "/..",
            "/.",
            "/a/./b",
            "/a/%2e%2E/b",
            "/%2e",
            "/a/..?x",
            "/a/.%2e/",
        ] {
            assert!(has_dot_segment(dotted), "{dotted}");
        }
        for clean in [
            "/",
            "/a/b",
            "/a/.../b",
            "/.well-known/x",
            "/a..b",
            "/a?x=/../",
            "/%2ex",
            "*",
        ] {
            assert!(!has_dot_segment(clean), "{clean}");
        }
    }

    #[test]
    fn a_listener_knows_whether_it_routes_by_host_or_by_path() {
        let all = Routes::build(vec![route("", "/", false, "a")]).unwrap();
        assert!(!all.by_host() && !all.by_path());
        let hosts = Routes::build(vec![route("*.x.com", "/", false, "a")]).unwrap();
        assert!(hosts.by_host() && !hosts.by_path());
        let exact = Routes::build(vec![route("x.com", "/", false, "a")]).unwrap();
        assert!(exact.by_host() && !exact.by_path());
        for r in [
            route("", "/api", false, "a"),
            route("x.com", "/api", false, "a"),
            route("*.x.com", "/api", false, "a"),
        ] {
            assert!(Routes::build(vec![r.clone()]).unwrap().by_path(), "{r:?}");
        }
        let mixed = Routes::build(vec![
            route("x.com", "/", false, "a"),
            route("*.x.com", "/b", false, "b"),
            route("", "/", false, "c"),
        ])
        .unwrap();
        let mut targets: Vec<&String> = mixed.iter().map(|r| &r.target).collect();
        targets.sort();
        assert_eq!(targets, ["a", "b", "c"]);
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a.x.com".to_owned()),
            Just("b.x.com".to_owned()),
            Just("c.a.x.com".to_owned()),
            Just("x.com".to_owned()),
            Just("y.org".to_owned()),
        ]
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("a.x.com".to_owned()),
            Just("x.com".to_owned()),
            Just("*.x.com".to_owned()),
            Just("*.a.x.com".to_owned()),
        ]
    }

    fn prefix_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/".to_owned()),
            Just("/a".to_owned()),
            Just("/a/b".to_owned()),
            Just("/ab".to_owned()),
            Just("/b".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn lookup_is_the_most_specific_matching_route(
            specs in proptest::collection::vec((pattern_strategy(), prefix_strategy(), any::<bool>()), 0..8),
            host in host_strategy(),
            path in prop_oneof![Just("/"), Just("/a"), Just("/a/b/c"), Just("/ab"), Just("/abc"), Just("/b?x")],
        ) {
            // Conflicts are refused; keep the first of each (host, prefix).
            let mut seen = std::collections::HashSet::new();
            let list: Vec<Route<String>> = specs
                .iter()
                .enumerate()
                .filter(|(_, (h, p, _))| seen.insert((h.to_ascii_lowercase(), p.clone())))
                .map(|(i, (h, p, s))| route(h, p, *s, &format!("r{i}")))
                .collect();
            let routes = Routes::build(list.clone()).unwrap();
            let got = routes.lookup(&host, path).map(|f| f.target.clone());
            let want = reference(&list, &host, path).map(|r| r.target.clone());
            prop_assert_eq!(got, want);
        }
    }
}
