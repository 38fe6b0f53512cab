//! Remote access, decided: roles, API tokens, which role each endpoint
//! needs, how long a caller that keeps failing waits, and the values a
//! dashboard form carries against cross-site request forgery. The agent
//! executes these; nothing here does I/O, reads a clock or draws a random
//! number (the token's secret and `now` are passed in).
//!
//! A token reads `kiln.NAME.SECRET`: the name says which record to compare
//! against (so a check is one lookup and one constant-time comparison), the
//! secret is 32 random bytes in unpadded base64url. Only the token's
//! SHA-256 is stored: a token can be shown once and never again.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::hex;

/// What a caller may do. Each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads: status, history, logs, events, metrics, images.
    Viewer,
    /// Also changes what runs: apply, rollback, promote, abort, remove,
    /// and pushes images.
    Deployer,
    /// Also manages tokens and runs gc.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Deployer => "deployer",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}` (viewer, deployer or admin)"))
    }
}

/// A token's name: 1 to 32 of `a-z 0-9 - _`, starting with a letter or a
/// digit. Fixed-size so that an [`crate::event::Actor`] naming it stays
/// `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenName {
    bytes: [u8; TokenName::MAX],
    len: u8,
}

impl TokenName {
    pub const MAX: usize = 32;

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `try_from`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl TryFrom<&str> for TokenName {
    type Error = String;
    fn try_from(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'))
            && s.as_bytes()[0].is_ascii_alphanumeric();
        if !ok {
            return Err(format!(
                "invalid token name `{}`: 1 to {} of a-z, 0-9, - and _, starting with a letter or digit",
                s.escape_debug(),
                Self::MAX
            ));
        }
        let mut bytes = [0; Self::MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Self {
            bytes,
            len: s.len() as u8,
        })
    }
}

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenName({})", self.as_str())
    }
}

impl Serialize for TokenName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TokenName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::try_from(s.as_str()).map_err(serde::de::Error::custom)
    }
}

/// What the agent keeps of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: TokenName,
    pub role: Role,
    /// Lowercase hex SHA-256 of the whole token.
    pub hash: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; `None`: never.
    pub expires: Option<u64>,
}

/// A token made from its name and 32 random bytes.
pub fn make_token(name: TokenName, secret: &[u8; 32]) -> String {
    use base64::Engine as _;
    format!(
        "kiln.{name}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// The name a presented token claims, if it has a token's shape at all.
pub fn token_name(token: &str) -> Option<TokenName> {
    let rest = token.strip_prefix("kiln.")?;
    let (name, secret) = rest.split_once('.')?;
    (secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then_some(())?;
    TokenName::try_from(name).ok()
}

/// Lowercase hex SHA-256 of a token: what is stored.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Why a presented token does not authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, a malformed one, an unknown or revoked name, a wrong secret.
    /// One kind for all of them: a caller learns nothing about which.
    Invalid,
    Expired,
}

/// Check a presented token against the record its name points at, in
/// constant time over the hash.
pub fn check_token(token: &str, record: Option<&TokenRecord>, now: u64) -> Result<Role, Refusal> {
    let record = record.ok_or(Refusal::Invalid)?;
    if !constant_time_eq(token_hash(token).as_bytes(), record.hash.as_bytes()) {
        return Err(Refusal::Invalid);
    }
    match record.expires {
        Some(at) if now >= at => Err(Refusal::Expired),
        _ => Ok(record.role),
    }
}

/// Equal bytes, compared without an early exit (the time taken does not
/// say where two values first differ).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request may be answered with, before its token is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// An endpoint the role reaches.
    Needs(Role),
    /// The sign-in page and its form: open to everyone (it checks the token
    /// it is given).
    Open,
    /// Not part of the API: 404 whoever asks.
    Unknown,
}

/// The role each endpoint needs: one table, so that an endpoint cannot be
/// added without deciding who may call it.
pub fn route(method: &str, path: &str) -> Route {
    let read = matches!(method, "GET" | "HEAD");
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["login"] if read || method == "POST" => Route::Open,
        ["logout"] if method == "POST" => Route::Open,
        // The sign-in page's own stylesheet (public, fixed content).
        ["ui", "style.css"] if read => Route::Open,
        [""] | ["ui", ..] if read => Route::Needs(Role::Viewer),
        [
            "v1",
            "status" | "logs" | "metrics" | "audit" | "drift" | "nodes",
        ] if read => Route::Needs(Role::Viewer),
        ["v1", "whoami"] if read => Route::Needs(Role::Viewer),
        ["v1", "services", _, "history"] if read => Route::Needs(Role::Viewer),
        ["v1", "apply" | "records"] if method == "POST" => Route::Needs(Role::Deployer),
        [
            "v1",
            "services",
            _,
            "rollback" | "promote" | "abort" | "remove" | "run" | "pause" | "resume",
        ] if method == "POST" => Route::Needs(Role::Deployer),
        // Inside a running instance: a deployer's (keeping it afterwards,
        // an admin's: checked by the handler).
        ["v1", "instances", _, "exec"] if method == "POST" => Route::Needs(Role::Deployer),
        ["v1", "tokens"] if read || method == "POST" => Route::Needs(Role::Admin),
        ["v1", "tokens", _, "revoke"] if method == "POST" => Route::Needs(Role::Admin),
        ["v1", "gc"] if method == "POST" => Route::Needs(Role::Admin),
        // Moving every instance off a node is the operator's.
        ["v1", "nodes", _, "drain" | "undrain"] if method == "POST" => Route::Needs(Role::Admin),
        // The OCI distribution endpoint: reads for viewers, uploads for
        // deployers; nothing is ever deleted through it.
        ["v2", ..] if read => Route::Needs(Role::Viewer),
        ["v2", _, ..] if matches!(method, "POST" | "PUT" | "PATCH") => Route::Needs(Role::Deployer),
        _ => Route::Unknown,
    }
}

/// How long the answer to a bad token waits, given the failures from the
/// same address before it: nothing for the first few (a typo), then
/// doubling from a quarter second to five seconds. A valid token forgets
/// the address's failures.
pub fn failure_delay(recent_failures: u32) -> Duration {
    const FREE: u32 = 3;
    match recent_failures.checked_sub(FREE) {
        None => Duration::ZERO,
        Some(n) => {
            Duration::from_millis(250u64.saturating_mul(1 << n.min(5))).min(Duration::from_secs(5))
        }
    }
}

/// How long failures are remembered for an address.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// The value a dashboard form must carry with a token sent as a cookie:
/// an HMAC of the token under the agent's key. A page of another site can
/// make the browser send the cookie, but cannot read this value.
pub fn csrf_value(key: &[u8], token: &str) -> String {
    let mut mac = match hmac::Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(b"kiln csrf v1\0");
    mac.update(token.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// A certificate's fingerprint as kiln prints and pins it:
/// `sha256:` and the lowercase hex SHA-256 of its DER.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> TokenName {
        TokenName::try_from(s).unwrap()
    }

    fn record(token: &str, role: Role, expires: Option<u64>) -> TokenRecord {
        TokenRecord {
            name: token_name(token).unwrap(),
            role,
            hash: token_hash(token),
            created: 0,
            expires,
        }
    }

    #[test]
    fn a_token_names_itself_and_checks_only_against_its_own_hash() {
        let t = make_token(name("ci"), &[7; 32]);
        assert!(t.starts_with("kiln.ci."), "{t}");
        assert_eq!(token_name(&t), Some(name("ci")));
        let r = record(&t, Role::Deployer, None);
        assert_eq!(check_token(&t, Some(&r), 10), Ok(Role::Deployer));
        let other = make_token(name("ci"), &[8; 32]);
        assert_eq!(check_token(&other, Some(&r), 10), Err(Refusal::Invalid));
        assert_eq!(check_token(&t, None, 10), Err(Refusal::Invalid));
    }

    #[test]
    fn an_expired_token_is_refused_from_its_expiry_on() {
        let t = make_token(name("a"), &[1; 32]);
        let r = record(&t, Role::Admin, Some(100));
        assert_eq!(check_token(&t, Some(&r), 99), Ok(Role::Admin));
        assert_eq!(check_token(&t, Some(&r), 100), Err(Refusal::Expired));
    }

    #[test]
    fn malformed_tokens_have_no_name() {
        for t in [
            "",
            "kiln.",
            "kiln.ci",
            "kiln.ci.short",
            "bearer kiln.ci.x",
            "kiln..AAAA",
        ] {
            assert_eq!(token_name(t), None, "{t}");
        }
        let long = format!("kiln.{}.{}", "a".repeat(33), "A".repeat(43));
        assert_eq!(token_name(&long), None);
    }

    #[test]
    fn token_names_are_checked() {
        for bad in ["", "-x", "A", "a.b", "a b", &"a".repeat(33)] {
            assert!(TokenName::try_from(bad).is_err(), "{bad}");
        }
        assert_eq!(name("ci-deploy_2").as_str(), "ci-deploy_2");
    }

    #[test]
    fn every_endpoint_needs_the_role_the_issue_gives_it() {
        use Route::*;
        let table = [
            ("GET", "/v1/status", Needs(Role::Viewer)),
            ("GET", "/v1/services/web/history", Needs(Role::Viewer)),
            ("GET", "/v1/logs", Needs(Role::Viewer)),
            // No such endpoint (the ledger is `/v1/audit`).
            ("GET", "/v1/events", Unknown),
            ("GET", "/v1/audit", Needs(Role::Viewer)),
            ("GET", "/v1/drift", Needs(Role::Viewer)),
            ("POST", "/v1/drift", Unknown),
            ("POST", "/v1/audit", Unknown),
            ("GET", "/", Needs(Role::Viewer)),
            ("GET", "/ui/events", Needs(Role::Viewer)),
            ("POST", "/v1/apply", Needs(Role::Deployer)),
            ("POST", "/v1/records", Needs(Role::Deployer)),
            ("GET", "/v1/records", Unknown),
            ("POST", "/v1/services/web/rollback", Needs(Role::Deployer)),
            ("POST", "/v1/services/web/promote", Needs(Role::Deployer)),
            ("POST", "/v1/services/web/pause", Needs(Role::Deployer)),
            ("POST", "/v1/services/web/resume", Needs(Role::Deployer)),
            ("POST", "/v1/services/web/abort", Needs(Role::Deployer)),
            ("POST", "/v1/services/web/run", Needs(Role::Deployer)),
            (
                "POST",
                "/v1/instances/web-r1-ab/exec",
                Needs(Role::Deployer),
            ),
            ("POST", "/ui/events", Unknown),
            ("GET", "/v1/tokens", Needs(Role::Admin)),
            ("POST", "/v1/tokens", Needs(Role::Admin)),
            ("POST", "/v1/tokens/ci/revoke", Needs(Role::Admin)),
            ("POST", "/v1/gc", Needs(Role::Admin)),
            ("POST", "/v1/nodes/n2/drain", Needs(Role::Admin)),
            ("POST", "/v1/nodes/n2/undrain", Needs(Role::Admin)),
            ("GET", "/v1/nodes/n2/drain", Unknown),
            ("POST", "/v1/nodes/n2/delete", Unknown),
            ("GET", "/v2/", Needs(Role::Viewer)),
            ("HEAD", "/v2/web/blobs/sha256:00", Needs(Role::Viewer)),
            ("POST", "/v2/web/blobs/uploads/", Needs(Role::Deployer)),
            ("PUT", "/v2/web/manifests/v1", Needs(Role::Deployer)),
            ("DELETE", "/v2/web/manifests/v1", Unknown),
            ("GET", "/login", Open),
            ("GET", "/ui/style.css", Open),
            ("GET", "/ui/events", Needs(Role::Viewer)),
            ("POST", "/login", Open),
            ("GET", "/v1/apply", Unknown),
            ("POST", "/v1/status", Unknown),
            ("GET", "/etc/passwd", Unknown),
            ("GET", "/v1/services/web/../../x", Unknown),
        ];
        for (method, path, want) in table {
            assert_eq!(route(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn failures_slow_down_after_a_few_and_stay_bounded() {
        assert_eq!(failure_delay(0), Duration::ZERO);
        assert_eq!(failure_delay(3), Duration::from_millis(250));
        assert_eq!(failure_delay(4), Duration::from_millis(500));
        assert_eq!(failure_delay(1000), Duration::from_secs(5));
    }

    #[test]
    fn the_csrf_value_depends_on_key_and_token() {
        let a = csrf_value(b"k1", "t1");
        assert_eq!(a, csrf_value(b"k1", "t1"));
        assert_ne!(a, csrf_value(b"k2", "t1"));
        assert_ne!(a, csrf_value(b"k1", "t2"));
    }

    proptest! {
        #[test]
        fn constant_time_eq_is_equality(a in proptest::collection::vec(any::<u8>(), 0..40),
                                         b in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(constant_time_eq(&a, &b), a == b);
        }

        #[test]
        fn any_made_token_parses_back_to_its_name(secret in any::<[u8; 32]>(), n in "[a-z0-9][a-z0-9_-]{0,31}") {
            let t = make_token(name(&n), &secret);
            prop_assert_eq!(token_name(&t), Some(name(&n)));
        }

        #[test]
        fn route_never_panics(method in "[A-Z]{0,7}", path in "(/[a-z0-9.%_-]{0,6}){0,6}") {
            let _ = route(&method, &path);
        }
    }
}
