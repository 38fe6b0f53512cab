//! Whether and how the router compresses a response
//! (`router.compress = true`): the coding a client accepts, and what is
//! worth compressing. Pure decisions; the router does the work.

/// A content coding the router can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    /// Its name in `Content-Encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Br => "br",
            Self::Gzip => "gzip",
        }
    }
}

/// Bodies shorter than this (when their length is known) go as they are:
/// the coding's own overhead would eat the gain.
pub const MIN_LENGTH: u64 = 1024;

/// The coding for a client's `Accept-Encoding` values (RFC 9110 §12.5.3):
/// the highest q-value among those the router has; on a tie zstd, then
/// br, then gzip. `*` stands for any coding not named; `q=0` refuses one.
pub fn choose<'a>(accept: impl IntoIterator<Item = &'a [u8]>) -> Option<Coding> {
    const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];
    let mut named: [Option<u16>; 3] = [None; 3];
    let mut any: Option<u16> = None;
    for value in accept {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or_default().trim();
            let mut q = Some(1000);
            for p in parts {
                if let Some((k, v)) = p.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = qvalue(v.trim());
                }
            }
            let Some(q) = q else {
                continue;
            };
            if token == "*" {
                any = Some(q);
            } else if let Some(i) = ALL
                .iter()
                .position(|c| c.name().eq_ignore_ascii_case(token))
            {
                named[i] = Some(q);
            } else if token.eq_ignore_ascii_case("x-gzip") {
                named[2] = Some(named[2].map_or(q, |n| n.max(q)));
            }
        }
    }
    let mut best: Option<(u16, Coding)> = None;
    for (i, coding) in ALL.iter().enumerate() {
        let q = named[i].or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, *coding));
        }
    }
    best.map(|(_, c)| c)
}

/// A q-value in thousandths (`1`, `0.5`, `0.125`), or `None` when it is
/// not one.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_value = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(frac_value),
        "1" if frac_value == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a response of this `Content-Type` is worth compressing: text,
/// and the structured text formats (JSON, JavaScript, XML, SVG, …).
pub fn compressible(content_type: &[u8]) -> bool {
    let Ok(ct) = std::str::from_utf8(content_type) else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("text/") {
        return true;
    }
    const TYPES: [&str; 6] = [
        "application/json",
        "application/javascript",
        "application/xml",
        "application/wasm",
        "image/svg+xml",
        "application/x-ndjson",
    ];
    TYPES.contains(&mime.as_str()) || mime.ends_with("+json") || mime.ends_with("+xml")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(values: &[&str]) -> Option<Coding> {
        choose(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn the_coding_is_the_clients_highest_q_then_zstd_br_gzip() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&["identity"]), None);
        assert_eq!(pick(&["gzip"]), Some(Coding::Gzip));
        assert_eq!(pick(&["x-gzip"]), Some(Coding::Gzip));
        assert_eq!(pick(&["gzip, deflate, br"]), Some(Coding::Br));
        assert_eq!(pick(&["gzip, deflate, br, zstd"]), Some(Coding::Zstd));
        assert_eq!(pick(&["GZIP"]), Some(Coding::Gzip));
        // Spread over fields.
        assert_eq!(pick(&["gzip", "br"]), Some(Coding::Br));
        // q-values win over the router's order.
        assert_eq!(pick(&["zstd;q=0.5, gzip;q=0.8"]), Some(Coding::Gzip));
        assert_eq!(pick(&["br;q=0.9, gzip"]), Some(Coding::Gzip));
        assert_eq!(pick(&["br ; q=1.0 , gzip;q=0.999"]), Some(Coding::Br));
        // q=0 refuses; `*` covers what is not named.
        assert_eq!(pick(&["gzip;q=0"]), None);
        assert_eq!(pick(&["*"]), Some(Coding::Zstd));
        assert_eq!(pick(&["*;q=0.5, zstd;q=0, br;q=0"]), Some(Coding::Gzip));
        assert_eq!(pick(&["*;q=0"]), None);
        assert_eq!(pick(&["gzip;q=0.3, *;q=0.2"]), Some(Coding::Gzip));
        // An invalid q-value makes its item count for nothing.
        assert_eq!(pick(&["br;q=2, gzip;q=0.1"]), Some(Coding::Gzip));
        assert_eq!(pick(&["br;q=0.1234, gzip;q=0.001"]), Some(Coding::Gzip));
        assert_eq!(pick(&["br;q=x"]), None);
        assert_eq!(pick(&["br;q=1.5"]), None);
        assert_eq!(pick(&["br;q=1.000"]), Some(Coding::Br));
        assert_eq!(pick(&["br;q=0."]), None);
    }

    #[test]
    fn qvalues_are_read_in_thousandths() {
        assert_eq!(qvalue("1"), Some(1000));
        assert_eq!(qvalue("1."), Some(1000));
        assert_eq!(qvalue("0.5"), Some(500));
        assert_eq!(qvalue("0.05"), Some(50));
        assert_eq!(qvalue("0.125"), Some(125));
        assert_eq!(qvalue("0"), Some(0));
        assert_eq!(qvalue("0.1255"), None);
        assert_eq!(qvalue("1.001"), None);
        assert_eq!(qvalue("2"), None);
        assert_eq!(qvalue("-0.5"), None);
        assert_eq!(qvalue("0.+1"), None);
    }

    #[test]
    fn text_and_structured_text_are_compressible_the_rest_not() {
        for yes in [
            "text/html",
            "text/plain; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "application/atom+xml",
            "image/svg+xml",
            "application/javascript",
        ] {
            assert!(compressible(yes.as_bytes()), "{yes}");
        }
        for no in [
            "image/png",
            "application/octet-stream",
            "video/mp4",
            "application/zip",
            "",
        ] {
            assert!(!compressible(no.as_bytes()), "{no}");
        }
        assert!(!compressible(b"\xff"));
    }
}
