//! The bus side of the live model: subscribe to bangerd's signals, load
//! every object once, then pass each signal on as an [`Update`]. When
//! bangerd leaves the bus the model hears [`Update::Gone`]; when a new
//! bangerd takes the name, everything is loaded again.
//!
//! Signals are subscribed before the load, so none falls between the two.
//! Those that reach banger after the load but were sent before its reply
//! (bangerd numbers its messages in the order it sends them) are already
//! in the loaded objects and are dropped, so an old value never overwrites
//! a newer one.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use zbus::message::Type as MessageType;
use zbus::{MatchRule, Message, MessageStream, OwnedObjectPath};

use super::{Interfaces, Update};
use crate::client::{Client, Props};
use crate::exit::{Failure, Kind};

/// The reply that loaded the model: who sent it, and its serial.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loaded {
    sender: String,
    serial: u32,
}

impl Loaded {
    /// Whether `msg` was sent by the same bangerd before its reply to the load.
    fn covers(&self, msg: &Message) -> bool {
        let header = msg.header();
        header.sender().map(|s| s.as_str()) == Some(self.sender.as_str())
            && msg.primary_header().serial_num().get() < self.serial
    }
}

/// Feed `tx` until it closes or the bus connection ends.
pub async fn run(client: Client, tx: mpsc::Sender<Update>) -> Result<(), Failure> {
    let conn = client.connection().clone();
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(banger_dbus::BUS_NAME)
        .path_namespace(banger_dbus::MANAGER_PATH)
        .build()
        .map_err(Failure::from_zbus)?;
    let mut signals = MessageStream::for_match_rule(rule, &conn, NonZeroUsize::new(8192))
        .await
        .map_err(Failure::from_zbus)?;
    let bus = zbus::fdo::DBusProxy::new(&conn)
        .await
        .map_err(Failure::from_zbus)?;
    let mut owners = bus
        .receive_name_owner_changed_with_args(&[(0, banger_dbus::BUS_NAME)])
        .await
        .map_err(Failure::from_zbus)?;

    let mut loaded = load(&conn, &tx).await?;
    loop {
        tokio::select! {
            msg = signals.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let Ok(msg) = msg else { continue };
                if loaded.as_ref().is_some_and(|l| l.covers(&msg)) {
                    continue;
                }
                // A signal the model cannot read is skipped; the next
                // load (bangerd restarting) puts the model right.
                if let Ok(Some(update)) = Update::decode(&msg)
                    && tx.send(update).await.is_err()
                {
                    return Ok(());
                }
            }
            changed = owners.next() => {
                let Some(changed) = changed else { return Ok(()) };
                let Ok(args) = changed.args() else { continue };
                if args.new_owner().is_some() {
                    loaded = load(&conn, &tx).await?;
                } else {
                    loaded = None;
                    if tx.send(Update::Gone("bangerd left the bus".into())).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// `GetManagedObjects`, sent on as [`Update::Loaded`]; `None` (after an
/// [`Update::Gone`]) when bangerd is not there. `Err` only when `tx` closed.
async fn load(
    conn: &zbus::Connection,
    tx: &mpsc::Sender<Update>,
) -> Result<Option<Loaded>, Failure> {
    let closed = || Failure::new(Kind::Interrupted, "the front end went away");
    let reply = conn
        .call_method(
            Some(banger_dbus::BUS_NAME),
            banger_dbus::MANAGER_PATH,
            Some("org.freedesktop.DBus.ObjectManager"),
            "GetManagedObjects",
            &(),
        )
        .await;
    let decoded = reply.and_then(|reply| {
        let objects: HashMap<OwnedObjectPath, HashMap<String, Props>> =
            reply.body().deserialize()?;
        let loaded = reply.header().sender().map(|sender| Loaded {
            sender: sender.to_string(),
            serial: reply.primary_header().serial_num().get(),
        });
        Ok((objects, loaded))
    });
    match decoded {
        Ok((objects, loaded)) => {
            let objects = objects
                .into_iter()
                .map(|(path, interfaces)| {
                    (
                        path.to_string(),
                        interfaces.into_iter().collect::<Interfaces>(),
                    )
                })
                .collect();
            tx.send(Update::Loaded(objects))
                .await
                .map_err(|_| closed())?;
            Ok(loaded)
        }
        Err(e) => {
            let why = Failure::from_zbus(e).message().to_owned();
            tx.send(Update::Gone(why)).await.map_err(|_| closed())?;
            Ok(None)
        }
    }
}

/// `VM.Stats` of each VM in `paths`, one after another, as updates (a VM
/// that does not answer is left out).
pub async fn stats(client: &Client, paths: Vec<String>) -> Vec<Update> {
    let mut updates = Vec::new();
    for path in paths {
        if let Ok(stats) = client.vm_stats(&path).await {
            let number = |key: &str| {
                stats
                    .get(key)
                    .and_then(|v| v.try_clone().ok())
                    .and_then(|v| u64::try_from(v).ok())
                    .unwrap_or(0)
            };
            updates.push(Update::Stats {
                cpu_usec: number("cpu_usec"),
                rss_bytes: number("rss_bytes"),
                path,
            });
        }
    }
    updates
}
