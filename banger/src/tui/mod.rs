//! `banger tui`: a live terminal view of the user's VMs, images, kernels
//! and jobs, with keys for what the CLI does. It is a client of the same
//! D-Bus API as every other command: the [`live`](crate::live) model feeds
//! it from bangerd's signals, calls go through [`Client`], and polkit
//! decides as it does for the CLI. A call that needs a password suspends
//! the screen, runs pkttyagent on the terminal, and comes back.
//!
//! The only polling: `VM.Stats` of the running VMs on screen (every
//! [`STATS_EVERY`]), and the console log while the logs view is open
//! (there is no signal for console output).

mod app;
mod view;

#[cfg(test)]
mod tests;

use std::io::{IsTerminal, Stdout};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{Event, EventStream};
use ratatui::crossterm::terminal::{
    Clear, ClearType, EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::crossterm::{cursor, execute};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use self::app::{App, Effect};
use crate::cli::Options;
use crate::client::{Client, Interaction};
use crate::exit::{self, Failure, Kind};
use crate::live::{self, Update};
use crate::session::{self, Authorization};

/// How often the running VMs on screen are asked for their `Stats`.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// How often the screen is redrawn without news (rates, ETAs) and the
/// console log is read while it is shown.
const TICK: Duration = Duration::from_millis(500);

/// What an effect brought back.
enum Answer {
    /// A job was started.
    Job(zbus::OwnedObjectPath),
    /// Done at once.
    Done,
    /// A page of console log and the next offset.
    Log(String, Vec<u8>, u64),
    /// A catalog.
    Available(bool, Vec<banger_dbus::CatalogEntry>),
}

/// What the main loop hears from its tasks.
enum Back {
    Effect(Box<Effect>, Result<Answer, Failure>),
    Stats(Vec<Update>),
}

/// The terminal in raw mode on the alternate screen; put back on drop.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    active: bool,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            leave();
            previous(info);
        }));
        let mut screen = Self {
            terminal: Terminal::new(CrosstermBackend::new(std::io::stdout()))?,
            active: false,
        };
        screen.resume()?;
        Ok(screen)
    }

    fn resume(&mut self) -> std::io::Result<()> {
        enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            cursor::Hide,
            Clear(ClearType::All)
        )?;
        self.active = true;
        // A fresh terminal draws everything on the next frame. (Its
        // `clear` would ask the terminal where the cursor is, an answer
        // that does not come back after ssh has had the terminal.)
        self.terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
        Ok(())
    }

    fn suspend(&mut self) {
        if std::mem::take(&mut self.active) {
            leave();
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.suspend();
    }
}

/// Give the terminal back as it was.
fn leave() {
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
    let _ = disable_raw_mode();
}

/// `banger tui`.
pub async fn run(opts: Options) -> anyhow::Result<u8> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "banger tui needs a terminal; scripts can use `banger vm list --json`",
        )
        .into());
    }
    let client = session::connect(opts).await?;
    let (updates_tx, mut updates) = mpsc::channel(1024);
    let feed = tokio::spawn(live::feed::run(client.clone(), updates_tx));
    let (back_tx, mut back) = mpsc::unbounded_channel();
    // Ctrl-C reaches banger as a key in raw mode; while ssh or a password
    // prompt has the terminal it must not kill banger. SIGTERM and SIGHUP
    // end the TUI with the terminal put back.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;

    let mut screen = Screen::enter()?;
    let mut app = App::new(nix::unistd::getuid().as_raw());
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(TICK);
    let mut stats_due = Instant::now();
    let mut stats_busy = false;
    let mut feed_ended = false;
    loop {
        screen
            .terminal
            .draw(|frame| view::draw(frame, &app, Instant::now()))?;
        tokio::select! {
            update = updates.recv(), if !feed_ended => match update {
                Some(update) => {
                    // Everything that is waiting, then one redraw.
                    let now = Instant::now();
                    app.model.apply(update, now);
                    while let Ok(update) = updates.try_recv() {
                        app.model.apply(update, now);
                    }
                    app.after_update(now);
                }
                None => {
                    feed_ended = true;
                    app.complain("lost the connection to the system bus: restart banger tui");
                }
            },
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) => match app.key(key) {
                    None => {}
                    Some(Effect::Quit) => break,
                    Some(Effect::Ssh(vm)) => {
                        let vm = *vm;
                        drop(events);
                        screen.suspend();
                        let said = ssh(&vm).await;
                        screen.resume()?;
                        events = EventStream::new();
                        match said {
                            Ok(text) => app.say(text),
                            Err(f) => app.complain(f.message().to_owned()),
                        }
                    }
                    Some(effect) => start(&client, effect, &back_tx),
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow::Error::from(e).context("cannot read the terminal")),
                None => break,
            },
            Some(message) = back.recv() => match message {
                Back::Stats(stats) => {
                    stats_busy = false;
                    let now = Instant::now();
                    for update in stats {
                        app.model.apply(update, now);
                    }
                }
                Back::Effect(effect, Err(f)) if f.name() == exit::INTERACTIVE_AUTH_REQUIRED => {
                    drop(events);
                    screen.suspend();
                    println!("polkit asks who you are to {}:", effect.describe());
                    let auth = Authorization::prepare(opts).await;
                    let result = perform(&client, &effect, auth.interaction).await;
                    let result = auth.finish(result).await;
                    screen.resume()?;
                    events = EventStream::new();
                    finish(&mut app, &effect, result);
                }
                Back::Effect(effect, result) => finish(&mut app, &effect, result),
            },
            _ = tick.tick() => {
                if let Some(effect) = app.log_read() {
                    start(&client, effect, &back_tx);
                }
                if !stats_busy && Instant::now() >= stats_due {
                    let height = screen.terminal.size().map_or(24, |s| s.height);
                    let paths = on_screen(&app, height);
                    if !paths.is_empty() {
                        stats_busy = true;
                        let (client, back) = (client.clone(), back_tx.clone());
                        tokio::spawn(async move {
                            let _ = back.send(Back::Stats(live::feed::stats(&client, paths).await));
                        });
                    }
                    stats_due = Instant::now() + STATS_EVERY;
                }
            }
            _ = interrupt.recv() => {}
            _ = terminate.recv() => break,
            _ = hangup.recv() => break,
        }
    }
    drop(screen);
    feed.abort();
    Ok(exit::OK)
}

/// The running VMs in the rows a terminal `height` lines high shows.
fn on_screen(app: &App, height: u16) -> Vec<String> {
    if app.tab != app::Tab::Vms {
        return Vec::new();
    }
    // Header, table title and header, status and keys take 5 lines.
    let rows = usize::from(height.saturating_sub(5)).max(1);
    let first = app.selected().saturating_sub(rows - 1);
    app.vms()
        .into_iter()
        .skip(first)
        .take(rows)
        .filter(|v| v.state == "running")
        .map(|v| v.path)
        .collect()
}

/// Perform `effect` in the background without prompting; the answer comes
/// back to the main loop.
fn start(client: &Client, effect: Effect, back: &mpsc::UnboundedSender<Back>) {
    let (client, back) = (client.clone(), back.clone());
    tokio::spawn(async move {
        let result = perform(&client, &effect, Interaction::NotAllowed).await;
        let _ = back.send(Back::Effect(Box::new(effect), result));
    });
}

/// Tell the app what became of `effect`.
fn finish(app: &mut App, effect: &Effect, result: Result<Answer, Failure>) {
    match result {
        Ok(Answer::Job(job)) => app.on_started(effect, job.as_str()),
        Ok(Answer::Done) => app.on_done(effect),
        Ok(Answer::Log(path, data, next)) => app.on_log(&path, &data, next),
        Ok(Answer::Available(image, entries)) => app.on_available(image, entries),
        Err(f) => app.on_failed(effect, f.message()),
    }
}

/// Make the call `effect` stands for.
async fn perform(
    client: &Client,
    effect: &Effect,
    interaction: Interaction,
) -> Result<Answer, Failure> {
    Ok(match effect {
        Effect::Quit | Effect::Ssh(_) => Answer::Done,
        Effect::VmJob { path, job, .. } => {
            Answer::Job(client.vm_job(path, *job, interaction).await?)
        }
        Effect::Create(request) => {
            let (_, public) = crate::vm::ssh_key()?;
            let options = banger_dbus::options::CreateVm {
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                disk_bytes: request.disk_bytes,
                nat: request.nat.then_some(true),
                ssh_keys: vec![public],
                ..Default::default()
            };
            let name = request.name.clone().unwrap_or_default();
            let (_, job) = client
                .create_vm(&name, &request.image, &options, interaction)
                .await?;
            Answer::Job(job)
        }
        Effect::Logs { path, offset } => {
            let (data, next) = client.vm_console_log(path, *offset).await?;
            Answer::Log(path.clone(), data, next)
        }
        Effect::DeleteImage { id, .. } => {
            client.delete_image(id, interaction).await?;
            Answer::Done
        }
        Effect::DeleteKernel { id, .. } => {
            client.delete_kernel(id, interaction).await?;
            Answer::Done
        }
        Effect::Available { image } => {
            let kind = if *image { "images" } else { "kernels" };
            let (_, _, entries) = client.available(kind).await?;
            Answer::Available(*image, entries)
        }
        Effect::Pull { image, name } => Answer::Job(client.pull(*image, name, interaction).await?),
        Effect::Cancel { path, .. } => {
            let path = zbus::OwnedObjectPath::try_from(path.as_str())
                .map_err(|e| Failure::new(Kind::Failed, format!("bad job path: {e}")))?;
            client.cancel(&path, interaction).await?;
            Answer::Done
        }
    })
}

/// Run the user's ssh to `vm` on the terminal (the screen is suspended);
/// what to say once it ends.
async fn ssh(vm: &crate::client::VmInfo) -> Result<String, Failure> {
    let (key, _) = crate::vm::ssh_key()?;
    let dir = crate::vm::ssh_dir()?;
    let args = crate::vm::ssh_args(vm, &key, &dir);
    println!(
        "banger: ssh to vm {} (leave the shell to come back to banger tui)",
        vm.name
    );
    let status = tokio::process::Command::new("ssh")
        .args(&args)
        .status()
        .await
        .map_err(|e| {
            Failure::new(
                Kind::Unavailable,
                format!("cannot run ssh: {e}; install openssh-client"),
            )
        })?;
    Ok(match status.code() {
        Some(0) => format!("back from vm {}", vm.name),
        Some(code) => format!("back from vm {} (ssh exited with {code})", vm.name),
        None => format!("back from vm {} (ssh was killed)", vm.name),
    })
}
