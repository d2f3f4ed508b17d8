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
}

/// Name of the standard error for "a prompt would be needed but is not allowed".
pub const INTERACTIVE_AUTHORIZATION_REQUIRED: &str =
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";

impl Error {
    /// Short machine name of the error (`NotFound`, ...; the last part of the D-Bus name).
    pub fn short_name(&self) -> String {
        let name = DBusError::name(self).to_string();
        name.rsplit('.').next().unwrap_or_default().to_owned()
    }

    /// The human message sent with the error.
    pub fn message(&self) -> String {
        DBusError::description(self)
            .map(str::to_owned)
            .unwrap_or_else(|| self.to_string())
    }

    /// Whether the daemon answered that polkit would need to prompt.
    pub fn is_interactive_authorization_required(&self) -> bool {
        DBusError::name(self).as_str() == INTERACTIVE_AUTHORIZATION_REQUIRED
    }

    /// The error that makes the daemon reply `InteractiveAuthorizationRequired`.
    pub fn interactive_authorization_required(message: impl Into<String>) -> Self {
        Self::ZBus(zbus::Error::DBus(std::sync::Arc::new(
            zbus::fdo::Error::InteractiveAuthorizationRequired(message.into()),
        )))
    }
}
