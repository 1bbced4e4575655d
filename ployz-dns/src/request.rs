//! Request handling without I/O: bytes in, either response bytes, a decision
//! to forward, or a decision to drop. The UDP and TCP servers and the fuzz
//! target all run requests through [`handle_request`], so what is fuzzed is
//! what is served. Wire parsing and encoding are hickory-proto's.

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode, message},
    rr::{DNSClass, Name, Record, RecordType},
    serialize::binary::{BinDecodable, BinDecoder, BinEncoder},
};
use tracing::debug;

use crate::zone::{Lookup, Zone};

/// The transport a request came in on; it decides the response size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The largest response a client without EDNS accepts over UDP.
const CLASSIC_UDP_LIMIT: usize = 512;

/// Settings of the responder that are not part of the zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponderOptions {
    /// The UDP payload size we advertise in EDNS and never exceed.
    pub edns_payload: u16,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Respond {
        response: Vec<u8>,
        kind: ResponseKind,
    },
    /// The name is not ours: ask an upstream resolver.
    Forward(ForwardRequest),
    /// Send nothing.
    Drop(DropReason),
}

/// How a local response is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// An authoritative answer, possibly empty (NODATA).
    Answer { truncated: bool },
    /// An authoritative NXDOMAIN.
    NxDomain,
    /// FORMERR for a request whose header could be read but whose body could not.
    Malformed,
    /// FORMERR, REFUSED, NOTIMP or BADVERS for a well-formed request we do not serve.
    Rejected,
}

/// Why nothing is sent back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header: there is no id to answer to.
    TooShort,
    /// A response (QR set) sent to us; answering could start a loop.
    NotAQuery,
    /// Even an error response could not be encoded.
    Unencodable,
}

/// A query to forward upstream, with what is needed to answer the client.
#[derive(Clone, Debug)]
pub struct ForwardRequest {
    /// The client's request bytes as received; the forwarder replaces the id.
    pub packet: Vec<u8>,
    pub header: Header,
    pub query: Query,
    /// Whether the client sent EDNS (then errors we make carry an OPT too).
    pub edns: bool,
    /// The largest UDP response the client accepts.
    pub udp_limit: usize,
}

impl ForwardRequest {
    /// The client's id.
    pub fn id(&self) -> u16 {
        self.header.id()
    }

    /// A SERVFAIL for this request, for when no upstream answered.
    pub fn servfail(&self, options: &ResponderOptions) -> Option<Vec<u8>> {
        let mut header = response_header(&self.header);
        header.set_response_code(ResponseCode::ServFail);
        let edns = self.edns.then(|| our_edns(options));
        encode(&header, Some(&self.query), &[], &[], &[], edns.as_ref()).ok()
    }
}

/// Handles one request against `zone`.
pub fn handle_request(
    zone: &Zone,
    packet: &[u8],
    transport: Transport,
    options: &ResponderOptions,
) -> Outcome {
    if packet.len() < Header::len() {
        return Outcome::Drop(DropReason::TooShort);
    }
    let request = match Message::from_vec(packet) {
        Ok(request) => request,
        Err(error) => {
            debug!(%error, "unparseable request");
            return malformed(packet);
        }
    };
    if request.message_type() == MessageType::Response {
        return Outcome::Drop(DropReason::NotAQuery);
    }
    let mut header = response_header(request.header());
    let client_edns = request.extensions().as_ref();
    let edns = client_edns.map(|_| our_edns(options));
    let query = request.queries().first();
    let reject = |header: &mut Header, code: ResponseCode| {
        header.set_response_code(code);
        respond(
            header,
            query,
            &[],
            &[],
            &[],
            edns.as_ref(),
            usize::MAX,
            ResponseKind::Rejected,
        )
    };
    if request.op_code() != OpCode::Query {
        return reject(&mut header, ResponseCode::NotImp);
    }
    if let Some(client_edns) = client_edns
        && client_edns.version() > 0
    {
        return reject(&mut header, ResponseCode::BADVERS);
    }
    let [query] = request.queries() else {
        return reject(&mut header, ResponseCode::FormErr);
    };
    match query.query_class() {
        DNSClass::IN => {}
        DNSClass::ANY | DNSClass::NONE => return reject(&mut header, ResponseCode::NotImp),
        DNSClass::CH | DNSClass::HS | DNSClass::OPT(_) | DNSClass::Unknown(_) => {
            return reject(&mut header, ResponseCode::Refused);
        }
    }
    let query_type = query.query_type();
    if query_type == RecordType::OPT {
        return reject(&mut header, ResponseCode::FormErr);
    }
    // Zone transfers are not offered, here or through the forwarder.
    if query_type == RecordType::AXFR || query_type == RecordType::IXFR {
        return reject(&mut header, ResponseCode::Refused);
    }
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => udp_limit(client_edns, options),
    };
    match zone.lookup(query.name(), query.query_type()) {
        Lookup::OutOfZone => Outcome::Forward(ForwardRequest {
            packet: packet.to_vec(),
            header: *request.header(),
            query: query.clone(),
            edns: client_edns.is_some(),
            udp_limit: udp_limit(client_edns, options),
        }),
        Lookup::NxDomain => {
            header
                .set_authoritative(true)
                .set_response_code(ResponseCode::NXDomain);
            respond(
                &header,
                Some(query),
                &[],
                std::slice::from_ref(zone.negative_soa()),
                &[],
                edns.as_ref(),
                limit,
                ResponseKind::NxDomain,
            )
        }
        Lookup::Found {
            answers,
            additional,
            template,
        } => {
            if let Some(response) =
                from_template(template, packet, client_edns.is_some(), options, limit)
            {
                return Outcome::Respond {
                    response,
                    kind: ResponseKind::Answer { truncated: false },
                };
            }
            header.set_authoritative(true);
            let authority: &[Record] = if answers.is_empty() {
                std::slice::from_ref(zone.negative_soa())
            } else {
                &[]
            };
            respond(
                &header,
                Some(query),
                answers,
                authority,
                additional,
                edns.as_ref(),
                limit,
                ResponseKind::Answer { truncated: false },
            )
        }
    }
}

/// The response for `packet` made from a zone template: the template with
/// the request's id, RD and CD bits and question (same name up to case, so
/// every compression pointer still holds), plus our OPT record if the client
/// sent EDNS. `None` when the template is missing or the answer would not fit
/// `limit`; the caller then encodes (and truncates) as usual.
fn from_template(
    template: &[u8],
    packet: &[u8],
    edns: bool,
    options: &ResponderOptions,
    limit: usize,
) -> Option<Vec<u8>> {
    let question_end = question_end(packet)?;
    if question_end != self::question_end(template)? {
        return None;
    }
    let opt_length = if edns { OPT_RECORD_LENGTH } else { 0 };
    if template.len() + opt_length > limit {
        return None;
    }
    let request_flags = packet.get(2..4)?;
    let mut response = Vec::with_capacity(template.len() + opt_length);
    response.extend_from_slice(template);
    response.get_mut(..2)?.copy_from_slice(packet.get(..2)?);
    // QR, opcode QUERY, AA, RD as asked; RA, CD as asked, RCODE of the template.
    let flags = [
        0x80 | 0x04 | (request_flags[0] & 0x01),
        0x80 | (request_flags[1] & 0x10) | (template.get(3)? & 0x0f),
    ];
    response.get_mut(2..4)?.copy_from_slice(&flags);
    response
        .get_mut(Header::len()..question_end)?
        .copy_from_slice(packet.get(Header::len()..question_end)?);
    if edns {
        // Root owner, type OPT (41), our payload size as class, extended
        // RCODE 0, version 0, no flags, no options.
        let [high, low] = options.edns_payload.to_be_bytes();
        response.extend_from_slice(&[0, 0, 41, high, low, 0, 0, 0, 0, 0, 0]);
        let additional = u16::from_be_bytes([*response.get(10)?, *response.get(11)?]);
        response
            .get_mut(10..12)?
            .copy_from_slice(&additional.checked_add(1)?.to_be_bytes());
    }
    Some(response)
}

/// The length of an OPT record without options.
const OPT_RECORD_LENGTH: usize = 11;

/// Where the question section of a one-question message ends, if its name is
/// written out in plain labels (no compression).
fn question_end(message: &[u8]) -> Option<usize> {
    let mut offset = Header::len();
    loop {
        let length = usize::from(*message.get(offset)?);
        offset += 1;
        if length == 0 {
            break;
        }
        if length & 0xc0 != 0 {
            return None;
        }
        offset += length;
    }
    // Type and class.
    let end = offset + 4;
    (end <= message.len()).then_some(end)
}

/// A zone template (see [`crate::zone`]): the response to a lowercase
/// `name`/`record_type` question without EDNS, with id 0 and RD and CD clear.
pub(crate) fn template(
    name: &Name,
    record_type: RecordType,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
) -> Vec<u8> {
    let mut header = Header::new();
    header
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_available(true);
    let query = Query::query(name.clone(), record_type);
    encode(&header, Some(&query), answers, authority, additional, None).unwrap_or_default()
}

/// The UDP response size the client accepts: 512 without EDNS, else its
/// advertised size, but never more than we advertise ourselves.
fn udp_limit(client_edns: Option<&Edns>, options: &ResponderOptions) -> usize {
    match client_edns {
        None => CLASSIC_UDP_LIMIT,
        Some(edns) => {
            usize::from(edns.max_payload().min(options.edns_payload)).max(CLASSIC_UDP_LIMIT)
        }
    }
}

fn response_header(request: &Header) -> Header {
    let mut header = Header::response_from_request(request);
    // Names outside the zone are resolved through the upstreams.
    header.set_recursion_available(true);
    header
}

fn our_edns(options: &ResponderOptions) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(options.edns_payload);
    edns
}

/// FORMERR for a request whose body does not parse, echoing its id, if its
/// header is readable and it is a query.
fn malformed(packet: &[u8]) -> Outcome {
    let Some(head) = packet.get(..Header::len()) else {
        return Outcome::Drop(DropReason::TooShort);
    };
    let Ok(request) = Header::read(&mut BinDecoder::new(head)) else {
        return Outcome::Drop(DropReason::TooShort);
    };
    if request.message_type() == MessageType::Response {
        return Outcome::Drop(DropReason::NotAQuery);
    }
    let mut header = response_header(&request);
    header.set_response_code(ResponseCode::FormErr);
    respond(
        &header,
        None,
        &[],
        &[],
        &[],
        None,
        usize::MAX,
        ResponseKind::Malformed,
    )
}

/// Encodes a response that fits in `limit` bytes: first whole, then without
/// the additional section (which is optional), then as an empty answer with
/// TC set so the client retries over TCP.
#[expect(
    clippy::too_many_arguments,
    reason = "the sections of a DNS message are separate by nature"
)]
fn respond(
    header: &Header,
    query: Option<&Query>,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
    edns: Option<&Edns>,
    limit: usize,
    kind: ResponseKind,
) -> Outcome {
    let attempt = encode(header, query, answers, authority, additional, edns)
        .and_then(|full| {
            if full.len() <= limit || additional.is_empty() {
                return Ok(full);
            }
            encode(header, query, answers, authority, &[], edns)
        })
        .and_then(|response| {
            if response.len() <= limit {
                return Ok((response, kind));
            }
            let mut truncated = *header;
            truncated.set_truncated(true);
            let response = encode(&truncated, query, &[], &[], &[], edns)?;
            Ok((response, ResponseKind::Answer { truncated: true }))
        });
    match attempt {
        Ok((response, kind)) => Outcome::Respond { response, kind },
        Err(error) => {
            debug!(%error, "response could not be encoded");
            Outcome::Drop(DropReason::Unencodable)
        }
    }
}

fn encode(
    header: &Header,
    query: Option<&Query>,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
    edns: Option<&Edns>,
) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let mut buffer = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buffer);
    message::emit_message_parts(
        header,
        &mut query.into_iter(),
        &mut answers.iter(),
        &mut authority.iter(),
        &mut additional.iter(),
        edns,
        &[],
        &mut encoder,
    )?;
    Ok(buffer)
}

#[cfg(test)]
#[expect(
    clippy::wildcard_enum_match_arm,
    reason = "tests fail on any unexpected variant"
)]
mod tests {
    use std::collections::BTreeMap;

    use hickory_proto::rr::RData;
    use ployz_routing::{Instance, NamespaceTable, RoutingTable, ServiceEntry};

    use super::*;
    use crate::zone::ZoneTtls;

    const OPTIONS: ResponderOptions = ResponderOptions { edns_payload: 1232 };

    fn zone(instances: u32) -> Zone {
        let web = ServiceEntry {
            ports: vec![80],
            instances: (0..instances)
                .map(|replica| Instance {
                    replica,
                    machine: "m".into(),
                    addresses: vec![
                        format!("10.0.{}.{}", replica / 250, replica % 250 + 1)
                            .parse()
                            .expect("ip"),
                    ],
                })
                .collect(),
        };
        let mut services = BTreeMap::new();
        services.insert("web".to_owned(), web);
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            "shop".to_owned(),
            NamespaceTable {
                seq: 1,
                committed_at_unix_ms: 0,
                services,
                http: vec![],
                tcp: vec![],
            },
        );
        Zone::compile(&RoutingTable { namespaces }, ZoneTtls::default())
    }

    fn query(name: &str, record_type: RecordType, edns: bool) -> Message {
        let mut message = Message::new();
        message
            .set_id(0x1234)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                record_type,
            ));
        if edns {
            let mut edns = Edns::new();
            edns.set_max_payload(4096);
            message.set_edns(edns);
        }
        message
    }

    fn respond_to(zone: &Zone, request: &Message, transport: Transport) -> Message {
        let bytes = request.to_vec().expect("encode");
        match handle_request(zone, &bytes, transport, &OPTIONS) {
            Outcome::Respond { response, .. } => Message::from_vec(&response).expect("decode"),
            other => panic!("no response: {other:?}"),
        }
    }

    #[test]
    fn local_answers_are_authoritative_and_echo_the_request() {
        let zone = zone(2);
        let response = respond_to(
            &zone,
            &query("WEB.shop.ployz.internal.", RecordType::A, false),
            Transport::Udp,
        );
        assert_eq!(response.id(), 0x1234);
        assert!(response.authoritative());
        assert!(response.recursion_desired());
        assert_eq!(response.response_code(), ResponseCode::NoError);
        assert_eq!(response.answers().len(), 2);
        assert_eq!(
            response.queries()[0].name().to_ascii(),
            "WEB.shop.ployz.internal."
        );
    }

    #[test]
    fn srv_answers_carry_target_addresses() {
        let zone = zone(2);
        let response = respond_to(
            &zone,
            &query("_80._tcp.web.shop.ployz.internal.", RecordType::SRV, true),
            Transport::Udp,
        );
        assert_eq!(response.answers().len(), 2);
        assert_eq!(response.additionals().len(), 2);
        assert!(response.extensions().is_some());
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let zone = zone(1);
        let response = respond_to(
            &zone,
            &query("nope.ployz.internal.", RecordType::A, false),
            Transport::Udp,
        );
        assert_eq!(response.response_code(), ResponseCode::NXDomain);
        assert!(response.authoritative());
        assert!(matches!(
            response.name_servers()[0].data(),
            RData::SOA(soa) if soa.minimum() == 5
        ));
        let response = respond_to(
            &zone,
            &query("web.shop.ployz.internal.", RecordType::AAAA, false),
            Transport::Udp,
        );
        assert_eq!(response.response_code(), ResponseCode::NoError);
        assert!(response.answers().is_empty());
        assert_eq!(response.name_servers().len(), 1);
    }

    #[test]
    fn other_classes_and_counts_are_rejected() {
        let zone = zone(1);
        let mut chaos = query("web.shop.ployz.internal.", RecordType::A, false);
        chaos.queries_mut()[0].set_query_class(DNSClass::CH);
        assert_eq!(
            respond_to(&zone, &chaos, Transport::Udp).response_code(),
            ResponseCode::Refused
        );
        let mut two = query("web.shop.ployz.internal.", RecordType::A, false);
        two.add_query(Query::query(
            Name::from_ascii("x.ployz.internal.").expect("name"),
            RecordType::A,
        ));
        assert_eq!(
            respond_to(&zone, &two, Transport::Udp).response_code(),
            ResponseCode::FormErr
        );
        let mut none = Message::new();
        none.set_id(9);
        assert_eq!(
            respond_to(&zone, &none, Transport::Udp).response_code(),
            ResponseCode::FormErr
        );
        let mut notify = query("web.shop.ployz.internal.", RecordType::A, false);
        notify.set_op_code(OpCode::Notify);
        assert_eq!(
            respond_to(&zone, &notify, Transport::Udp).response_code(),
            ResponseCode::NotImp
        );
    }

    #[test]
    fn unparseable_requests_get_formerr_or_nothing() {
        let zone = zone(1);
        // A header claiming one question, followed by nothing.
        let packet = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        match handle_request(&zone, &packet, Transport::Udp, &OPTIONS) {
            Outcome::Respond { response, kind } => {
                assert_eq!(kind, ResponseKind::Malformed);
                assert_eq!(&response[..2], &[0xab, 0xcd]);
                assert_eq!(response[3] & 0x0f, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            handle_request(&zone, &packet[..11], Transport::Udp, &OPTIONS),
            Outcome::Drop(DropReason::TooShort)
        ));
        // A compression pointer pointing at itself.
        let looped = [
            0, 1, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ];
        assert!(matches!(
            handle_request(&zone, &looped, Transport::Udp, &OPTIONS),
            Outcome::Respond {
                kind: ResponseKind::Malformed,
                ..
            }
        ));
    }

    #[test]
    fn large_udp_answers_are_truncated_and_tcp_answers_are_not() {
        let zone = zone(100);
        let request = query("web.shop.ployz.internal.", RecordType::A, false);
        let response = respond_to(&zone, &request, Transport::Udp);
        assert!(response.truncated());
        assert!(response.answers().is_empty());
        let response = respond_to(&zone, &request, Transport::Tcp);
        assert!(!response.truncated());
        assert_eq!(response.answers().len(), 100);
        // With EDNS the client's size counts, capped by the 1232 we advertise.
        let request = query("web.shop.ployz.internal.", RecordType::A, true);
        assert!(respond_to(&zone, &request, Transport::Udp).truncated());
        let zone = self::zone(60);
        let response = respond_to(&zone, &request, Transport::Udp);
        assert!(!response.truncated());
        assert_eq!(response.answers().len(), 60);
    }

    /// What the encoder makes of a request, bypassing the zone's templates.
    fn encoded(zone: &Zone, request: &Message, limit: usize) -> Vec<u8> {
        let query = &request.queries()[0];
        let Lookup::Found {
            answers,
            additional,
            ..
        } = zone.lookup(query.name(), query.query_type())
        else {
            panic!("name exists");
        };
        let mut header = response_header(request.header());
        header.set_authoritative(true);
        let authority: &[Record] = if answers.is_empty() {
            std::slice::from_ref(zone.negative_soa())
        } else {
            &[]
        };
        let edns = request.extensions().as_ref().map(|_| our_edns(&OPTIONS));
        match respond(
            &header,
            Some(query),
            answers,
            authority,
            additional,
            edns.as_ref(),
            limit,
            ResponseKind::Answer { truncated: false },
        ) {
            Outcome::Respond { response, .. } => response,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn template_answers_are_byte_for_byte_what_the_encoder_makes() {
        let zone = zone(3);
        for name in [
            "web.shop.ployz.internal.",
            "WeB.sHoP.ployz.INTERNAL.",
            "_80._tcp.web.shop.ployz.internal.",
            "2.web.shop.ployz.internal.",
            "ployz.internal.",
            "shop.ployz.internal.",
        ] {
            for record_type in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::SRV,
                RecordType::SOA,
                RecordType::NS,
                RecordType::ANY,
                RecordType::TXT,
            ] {
                for edns in [false, true] {
                    let mut request = query(name, record_type, edns);
                    request.set_checking_disabled(edns).set_id(0xfedc);
                    let bytes = request.to_vec().expect("encode");
                    let Outcome::Respond { response, .. } =
                        handle_request(&zone, &bytes, Transport::Udp, &OPTIONS)
                    else {
                        panic!("{name} {record_type}: no response");
                    };
                    let limit = udp_limit(request.extensions().as_ref(), &OPTIONS);
                    let expected = encoded(&zone, &request, limit);
                    let what = format!("{name} {record_type} edns {edns}");
                    if name == name.to_ascii_lowercase() {
                        assert_eq!(response, expected, "{what}");
                    } else {
                        // The encoder compresses case-sensitively, so it spells
                        // out owner names that the template points to the
                        // client's question for; the messages are the same.
                        assert_eq!(
                            Message::from_vec(&response).expect("decode"),
                            Message::from_vec(&expected).expect("decode"),
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn outside_names_are_forwarded() {
        let zone = zone(1);
        let bytes = query("example.com.", RecordType::A, false)
            .to_vec()
            .expect("encode");
        match handle_request(&zone, &bytes, Transport::Udp, &OPTIONS) {
            Outcome::Forward(forward) => {
                assert_eq!(forward.id(), 0x1234);
                assert_eq!(forward.packet, bytes);
                let servfail = Message::from_vec(&forward.servfail(&OPTIONS).expect("servfail"))
                    .expect("decode");
                assert_eq!(servfail.response_code(), ResponseCode::ServFail);
                assert_eq!(servfail.id(), 0x1234);
            }
            other => panic!("{other:?}"),
        }
    }
}
