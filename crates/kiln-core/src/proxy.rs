//! Who the client is behind a load balancer: trusted proxies (CIDRs) and
//! the PROXY protocol (HAProxy's, versions 1 and 2) that such a proxy puts
//! before the connection's first byte.
//!
//! Everything here reads bytes a peer sent: a header is accepted only
//! whole and well-formed, at most [`MAX_HEADER`] bytes, and only from a
//! peer in the trusted list (the caller's check, with [`Cidr::contains`]).

use std::net::{IpAddr, SocketAddr};

/// A v1 header is at most 107 bytes; a v2 header's addresses may carry
/// TLVs, which are skipped, up to this in all.
pub const MAX_HEADER: usize = 536;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A network: an address and a prefix length (`10.0.0.0/8`,
/// `2001:db8::/32`; an address alone is the one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or a network (10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { net, prefix })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address is its
    /// IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a PROXY header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The client's address (and the one it connected to).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy's own connection (a health check), or a protocol it does
    /// not name: the peer is the client.
    Local,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not begin with a PROXY protocol header")]
    Missing,
    #[error("a PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("an invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
}

/// Parse the PROXY header at the start of `buf`: the header and its
/// length, or `None` while more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let v1 = b"PROXY ";
    if buf.starts_with(v1) {
        return parse_v1(buf);
    }
    if buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    // Too short to tell yet, unless it already cannot be either (a buffer
    // as long as a signature, or longer, was matched above or is neither).
    let could_be = |sig: &[u8]| sig.starts_with(buf);
    if could_be(v1) || could_be(V2_SIGNATURE) {
        Ok(None)
    } else {
        Err(ProxyError::Missing)
    }
}

/// `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN …\r\n`.
fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    const MAX_V1: usize = 107;
    let Some(end) = buf.windows(2).take(MAX_V1 - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Invalid("not text"))?;
    let mut words = line.split(' ');
    let _proxy = words.next();
    // The line begins `PROXY `: there is a second word, if empty.
    let family = words.next().unwrap_or_default();
    if family == "UNKNOWN" {
        return Ok(Some((Header::Local, end + 2)));
    }
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::Invalid("not four addresses and ports"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let ip: IpAddr = s.parse().map_err(|_| ProxyError::Invalid("an address"))?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            ("TCP4" | "TCP6", _) => Err(ProxyError::Invalid("an address of the other family")),
            _ => Err(ProxyError::Invalid(
                "a protocol other than TCP4, TCP6, UNKNOWN",
            )),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        // Decimal, no sign, no leading zero (but 0 itself).
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ProxyError::Invalid("a port"));
        }
        s.parse().map_err(|_| ProxyError::Invalid("a port"))
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some((
        Header::Proxied {
            source,
            destination,
        },
        end + 2,
    )))
}

/// The binary header: signature, version and command, family and
/// protocol, the length of what follows, the addresses (and TLVs).
fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Invalid("version is not 2"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    match ver_cmd & 0xf {
        0 => return Ok(Some((Header::Local, len))),
        1 => {}
        _ => return Err(ProxyError::Invalid("a command other than LOCAL or PROXY")),
    }
    let header = match fam {
        // TCP over IPv4: 4 + 4 + 2 + 2.
        0x11 => {
            let a = body
                .get(..12)
                .ok_or(ProxyError::Invalid("IPv4 addresses cut short"))?;
            let ip = |i: usize| IpAddr::from([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6: 16 + 16 + 2 + 2.
        0x21 => {
            let a = body
                .get(..36)
                .ok_or(ProxyError::Invalid("IPv6 addresses cut short"))?;
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::from(o)
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC, UDP, Unix sockets: no client address to take.
        _ => Header::Local,
    };
    Ok(Some((header, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(fam);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn proxied(src: &str, dst: &str) -> Header {
        Header::Proxied {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[test]
    fn version_1_headers_are_read_whole_and_exactly() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((proxied("203.0.113.7:51234", "10.0.0.1:443"), 43)))
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert_eq!(
            parse(h6),
            Ok(Some((
                proxied("[2001:db8::1]:1", "[2001:db8::2]:65535"),
                h6.len()
            )))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((Header::Local, 15))));
        // Port 0 is a port (a leading zero before others is not).
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 10\r\n"),
            Ok(Some((proxied("1.2.3.4:0", "5.6.7.8:10"), 33)))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nx"),
            Ok(Some((Header::Local, 35)))
        );
        // Every cut short of the end asks for more.
        for n in 0..h.len() - 17 {
            assert_eq!(parse(&h[..n]), Ok(None), "{n}");
        }
        for (bad, why) in [
            (&b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..], "four"),
            (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "other family"),
            (b"PROXY TCP6 10.0.0.2 10.0.0.1 1 2\r\n", "other family"),
            (b"PROXY UDP4 10.0.0.2 10.0.0.1 1 2\r\n", "other than TCP4"),
            (b"PROXY TCP4 10.0.0.2 10.0.0.1 01 2\r\n", "a port"),
            (b"PROXY TCP4 10.0.0.2 10.0.0.1 +1 2\r\n", "a port"),
            (b"PROXY TCP4 10.0.0.2 10.0.0.1 1 65536\r\n", "a port"),
            (b"PROXY TCP4 10.0.0.2 10.0.0.1  1 2\r\n", "four"),
            (b"PROXY TCP4 10.0.0.256 10.0.0.1 1 2\r\n", "an address"),
            (b"PROXY \r\n", "four"),
            (b"PROXY TCP4 10.0.0.2 10.0.0.1 1 2 3\r\n", "four"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.to_string().contains(why),
                "{}: {err}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"PROXY TCP4 0 0 0 0 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), Err(ProxyError::TooLong));
        // A v1 line is at most 107 bytes, its CRLF included.
        let line = |len: usize| {
            let mut l = b"PROXY UNKNOWN ".to_vec();
            l.resize(len - 2, b'x');
            l.extend_from_slice(b"\r\n");
            l
        };
        assert_eq!(parse(&line(107)), Ok(Some((Header::Local, 107))));
        assert_eq!(parse(&line(108)), Err(ProxyError::TooLong));
        assert_eq!(parse(&line(108)[..106]), Ok(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(b"GET"), Err(ProxyError::Missing));
        assert_eq!(parse(b"PRO"), Ok(None));
    }

    #[test]
    fn version_2_headers_are_read_whole_and_exactly() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1];
        body.extend_from_slice(&51234u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &body);
        let mut with_rest = h.clone();
        with_rest.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&with_rest),
            Ok(Some((proxied("203.0.113.7:51234", "10.0.0.1:443"), 28)))
        );
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Ok(None), "{n}");
        }
        // TLVs after the addresses are part of the header, skipped.
        let mut tlv = body.clone();
        tlv.extend_from_slice(&[0x04, 0, 2, b'h', b'i']);
        assert_eq!(
            parse(&v2(1, 0x11, &tlv)),
            Ok(Some((proxied("203.0.113.7:51234", "10.0.0.1:443"), 33)))
        );
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[31] = 2;
        six[32..34].copy_from_slice(&7u16.to_be_bytes());
        six[34..36].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &six)),
            Ok(Some((proxied("[::1]:7", "[::2]:8"), 52)))
        );
        // LOCAL (a health check), and families without a TCP client.
        assert_eq!(parse(&v2(0, 0x11, &body)), Ok(Some((Header::Local, 28))));
        assert_eq!(parse(&v2(1, 0x00, &[])), Ok(Some((Header::Local, 16))));
        assert_eq!(parse(&v2(1, 0x12, &body)), Ok(Some((Header::Local, 28))));
        // Cut short, the wrong version or command, too long.
        assert!(matches!(
            parse(&v2(1, 0x11, &body[..8])),
            Err(ProxyError::Invalid(_))
        ));
        assert!(matches!(
            parse(&v2(1, 0x21, &body)),
            Err(ProxyError::Invalid(_))
        ));
        let mut wrong = h.clone();
        wrong[12] = 0x11;
        assert_eq!(parse(&wrong), Err(ProxyError::Invalid("version is not 2")));
        let mut cmd = h.clone();
        cmd[12] = 0x22;
        assert!(matches!(parse(&cmd), Err(ProxyError::Invalid(_))));
        let long = v2(1, 0x11, &vec![0u8; MAX_HEADER - 15]);
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        let fits = v2(1, 0x11, &vec![0u8; MAX_HEADER - 16]);
        assert!(matches!(parse(&fits), Ok(Some((_, MAX_HEADER)))));
    }

    #[test]
    fn networks_contain_their_addresses_and_only_those() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let host = Cidr::parse("127.0.0.1").unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("255.1.2.3".parse().unwrap()));
        let six = Cidr::parse("2001:db8::/32").unwrap();
        assert!(six.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!six.contains("2001:db9::".parse().unwrap()));
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert_eq!(six.to_string(), "2001:db8::/32");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/-1",
            "10.0.0.0/",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_header_within_them_or_an_error_never_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..700)
        ) {
            if let Ok(Some((_, len))) = parse(&bytes) {
                prop_assert!(len <= bytes.len() && len <= MAX_HEADER);
            }
        }

        #[test]
        fn a_v1_header_round_trips(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), p in any::<u16>(), q in any::<u16>()) {
            let (s, d) = (IpAddr::from(a), IpAddr::from(b));
            let text = format!("PROXY TCP4 {s} {d} {p} {q}\r\n");
            prop_assert_eq!(
                parse(text.as_bytes()),
                Ok(Some((Header::Proxied { source: SocketAddr::new(s, p), destination: SocketAddr::new(d, q) }, text.len())))
            );
        }

        #[test]
        fn a_prefix_contains_exactly_the_addresses_that_share_its_bits(net in any::<u32>(), ip in any::<u32>(), prefix in 0u8..=32) {
            let c = Cidr::parse(&format!("{}/{prefix}", std::net::Ipv4Addr::from(net))).unwrap();
            let same = (0..u32::from(prefix)).all(|i| (net >> (31 - i)) & 1 == (ip >> (31 - i)) & 1);
            prop_assert_eq!(c.contains(IpAddr::from(std::net::Ipv4Addr::from(ip))), same);
        }
    }
}
