//! The `org.banger.Error.*` errors.

use zbus::DBusError;

/// Errors banger's D-Bus API replies with. Every message says what failed
/// and, where there is something to do, what to do.
///
/// A reply may also be `org.freedesktop.DBus.Error.InteractiveAuthorizationRequired`
/// (when polkit would have to ask and the caller did not allow interaction);
/// that one arrives as [`Error::ZBus`], see [`Error::is_interactive_authorization_required`].
#[derive(DBusError, Debug)]
#[zbus(prefix = "org.banger.Error")]
pub enum Error {
    /// Transport or protocol error, or an error reply outside `org.banger.Error`.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The object, or the thing a reference names, does not exist.
    NotFound(String),
    /// An argument or option is malformed, unknown or out of range.
    InvalidArgument(String),
    /// A thing with that name already exists.
    AlreadyExists(String),
    /// The object is busy with another operation; retry later.
    Busy(String),
    /// The caller is not allowed to do this.
    PermissionDenied(String),
    /// Something the operation needs is missing on this host.
    Unavailable(String),
    /// The operation failed.
    Failed(String),
    /// The operation was cancelled (a job's `Completed` carries this name).
    Cancelled(String),
    /// A limit would be exceeded: a per-user quota (VMs, vCPUs, memory,
    /// disk) or a size cap on an import or pull. The message names the
    /// limit and its value.
    LimitExceeded(String),
}

/// Name of the standard error for "a prompt would be needed but is not allowed".
pub const INTERACTIVE_AUTHORIZATION_REQUIRED: &str =
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";

impl Error {
    /// The D-Bus error name, also for errors outside `org.banger.Error`
    /// (standard `org.freedesktop.DBus.Error.*` replies, transport errors).
    pub fn name(&self) -> String {
        match self {
            Self::ZBus(zbus::Error::MethodError(name, _, _)) => name.to_string(),
            Self::ZBus(zbus::Error::FDO(e)) => DBusError::name(e.as_ref()).to_string(),
            Self::ZBus(zbus::Error::DBus(e)) => DBusError::name(e.as_ref()).to_string(),
            other => DBusError::name(other).to_string(),
        }
    }

    /// Short machine name of the error (`NotFound`, ...; the last part of the D-Bus name).
    pub fn short_name(&self) -> String {
        let name = self.name();
        name.rsplit('.').next().unwrap_or_default().to_owned()
    }

    /// The human message sent with the error.
    pub fn message(&self) -> String {
        let description = match self {
            Self::ZBus(zbus::Error::MethodError(_, desc, _)) => desc.clone(),
            Self::ZBus(zbus::Error::FDO(e)) => {
                DBusError::description(e.as_ref()).map(str::to_owned)
            }
            Self::ZBus(zbus::Error::DBus(e)) => {
                DBusError::description(e.as_ref()).map(str::to_owned)
            }
            Self::ZBus(e) => Some(e.to_string()),
            other => DBusError::description(other).map(str::to_owned),
        };
        description.unwrap_or_else(|| self.to_string())
    }

    /// Whether the daemon answered that polkit would need to prompt.
    pub fn is_interactive_authorization_required(&self) -> bool {
        self.name() == INTERACTIVE_AUTHORIZATION_REQUIRED
    }
}

/// What the daemon's methods reply with on failure: one of banger's own
/// errors, or a standard `org.freedesktop.DBus.Error.*` one (such as
/// `InteractiveAuthorizationRequired`), each sent under its real name.
#[derive(Debug)]
pub enum Reply {
    /// `org.banger.Error.*`.
    Banger(Error),
    /// `org.freedesktop.DBus.Error.*`.
    Standard(zbus::fdo::Error),
}

impl Reply {
    /// The reply that tells the caller polkit would need to prompt.
    pub fn interactive_authorization_required(message: impl Into<String>) -> Self {
        Self::Standard(zbus::fdo::Error::InteractiveAuthorizationRequired(
            message.into(),
        ))
    }
}

impl From<Error> for Reply {
    fn from(e: Error) -> Self {
        Self::Banger(e)
    }
}

impl From<zbus::Error> for Reply {
    fn from(e: zbus::Error) -> Self {
        Self::Banger(Error::ZBus(e))
    }
}

impl DBusError for Reply {
    fn create_reply(&self, call: &zbus::message::Header<'_>) -> zbus::Result<zbus::Message> {
        match self {
            Self::Banger(e) => DBusError::create_reply(e, call),
            Self::Standard(e) => DBusError::create_reply(e, call),
        }
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        match self {
            Self::Banger(e) => DBusError::name(e),
            Self::Standard(e) => DBusError::name(e),
        }
    }

    fn description(&self) -> Option<&str> {
        match self {
            Self::Banger(e) => DBusError::description(e),
            Self::Standard(e) => DBusError::description(e),
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Banger(e) => e.fmt(f),
            Self::Standard(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Reply {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_replies_keep_their_names() {
        let reply = Reply::interactive_authorization_required("ask");
        assert_eq!(
            DBusError::name(&reply).as_str(),
            INTERACTIVE_AUTHORIZATION_REQUIRED
        );
        assert_eq!(DBusError::description(&reply), Some("ask"));
        let reply = Reply::from(Error::NotFound("no vm x".into()));
        assert_eq!(
            DBusError::name(&reply).as_str(),
            "org.banger.Error.NotFound"
        );
    }

    #[test]
    fn client_side_helpers_look_inside_standard_errors() {
        let received = Error::from(zbus::Error::FDO(Box::new(
            zbus::fdo::Error::InteractiveAuthorizationRequired("ask".into()),
        )));
        assert!(received.is_interactive_authorization_required());
        assert_eq!(received.short_name(), "InteractiveAuthorizationRequired");
        assert_eq!(received.message(), "ask");
        let ours = Error::PermissionDenied("no".into());
        assert_eq!(ours.short_name(), "PermissionDenied");
        assert_eq!(ours.message(), "no");
        assert!(!ours.is_interactive_authorization_required());
    }
}
