//! ployzd: the Ployz daemon. Runs the primitives requested over gRPC and
//! supervises the data-plane sidecars. Each module is one domain of the
//! architecture (see ARCHITECTURE.md); only `daemon` names concrete backends.

pub mod coordination;
pub mod daemon;
pub mod deploy;
pub mod machine;
pub mod mesh;
pub mod runtime;
pub mod services;
pub mod storage;
pub mod store;
pub mod time;

/// An error and all its sources on one line, `outer: inner: innermost`, for
/// logs, status details and API messages. Line breaks inside a message (a
/// quoted log tail) become ` | ` so the result stays one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(error), |&error| error.source())
        .map(|error| error.to_string().trim().replace('\n', " | "))
        .collect::<Vec<_>>()
        .join(": ")
}

/// The 1-based line of byte `offset` in `text` (for parse errors that report
/// byte spans). Never panics, whatever the offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
