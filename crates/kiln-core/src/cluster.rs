//! What names a cluster's parts on the command line (`kiln serve --etcd
//! URL --etcd-prefix PREFIX --node NAME`), checked before anything
//! connects: each a clear one-line refusal naming what is wrong.

/// An etcd client URL: `http://HOST:PORT` or `https://HOST:PORT` (TLS,
/// with `--etcd-ca`), nothing after the port (etcd's API has no path of
/// its own).
pub fn check_etcd_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("`{url}`: an etcd URL starts with http:// or https://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        format!("`{url}`: an etcd URL names its port (e.g. http://127.0.0.1:2379)")
    })?;
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err(format!("`{url}`: no host, or a path after it"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{url}`: `{port}` is not a port")),
    }
}

/// TLS to etcd is all or nothing: `https://` URLs need the CA that signed
/// etcd's certificate (`--etcd-ca`), and a CA or a client certificate
/// means nothing over `http://`.
pub fn check_etcd_tls(urls: &[String], ca: bool, client_cert: bool) -> Result<(), String> {
    let https = urls.iter().filter(|u| u.starts_with("https://")).count();
    if https > 0 && https < urls.len() {
        return Err("the etcd URLs mix http:// and https://: use one for all".to_owned());
    }
    if https > 0 && !ca {
        return Err(format!(
            "`{}`: TLS to etcd needs --etcd-ca FILE (the CA that signed etcd's certificate, PEM)",
            urls[0]
        ));
    }
    if https == 0 && (ca || client_cert) {
        return Err(
            "--etcd-ca, --etcd-cert and --etcd-key are for TLS: give the etcd URLs as https://"
                .to_owned(),
        );
    }
    Ok(())
}

/// A key prefix for a cluster's state: starts and ends with `/` (so that
/// `/kiln/` and `/kiln2/` never overlap) with a name between, printable,
/// at most 128 bytes.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() < 3 || !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "`{prefix}`: a prefix starts and ends with / (e.g. /kiln/)"
        ));
    }
    if prefix.len() > 128 || prefix.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "`{prefix}`: at most 128 printable characters, no spaces"
        ));
    }
    Ok(())
}

/// A node's name: what assignments and observations call it, and a part
/// of etcd keys — 1 to 63 of `a-z`, `0-9`, `-` and `.`, starting with a
/// letter or digit (a host name's label rules, dots allowed).
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}`: a node name is 1 to 63 of a-z, 0-9, - and ., starting with a letter or digit"
        ))
    }
}

/// A node's advertised address: where the other nodes reach its instances
/// and where its listeners without an IP (`listen = ":8080"`) bind. One
/// address of a host, so neither unspecified (`0.0.0.0`) nor multicast.
pub fn check_advertise(ip: std::net::IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() {
        Err(format!(
            "`{ip}`: advertise one address of this host that the other nodes reach (not unspecified, not multicast)"
        ))
    } else {
        Ok(())
    }
}

/// A node label (`kiln serve --label zone=eu-1`) and a service's
/// `node_labels`: a key of 1 to 63 of `a-z 0-9 - _ . /`, a value of at
/// most 63 of those and `A-Z`.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_./".contains(c));
    let value_ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if key_ok && value_ok {
        Ok(())
    } else {
        Err(format!(
            "label `{key}={value}`: a key is 1 to 63 of a-z, 0-9, - _ . /; a value at most 63 of those and A-Z"
        ))
    }
}

/// `KEY=VALUE`, checked.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}`: expected KEY=VALUE"))?;
    check_label(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Whether a node with `labels` may run a service that asks for `wanted`
/// (every wanted label, with its value).
pub fn labels_match(
    labels: &std::collections::BTreeMap<String, String>,
    wanted: &std::collections::BTreeMap<String, String>,
) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_and_matched_whole() {
        assert_eq!(parse_label("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert_eq!(parse_label("disk=SSD"), Ok(("disk".into(), "SSD".into())));
        assert_eq!(
            parse_label("k8s.io/role="),
            Ok(("k8s.io/role".into(), String::new()))
        );
        for bad in [
            "zone",
            "=eu",
            "Zone=eu",
            "zone=e u",
            "zone=é",
            &format!("{}=x", "k".repeat(64)),
        ] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
        let m = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let node = m(&[("zone", "a"), ("disk", "ssd")]);
        assert!(labels_match(&node, &m(&[])));
        assert!(labels_match(&node, &m(&[("zone", "a")])));
        assert!(labels_match(&node, &m(&[("zone", "a"), ("disk", "ssd")])));
        assert!(!labels_match(&node, &m(&[("zone", "b")])));
        assert!(!labels_match(&node, &m(&[("zone", "a"), ("gpu", "yes")])));
        assert!(!labels_match(&m(&[]), &m(&[("zone", "a")])));
    }

    #[test]
    fn an_advertised_address_is_one_address_of_a_host() {
        for good in ["127.0.0.2", "10.0.0.7", "::1", "fd00::1"] {
            assert_eq!(check_advertise(good.parse().unwrap()), Ok(()), "{good}");
        }
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1"] {
            let e = check_advertise(bad.parse().unwrap()).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn etcd_urls_name_a_scheme_a_host_and_a_port() {
        for good in [
            "http://127.0.0.1:2379",
            "http://etcd-1.example.com:2379",
            "http://[::1]:2379",
            "http://127.0.0.1:2379/",
            "https://etcd-1.example.com:2379",
        ] {
            assert_eq!(check_etcd_url(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1:2379",
            "ftp://h:1",
            "http://h",
            "http://:2379",
            "http://h:0",
            "http://h:99999",
            "http://h:2379/v3",
            "http://u@h:2379",
            "https://h",
            "httpss://h:2379",
        ] {
            let e = check_etcd_url(bad).unwrap_err();
            assert!(e.contains(bad), "{e} names {bad}");
        }
    }

    #[test]
    fn tls_to_etcd_is_all_or_nothing() {
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_etcd_tls(&urls(&["http://h:1"]), false, false), Ok(()));
        assert_eq!(check_etcd_tls(&urls(&["https://h:1"]), true, false), Ok(()));
        assert_eq!(
            check_etcd_tls(&urls(&["https://h:1", "https://g:1"]), true, true),
            Ok(())
        );
        let e = check_etcd_tls(&urls(&["https://h:1"]), false, false).unwrap_err();
        assert!(e.contains("needs --etcd-ca"), "{e}");
        let e = check_etcd_tls(&urls(&["http://h:1"]), true, false).unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let e = check_etcd_tls(&urls(&["http://h:1"]), false, true).unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let e = check_etcd_tls(&urls(&["http://h:1", "https://g:1"]), true, false).unwrap_err();
        assert!(e.contains("mix"), "{e}");
        assert_eq!(check_etcd_tls(&[], false, false), Ok(()));
    }

    #[test]
    fn prefixes_are_delimited_by_slashes() {
        assert_eq!(check_prefix("/kiln/"), Ok(()));
        assert_eq!(check_prefix("/a/b/"), Ok(()));
        assert_eq!(check_prefix("/a/"), Ok(()));
        for bad in ["", "/", "//", "kiln/", "/kiln", "/ki ln/", "/a\n/"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix(&format!("/{}/", "a".repeat(127))).is_err());
        assert_eq!(check_prefix(&format!("/{}/", "a".repeat(126))), Ok(()));
    }

    #[test]
    fn node_names_are_host_name_labels() {
        for good in ["n1", "node-2", "a", "web.eu-1", "0node"] {
            assert_eq!(check_node_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-n", ".n", "N1", "n/1", "n 1", "n_1"] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_node_name(&"a".repeat(63)), Ok(()));
        assert!(check_node_name(&"a".repeat(64)).is_err());
    }
}
