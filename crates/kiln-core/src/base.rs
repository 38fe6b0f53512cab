//! `[images.NAME] base = "REF"`: an image baked on top of another one's
//! layers (a userland, a language runtime), what names that other image
//! ([`BaseRef`]), and how the two configs meet ([`merge`]): the spec's
//! settings over the base's.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::oci::ExecConfig;
use crate::reference::{ImageName, ImageRef};
use crate::registry::RegistryRef;

/// Where a base image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseRef {
    /// Another `[images.NAME]` of the same spec, baked first.
    Spec(ImageName),
    /// In the store: `NAME:TAG` or `NAME@sha256:…`.
    Store(ImageRef),
    /// In a registry: `HOST[:PORT]/REPO:TAG` or `…@sha256:…`, pulled into
    /// the store the first time (a tag is then the store's until `kiln
    /// pull` is run again).
    Registry(RegistryRef),
    /// An OCI image layout as skopeo or `kiln export` writes it:
    /// `oci:DIR` (its only image) or `oci:DIR:TAG`. A relative `DIR` is
    /// relative to the spec.
    OciLayout { dir: String, tag: Option<String> },
    /// A `docker save` archive: `docker-archive:FILE` (relative to the
    /// spec, as `DIR`).
    DockerArchive(String),
}

impl BaseRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // `oci:DIR:TAG`: a tag has no `/`; a `:` before a `/` is part
            // of the directory.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag)),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(format!("base `{s}`: oci:DIR[:TAG] names a directory"));
            }
            if let Some(t) = tag {
                crate::reference::Tag::try_from(t)
                    .map_err(|e| format!("base `{s}`: tag `{t}`: {e}"))?;
            }
            return Ok(Self::OciLayout {
                dir: dir.to_owned(),
                tag: tag.map(str::to_owned),
            });
        }
        if let Some(file) = s.strip_prefix("docker-archive:") {
            if file.is_empty() {
                return Err(format!("base `{s}`: docker-archive:FILE names a file"));
            }
            return Ok(Self::DockerArchive(file.to_owned()));
        }
        if RegistryRef::looks_like(s) {
            return RegistryRef::parse(s)
                .map(Self::Registry)
                .map_err(|e| format!("base `{s}`: {e}"));
        }
        if s.contains(':') || s.contains('@') {
            return ImageRef::parse(s)
                .map(Self::Store)
                .map_err(|e| format!("base `{s}`: {e}"));
        }
        ImageName::try_from(s).map(Self::Spec).map_err(|_| {
            format!(
                "base `{s}`: name an image as NAME (of this spec), NAME:TAG or NAME@sha256:… (the store), HOST/REPO:TAG (a registry), oci:DIR[:TAG] or docker-archive:FILE"
            )
        })
    }
}

impl<'de> Deserialize<'de> for BaseRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for BaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spec(n) => write!(f, "{n}"),
            Self::Store(r) => write!(f, "{r}"),
            Self::Registry(r) => write!(f, "{r}"),
            Self::OciLayout { dir, tag: None } => write!(f, "oci:{dir}"),
            Self::OciLayout { dir, tag: Some(t) } => write!(f, "oci:{dir}:{t}"),
            Self::DockerArchive(file) => write!(f, "docker-archive:{file}"),
        }
    }
}

/// The config of an image baked on `base`, from what the spec says
/// (`app`, where empty means "not said"): the base's environment with the
/// spec's variables set over it (a variable keeps its place, a new one
/// comes after), the spec's user and working directory else the base's,
/// both images' ports and labels (the spec's label wins), and the
/// command: the spec's entrypoint with the spec's cmd when it names an
/// entrypoint (as a Dockerfile's `ENTRYPOINT` resets `CMD`), else the
/// base's entrypoint with the spec's cmd, or the base's.
pub fn merge(base: &ExecConfig, app: &ExecConfig) -> ExecConfig {
    let mut env = base.env.clone();
    for var in &app.env {
        let key = var.split_once('=').map_or(var.as_str(), |(k, _)| k);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(e) => e.clone_from(var),
            None => env.push(var.clone()),
        }
    }
    let (entrypoint, cmd) = if !app.entrypoint.is_empty() {
        (app.entrypoint.clone(), app.cmd.clone())
    } else if !app.cmd.is_empty() {
        (base.entrypoint.clone(), app.cmd.clone())
    } else {
        (base.entrypoint.clone(), base.cmd.clone())
    };
    let mut exposed_ports = base.exposed_ports.clone();
    exposed_ports.extend(app.exposed_ports.clone());
    let mut labels = base.labels.clone();
    labels.extend(app.labels.clone());
    ExecConfig {
        user: app.user.clone().or_else(|| base.user.clone()),
        exposed_ports,
        env,
        entrypoint,
        cmd,
        working_dir: app.working_dir.clone().or_else(|| base.working_dir.clone()),
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::EmptyObject;

    #[test]
    fn a_base_is_named_by_its_shape() {
        assert!(matches!(BaseRef::parse("busybox:1"), Ok(BaseRef::Store(_))));
        assert!(matches!(
            BaseRef::parse(
                "debian@sha256:0000000000000000000000000000000000000000000000000000000000000000"
            ),
            Ok(BaseRef::Store(_))
        ));
        assert!(matches!(
            BaseRef::parse("127.0.0.1:5000/lib/debian:12"),
            Ok(BaseRef::Registry(_))
        ));
        assert_eq!(
            BaseRef::parse("oci:layouts/base:v1"),
            Ok(BaseRef::OciLayout {
                dir: "layouts/base".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            BaseRef::parse("oci:/tmp/x"),
            Ok(BaseRef::OciLayout {
                dir: "/tmp/x".into(),
                tag: None
            })
        );
        // A colon inside the directory is the directory's.
        assert_eq!(
            BaseRef::parse("oci:a:b/c"),
            Ok(BaseRef::OciLayout {
                dir: "a:b/c".into(),
                tag: None
            })
        );
        assert_eq!(
            BaseRef::parse("docker-archive:base.tar"),
            Ok(BaseRef::DockerArchive("base.tar".into()))
        );
        assert!(matches!(BaseRef::parse("busybox"), Ok(BaseRef::Spec(_))));
        for (bad, says) in [
            ("Busy Box", "name an image as"),
            ("oci:", "names a directory"),
            ("oci::v1", "names a directory"),
            ("oci:dir:bad tag", "tag `bad tag`"),
            ("docker-archive:", "names a file"),
            ("Bad:1", "base `Bad:1`"),
        ] {
            let e = BaseRef::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for text in [
            "busybox",
            "busybox:1",
            "oci:dir",
            "oci:dir:v2",
            "docker-archive:f.tar",
            "127.0.0.1:5000/lib/debian:12",
        ] {
            assert_eq!(BaseRef::parse(text).unwrap().to_string(), text);
        }
    }

    fn config(env: &[&str], entrypoint: &[&str], cmd: &[&str]) -> ExecConfig {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        ExecConfig {
            env: v(env),
            entrypoint: v(entrypoint),
            cmd: v(cmd),
            ..ExecConfig::default()
        }
    }

    #[test]
    fn the_spec_is_set_over_the_base() {
        let mut base = config(
            &["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
            &["/docker-entrypoint.sh"],
            &["serve"],
        );
        base.user = Some("app".into());
        base.working_dir = Some("/srv".into());
        base.exposed_ports.insert("80/tcp".into(), EmptyObject {});
        base.labels.insert("a".into(), "base".into());
        base.labels.insert("b".into(), "base".into());
        // Nothing said: the base's.
        assert_eq!(merge(&base, &ExecConfig::default()), base);
        let mut app = config(&["LANG=en_US.UTF-8", "APP=1"], &[], &["worker"]);
        app.working_dir = Some("/app".into());
        app.exposed_ports.insert("8080/tcp".into(), EmptyObject {});
        app.labels.insert("b".into(), "app".into());
        let m = merge(&base, &app);
        assert_eq!(m.env, ["PATH=/usr/bin:/bin", "LANG=en_US.UTF-8", "APP=1"]);
        assert_eq!(m.entrypoint, ["/docker-entrypoint.sh"], "the base's");
        assert_eq!(m.cmd, ["worker"], "the spec's");
        assert_eq!(m.user.as_deref(), Some("app"));
        assert_eq!(m.working_dir.as_deref(), Some("/app"));
        assert_eq!(
            m.exposed_ports.keys().collect::<Vec<_>>(),
            ["80/tcp", "8080/tcp"]
        );
        assert_eq!(m.labels["a"], "base");
        assert_eq!(m.labels["b"], "app");
        // An entrypoint of the spec's resets the base's cmd.
        let mut own = config(&[], &["/bin/app"], &[]);
        own.user = Some("root".into());
        let m = merge(&base, &own);
        assert_eq!(
            (m.entrypoint.as_slice(), m.cmd.len()),
            (["/bin/app".to_owned()].as_slice(), 0)
        );
        assert_eq!(m.user.as_deref(), Some("root"));
        // A variable with no `=` is a name like any other.
        let m = merge(&config(&["X"], &[], &[]), &config(&["X=1"], &[], &[]));
        assert_eq!(m.env, ["X=1"]);
    }
}
