//! Overlay addressing: every network has one IPv6 ULA prefix (a random /48,
//! RFC 4193), cut into /64 subnets; each machine claims one subnet by
//! create-if-absent in the store (`subnets.<index>`), and its overlay address
//! and its containers' addresses come from that subnet. Two machines racing for
//! the same subnet cannot both win: the loser sees the record exist and tries
//! the next index. A machine that already holds a subnet gets the same one
//! back, so a retried join claims nothing new.

use std::{fmt, net::Ipv6Addr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::store::{Key, KeyPrefix, RecordStore, StoreError, encode};

/// Subnet indices run from 1 to this; 0 is never handed out.
const MAX_SUBNET_INDEX: u16 = u16::MAX;
/// How many claims a machine may lose in a row before it gives up.
const MAX_CLAIM_CONFLICTS: usize = 64;

/// A network's overlay prefix: `fdXX:XXXX:XXXX::/48`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OverlayPrefix {
    /// The first 48 bits; the rest are zero.
    base: Ipv6Addr,
}

impl OverlayPrefix {
    /// A fresh random ULA /48 (the `fd` half of `fc00::/7`, 40 random bits).
    pub fn generate() -> Self {
        let global_id: [u8; 5] = rand::random();
        let mut octets = [0u8; 16];
        octets[0] = 0xfd;
        octets[1..6].copy_from_slice(&global_id);
        Self {
            base: Ipv6Addr::from(octets),
        }
    }

    /// The subnet with `index` (1..=65535).
    pub fn subnet(self, index: SubnetIndex) -> Subnet {
        let mut octets = self.base.octets();
        octets[6..8].copy_from_slice(&index.0.to_be_bytes());
        Subnet {
            base: Ipv6Addr::from(octets),
            index,
        }
    }

    /// Whether `address` lies inside this prefix.
    pub fn contains(self, address: Ipv6Addr) -> bool {
        address.octets()[..6] == self.base.octets()[..6]
    }

    /// Whether `address` is a machine's own overlay address (`<subnet>::1`
    /// of some subnet of this prefix), as opposed to a container's.
    pub fn is_machine_address(self, address: Ipv6Addr) -> bool {
        let octets = address.octets();
        self.contains(address)
            && octets[6..8] != [0, 0]
            && octets[8..15].iter().all(|octet| *octet == 0)
            && octets[15] == 1
    }

    pub fn base(self) -> Ipv6Addr {
        self.base
    }

    pub const PREFIX_LEN: u8 = 48;
}

impl fmt::Display for OverlayPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, Self::PREFIX_LEN)
    }
}

impl FromStr for OverlayPrefix {
    type Err = AddressingError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || AddressingError::InvalidPrefix {
            text: text.chars().take(64).collect(),
        };
        let (address, length) = text.split_once('/').ok_or_else(invalid)?;
        let address: Ipv6Addr = address.parse().map_err(|_| invalid())?;
        if length != "48" || address.octets()[0] != 0xfd || address.octets()[6..] != [0; 10] {
            return Err(invalid());
        }
        Ok(Self { base: address })
    }
}

impl TryFrom<String> for OverlayPrefix {
    type Error = AddressingError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<OverlayPrefix> for String {
    fn from(prefix: OverlayPrefix) -> Self {
        prefix.to_string()
    }
}

/// The number of a /64 inside the network's /48: 1..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct SubnetIndex(u16);

impl SubnetIndex {
    pub fn new(index: u16) -> Result<Self, AddressingError> {
        if index == 0 {
            return Err(AddressingError::InvalidSubnetIndex);
        }
        Ok(Self(index))
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// The index after this one, wrapping from 65535 to 1.
    fn next(self) -> Self {
        Self(if self.0 == MAX_SUBNET_INDEX {
            1
        } else {
            self.0 + 1
        })
    }

    /// Where a machine starts looking: spread by its id, so machines joining
    /// at once rarely race for the same subnet.
    pub fn preferred_for(machine_id: &str) -> Self {
        let hash = machine_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let spread = u16::try_from(hash % u64::from(MAX_SUBNET_INDEX))
            .expect("a value below u16::MAX fits in u16");
        Self(spread + 1)
    }

    fn key(self) -> Key {
        Key::from_segments(["subnets", &format!("{:04x}", self.0)])
            .expect("hex digits make a valid key segment")
    }
}

impl TryFrom<u16> for SubnetIndex {
    type Error = AddressingError;

    fn try_from(index: u16) -> Result<Self, Self::Error> {
        Self::new(index)
    }
}

impl From<SubnetIndex> for u16 {
    fn from(index: SubnetIndex) -> Self {
        index.0
    }
}

/// One machine's /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    base: Ipv6Addr,
    index: SubnetIndex,
}

impl Subnet {
    pub const PREFIX_LEN: u8 = 64;

    /// The machine's own overlay address: `<subnet>::1`.
    pub fn machine_address(self) -> Ipv6Addr {
        let mut octets = self.base.octets();
        octets[15] = 1;
        Ipv6Addr::from(octets)
    }

    pub fn base(self) -> Ipv6Addr {
        self.base
    }

    pub fn index(self) -> SubnetIndex {
        self.index
    }

    pub fn contains(self, address: Ipv6Addr) -> bool {
        address.octets()[..8] == self.base.octets()[..8]
    }

    /// The part of the subnet its containers take addresses from:
    /// `<subnet>:1::/80`, apart from the machine's own `<subnet>::1`.
    pub fn containers(self) -> ContainerRange {
        let mut octets = self.base.octets();
        octets[9] = 1;
        ContainerRange {
            base: Ipv6Addr::from(octets),
        }
    }
}

/// A machine's container addresses: a /80 inside its subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRange {
    base: Ipv6Addr,
}

impl ContainerRange {
    pub const PREFIX_LEN: u8 = 80;

    /// The range's first address, taken by the bridge the containers use as gateway.
    pub fn gateway(self) -> Ipv6Addr {
        let mut octets = self.base.octets();
        octets[15] = 1;
        Ipv6Addr::from(octets)
    }
}

impl fmt::Display for ContainerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, Self::PREFIX_LEN)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, Self::PREFIX_LEN)
    }
}

/// The record `subnets.<index>`: who holds the subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetClaim {
    pub machine_id: String,
    pub claimed_at_unix_ms: u64,
}

impl SubnetClaim {
    pub fn prefix() -> KeyPrefix {
        KeyPrefix::new("subnets").expect("static prefix is valid")
    }
}

/// Claims a subnet of `prefix` for `machine_id`, or returns the one it holds.
pub async fn claim_subnet<S: RecordStore>(
    store: &S,
    prefix: OverlayPrefix,
    machine_id: &str,
    now_unix_ms: u64,
) -> Result<Subnet, AddressingError> {
    let mut taken = std::collections::BTreeSet::new();
    for record in store.list(&SubnetClaim::prefix()).await? {
        let claim: SubnetClaim = record.decode()?;
        let index = claim_index(&record.key)?;
        if claim.machine_id == machine_id {
            return Ok(prefix.subnet(index));
        }
        taken.insert(index);
    }
    let claim = SubnetClaim {
        machine_id: machine_id.to_owned(),
        claimed_at_unix_ms: now_unix_ms,
    };
    let mut candidate = SubnetIndex::preferred_for(machine_id);
    let mut conflicts = 0;
    for _ in 0..MAX_SUBNET_INDEX {
        if !taken.contains(&candidate) {
            let key = candidate.key();
            match store.create(&key, encode(&key, &claim)?).await {
                Ok(_) => return Ok(prefix.subnet(candidate)),
                Err(StoreError::AlreadyExists { .. }) => {
                    // Someone claimed it since we listed: maybe this very
                    // machine on an earlier, interrupted attempt.
                    if let Some(record) = store.get(&key).await? {
                        let holder: SubnetClaim = record.decode()?;
                        if holder.machine_id == machine_id {
                            return Ok(prefix.subnet(candidate));
                        }
                    }
                    conflicts += 1;
                    tracing::debug!(
                        subnet = candidate.get(),
                        conflicts,
                        "subnet claim lost; trying the next one"
                    );
                    if conflicts >= MAX_CLAIM_CONFLICTS {
                        return Err(AddressingError::Contended { conflicts });
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        candidate = candidate.next();
    }
    Err(AddressingError::Exhausted)
}

/// The subnet `machine_id` holds, if any.
pub async fn subnet_of<S: RecordStore>(
    store: &S,
    prefix: OverlayPrefix,
    machine_id: &str,
) -> Result<Option<Subnet>, AddressingError> {
    for record in store.list(&SubnetClaim::prefix()).await? {
        let claim: SubnetClaim = record.decode()?;
        if claim.machine_id == machine_id {
            return Ok(Some(prefix.subnet(claim_index(&record.key)?)));
        }
    }
    Ok(None)
}

fn claim_index(key: &Key) -> Result<SubnetIndex, AddressingError> {
    key.as_str()
        .strip_prefix("subnets.")
        .and_then(|hex| u16::from_str_radix(hex, 16).ok())
        .and_then(|index| SubnetIndex::new(index).ok())
        .ok_or_else(|| AddressingError::CorruptClaim {
            key: key.to_string(),
        })
}

/// What can go wrong with overlay addresses.
#[derive(Debug, thiserror::Error)]
pub enum AddressingError {
    #[error(
        "`{text}` is not an overlay prefix: expected an fd00::/8 ULA /48 such as fd12:3456:789a::/48"
    )]
    InvalidPrefix { text: String },
    #[error("subnet index 0 is reserved")]
    InvalidSubnetIndex,
    #[error("every subnet of the network's overlay prefix is claimed")]
    Exhausted,
    #[error("lost {conflicts} subnet claims in a row to other machines; retry")]
    Contended { conflicts: usize },
    #[error("store record `{key}` is not a subnet claim")]
    CorruptClaim { key: String },
    #[error("subnet claims")]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn prefix() -> OverlayPrefix {
        "fd12:3456:789a::/48".parse().expect("valid prefix")
    }

    #[test]
    fn prefixes_are_random_ulas_that_round_trip() {
        let a = OverlayPrefix::generate();
        let b = OverlayPrefix::generate();
        assert_ne!(a, b);
        assert_eq!(a.base().octets()[0], 0xfd);
        assert_eq!(a.to_string().parse::<OverlayPrefix>().expect("parse"), a);
        for bad in [
            "fd12:3456:789a::/64",
            "2001:db8::/48",
            "fd12:3456:789a:1::/48",
            "nonsense",
            "",
        ] {
            assert!(bad.parse::<OverlayPrefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_subnet_gives_the_machine_address_inside_it() {
        let subnet = prefix().subnet(SubnetIndex::new(0x2a).expect("index"));
        assert_eq!(subnet.to_string(), "fd12:3456:789a:2a::/64");
        assert_eq!(
            subnet.machine_address(),
            "fd12:3456:789a:2a::1".parse::<Ipv6Addr>().expect("addr")
        );
        assert!(subnet.contains(subnet.machine_address()));
        assert!(prefix().contains(subnet.machine_address()));
        assert!(SubnetIndex::new(0).is_err());
    }

    #[test]
    fn machine_addresses_are_told_from_container_addresses() {
        let subnet = prefix().subnet(SubnetIndex::new(7).expect("index"));
        assert!(prefix().is_machine_address(subnet.machine_address()));
        assert!(!prefix().is_machine_address(subnet.containers().gateway()));
        let container: Ipv6Addr = "fd12:3456:789a:7:1::2".parse().expect("addr");
        assert!(!prefix().is_machine_address(container));
        let elsewhere: Ipv6Addr = "fd12:3456:789b:7::1".parse().expect("addr");
        assert!(!prefix().is_machine_address(elsewhere));
    }

    #[test]
    fn containers_take_a_range_of_the_subnet_that_misses_the_machine_address() {
        let subnet = prefix().subnet(SubnetIndex::new(0x2a).expect("index"));
        let range = subnet.containers();
        assert_eq!(range.to_string(), "fd12:3456:789a:2a:1::/80");
        assert_eq!(
            range.gateway(),
            "fd12:3456:789a:2a:1::1".parse::<Ipv6Addr>().expect("addr")
        );
        assert!(subnet.contains(range.gateway()));
        assert_ne!(range.gateway(), subnet.machine_address());
    }

    #[tokio::test]
    async fn a_machine_keeps_its_subnet_across_retries() {
        let store = MemoryStore::new();
        let first = claim_subnet(&store, prefix(), "m-a", 1)
            .await
            .expect("claim");
        let again = claim_subnet(&store, prefix(), "m-a", 2)
            .await
            .expect("again");
        assert_eq!(first, again);
        assert_eq!(
            subnet_of(&store, prefix(), "m-a").await.expect("lookup"),
            Some(first)
        );
        assert_eq!(
            store
                .list(&SubnetClaim::prefix())
                .await
                .expect("list")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_lost_race_moves_on_to_another_subnet() {
        let store = MemoryStore::new();
        // Another machine took this machine's preferred subnet after it looked.
        let preferred = SubnetIndex::preferred_for("m-b");
        let key = preferred.key();
        let rival = SubnetClaim {
            machine_id: "m-a".to_owned(),
            claimed_at_unix_ms: 1,
        };
        store
            .create(&key, encode(&key, &rival).expect("encode"))
            .await
            .expect("rival claim");
        let subnet = claim_subnet(&store, prefix(), "m-b", 2)
            .await
            .expect("claim");
        assert_ne!(subnet.index(), preferred);
        let holder: SubnetClaim = store
            .get(&key)
            .await
            .expect("get")
            .expect("present")
            .decode()
            .expect("decode");
        assert_eq!(holder.machine_id, "m-a", "the winner's claim stands");
    }

    #[tokio::test]
    async fn concurrent_claims_never_share_a_subnet() {
        let store = MemoryStore::new();
        let claims = (0..32).map(|n| {
            let store = store.clone();
            tokio::spawn(async move { claim_subnet(&store, prefix(), &format!("m-{n}"), 1).await })
        });
        let mut subnets = std::collections::BTreeSet::new();
        for claim in claims {
            let subnet = claim.await.expect("join").expect("claim");
            assert!(subnets.insert(subnet.index()), "{subnet} handed out twice");
        }
        assert_eq!(subnets.len(), 32);
    }
}
