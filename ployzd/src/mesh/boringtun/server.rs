//! The UAPI server: accepts connections on the interface's Unix socket (where
//! `wg` looks for it), reads requests line by line, hands them to the data
//! path as [`DeviceCommand`]s and writes the answers. Owns its connection
//! tasks and joins them on shutdown. Bounded input: an overlong line or request
//! is answered with an errno and the connection is closed.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    device::DeviceCommand,
    uapi::{ERRNO_INVALID, ERRNO_IO, Request, format_errno, format_get, parse_request},
};
use crate::error_chain;

/// The longest line accepted, in bytes (keys are 64 hex digits).
const MAX_LINE: usize = 4096;
/// The most lines in one request.
const MAX_LINES: usize = 65_536;
/// How long open connections get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves UAPI on a bound Unix listener.
pub struct UapiServer {
    listener: UnixListener,
    commands: mpsc::Sender<DeviceCommand>,
}

impl UapiServer {
    /// A server on `listener` that forwards requests to `commands`.
    pub fn new(listener: UnixListener, commands: mpsc::Sender<DeviceCommand>) -> Self {
        Self { listener, commands }
    }

    /// Accepts connections until `shutdown` is cancelled, then gives open
    /// connections a grace period and aborts the rest.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (reader, writer) = stream.into_split();
                        connections.spawn(serve_connection(
                            reader,
                            writer,
                            self.commands.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a UAPI connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(error) = joined {
                        tracing::warn!(%error, "a UAPI connection task failed");
                    }
                }
            }
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.shutdown().await;
        }
    }
}

/// Serves requests on one connection until EOF, an I/O error, a protocol
/// violation that loses framing, or shutdown.
pub async fn serve_connection<R, W>(
    reader: R,
    mut writer: W,
    commands: mpsc::Sender<DeviceCommand>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(reader);
    let mut lines: Vec<String> = Vec::new();
    let mut invalid = false;
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        let mut bounded = (&mut reader).take(limit);
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = bounded.read_until(b'\n', &mut line) => read,
        };
        let at_end = match read {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(%error, "UAPI connection read failed");
                return;
            }
        };
        if line.len() > MAX_LINE || lines.len() >= MAX_LINES {
            // Framing is lost: answer once and hang up.
            let _ = writer
                .write_all(format_errno(ERRNO_INVALID).as_bytes())
                .await;
            return;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if !line.is_empty() {
            match std::str::from_utf8(&line) {
                Ok(text) => lines.push(text.to_owned()),
                Err(_) => invalid = true,
            }
            if !at_end {
                continue;
            }
        }
        if !lines.is_empty() || invalid {
            let answer = if invalid {
                format_errno(ERRNO_INVALID)
            } else {
                answer(&lines, &commands).await
            };
            lines.clear();
            invalid = false;
            if writer.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
        if at_end {
            return;
        }
    }
}

/// The answer to one request, errno included.
async fn answer(lines: &[String], commands: &mpsc::Sender<DeviceCommand>) -> String {
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    match parse_request(&lines) {
        Err(error) => {
            tracing::info!(error = %error_chain(&error), "rejecting a UAPI request");
            format_errno(error.errno())
        }
        Ok(Request::Get) => {
            let (reply, answer) = oneshot::channel();
            if commands.send(DeviceCommand::Get { reply }).await.is_err() {
                return format_errno(ERRNO_IO);
            }
            match answer.await {
                Ok(snapshot) => format_get(&snapshot),
                Err(_) => format_errno(ERRNO_IO),
            }
        }
        Ok(Request::Set(request)) => {
            let (reply, answer) = oneshot::channel();
            if commands
                .send(DeviceCommand::Set { request, reply })
                .await
                .is_err()
            {
                return format_errno(ERRNO_IO);
            }
            match answer.await {
                Ok(Ok(())) => format_errno(0),
                Ok(Err(error)) => {
                    tracing::warn!(error = %error_chain(&error), "cannot apply a UAPI set");
                    format_errno(ERRNO_IO)
                }
                Err(_) => format_errno(ERRNO_IO),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::mesh::boringtun::uapi::DeviceSnapshot;

    /// Runs `input` through a connection whose device answers gets with an
    /// empty snapshot and accepts every set; returns what was written back.
    async fn exchange(input: &[u8]) -> String {
        let (commands, mut device) = mpsc::channel(4);
        let fake_device = async move {
            while let Some(command) = device.recv().await {
                match command {
                    DeviceCommand::Get { reply } => {
                        let _ = reply.send(DeviceSnapshot::default());
                    }
                    DeviceCommand::Set { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        };
        let (client, server) = tokio::io::duplex(1 << 20);
        let (server_read, server_write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write
            .write_all(input)
            .await
            .expect("test input is valid");
        // Dropping a split half does not close the stream; shutdown does.
        client_write.shutdown().await.expect("test input is valid");
        let serve = serve_connection(
            server_read,
            server_write,
            commands,
            CancellationToken::new(),
        );
        let ((), ()) = tokio::join!(serve, fake_device);
        let mut output = String::new();
        client_read
            .read_to_string(&mut output)
            .await
            .expect("test input is valid");
        output
    }

    #[tokio::test]
    async fn answers_several_requests_on_one_connection() {
        let output = exchange(b"get=1\n\nset=1\nlisten_port=1\n\n").await;
        assert_eq!(output, "listen_port=0\nerrno=0\n\nerrno=0\n\n");
    }

    #[tokio::test]
    async fn malformed_requests_get_errno_and_the_connection_continues() {
        let output = exchange(b"set=1\nbogus=1\n\n\xff\xfe\n\nget=1\n\n").await;
        assert_eq!(
            output,
            "errno=-22\n\nerrno=-22\n\nlisten_port=0\nerrno=0\n\n"
        );
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_and_closes_the_connection() {
        let mut input = b"set=1\nprivate_key=".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_LINE * 2));
        input.extend(b"\n\nget=1\n\n");
        assert_eq!(exchange(&input).await, "errno=-22\n\n");
    }
}
