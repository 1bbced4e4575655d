//! The `ployz.internal` zone, compiled once per routing snapshot into a map
//! from owner name to ready-made records, so answering a query is one hash
//! lookup. Pure data: no sockets, no clock; it depends only on the routing
//! table types and hickory's record types.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use hickory_proto::rr::{
    Name, RData, Record, RecordType,
    rdata::{A, AAAA, NS, SOA, SRV},
};
use ployz_routing::{RoutingTable, ZONE};
use tracing::warn;

/// Time-to-live settings of the records a [`Zone`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneTtls {
    /// TTL of positive answers, in seconds.
    pub ttl: u32,
    /// TTL of the SOA that comes with negative answers (NXDOMAIN, NODATA), in seconds.
    pub negative_ttl: u32,
}

impl Default for ZoneTtls {
    fn default() -> Self {
        Self {
            ttl: 5,
            negative_ttl: 5,
        }
    }
}

/// The records of `ployz.internal` for one routing table.
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    /// Keyed by the lowercase wire form of the owner name (see [`wire_key`]),
    /// which hashes and compares much faster than [`Name`].
    nodes: HashMap<Box<[u8]>, Node>,
    /// The SOA put in the authority section of negative answers.
    negative_soa: Record,
    commits: BTreeMap<String, u64>,
}

/// Everything stored at one owner name. A node with no records is an empty
/// non-terminal: the name exists (NODATA), it just has nothing of its own.
#[derive(Debug, Default)]
struct Node {
    a: Vec<Record>,
    aaaa: Vec<Record>,
    srv: Vec<Record>,
    /// The A/AAAA records of the SRV targets, for the additional section.
    srv_additional: Vec<Record>,
    ns: Vec<Record>,
    soa: Vec<Record>,
    /// Every record above, for `ANY` (filled in once the zone is complete).
    any: Vec<Record>,
    /// Whole responses, encoded once (filled in once the zone is complete).
    templates: Templates,
}

/// A node's responses as hickory encodes them for a lowercase question
/// without EDNS, one per record type served and one for NODATA. The request
/// handler copies one and patches in the id, flags, the client's question and
/// an OPT record, instead of encoding records per query. Empty if encoding
/// failed (the handler then encodes as usual).
#[derive(Debug, Default)]
struct Templates {
    a: Vec<u8>,
    aaaa: Vec<u8>,
    srv: Vec<u8>,
    soa: Vec<u8>,
    ns: Vec<u8>,
    any: Vec<u8>,
    nodata: Vec<u8>,
}

/// What the zone says about a name and type.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'zone> {
    /// The name exists. An empty `answers` is NODATA.
    Found {
        answers: &'zone [Record],
        additional: &'zone [Record],
        /// The whole response, ready to patch (see [`crate::request`]); may be empty.
        template: &'zone [u8],
    },
    /// The name is inside the zone but does not exist.
    NxDomain,
    /// The name is outside `ployz.internal`; it is someone else's to answer.
    OutOfZone,
}

impl Zone {
    /// Compiles the zone of `table`. Services or namespaces whose names are not
    /// valid DNS labels are left out (and logged) rather than failing the zone.
    pub fn compile(table: &RoutingTable, ttls: ZoneTtls) -> Self {
        let origin = Name::from_ascii(format!("{ZONE}.")).expect("the zone name is a valid name");
        let hostmaster = Name::from_ascii(format!("hostmaster.{ZONE}."))
            .expect("the hostmaster name is a valid name");
        let nameserver =
            Name::from_ascii(format!("ns.{ZONE}.")).expect("the nameserver name is a valid name");
        // Sequence numbers only grow, so their sum changes whenever any
        // namespace moves to a newer commit.
        let serial = table.namespaces.values().fold(0u32, |serial, namespace| {
            serial.wrapping_add(namespace.seq as u32)
        });
        let soa = SOA::new(
            nameserver.clone(),
            hostmaster,
            serial,
            60,
            10,
            3600,
            ttls.negative_ttl,
        );
        let mut nodes: HashMap<Name, Node> = HashMap::new();
        let apex = nodes.entry(origin.clone()).or_default();
        apex.soa.push(Record::from_rdata(
            origin.clone(),
            ttls.ttl,
            RData::SOA(soa.clone()),
        ));
        apex.ns.push(Record::from_rdata(
            origin.clone(),
            ttls.ttl,
            RData::NS(NS(nameserver.clone())),
        ));
        nodes.entry(nameserver).or_default();
        let negative_soa = Record::from_rdata(origin.clone(), ttls.negative_ttl, RData::SOA(soa));

        let mut commits = BTreeMap::new();
        for (namespace, namespace_table) in &table.namespaces {
            commits.insert(namespace.clone(), namespace_table.seq);
            if !is_label(namespace) {
                warn!(
                    namespace,
                    "namespace is not a DNS label; left out of the zone"
                );
                continue;
            }
            let namespace_name = child(&origin, namespace);
            nodes.entry(namespace_name.clone()).or_default();
            for (service, entry) in &namespace_table.services {
                if !is_label(service) {
                    warn!(
                        namespace,
                        service, "service is not a DNS label; left out of the zone"
                    );
                    continue;
                }
                let service_name = child(&namespace_name, service);
                // Replica number to its addresses, merged if a replica appears twice.
                let mut replicas: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
                for instance in &entry.instances {
                    replicas
                        .entry(instance.replica)
                        .or_default()
                        .extend(instance.addresses.iter().copied());
                }
                let mut ports = entry.ports.clone();
                ports.sort_unstable();
                ports.dedup();

                let mut service_node = Node::default();
                let mut service_addresses = BTreeSet::new();
                let tcp_name = child(&service_name, "_tcp");
                for (replica, addresses) in &replicas {
                    let replica_name = child(&service_name, &replica.to_string());
                    let replica_node = nodes.entry(replica_name.clone()).or_default();
                    for address in addresses {
                        replica_node.push_address(*address, ttls.ttl, &replica_name);
                        service_addresses.insert(*address);
                    }
                    if addresses.is_empty() {
                        // An SRV target that does not resolve helps no one.
                        continue;
                    }
                    let target_records: Vec<Record> = addresses
                        .iter()
                        .map(|address| address_record(&replica_name, *address, ttls.ttl))
                        .collect();
                    for port in &ports {
                        let srv = Record::from_rdata(
                            service_name.clone(),
                            ttls.ttl,
                            RData::SRV(SRV::new(0, 10, *port, replica_name.clone())),
                        );
                        service_node.srv.push(srv);
                        let port_name = child(&tcp_name, &format!("_{port}"));
                        let port_node = nodes.entry(port_name.clone()).or_default();
                        port_node.srv.push(Record::from_rdata(
                            port_name,
                            ttls.ttl,
                            RData::SRV(SRV::new(0, 10, *port, replica_name.clone())),
                        ));
                        port_node
                            .srv_additional
                            .extend(target_records.iter().cloned());
                    }
                    if !ports.is_empty() {
                        service_node.srv_additional.extend(target_records);
                    }
                }
                if !ports.is_empty() && !service_node.srv.is_empty() {
                    nodes.entry(tcp_name).or_default();
                }
                for address in service_addresses {
                    service_node.push_address(address, ttls.ttl, &service_name);
                }
                let existing = nodes.entry(service_name).or_default();
                existing.merge(service_node);
            }
        }
        for node in nodes.values_mut() {
            node.any = node
                .soa
                .iter()
                .chain(&node.ns)
                .chain(&node.a)
                .chain(&node.aaaa)
                .chain(&node.srv)
                .cloned()
                .collect();
        }
        let mut key = [0u8; MAX_WIRE_NAME];
        let nodes = nodes
            .into_iter()
            .filter_map(|(name, mut node)| {
                node.templates = Templates::build(&name, &node, &negative_soa);
                Some((Box::from(wire_key(&name, &mut key)?), node))
            })
            .collect();
        Self {
            origin,
            nodes,
            negative_soa,
            commits,
        }
    }

    /// Looks up `name` (any case) for records of `record_type`. `ANY` returns
    /// every record at the name, without additional records.
    pub fn lookup(&self, name: &Name, record_type: RecordType) -> Lookup<'_> {
        if !self.contains(name) {
            return Lookup::OutOfZone;
        }
        let mut key = [0u8; MAX_WIRE_NAME];
        let Some(node) = wire_key(name, &mut key).and_then(|key| self.nodes.get(key)) else {
            return Lookup::NxDomain;
        };
        let templates = &node.templates;
        let (answers, additional, template): (&[Record], &[Record], &[u8]) =
            if record_type == RecordType::A {
                (&node.a, &[], &templates.a)
            } else if record_type == RecordType::AAAA {
                (&node.aaaa, &[], &templates.aaaa)
            } else if record_type == RecordType::SRV {
                (&node.srv, &node.srv_additional, &templates.srv)
            } else if record_type == RecordType::SOA {
                (&node.soa, &[], &templates.soa)
            } else if record_type == RecordType::NS {
                (&node.ns, &[], &templates.ns)
            } else if record_type == RecordType::ANY {
                (&node.any, &[], &templates.any)
            } else {
                (&[], &[], &templates.nodata)
            };
        let template = if answers.is_empty() {
            &templates.nodata
        } else {
            template
        };
        Lookup::Found {
            answers,
            additional,
            template,
        }
    }

    /// Whether `name` is `ployz.internal` or below it, in any case.
    pub fn contains(&self, name: &Name) -> bool {
        let origin_labels = self.origin.num_labels() as usize;
        if (name.num_labels() as usize) < origin_labels {
            return false;
        }
        name.iter()
            .rev()
            .zip(self.origin.iter().rev())
            .all(|(label, origin_label)| label.eq_ignore_ascii_case(origin_label))
    }

    /// The zone's apex, `ployz.internal.`.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The SOA record negative answers carry in their authority section.
    pub fn negative_soa(&self) -> &Record {
        &self.negative_soa
    }

    /// The commit served for each namespace.
    pub fn commits(&self) -> &BTreeMap<String, u64> {
        &self.commits
    }
}

impl Templates {
    fn build(name: &Name, node: &Node, negative_soa: &Record) -> Self {
        let template = |record_type: RecordType, answers: &[Record], additional: &[Record]| {
            let authority = if answers.is_empty() {
                std::slice::from_ref(negative_soa)
            } else {
                &[]
            };
            crate::request::template(name, record_type, answers, authority, additional)
        };
        Self {
            a: template(RecordType::A, &node.a, &[]),
            aaaa: template(RecordType::AAAA, &node.aaaa, &[]),
            srv: template(RecordType::SRV, &node.srv, &node.srv_additional),
            soa: template(RecordType::SOA, &node.soa, &[]),
            ns: template(RecordType::NS, &node.ns, &[]),
            any: template(RecordType::ANY, &node.any, &[]),
            nodata: template(RecordType::NULL, &[], &[]),
        }
    }
}

impl Node {
    fn push_address(&mut self, address: IpAddr, ttl: u32, name: &Name) {
        let record = address_record(name, address, ttl);
        match address {
            IpAddr::V4(_) => self.a.push(record),
            IpAddr::V6(_) => self.aaaa.push(record),
        }
    }

    fn merge(&mut self, other: Node) {
        self.a.extend(other.a);
        self.aaaa.extend(other.aaaa);
        self.srv.extend(other.srv);
        self.srv_additional.extend(other.srv_additional);
        self.ns.extend(other.ns);
        self.soa.extend(other.soa);
        self.any.extend(other.any);
    }
}

/// The longest name in wire form, RFC 1035 section 2.3.4.
const MAX_WIRE_NAME: usize = 255;

/// `name` in wire form (length-prefixed labels, then a zero byte), ASCII
/// lowercased, written into `buffer`; `None` if it would not fit.
fn wire_key<'buffer>(
    name: &Name,
    buffer: &'buffer mut [u8; MAX_WIRE_NAME],
) -> Option<&'buffer [u8]> {
    let mut length = 0;
    for label in name.iter() {
        let label_length = u8::try_from(label.len()).ok()?;
        let end = length + 1 + label.len();
        let slot = buffer.get_mut(length..end)?;
        slot[0] = label_length;
        for (to, from) in slot[1..].iter_mut().zip(label) {
            *to = from.to_ascii_lowercase();
        }
        length = end;
    }
    *buffer.get_mut(length)? = 0;
    buffer.get(..=length)
}

fn address_record(name: &Name, address: IpAddr, ttl: u32) -> Record {
    let rdata = match address {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

/// `label.parent`, lowercased. Callers check the label with [`is_label`] (or
/// build it from digits and underscores), so this cannot fail.
fn child(parent: &Name, label: &str) -> Name {
    parent
        .prepend_label(label.to_ascii_lowercase().as_bytes())
        .expect("a checked label under a short zone is a valid name")
}

/// Whether `text` can be used as one DNS label of a service name.
fn is_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

#[cfg(test)]
#[expect(
    clippy::wildcard_enum_match_arm,
    reason = "tests fail on any unexpected variant"
)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use ployz_routing::{Instance, NamespaceTable, ServiceEntry};

    use super::*;

    fn table() -> RoutingTable {
        let web = ServiceEntry {
            ports: vec![8080, 9090],
            instances: vec![
                Instance {
                    replica: 0,
                    machine: "m1".into(),
                    addresses: vec![
                        "10.0.0.1".parse().expect("ip"),
                        "fd00::1".parse().expect("ip"),
                    ],
                },
                Instance {
                    replica: 1,
                    machine: "m2".into(),
                    addresses: vec!["10.0.0.2".parse().expect("ip")],
                },
            ],
        };
        let empty = ServiceEntry {
            ports: vec![80],
            instances: vec![Instance {
                replica: 0,
                machine: "m1".into(),
                addresses: vec![],
            }],
        };
        let bad = ServiceEntry::default();
        let mut services = BTreeMap::new();
        services.insert("web".to_owned(), web);
        services.insert("empty".to_owned(), empty);
        services.insert("bad.name".to_owned(), bad);
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            "shop".to_owned(),
            NamespaceTable {
                seq: 7,
                committed_at_unix_ms: 0,
                services,
                http: vec![],
                tcp: vec![],
            },
        );
        RoutingTable { namespaces }
    }

    fn zone() -> Zone {
        Zone::compile(&table(), ZoneTtls::default())
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("name")
    }

    fn answers(zone: &Zone, qname: &str, record_type: RecordType) -> Vec<RData> {
        match zone.lookup(&name(qname), record_type) {
            Lookup::Found { answers, .. } => answers.iter().map(|r| r.data().clone()).collect(),
            other => panic!("{qname} {record_type}: {other:?}"),
        }
    }

    #[test]
    fn service_name_has_every_instance_address() {
        let zone = zone();
        assert_eq!(
            answers(&zone, "web.shop.ployz.internal.", RecordType::A),
            vec![
                RData::A(A(Ipv4Addr::new(10, 0, 0, 1))),
                RData::A(A(Ipv4Addr::new(10, 0, 0, 2)))
            ]
        );
        assert_eq!(
            answers(&zone, "web.shop.ployz.internal.", RecordType::AAAA),
            vec![RData::AAAA(AAAA(
                "fd00::1".parse::<Ipv6Addr>().expect("ip")
            ))]
        );
    }

    #[test]
    fn replica_names_have_their_instance_addresses() {
        let zone = zone();
        assert_eq!(
            answers(&zone, "1.web.shop.ployz.internal.", RecordType::A),
            vec![RData::A(A(Ipv4Addr::new(10, 0, 0, 2)))]
        );
        assert!(answers(&zone, "1.web.shop.ployz.internal.", RecordType::AAAA).is_empty());
    }

    #[test]
    fn srv_has_one_record_per_instance_and_port_with_target_addresses() {
        let zone = zone();
        let Lookup::Found {
            answers,
            additional,
            ..
        } = zone.lookup(&name("web.shop.ployz.internal."), RecordType::SRV)
        else {
            panic!("web exists");
        };
        assert_eq!(answers.len(), 4);
        let targets: BTreeSet<String> = answers
            .iter()
            .map(|record| match record.data() {
                RData::SRV(srv) => format!("{}:{}", srv.target(), srv.port()),
                other => panic!("not SRV: {other:?}"),
            })
            .collect();
        assert!(targets.contains("0.web.shop.ployz.internal.:8080"));
        assert!(targets.contains("1.web.shop.ployz.internal.:9090"));
        assert!(additional.iter().any(|record| record.name()
            == &name("0.web.shop.ployz.internal.")
            && record.record_type() == RecordType::AAAA));

        let port = answers_of(&zone, "_9090._tcp.web.shop.ployz.internal.");
        assert_eq!(port, 2);
    }

    fn answers_of(zone: &Zone, qname: &str) -> usize {
        match zone.lookup(&name(qname), RecordType::SRV) {
            Lookup::Found { answers, .. } => answers.len(),
            other => panic!("{qname}: {other:?}"),
        }
    }

    #[test]
    fn names_are_matched_in_any_case() {
        let zone = zone();
        assert_eq!(
            answers(&zone, "WeB.ShOp.PLOYZ.Internal.", RecordType::A).len(),
            2
        );
        assert!(zone.contains(&name("X.PLOYZ.INTERNAL.")));
    }

    #[test]
    fn missing_names_are_nxdomain_and_existing_names_nodata() {
        let zone = zone();
        assert_eq!(
            zone.lookup(&name("nope.shop.ployz.internal."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            zone.lookup(&name("bad.name.shop.ployz.internal."), RecordType::A),
            Lookup::NxDomain
        );
        // Empty non-terminals and address-less services exist.
        assert!(answers(&zone, "shop.ployz.internal.", RecordType::A).is_empty());
        assert!(answers(&zone, "_tcp.web.shop.ployz.internal.", RecordType::A).is_empty());
        assert!(answers(&zone, "empty.shop.ployz.internal.", RecordType::A).is_empty());
        assert!(answers(&zone, "empty.shop.ployz.internal.", RecordType::SRV).is_empty());
        assert_eq!(
            zone.lookup(&name("example.com."), RecordType::A),
            Lookup::OutOfZone
        );
        assert_eq!(
            zone.lookup(&name("internal."), RecordType::A),
            Lookup::OutOfZone
        );
    }

    #[test]
    fn apex_has_soa_and_ns() {
        let zone = zone();
        let soa = answers(&zone, "ployz.internal.", RecordType::SOA);
        match &soa[..] {
            [RData::SOA(soa)] => {
                assert_eq!(soa.serial(), 7);
                assert_eq!(soa.minimum(), 5);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(answers(&zone, "ployz.internal.", RecordType::NS).len(), 1);
        assert_eq!(zone.commits().get("shop"), Some(&7));
    }
}
