//! Drawing `banger tui`: the tab bar, the table of the tab, the running
//! jobs, the status line and the key hints, and the overlays (help, a
//! question, the create form, the catalog to pull from, the console log).
//! Columns that do not fit the terminal are left out, least useful first,
//! so an 80×24 terminal shows everything that matters.

use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};

use super::app::{App, CREATE_FIELDS, CreateForm, LogView, Mode, PullList, Tab};
use crate::artifacts::human_bytes;
use crate::live::JobView;
use crate::progress::{bar, format_duration};

/// At most this many running jobs are shown under the table.
const JOB_ROWS: usize = 4;

/// Draw everything.
pub fn draw(frame: &mut Frame, app: &App, now: Instant) {
    let area = frame.area();
    let running: Vec<JobView> = if app.tab == Tab::Jobs {
        Vec::new()
    } else {
        app.own_jobs(now)
            .into_iter()
            .filter(JobView::running)
            .take(JOB_ROWS)
            .collect()
    };
    let jobs_height = if running.is_empty() {
        0
    } else {
        running.len() as u16 + 1
    };
    let [header, body, jobs, status, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(jobs_height),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(frame, app, header);
    match &app.mode {
        Mode::Logs(view) => draw_logs(frame, view, body),
        _ => match app.tab {
            Tab::Vms => draw_vms(frame, app, body),
            Tab::Images => draw_images(frame, app, body),
            Tab::Kernels => draw_kernels(frame, app, body),
            Tab::Jobs => draw_jobs(frame, app, body, now),
        },
    }
    if !running.is_empty() {
        draw_running(frame, &running, jobs);
    }
    draw_status(frame, app, status);
    draw_keys(frame, app, keys);
    match &app.mode {
        Mode::Help => draw_help(frame, area),
        Mode::Confirm { question, .. } => draw_question(frame, question, area),
        Mode::Create(form) => draw_create(frame, app, form, area),
        Mode::Pull(list) => draw_pull(frame, list, area),
        Mode::Normal | Mode::Filter | Mode::Logs(_) => {}
    }
}

fn draw_header(frame: &mut Frame, app: &App, area: Rect) {
    let counts = [
        app.vms().len(),
        app.images().len(),
        app.kernels().len(),
        app.jobs(Instant::now()).len(),
    ];
    let mut spans = vec![Span::styled(
        " banger ",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    for (i, (tab, count)) in Tab::ALL.iter().zip(counts).enumerate() {
        let text = format!(" {} {} ({count}) ", i + 1, tab.title());
        let style = if *tab == app.tab {
            Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD)
        } else {
            Style::new()
        };
        spans.push(Span::styled(text, style));
    }
    let daemon = if app.model.connected() {
        Span::styled(" ● bangerd ", Style::new().fg(Color::Green))
    } else if let Some(why) = app.model.gone() {
        Span::styled(
            format!(" ○ bangerd away: {why} "),
            Style::new().fg(Color::Yellow),
        )
    } else {
        Span::styled(" ○ connecting ", Style::new().fg(Color::Yellow))
    };
    let [left, right] = Layout::horizontal([
        Constraint::Min(0),
        Constraint::Length(daemon.width() as u16),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(Line::from(spans)), left);
    frame.render_widget(Paragraph::new(Line::from(daemon)), right);
}

/// A column: header, width, and whether it is needed (else it goes first
/// when space runs out, in the order of `optional`).
struct Column {
    title: &'static str,
    width: u16,
}

/// The columns that fit `width`: every required one, then optional ones
/// in order of usefulness. Returns their indices into `columns`, in order.
fn fitting(columns: &[Column], required: &[usize], optional: &[usize], width: u16) -> Vec<usize> {
    let mut chosen: Vec<usize> = required.to_vec();
    let used =
        |chosen: &[usize]| -> u16 { chosen.iter().map(|&i| columns[i].width + 1).sum::<u16>() + 2 };
    for &i in optional {
        chosen.push(i);
        if used(&chosen) > width {
            chosen.pop();
        }
    }
    chosen.sort_unstable();
    chosen
}

fn table<'a>(
    columns: &[Column],
    shown: &[usize],
    rows: Vec<Vec<Cell<'a>>>,
    title: String,
) -> Table<'a> {
    let header = Row::new(shown.iter().map(|&i| Cell::from(columns[i].title)))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths: Vec<Constraint> = shown
        .iter()
        .enumerate()
        .map(|(n, &i)| {
            if n + 1 == shown.len() {
                Constraint::Min(columns[i].width)
            } else {
                Constraint::Length(columns[i].width)
            }
        })
        .collect();
    let rows = rows.into_iter().map(|cells| {
        Row::new(
            cells
                .into_iter()
                .enumerate()
                .filter(|(i, _)| shown.contains(i))
                .map(|(_, c)| c),
        )
    });
    Table::new(rows, widths)
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ")
}

fn render_table(
    frame: &mut Frame,
    table: Table,
    area: Rect,
    selected: usize,
    empty: &str,
    n: usize,
) {
    if n == 0 {
        let text = Paragraph::new(empty.to_owned()).block(Block::new().borders(Borders::TOP));
        frame.render_widget(text, area);
        return;
    }
    let mut state = TableState::default().with_selected(Some(selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn state_style(state: &str) -> Style {
    match state {
        "running" => Style::new().fg(Color::Green),
        "stopped" => Style::new().fg(Color::DarkGray),
        "error" | "failed" => Style::new().fg(Color::Red),
        _ => Style::new().fg(Color::Yellow),
    }
}

fn filter_title(app: &App, what: &str) -> String {
    if app.filter.is_empty() {
        what.to_owned()
    } else {
        format!("{what} matching \"{}\"", app.filter)
    }
}

fn draw_vms(frame: &mut Frame, app: &App, area: Rect) {
    let columns = [
        Column {
            title: "NAME",
            width: 16,
        },
        Column {
            title: "STATE",
            width: 9,
        },
        Column {
            title: "IPV4",
            width: 15,
        },
        Column {
            title: "CPUS",
            width: 4,
        },
        Column {
            title: "MEM",
            width: 8,
        },
        Column {
            title: "CPU%",
            width: 5,
        },
        Column {
            title: "RSS",
            width: 8,
        },
        Column {
            title: "DISK",
            width: 8,
        },
        Column {
            title: "NAT",
            width: 3,
        },
        Column {
            title: "IMAGE",
            width: 10,
        },
        Column {
            title: "OWNER",
            width: 10,
        },
    ];
    let owners = app.shows_owners();
    let mut optional = vec![5, 6];
    if owners {
        optional.push(10);
    }
    optional.extend([8, 3, 4, 9, 7]);
    let shown = fitting(&columns, &[0, 1, 2], &optional, area.width);
    let vms = app.vms();
    let rows = vms
        .iter()
        .map(|vm| {
            let stats = app.model.stats(&vm.path).filter(|_| vm.state == "running");
            vec![
                Cell::from(vm.name.clone()),
                Cell::from(vm.state.clone()).style(state_style(&vm.state)),
                Cell::from(if vm.ipv4.is_empty() {
                    "-".into()
                } else {
                    vm.ipv4.clone()
                }),
                Cell::from(vm.vcpus.to_string()),
                Cell::from(human_bytes(u64::from(vm.memory_mib) << 20)),
                Cell::from(
                    stats
                        .and_then(|s| s.cpu_percent)
                        .map_or_else(|| "-".into(), |c| format!("{c:.0}")),
                ),
                Cell::from(stats.map_or_else(|| "-".into(), |s| human_bytes(s.rss_bytes))),
                Cell::from(human_bytes(vm.disk_bytes)),
                Cell::from(if vm.nat { "on" } else { "-" }),
                Cell::from(app.model.image_name(&vm.image)),
                // A passwd lookup per row and frame only when shown.
                Cell::from(if owners {
                    owner_name(vm.owner_uid)
                } else {
                    String::new()
                }),
            ]
        })
        .collect();
    let whose = if app.all_users {
        "every user's VMs"
    } else {
        "your VMs"
    };
    let empty = if app.filter.is_empty() {
        "no VMs: press c to create one"
    } else {
        "no VM matches the filter (Esc clears it)"
    };
    render_table(
        frame,
        table(&columns, &shown, rows, filter_title(app, whose)),
        area,
        app.selected(),
        empty,
        vms.len(),
    );
}

/// The user name of `uid`, or the number.
pub fn owner_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn draw_images(frame: &mut Frame, app: &App, area: Rect) {
    let columns = [
        Column {
            title: "NAME",
            width: 18,
        },
        Column {
            title: "ID",
            width: 12,
        },
        Column {
            title: "SIZE",
            width: 9,
        },
        Column {
            title: "KERNEL",
            width: 14,
        },
        Column {
            title: "MANAGED",
            width: 7,
        },
    ];
    let shown = fitting(&columns, &[0, 2], &[3, 4, 1], area.width);
    let images = app.images();
    let kernels = app.model.kernels();
    let rows = images
        .iter()
        .map(|i| {
            let kernel = kernels
                .iter()
                .find(|k| k.path == i.kernel)
                .map_or_else(|| "-".into(), |k| k.name.clone());
            vec![
                Cell::from(i.name.clone()),
                Cell::from(i.id.chars().take(12).collect::<String>()),
                Cell::from(human_bytes(i.rootfs_bytes)),
                Cell::from(kernel),
                Cell::from(if i.managed { "yes" } else { "no" }),
            ]
        })
        .collect();
    render_table(
        frame,
        table(&columns, &shown, rows, filter_title(app, "images")),
        area,
        app.selected(),
        "no images: press p to pull one",
        images.len(),
    );
}

fn draw_kernels(frame: &mut Frame, app: &App, area: Rect) {
    let columns = [
        Column {
            title: "NAME",
            width: 18,
        },
        Column {
            title: "VERSION",
            width: 16,
        },
        Column {
            title: "ID",
            width: 12,
        },
        Column {
            title: "SIZE",
            width: 9,
        },
    ];
    let shown = fitting(&columns, &[0, 1], &[3, 2], area.width);
    let kernels = app.kernels();
    let rows = kernels
        .iter()
        .map(|k| {
            vec![
                Cell::from(k.name.clone()),
                Cell::from(k.version.clone()),
                Cell::from(k.id.chars().take(12).collect::<String>()),
                Cell::from(human_bytes(k.size_bytes)),
            ]
        })
        .collect();
    render_table(
        frame,
        table(&columns, &shown, rows, filter_title(app, "kernels")),
        area,
        app.selected(),
        "no kernels: press p to pull one",
        kernels.len(),
    );
}

fn draw_jobs(frame: &mut Frame, app: &App, area: Rect, now: Instant) {
    let columns = [
        Column {
            title: "JOB",
            width: 5,
        },
        Column {
            title: "KIND",
            width: 14,
        },
        Column {
            title: "STATE",
            width: 9,
        },
        Column {
            title: "STAGE",
            width: 14,
        },
        Column {
            title: "PROGRESS",
            width: 27,
        },
        Column {
            title: "DETAIL",
            width: 12,
        },
    ];
    let shown = fitting(&columns, &[0, 1, 2, 3], &[4, 5], area.width);
    let jobs = app.jobs(now);
    let rows = jobs
        .iter()
        .map(|j| {
            let state = match &j.outcome {
                Some(o) if o.success => "succeeded".to_owned(),
                Some(o) if o.error_name.ends_with(".Cancelled") => "cancelled".to_owned(),
                Some(_) => "failed".to_owned(),
                None => j.state.clone(),
            };
            let detail = match &j.outcome {
                Some(o) if !o.success => o.message.clone(),
                _ => pace(j),
            };
            vec![
                Cell::from(j.label.clone()),
                Cell::from(j.kind.clone()),
                Cell::from(state.clone()).style(state_style(if state == "succeeded" {
                    "running"
                } else {
                    &state
                })),
                Cell::from(j.stage.clone()),
                Cell::from(bar(j.fraction)),
                Cell::from(detail),
            ]
        })
        .collect();
    render_table(
        frame,
        table(&columns, &shown, rows, filter_title(app, "jobs")),
        area,
        app.selected(),
        "no jobs running or just finished",
        jobs.len(),
    );
}

/// "12 MiB/s, 8 s left" (what is known of it).
fn pace(job: &JobView) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = job.rate {
        parts.push(format!("{}/s", human_bytes(rate as u64)));
    }
    if let Some(eta) = job.eta {
        parts.push(format!("{} left", format_duration(eta_usec(eta))));
    }
    if parts.is_empty() && !job.detail.is_empty() {
        return job.detail.clone();
    }
    parts.join(", ")
}

fn eta_usec(eta: Duration) -> u64 {
    // Whole seconds: a countdown in milliseconds only flickers.
    eta.as_secs().max(1) * 1_000_000
}

fn draw_running(frame: &mut Frame, jobs: &[JobView], area: Rect) {
    let mut lines = vec![Line::styled(
        "running jobs",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    for job in jobs {
        let stage = if job.stage.is_empty() {
            "starting"
        } else {
            &job.stage
        };
        let mut text = format!(
            "job {:<4} {:<12} {:<12} {}",
            job.label,
            job.kind,
            stage,
            bar(job.fraction)
        );
        let pace = pace(job);
        if !pace.is_empty() {
            text.push_str("  ");
            text.push_str(&pace);
        }
        lines.push(Line::from(text));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect) {
    let line = match (&app.mode, &app.status) {
        (Mode::Filter, _) => Line::from(format!("/{}▏", app.filter)),
        (_, Some(status)) => Line::styled(
            status.text.clone(),
            if status.error {
                Style::new().fg(Color::Red)
            } else {
                Style::new()
            },
        ),
        _ => Line::default(),
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_keys(frame: &mut Frame, app: &App, area: Rect) {
    let keys = match (&app.mode, app.tab) {
        (Mode::Filter, _) => "type to filter · Enter keep · Esc clear",
        (Mode::Logs(_), _) => "↑↓ PgUp PgDn scroll · End follow · Esc back",
        (Mode::Confirm { .. }, _) => "y yes · n no",
        (Mode::Create(_), _) => "Tab/↑↓ field · ←→ image · Space NAT · Enter create · Esc cancel",
        (Mode::Pull(_), _) => "↑↓ choose · Enter pull · Esc back",
        (Mode::Help, _) => "any key closes the help",
        (Mode::Normal, Tab::Vms) => {
            "s/x/r start/stop/restart  d delete  c create  l logs  ⏎ ssh  ? help  q quit"
        }
        (Mode::Normal, Tab::Images | Tab::Kernels) => {
            "p pull · d delete · Tab next tab · / filter · ? help · q quit"
        }
        (Mode::Normal, Tab::Jobs) => "x cancel · Tab next tab · / filter · ? help · q quit",
    };
    frame.render_widget(
        Paragraph::new(Line::styled(keys, Style::new().fg(Color::DarkGray))),
        area,
    );
}

/// A box of `width`×`height` in the middle of `area` (clipped to it).
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    }
}

fn popup(frame: &mut Frame, area: Rect, title: &str, lines: Vec<Line>) {
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title.to_owned())),
        area,
    );
}

/// Every key, for `?`.
pub const HELP: &[(&str, &str)] = &[
    ("Tab ← → 1-4", "switch tab (VMs, Images, Kernels, Jobs)"),
    ("↑ ↓ PgUp PgDn", "move the selection"),
    ("/", "filter the rows (Esc clears)"),
    ("s x r", "start, stop (x), restart the VM"),
    ("d", "delete the VM, image or kernel (asks first)"),
    ("c", "create a VM (name, image, size, NAT)"),
    ("l", "follow the VM's console log"),
    ("Enter", "ssh into the VM (the TUI comes back after)"),
    ("a", "show every user's VMs, or only yours"),
    ("p", "pull an image or kernel from the catalog"),
    ("x (Jobs)", "cancel the job"),
    ("q Ctrl-C", "quit"),
];

fn draw_help(frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(keys, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{keys:<14}"),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    let height = lines.len() as u16 + 2;
    popup(frame, centered(area, 70, height), "keys", lines);
}

fn draw_question(frame: &mut Frame, question: &str, area: Rect) {
    popup(
        frame,
        centered(area, 60, 3),
        "confirm",
        vec![Line::from(question.to_owned())],
    );
}

fn draw_create(frame: &mut Frame, app: &App, form: &CreateForm, area: Rect) {
    let images = app.model.images();
    let image = match form.image {
        0 => "(default)".to_owned(),
        i => images
            .get(i - 1)
            .map_or_else(|| "(gone)".into(), |i| i.name.clone()),
    };
    let values = [
        if form.name.is_empty() && form.field != 0 {
            "(a random name)".to_owned()
        } else {
            form.name.clone()
        },
        format!("◀ {image} ▶"),
        placeholder(&form.vcpus, "(default)"),
        placeholder(&form.memory, "(default)"),
        placeholder(&form.disk, "(default, e.g. 4G)"),
        if form.nat {
            "[x] on".into()
        } else {
            "[ ] off".into()
        },
    ];
    let mut lines: Vec<Line> = CREATE_FIELDS
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (label, value))| {
            let style = if i == form.field {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            let cursor = if i == form.field && ![1, 5].contains(&i) {
                "▏"
            } else {
                ""
            };
            Line::from(vec![
                Span::raw(format!("{label:>11}: ")),
                Span::styled(format!("{value}{cursor}"), style),
            ])
        })
        .collect();
    if let Some(error) = &form.error {
        lines.push(Line::default());
        lines.push(Line::styled(error.clone(), Style::new().fg(Color::Red)));
    }
    let height = lines.len() as u16 + 2;
    popup(frame, centered(area, 56, height), "create a VM", lines);
}

fn placeholder(text: &str, empty: &str) -> String {
    if text.is_empty() {
        empty.to_owned()
    } else {
        text.to_owned()
    }
}

fn draw_pull(frame: &mut Frame, list: &PullList, area: Rect) {
    let what = if list.image { "image" } else { "kernel" };
    let lines: Vec<Line> = match &list.entries {
        None => vec![Line::from("loading the catalog…")],
        Some(entries) if entries.is_empty() => vec![Line::from("the catalog is empty")],
        Some(entries) => entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mark = if e.installed { " (installed)" } else { "" };
                let text = format!(
                    "{:<18} {:>9}  {}{mark}",
                    e.name,
                    human_bytes(e.size),
                    e.description
                );
                if i == list.selected {
                    Line::styled(text, Style::new().add_modifier(Modifier::REVERSED))
                } else {
                    Line::from(text)
                }
            })
            .collect(),
    };
    let height = (lines.len() as u16 + 2).min(area.height.saturating_sub(2));
    popup(
        frame,
        centered(area, 76, height),
        &format!("pull an {what}"),
        lines,
    );
}

fn draw_logs(frame: &mut Frame, view: &LogView, area: Rect) {
    let block = Block::new().borders(Borders::TOP).title(format!(
        "console of vm {}{}",
        view.name,
        if view.back == 0 { " (following)" } else { "" }
    ));
    let inner = block.inner(area);
    let lines: Vec<&str> = view.text.lines().collect();
    let height = usize::from(inner.height);
    let end = lines.len().saturating_sub(view.back);
    let start = end.saturating_sub(height);
    let shown: Vec<Line> = lines[start..end]
        .iter()
        .map(|l| Line::from((*l).to_owned()))
        .collect();
    let shown = if shown.is_empty() {
        vec![Line::from("(nothing on the console yet)")]
    } else {
        shown
    };
    frame.render_widget(Paragraph::new(shown).block(block), area);
}
