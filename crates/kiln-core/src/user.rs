//! Who an instance runs as: the service's `user` (else the image's `USER`),
//! resolved to numeric ids against the image's own `/etc/passwd` and
//! `/etc/group` (then the host's, for images without them). Pure: the
//! caller reads the files.

/// The unprivileged identity instances get when nothing names one:
/// `nobody:nogroup` on Debian, 65534 nearly everywhere.
pub const NOBODY: Identity = Identity {
    uid: 65534,
    gid: 65534,
};

/// Numeric user and group ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user `{0}` is not valid: expected NAME, UID, NAME:GROUP or UID:GID")]
    Invalid(String),
    #[error("user `{0}` is in neither the image's /etc/passwd nor the host's")]
    UnknownUser(String),
    #[error("group `{0}` is in neither the image's /etc/group nor the host's")]
    UnknownGroup(String),
}

/// Check the form of a `user` value (`NAME|UID[:GROUP|GID]`) without
/// resolving it.
pub fn check(user: &str) -> Result<(), UserError> {
    let invalid = || UserError::Invalid(user.to_owned());
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 32
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !ok(u) || g.is_some_and(|g| !ok(g)) {
        return Err(invalid());
    }
    Ok(())
}

/// Resolve `user` (else [`NOBODY`] when `None` or empty) against the
/// passwd and group files given, each searched in order (the image's,
/// then the host's). A numeric uid without a group takes the user's
/// primary group when a passwd file knows it, else the same number.
pub fn resolve(user: Option<&str>, passwd: &[&str], group: &[&str]) -> Result<Identity, UserError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok(NOBODY);
    };
    check(user)?;
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => (uid, passwd.iter().find_map(|f| gid_of_uid(f, uid))),
        Err(_) => {
            let (uid, gid) = passwd
                .iter()
                .find_map(|f| lookup_passwd(f, u))
                .ok_or_else(|| UserError::UnknownUser(u.to_owned()))?;
            (uid, Some(gid))
        }
    };
    let gid = match g {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .iter()
                .find_map(|f| lookup_group(f, g))
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        },
    };
    Ok(Identity { uid, gid })
}

/// Fields of the lines of a colon-separated database (passwd, group).
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
}

fn lookup_passwd(text: &str, name: &str) -> Option<(u32, u32)> {
    records(text)
        .find(|f| f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
}

fn gid_of_uid(text: &str, uid: u32) -> Option<u32> {
    records(text)
        .find(|f| f[2].parse() == Ok(uid))
        .and_then(|f| f[3].parse().ok())
}

fn lookup_group(text: &str, name: &str) -> Option<u32> {
    records(text)
        .find(|f| f[0] == name)
        .and_then(|f| f[2].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1001::/home/app:/bin/sh\nbad:x:notanumber:1::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1001:\n";
    const HOST: &str = "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nhostonly:x:4242:4243::/:/bin/sh\n";

    fn r(user: Option<&str>) -> Result<Identity, UserError> {
        resolve(user, &[PASSWD, HOST], &[GROUP])
    }

    #[test]
    fn nothing_named_is_nobody() {
        assert_eq!(r(None), Ok(NOBODY));
        assert_eq!(r(Some("")), Ok(NOBODY));
        assert!(!NOBODY.is_root());
    }

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(r(Some("root")), Ok(Identity { uid: 0, gid: 0 }));
        assert!(r(Some("root")).unwrap().is_root());
        assert_eq!(
            r(Some("app")),
            Ok(Identity {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(r(Some("app:staff")), Ok(Identity { uid: 1000, gid: 50 }));
        assert_eq!(r(Some("app:7")), Ok(Identity { uid: 1000, gid: 7 }));
        // A number takes its passwd entry's primary group, else itself.
        assert_eq!(
            r(Some("1000")),
            Ok(Identity {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(
            r(Some("1234")),
            Ok(Identity {
                uid: 1234,
                gid: 1234
            })
        );
        assert_eq!(r(Some("1234:5")), Ok(Identity { uid: 1234, gid: 5 }));
        // The host's file when the image's lacks the name.
        assert_eq!(
            r(Some("hostonly")),
            Ok(Identity {
                uid: 4242,
                gid: 4243
            })
        );
        assert_eq!(Identity { uid: 1, gid: 2 }.to_string(), "1:2");
    }

    #[test]
    fn unknown_and_malformed_users_are_refused() {
        assert_eq!(
            r(Some("ghost")),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(r(Some("bad")), Err(UserError::UnknownUser("bad".into())));
        assert_eq!(
            r(Some("app:ghosts")),
            Err(UserError::UnknownGroup("ghosts".into()))
        );
        for bad in ["a b", "app:", ":1", "a:b:c", "x/y", &"a".repeat(33)] {
            assert!(matches!(r(Some(bad)), Err(UserError::Invalid(_))), "{bad}");
            assert!(check(bad).is_err(), "{bad}");
        }
        assert!(check("app-1.x_y:staff").is_ok());
        assert!(check(&"a".repeat(32)).is_ok());
    }
}
