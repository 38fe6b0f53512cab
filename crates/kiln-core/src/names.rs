//! Validated names and values that the spec, services and releases share:
//! each refuses bad input while it is deserialized (from a spec, or from an
//! API body), so the error names the value. A module of its own so that
//! `spec` and `service` both use it without importing each other.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Validated newtypes: each refuses bad input while the spec is deserialized,
/// so the error carries the value's line and column.
macro_rules! validated_string_pub {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(s: &str) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_from(s.as_str()).map_err(serde::de::Error::custom)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

pub(crate) use validated_string_pub;

/// A DNS host name (RFC 1123): dot-separated labels of 1 to 63 letters,
/// digits and `-`, none starting or ending with `-`, at most 253 bytes in
/// all. (A registry's host, a route's host.)
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

validated_string_pub!(
    /// A service name: the same grammar as an image name.
    ServiceName,
    |s| crate::reference::ImageName::try_from(s)
        .map(|_| ())
        .map_err(|_| format!("invalid service name `{s}`: use lowercase letters, digits and single `.`, `_` or `-` between them"))
);

validated_string_pub!(
    /// A relative path that stays below its base (no absolute path, no `..`).
    RelativePath,
    |s| {
        if s.is_empty() || s.starts_with('/') || s.split('/').any(|c| c == "..") {
            Err(format!("path `{s}` must be relative and must not contain `..`"))
        } else {
            Ok(())
        }
    }
);

validated_string_pub!(
    /// An absolute path inside an image, e.g. `workdir = "/app"`.
    AbsolutePath,
    |s| {
        if s.starts_with('/') && !s.split('/').any(|c| c == "..") && !s.contains('\0') {
            Ok(())
        } else {
            Err(format!("path `{s}` must be absolute and must not contain `..`"))
        }
    }
);

validated_string_pub!(
    /// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
    EnvName,
    |s| {
        let mut bytes = s.bytes();
        let ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(())
        } else {
            Err(format!("invalid environment variable name `{s}`"))
        }
    }
);

validated_string_pub!(
    /// A glob over context paths (`**` crosses directories), e.g. `static/**`.
    Glob,
    |s| {
        if s.is_empty() {
            return Err("empty glob".to_owned());
        }
        globset::Glob::new(s)
            .map(|_| ())
            .map_err(|e| format!("invalid glob `{s}`: {}", e.kind()))
    }
);

impl RelativePath {
    /// `.`, the base itself.
    pub fn current() -> Self {
        Self(".".to_owned())
    }
}

impl Glob {
    /// The compiled matcher; `literal_separator` so that `*` stays within one
    /// directory and `**` crosses them, as in `.gitignore`.
    pub fn compile(&self) -> globset::Glob {
        globset::GlobBuilder::new(&self.0)
            .literal_separator(true)
            .build()
            // Validated on construction with the same pattern.
            .unwrap_or_else(|_| unreachable!("glob validated at parse time"))
    }
}

/// A TCP port, 1–65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is out of range (1-65535)"
            ))),
        }
    }
}
