//! `[outbound]`: the hosts an app may send HTTP requests to, in the form of Spin's
//! `allowed_outbound_hosts` (`scheme://host[:port]`), and the bounds of each call.
//!
//! The same list is checked twice: in the pool, so a refused request needs no round trip, and
//! in cairnd, which connects for the pool and trusts nothing it asks. Only cairnd resolves
//! names, so only cairnd applies the address rule: loopback, link-local, unspecified,
//! multicast and broadcast addresses are reached only through an entry that names them (an
//! address literal, a CIDR holding it, or `localhost`), never through a name or a wildcard
//! that happens to resolve to one.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// At most this many `allowed_hosts` entries per app.
pub const MAX_ALLOWED_HOSTS: usize = 64;

/// One entry of `allowed_hosts`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    pub scheme: SchemeRule,
    pub host: HostRule,
    /// Inclusive.
    pub ports: (u16, u16),
    /// The entry as written, for messages.
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeRule {
    Http,
    Https,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// Exactly this name (lowercase, without a trailing dot).
    Name(String),
    /// `*.suffix`: any name ending in `.suffix`, not `suffix` itself.
    Subdomains(String),
    /// `*`: any host (but see the address rule).
    Any,
    /// An address literal.
    Address(IpAddr),
    /// An IPv4 network, `a.b.c.d/len`.
    Network(std::net::Ipv4Addr, u8),
}

impl FromStr for AllowedHost {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowedHost, String> {
        let wrong = |why: &str| {
            format!(
                "[outbound] allowed_hosts entry \"{}\": {why}",
                crate::spec::clip(text)
            )
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            wrong("write scheme://host[:port], such as \"https://api.example.com\" or \"http://192.168.1.20:8080\"")
        })?;
        let scheme = match scheme {
            "http" => SchemeRule::Http,
            "https" => SchemeRule::Https,
            "*" => SchemeRule::Any,
            _ => return Err(wrong("the scheme is http, https or *")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // A slash is a network's length (10.0.0.0/8) or the start of a path, which is refused.
        let path = rest
            .match_indices('/')
            .any(|(at, _)| !rest[at + 1..].starts_with(|c: char| c.is_ascii_digit()));
        if path || rest.contains('?') || rest.contains('#') || rest.contains('@') {
            return Err(wrong(
                "give a scheme, a host and a port only, without a path, query or user",
            ));
        }
        // The port is after the last colon, except inside an IPv6 literal's brackets.
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or_else(|| wrong("an IPv6 address is written in brackets, [::1]"))?;
            let port = match after {
                "" => None,
                after => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| wrong("a port follows the host after a colon"))?,
                ),
            };
            let address: std::net::Ipv6Addr = address
                .parse()
                .map_err(|_| wrong("the brackets do not hold an IPv6 address"))?;
            (HostRule::Address(IpAddr::V6(address)), port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            };
            if host.contains(':') {
                return Err(wrong(
                    "an IPv6 address is written in brackets, such as http://[fd00::1]:8080",
                ));
            }
            (parse_host(host).map_err(|why| wrong(&why))?, port)
        };
        let ports = match port {
            None => match scheme {
                SchemeRule::Http => (80, 80),
                SchemeRule::Https => (443, 443),
                SchemeRule::Any => {
                    return Err(wrong(
                        "a * scheme needs a port (such as *://host:8080, or :* for any port)",
                    ))
                }
            },
            Some("*") => (1, u16::MAX),
            Some(range) => {
                let number = |text: &str| {
                    text.parse::<u16>()
                        .ok()
                        .filter(|port| *port > 0)
                        .ok_or_else(|| wrong("a port is a number from 1 to 65535, a..b or *"))
                };
                match range.split_once("..") {
                    Some((low, high)) => {
                        let (low, high) = (number(low)?, number(high)?);
                        if low > high {
                            return Err(wrong("a port range goes from low to high"));
                        }
                        (low, high)
                    }
                    None => {
                        let port = number(range)?;
                        (port, port)
                    }
                }
            }
        };
        Ok(AllowedHost {
            scheme,
            host,
            ports,
            text: text.to_string(),
        })
    }
}

fn parse_host(host: &str) -> Result<HostRule, String> {
    if host == "*" {
        return Ok(HostRule::Any);
    }
    if let Some((address, length)) = host.split_once('/') {
        let address: std::net::Ipv4Addr = address
            .parse()
            .map_err(|_| "a network is an IPv4 address and a length, such as 10.0.0.0/8")?;
        let length: u8 = length
            .parse()
            .ok()
            .filter(|length| *length <= 32)
            .ok_or("a network's length is 0 to 32")?;
        return Ok(HostRule::Network(address, length));
    }
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(HostRule::Address(address));
    }
    let (subdomains, name) = match host.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, host),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if !usable_name(&name) {
        return Err("the host is a DNS name, *.suffix, *, an address or an IPv4 network (a name's last label does not start with a digit: 010.0.0.1 is not an address here)".into());
    }
    Ok(if subdomains {
        HostRule::Subdomains(name)
    } else {
        HostRule::Name(name)
    })
}

/// A DNS name cairnd will resolve: at most 253 bytes of labels of 1 to 63 letters, digits,
/// `-` and `_`, the last not starting with a digit. That last rule keeps out what resolvers
/// read as an address in another notation (`010.0.0.1`, `0x7f000001`, `127.1`), which would
/// slip past the address rule.
pub fn usable_name(name: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(label_ok)
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.starts_with(|c: char| c.is_ascii_digit()))
}

/// A request's host as the list compares it: a name lowercased without a trailing dot, or an
/// address (an IPv6 one with or without its brackets); `Unusable` for anything else (too long,
/// odd characters, an address in another notation), which no entry allows.
pub enum Target {
    Name(String),
    Address(IpAddr),
    Unusable,
}

impl Target {
    pub fn of(host: &str) -> Target {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(address) => Target::Address(address),
            Err(_) => {
                let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
                if usable_name(&name) {
                    Target::Name(name)
                } else {
                    Target::Unusable
                }
            }
        }
    }
}

impl AllowedHost {
    /// Whether this entry lets a request to `scheme://host:port` through (before the address
    /// rule, which only cairnd can apply).
    pub fn allows(&self, https: bool, target: &Target, port: u16) -> bool {
        let scheme = match self.scheme {
            SchemeRule::Any => true,
            SchemeRule::Http => !https,
            SchemeRule::Https => https,
        };
        let host = match (&self.host, target) {
            (_, Target::Unusable) => false,
            (HostRule::Any, _) => true,
            (HostRule::Name(name), Target::Name(target)) => name == target,
            (HostRule::Subdomains(suffix), Target::Name(target)) => target
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostRule::Address(address), Target::Address(target)) => {
                same_address(*address, *target)
            }
            (HostRule::Network(..), Target::Address(target)) => self.holds(*target),
            _ => false,
        };
        scheme && host && (self.ports.0..=self.ports.1).contains(&port)
    }

    /// Whether this entry names `address` itself: an equal literal, a network holding it, or
    /// `localhost` for a loopback address. Only such an entry reaches a special address.
    pub fn names(&self, address: IpAddr) -> bool {
        match &self.host {
            HostRule::Address(literal) => same_address(*literal, address),
            HostRule::Network(..) => self.holds(address),
            HostRule::Name(name) => name == "localhost" && address.is_loopback(),
            HostRule::Subdomains(_) | HostRule::Any => false,
        }
    }

    fn holds(&self, address: IpAddr) -> bool {
        let HostRule::Network(network, length) = self.host else {
            return false;
        };
        let address = match address {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return false,
            },
        };
        let mask = if length == 0 {
            0
        } else {
            u32::MAX << (32 - length)
        };
        u32::from(address) & mask == u32::from(network) & mask
    }
}

/// Equal, an IPv4 address and its IPv4-mapped IPv6 form counting as one.
fn same_address(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Cloud metadata services outside the link-local range (169.254.169.254 is in it): Alibaba's
/// and AWS's IPv6 one.
const METADATA: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// An address that no name or wildcard reaches: loopback, link-local, unspecified, multicast,
/// broadcast, the cloud metadata services (and their IPv4-mapped forms).
pub fn is_special(address: IpAddr) -> bool {
    if METADATA.contains(&address.to_canonical()) {
        return true;
    }
    match address.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

impl Serialize for AllowedHost {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for AllowedHost {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<AllowedHost, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The entry of `list` that lets `scheme://host:port` through, if one does.
pub fn find<'a>(
    list: &'a [AllowedHost],
    https: bool,
    host: &str,
    port: u16,
) -> Option<&'a AllowedHost> {
    let target = Target::of(host);
    list.iter().find(|entry| entry.allows(https, &target, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> AllowedHost {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn allows(text: &str, url: (&str, &str, u16)) -> bool {
        entry(text).allows(url.0 == "https", &Target::of(url.1), url.2)
    }

    #[test]
    fn entries_match_by_scheme_host_and_port() {
        assert!(allows(
            "https://api.example.com",
            ("https", "API.example.com.", 443)
        ));
        assert!(!allows(
            "https://api.example.com",
            ("http", "api.example.com", 443)
        ));
        assert!(!allows(
            "https://api.example.com",
            ("https", "api.example.com", 8443)
        ));
        assert!(!allows(
            "https://api.example.com",
            ("https", "example.com", 443)
        ));
        assert!(allows(
            "http://*.example.com",
            ("http", "a.b.example.com", 80)
        ));
        assert!(!allows("http://*.example.com", ("http", "example.com", 80)));
        assert!(!allows(
            "http://*.example.com",
            ("http", "badexample.com", 80)
        ));
        assert!(allows("*://*:*", ("https", "anything", 1)));
        assert!(allows(
            "*://plc.local:8000..8010",
            ("http", "plc.local", 8005)
        ));
        assert!(!allows(
            "*://plc.local:8000..8010",
            ("http", "plc.local", 8011)
        ));
        assert!(allows("http://127.0.0.1:9000", ("http", "127.0.0.1", 9000)));
        assert!(allows("http://[::1]:9000", ("http", "[::1]", 9000)));
        assert!(allows("http://10.0.0.0/8:*", ("http", "10.1.2.3", 5)));
        assert!(!allows("http://10.0.0.0/8:*", ("http", "11.1.2.3", 5)));
        assert!(!allows("http://10.0.0.0/8:*", ("http", "ten.example", 5)));
        // An IPv4 entry matches the IPv4-mapped IPv6 form of its address, and back.
        assert!(allows(
            "http://192.168.1.20",
            ("http", "[::ffff:192.168.1.20]", 80)
        ));
        assert!(allows(
            "http://192.168.1.0/24",
            ("http", "::ffff:192.168.1.7", 80)
        ));
        assert!(allows(
            "http://[::ffff:192.168.1.20]",
            ("http", "192.168.1.20", 80)
        ));
        // Case and a trailing dot do not matter, on either side.
        assert!(allows(
            "http://*.Example.COM.",
            ("http", "A.example.com.", 80)
        ));
        assert!(allows("http://0.0.0.0/0:*", ("http", "8.8.8.8", 1)));
        assert!(allows("http://10.1.2.3/32:*", ("http", "10.1.2.3", 1)));
        assert!(!allows("http://10.1.2.3/32:*", ("http", "10.1.2.4", 1)));
        // What a resolver would read as an address in another notation is no name: no entry,
        // not even *, allows it; nor a name too long for DNS.
        for odd in ["010.0.0.1", "0x7f000001", "127.1", "a..b", "bad host"] {
            assert!(!allows("http://*:*", ("http", odd, 80)), "{odd}");
        }
        let long = format!("{}.example.com", "a".repeat(250));
        assert!(!allows("http://*:*", ("http", &long, 80)));
        assert!(allows("http://*:*", ("http", "x-1.example.com", 80)));
    }

    #[test]
    fn special_addresses_need_an_entry_that_names_them() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(is_special(loopback));
        assert!(is_special("169.254.169.254".parse().unwrap()));
        assert!(is_special("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_special("fe80::1".parse().unwrap()));
        assert!(is_special("0.0.0.0".parse().unwrap()));
        assert!(!is_special("192.168.1.20".parse().unwrap()));
        assert!(is_special("100.100.100.200".parse().unwrap()));
        assert!(is_special("fd00:ec2::254".parse().unwrap()));
        assert!(entry("http://localhost:8080").names(loopback));
        assert!(entry("http://127.0.0.0/8:*").names(loopback));
        assert!(entry("http://127.0.0.1:1").names("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!entry("http://*:*").names(loopback));
        assert!(!entry("http://*.example.com").names(loopback));
        assert!(!entry("http://api.example.com").names(loopback));
    }

    #[test]
    fn bad_entries_say_what_to_write() {
        for (text, says) in [
            ("api.example.com", "scheme://host"),
            ("ftp://api.example.com", "http, https or *"),
            ("*://api.example.com", "needs a port"),
            ("https://api.example.com/path", "without a path"),
            ("https://user@api.example.com", "without a path"),
            ("https://api.example.com:0", "1 to 65535"),
            ("https://api.example.com:9..8", "low to high"),
            ("https://exa mple.com", "DNS name"),
            ("https://10.0.0.0/33", "0 to 32"),
            ("https://[::1", "brackets"),
            ("http://fe80::1:8080", "in brackets"),
            ("http://010.0.0.1", "DNS name"),
        ] {
            let error = text.parse::<AllowedHost>().unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
            assert!(error.contains("[outbound] allowed_hosts"), "{error}");
        }
    }
}
