//! Exit codes, and the mapping from errors to them.
//!
//! Every error `banger` reports ends up as a [`Failure`] somewhere in its
//! cause chain (or as a raw D-Bus error, classified the same way): the
//! failure's [`Kind`] picks the exit code and the error name printed with
//! `--json`. [`EXIT_CODES`] is the one table the help text, the man page and
//! the tests read.

use std::fmt;

use zbus::DBusError;

/// Success.
pub const OK: u8 = 0;
/// Generic failure, including a job that failed or was cancelled by someone else.
pub const FAILURE: u8 = 1;
/// Bad command line (clap's own code).
pub const USAGE: u8 = 2;
/// The system bus or bangerd cannot be reached.
pub const UNREACHABLE: u8 = 3;
/// Permission denied, or authentication required.
pub const PERMISSION: u8 = 4;
/// The thing named does not exist.
pub const NOT_FOUND: u8 = 5;
/// An argument is malformed, out of range, or a name is already taken.
pub const INVALID_ARGUMENT: u8 = 6;
/// The object is busy with another operation.
pub const BUSY: u8 = 7;
/// Something the operation needs is missing on this host.
pub const UNAVAILABLE: u8 = 8;
/// The command exists in the CLI but is not implemented yet.
pub const NOT_IMPLEMENTED: u8 = 9;
/// `banger doctor` reported at least one failed check.
pub const DOCTOR_FAILED: u8 = 10;
/// A per-user quota or a size cap would be exceeded.
pub const LIMIT: u8 = 11;
/// Interrupted by Ctrl-C (a followed job was cancelled).
pub const INTERRUPTED: u8 = 130;

/// Every exit code with its meaning, in order.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (OK, "success"),
    (
        FAILURE,
        "failure, including a job that failed or was cancelled",
    ),
    (USAGE, "usage error: the command line is wrong"),
    (UNREACHABLE, "the system bus or bangerd cannot be reached"),
    (PERMISSION, "permission denied, or authentication required"),
    (NOT_FOUND, "not found"),
    (
        INVALID_ARGUMENT,
        "invalid argument, or the name is already taken",
    ),
    (BUSY, "busy with another operation: retry later"),
    (
        UNAVAILABLE,
        "unavailable on this host (a tool or kernel feature is missing)",
    ),
    (NOT_IMPLEMENTED, "not implemented yet"),
    (DOCTOR_FAILED, "`banger doctor` reported failed checks"),
    (
        LIMIT,
        "a limit would be exceeded (a per-user quota or a size cap)",
    ),
    (
        INTERRUPTED,
        "interrupted (Ctrl-C); a followed job was cancelled",
    ),
];

/// The "EXIT STATUS" text of `--help` (built from [`EXIT_CODES`]).
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit status:\n");
    for (code, meaning) in EXIT_CODES {
        text.push_str(&format!("  {code:>3}  {meaning}\n"));
    }
    text.push_str(
        "\nWith --json, errors are also printed on stdout as {\"error\":{\"name\",\"message\"}}.",
    );
    text
}

/// What kind of failure an error is; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else.
    Failed,
    /// The system bus or bangerd cannot be reached.
    Unreachable,
    /// Not allowed, or a password prompt was needed and not possible.
    Permission,
    /// No such object.
    NotFound,
    /// Bad argument or name taken.
    InvalidArgument,
    /// Busy.
    Busy,
    /// Missing on this host.
    Unavailable,
    /// Not written yet.
    NotImplemented,
    /// Ctrl-C.
    Interrupted,
    /// A quota or size cap.
    Limit,
}

impl Kind {
    /// The process exit code of this kind.
    pub fn code(self) -> u8 {
        match self {
            Kind::Failed => FAILURE,
            Kind::Unreachable => UNREACHABLE,
            Kind::Permission => PERMISSION,
            Kind::NotFound => NOT_FOUND,
            Kind::InvalidArgument => INVALID_ARGUMENT,
            Kind::Busy => BUSY,
            Kind::Unavailable => UNAVAILABLE,
            Kind::NotImplemented => NOT_IMPLEMENTED,
            Kind::Interrupted => INTERRUPTED,
            Kind::Limit => LIMIT,
        }
    }

    /// Name used for failures that start in the CLI (not in a D-Bus reply).
    pub fn cli_error_name(self) -> &'static str {
        match self {
            Kind::Failed => "org.banger.Cli.Error.Failed",
            Kind::Unreachable => "org.banger.Cli.Error.Unreachable",
            Kind::Permission => "org.banger.Cli.Error.PermissionDenied",
            Kind::NotFound => "org.banger.Cli.Error.NotFound",
            Kind::InvalidArgument => "org.banger.Cli.Error.InvalidArgument",
            Kind::Busy => "org.banger.Cli.Error.Busy",
            Kind::Unavailable => "org.banger.Cli.Error.Unavailable",
            Kind::NotImplemented => "org.banger.Cli.Error.NotImplemented",
            Kind::Interrupted => "org.banger.Cli.Error.Interrupted",
            Kind::Limit => "org.banger.Cli.Error.LimitExceeded",
        }
    }

    /// The kind of a D-Bus error name (`org.banger.Error.*` or a standard one).
    pub fn of_error_name(name: &str) -> Kind {
        if let Some(short) = name.strip_prefix("org.banger.Error.") {
            return match short {
                "NotFound" => Kind::NotFound,
                "InvalidArgument" | "AlreadyExists" => Kind::InvalidArgument,
                "Busy" => Kind::Busy,
                "PermissionDenied" => Kind::Permission,
                "Unavailable" => Kind::Unavailable,
                "LimitExceeded" => Kind::Limit,
                // Failed, Cancelled and any name added later.
                _ => Kind::Failed,
            };
        }
        match name {
            INTERACTIVE_AUTH_REQUIRED | ACCESS_DENIED | AUTH_FAILED => Kind::Permission,
            SERVICE_UNKNOWN | NAME_HAS_NO_OWNER | NO_REPLY | TIMEOUT | TIMED_OUT | DISCONNECTED
            | NO_SERVER | SPAWN_FAILED => Kind::Unreachable,
            UNKNOWN_OBJECT => Kind::NotFound,
            INVALID_ARGS => Kind::InvalidArgument,
            LIMITS_EXCEEDED => Kind::Busy,
            _ => Kind::Failed,
        }
    }
}

pub const INTERACTIVE_AUTH_REQUIRED: &str = banger_dbus::error::INTERACTIVE_AUTHORIZATION_REQUIRED;
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
const AUTH_FAILED: &str = "org.freedesktop.DBus.Error.AuthFailed";
const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";
const NAME_HAS_NO_OWNER: &str = "org.freedesktop.DBus.Error.NameHasNoOwner";
const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";
const TIMEOUT: &str = "org.freedesktop.DBus.Error.Timeout";
const TIMED_OUT: &str = "org.freedesktop.DBus.Error.TimedOut";
const DISCONNECTED: &str = "org.freedesktop.DBus.Error.Disconnected";
const NO_SERVER: &str = "org.freedesktop.DBus.Error.NoServer";
const SPAWN_FAILED: &str = "org.freedesktop.DBus.Error.Spawn.Failed";
const UNKNOWN_OBJECT: &str = "org.freedesktop.DBus.Error.UnknownObject";
const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";
const UNKNOWN_INTERFACE: &str = "org.freedesktop.DBus.Error.UnknownInterface";
const UNKNOWN_PROPERTY: &str = "org.freedesktop.DBus.Error.UnknownProperty";
const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";

/// What to do when polkit wanted to ask for a password and could not.
pub const AUTH_HINT: &str = "authentication is required: run banger from a terminal \
     (without --no-ask-password) so it can ask for your password, \
     or have an administrator add you to the `banger` group";

/// An error with a kind, a name and a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    kind: Kind,
    name: String,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Failure {
    /// A failure that starts in the CLI.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            name: kind.cli_error_name().to_owned(),
            message: message.into(),
            source: None,
        }
    }

    /// The "command not implemented yet" failure.
    pub fn not_implemented(command: &str) -> Self {
        Self::new(
            Kind::NotImplemented,
            format!("`banger {command}` is not implemented yet"),
        )
    }

    /// Replace the error name (a D-Bus error name, usually).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Replace the message, keeping kind, name and source.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Attach the underlying error.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Kind of this failure.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Error name (printed with `--json`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The message, without the causes.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Turn an error of a D-Bus call to bangerd into a failure whose message
    /// says what to do.
    pub fn from_dbus(err: banger_dbus::Error) -> Self {
        match RemoteError::of(&err) {
            Some(remote) => Self::from_remote(remote),
            None => Self::from_transport(err),
        }
    }

    /// Same as [`Failure::from_dbus`] for a plain zbus error.
    pub fn from_zbus(err: zbus::Error) -> Self {
        Self::from_dbus(banger_dbus::Error::from(err))
    }

    fn from_remote(remote: RemoteError) -> Self {
        let kind = Kind::of_error_name(&remote.name);
        let name = remote.name.clone();
        let (message, keep_source) = match remote.name.as_str() {
            n if n.starts_with("org.banger.Error.") => (remote.message.clone(), false),
            SERVICE_UNKNOWN | NAME_HAS_NO_OWNER => (
                "bangerd is not running: start it with `systemctl start bangerd` \
                 (see `journalctl -u bangerd` if it does not stay up)"
                    .to_owned(),
                true,
            ),
            INTERACTIVE_AUTH_REQUIRED => (AUTH_HINT.to_owned(), true),
            ACCESS_DENIED => (
                "the system bus refused the call: check that banger's bus policy \
                 (/usr/share/dbus-1/system.d/org.banger.Manager.conf) is installed"
                    .to_owned(),
                true,
            ),
            NO_REPLY | TIMEOUT | TIMED_OUT => (
                "bangerd did not answer: check `systemctl status bangerd` and \
                 `journalctl -u bangerd`"
                    .to_owned(),
                true,
            ),
            DISCONNECTED => (
                "lost the connection to the system bus: is dbus still running?".to_owned(),
                true,
            ),
            SPAWN_FAILED => (
                "the system bus could not start bangerd: see `journalctl -u bangerd`".to_owned(),
                true,
            ),
            UNKNOWN_METHOD | UNKNOWN_INTERFACE | UNKNOWN_PROPERTY => (
                "bangerd does not support this request: it may be older than this banger; \
                 restart it after an upgrade with `systemctl restart bangerd`"
                    .to_owned(),
                true,
            ),
            UNKNOWN_OBJECT => (
                "the object does not exist (any more) on bangerd".to_owned(),
                true,
            ),
            _ => (remote.message.clone(), false),
        };
        let failure = Self {
            kind,
            name,
            message,
            source: None,
        };
        if keep_source {
            failure.with_source(remote)
        } else {
            failure
        }
    }

    fn from_transport(err: banger_dbus::Error) -> Self {
        let banger_dbus::Error::ZBus(inner) = err else {
            // Every named variant is a remote error; this arm is unreachable
            // in practice but must not panic.
            return Self::new(Kind::Failed, err.message());
        };
        match &inner {
            zbus::Error::InputOutput(_) | zbus::Error::Connection(..) => Self::new(
                Kind::Unreachable,
                "lost the connection to the system bus: is dbus still running?",
            )
            .with_source(inner),
            _ => Self::new(
                Kind::Failed,
                "bangerd sent a reply banger does not understand: \
                 are banger and bangerd the same version?",
            )
            .with_source(inner),
        }
    }
}

/// An error reply: its D-Bus name and human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// Full D-Bus error name.
    pub name: String,
    /// The message sent with it.
    pub message: String,
}

impl RemoteError {
    /// The error reply inside `err`, or `None` for transport or decoding errors.
    ///
    /// (`banger_dbus::Error::ZBus` reports the name `org.freedesktop.zbus.Error`
    /// through `DBusError::name`; the real name is inside.)
    pub fn of(err: &banger_dbus::Error) -> Option<Self> {
        match err {
            banger_dbus::Error::ZBus(inner) => Self::of_zbus(inner),
            other => Some(Self {
                name: DBusError::name(other).to_string(),
                message: other.message(),
            }),
        }
    }

    /// The error reply inside a zbus error.
    pub fn of_zbus(err: &zbus::Error) -> Option<Self> {
        match err {
            zbus::Error::MethodError(name, message, _) => Some(Self {
                name: name.to_string(),
                message: message.clone().unwrap_or_default(),
            }),
            zbus::Error::FDO(e) => Some(Self::of_dbus_error(e.as_ref())),
            zbus::Error::DBus(e) => Some(Self::of_dbus_error(e.as_ref())),
            _ => None,
        }
    }

    fn of_dbus_error(e: &(impl DBusError + ?Sized)) -> Self {
        Self {
            name: e.name().to_string(),
            message: e.description().unwrap_or_default().to_owned(),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{} ({})", self.message, self.name)
        }
    }
}

impl std::error::Error for RemoteError {}

/// The kind and error name of any error: the first [`Failure`] (or D-Bus
/// error) in its cause chain decides.
pub fn classify(err: &anyhow::Error) -> (Kind, String) {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return (f.kind(), f.name().to_owned());
        }
        if let Some(e) = cause.downcast_ref::<banger_dbus::Error>() {
            return classify_dbus(e);
        }
        if let Some(e) = cause.downcast_ref::<zbus::Error>() {
            return match RemoteError::of_zbus(e) {
                Some(r) => (Kind::of_error_name(&r.name), r.name),
                None => (Kind::Failed, Kind::Failed.cli_error_name().to_owned()),
            };
        }
    }
    (Kind::Failed, Kind::Failed.cli_error_name().to_owned())
}

/// Kind and name of a D-Bus error.
pub fn classify_dbus(err: &banger_dbus::Error) -> (Kind, String) {
    match RemoteError::of(err) {
        Some(r) => (Kind::of_error_name(&r.name), r.name),
        None => match err {
            banger_dbus::Error::ZBus(zbus::Error::InputOutput(_))
            | banger_dbus::Error::ZBus(zbus::Error::Connection(..)) => (
                Kind::Unreachable,
                Kind::Unreachable.cli_error_name().to_owned(),
            ),
            _ => (Kind::Failed, Kind::Failed.cli_error_name().to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fdo(e: zbus::fdo::Error) -> banger_dbus::Error {
        banger_dbus::Error::from(zbus::Error::from(e))
    }

    #[test]
    fn every_variant_maps_to_its_code() {
        use banger_dbus::Error as E;
        let cases: Vec<(E, u8)> = vec![
            (E::NotFound("x".into()), NOT_FOUND),
            (E::InvalidArgument("x".into()), INVALID_ARGUMENT),
            (E::AlreadyExists("x".into()), INVALID_ARGUMENT),
            (E::Busy("x".into()), BUSY),
            (E::PermissionDenied("x".into()), PERMISSION),
            (E::Unavailable("x".into()), UNAVAILABLE),
            (E::Failed("x".into()), FAILURE),
            (E::Cancelled("x".into()), FAILURE),
            (
                fdo(zbus::fdo::Error::InteractiveAuthorizationRequired(
                    "prompt needed".into(),
                )),
                PERMISSION,
            ),
            (
                fdo(zbus::fdo::Error::ServiceUnknown("no".into())),
                UNREACHABLE,
            ),
            (
                fdo(zbus::fdo::Error::NameHasNoOwner("no".into())),
                UNREACHABLE,
            ),
            (fdo(zbus::fdo::Error::AccessDenied("no".into())), PERMISSION),
            (fdo(zbus::fdo::Error::NoReply("no".into())), UNREACHABLE),
            (fdo(zbus::fdo::Error::UnknownObject("no".into())), NOT_FOUND),
            (fdo(zbus::fdo::Error::UnknownMethod("no".into())), FAILURE),
            (
                E::ZBus(zbus::Error::InputOutput(std::sync::Arc::new(
                    std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                ))),
                UNREACHABLE,
            ),
            (E::ZBus(zbus::Error::InvalidReply), FAILURE),
        ];
        for (err, code) in cases {
            let shown = format!("{err:?}");
            let (kind, _) = classify_dbus(&err);
            assert_eq!(kind.code(), code, "classify_dbus {shown}");
            let failure = Failure::from_dbus(err);
            assert_eq!(failure.kind().code(), code, "from_dbus {shown}");
            let any = anyhow::Error::from(failure).context("while doing something");
            assert_eq!(classify(&any).0.code(), code, "classify {shown}");
        }
    }

    #[test]
    fn names_survive() {
        let f = Failure::from_dbus(banger_dbus::Error::Busy("vm is starting".into()));
        assert_eq!(f.name(), "org.banger.Error.Busy");
        assert_eq!(f.message(), "vm is starting");

        let f = Failure::from_dbus(fdo(zbus::fdo::Error::ServiceUnknown(
            "The name org.banger.Manager was not provided by any .service files".into(),
        )));
        assert_eq!(f.name(), SERVICE_UNKNOWN);
        assert!(f.message().starts_with("bangerd is not running"));
        let source = std::error::Error::source(&f).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("not provided by any .service files")));

        // What the client receives: the standard name, as zbus decodes it.
        let prompt = || {
            fdo(zbus::fdo::Error::InteractiveAuthorizationRequired(
                "prompt needed".into(),
            ))
        };
        let f = Failure::from_dbus(prompt());
        assert_eq!(f.name(), INTERACTIVE_AUTH_REQUIRED);
        assert!(f.message().contains("banger` group"));
        assert_eq!(
            RemoteError::of(&prompt()).map(|r| r.name),
            Some(INTERACTIVE_AUTH_REQUIRED.to_owned())
        );
    }

    #[test]
    fn unknown_banger_error_names_are_failures() {
        assert_eq!(
            Kind::of_error_name("org.banger.Error.SomethingNew"),
            Kind::Failed
        );
        assert_eq!(Kind::of_error_name("org.example.Whatever"), Kind::Failed);
    }

    #[test]
    fn exit_code_table_is_complete_and_sorted() {
        let codes: Vec<u8> = EXIT_CODES.iter().map(|(c, _)| *c).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(codes, sorted);
        for kind in [
            Kind::Failed,
            Kind::Unreachable,
            Kind::Permission,
            Kind::NotFound,
            Kind::InvalidArgument,
            Kind::Busy,
            Kind::Unavailable,
            Kind::NotImplemented,
            Kind::Interrupted,
        ] {
            assert!(codes.contains(&kind.code()), "{kind:?}");
        }
        assert!(codes.contains(&DOCTOR_FAILED) && codes.contains(&USAGE));
        let help = exit_codes_help();
        for (code, meaning) in EXIT_CODES {
            assert!(help.contains(&format!("{code:>3}  {meaning}")));
        }
    }
}
