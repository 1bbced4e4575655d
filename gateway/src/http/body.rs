//! Bodies the proxy sends: a client's request body that can be handed to a
//! second upstream when the first could not even be connected to, and the
//! boxed body type of every response.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The body type of every response the proxy writes.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A short plain-text body.
pub fn text(message: String) -> ProxyBody {
    Full::new(Bytes::from(message))
        .map_err(|never| match never {})
        .boxed()
}

/// A request body shared between attempts. The upstream client polls it only
/// once a connection is up, so after a connect failure [`Self::untouched`]
/// says the bytes are all still here and the same body can go to the next
/// upstream.
#[derive(Clone, Debug)]
pub struct RetryableBody {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    body: Mutex<Incoming>,
    polled: AtomicBool,
    end_stream: bool,
    size_hint: SizeHint,
}

impl RetryableBody {
    pub fn new(body: Incoming) -> Self {
        let end_stream = body.is_end_stream();
        let size_hint = body.size_hint();
        Self {
            inner: Arc::new(Shared {
                body: Mutex::new(body),
                polled: AtomicBool::new(false),
                end_stream,
                size_hint,
            }),
        }
    }

    /// Whether no attempt has read from the body yet.
    pub fn untouched(&self) -> bool {
        !self.inner.polled.load(Ordering::Acquire)
    }
}

impl Body for RetryableBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.inner.polled.store(true, Ordering::Release);
        let mut body = self
            .inner
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        if self.untouched() {
            self.inner.end_stream
        } else {
            self.inner
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_end_stream()
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.untouched() {
            self.inner.size_hint
        } else {
            self.inner
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .size_hint()
        }
    }
}
