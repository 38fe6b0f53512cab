//! The spec, `kiln.toml`: the desired state. This module parses and validates
//! it; nothing here reads the file system (the caller passes the text in).
//!
//! Parsing is strict: unknown keys are refused, and every error names the
//! file, line and column, with the nearest valid key for a misspelt one.
//! Tables are keyed by kind (`[images.NAME]`, `[services.NAME]`), so each
//! kind validates on its own.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::reference::ImageName;

/// Why a spec was refused. Always one line, always with a location.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SpecError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The whole `kiln.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Images to bake, by name.
    #[serde(default)]
    pub images: BTreeMap<ImageName, ImageSpec>,
    /// Services to run, by name.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, crate::service::ServiceSpec>,
    /// Which image signatures an apply requires.
    #[serde(default)]
    pub trust: TrustSpec,
}

/// `[trust]`: the signers whose signatures count, and whether services
/// need one (each may say otherwise with its own `require_signed`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSpec {
    /// SSH public keys (`ssh-ed25519 AAAA… [comment]`) or `allowed_signers`
    /// lines (`principal ssh-ed25519 AAAA…`).
    #[serde(default)]
    pub allowed_signers: Vec<String>,
    #[serde(default)]
    pub require_signed: bool,
    /// Only images with a userland of their own run (baked on a base, or
    /// carrying their own `/usr`): none borrows the host's. The agent's
    /// policy (`kiln serve --trust FILE`) only.
    #[serde(default)]
    pub require_self_contained: bool,
}

/// The file `kiln serve --trust FILE` reads: one `[trust]` table, as in
/// a spec, which the agent enforces on every apply and rollback.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    trust: TrustSpec,
}

impl TrustSpec {
    /// Parse an agent's trust file (`[trust]` with `allowed_signers` and
    /// `require_signed`). `file` names it in errors.
    pub fn parse_file(text: &str, file: &str) -> Result<Self, SpecError> {
        let parsed: TrustFile = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
        if parsed.trust.require_signed && parsed.trust.allowed_signers.is_empty() {
            return Err(SpecError {
                file: file.to_owned(),
                line: 1,
                column: 1,
                message:
                    "[trust] requires signatures but allows no signer (allowed_signers is empty)"
                        .into(),
            });
        }
        Ok(parsed.trust)
    }

    /// Whether `service`'s image must carry a valid signature by an
    /// allowed signer.
    pub fn required(&self, service: &crate::service::ServiceSpec) -> bool {
        service.require_signed.unwrap_or(self.require_signed)
    }
}

/// The allowed signers among an image's valid signatures (`(signer,
/// valid)`, by fingerprint), or why there is none: what an apply that
/// requires a signature decides.
pub fn trusted_signers(
    allowed: &[String],
    found: &[(String, bool)],
) -> Result<Vec<String>, String> {
    let ok: Vec<String> = found
        .iter()
        .filter(|(signer, valid)| *valid && allowed.contains(signer))
        .map(|(signer, _)| signer.clone())
        .collect();
    if !ok.is_empty() {
        return Ok(ok);
    }
    if found.is_empty() {
        return Err("no signature".into());
    }
    let seen: Vec<String> = found
        .iter()
        .map(|(s, valid)| {
            if !valid {
                format!("{s} (invalid)")
            } else {
                format!("{s} (not an allowed signer)")
            }
        })
        .collect();
    Err(format!(
        "no valid signature by an allowed signer; found: {}",
        seen.join(", ")
    ))
}

/// `[images.NAME]`: how to bake one image.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The image this one is baked on (its layers first, its config under
    /// the spec's): `NAME:TAG`, `HOST/REPO:TAG`, `oci:DIR[:TAG]`,
    /// `docker-archive:FILE`.
    #[serde(default)]
    pub base: Option<crate::base::BaseRef>,
    /// The image's `USER` (default: the base's, else none).
    #[serde(default)]
    pub user: Option<String>,
    /// The directory whose files make the image, relative to the spec file.
    #[serde(default = "default_context")]
    pub context: RelativePath,
    /// Globs of paths to take from the context (default: everything).
    #[serde(default)]
    pub include: Vec<Glob>,
    /// Globs of paths to leave out (added to `.kilnignore`).
    #[serde(default)]
    pub exclude: Vec<Glob>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<EnvName, String>,
    pub workdir: Option<AbsolutePath>,
    pub port: Option<Port>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ordered path groups, each its own layer, before the final layer that
    /// holds everything else. Put what changes least first.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    /// A layer bigger than this is stored as several OCI layers of at
    /// least this size each, cut at files chosen by their paths
    /// ([`crate::layer::parts`]), so a one-file change writes one part;
    /// `0` keeps every layer whole.
    #[serde(default = "default_part_size")]
    pub part_size: Size,
}

fn default_context() -> RelativePath {
    RelativePath::current()
}

fn default_part_size() -> Size {
    Size(64 << 20)
}

/// A size in bytes, written `64M`, `1G`, `512K` or a plain number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Size(n)),
            Raw::Text(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// A size's bytes ([`crate::resources::parse_size`]).
pub use crate::resources::parse_size;

/// `[[images.NAME.layers]]`: one group of paths baked as its own layer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// A label for output and the layer's annotation.
    pub name: Option<String>,
    /// Globs; a path goes to the first layer with a matching glob.
    pub paths: Vec<Glob>,
}

/// A TOML parse error of `file` (whose text is `text`) at its line and
/// column, explained.
fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> SpecError {
    let (line, column) = e
        .span()
        .map(|s| line_column(text, s.start))
        .unwrap_or((1, 1));
    SpecError {
        file: file.to_owned(),
        line,
        column,
        message: explain(e.message()),
    }
}

impl Spec {
    /// Parse and validate the text of a spec file. `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
        spec.check(text, file)?;
        Ok(spec)
    }

    /// Rules that span tables: each is reported at the offending table.
    fn check(&self, text: &str, file: &str) -> Result<(), SpecError> {
        let at = |table: &str, message: String| {
            let (line, column) = text
                .find(&format!("[{table}"))
                .map(|i| line_column(text, i))
                .unwrap_or((1, 1));
            SpecError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        if self.trust.require_self_contained {
            return Err(at(
                "trust",
                "[trust] require_self_contained is the agent's policy: put it in the file of kiln serve --trust FILE".to_owned(),
            ));
        }
        for (name, image) in &self.images {
            let table = format!("images.{name}");
            if let Some(user) = &image.user {
                crate::user::check(user).map_err(|e| at(&table, format!("image {name}: {e}")))?;
            }
            // A base of this spec: there, and no image on itself.
            let mut next = image.base.as_ref();
            let mut steps = 0;
            while let Some(crate::base::BaseRef::Spec(b)) = next {
                let Some(found) = self.images.get(b) else {
                    return Err(at(
                        &table,
                        format!(
                            "image {name}: base `{b}` is not an [images] table of this spec (use NAME:TAG or NAME@sha256:... for an image already in the store)"
                        ),
                    ));
                };
                steps += 1;
                if steps > self.images.len() {
                    return Err(at(
                        &table,
                        format!("image {name}: its bases make a loop through `{b}`"),
                    ));
                }
                next = found.base.as_ref();
            }
        }
        let mut listens = Vec::new();
        let mut modes = Vec::new();
        for (name, svc) in &self.services {
            let table = format!("services.{name}");
            // At the key's own line in the service's table when it has one,
            // else at the table.
            let at_key = |key: &str, message: String| {
                let mut err = at(&table, message);
                if let Some(start) = text.find(&format!("[{table}]")) {
                    let body = &text[start..];
                    // To the next table's header (`body` starts with its own).
                    let end = body.find("\n[").unwrap_or(body.len());
                    if let Some(i) = body[..end].find(&format!("\n{key}")) {
                        (err.line, err.column) = line_column(text, start + i + 1);
                    }
                }
                err
            };
            if let crate::service::ImageSource::Spec(image) = &svc.image
                && !self.images.contains_key(image)
            {
                let hint = match nearest(image.as_str(), self.images.keys().map(|k| k.as_str())) {
                    Some(k) => format!(", did you mean `{k}`?"),
                    None => String::new(),
                };
                return Err(at_key(
                    "image",
                    format!(
                        "service {name}: image `{image}` is not an [images] table of this spec{hint} (use NAME:TAG or NAME@sha256:... for an image already in the store)"
                    ),
                ));
            }
            // Services share an address when their hosts or path prefixes
            // tell them apart; a blue-green preview takes all of its own.
            if let Some(listen) = svc.listen {
                let route = svc.route();
                route
                    .check()
                    .map_err(|m| at(&table, format!("service {name}: {m}")))?;
                listens.extend(
                    route
                        .routes(format!("service {name}"))
                        .into_iter()
                        .map(|r| (listen.0, r)),
                );
                modes.push((listen.0, format!("service {name}"), svc.tls.is_some()));
                // HTTPS's plain-HTTP redirect answers the same hosts and
                // prefix on its own address.
                if let Some(from) = svc.tls.as_ref().and_then(|t| t.redirect_from) {
                    listens.extend(
                        route
                            .routes(format!("the HTTPS redirect of service {name}"))
                            .into_iter()
                            .map(|r| (from.0, r)),
                    );
                    modes.push((
                        from.0,
                        format!("the HTTPS redirect of service {name}"),
                        false,
                    ));
                }
            }
            if let Some(preview) = svc.rollout.preview_listen {
                let all = crate::edge::RouteSpec::default();
                listens.extend(
                    all.routes(format!("the preview of service {name}"))
                        .into_iter()
                        .map(|r| (preview.0, r)),
                );
                modes.push((preview.0, format!("the preview of service {name}"), false));
            }
            crate::edge::check(listens.iter().cloned()).map_err(|e| at(&table, e.to_string()))?;
            crate::edge::check_tls(modes.iter().cloned()).map_err(|e| at(&table, e.to_string()))?;
            if let Some(user) = &svc.user {
                crate::user::check(user)
                    .map_err(|e| at_key("user", format!("service {name}: {e}")))?;
            }
            svc.check()
                .map_err(|m| at(&table, format!("service {name}: {m}")))?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The candidate nearest to `got` in edits (Damerau–Levenshtein), if it
/// is near enough to be a slip: at most 2 edits, or a third of its length.
fn nearest<'a>(got: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(got, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

/// Turn serde's "unknown field `x`, expected one of `a`, `b`" into a message
/// that suggests the nearest valid key.
fn explain(message: &str) -> String {
    let message = message.trim();
    for (kind, noun) in [("unknown field", "key"), ("unknown variant", "value")] {
        let Some(rest) = message.strip_prefix(kind) else {
            continue;
        };
        let mut quoted = rest.split('`').skip(1).step_by(2);
        let Some(got) = quoted.next() else { break };
        let valid: Vec<&str> = quoted.collect();
        if valid.is_empty() {
            return format!("unknown {noun} `{got}`: none are allowed here");
        }
        return match nearest(got, valid.iter().copied()) {
            Some(v) => format!(
                "unknown {noun} `{got}`, did you mean `{v}`? (expected one of: {})",
                valid.join(", ")
            ),
            None => format!(
                "unknown {noun} `{got}` (expected one of: {})",
                valid.join(", ")
            ),
        };
    }
    message.to_owned()
}

pub use crate::names::{AbsolutePath, EnvName, Glob, Port, RelativePath, ServiceName};

#[cfg(test)]
mod trust_tests {
    use super::*;

    fn found(v: &[(&str, bool)]) -> Vec<(String, bool)> {
        v.iter().map(|(s, ok)| ((*s).to_owned(), *ok)).collect()
    }

    #[test]
    fn only_valid_signatures_by_allowed_signers_count() {
        let allowed = vec!["A".to_owned(), "B".to_owned()];
        assert_eq!(
            trusted_signers(&allowed, &found(&[("A", true), ("C", true), ("B", false)])),
            Ok(vec!["A".to_owned()])
        );
        assert_eq!(
            trusted_signers(&allowed, &found(&[("B", true), ("A", true)])),
            Ok(vec!["B".to_owned(), "A".to_owned()])
        );
        assert_eq!(
            trusted_signers(&allowed, &[]),
            Err("no signature".to_owned())
        );
        assert_eq!(
            trusted_signers(&allowed, &found(&[("A", false), ("C", true)])),
            Err("no valid signature by an allowed signer; found: A (invalid), C (not an allowed signer)".to_owned())
        );
        assert_eq!(
            trusted_signers(&[], &found(&[("A", true)])),
            Err(
                "no valid signature by an allowed signer; found: A (not an allowed signer)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn a_service_may_ask_more_or_less_than_the_spec() {
        let spec = |r: bool| TrustSpec {
            allowed_signers: vec![],
            require_signed: r,
            require_self_contained: false,
        };
        let svc = |r: Option<bool>| -> crate::service::ServiceSpec {
            let mut v = serde_json::json!({"image": "a"});
            if let Some(r) = r {
                v["require_signed"] = r.into();
            }
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(spec(true).required(&svc(None)));
        assert!(!spec(false).required(&svc(None)));
        assert!(!spec(true).required(&svc(Some(false))));
        assert!(spec(false).required(&svc(Some(true))));
    }

    #[test]
    fn an_agents_trust_file_is_a_trust_table_and_nothing_else() {
        let ok = TrustSpec::parse_file(
            "[trust]\nallowed_signers = [\"ssh-ed25519 AAAA\"]\nrequire_signed = true\n",
            "t.toml",
        );
        assert_eq!(
            ok,
            Ok(TrustSpec {
                allowed_signers: vec!["ssh-ed25519 AAAA".into()],
                require_signed: true,
                require_self_contained: false,
            })
        );
        let lax = TrustSpec::parse_file("[trust]\nrequire_signed = false\n", "t.toml");
        assert_eq!(lax.map(|t| t.require_signed), Ok(false));
        let e = TrustSpec::parse_file("[trust]\nrequire_signed = true\n", "t.toml").unwrap_err();
        assert!(e.message.contains("allows no signer"), "{e}");
        let e = TrustSpec::parse_file("[trust]\nrequire_sigend = true\n", "t.toml").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("t.toml", 2));
        assert!(
            TrustSpec::parse_file("[images.a]\n", "t.toml").is_err(),
            "no other table"
        );
        assert!(
            TrustSpec::parse_file("", "t.toml").is_err(),
            "a [trust] table is needed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[images.hello]
context = "."
include = ["bin/**", "static/**"]
exclude = ["**/*.tmp"]
entrypoint = ["/bin/hello"]
cmd = ["--verbose"]
env = { GREETING = "hi" }
workdir = "/"
port = 8080
labels = { team = "core" }

[[images.hello.layers]]
name = "static"
paths = ["static/**"]
"#;

    #[test]
    fn a_full_spec_parses() {
        let spec = Spec::parse(GOOD, "kiln.toml").unwrap();
        let img = &spec.images[&ImageName::try_from("hello").unwrap()];
        assert_eq!(img.port, Some(Port(8080)));
        assert_eq!(img.layers[0].name.as_deref(), Some("static"));
        assert_eq!(img.include.len(), 2);
        assert_eq!(img.env.len(), 1);
    }

    #[test]
    fn sizes_parse_with_binary_units_and_refuse_nonsense() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn an_image_part_size_defaults_to_64m_and_takes_a_size_or_zero() {
        let part = |line: &str| {
            let text = format!("[images.hello]\n{line}\n");
            Spec::parse(&text, "kiln.toml")
                .map(|s| s.images[&ImageName::try_from("hello").unwrap()].part_size)
        };
        assert_eq!(part(""), Ok(Size(64 << 20)));
        assert_eq!(part("part_size = \"1M\""), Ok(Size(1 << 20)));
        assert_eq!(part("part_size = 0"), Ok(Size(0)));
        let err = part("part_size = \"lots\"").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.message.contains("unknown size unit in `lots`"), "{err}");
    }

    /// Issue 13: a misspelt image name pointed at the table header and
    /// offered nothing.
    #[test]
    fn a_misspelt_image_name_points_at_its_line_and_the_nearest_image() {
        let text = "[images.hello]\n\n[services.web]\nreplicas = 1\nimage = \"helo\"\n";
        let err = Spec::parse(text, "kiln.toml").unwrap_err();
        assert_eq!((err.line, err.column), (5, 1), "{err}");
        assert!(
            err.message.contains(
                "image `helo` is not an [images] table of this spec, did you mean `hello`?"
            ),
            "{err}"
        );
        // A long name allows a third of its length in edits.
        let text = "[images.backendservice]\n\n[services.web]\nimage = \"bkendsrvce\"\n";
        let err = Spec::parse(text, "kiln.toml").unwrap_err();
        assert!(
            err.message.contains("did you mean `backendservice`?"),
            "{err}"
        );
        // Nothing close: no guess.
        let text = "[images.hello]\n\n[services.web]\nimage = \"zzzzzz\"\n";
        let err = Spec::parse(text, "kiln.toml").unwrap_err();
        assert!(!err.message.contains("did you mean"), "{err}");
    }

    #[test]
    fn a_misspelt_key_names_line_column_and_the_nearest_key() {
        let text = "[images.hello]\ncontxt = \".\"\n";
        let err = Spec::parse(text, "kiln.toml").unwrap_err();
        assert_eq!((err.line, err.column), (2, 1), "{err}");
        assert!(
            err.to_string()
                .starts_with("kiln.toml:2:1: unknown key `contxt`, did you mean `context`?"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_top_level_table_is_refused() {
        let err = Spec::parse("[imagez.a]\n", "k.toml").unwrap_err();
        assert!(err.message.contains("did you mean `images`"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_at_their_location() {
        for (text, needle, line) in [
            ("[images.a]\nport = 70000\n", "out of range", 2),
            ("[images.a]\nworkdir = \"app\"\n", "must be absolute", 2),
            ("[images.a]\ncontext = \"../x\"\n", "must be relative", 2),
            (
                "[images.a]\nenv = { \"A-B\" = \"1\" }\n",
                "environment variable",
                2,
            ),
            ("[images.a]\ninclude = [\"a[\"]\n", "invalid glob", 2),
            ("[images.Bad]\n", "invalid image name", 1),
            ("[images.a]\nport = \"x\"\n", "invalid type", 2),
            ("[images.a\n", "", 1),
        ] {
            let err = Spec::parse(text, "k.toml").unwrap_err();
            assert!(err.message.contains(needle), "{text:?}: {err}");
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_column("ab\ncéd", 6), (2, 3));
    }
}
