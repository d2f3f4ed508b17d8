//! The live model the interactive front ends draw from: every object
//! bangerd publishes (VMs, images, kernels, jobs), loaded once with
//! `GetManagedObjects` and then kept current from the daemon's signals
//! (`InterfacesAdded`, `InterfacesRemoved`, `PropertiesChanged`, and the
//! jobs' `Progress`, `StageFinished` and `Completed`). Nothing here polls
//! the daemon; [`feed`] turns the bus into [`Update`]s, [`Model::apply`]
//! folds them in. The model is pure (the clock is an argument), so it is
//! tested against recorded signal sequences without a bus.

pub mod feed;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use banger_dbus::{IMAGE_INTERFACE, JOB_INTERFACE, KERNEL_INTERFACE, VM_INTERFACE, job_state};
use zbus::message::Type as MessageType;
use zbus::{Message, OwnedObjectPath};

use crate::client::{ImageInfo, KernelInfo, Props, VmInfo, prop};
use crate::progress::JobEvent;

const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// How far back a job's rate and ETA look.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// A rate needs samples at least this far apart.
const RATE_MIN_SPAN: Duration = Duration::from_millis(500);

/// The interfaces of one object: interface name → its properties.
pub type Interfaces = BTreeMap<String, Props>;

/// One change to the model.
#[derive(Debug)]
pub enum Update {
    /// Every object, from `GetManagedObjects` (replaces what was known).
    Loaded(Vec<(String, Interfaces)>),
    /// `InterfacesAdded`.
    Added {
        path: String,
        interfaces: Interfaces,
    },
    /// `InterfacesRemoved`.
    Removed {
        path: String,
        interfaces: Vec<String>,
    },
    /// `PropertiesChanged`.
    Changed {
        path: String,
        interface: String,
        changed: Props,
        invalidated: Vec<String>,
    },
    /// A signal of the job at `path`.
    Job { path: String, event: JobEvent },
    /// `VM.Stats` of a VM on screen: CPU time and resident memory.
    Stats {
        path: String,
        cpu_usec: u64,
        rss_bytes: u64,
    },
    /// bangerd left the bus (stopped, idle exit, crashed); the reason.
    Gone(String),
}

impl Update {
    /// Decode a signal of bangerd's; `Ok(None)` for one the model does not use.
    pub fn decode(msg: &Message) -> zbus::Result<Option<Self>> {
        let header = msg.header();
        if header.message_type() != MessageType::Signal {
            return Ok(None);
        }
        let (Some(path), Some(interface), Some(member)) =
            (header.path(), header.interface(), header.member())
        else {
            return Ok(None);
        };
        let path = path.to_string();
        let body = msg.body();
        Ok(Some(match (interface.as_str(), member.as_str()) {
            (OBJECT_MANAGER, "InterfacesAdded") => {
                let (path, interfaces): (OwnedObjectPath, HashMap<String, Props>) =
                    body.deserialize()?;
                Update::Added {
                    path: path.to_string(),
                    interfaces: interfaces.into_iter().collect(),
                }
            }
            (OBJECT_MANAGER, "InterfacesRemoved") => {
                let (path, interfaces): (OwnedObjectPath, Vec<String>) = body.deserialize()?;
                Update::Removed {
                    path: path.to_string(),
                    interfaces,
                }
            }
            (PROPERTIES, "PropertiesChanged") => {
                let (interface, changed, invalidated): (String, Props, Vec<String>) =
                    body.deserialize()?;
                Update::Changed {
                    path,
                    interface,
                    changed,
                    invalidated,
                }
            }
            (JOB_INTERFACE, _) => match JobEvent::decode(msg)? {
                Some(event) => Update::Job { path, event },
                None => return Ok(None),
            },
            _ => return Ok(None),
        }))
    }
}

/// How a job ended, from its `Completed` signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    pub error_name: String,
    pub message: String,
    /// The object the job made, or empty.
    pub result: String,
}

/// What the model remembers of a job beyond its properties.
#[derive(Debug, Default)]
struct JobTrack {
    /// The last `Progress` detail of the current stage.
    detail: String,
    /// `(when, fraction, bytes)`, the last [`RATE_WINDOW`] of them.
    samples: VecDeque<(Instant, f64, u64)>,
    outcome: Option<Outcome>,
}

/// The last two `Stats` of a VM.
#[derive(Debug, Clone, Copy)]
struct StatsTrack {
    at: Instant,
    cpu_usec: u64,
    rss_bytes: u64,
    /// CPU use between the last two samples, in percent of one CPU.
    cpu_percent: Option<f64>,
}

/// A VM's resource use, as the last `Stats` calls showed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmStats {
    /// Percent of one host CPU (200 is two CPUs busy); `None` until two
    /// samples were seen.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

/// A job as the front ends show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub path: String,
    /// The job's number (what `banger` prints as "job N").
    pub label: String,
    pub kind: String,
    pub state: String,
    pub stage: String,
    pub detail: String,
    pub fraction: f64,
    pub bytes: u64,
    /// Bytes per second over the last seconds, when the job moves data.
    pub rate: Option<f64>,
    /// Time left at the recent pace of `fraction`.
    pub eta: Option<Duration>,
    pub owner_uid: u32,
    pub started_at_usec: u64,
    /// Stage name and duration of every stage finished so far.
    pub stages: Vec<(String, u64)>,
    pub outcome: Option<Outcome>,
}

impl JobView {
    /// Whether the job still runs.
    pub fn running(&self) -> bool {
        self.state == job_state::RUNNING && self.outcome.is_none()
    }
}

/// Everything bangerd publishes, kept current.
#[derive(Debug, Default)]
pub struct Model {
    objects: BTreeMap<String, Interfaces>,
    jobs: HashMap<String, JobTrack>,
    stats: HashMap<String, StatsTrack>,
    /// Whether the daemon is on the bus (as far as the model knows).
    connected: bool,
    /// Why it is not, when it went away.
    gone: Option<String>,
}

impl Model {
    /// Fold `update`, seen at `now`, into the model.
    pub fn apply(&mut self, update: Update, now: Instant) {
        match update {
            Update::Loaded(objects) => {
                self.objects = objects.into_iter().collect();
                self.connected = true;
                self.gone = None;
                let objects = &self.objects;
                self.jobs.retain(|path, _| objects.contains_key(path));
                self.stats.retain(|path, _| objects.contains_key(path));
                let jobs: Vec<String> = self
                    .objects
                    .iter()
                    .filter(|(_, i)| i.contains_key(JOB_INTERFACE))
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in jobs {
                    self.sample(&path, now);
                }
            }
            Update::Added { path, interfaces } => {
                let is_job = interfaces.contains_key(JOB_INTERFACE);
                self.objects
                    .entry(path.clone())
                    .or_default()
                    .extend(interfaces);
                if is_job {
                    self.sample(&path, now);
                }
            }
            Update::Removed { path, interfaces } => {
                if let Some(object) = self.objects.get_mut(&path) {
                    for interface in &interfaces {
                        object.remove(interface);
                    }
                    if object.is_empty() {
                        self.objects.remove(&path);
                        self.jobs.remove(&path);
                        self.stats.remove(&path);
                    }
                }
            }
            Update::Changed {
                path,
                interface,
                changed,
                invalidated,
            } => {
                // A change of an object the model has not seen (its
                // InterfacesAdded is yet to come, or was before the load)
                // has no other properties to go with: skip it.
                let Some(props) = self
                    .objects
                    .get_mut(&path)
                    .and_then(|o| o.get_mut(&interface))
                else {
                    return;
                };
                for key in invalidated {
                    props.remove(&key);
                }
                props.extend(changed);
                if interface == JOB_INTERFACE {
                    self.sample(&path, now);
                }
            }
            Update::Job { path, event } => {
                if !self.objects.contains_key(&path) {
                    return;
                }
                let track = self.jobs.entry(path).or_default();
                match event {
                    JobEvent::Progress { detail, .. } => track.detail = detail,
                    JobEvent::StageFinished { .. } => track.detail.clear(),
                    JobEvent::Completed {
                        success,
                        error_name,
                        message,
                        result,
                    } => {
                        track.outcome = Some(Outcome {
                            success,
                            error_name,
                            message,
                            result: if result == "/" { String::new() } else { result },
                        });
                    }
                }
            }
            Update::Stats {
                path,
                cpu_usec,
                rss_bytes,
            } => {
                if !self.objects.contains_key(&path) {
                    return;
                }
                let cpu_percent = self.stats.get(&path).and_then(|last| {
                    let wall = now.checked_duration_since(last.at)?.as_secs_f64();
                    let used = cpu_usec.checked_sub(last.cpu_usec)? as f64 / 1e6;
                    (wall > 0.0).then(|| used / wall * 100.0)
                });
                self.stats.insert(
                    path,
                    StatsTrack {
                        at: now,
                        cpu_usec,
                        rss_bytes,
                        cpu_percent,
                    },
                );
            }
            Update::Gone(why) => {
                // Jobs die with the daemon; VMs, images and kernels stay
                // on screen (marked stale) until it is back.
                self.objects
                    .retain(|_, interfaces| !interfaces.contains_key(JOB_INTERFACE));
                self.jobs.clear();
                self.stats.clear();
                self.connected = false;
                self.gone = Some(why);
            }
        }
    }

    /// Record the job's fraction and bytes at `now`, for its rate and ETA.
    fn sample(&mut self, path: &str, now: Instant) {
        let Some(props) = self.objects.get(path).and_then(|o| o.get(JOB_INTERFACE)) else {
            return;
        };
        let fraction: f64 = prop(props, "Progress");
        let bytes: u64 = prop(props, "Bytes");
        let track = self.jobs.entry(path.to_owned()).or_default();
        if track
            .samples
            .back()
            .is_some_and(|&(_, f, b)| f == fraction && b == bytes)
        {
            return;
        }
        track.samples.push_back((now, fraction, bytes));
        while track
            .samples
            .front()
            .is_some_and(|&(at, _, _)| now.saturating_duration_since(at) > RATE_WINDOW)
            && track.samples.len() > 2
        {
            track.samples.pop_front();
        }
    }

    /// Whether bangerd is on the bus, as far as the model knows.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Why bangerd is not on the bus, once it went away.
    pub fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    fn with<'a>(&'a self, interface: &'a str) -> impl Iterator<Item = (&'a String, &'a Props)> {
        self.objects
            .iter()
            .filter_map(move |(path, i)| i.get(interface).map(|p| (path, p)))
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Vec<VmInfo> {
        let mut vms: Vec<VmInfo> = self
            .with(VM_INTERFACE)
            .map(|(path, p)| VmInfo::from_props(path, p))
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.owner_uid.cmp(&b.owner_uid)));
        vms
    }

    /// Every image, by name.
    pub fn images(&self) -> Vec<ImageInfo> {
        let mut images: Vec<ImageInfo> = self
            .with(IMAGE_INTERFACE)
            .map(|(path, p)| ImageInfo::from_props(path, p))
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        images
    }

    /// Every kernel, by name.
    pub fn kernels(&self) -> Vec<KernelInfo> {
        let mut kernels: Vec<KernelInfo> = self
            .with(KERNEL_INTERFACE)
            .map(|(path, p)| KernelInfo::from_props(path, p))
            .collect();
        kernels.sort_by(|a, b| a.name.cmp(&b.name));
        kernels
    }

    /// The name of the image at `path`, or "-".
    pub fn image_name(&self, path: &str) -> String {
        self.objects
            .get(path)
            .and_then(|o| o.get(IMAGE_INTERFACE))
            .map_or_else(|| "-".to_owned(), |p| prop(p, "Name"))
    }

    /// Every job, the newest first, seen at `now`.
    pub fn jobs(&self, now: Instant) -> Vec<JobView> {
        let mut jobs: Vec<JobView> = self
            .with(JOB_INTERFACE)
            .map(|(path, p)| self.job_view(path, p, now))
            .collect();
        jobs.sort_by(|a, b| {
            b.started_at_usec
                .cmp(&a.started_at_usec)
                .then_with(|| job_number(&b.path).cmp(&job_number(&a.path)))
        });
        jobs
    }

    fn job_view(&self, path: &str, p: &Props, now: Instant) -> JobView {
        let track = self.jobs.get(path);
        let stages: Vec<(String, u64)> = p
            .get("Stages")
            .and_then(|v| v.try_clone().ok())
            .and_then(|v| Vec::<(String, u64)>::try_from(v).ok())
            .unwrap_or_default();
        let state: String = prop(p, "State");
        let running = state == job_state::RUNNING && track.is_none_or(|t| t.outcome.is_none());
        let (rate, eta) = match track {
            Some(t) if running => pace(&t.samples, now),
            _ => (None, None),
        };
        JobView {
            path: path.to_owned(),
            label: crate::progress::job_label(path),
            kind: prop(p, "Kind"),
            state,
            stage: prop(p, "Stage"),
            detail: track.map(|t| t.detail.clone()).unwrap_or_default(),
            fraction: prop(p, "Progress"),
            bytes: prop(p, "Bytes"),
            rate,
            eta,
            owner_uid: prop(p, "OwnerUID"),
            started_at_usec: prop(p, "StartedAt"),
            stages,
            outcome: track.and_then(|t| t.outcome.clone()),
        }
    }

    /// The last `Stats` of the VM at `path`.
    pub fn stats(&self, path: &str) -> Option<VmStats> {
        self.stats.get(path).map(|s| VmStats {
            cpu_percent: s.cpu_percent,
            rss_bytes: s.rss_bytes,
        })
    }
}

fn job_number(path: &str) -> u64 {
    banger_dbus::parse_job_path(path).unwrap_or(0)
}

/// Bytes per second and time left from the samples, if they say.
fn pace(samples: &VecDeque<(Instant, f64, u64)>, now: Instant) -> (Option<f64>, Option<Duration>) {
    let (Some(&(t0, f0, b0)), Some(&(t1, f1, b1))) = (samples.front(), samples.back()) else {
        return (None, None);
    };
    let span = t1.saturating_duration_since(t0);
    if span < RATE_MIN_SPAN {
        return (None, None);
    }
    let secs = span.as_secs_f64();
    let rate = (b1 > b0).then(|| (b1 - b0) as f64 / secs);
    // A job silent for longer than the window is stalled: no promise.
    let stalled = now.saturating_duration_since(t1) > RATE_WINDOW;
    let eta = (f1 > f0 && f1 < 1.0 && !stalled).then(|| {
        let per_sec = (f1 - f0) / secs;
        Duration::from_secs_f64(((1.0 - f1) / per_sec).min(86_400.0))
    });
    (rate, eta)
}

#[cfg(test)]
mod tests;
