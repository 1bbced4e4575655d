//! Talking to ployzd: a gRPC channel over its Unix socket, with short timeouts
//! so a missing daemon is reported as `unavailable` quickly.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use ployz_api::{ApiError, ErrorClass, v1::ployz_client::PloyzClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

pub type Client = PloyzClient<Channel>;

/// Connects to the daemon at `socket`; `request_timeout` bounds each call.
pub async fn connect(socket: &Path, request_timeout: Duration) -> Result<Client, ApiError> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://ployzd.local")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(request_timeout);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|error| unreachable(socket, &error))?;
    Ok(PloyzClient::new(channel))
}

/// The error for a daemon that does not answer on `socket`.
pub fn unreachable(socket: &Path, error: &dyn std::error::Error) -> ApiError {
    let mut cause = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    ApiError::new(
        ErrorClass::Unavailable,
        "daemon_unreachable",
        format!(
            "cannot reach ployzd at {}: {cause}; start it with `ployzctl daemon install`",
            socket.display()
        ),
    )
}

/// Maps a failed call to the typed error, recognising transport failures.
pub fn call_error(socket: &Path, status: tonic::Status) -> ApiError {
    let error = ApiError::from_status(&status);
    if error.class == ErrorClass::Unavailable && error.code.starts_with("grpc_") {
        return ApiError::new(
            ErrorClass::Unavailable,
            "daemon_unreachable",
            format!(
                "ployzd at {} stopped answering: {}",
                socket.display(),
                status.message()
            ),
        );
    }
    error
}
