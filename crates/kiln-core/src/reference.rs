//! Image names, tags and the references users type (`REF`).
//!
//! A `REF` is one of `NAME`, `NAME:TAG`, `NAME@sha256:<hex>` or an unambiguous
//! digest prefix (`sha256:1a2b…` or bare hex). A bare word that is both a valid
//! name and valid hex is resolved by the store: a name first, then a prefix.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{Digest, DigestError};

/// Why a string is not a name, tag or reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error(
        "invalid image name `{0}`: use lowercase letters, digits and single `.`, `_` or `-` between them"
    )]
    Name(String),
    #[error(
        "invalid tag `{0}`: use up to 128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
    )]
    Tag(String),
    #[error(
        "invalid image reference `{0}`: expected NAME, NAME:TAG, NAME@sha256:HEX or a digest prefix"
    )]
    Reference(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A validated image name, e.g. `hello`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageName(String);

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ImageName {
    type Error = ReferenceError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        // Docker's path-component grammar: [a-z0-9]+ separated by single . _ or -.
        let bytes = s.as_bytes();
        let valid = !s.is_empty()
            && s.len() <= 128
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
            && !bytes
                .windows(2)
                .any(|w| b"._-".contains(&w[0]) && b"._-".contains(&w[1]));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(ReferenceError::Name(s.to_owned()))
        }
    }
}

/// A validated tag, e.g. `v1` or kiln's automatic `3f2a9c0b1d4e`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// kiln's automatic tag: the first 12 hex characters of the manifest digest.
    pub fn automatic(digest: &Digest) -> Self {
        Self(digest.short().to_owned())
    }
}

impl TryFrom<&str> for Tag {
    type Error = ReferenceError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        let bytes = s.as_bytes();
        let valid = !s.is_empty()
            && s.len() <= 128
            && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(ReferenceError::Tag(s.to_owned()))
        }
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::try_from(s.as_str()).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_newtype_impls!(ImageName);
string_newtype_impls!(Tag);

/// What a user typed to name an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A bare word: the newest image of that name, or else a digest prefix
    /// when the word is hex.
    Bare(String),
    /// `NAME:TAG`.
    Tagged(ImageName, Tag),
    /// `NAME@sha256:HEX`: exactly that image, which must carry that name.
    Pinned(ImageName, Digest),
    /// `sha256:HEX…` (possibly shortened): the one image whose manifest digest
    /// starts with it.
    DigestPrefix(String),
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let bad = || ReferenceError::Reference(s.to_owned());
        if let Some((name, digest)) = s.split_once('@') {
            return Ok(Self::Pinned(ImageName::try_from(name)?, digest.parse()?));
        }
        if let Some(prefix) = s.strip_prefix("sha256:") {
            return if is_hex_prefix(prefix) {
                Ok(Self::DigestPrefix(prefix.to_owned()))
            } else {
                Err(bad())
            };
        }
        if let Some((name, tag)) = s.split_once(':') {
            return Ok(Self::Tagged(
                ImageName::try_from(name)?,
                Tag::try_from(tag)?,
            ));
        }
        if ImageName::try_from(s).is_ok() || is_hex_prefix(s) {
            Ok(Self::Bare(s.to_owned()))
        } else {
            Err(bad())
        }
    }
}

/// Whether `s` can be a (shortened) digest: 4 to 64 lowercase hex characters.
pub fn is_hex_prefix(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bare(s) => f.write_str(s),
            Self::Tagged(n, t) => write!(f, "{n}:{t}"),
            Self::Pinned(n, d) => write!(f, "{n}@{d}"),
            Self::DigestPrefix(p) => write!(f, "sha256:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_docker_grammar() {
        for ok in ["hello", "a", "web-api", "my_app.v2", "x1"] {
            assert!(ImageName::try_from(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "-a", "a-", "a--b", "a/b", "a b", "ü"] {
            assert!(ImageName::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_are_validated() {
        assert!(Tag::try_from("v1.2-rc_3").is_ok());
        assert!(Tag::try_from("_x").is_ok());
        for bad in ["", ".x", "-x", "a:b", "a/b", &"x".repeat(129)] {
            assert!(Tag::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_parse_into_their_forms() {
        let d = Digest::of(b"x");
        assert_eq!(
            ImageRef::parse("hello").unwrap(),
            ImageRef::Bare("hello".into())
        );
        assert!(matches!(
            ImageRef::parse("hello:v1").unwrap(),
            ImageRef::Tagged(n, t) if n.as_str() == "hello" && t.as_str() == "v1"
        ));
        assert_eq!(
            ImageRef::parse(&format!("hello@{d}")).unwrap(),
            ImageRef::Pinned(ImageName::try_from("hello").unwrap(), d.clone())
        );
        assert_eq!(
            ImageRef::parse(&format!("sha256:{}", &d.hex()[..8])).unwrap(),
            ImageRef::DigestPrefix(d.hex()[..8].to_owned())
        );
        for bad in [
            "Hello",
            "hello:",
            "hello@sha256:zz",
            "sha256:",
            "sha256:xyz",
            "a b",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
