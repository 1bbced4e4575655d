//! Waiting for a new container to be ready, as its manifest's health check
//! defines: an HTTP GET answered with 2xx/3xx, a TCP connect, or a command
//! exiting 0 inside the container. The result is an observation used at
//! decision time; it is never stored as truth.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::manifest::{HealthCheck, Probe};
use crate::runtime::{ContainerId, ContainerRuntime, ContainerState};

/// Without a health check, a container is ready once it has been running this long.
const SETTLE: Duration = Duration::from_millis(500);
/// How often readiness is polled when there is no health check.
const POLL: Duration = Duration::from_millis(100);

/// Why a container did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("container exited (code {exit_code:?}) before it became healthy")]
    Exited { exit_code: Option<i64> },
    #[error("health check failed {failures} times in a row; last: {last}")]
    Unhealthy { failures: u32, last: String },
    #[error("container has no address to probe")]
    NoAddress,
    #[error("cannot inspect the container: {0}")]
    Runtime(String),
}

/// Waits until `id` is ready according to `check`, or fails.
pub async fn wait_ready<R: ContainerRuntime>(
    runtime: &R,
    id: &ContainerId,
    check: Option<&HealthCheck>,
) -> Result<(), HealthError> {
    let Some(check) = check else {
        return wait_running(runtime, id).await;
    };
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let address = running_address(runtime, id).await?;
        let outcome = match check.probe() {
            Some(Probe::Http { port, path }) => match address {
                Some(ip) => http_probe(SocketAddr::new(ip, port), path, check.timeout).await,
                None => Err("no address".to_owned()),
            },
            Some(Probe::Tcp { port }) => match address {
                Some(ip) => tcp_probe(SocketAddr::new(ip, port), check.timeout).await,
                None => Err("no address".to_owned()),
            },
            Some(Probe::Command(command)) => runtime
                .exec(id, command, check.timeout)
                .await
                .map_err(|error| error.to_string())
                .and_then(|output| match output.exit_code {
                    0 => Ok(()),
                    code => Err(format!("`{}` exited {code}", command.join(" "))),
                }),
            None => return Ok(()),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(last) => {
                // Failures during the start period do not count.
                if started.elapsed() >= check.start_period {
                    failures += 1;
                    if failures >= check.retries {
                        return Err(HealthError::Unhealthy { failures, last });
                    }
                }
            }
        }
        tokio::time::sleep(check.interval).await;
    }
}

/// Ready without a health check: running, and still running after a short settle.
async fn wait_running<R: ContainerRuntime>(
    runtime: &R,
    id: &ContainerId,
) -> Result<(), HealthError> {
    let deadline = Instant::now() + SETTLE;
    loop {
        running_address(runtime, id).await?;
        if Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The container's first address if it runs; an error if it stopped.
async fn running_address<R: ContainerRuntime>(
    runtime: &R,
    id: &ContainerId,
) -> Result<Option<IpAddr>, HealthError> {
    let info = runtime
        .inspect(id)
        .await
        .map_err(|error| HealthError::Runtime(error.to_string()))?
        .ok_or(HealthError::Exited { exit_code: None })?;
    match info.state {
        ContainerState::Running => Ok(info.addresses.first().copied()),
        ContainerState::Created | ContainerState::Exited | ContainerState::Other => {
            Err(HealthError::Exited {
                exit_code: info.exit_code,
            })
        }
    }
}

async fn tcp_probe(address: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("connect {address}: {error}")),
        Err(_) => Err(format!("connect {address}: no answer within {timeout:?}")),
    }
}

/// One HTTP/1.0 GET; healthy on a 2xx or 3xx status line.
async fn http_probe(address: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect {address}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nUser-Agent: ployz-health\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send to {address}: {e}"))?;
        let mut head = [0u8; 64];
        let read = stream
            .read(&mut head)
            .await
            .map_err(|e| format!("read from {address}: {e}"))?;
        let line = String::from_utf8_lossy(&head[..read]);
        let status: Option<u16> = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok());
        match status {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("GET {path} answered {code}")),
            None => Err(format!("GET {path}: not an HTTP answer")),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = [0u8; 256];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_and_refuses_5xx_and_garbage() {
        let ok = serve_once("HTTP/1.0 200 OK\r\n\r\nhi").await;
        assert_eq!(http_probe(ok, "/", Duration::from_secs(1)).await, Ok(()));
        let bad = serve_once("HTTP/1.1 503 Unavailable\r\n\r\n").await;
        assert!(http_probe(bad, "/", Duration::from_secs(1)).await.is_err());
        let garbage = serve_once("\u{0}\u{1}nonsense").await;
        assert!(
            http_probe(garbage, "/", Duration::from_secs(1))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        assert_eq!(tcp_probe(address, Duration::from_secs(1)).await, Ok(()));
        drop(listener);
        assert!(tcp_probe(address, Duration::from_secs(1)).await.is_err());
    }
}
