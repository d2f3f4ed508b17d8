//! The core's error type: what every command of the internal API can answer.
//!
//! Front ends map these kinds to their own wire errors (the D-Bus layer to
//! `org.banger.Error.*`); the core never sees wire types.

/// Kind of failure, stable across front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The thing does not exist.
    NotFound,
    /// An argument is malformed, unknown or out of range.
    InvalidArgument,
    /// A thing with that name already exists.
    AlreadyExists,
    /// Busy with another operation.
    Busy,
    /// The caller may not do this.
    PermissionDenied,
    /// Polkit would have to ask, and the caller did not allow a prompt.
    InteractiveAuthorizationRequired,
    /// Something needed is missing on this host.
    Unavailable,
    /// The operation failed.
    Failed,
    /// The operation was cancelled.
    Cancelled,
    /// A quota or size cap would be exceeded.
    LimitExceeded,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::NotFound,
        ErrorKind::InvalidArgument,
        ErrorKind::AlreadyExists,
        ErrorKind::Busy,
        ErrorKind::PermissionDenied,
        ErrorKind::InteractiveAuthorizationRequired,
        ErrorKind::Unavailable,
        ErrorKind::Failed,
        ErrorKind::Cancelled,
        ErrorKind::LimitExceeded,
    ];

    /// Its name where it is written down (the job history, a helper's
    /// report): the variant's, e.g. `NotFound`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "NotFound",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::Busy => "Busy",
            ErrorKind::PermissionDenied => "PermissionDenied",
            ErrorKind::InteractiveAuthorizationRequired => "InteractiveAuthorizationRequired",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Failed => "Failed",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::LimitExceeded => "LimitExceeded",
        }
    }

    /// The kind named `name` ([`ErrorKind::name`]).
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// An error answered by the core: a kind and a message for humans that says
/// what to do (lowercase, no trailing period).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What failed and what to do about it.
    pub message: String,
}

impl Error {
    /// `LimitExceeded`; the message names the limit (its config key), the
    /// numbers and what to do.
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }

    /// This error with each non-empty word of `words` replaced by its
    /// stand-in in the message: a job's error goes out in a `Completed`
    /// signal every user on the bus receives, so the caller's arguments (a
    /// registry, a repository) are taken out; the caller knows them.
    pub fn redacted(mut self, words: &[(&str, &str)]) -> Self {
        for (word, instead) in words.iter().filter(|(w, _)| !w.is_empty()) {
            self.message = self.message.replace(word, instead);
        }
        self
    }

    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// `InvalidArgument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// `PermissionDenied`.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// `Unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// `Failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }

    /// `Cancelled`.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }

    /// `Failed`, with the whole cause chain of `err` after `context`.
    pub fn failed_with(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = format!("{context}: {err}");
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::failed(message)
    }
}

/// Result of a core command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_and_read_back_by_its_name() {
        for (i, kind) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(ErrorKind::from_name(kind.name()), Some(kind));
            // The history has always stored the variant's Debug name.
            assert_eq!(kind.name(), format!("{kind:?}"));
            assert!(!ErrorKind::ALL[..i].contains(&kind), "{kind:?} twice");
        }
        assert_eq!(ErrorKind::from_name("nonsense"), None);
    }
}
