//! The core's error type, from crate `banger-error` (shared with the
//! crates under `bangerd/` that answer the same errors).

pub use banger_error::{Error, ErrorKind, Result};
