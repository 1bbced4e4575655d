//! A client of the standard WireGuard cross-platform configuration protocol
//! (UAPI): the text protocol `wg` speaks over `<dir>/<interface>.sock`. ployzd
//! drives `ployz-tunnel` through it, and so could drive wireguard-go or any
//! other userspace implementation the same way.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    time::timeout,
};

use super::boringtun::{DeviceSnapshot, SetRequest, uapi};

/// Bound on one request, connect to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on an answer; a device with 200 peers answers in a few tens of KiB.
const MAX_ANSWER_BYTES: u64 = 4 * 1024 * 1024;

/// The UAPI socket of `interface` in `dir`.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

/// Reads the device's configuration and peer statistics.
pub async fn get(socket: &Path) -> Result<DeviceSnapshot, WgError> {
    let lines = request(socket, "get=1\n\n").await?;
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    match uapi::parse_get(&lines) {
        Ok(Ok(snapshot)) => Ok(snapshot),
        Ok(Err(errno)) => Err(WgError::Refused {
            socket: socket.to_owned(),
            errno,
        }),
        Err(source) => Err(WgError::Malformed {
            socket: socket.to_owned(),
            detail: source.to_string(),
        }),
    }
}

/// Applies `change`.
pub async fn set(socket: &Path, change: &SetRequest) -> Result<(), WgError> {
    let lines = request(socket, &uapi::format_set(change)).await?;
    match lines.as_slice() {
        [line] if line == "errno=0" => Ok(()),
        [line] => match line.strip_prefix("errno=").and_then(|n| n.parse().ok()) {
            Some(errno) => Err(WgError::Refused {
                socket: socket.to_owned(),
                errno,
            }),
            None => Err(WgError::Malformed {
                socket: socket.to_owned(),
                detail: format!("unexpected answer `{line}`"),
            }),
        },
        _ => Err(WgError::Malformed {
            socket: socket.to_owned(),
            detail: format!("expected one errno line, got {} lines", lines.len()),
        }),
    }
}

/// The pid of the process serving `socket` (from the socket's peer credentials).
pub async fn server_pid(socket: &Path) -> Result<u32, WgError> {
    let stream = connect(socket).await?;
    let credentials = stream.peer_cred().map_err(|source| WgError::Io {
        socket: socket.to_owned(),
        source,
    })?;
    credentials
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or_else(|| WgError::Malformed {
            socket: socket.to_owned(),
            detail: "the socket's peer has no pid".to_owned(),
        })
}

async fn connect(socket: &Path) -> Result<UnixStream, WgError> {
    match timeout(REQUEST_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(WgError::Unreachable {
            socket: socket.to_owned(),
            source,
        }),
        Err(_) => Err(WgError::Timeout {
            socket: socket.to_owned(),
        }),
    }
}

/// Sends one request and returns the answer's lines, without the blank line.
async fn request(socket: &Path, text: &str) -> Result<Vec<String>, WgError> {
    let exchange = async {
        let mut stream = connect(socket).await?;
        let io = |source| WgError::Io {
            socket: socket.to_owned(),
            source,
        };
        stream.write_all(text.as_bytes()).await.map_err(io)?;
        let mut reader = BufReader::new(stream).take(MAX_ANSWER_BYTES);
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = reader.read_line(&mut line).await.map_err(io)?;
            if read == 0 {
                return Err(WgError::Malformed {
                    socket: socket.to_owned(),
                    detail: "the answer ended before its blank line".to_owned(),
                });
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                return Ok(lines);
            }
            lines.push(line.to_owned());
        }
    };
    timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(WgError::Timeout {
                socket: socket.to_owned(),
            })
        })
}

/// What can go wrong talking UAPI.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("no WireGuard device answers at {}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the WireGuard device at {} did not answer within {REQUEST_TIMEOUT:?}", socket.display())]
    Timeout { socket: PathBuf },
    #[error("talking to the WireGuard device at {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the WireGuard device at {} refused the request (errno {errno})", socket.display())]
    Refused { socket: PathBuf, errno: i32 },
    #[error("the WireGuard device at {} answered something unexpected: {detail}", socket.display())]
    Malformed { socket: PathBuf, detail: String },
}
