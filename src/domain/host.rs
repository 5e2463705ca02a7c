//! The private-host guard (SSRF): a repo URL's host read the way a resolver reads it,
//! and the addresses this hub refuses to connect to. Pure: resolving names is the
//! worker's job at connect time; this module decides about addresses.
//!
//! Every spelling of an IPv4 address that `inet_aton` accepts (`127.1`, `2130706433`,
//! `0x7f000001`, `0177.0.0.1`, `127.000.000.001`) is read as that address, and IPv6
//! forms that carry an IPv4 address (v4-mapped, v4-compatible, NAT64, 6to4) are judged
//! by the address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A repo URL's host, as a resolver would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A lowercase DNS name without a trailing dot.
    Name(String),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("the host is not a valid host name or address")]
    Invalid,
}

impl Host {
    /// Reads `raw` (a URL's host, brackets included for IPv6) the way the system
    /// resolver will: numeric spellings become the address they stand for. Percent
    /// signs (encoded names, IPv6 zone ids), empty labels and characters outside host
    /// names are refused.
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        if raw.is_empty() || raw.len() > 253 + 2 || raw.contains('%') {
            return Err(HostError::Invalid);
        }
        if let Some(inner) = raw.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(HostError::Invalid)?;
            let v6: Ipv6Addr = inner.parse().map_err(|_| HostError::Invalid)?;
            return Ok(Host::Ip(IpAddr::V6(v6)));
        }
        if let Ok(v6) = raw.parse::<Ipv6Addr>() {
            return Ok(Host::Ip(IpAddr::V6(v6)));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        if labels
            .iter()
            .any(|label| label.is_empty() || label.len() > 63)
        {
            return Err(HostError::Invalid);
        }
        // as the WHATWG URL parser and inet_aton do: a host whose last label is a
        // number is an IPv4 address, or nothing
        if labels
            .last()
            .is_some_and(|label| parse_number(label).is_some())
        {
            return parse_ipv4(&labels)
                .map(|v4| Host::Ip(IpAddr::V4(v4)))
                .ok_or(HostError::Invalid);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(HostError::Invalid);
        }
        Ok(Host::Name(name))
    }

    /// Whether the host is refused before any lookup: a private address, or a name
    /// that always means this machine.
    pub fn is_private(&self) -> bool {
        match self {
            Host::Ip(ip) => !is_public(*ip),
            Host::Name(name) => name == "localhost" || name.ends_with(".localhost"),
        }
    }
}

/// One label of a numeric IPv4 spelling: decimal, octal (leading `0`) or hex (`0x`).
fn parse_number(label: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        (hex, 16)
    } else if label.len() > 1 && label.starts_with('0') {
        (&label[1..], 8)
    } else {
        (label, 10)
    };
    if digits.is_empty() {
        // "0x" alone is zero to inet_aton
        return (radix == 16).then_some(0);
    }
    if digits.len() > 32 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// inet_aton's forms: `a`, `a.b`, `a.b.c`, `a.b.c.d`, the last part filling the
/// bytes the others leave.
fn parse_ipv4(labels: &[&str]) -> Option<Ipv4Addr> {
    if labels.is_empty() || labels.len() > 4 {
        return None;
    }
    let numbers: Vec<u64> = labels
        .iter()
        .map(|label| parse_number(label))
        .collect::<Option<_>>()?;
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|part| *part > 255) {
        return None;
    }
    let last_bytes = 4 - leading.len() as u32;
    if *last >= 1u64 << (8 * last_bytes) {
        return None;
    }
    let mut value: u64 = 0;
    for (index, part) in leading.iter().enumerate() {
        value |= part << (8 * (3 - index));
    }
    value |= last;
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// Whether this hub may connect to `ip`: not loopback, private, link-local, CGNAT,
/// multicast, unspecified, reserved, documentation or benchmark space, nor an IPv6 form
/// that carries such an IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    let refused = a == 0 // "this network", 0.0.0.0 included
        || a == 10
        || a == 127
        || (a == 100 && (b & 0xc0) == 64) // carrier-grade NAT 100.64/10
        || (a == 169 && b == 254) // link-local
        || (a == 172 && (b & 0xf0) == 16)
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // documentation
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18/15
        || (a == 198 && b == 51 && c == 100) // documentation
        || (a == 203 && b == 0 && c == 113) // documentation
        || a >= 224; // multicast, reserved, broadcast
    !refused
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let segments = v6.segments();
    let embedded_v4 = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    // ::ffff:a.b.c.d, v4-mapped
    if let Some(v4) = v6.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    // ::a.b.c.d (v4-compatible, deprecated), :: and ::1 among them: never public
    if segments[..6].iter().all(|s| *s == 0) {
        return false;
    }
    // NAT64 64:ff9b::/96 reaches the IPv4 address it carries
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(segments[6], segments[7]));
    }
    // 6to4 2002::/16 carries an IPv4 address in bits 16..48
    if segments[0] == 0x2002 {
        return is_public_v4(embedded_v4(segments[1], segments[2]));
    }
    let first = segments[0];
    let refused = (first == 0x64 && segments[1] == 0xff9b && segments[2] == 1) // local NAT64
        || (first == 0x100 && segments[1..4] == [0, 0, 0]) // discard-only 100::/64
        || (first == 0x2001 && segments[1] == 0) // Teredo: the IPv4 end is hidden
        || (first == 0x2001 && segments[1] == 0xdb8) // documentation
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (first & 0xff00) == 0xff00; // multicast
    !refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> Host {
        Host::Ip(text.parse().expect("an address"))
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback() {
        for spelling in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0177.0.0.1",
            "127.000.000.001",
            "0x7f.1",
            "127.0.1",
            "127.0.0.1.",
        ] {
            let host = Host::parse(spelling).expect(spelling);
            assert!(
                matches!(host, Host::Ip(IpAddr::V4(v4)) if v4.is_loopback()),
                "{spelling} → {host:?}"
            );
            assert!(host.is_private(), "{spelling}");
        }
        assert_eq!(Host::parse("0"), Ok(ip("0.0.0.0")));
        assert!(Host::parse("0").expect("zero").is_private());
    }

    #[test]
    fn ipv6_forms_carrying_a_private_ipv4_address_are_private() {
        for spelling in [
            "[::1]",
            "[::]",
            "[::127.0.0.1]",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[64:ff9b::7f00:1]",
            "[64:ff9b::10.0.0.1]",
            "[64:ff9b:1::1]",
            "[2002:7f00:1::]",
            "[2002:a9fe:a9fe::1]",
            "[fd00::1]",
            "[fe80::1]",
            "[ff02::1]",
            "[2001:db8::1]",
            "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
        ] {
            let host = Host::parse(spelling).expect(spelling);
            assert!(host.is_private(), "{spelling} → {host:?}");
        }
        for public in [
            "[2606:4700::1111]",
            "[64:ff9b::808:808]",
            "[2002:808:808::1]",
        ] {
            assert!(!Host::parse(public).expect(public).is_private(), "{public}");
        }
    }

    #[test]
    fn private_ranges_of_ipv4_are_refused_and_public_ones_are_not() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "192.0.2.1",
        ] {
            assert!(!is_public(private.parse().expect("address")), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "198.20.0.1",
        ] {
            assert!(is_public(public.parse().expect("address")), "{public}");
        }
    }

    #[test]
    fn names_are_lowercased_and_localhost_is_private() {
        assert_eq!(
            Host::parse("GitHub.COM."),
            Ok(Host::Name("github.com".into()))
        );
        assert!(Host::parse("localhost").expect("name").is_private());
        assert!(Host::parse("a.LOCALHOST").expect("name").is_private());
        assert!(!Host::parse("example.com").expect("name").is_private());
        // a name that merely starts with digits is a name
        assert_eq!(
            Host::parse("1password.com"),
            Ok(Host::Name("1password.com".into()))
        );
    }

    #[test]
    fn encoded_odd_and_overflowing_hosts_are_invalid() {
        for invalid in [
            "%31%32%37.0.0.1",
            "[fe80::1%25eth0]",
            "",
            "a..b",
            "256.0.0.1",
            "1.2.3.4.5",
            "4294967296",
            "0x100000000",
            "1.2.65536",
            "089.0.0.1",
            "exa mple.com",
            "[::1",
            "ex%61mple.com",
        ] {
            assert_eq!(Host::parse(invalid), Err(HostError::Invalid), "{invalid:?}");
        }
    }

    proptest! {
        /// Any address written in any inet_aton form parses back to itself.
        #[test]
        fn numeric_spellings_round_trip(value in any::<u32>(), form in 0usize..4) {
            let v4 = Ipv4Addr::from(value);
            let [a, b, c, d] = v4.octets();
            let spelling = match form {
                0 => format!("{value}"),
                1 => format!("0x{value:x}"),
                2 => format!("{a}.{}", u32::from_be_bytes([0, b, c, d])),
                _ => format!("0{a:o}.0x{b:x}.{}", u16::from_be_bytes([c, d])),
            };
            prop_assert_eq!(Host::parse(&spelling), Ok(Host::Ip(IpAddr::V4(v4))));
        }

        /// Nothing that parses as a private address is called public.
        #[test]
        fn the_guard_agrees_with_std_on_the_ranges_std_knows(value in any::<u32>()) {
            let v4 = Ipv4Addr::from(value);
            if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
                || v4.is_broadcast() || v4.is_multicast() || v4.is_documentation()
            {
                prop_assert!(!is_public(IpAddr::V4(v4)));
                prop_assert!(!is_public(IpAddr::V6(v4.to_ipv6_mapped())));
            }
        }
    }
}
