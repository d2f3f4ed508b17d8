//! The state of `banger tui` and what each key does. Pure: no terminal and
//! no bus, so every screen and key is tested without either. A key may
//! ask for an [`Effect`], which [`super::run`] performs; what comes back
//! (a job started, a call refused, a page of console log) is handed to the
//! `App` through its `on_*` methods.

use std::time::Instant;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::client::{ImageInfo, KernelInfo, VmInfo, VmJob};
use crate::live::{JobView, Model};

/// At most this much console log is kept for the logs view.
const LOG_KEEP: usize = 256 << 10;

/// The tabs, in the order `Tab` and the number keys go through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Vms,
    Images,
    Kernels,
    Jobs,
}

impl Tab {
    pub const ALL: [Tab; 4] = [Tab::Vms, Tab::Images, Tab::Kernels, Tab::Jobs];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Vms => "VMs",
            Tab::Images => "Images",
            Tab::Kernels => "Kernels",
            Tab::Jobs => "Jobs",
        }
    }

    fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// What a key asks [`super::run`] to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Quit,
    /// Start, stop, restart or delete a VM.
    VmJob {
        path: String,
        name: String,
        job: VmJob,
    },
    Create(CreateRequest),
    /// Suspend the screen and run ssh to the VM.
    Ssh(Box<VmInfo>),
    /// Read the VM's console log from `offset` (the logs view is open).
    Logs {
        path: String,
        offset: u64,
    },
    DeleteImage {
        id: String,
        name: String,
    },
    DeleteKernel {
        id: String,
        name: String,
    },
    /// Load the catalog of images (`true`) or kernels, for a pull.
    Available {
        image: bool,
    },
    Pull {
        image: bool,
        name: String,
    },
    /// Cancel a job.
    Cancel {
        path: String,
        label: String,
    },
}

impl Effect {
    /// What the effect does, for the status line ("stop vm web").
    pub fn describe(&self) -> String {
        match self {
            Effect::Quit => "quit".into(),
            Effect::VmJob { name, job, .. } => format!("{} vm {name}", verb(*job)),
            Effect::Create(r) => {
                format!("create vm {}", r.name.as_deref().unwrap_or("(a new name)"))
            }
            Effect::Ssh(vm) => format!("ssh to vm {}", vm.name),
            Effect::Logs { .. } => "read the console log".into(),
            Effect::DeleteImage { name, .. } => format!("delete image {name}"),
            Effect::DeleteKernel { name, .. } => format!("delete kernel {name}"),
            Effect::Available { image } => {
                format!(
                    "list the {} catalog",
                    if *image { "image" } else { "kernel" }
                )
            }
            Effect::Pull { image, name } => {
                format!("pull {} {name}", if *image { "image" } else { "kernel" })
            }
            Effect::Cancel { label, .. } => format!("cancel job {label}"),
        }
    }
}

/// The verb of a VM job.
pub fn verb(job: VmJob) -> &'static str {
    match job {
        VmJob::Start => "start",
        VmJob::Stop => "stop",
        VmJob::Restart => "restart",
        VmJob::Suspend => "suspend",
        VmJob::Delete => "delete",
    }
}

/// A VM to create, as the form says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateRequest {
    /// `None`: a fresh random name.
    pub name: Option<String>,
    /// The image's id; empty for the configured default.
    pub image: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub disk_bytes: Option<u64>,
    pub nat: bool,
}

/// The fields of the create form, in order.
pub const CREATE_FIELDS: [&str; 6] = ["Name", "Image", "vCPUs", "Memory MiB", "Disk", "NAT"];

/// The create form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateForm {
    pub field: usize,
    pub name: String,
    /// 0 is the default image; `i` is the model's image `i - 1`.
    pub image: usize,
    pub vcpus: String,
    pub memory: String,
    pub disk: String,
    pub nat: bool,
    /// Why the last submit was refused.
    pub error: Option<String>,
}

impl CreateForm {
    /// The text of a text field, `None` for the image and NAT fields.
    fn text_mut(&mut self) -> Option<&mut String> {
        match self.field {
            0 => Some(&mut self.name),
            2 => Some(&mut self.vcpus),
            3 => Some(&mut self.memory),
            4 => Some(&mut self.disk),
            _ => None,
        }
    }

    /// The request the form describes, or why it is not one.
    fn request(&self, images: &[ImageInfo]) -> Result<CreateRequest, String> {
        let number = |text: &str, what: &str| -> Result<Option<u32>, String> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            match text.parse::<u32>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(format!(
                    "{what} must be a whole number above 0, not {text:?}"
                )),
            }
        };
        let name = self.name.trim();
        Ok(CreateRequest {
            name: (!name.is_empty()).then(|| name.to_owned()),
            image: match self.image {
                0 => String::new(),
                i => images
                    .get(i - 1)
                    .map(|image| image.id.clone())
                    .ok_or("that image is gone: pick another")?,
            },
            vcpus: number(&self.vcpus, "vCPUs")?,
            memory_mib: number(&self.memory, "memory")?,
            disk_bytes: match self.disk.trim() {
                "" => None,
                text => Some(crate::vm::parse_size(text).map_err(|f| f.message().to_owned())?),
            },
            nat: self.nat,
        })
    }
}

/// The catalog to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullList {
    pub image: bool,
    /// `None` while the catalog loads.
    pub entries: Option<Vec<banger_dbus::CatalogEntry>>,
    pub selected: usize,
}

/// The console log of one VM, followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogView {
    pub path: String,
    pub name: String,
    pub text: String,
    /// Where the next read starts.
    pub offset: u64,
    /// Lines scrolled back from the end (0 follows the end).
    pub back: usize,
    /// A read is on its way.
    pub reading: bool,
}

/// What has the keyboard.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    /// Typing the filter.
    Filter,
    Help,
    /// A yes/no question before `effect`.
    Confirm {
        question: String,
        effect: Box<Effect>,
    },
    Create(CreateForm),
    Pull(PullList),
    Logs(LogView),
}

/// The status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// Everything on screen.
#[derive(Debug)]
pub struct App {
    pub model: Model,
    pub tab: Tab,
    /// The selected row of each tab.
    selected: [usize; 4],
    pub filter: String,
    /// Show other users' VMs too (root always sees them).
    pub all_users: bool,
    /// The caller's uid.
    pub me: u32,
    pub mode: Mode,
    pub status: Option<Status>,
    /// Jobs started here: path and what they do, reported when they end.
    watched: Vec<(String, String)>,
}

impl App {
    pub fn new(me: u32) -> Self {
        Self {
            model: Model::default(),
            tab: Tab::Vms,
            selected: [0; 4],
            filter: String::new(),
            all_users: me == 0,
            me,
            mode: Mode::Normal,
            status: None,
            watched: Vec::new(),
        }
    }

    fn matches(&self, fields: &[&str]) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let needle = self.filter.to_lowercase();
        fields.iter().any(|f| f.to_lowercase().contains(&needle))
    }

    /// Whether the VM table has an owner column.
    pub fn shows_owners(&self) -> bool {
        self.all_users && self.model.vms().iter().any(|v| v.owner_uid != self.me)
    }

    /// The VMs on the VMs tab: the caller's (or everyone's), filtered.
    pub fn vms(&self) -> Vec<VmInfo> {
        self.model
            .vms()
            .into_iter()
            .filter(|v| self.all_users || v.owner_uid == self.me)
            .filter(|v| {
                self.matches(&[&v.name, &v.state, &v.ipv4, &self.model.image_name(&v.image)])
            })
            .collect()
    }

    pub fn images(&self) -> Vec<ImageInfo> {
        self.model
            .images()
            .into_iter()
            .filter(|i| self.matches(&[&i.name, &i.id]))
            .collect()
    }

    pub fn kernels(&self) -> Vec<KernelInfo> {
        self.model
            .kernels()
            .into_iter()
            .filter(|k| self.matches(&[&k.name, &k.version, &k.id]))
            .collect()
    }

    /// The caller's jobs (or everyone's, as for VMs), unfiltered.
    pub fn own_jobs(&self, now: Instant) -> Vec<JobView> {
        self.model
            .jobs(now)
            .into_iter()
            .filter(|j| self.all_users || j.owner_uid == self.me)
            .collect()
    }

    /// The jobs on the Jobs tab.
    pub fn jobs(&self, now: Instant) -> Vec<JobView> {
        self.own_jobs(now)
            .into_iter()
            .filter(|j| self.matches(&[&j.kind, &j.stage, &j.label]))
            .collect()
    }

    fn rows(&self) -> usize {
        match self.tab {
            Tab::Vms => self.vms().len(),
            Tab::Images => self.images().len(),
            Tab::Kernels => self.kernels().len(),
            Tab::Jobs => self.jobs(Instant::now()).len(),
        }
    }

    /// The selected row of the current tab (kept inside the table).
    pub fn selected(&self) -> usize {
        self.selected[self.tab.index()].min(self.rows().saturating_sub(1))
    }

    fn select(&mut self, row: usize) {
        let last = self.rows().saturating_sub(1);
        self.selected[self.tab.index()] = row.min(last);
    }

    fn selected_vm(&self) -> Option<VmInfo> {
        self.vms().into_iter().nth(self.selected())
    }

    /// Say `text` on the status line.
    pub fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: false,
        });
    }

    /// Say `text` on the status line as an error.
    pub fn complain(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: true,
        });
    }

    /// A job was started for `effect`.
    pub fn on_started(&mut self, effect: &Effect, job: &str) {
        let what = effect.describe();
        self.say(format!(
            "{what}: job {} started",
            crate::progress::job_label(job)
        ));
        self.watched.push((job.to_owned(), what));
    }

    /// `effect` was done at once (no job).
    pub fn on_done(&mut self, effect: &Effect) {
        self.say(format!("{}: done", effect.describe()));
    }

    /// `effect` failed with `message`.
    pub fn on_failed(&mut self, effect: &Effect, message: &str) {
        if let Effect::Logs { .. } = effect
            && let Mode::Logs(view) = &mut self.mode
        {
            view.reading = false;
        }
        if let (Effect::Available { .. }, Mode::Pull(_)) = (effect, &self.mode) {
            self.mode = Mode::Normal;
        }
        self.complain(format!("cannot {}: {message}", effect.describe()));
    }

    /// The catalog for a pull arrived.
    pub fn on_available(&mut self, image: bool, entries: Vec<banger_dbus::CatalogEntry>) {
        if let Mode::Pull(list) = &mut self.mode
            && list.image == image
        {
            list.entries = Some(entries);
            list.selected = 0;
        }
    }

    /// A page of console log of the VM at `path`, and the next offset.
    pub fn on_log(&mut self, path: &str, data: &[u8], next: u64) {
        let Mode::Logs(view) = &mut self.mode else {
            return;
        };
        if view.path != path {
            return;
        }
        view.reading = false;
        view.offset = next;
        view.text.push_str(&crate::output::printable(data));
        if view.text.len() > LOG_KEEP {
            let mut cut = view.text.len() - LOG_KEEP;
            while !view.text.is_char_boundary(cut) {
                cut += 1;
            }
            view.text.drain(..cut);
        }
    }

    /// The next read the logs view needs, if one is due (none in flight).
    pub fn log_read(&mut self) -> Option<Effect> {
        let Mode::Logs(view) = &mut self.mode else {
            return None;
        };
        if view.reading {
            return None;
        }
        view.reading = true;
        Some(Effect::Logs {
            path: view.path.clone(),
            offset: view.offset,
        })
    }

    /// After the model changed: report the end of jobs started here.
    pub fn after_update(&mut self, now: Instant) {
        if self.watched.is_empty() {
            return;
        }
        let jobs = self.model.jobs(now);
        let mut ended = Vec::new();
        self.watched.retain(|(path, what)| {
            match jobs.iter().find(|j| &j.path == path) {
                Some(job) => match &job.outcome {
                    Some(outcome) => {
                        ended.push((what.clone(), outcome.clone()));
                        false
                    }
                    None => true,
                },
                // Gone without a Completed seen (the daemon went away).
                None => {
                    ended.push((
                        what.clone(),
                        crate::live::Outcome {
                            success: false,
                            error_name: String::new(),
                            message: "its job disappeared; check `banger job list`".into(),
                            result: String::new(),
                        },
                    ));
                    false
                }
            }
        });
        for (what, outcome) in ended {
            if outcome.success {
                self.say(format!("{what}: done"));
            } else {
                self.complain(format!("{what}: failed: {}", outcome.message));
            }
        }
    }

    /// Handle a key; the effect it asks for, if any.
    pub fn key(&mut self, key: KeyEvent) -> Option<Effect> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Some(Effect::Quit);
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Normal => self.normal_key(key),
            Mode::Filter => {
                match key.code {
                    KeyCode::Enter => {}
                    KeyCode::Esc => self.filter.clear(),
                    KeyCode::Backspace => {
                        self.filter.pop();
                        self.mode = Mode::Filter;
                    }
                    KeyCode::Char(c) => {
                        self.filter.push(c);
                        self.mode = Mode::Filter;
                    }
                    _ => self.mode = Mode::Filter,
                }
                None
            }
            Mode::Help => None,
            Mode::Confirm { question, effect } => match key.code {
                KeyCode::Char('y' | 'Y') => Some(*effect),
                KeyCode::Char('n' | 'N') | KeyCode::Esc | KeyCode::Char('q') => {
                    self.say("nothing done");
                    None
                }
                _ => {
                    self.mode = Mode::Confirm { question, effect };
                    None
                }
            },
            Mode::Create(form) => self.create_key(form, key),
            Mode::Pull(list) => self.pull_key(list, key),
            Mode::Logs(mut view) => {
                match key.code {
                    KeyCode::Esc | KeyCode::Char('q' | 'l') => return None,
                    KeyCode::Up | KeyCode::Char('k') => view.back += 1,
                    KeyCode::Down | KeyCode::Char('j') => view.back = view.back.saturating_sub(1),
                    KeyCode::PageUp => view.back += 10,
                    KeyCode::PageDown => view.back = view.back.saturating_sub(10),
                    KeyCode::End | KeyCode::Char('G') => view.back = 0,
                    _ => {}
                }
                let lines = view.text.lines().count();
                view.back = view.back.min(lines.saturating_sub(1));
                self.mode = Mode::Logs(view);
                None
            }
        }
    }

    fn normal_key(&mut self, key: KeyEvent) -> Option<Effect> {
        let row = self.selected();
        match key.code {
            KeyCode::Char('q') => return Some(Effect::Quit),
            KeyCode::Esc => {
                self.filter.clear();
                self.status = None;
            }
            KeyCode::Char('?') => self.mode = Mode::Help,
            KeyCode::Char('/') => {
                self.filter.clear();
                self.mode = Mode::Filter;
            }
            KeyCode::Tab | KeyCode::Right => {
                self.tab = Tab::ALL[(self.tab.index() + 1) % Tab::ALL.len()];
            }
            KeyCode::BackTab | KeyCode::Left => {
                self.tab = Tab::ALL[(self.tab.index() + Tab::ALL.len() - 1) % Tab::ALL.len()];
            }
            KeyCode::Char(c @ '1'..='4') => {
                self.tab = Tab::ALL[usize::from(c as u8 - b'1')];
            }
            KeyCode::Up | KeyCode::Char('k') => self.select(row.saturating_sub(1)),
            KeyCode::Down | KeyCode::Char('j') => self.select(row + 1),
            KeyCode::PageUp => self.select(row.saturating_sub(10)),
            KeyCode::PageDown => self.select(row + 10),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(usize::MAX),
            _ => {
                return match self.tab {
                    Tab::Vms => self.vm_key(key),
                    Tab::Images | Tab::Kernels => self.artifact_key(key),
                    Tab::Jobs => self.job_key(key),
                };
            }
        }
        None
    }

    fn vm_key(&mut self, key: KeyEvent) -> Option<Effect> {
        match key.code {
            KeyCode::Char('c') => {
                self.mode = Mode::Create(CreateForm::default());
                return None;
            }
            KeyCode::Char('a') => {
                if self.me != 0 {
                    self.all_users = !self.all_users;
                    self.say(if self.all_users {
                        "showing every user's VMs"
                    } else {
                        "showing your VMs"
                    });
                }
                return None;
            }
            _ => {}
        }
        let Some(vm) = self.selected_vm() else {
            if matches!(
                key.code,
                KeyCode::Char('s' | 'x' | 'r' | 'd' | 'l') | KeyCode::Enter
            ) {
                self.complain("no VM selected: `c` creates one");
            }
            return None;
        };
        let job = |job| {
            Some(Effect::VmJob {
                path: vm.path.clone(),
                name: vm.name.clone(),
                job,
            })
        };
        match key.code {
            KeyCode::Char('s') => job(VmJob::Start),
            KeyCode::Char('x') => job(VmJob::Stop),
            KeyCode::Char('r') => job(VmJob::Restart),
            KeyCode::Char('d') => {
                self.mode = Mode::Confirm {
                    question: format!("Delete vm {} and its disks? (y/n)", vm.name),
                    effect: Box::new(job(VmJob::Delete)?),
                };
                None
            }
            KeyCode::Char('l') => {
                self.mode = Mode::Logs(LogView {
                    path: vm.path.clone(),
                    name: vm.name.clone(),
                    text: String::new(),
                    offset: 0,
                    back: 0,
                    reading: false,
                });
                self.log_read()
            }
            KeyCode::Enter => {
                if vm.state == "running" {
                    Some(Effect::Ssh(Box::new(vm)))
                } else {
                    self.complain(format!("vm {} is {}: `s` starts it", vm.name, vm.state));
                    None
                }
            }
            _ => None,
        }
    }

    fn artifact_key(&mut self, key: KeyEvent) -> Option<Effect> {
        let image = self.tab == Tab::Images;
        match key.code {
            KeyCode::Char('p') => {
                self.mode = Mode::Pull(PullList {
                    image,
                    entries: None,
                    selected: 0,
                });
                Some(Effect::Available { image })
            }
            KeyCode::Char('d') => {
                let row = self.selected();
                let (effect, what) = if image {
                    let i = self.images().into_iter().nth(row)?;
                    let what = format!("image {}", i.name);
                    (
                        Effect::DeleteImage {
                            id: i.id,
                            name: i.name,
                        },
                        what,
                    )
                } else {
                    let k = self.kernels().into_iter().nth(row)?;
                    let what = format!("kernel {}", k.name);
                    (
                        Effect::DeleteKernel {
                            id: k.id,
                            name: k.name,
                        },
                        what,
                    )
                };
                self.mode = Mode::Confirm {
                    question: format!("Delete {what}? (y/n)"),
                    effect: Box::new(effect),
                };
                None
            }
            _ => None,
        }
    }

    fn job_key(&mut self, key: KeyEvent) -> Option<Effect> {
        if key.code != KeyCode::Char('x') {
            return None;
        }
        let job = self.jobs(Instant::now()).into_iter().nth(self.selected())?;
        if !job.running() {
            self.complain(format!("job {} has ended", job.label));
            return None;
        }
        self.mode = Mode::Confirm {
            question: format!("Cancel job {} ({})? (y/n)", job.label, job.kind),
            effect: Box::new(Effect::Cancel {
                path: job.path,
                label: job.label,
            }),
        };
        None
    }

    fn create_key(&mut self, mut form: CreateForm, key: KeyEvent) -> Option<Effect> {
        let images = self.model.images();
        let last = CREATE_FIELDS.len() - 1;
        match key.code {
            KeyCode::Esc => {
                self.say("create cancelled");
                return None;
            }
            KeyCode::Enter => match form.request(&images) {
                Ok(mut request) => {
                    if request.name.is_none() {
                        let vms = self.model.vms();
                        let taken: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
                        request.name = Some(crate::names::random(&taken));
                    }
                    return Some(Effect::Create(request));
                }
                Err(why) => form.error = Some(why),
            },
            KeyCode::Tab | KeyCode::Down => form.field = (form.field + 1) % CREATE_FIELDS.len(),
            KeyCode::BackTab | KeyCode::Up => {
                form.field = (form.field + last) % CREATE_FIELDS.len()
            }
            KeyCode::Left if form.field == 1 => {
                form.image = (form.image + images.len()) % (images.len() + 1);
            }
            KeyCode::Right if form.field == 1 => form.image = (form.image + 1) % (images.len() + 1),
            KeyCode::Char(' ') if form.field == 5 => form.nat = !form.nat,
            KeyCode::Backspace => {
                if let Some(text) = form.text_mut() {
                    text.pop();
                }
            }
            KeyCode::Char(c) if !c.is_control() => {
                if let Some(text) = form.text_mut()
                    && text.len() < 64
                {
                    text.push(c);
                }
            }
            _ => {}
        }
        self.mode = Mode::Create(form);
        None
    }

    fn pull_key(&mut self, mut list: PullList, key: KeyEvent) -> Option<Effect> {
        let count = list.entries.as_ref().map_or(0, Vec::len);
        match key.code {
            KeyCode::Esc | KeyCode::Char('q') => return None,
            KeyCode::Up | KeyCode::Char('k') => list.selected = list.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => {
                list.selected = (list.selected + 1).min(count.saturating_sub(1));
            }
            KeyCode::Enter => {
                if let Some(entry) = list.entries.as_ref().and_then(|e| e.get(list.selected)) {
                    return Some(Effect::Pull {
                        image: list.image,
                        name: entry.name.clone(),
                    });
                }
            }
            _ => {}
        }
        self.mode = Mode::Pull(list);
        None
    }
}
