//! Who kiln is to a registry: the credentials `kiln login HOST` keeps in
//! `$KILN_HOME/registries.json` (0600), else Docker's
//! `~/.docker/config.json` `auths` (or `$DOCKER_CONFIG/config.json`), else
//! anonymous. `registries.json` also remembers which hosts the user named
//! insecure (plain HTTP): kiln never falls back to HTTP on its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// A registry's login, as kept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Plain HTTP, as the user asked (`kiln login --insecure`).
    #[serde(default)]
    pub insecure: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<secret>"))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// How kiln authenticates to one registry, and where that came from.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    Basic {
        username: String,
        password: String,
        /// `kiln login` or Docker's config: named in errors.
        from: &'static str,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, from, .. } => write!(f, "Basic({username}, from {from})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// `$KILN_HOME/registries.json`.
#[derive(Debug)]
pub struct Credentials {
    path: PathBuf,
    logins: BTreeMap<String, Login>,
}

impl Credentials {
    /// Read `registries.json` under `home` (none yet: empty).
    pub fn open(home: &Path) -> Result<Self, CredentialsError> {
        let path = home.join("registries.json");
        let logins = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| CredentialsError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(CredentialsError::Io { path, source }),
        };
        Ok(Self { path, logins })
    }

    /// Remember `login` for `host`, written atomically, owner-only.
    /// These credentials with `login` for `host`, in memory only (to try
    /// them before they are kept).
    pub fn with(&self, host: &str, login: Login) -> Self {
        let mut c = Self {
            path: self.path.clone(),
            logins: self.logins.clone(),
        };
        c.logins.insert(host.to_owned(), login);
        c
    }

    pub fn save(&mut self, host: &str, login: Login) -> Result<(), CredentialsError> {
        self.logins.insert(host.to_owned(), login);
        let bytes = serde_json::to_vec_pretty(&self.logins).unwrap_or_default();
        let io = |source| CredentialsError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::fsutil::write_private(&self.path, &bytes).map_err(io)
    }

    /// Forget `host`; whether it was known.
    pub fn forget(&mut self, host: &str) -> Result<bool, CredentialsError> {
        let was = self.logins.remove(host).is_some();
        if was {
            let bytes = serde_json::to_vec_pretty(&self.logins).unwrap_or_default();
            crate::fsutil::write_private(&self.path, &bytes).map_err(|source| {
                CredentialsError::Io {
                    path: self.path.clone(),
                    source,
                }
            })?;
        }
        Ok(was)
    }

    /// Whether the user named `host` insecure (plain HTTP).
    pub fn insecure(&self, host: &str) -> bool {
        self.logins.get(host).is_some_and(|l| l.insecure)
    }

    /// The credentials for `host`: kiln's login, else Docker's, else none.
    pub fn auth(&self, host: &str) -> Auth {
        if let Some(Login {
            username: Some(u),
            password: Some(p),
            ..
        }) = self.logins.get(host)
        {
            return Auth::Basic {
                username: u.clone(),
                password: p.clone(),
                from: "kiln login",
            };
        }
        docker_auth(host).unwrap_or(Auth::Anonymous)
    }
}

/// Docker's `config.json`: `auths.HOST.auth` is base64 of `user:password`
/// (credential helpers are not run).
fn docker_auth(host: &str) -> Option<Auth> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
    };
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let auths = config.get("auths")?.as_object()?;
    // Docker writes some hosts as URLs (`https://index.docker.io/v1/`).
    let entry = auths.iter().find_map(|(k, v)| {
        let key = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        (key == host || key.split('/').next() == Some(host)).then_some(v)
    })?;
    let encoded = entry.get("auth")?.as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let (u, p) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_owned(), p.to_owned()))?;
    Some(Auth::Basic {
        username: u,
        password: p,
        from: "~/.docker/config.json",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_kept_owner_only_and_win_over_docker() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Credentials::open(dir.path()).unwrap();
        assert_eq!(c.auth("reg.test:5000"), Auth::Anonymous);
        c.save(
            "reg.test:5000",
            Login {
                username: Some("ci".into()),
                password: Some("hunter2".into()),
                insecure: true,
            },
        )
        .unwrap();
        let mode = std::fs::metadata(dir.path().join("registries.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let c = Credentials::open(dir.path()).unwrap();
        assert!(c.insecure("reg.test:5000"));
        assert!(!c.insecure("other:5000"));
        assert!(
            matches!(c.auth("reg.test:5000"), Auth::Basic { ref username, .. } if username == "ci")
        );
        assert!(!format!("{:?} {c:?}", c.auth("reg.test:5000")).contains("hunter2"));
    }
}
