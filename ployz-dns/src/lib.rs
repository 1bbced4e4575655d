//! ployz-dns: the DNS server of a Ployz machine. It answers
//! `<service>.<namespace>.ployz.internal` (and replica and SRV names) from
//! the routing snapshot it is handed ([`zone`]), forwards every other name to
//! upstream resolvers ([`forward`]), and serves both over caller-bound UDP and
//! TCP sockets ([`server`]). It depends on the routing domain's types only,
//! never on ployzd, so name resolution keeps working while ployzd is down.

pub mod forward;
pub mod request;
pub mod server;
pub mod socket;
mod udp_batch;
pub mod zone;

pub use forward::{ForwardError, upstreams_from_resolv_conf};
pub use server::{DnsOptions, DnsServer, DnsStats};
pub use socket::{bind_tcp, bind_udp, bind_udp_shared};
pub use zone::{Zone, ZoneTtls};

/// Entry points for cargo-fuzz (`ployz-dns/fuzz`).
pub mod fuzz {
    use std::{collections::BTreeMap, sync::OnceLock};

    use ployz_routing::{Instance, NamespaceTable, RoutingTable, ServiceEntry};

    use crate::{
        request::{Outcome, ResponderOptions, Transport, handle_request},
        zone::{Zone, ZoneTtls},
    };

    const OPTIONS: ResponderOptions = ResponderOptions { edns_payload: 1232 };

    /// Runs `data` as a request, over UDP and over TCP, through the function
    /// the server uses, against a small fixed zone. Panics only if an
    /// invariant breaks: a response must echo the request's id and fit the
    /// UDP limit we advertise.
    pub fn dns_request(data: &[u8]) {
        let zone = ZONE.get_or_init(sample_zone);
        for transport in [Transport::Udp, Transport::Tcp] {
            match handle_request(zone, data, transport, &OPTIONS) {
                Outcome::Respond { response, .. } => {
                    assert_eq!(response.get(..2), data.get(..2), "response id");
                    if transport == Transport::Udp {
                        assert!(
                            response.len() <= usize::from(OPTIONS.edns_payload),
                            "udp response of {} bytes",
                            response.len()
                        );
                    }
                }
                Outcome::Forward(request) => {
                    assert_eq!(request.packet, data, "forwarded bytes");
                    let servfail = request.servfail(&OPTIONS);
                    assert_eq!(servfail.as_ref().and_then(|s| s.get(..2)), data.get(..2));
                }
                Outcome::Drop(_) => {}
            }
        }
    }

    static ZONE: OnceLock<Zone> = OnceLock::new();

    fn sample_zone() -> Zone {
        let instances = (0..40)
            .map(|replica| Instance {
                replica,
                machine: format!("m{replica}"),
                addresses: vec![
                    std::net::Ipv4Addr::new(10, 0, 0, replica as u8 + 1).into(),
                    std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, replica as u16 + 1).into(),
                ],
            })
            .collect();
        let mut services = BTreeMap::new();
        services.insert(
            "web".to_owned(),
            ServiceEntry {
                ports: vec![80, 443],
                instances,
            },
        );
        services.insert("idle".to_owned(), ServiceEntry::default());
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            "shop".to_owned(),
            NamespaceTable {
                seq: 1,
                committed_at_unix_ms: 0,
                services,
                http: Vec::new(),
                tcp: Vec::new(),
            },
        );
        Zone::compile(&RoutingTable { namespaces }, ZoneTtls::default())
    }
}
