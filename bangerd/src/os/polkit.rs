//! [`Authorizer`] backed by polkit's `org.freedesktop.PolicyKit1.Authority`.

use std::collections::HashMap;

use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use crate::auth::{Action, Authorizer, BoxFuture, Caller};
use crate::doctor::{NameState, POLKIT_NAME};
use crate::error::{Error, ErrorKind, Result};

/// Asks polkit, with the caller's bus name as the subject.
#[derive(Debug, Clone)]
pub struct Polkit {
    conn: Connection,
}

impl Polkit {
    /// A polkit client on `conn` (the daemon's system bus connection).
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    async fn check(&self, caller: &Caller, action: Action) -> Result<()> {
        let Some(bus_name) = caller.bus_name.as_deref() else {
            // Internal callers have no bus name; only the daemon itself is one.
            return if caller.uid == 0 {
                Ok(())
            } else {
                Err(Error::denied("caller has no bus name to authorize"))
            };
        };
        if !crate::os::bus_names::name_state(&self.conn, POLKIT_NAME)
            .await
            .reachable()
        {
            return without_polkit(caller, action);
        }
        let subject = subject_for(bus_name)?;
        let authority = AuthorityProxy::new(&self.conn)
            .await
            .map_err(|e| Error::unavailable(format!("cannot reach polkit: {e}")))?;
        let flags = if caller.allow_interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let result = authority
            .check_authorization(&subject, action.id(), &HashMap::new(), flags, "")
            .await;
        let result = match result {
            Ok(r) => r,
            Err(zbus::Error::FDO(e))
                if matches!(
                    *e,
                    zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
                ) =>
            {
                return without_polkit(caller, action);
            }
            Err(e) => {
                return Err(Error::unavailable(format!(
                    "asking polkit about {} failed: {e}",
                    action.id()
                )));
            }
        };
        tracing::debug!(
            uid = caller.uid,
            action = action.id(),
            authorized = result.is_authorized,
            challenge = result.is_challenge,
            "polkit answered"
        );
        decide(caller, action, result.is_authorized, result.is_challenge)
    }
}

impl Authorizer for Polkit {
    fn authorize<'a>(&'a self, caller: &'a Caller, action: Action) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.check(caller, action))
    }
}

/// polkit's subject for a bus name. The crate builds subjects from a message
/// header, so make a header that carries the caller's name as its sender.
fn subject_for(bus_name: &str) -> Result<Subject> {
    let bad = |e: zbus::Error| {
        Error::failed(format!("cannot build a polkit subject for {bus_name}: {e}"))
    };
    let message = zbus::Message::method_call("/", "Authorize")
        .sender(bus_name)
        .build(&())
        .map_err(bad)?;
    Subject::new_for_message_header(&message.header())
        .map_err(|e| Error::failed(format!("cannot build a polkit subject for {bus_name}: {e}")))
}

/// Turn polkit's answer into ours.
fn decide(caller: &Caller, action: Action, authorized: bool, challenge: bool) -> Result<()> {
    if authorized {
        Ok(())
    } else if challenge && !caller.allow_interactive {
        Err(Error::new(
            ErrorKind::InteractiveAuthorizationRequired,
            format!(
                "authentication is required to {} ({}); run the command from a terminal so \
                 banger can ask for a password, or ask an administrator to add you to the banger group",
                action.describe(),
                action.id()
            ),
        ))
    } else if challenge {
        Err(Error::denied(format!(
            "not authorized to {} ({}): authentication failed or no polkit agent could ask; \
             run the command from a terminal, or ask an administrator to add you to the banger group",
            action.describe(),
            action.id()
        )))
    } else {
        Err(Error::denied(format!(
            "not authorized to {} (polkit denied {}); ask an administrator to grant it",
            action.describe(),
            action.id()
        )))
    }
}

/// Without polkit only root may act.
fn without_polkit(caller: &Caller, action: Action) -> Result<()> {
    if caller.uid == 0 {
        Ok(())
    } else {
        Err(Error::denied(format!(
            "polkit is not running on the system bus, so only root may {}; \
             ask an administrator to install and start polkitd",
            action.describe()
        )))
    }
}

/// Whether polkit can be reached on `conn`.
pub async fn available(conn: &Connection) -> bool {
    crate::os::bus_names::name_state(conn, POLKIT_NAME).await != NameState::Absent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(interactive: bool) -> Caller {
        Caller {
            uid: 1000,
            bus_name: Some(":1.42".into()),
            allow_interactive: interactive,
        }
    }

    #[test]
    fn decisions() {
        assert!(decide(&user(false), Action::Maintain, true, false).is_ok());
        let e = decide(&user(false), Action::Maintain, false, true).expect_err("prompt needed");
        assert_eq!(e.kind, ErrorKind::InteractiveAuthorizationRequired);
        let e = decide(&user(true), Action::Maintain, false, true).expect_err("no agent");
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        let e = decide(&user(false), Action::VmCreate, false, false).expect_err("denied");
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(e.message.contains("org.banger.vm.create"), "{}", e.message);
    }

    #[test]
    fn without_polkit_only_root() {
        assert!(without_polkit(&Caller::root(), Action::Update).is_ok());
        let e = without_polkit(&user(true), Action::Update).expect_err("denied");
        assert!(e.message.contains("polkit"), "{}", e.message);
    }

    #[test]
    fn subject_is_the_bus_name() {
        let subject = subject_for(":1.42").expect("subject");
        assert_eq!(subject.kind(), "system-bus-name");
        assert!(subject_for("not a name").is_err());
    }
}
