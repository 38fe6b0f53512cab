//! Secrets: environment values that must never be shown.
//!
//! A spec names where a secret's value comes from ([`SecretSource`]: the
//! spec itself, a file, or the environment of the `kiln` command). The
//! client reads the value and sends it to the agent once, in the apply
//! request ([`SecretValue`], whose `Debug` prints nothing of it). The agent
//! keeps the value in its state store under a keyed digest ([`Sealed`]:
//! HMAC-SHA256 with a key of its node, over the name and the value), and
//! the release records only that digest: a changed value is a new release,
//! a rollback brings the old value back, and what `history` and `plan` show
//! cannot be searched for a guessed password without the node's key.

use std::fmt;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::names::EnvName;

/// Where a secret's value comes from, in `[services.NAME.secrets]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretSource {
    /// The value itself, written in the spec (hidden from every output,
    /// but the spec file holds it: prefer `file` or `env`).
    Value(SecretValue),
    /// `{ file = "path" }`: a file's contents (one trailing newline
    /// removed), the path relative to the spec's directory.
    File { file: String },
    /// `{ env = "NAME" }`: a variable of the `kiln` command's environment
    /// (a CI job's secret).
    Env { env: String },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(<secret>)"),
            Self::File { file } => write!(f, "File({file:?})"),
            Self::Env { env } => write!(f, "Env({env:?})"),
        }
    }
}

/// A secret's value. It travels in an apply request and is never
/// printed: its `Debug` and `Display` say `<secret>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the instance's environment and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// A secret as a release records it: `hmac-sha256:` and 64 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sealed(String);

const PREFIX: &str = "hmac-sha256:";

impl Sealed {
    /// The digest of `name = value` under the node's `key`.
    pub fn seal(key: &[u8], name: &EnvName, value: &SecretValue) -> Self {
        // A key of any length is accepted by HMAC: this cannot fail.
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(name.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(value.expose().as_bytes());
        Self(format!(
            "{PREFIX}{}",
            crate::digest::hex(&mac.finalize().into_bytes())
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Sealed {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.strip_prefix(PREFIX) {
            Some(h)
                if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Self(s))
            }
            _ => Err(format!(
                "{s:?} is not a sealed secret ({PREFIX}<64 hex digits>)"
            )),
        }
    }
}

impl From<Sealed> for String {
    fn from(s: Sealed) -> Self {
        s.0
    }
}

/// An error in an env file: the line it is on, never its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvFileError {
    #[error("line {line}: expected NAME=VALUE")]
    NoEquals { line: usize },
    #[error("line {line}: {reason}")]
    BadName { line: usize, reason: String },
    #[error("line {line}: {name} is set twice")]
    Twice { line: usize, name: String },
    #[error("line {line}: unterminated quote")]
    Unterminated { line: usize },
}

/// Parse an env file (`NAME=VALUE` lines, the dotenv shape Docker and
/// Kamal read): blank lines and `#` comments are skipped, `export ` in
/// front is allowed, a value in single or double quotes is taken as it is
/// between them (no interpolation, no escapes).
pub fn parse_env_file(text: &str) -> Result<Vec<(EnvName, SecretValue)>, EnvFileError> {
    let mut out: Vec<(EnvName, SecretValue)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").map_or(l, str::trim_start);
        let (name, value) = l.split_once('=').ok_or(EnvFileError::NoEquals { line })?;
        let name = EnvName::try_from(name.trim()).map_err(|e| EnvFileError::BadName {
            line,
            reason: e.to_string(),
        })?;
        let value = value.trim();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let inner = &value[1..];
                let end = inner.rfind(q).ok_or(EnvFileError::Unterminated { line })?;
                &inner[..end]
            }
            _ => value,
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(EnvFileError::Twice {
                line,
                name: name.to_string(),
            });
        }
        out.push((name, SecretValue::new(value)));
    }
    Ok(out)
}

/// A secret file's contents as its value: one trailing newline (`echo pw >
/// file` writes one) is not part of it.
pub fn from_file_contents(text: &str) -> SecretValue {
    let v = text.strip_suffix('\n').unwrap_or(text);
    let v = v.strip_suffix('\r').unwrap_or(v);
    SecretValue::new(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> EnvName {
        EnvName::try_from(n).unwrap()
    }

    #[test]
    fn a_value_is_never_printed() {
        let v = SecretValue::new("hunter2");
        assert_eq!(format!("{v:?} {v}"), "<secret> <secret>");
        let s = SecretSource::Value(v);
        assert!(!format!("{s:?}").contains("hunter2"));
        let d = Sealed::seal(b"k", &name("DB"), &SecretValue::new("hunter2"));
        assert!(!d.as_str().contains("hunter2"));
    }

    #[test]
    fn the_digest_depends_on_key_name_and_value() {
        let v = SecretValue::new("pw");
        let a = Sealed::seal(b"key", &name("A"), &v);
        assert_eq!(a, Sealed::seal(b"key", &name("A"), &v), "stable");
        assert_ne!(a, Sealed::seal(b"other", &name("A"), &v));
        assert_ne!(a, Sealed::seal(b"key", &name("B"), &v));
        assert_ne!(
            a,
            Sealed::seal(b"key", &name("A"), &SecretValue::new("pw2"))
        );
        // The name and the value cannot trade bytes.
        assert_ne!(
            Sealed::seal(b"key", &name("AB"), &SecretValue::new("C")),
            Sealed::seal(b"key", &name("A"), &SecretValue::new("BC"))
        );
        assert_eq!(Sealed::try_from(a.to_string()), Ok(a));
        assert!(Sealed::try_from("sha256:00".to_owned()).is_err());
    }

    #[test]
    fn env_files_parse_like_dotenv_and_errors_name_the_line_not_the_value() {
        let text =
            "# comment\n\nA=1\nexport B = two words \nC=\"quoted # not a comment\"\nD='x=y'\nE=\n";
        let got: Vec<(String, String)> = parse_env_file(text)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.expose().to_owned()))
            .collect();
        let want = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "quoted # not a comment"),
            ("D", "x=y"),
            ("E", ""),
        ];
        assert_eq!(
            got,
            want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
        );
        assert_eq!(
            parse_env_file("A=1\nsecret-without-equals\n"),
            Err(EnvFileError::NoEquals { line: 2 })
        );
        let e = parse_env_file("A=1\nA=hunter2\n").unwrap_err();
        assert_eq!(e.to_string(), "line 2: A is set twice");
        let e = parse_env_file("A=\"hunter2\n").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        assert!(matches!(
            parse_env_file("1A=x"),
            Err(EnvFileError::BadName { line: 1, .. })
        ));
    }

    proptest::proptest! {
        /// Whatever lines an env file holds (good, duplicated, bad names,
        /// no `=`, unterminated quotes), parsing never panics, and an
        /// error never repeats a value (values are digits, names letters,
        /// so a value in a message can only have come from a value).
        #[test]
        fn env_files_never_panic_and_errors_hold_no_value(
            lines in proptest::collection::vec(
                (0u8..5, "[A-Z]{1,3}", "[0-9]{4,8}"),
                0..8,
            )
        ) {
            let text: String = lines
                .iter()
                .map(|(kind, name, value)| match kind {
                    0 => format!("{name}={value}\n"),
                    1 => format!("{name}=\"{value}\n"),
                    2 => format!("9{name}={value}\n"),
                    3 => format!("{name}{value}\n"),
                    _ => format!("export {name}='{value}'\n"),
                })
                .collect();
            if let Err(e) = parse_env_file(&text) {
                let msg = e.to_string();
                for (_, _, value) in &lines {
                    proptest::prop_assert!(!msg.contains(value.as_str()), "{msg} holds {value}");
                }
            }
        }
    }

    #[test]
    fn a_file_loses_one_trailing_newline() {
        assert_eq!(from_file_contents("pw\n").expose(), "pw");
        assert_eq!(from_file_contents("pw\r\n").expose(), "pw");
        assert_eq!(from_file_contents("pw\n\n").expose(), "pw\n");
        assert_eq!(from_file_contents("pw").expose(), "pw");
    }
}
