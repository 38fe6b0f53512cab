//! Routes on a shared listener (issue 26, `docs/design/007-edge.md`): many
//! services on one address, told apart by host (`app.example.com`,
//! `*.app.example.com`, or any) and path prefix (`/api`, kept or
//! stripped). The most specific route wins: an exact host over a wildcard,
//! a longer wildcard over a shorter one, any host last; then the longest
//! prefix, on segment boundaries (`/api` matches `/api` and `/api/x`,
//! never `/apix`). Two routes with the same host and prefix conflict, and
//! are refused naming both.
//!
//! Pure: the router builds [`Routes`] once per table and looks a request
//! up after its head is parsed. Not wired into the router or the spec yet.

use std::collections::HashMap;

/// Which hosts a route answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    #[error("{first} and {second} both route {host} {prefix}")]
    Conflict {
        first: String,
        second: String,
        host: String,
        prefix: String,
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
pub struct Found<'a, T> {
    pub target: &'a T,
    /// The path the instance gets.
    pub path: String,
}

/// A listener's routes, ready for lookups.
#[derive(Debug)]
pub struct Routes<T> {
    exact: HashMap<String, Vec<Route<T>>>,
    /// Longest suffix first, each list longest prefix first.
    wildcards: Vec<(String, Vec<Route<T>>)>,
    any: Vec<Route<T>>,
}

impl<T: std::fmt::Display> Routes<T> {
    /// The routes of one listener; two with the same host and prefix are
    /// refused, naming both.
    pub fn build(routes: Vec<Route<T>>) -> Result<Self, RouteError> {
        let mut seen: HashMap<(HostPattern, String), String> = HashMap::new();
        for r in &routes {
            if let Some(first) =
                seen.insert((r.host.clone(), r.prefix.clone()), r.target.to_string())
            {
                return Err(RouteError::Conflict {
                    first,
                    second: r.target.to_string(),
                    host: r.host.to_string(),
                    prefix: r.prefix.clone(),
                });
            }
        }
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
        Ok(Self {
            exact,
            wildcards,
            any,
        })
    }
}

impl<T> Routes<T> {
    /// The route of a request for `host` (normalized) and `path` (from its
    /// target, starting with `/`): the most specific host that has a
    /// prefix covering the path, then its longest such prefix.
    pub fn lookup(&self, host: &str, path: &str) -> Option<Found<'_, T>> {
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
        let path = if route.strip && route.prefix != "/" {
            let rest = &path[route.prefix.len()..];
            if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            }
        } else {
            path.to_owned()
        };
        Some(Found {
            target: &route.target,
            path,
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
                .map(|f| (f.target.clone(), f.path))
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
