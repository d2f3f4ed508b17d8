//! Who owns a name on the bus: the probe `doctor` and the polkit and
//! resolved adapters ask before they call a service.

use zbus::Connection;
use zbus::names::BusName;

use crate::auth::BoxFuture;
use crate::doctor::{BusProbe, NameState};

/// Whether `name` is owned or activatable on `conn`'s bus.
pub async fn name_state(conn: &Connection, name: &str) -> NameState {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return NameState::Unknown;
    };
    let Ok(bus_name) = BusName::try_from(name) else {
        return NameState::Unknown;
    };
    match dbus.name_has_owner(bus_name).await {
        Ok(true) => return NameState::Owned,
        Ok(false) => {}
        Err(_) => return NameState::Unknown,
    }
    match dbus.list_activatable_names().await {
        Ok(names) if names.iter().any(|n| n.as_str() == name) => NameState::Activatable,
        Ok(_) => NameState::Absent,
        Err(_) => NameState::Unknown,
    }
}

/// [`BusProbe`] on a live connection.
#[derive(Debug, Clone)]
pub struct BusNames(pub Connection);

impl BusProbe for BusNames {
    fn name_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, NameState> {
        Box::pin(name_state(&self.0, name))
    }
}
