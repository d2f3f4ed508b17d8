//! A pool of idle TAP devices on the bridge, so creating a VM does not wait
//! for TAP setup: [`TapPool::acquire`] hands one over (owned by the VMM's
//! user) and refills in the background; [`TapPool::release`] takes it back
//! (it is reused, not deleted, while the pool is below its size).
//!
//! TAPs are named `bgtap<n>`. At startup [`TapPool::adopt`] takes every
//! `bgtap*` device no VM uses into the pool: pool TAPs are capacity, never
//! leaks.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::link::{Links, TAP_PREFIX};
use banger_error::Error;

/// Idle TAPs belong to root until handed out.
const IDLE_OWNER: u32 = 0;

#[derive(Debug, Default)]
struct State {
    idle: Vec<String>,
    in_use: BTreeSet<String>,
    /// Names being created for the pool: reserved, so that a refill and
    /// an acquire (or two refills) never pick the same one.
    creating: BTreeSet<String>,
}

/// The pool.
#[derive(Debug, Clone)]
pub struct TapPool {
    links: Links,
    bridge: u32,
    size: usize,
    state: Arc<Mutex<State>>,
}

impl TapPool {
    /// The bridge's interface index.
    pub fn bridge_index(&self) -> u32 {
        self.bridge
    }

    /// A pool of `size` idle TAPs on bridge `bridge` (not filled yet).
    pub fn new(links: Links, bridge: u32, size: usize) -> Self {
        Self {
            links,
            bridge,
            size,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Take over existing `bgtap*` devices: the ones in `in_use` stay
    /// with their VMs, the rest join the pool (beyond its size they are
    /// deleted). Then fill up.
    pub async fn adopt(&self, in_use: &[String]) -> Result<(), Error> {
        let existing = self.links.names_with_prefix(TAP_PREFIX).await?;
        let mut state = self.state.lock().await;
        for name in existing {
            if in_use.contains(&name) {
                state.in_use.insert(name);
            } else if state.idle.len() < self.size {
                // Reset owner and bridge, in case a crash left it half-made.
                self.links
                    .create_tap(&name, IDLE_OWNER, self.bridge)
                    .await?;
                state.idle.push(name);
            } else {
                self.links.delete(&name).await?;
            }
        }
        drop(state);
        self.fill().await
    }

    fn next_name(state: &State) -> String {
        let taken = |n: &String| {
            state.idle.contains(n) || state.in_use.contains(n) || state.creating.contains(n)
        };
        (0..)
            .map(|i| format!("{TAP_PREFIX}{i}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| format!("{TAP_PREFIX}x"))
    }

    /// Create idle TAPs until the pool has its size.
    pub async fn fill(&self) -> Result<(), Error> {
        loop {
            let name = {
                let mut state = self.state.lock().await;
                if state.idle.len() + state.creating.len() >= self.size {
                    return Ok(());
                }
                let name = Self::next_name(&state);
                state.creating.insert(name.clone());
                name
            };
            let made = self.links.create_tap(&name, IDLE_OWNER, self.bridge).await;
            let mut state = self.state.lock().await;
            state.creating.remove(&name);
            made?;
            state.idle.push(name);
        }
    }

    /// A TAP for a VM, owned by `owner_uid`: an idle one when there is
    /// one (refilled in the background), else a new one.
    pub async fn acquire(&self, owner_uid: u32) -> Result<String, Error> {
        let (name, from_pool) = {
            let mut state = self.state.lock().await;
            let (name, from_pool) = match state.idle.pop() {
                Some(n) => (n, true),
                None => (Self::next_name(&state), false),
            };
            state.in_use.insert(name.clone());
            (name, from_pool)
        };
        let made = if from_pool {
            self.links.set_tap_owner(&name, owner_uid).map(|()| 0)
        } else {
            self.links.create_tap(&name, owner_uid, self.bridge).await
        };
        if let Err(e) = made {
            self.state.lock().await.in_use.remove(&name);
            if !from_pool {
                let _ = self.links.delete(&name).await;
            }
            return Err(e);
        }
        if from_pool {
            let pool = self.clone();
            tokio::spawn(async move {
                if let Err(e) = pool.fill().await {
                    tracing::warn!("cannot refill the TAP pool: {e}");
                }
            });
        }
        Ok(name)
    }

    /// Give `name` back: kept as an idle TAP when the pool is short,
    /// deleted otherwise. The name stays reserved (in use) until then, so
    /// a refill running meanwhile cannot pick it.
    pub async fn release(&self, name: &str) -> Result<(), Error> {
        let keep = self.state.lock().await.idle.len() < self.size;
        let done = if keep {
            self.links.set_tap_owner(name, IDLE_OWNER)
        } else {
            self.links.delete(name).await
        };
        let mut state = self.state.lock().await;
        state.in_use.remove(name);
        done?;
        if keep {
            state.idle.push(name.to_owned());
        }
        Ok(())
    }

    /// Idle and in-use TAP names (for doctor and tests).
    pub async fn snapshot(&self) -> (Vec<String>, Vec<String>) {
        let state = self.state.lock().await;
        let mut idle = state.idle.clone();
        idle.sort();
        (idle, state.in_use.iter().cloned().collect())
    }

    /// Delete every idle TAP (shutdown with networking torn down).
    pub async fn drain(&self) -> Result<(), Error> {
        let idle = std::mem::take(&mut self.state.lock().await.idle);
        for name in idle {
            self.links.delete(&name).await?;
        }
        Ok(())
    }
}
