//! The WireGuard cross-platform configuration protocol (UAPI) as text: parsing
//! `set=1` requests and formatting `get=1` answers (and the reverse, for
//! clients and round-trip tests). Pure: no sockets, no device state. Input
//! comes from a local socket but is still untrusted: every error is typed and
//! nothing here panics.

use std::{fmt, fmt::Write as _, net::SocketAddr, time::Duration};

use super::allowed_ips::{AllowedIp, AllowedIpError};

/// The errno WireGuard implementations answer for an invalid request (EINVAL),
/// negative as wireguard-go sends it.
pub const ERRNO_INVALID: i32 = -22;
/// The errno for a request the device could not apply (EIO).
pub const ERRNO_IO: i32 = -5;

/// A 32-byte Curve25519 key or preshared key, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Whether all bytes are zero, which UAPI uses to mean "no key".
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Key {
    // Keys may be private: never print their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a UAPI request could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    #[error("the request is empty")]
    Empty,
    #[error("unknown operation `{line}` (expected `get=1` or `set=1`)")]
    UnknownOperation { line: String },
    #[error("line {line_number} is not `key=value`")]
    MalformedLine { line_number: usize },
    #[error("line {line_number}: unknown key `{key}`")]
    UnknownKey { line_number: usize, key: String },
    #[error("line {line_number}: invalid value for `{key}`")]
    InvalidValue { line_number: usize, key: String },
    #[error("line {line_number}: invalid allowed_ip")]
    InvalidAllowedIp {
        line_number: usize,
        #[source]
        source: AllowedIpError,
    },
    #[error("line {line_number}: `{key}` must follow a `public_key` line")]
    PeerKeyWithoutPeer { line_number: usize, key: String },
}

impl UapiError {
    /// The errno this error is answered with.
    pub fn errno(&self) -> i32 {
        ERRNO_INVALID
    }
}

/// A parsed request: the first line of a UAPI exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: report the configuration and statistics.
    Get,
    /// `set=1` with its lines: change the configuration.
    Set(SetRequest),
}

/// A `set=1` request: device changes, then peer changes in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// The new private key; the zero key removes it.
    pub private_key: Option<Key>,
    /// The new UDP listen port (0 picks a free one).
    pub listen_port: Option<u16>,
    /// The new firewall mark for outgoing UDP; 0 removes it.
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers`.
    pub replace_peers: bool,
    /// Peer changes, in request order.
    pub peers: Vec<PeerUpdate>,
}

/// The changes to one peer, from its `public_key` line to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    /// Remove this peer.
    pub remove: bool,
    /// Only change the peer if it already exists.
    pub update_only: bool,
    /// The new preshared key; the zero key removes it.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives; 0 turns them off.
    pub persistent_keepalive_interval: Option<u16>,
    /// Drop the peer's allowed IPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<AllowedIp>,
}

impl PeerUpdate {
    /// An update that only names the peer.
    pub fn new(public_key: Key) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// What `get=1` reports about the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerSnapshot>,
}

/// What `get=1` reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Time of the last handshake since the Unix epoch; `None` if never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive_interval: u16,
    pub allowed_ips: Vec<AllowedIp>,
}

impl PeerSnapshot {
    /// A snapshot of a peer with nothing but its key.
    pub fn new(public_key: Key) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive_interval: 0,
            allowed_ips: Vec::new(),
        }
    }
}

/// Splits the lines of one request (without the terminating blank line) into
/// numbered `key=value` pairs.
fn pairs<'a>(
    lines: &'a [&'a str],
) -> impl Iterator<Item = Result<(usize, &'a str, &'a str), UapiError>> + 'a {
    lines.iter().enumerate().map(|(index, line)| {
        let line_number = index + 1;
        line.split_once('=')
            .map(|(key, value)| (line_number, key, value))
            .ok_or(UapiError::MalformedLine { line_number })
    })
}

/// Parses one request: its lines, without the terminating blank line.
pub fn parse_request(lines: &[&str]) -> Result<Request, UapiError> {
    let first = lines.first().ok_or(UapiError::Empty)?;
    match *first {
        "get=1" if lines.len() == 1 => Ok(Request::Get),
        "set=1" => parse_set(&lines[1..]).map(Request::Set),
        other => Err(UapiError::UnknownOperation {
            line: other.chars().take(64).collect(),
        }),
    }
}

fn parse_value<T: std::str::FromStr>(
    line_number: usize,
    key: &str,
    value: &str,
) -> Result<T, UapiError> {
    value.parse().map_err(|_| UapiError::InvalidValue {
        line_number,
        key: key.to_owned(),
    })
}

fn parse_key(line_number: usize, key: &str, value: &str) -> Result<Key, UapiError> {
    Key::from_hex(value).ok_or_else(|| UapiError::InvalidValue {
        line_number,
        key: key.to_owned(),
    })
}

fn parse_true(line_number: usize, key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UapiError::InvalidValue {
            line_number,
            key: key.to_owned(),
        }),
    }
}

/// Parses the body of a `set=1` request (the lines after `set=1`). Line numbers
/// in errors count from the first body line.
pub fn parse_set(lines: &[&str]) -> Result<SetRequest, UapiError> {
    let mut request = SetRequest::default();
    for pair in pairs(lines) {
        let (line_number, key, value) = pair?;
        if key == "public_key" {
            request
                .peers
                .push(PeerUpdate::new(parse_key(line_number, key, value)?));
            continue;
        }
        let Some(peer) = request.peers.last_mut() else {
            match key {
                "private_key" => request.private_key = Some(parse_key(line_number, key, value)?),
                "listen_port" => request.listen_port = Some(parse_value(line_number, key, value)?),
                "fwmark" => request.fwmark = Some(parse_value(line_number, key, value)?),
                "replace_peers" => request.replace_peers = parse_true(line_number, key, value)?,
                "remove"
                | "update_only"
                | "preshared_key"
                | "endpoint"
                | "persistent_keepalive_interval"
                | "replace_allowed_ips"
                | "allowed_ip"
                | "protocol_version" => {
                    return Err(UapiError::PeerKeyWithoutPeer {
                        line_number,
                        key: key.to_owned(),
                    });
                }
                _ => {
                    return Err(UapiError::UnknownKey {
                        line_number,
                        key: key.chars().take(64).collect(),
                    });
                }
            }
            continue;
        };
        match key {
            "remove" => peer.remove = parse_true(line_number, key, value)?,
            "update_only" => peer.update_only = parse_true(line_number, key, value)?,
            "preshared_key" => peer.preshared_key = Some(parse_key(line_number, key, value)?),
            "endpoint" => peer.endpoint = Some(parse_value(line_number, key, value)?),
            "persistent_keepalive_interval" => {
                peer.persistent_keepalive_interval = Some(parse_value(line_number, key, value)?);
            }
            "replace_allowed_ips" => {
                peer.replace_allowed_ips = parse_true(line_number, key, value)?;
            }
            "allowed_ip" => peer.allowed_ips.push(value.parse().map_err(|source| {
                UapiError::InvalidAllowedIp {
                    line_number,
                    source,
                }
            })?),
            "protocol_version" => {
                if value != "1" {
                    return Err(UapiError::InvalidValue {
                        line_number,
                        key: key.to_owned(),
                    });
                }
            }
            _ => {
                return Err(UapiError::UnknownKey {
                    line_number,
                    key: key.chars().take(64).collect(),
                });
            }
        }
    }
    Ok(request)
}

/// Formats `request` as a full `set=1` request, blank line included.
pub fn format_set(request: &SetRequest) -> String {
    let mut out = String::from("set=1\n");
    // Writing to a String cannot fail; the results are ignored on purpose.
    if let Some(key) = &request.private_key {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    if let Some(port) = request.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = request.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    if request.replace_peers {
        out.push_str("replace_peers=true\n");
    }
    for peer in &request.peers {
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        if peer.remove {
            out.push_str("remove=true\n");
        }
        if peer.update_only {
            out.push_str("update_only=true\n");
        }
        if let Some(key) = &peer.preshared_key {
            let _ = writeln!(out, "preshared_key={}", key.to_hex());
        }
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        if let Some(interval) = peer.persistent_keepalive_interval {
            let _ = writeln!(out, "persistent_keepalive_interval={interval}");
        }
        if peer.replace_allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
        }
        for allowed in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={allowed}");
        }
    }
    out.push('\n');
    out
}

/// Formats the answer to `get=1`: the snapshot, `errno=0` and the blank line.
pub fn format_get(snapshot: &DeviceSnapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    if let Some(key) = &snapshot.private_key {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    let _ = writeln!(out, "listen_port={}", snapshot.listen_port);
    if let Some(mark) = snapshot.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for peer in &snapshot.peers {
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        if let Some(key) = &peer.preshared_key {
            let _ = writeln!(out, "preshared_key={}", key.to_hex());
        }
        out.push_str("protocol_version=1\n");
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let handshake = peer.last_handshake.unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", handshake.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", handshake.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive_interval
        );
        for allowed in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={allowed}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The answer to a request that failed or to a successful `set=1`.
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// Parses a `get=1` answer (lines without the terminating blank line), for
/// clients. An `errno` other than 0 is reported as the error value.
pub fn parse_get(lines: &[&str]) -> Result<Result<DeviceSnapshot, i32>, UapiError> {
    let mut snapshot = DeviceSnapshot::default();
    let mut handshake_sec = 0u64;
    for pair in pairs(lines) {
        let (line_number, key, value) = pair?;
        if key == "errno" {
            let errno: i32 = parse_value(line_number, key, value)?;
            if errno != 0 {
                return Ok(Err(errno));
            }
            continue;
        }
        if key == "public_key" {
            snapshot
                .peers
                .push(PeerSnapshot::new(parse_key(line_number, key, value)?));
            continue;
        }
        let Some(peer) = snapshot.peers.last_mut() else {
            match key {
                "private_key" => snapshot.private_key = Some(parse_key(line_number, key, value)?),
                "listen_port" => snapshot.listen_port = parse_value(line_number, key, value)?,
                "fwmark" => snapshot.fwmark = Some(parse_value(line_number, key, value)?),
                _ => {
                    return Err(UapiError::UnknownKey {
                        line_number,
                        key: key.chars().take(64).collect(),
                    });
                }
            }
            continue;
        };
        match key {
            "preshared_key" => peer.preshared_key = Some(parse_key(line_number, key, value)?),
            "protocol_version" => {}
            "endpoint" => peer.endpoint = Some(parse_value(line_number, key, value)?),
            "last_handshake_time_sec" => handshake_sec = parse_value(line_number, key, value)?,
            "last_handshake_time_nsec" => {
                let nanos: u32 = parse_value(line_number, key, value)?;
                let time = Duration::new(handshake_sec, nanos.min(999_999_999));
                peer.last_handshake = (!time.is_zero()).then_some(time);
            }
            "tx_bytes" => peer.tx_bytes = parse_value(line_number, key, value)?,
            "rx_bytes" => peer.rx_bytes = parse_value(line_number, key, value)?,
            "persistent_keepalive_interval" => {
                peer.persistent_keepalive_interval = parse_value(line_number, key, value)?;
            }
            "allowed_ip" => peer.allowed_ips.push(value.parse().map_err(|source| {
                UapiError::InvalidAllowedIp {
                    line_number,
                    source,
                }
            })?),
            _ => {
                return Err(UapiError::UnknownKey {
                    line_number,
                    key: key.chars().take(64).collect(),
                });
            }
        }
    }
    Ok(Ok(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key([byte; 32])
    }

    fn body(text: &str) -> Vec<&str> {
        text.trim_end_matches('\n').split('\n').collect()
    }

    fn sample_set() -> SetRequest {
        let mut first = PeerUpdate::new(key(2));
        first.preshared_key = Some(key(3));
        first.endpoint = Some("[fd00::9]:51820".parse().expect("test input is valid"));
        first.persistent_keepalive_interval = Some(25);
        first.replace_allowed_ips = true;
        first.allowed_ips = vec![
            "fd00::2/128".parse().expect("test input is valid"),
            "10.0.0.0/8".parse().expect("test input is valid"),
        ];
        let mut second = PeerUpdate::new(key(4));
        second.remove = true;
        let mut third = PeerUpdate::new(key(5));
        third.update_only = true;
        third.endpoint = Some("192.0.2.1:1".parse().expect("test input is valid"));
        SetRequest {
            private_key: Some(key(1)),
            listen_port: Some(51820),
            fwmark: Some(0),
            replace_peers: true,
            peers: vec![first, second, third],
        }
    }

    #[test]
    fn set_round_trips_through_format_and_parse() {
        let request = sample_set();
        let text = format_set(&request);
        let lines = body(&text);
        assert_eq!(parse_request(&lines), Ok(Request::Set(request)));
        let empty = SetRequest::default();
        assert_eq!(
            parse_request(&body(&format_set(&empty))),
            Ok(Request::Set(empty))
        );
    }

    #[test]
    fn parses_what_wg_set_sends() {
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\npublic_key={}\nendpoint=10.0.0.2:51820\n\
             replace_allowed_ips=true\nallowed_ip=fd00::2/128\n",
            key(7).to_hex(),
            key(8).to_hex()
        );
        let Ok(Request::Set(request)) = parse_request(&body(&text)) else {
            panic!("not a set request");
        };
        assert_eq!(request.private_key, Some(key(7)));
        assert_eq!(request.listen_port, Some(51820));
        assert_eq!(request.peers.len(), 1);
        assert_eq!(request.peers[0].public_key, key(8));
        assert!(request.peers[0].replace_allowed_ips);
        assert_eq!(
            request.peers[0].allowed_ips,
            vec![
                "fd00::2/128"
                    .parse::<AllowedIp>()
                    .expect("test input is valid")
            ]
        );
    }

    #[test]
    fn get_round_trips_through_format_and_parse() {
        let mut peer = PeerSnapshot::new(key(9));
        peer.preshared_key = Some(key(10));
        peer.endpoint = Some("10.1.1.1:4242".parse().expect("test input is valid"));
        peer.last_handshake = Some(Duration::new(1_700_000_000, 123_456_789));
        peer.rx_bytes = 1234;
        peer.tx_bytes = 5678;
        peer.persistent_keepalive_interval = 25;
        peer.allowed_ips = vec!["fd00::/64".parse().expect("test input is valid")];
        let snapshot = DeviceSnapshot {
            private_key: Some(key(1)),
            listen_port: 51820,
            fwmark: Some(7),
            peers: vec![peer, PeerSnapshot::new(key(11))],
        };
        let text = format_get(&snapshot);
        assert!(text.ends_with("errno=0\n\n"));
        assert!(text.contains("last_handshake_time_sec=1700000000\n"));
        assert!(text.contains("last_handshake_time_nsec=123456789\n"));
        assert_eq!(parse_get(&body(&text)), Ok(Ok(snapshot)));
        assert_eq!(parse_get(&body("errno=-22\n")), Ok(Err(-22)));
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let hex = key(1).to_hex();
        let cases: Vec<(String, UapiError)> = vec![
            (
                String::new(),
                UapiError::UnknownOperation {
                    line: String::new(),
                },
            ),
            (
                "hello".into(),
                UapiError::UnknownOperation {
                    line: "hello".into(),
                },
            ),
            (
                "set=1\nnot a pair".into(),
                UapiError::MalformedLine { line_number: 1 },
            ),
            (
                "set=1\nbogus_key=1".into(),
                UapiError::UnknownKey {
                    line_number: 1,
                    key: "bogus_key".into(),
                },
            ),
            (
                "set=1\nprivate_key=zz".into(),
                UapiError::InvalidValue {
                    line_number: 1,
                    key: "private_key".into(),
                },
            ),
            (
                format!("set=1\nprivate_key={hex}00"),
                UapiError::InvalidValue {
                    line_number: 1,
                    key: "private_key".into(),
                },
            ),
            (
                "set=1\nlisten_port=70000".into(),
                UapiError::InvalidValue {
                    line_number: 1,
                    key: "listen_port".into(),
                },
            ),
            (
                "set=1\nendpoint=10.0.0.1:1".into(),
                UapiError::PeerKeyWithoutPeer {
                    line_number: 1,
                    key: "endpoint".into(),
                },
            ),
            (
                format!("set=1\npublic_key={hex}\nendpoint=nowhere"),
                UapiError::InvalidValue {
                    line_number: 2,
                    key: "endpoint".into(),
                },
            ),
            (
                format!("set=1\npublic_key={hex}\nremove=yes"),
                UapiError::InvalidValue {
                    line_number: 2,
                    key: "remove".into(),
                },
            ),
            (
                format!("set=1\npublic_key={hex}\nallowed_ip=10.0.0.0/40"),
                UapiError::InvalidAllowedIp {
                    line_number: 2,
                    source: AllowedIpError::PrefixTooLong {
                        address: "10.0.0.0".parse().expect("test input is valid"),
                        prefix_len: 40,
                        max: 32,
                    },
                },
            ),
            (
                format!("set=1\npublic_key={hex}\nlisten_port=1"),
                UapiError::UnknownKey {
                    line_number: 2,
                    key: "listen_port".into(),
                },
            ),
            (
                "get=1\nextra=1".into(),
                UapiError::UnknownOperation {
                    line: "get=1".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            let lines: Vec<&str> = text.split('\n').collect();
            assert_eq!(parse_request(&lines), Err(expected), "input {text:?}");
        }
        assert_eq!(parse_request(&[]), Err(UapiError::Empty));
    }

    #[test]
    fn never_panics_on_odd_bytes() {
        let inputs = [
            "set=1\n=\n==\n=1",
            "set=1\npublic_key=\u{1F600}",
            "set=1\nprivate_key=\u{e9}\u{e9}",
            "set=1\npersistent_keepalive_interval=-1",
            "set=1\nfwmark=99999999999999999999",
        ];
        for text in inputs {
            let lines: Vec<&str> = text.split('\n').collect();
            assert!(parse_request(&lines).is_err(), "input {text:?}");
        }
    }
}
