//! coordination: operations as durable facts. Every mutating request carries an
//! operation id; the [`journal::Journal`] records its intent, each step and its
//! final result, guards it with a lease so only one participant runs it, and
//! replays the recorded result when the same id is retried.
//!
//! Depends on the store contract only, never on a concrete backend.

pub mod journal;

pub use journal::{
    Begin, Journal, JournalError, OperationId, OperationRecord, OperationRun, OperationState,
    RecordedError, StepEvent, StepStatus,
};
