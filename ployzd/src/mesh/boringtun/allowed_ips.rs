//! Allowed IPs: the prefixes a peer may send from and receive for, and the
//! longest-prefix table that routes an outbound packet to its peer. Pure data,
//! no I/O; small clusters keep a few prefixes per peer, so a linear scan is
//! enough and keeps the code obviously correct.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address prefix such as `fd00::2/128` or `10.0.0.0/8`, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowedIp {
    address: IpAddr,
    prefix_len: u8,
}

/// Why a prefix could not be built or parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowedIpError {
    #[error("`{text}` is not an address/prefix-length pair")]
    Malformed { text: String },
    #[error("`{text}` has an invalid address")]
    BadAddress { text: String },
    #[error("prefix length {prefix_len} is too long for `{address}` (max {max})")]
    PrefixTooLong {
        address: IpAddr,
        prefix_len: u8,
        max: u8,
    },
}

impl AllowedIp {
    /// A prefix of `prefix_len` bits of `address`; host bits are cleared.
    pub fn new(address: IpAddr, prefix_len: u8) -> Result<Self, AllowedIpError> {
        let max = max_len(address);
        if prefix_len > max {
            return Err(AllowedIpError::PrefixTooLong {
                address,
                prefix_len,
                max,
            });
        }
        Ok(Self {
            address: mask(address, prefix_len),
            prefix_len,
        })
    }

    /// The network address (host bits cleared).
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The number of leading bits that must match.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `address` lies inside this prefix (never across families).
    pub fn contains(&self, address: IpAddr) -> bool {
        address.is_ipv4() == self.address.is_ipv4()
            && mask(address, self.prefix_len) == self.address
    }
}

fn max_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & kept).into())
        }
    }
}

impl FromStr for AllowedIp {
    type Err = AllowedIpError;

    /// Parses `address/len`; a bare address means a host prefix (/32 or /128).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address_text, len_text) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (text, None),
        };
        let address: IpAddr = address_text
            .parse()
            .map_err(|_| AllowedIpError::BadAddress {
                text: text.to_owned(),
            })?;
        let prefix_len = match len_text {
            Some(len) => len.parse::<u8>().map_err(|_| AllowedIpError::Malformed {
                text: text.to_owned(),
            })?,
            None => max_len(address),
        };
        Self::new(address, prefix_len)
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// Maps prefixes to values (peers); a lookup returns the value of the longest
/// matching prefix. Inserting an existing prefix moves it to the new value, as
/// WireGuard does when two peers claim the same allowed IP.
#[derive(Debug, Clone)]
pub struct AllowedIpTable<T> {
    entries: Vec<(AllowedIp, T)>,
}

impl<T> Default for AllowedIpTable<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> AllowedIpTable<T> {
    /// Routes `prefix` to `value`, taking it away from any previous owner.
    pub fn insert(&mut self, prefix: AllowedIp, value: T) {
        match self.entries.iter_mut().find(|(p, _)| *p == prefix) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((prefix, value)),
        }
    }

    /// Drops every prefix routed to `value`.
    pub fn remove_value(&mut self, value: &T) {
        self.entries.retain(|(_, v)| v != value);
    }

    /// The value of the longest prefix containing `address`.
    pub fn lookup(&self, address: IpAddr) -> Option<&T> {
        self.entries
            .iter()
            .filter(|(prefix, _)| prefix.contains(address))
            .max_by_key(|(prefix, _)| prefix.prefix_len())
            .map(|(_, value)| value)
    }

    /// The prefixes routed to `value`, in insertion order.
    pub fn prefixes_of<'a>(&'a self, value: &'a T) -> impl Iterator<Item = AllowedIp> + 'a {
        self.entries
            .iter()
            .filter(move |(_, v)| v == value)
            .map(|(prefix, _)| *prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test input is valid")
    }

    #[test]
    fn parses_and_masks_host_bits() {
        let prefix: AllowedIp = "10.1.2.3/8".parse().expect("test input is valid");
        assert_eq!(prefix.to_string(), "10.0.0.0/8");
        let prefix: AllowedIp = "fd00::2/64".parse().expect("test input is valid");
        assert_eq!(prefix.to_string(), "fd00::/64");
        let prefix: AllowedIp = "fd00::2".parse().expect("test input is valid");
        assert_eq!(prefix.to_string(), "fd00::2/128");
        let prefix: AllowedIp = "0.0.0.0/0".parse().expect("test input is valid");
        assert!(prefix.contains(ip("1.2.3.4")));
        assert!(!prefix.contains(ip("::1")));
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        assert!(matches!(
            "10.0.0.0/33".parse::<AllowedIp>(),
            Err(AllowedIpError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            "::/129".parse::<AllowedIp>(),
            Err(AllowedIpError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<AllowedIp>(),
            Err(AllowedIpError::Malformed { .. })
        ));
        assert!(matches!(
            "10.0.0.0/-1".parse::<AllowedIp>(),
            Err(AllowedIpError::Malformed { .. })
        ));
        assert!(matches!(
            "nonsense/8".parse::<AllowedIp>(),
            Err(AllowedIpError::BadAddress { .. })
        ));
        assert!(matches!(
            "".parse::<AllowedIp>(),
            Err(AllowedIpError::BadAddress { .. })
        ));
    }

    #[test]
    fn lookup_prefers_the_longest_prefix() {
        let mut table = AllowedIpTable::default();
        table.insert("0.0.0.0/0".parse().expect("test input is valid"), "default");
        table.insert("10.0.0.0/8".parse().expect("test input is valid"), "wide");
        table.insert(
            "10.1.0.0/16".parse().expect("test input is valid"),
            "narrow",
        );
        table.insert("fd00::/64".parse().expect("test input is valid"), "six");
        table.insert("fd00::2/128".parse().expect("test input is valid"), "host");
        assert_eq!(table.lookup(ip("10.1.2.3")), Some(&"narrow"));
        assert_eq!(table.lookup(ip("10.2.2.3")), Some(&"wide"));
        assert_eq!(table.lookup(ip("192.168.1.1")), Some(&"default"));
        assert_eq!(table.lookup(ip("fd00::2")), Some(&"host"));
        assert_eq!(table.lookup(ip("fd00::3")), Some(&"six"));
        assert_eq!(table.lookup(ip("fd01::3")), None);
    }

    #[test]
    fn insert_moves_a_prefix_and_remove_drops_a_peer() {
        let mut table = AllowedIpTable::default();
        table.insert("fd00::/64".parse().expect("test input is valid"), 1);
        table.insert("fd00::/64".parse().expect("test input is valid"), 2);
        assert_eq!(table.lookup(ip("fd00::9")), Some(&2));
        assert_eq!(table.prefixes_of(&1).count(), 0);
        table.insert("10.0.0.0/8".parse().expect("test input is valid"), 1);
        table.remove_value(&2);
        assert_eq!(table.lookup(ip("fd00::9")), None);
        assert_eq!(table.lookup(ip("10.0.0.1")), Some(&1));
    }
}
