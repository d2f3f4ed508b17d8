//! Every screen of `banger tui` drawn on ratatui's `TestBackend`, and the
//! keys that lead from one to the next.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use zbus::{ObjectPath, OwnedVariant, Variant as Value};

use super::app::{App, CreateRequest, Effect, Mode, Tab};
use super::view;
use crate::client::{Props, VmJob};
use crate::live::{Interfaces, Update};

const IMAGE: &str = "/org/banger/Manager/image/aa11";
const KERNEL: &str = "/org/banger/Manager/kernel/bb22";
const JOB: &str = "/org/banger/Manager/job/7";

fn v<'a>(value: impl Into<Value<'a>>) -> OwnedVariant {
    OwnedVariant::try_from(value.into()).expect("owned")
}

fn vm_path(name: &str) -> String {
    format!("/org/banger/Manager/vm/{name}")
}

fn vm(name: &str, state: &str, ipv4: &str, owner: u32) -> (String, Interfaces) {
    let props: Props = HashMap::from([
        ("Id".to_owned(), v(name)),
        ("Name".to_owned(), v(name)),
        ("State".to_owned(), v(state)),
        ("OwnerUID".to_owned(), v(owner)),
        ("IPv4".to_owned(), v(ipv4)),
        ("VCPUs".to_owned(), v(2u32)),
        ("MemoryMiB".to_owned(), v(512u32)),
        ("DiskBytes".to_owned(), v(4u64 << 30)),
        ("NAT".to_owned(), v(true)),
        (
            "Image".to_owned(),
            v(ObjectPath::try_from(IMAGE).expect("path")),
        ),
    ]);
    (
        vm_path(name),
        Interfaces::from([(banger_dbus::VM_INTERFACE.to_owned(), props)]),
    )
}

fn image() -> (String, Interfaces) {
    let props: Props = HashMap::from([
        ("Id".to_owned(), v("aa11")),
        ("Name".to_owned(), v("tiny")),
        ("RootfsBytes".to_owned(), v(64u64 << 20)),
        ("Managed".to_owned(), v(true)),
        (
            "Kernel".to_owned(),
            v(ObjectPath::try_from(KERNEL).expect("path")),
        ),
    ]);
    (
        IMAGE.to_owned(),
        Interfaces::from([(banger_dbus::IMAGE_INTERFACE.to_owned(), props)]),
    )
}

fn kernel() -> (String, Interfaces) {
    let props: Props = HashMap::from([
        ("Id".to_owned(), v("bb22")),
        ("Name".to_owned(), v("test-kernel")),
        ("Version".to_owned(), v("6.12.9")),
        ("SizeBytes".to_owned(), v(12u64 << 20)),
    ]);
    (
        KERNEL.to_owned(),
        Interfaces::from([(banger_dbus::KERNEL_INTERFACE.to_owned(), props)]),
    )
}

fn job(stage: &str, fraction: f64) -> (String, Interfaces) {
    let props: Props = HashMap::from([
        ("Kind".to_owned(), v("vm.create")),
        ("State".to_owned(), v("running")),
        ("Stage".to_owned(), v(stage)),
        ("Progress".to_owned(), v(fraction)),
        ("Bytes".to_owned(), v(0u64)),
        ("OwnerUID".to_owned(), v(1000u32)),
        ("StartedAt".to_owned(), v(1u64)),
    ]);
    (
        JOB.to_owned(),
        Interfaces::from([(banger_dbus::JOB_INTERFACE.to_owned(), props)]),
    )
}

/// An app of user 1000 with `objects` loaded.
fn app_with(me: u32, objects: Vec<(String, Interfaces)>) -> App {
    let mut app = App::new(me);
    app.model.apply(Update::Loaded(objects), Instant::now());
    app
}

fn usual() -> App {
    app_with(
        1000,
        vec![
            vm("web", "running", "172.30.0.2", 1000),
            vm("db", "stopped", "", 1000),
            vm("bobs", "running", "172.30.0.9", 1001),
            image(),
            kernel(),
        ],
    )
}

/// The screen as lines of text.
fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
    terminal
        .draw(|frame| view::draw(frame, app, Instant::now()))
        .expect("draw");
    let buffer = terminal.backend().buffer();
    (0..height)
        .map(|y| {
            (0..width)
                .map(|x| buffer[(x, y)].symbol().to_owned())
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect()
}

fn shows(lines: &[String], text: &str) -> bool {
    lines.iter().any(|l| l.contains(text))
}

fn press(app: &mut App, code: KeyCode) -> Option<Effect> {
    app.key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn typed(app: &mut App, text: &str) {
    for c in text.chars() {
        assert_eq!(press(app, KeyCode::Char(c)), None);
    }
}

#[test]
fn the_vm_table_fits_80_by_24() {
    let mut app = usual();
    app.model.apply(
        Update::Stats {
            path: vm_path("web"),
            cpu_usec: 0,
            rss_bytes: 300 << 20,
        },
        Instant::now() - Duration::from_secs(2),
    );
    app.model.apply(
        Update::Stats {
            path: vm_path("web"),
            cpu_usec: 1_000_000,
            rss_bytes: 310 << 20,
        },
        Instant::now(),
    );
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "1 VMs (2)"), "{lines:#?}");
    assert!(shows(&lines, "● bangerd"), "{lines:#?}");
    let header = lines.iter().find(|l| l.contains("NAME")).expect("header");
    for column in ["STATE", "IPV4", "CPU%", "RSS", "NAT"] {
        assert!(header.contains(column), "{column} in {header}");
    }
    // Sorted by name; the selection is on the first.
    let db = lines.iter().position(|l| l.contains("db")).expect("db");
    let web = lines.iter().position(|l| l.contains("web")).expect("web");
    assert!(db < web);
    assert!(lines[db].contains("▶"));
    assert!(lines[web].contains("172.30.0.2"));
    assert!(lines[web].contains("310 MiB"), "{}", lines[web]);
    // 1 s of CPU in about 2 s.
    assert!(
        lines[web].contains(" 50 ") || lines[web].contains(" 49 "),
        "{}",
        lines[web]
    );
    // Another user's VM is not shown to user 1000 by default.
    assert!(!shows(&lines, "bobs"));
    assert!(shows(&lines, "q quit"), "{lines:#?}");
    for line in &lines {
        assert!(line.chars().count() <= 80);
    }
}

#[test]
fn root_sees_every_owner() {
    let app = app_with(
        0,
        vec![
            vm("web", "running", "172.30.0.2", 1000),
            vm("bobs", "running", "172.30.0.9", 1001),
        ],
    );
    let lines = screen(&app, 120, 30);
    let header = lines.iter().find(|l| l.contains("NAME")).expect("header");
    assert!(header.contains("OWNER"), "{header}");
    assert!(shows(&lines, "bobs"));
    assert!(shows(&lines, "every user's VMs"));
}

#[test]
fn a_user_can_show_everyones_vms() {
    let mut app = usual();
    assert_eq!(press(&mut app, KeyCode::Char('a')), None);
    let lines = screen(&app, 120, 30);
    assert!(shows(&lines, "bobs"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("NAME") && l.contains("OWNER"))
    );
}

#[test]
fn running_jobs_show_their_stage_and_progress() {
    let mut objects = usual_objects();
    objects.push(job("disks", 0.5));
    let app = app_with(1000, objects);
    let lines = screen(&app, 100, 24);
    assert!(shows(&lines, "running jobs"), "{lines:#?}");
    let row = lines.iter().find(|l| l.contains("job 7")).expect("job row");
    assert!(row.contains("vm.create"), "{row}");
    assert!(row.contains("disks"), "{row}");
    assert!(row.contains("[##########----------]  50%"), "{row}");

    let mut app = app;
    press(&mut app, KeyCode::Char('4'));
    assert_eq!(app.tab, Tab::Jobs);
    let lines = screen(&app, 100, 24);
    assert!(shows(&lines, "4 Jobs (1)"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains('7') && l.contains("running"))
    );
    // x asks before cancelling.
    assert_eq!(press(&mut app, KeyCode::Char('x')), None);
    assert!(shows(
        &screen(&app, 100, 24),
        "Cancel job 7 (vm.create)? (y/n)"
    ));
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Effect::Cancel {
            path: JOB.into(),
            label: "7".into()
        })
    );
}

fn usual_objects() -> Vec<(String, Interfaces)> {
    vec![
        vm("web", "running", "172.30.0.2", 1000),
        vm("db", "stopped", "", 1000),
        image(),
        kernel(),
    ]
}

#[test]
fn vm_keys_ask_for_jobs_and_delete_asks_first() {
    let mut app = usual();
    // The selection starts on db (stopped); down moves to web.
    assert_eq!(
        press(&mut app, KeyCode::Char('s')),
        Some(Effect::VmJob {
            path: vm_path("db"),
            name: "db".into(),
            job: VmJob::Start
        })
    );
    // Enter on a stopped VM says how to start it.
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    assert!(
        app.status
            .as_ref()
            .is_some_and(|s| s.error && s.text.contains("`s` starts it"))
    );
    press(&mut app, KeyCode::Down);
    assert!(matches!(press(&mut app, KeyCode::Enter), Some(Effect::Ssh(vm)) if vm.name == "web"));
    assert_eq!(
        press(&mut app, KeyCode::Char('x')),
        Some(Effect::VmJob {
            path: vm_path("web"),
            name: "web".into(),
            job: VmJob::Stop
        })
    );
    assert_eq!(press(&mut app, KeyCode::Char('d')), None);
    let lines = screen(&app, 80, 24);
    assert!(
        shows(&lines, "Delete vm web and its disks? (y/n)"),
        "{lines:#?}"
    );
    // Any other key leaves the question up; n answers it.
    assert_eq!(press(&mut app, KeyCode::Char('d')), None);
    assert!(matches!(app.mode, Mode::Confirm { .. }));
    assert_eq!(press(&mut app, KeyCode::Char('n')), None);
    assert_eq!(app.mode, Mode::Normal);
    press(&mut app, KeyCode::Char('d'));
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Effect::VmJob {
            path: vm_path("web"),
            name: "web".into(),
            job: VmJob::Delete
        })
    );
    assert_eq!(press(&mut app, KeyCode::Char('q')), Some(Effect::Quit));
    assert_eq!(
        app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Some(Effect::Quit)
    );
}

#[test]
fn the_create_form() {
    let mut app = usual();
    assert_eq!(press(&mut app, KeyCode::Char('c')), None);
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "create a VM"), "{lines:#?}");
    assert!(shows(&lines, "(default)"));
    typed(&mut app, "dev");
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Right);
    assert!(shows(&screen(&app, 80, 24), "◀ tiny ▶"));
    press(&mut app, KeyCode::Tab);
    typed(&mut app, "two");
    press(&mut app, KeyCode::Tab);
    typed(&mut app, "1024");
    press(&mut app, KeyCode::Tab);
    typed(&mut app, "8G");
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Char(' '));
    // A bad number keeps the form up with the reason.
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    let lines = screen(&app, 80, 24);
    assert!(
        shows(&lines, "vCPUs must be a whole number above 0"),
        "{lines:#?}"
    );
    for _ in 0..3 {
        press(&mut app, KeyCode::Up);
    }
    for _ in 0..3 {
        press(&mut app, KeyCode::Backspace);
    }
    typed(&mut app, "2");
    assert_eq!(
        press(&mut app, KeyCode::Enter),
        Some(Effect::Create(CreateRequest {
            name: Some("dev".into()),
            image: "aa11".into(),
            vcpus: Some(2),
            memory_mib: Some(1024),
            disk_bytes: Some(8 << 30),
            nat: true,
        }))
    );
}

#[test]
fn a_create_without_a_name_gets_a_fresh_one() {
    let mut app = usual();
    press(&mut app, KeyCode::Char('c'));
    match press(&mut app, KeyCode::Enter) {
        Some(Effect::Create(request)) => {
            let name = request.name.expect("a name");
            assert!(!name.is_empty() && name != "web" && name != "db");
            assert_eq!(request.image, "");
            assert_eq!((request.vcpus, request.disk_bytes), (None, None));
        }
        other => panic!("{other:?}"),
    }
    press(&mut app, KeyCode::Char('c'));
    assert_eq!(press(&mut app, KeyCode::Esc), None);
    assert_eq!(app.mode, Mode::Normal);
}

#[test]
fn the_filter_narrows_every_tab() {
    let mut app = usual();
    press(&mut app, KeyCode::Char('/'));
    typed(&mut app, "we");
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "/we"));
    press(&mut app, KeyCode::Enter);
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "your VMs matching \"we\""), "{lines:#?}");
    assert!(shows(&lines, "web"));
    assert!(!lines.iter().any(|l| l.contains(" db ")));
    press(&mut app, KeyCode::Char('/'));
    typed(&mut app, "zzz");
    press(&mut app, KeyCode::Enter);
    assert!(shows(&screen(&app, 80, 24), "no VM matches the filter"));
    press(&mut app, KeyCode::Esc);
    assert!(app.filter.is_empty());
}

#[test]
fn images_and_kernels_tabs() {
    let mut app = usual();
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.tab, Tab::Images);
    let lines = screen(&app, 80, 24);
    let row = lines
        .iter()
        .find(|l| l.contains("tiny"))
        .expect("image row");
    assert!(
        row.contains("64 MiB") && row.contains("test-kernel"),
        "{row}"
    );
    press(&mut app, KeyCode::Char('d'));
    assert!(shows(&screen(&app, 80, 24), "Delete image tiny? (y/n)"));
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Effect::DeleteImage {
            id: "aa11".into(),
            name: "tiny".into()
        })
    );
    // p loads the catalog, then offers it.
    assert_eq!(
        press(&mut app, KeyCode::Char('p')),
        Some(Effect::Available { image: true })
    );
    assert!(shows(&screen(&app, 80, 24), "loading the catalog"));
    app.on_available(
        true,
        vec![banger_dbus::CatalogEntry {
            name: "debian-12".into(),
            version: "1".into(),
            arch: "x86_64".into(),
            description: "Debian 12 with systemd".into(),
            url: String::new(),
            size: 300 << 20,
            kernel: "generic".into(),
            min_banger: String::new(),
            installed: false,
            usable: true,
        }],
    );
    assert!(shows(&screen(&app, 80, 24), "Debian 12 with systemd"));
    assert_eq!(
        press(&mut app, KeyCode::Enter),
        Some(Effect::Pull {
            image: true,
            name: "debian-12".into()
        })
    );

    press(&mut app, KeyCode::Char('3'));
    assert_eq!(app.tab, Tab::Kernels);
    let lines = screen(&app, 80, 24);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("test-kernel") && l.contains("6.12.9"))
    );
    press(&mut app, KeyCode::Char('d'));
    assert_eq!(
        press(&mut app, KeyCode::Char('y')),
        Some(Effect::DeleteKernel {
            id: "bb22".into(),
            name: "test-kernel".into()
        })
    );
}

#[test]
fn the_console_log_follows_and_scrolls() {
    let mut app = usual();
    press(&mut app, KeyCode::Down);
    assert_eq!(
        press(&mut app, KeyCode::Char('l')),
        Some(Effect::Logs {
            path: vm_path("web"),
            offset: 0
        })
    );
    // No second read while one is on its way.
    assert_eq!(app.log_read(), None);
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(&format!("\x1b[32mline {i}\x1b[0m\r\n"));
    }
    app.on_log(&vm_path("web"), text.as_bytes(), 777);
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "console of vm web (following)"), "{lines:#?}");
    assert!(shows(&lines, "line 39"));
    assert!(!shows(&lines, "line 3 "));
    assert!(!lines.iter().any(|l| l.contains('\x1b')));
    assert_eq!(
        app.log_read(),
        Some(Effect::Logs {
            path: vm_path("web"),
            offset: 777
        })
    );
    press(&mut app, KeyCode::PageUp);
    let lines = screen(&app, 80, 24);
    assert!(!shows(&lines, "line 39"));
    assert!(shows(&lines, "line 29"));
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.mode, Mode::Normal);
    // A page that arrives after the view closed is dropped.
    app.on_log(&vm_path("web"), b"late", 800);
}

#[test]
fn help_and_a_daemon_that_went_away() {
    let mut app = usual();
    press(&mut app, KeyCode::Char('?'));
    let lines = screen(&app, 80, 24);
    assert!(shows(&lines, "keys"));
    assert!(shows(&lines, "ssh into the VM"));
    press(&mut app, KeyCode::Char('z'));
    assert_eq!(app.mode, Mode::Normal);

    app.model
        .apply(Update::Gone("bangerd left the bus".into()), Instant::now());
    let lines = screen(&app, 120, 24);
    assert!(
        shows(&lines, "○ bangerd away: bangerd left the bus"),
        "{lines:#?}"
    );
    // The VMs stay listed while it is away.
    assert!(shows(&lines, "web"));
}

#[test]
fn jobs_started_here_are_reported_when_they_end() {
    let mut objects = usual_objects();
    objects.push(job("boot", 0.5));
    let mut app = app_with(1000, objects);
    let effect = Effect::VmJob {
        path: vm_path("web"),
        name: "web".into(),
        job: VmJob::Restart,
    };
    app.on_started(&effect, JOB);
    assert!(shows(
        &screen(&app, 80, 24),
        "restart vm web: job 7 started"
    ));
    app.model.apply(
        Update::Job {
            path: JOB.into(),
            event: crate::progress::JobEvent::Completed {
                success: false,
                error_name: "org.banger.Error.Failed".into(),
                message: "the guest did not answer".into(),
                result: "/".into(),
            },
        },
        Instant::now(),
    );
    app.after_update(Instant::now());
    let lines = screen(&app, 80, 24);
    assert!(
        shows(&lines, "restart vm web: failed: the guest did not answer"),
        "{lines:#?}"
    );
    app.on_failed(&effect, "not allowed");
    assert!(shows(
        &screen(&app, 80, 24),
        "cannot restart vm web: not allowed"
    ));
}

#[test]
fn tiny_and_odd_terminals_do_not_break_it() {
    let mut objects = usual_objects();
    objects.push(job("disks", 0.2));
    let mut app = app_with(1000, objects);
    for (w, h) in [(1, 1), (20, 5), (40, 10), (80, 24), (200, 60)] {
        screen(&app, w, h);
        press(&mut app, KeyCode::Char('?'));
        screen(&app, w, h);
        press(&mut app, KeyCode::Esc);
        press(&mut app, KeyCode::Char('c'));
        screen(&app, w, h);
        press(&mut app, KeyCode::Esc);
    }
    // An empty model.
    let empty = App::new(1000);
    let lines = screen(&empty, 80, 24);
    assert!(shows(&lines, "○ connecting"));
    assert!(shows(&lines, "no VMs: press c to create one"));
}
