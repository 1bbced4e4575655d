//! Leases and locks built on compare-and-set.
