//! Userspace WireGuard on boringtun, run by the `ployz-tunnel` process so the
//! overlay survives ployzd restarts (a TUN dies with its process). Owns the
//! data path ([`device`]), the standard UAPI text protocol ([`uapi`]) and its
//! Unix-socket server ([`server`]), so `wg show` / `wg set` work against it.
//! Must not depend on the store, runtime or daemon domains.

pub mod allowed_ips;
pub mod device;
pub mod server;
pub mod uapi;

pub use allowed_ips::{AllowedIp, AllowedIpError, AllowedIpTable};
pub use device::{Device, DeviceCommand, DeviceError, bind_udp, create_tun};
pub use server::UapiServer;
pub use uapi::{DeviceSnapshot, Key, PeerSnapshot, PeerUpdate, Request, SetRequest, UapiError};

/// Where `wg` looks for userspace WireGuard sockets (`<dir>/<interface>.sock`).
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
