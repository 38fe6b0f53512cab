//! Where an image lives in a registry: `HOST[:PORT]/REPO[:TAG]` or
//! `HOST[:PORT]/REPO@sha256:…` (the distribution spec's reference, with
//! the registry always named: kiln has no default registry, so nothing is
//! ever sent to one the user did not write).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;
use crate::reference::{ImageName, Tag};

/// Why a string is not a registry reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryRefError {
    #[error(
        "invalid registry reference `{0}`: expected HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:HEX"
    )]
    Shape(String),
    #[error("invalid registry host `{0}`: expected a host name or IP, with an optional :PORT")]
    Host(String),
    #[error(
        "invalid repository `{0}`: use lowercase path components (letters, digits, single `.`, `_` or `-`) separated by `/`"
    )]
    Repository(String),
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
}

/// The tag or digest a registry reference names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Tag(Tag),
    Digest(Digest),
}

/// `HOST[:PORT]/REPO[:TAG|@DIGEST]`; without either it names no version
/// (`target` is `None`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `host` or `host:port`, as written (the key of credentials too).
    pub host: String,
    /// `team/hello`.
    pub repository: String,
    pub target: Option<Target>,
}

impl RegistryRef {
    /// Whether `s` names a registry (its first path component is a host:
    /// it has a `.` or a `:`, or is `localhost`) rather than an image in
    /// the store.
    pub fn looks_like(s: &str) -> bool {
        s.split_once('/').is_some_and(|(first, _)| {
            first.contains('.') || first.contains(':') || first == "localhost"
        })
    }

    pub fn parse(s: &str) -> Result<Self, RegistryRefError> {
        let shape = || RegistryRefError::Shape(s.to_owned());
        let (host, rest) = s.split_once('/').ok_or_else(shape)?;
        if !Self::looks_like(s) {
            return Err(shape());
        }
        check_host(host)?;
        let (path, target) = if let Some((path, digest)) = rest.split_once('@') {
            (path, Some(Target::Digest(digest.parse::<Digest>()?)))
        } else {
            match rest.rsplit_once(':') {
                // A colon after the last slash is the tag's.
                Some((path, tag)) if !tag.contains('/') => {
                    (path, Some(Target::Tag(Tag::try_from(tag)?)))
                }
                _ => (rest, None),
            }
        };
        let valid = !path.is_empty()
            && path.len() <= 255
            && path.split('/').all(|c| ImageName::try_from(c).is_ok());
        if !valid {
            return Err(RegistryRefError::Repository(path.to_owned()));
        }
        Ok(Self {
            host: host.to_owned(),
            repository: path.to_owned(),
            target,
        })
    }

    /// The last path component, as the store names the image
    /// (`team/hello` → `hello`).
    pub fn image_name(&self) -> ImageName {
        let last = self.repository.rsplit('/').next().unwrap_or_default();
        // Every component was validated as an image name in `parse`.
        ImageName::try_from(last).unwrap_or_else(|_| unreachable!("validated in parse"))
    }

    /// The same repository, at `target`.
    pub fn at(&self, target: Target) -> Self {
        Self {
            target: Some(target),
            ..self.clone()
        }
    }

    /// `HOST/REPO`, without a tag or digest.
    pub fn repository_ref(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }
}

fn check_host(host: &str) -> Result<(), RegistryRefError> {
    let bad = || RegistryRefError::Host(host.to_owned());
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(bad());
    }
    if crate::names::is_host_name(name) {
        Ok(())
    } else {
        Err(bad())
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        match &self.target {
            Some(Target::Tag(t)) => write!(f, ":{t}"),
            Some(Target::Digest(d)) => write!(f, "@{d}"),
            None => Ok(()),
        }
    }
}

impl std::str::FromStr for RegistryRef {
    type Err = RegistryRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for RegistryRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RegistryRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn references_parse_with_host_repository_and_target() {
        let r = RegistryRef::parse("127.0.0.1:5000/team/hello:v1").unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/hello");
        assert_eq!(r.target, Some(Target::Tag(Tag::try_from("v1").unwrap())));
        assert_eq!(r.image_name().as_str(), "hello");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/hello:v1");
        let d = Digest::of(b"x");
        let r = RegistryRef::parse(&format!("ghcr.io/acme/web@{d}")).unwrap();
        assert_eq!(r.target, Some(Target::Digest(d)));
        let r = RegistryRef::parse("localhost/web").unwrap();
        assert_eq!((r.host.as_str(), r.target), ("localhost", None));
    }

    #[test]
    fn what_is_not_a_registry_reference_is_refused_naming_it() {
        for bad in [
            "hello:v1",
            "hello",
            "team/hello",
            "host:99999/x",
            "host:/x",
            "ho_st.io/x",
            "ghcr.io/",
            "ghcr.io/Upper",
            "ghcr.io/a//b",
            "ghcr.io/x:bad tag",
            "ghcr.io/x@sha256:12",
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad}");
        }
        assert!(!RegistryRef::looks_like("hello:v1"));
        assert!(!RegistryRef::looks_like("team/hello"));
        assert!(RegistryRef::looks_like("127.0.0.1:5000/hello"));
    }

    proptest! {
        /// Whatever parses prints back as itself; nothing panics.
        #[test]
        fn parse_never_panics_and_round_trips(s in "[a-z0-9.:/@_-]{0,40}") {
            if let Ok(r) = RegistryRef::parse(&s) {
                prop_assert_eq!(RegistryRef::parse(&r.to_string()), Ok(r));
            }
        }
    }
}
