//! `banger tui` in a real terminal: tmux runs it against the test bed
//! (real bus, polkitd, bangerd, QEMU guests), `send-keys` drives it and
//! `capture-pane` reads the screen. A VM created from another shell shows
//! up within a second; a create from the TUI shows its stages and ends
//! running; the console view follows the guest; a resize and a bangerd
//! that goes away and comes back are survived; delete asks first; `q`
//! quits with status 0. Needs root, tmux and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use banger_testbed::{TestUser, bin_path, eventually};

use crate::vm_lifecycle::setup_with;

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, command: &str, width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: format!("banger-{name}-{}", std::process::id()),
        };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            command,
        ]);
        assert!(out.status.success(), "tmux: {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// The screen, as text.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "tui"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The normal screen while the alternate one is shown: what was
    /// printed while the TUI had left it.
    fn normal_screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-a", "-t", "tui"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keys by tmux name ("Enter", "Escape", "c").
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Text typed as it is.
    fn type_text(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "tui", "-l", text])
                .status
                .success()
        );
    }

    /// Wait until `test` holds for the screen; the screen then.
    fn wait_for(&self, what: &str, timeout: Duration, test: impl Fn(&str) -> bool) -> String {
        eventually(timeout, || {
            Some(self.screen()).filter(|screen| test(screen))
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for {what}; the screen:\n{}",
                self.screen()
            )
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Keep `screen` as `target/tmp/tui-screens/<name>.txt`, for a person to
/// look at (docs/tui.md shows them).
fn save(name: &str, screen: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tui-screens");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), screen).unwrap();
}

/// The table row of VM `name` on `screen`, if shown.
fn row<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name) && !l.contains("vm "))
}

#[test]
fn the_tui_drives_vms_in_a_real_terminal() {
    let mut env = setup_with("");
    let command = format!(
        "ip netns exec {} env DBUS_SYSTEM_BUS_ADDRESS={} HOME={} TERM=xterm-256color {} tui; \
         echo \"tui exited $?\"; sleep 600",
        env.ns.name(),
        env.bed.bus_address(),
        env.home.path().display(),
        bin_path("banger").display(),
    );
    let tmux = Tmux::start("tui", &command, 110, 32);
    let long = Duration::from_secs(20);
    tmux.wait_for("the VM table", long, |s| {
        s.contains("● bangerd") && s.contains("no VMs: press c to create one")
    });

    // A VM created from another shell is on screen within a second.
    env.ok(&["vm", "create", "--no-start", "--name", "outside"]);
    let seen = Instant::now();
    tmux.wait_for("vm outside, stopped", Duration::from_secs(1), |s| {
        row(s, "outside").is_some_and(|r| r.contains("stopped"))
    });
    assert!(seen.elapsed() < Duration::from_secs(1));

    // A create from the form: its stages show while it runs.
    tmux.keys(&["c"]);
    tmux.wait_for("the create form", long, |s| s.contains("create a VM"));
    tmux.type_text("inside");
    save(
        "form",
        &tmux.wait_for("the name typed", long, |s| s.contains("inside")),
    );
    tmux.keys(&["Enter"]);
    let start = Instant::now();
    let mut stages = Vec::new();
    let mut stages_screen = String::new();
    let screen = loop {
        let screen = tmux.screen();
        if screen.contains("running jobs") {
            stages_screen.clone_from(&screen);
        }
        for line in screen.lines().filter(|l| l.contains("create-vm")) {
            let stage = line
                .split_whitespace()
                .nth(3)
                .unwrap_or_default()
                .to_owned();
            if !stage.starts_with('[') && !stages.contains(&stage) {
                stages.push(stage);
            }
        }
        if screen.contains("create vm inside: done") {
            break screen;
        }
        assert!(
            !screen.contains("create vm inside: failed"),
            "create failed:\n{screen}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "create did not end:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    save("create", &stages_screen);
    assert!(
        stages.len() >= 2,
        "stages seen: {stages:?}; the screen:\n{screen}"
    );
    let screen = tmux.wait_for("inside running", long, |s| {
        row(s, "inside").is_some_and(|r| {
            let cells: Vec<&str> = r.split_whitespace().collect();
            cells.contains(&"running")
                && cells
                    .iter()
                    .any(|c| c.parse::<std::net::Ipv4Addr>().is_ok())
        })
    });
    assert_eq!(
        env.vm("inside")["state"],
        "running",
        "the daemon agrees:\n{screen}"
    );

    // The console of the selected VM (inside sorts first).
    save("table", &screen);
    tmux.keys(&["l"]);
    let screen = tmux.wait_for("the console", long, |s| {
        s.contains("console of vm inside (following)") && s.contains("banger-init:")
    });
    save("console", &screen);
    tmux.keys(&["Escape"]);
    tmux.wait_for("the table again", long, |s| s.contains("NAME"));

    // ssh suspends the screen; leaving the shell brings it back.
    tmux.keys(&["Enter"]);
    tmux.wait_for("the guest's shell", Duration::from_secs(60), |s| {
        s.contains("ssh to vm inside") && s.trim_end().ends_with('#')
    });
    tmux.type_text("echo from-$((6*7)); exit");
    tmux.keys(&["Enter"]);
    tmux.wait_for("the table after ssh", long, |s| {
        s.contains("back from vm inside") && row(s, "inside").is_some()
    });

    // A narrow terminal.
    assert!(
        tmux.run(&["resize-window", "-t", "tui", "-x", "80", "-y", "24"])
            .status
            .success()
    );
    tmux.wait_for("the table at 80×24", long, |s| {
        s.lines().all(|l| l.chars().count() <= 80)
            && row(s, "inside").is_some()
            && s.contains("q quit")
    });

    // bangerd goes away and comes back.
    env.bed.kill_daemon();
    tmux.wait_for("bangerd away", long, |s| s.contains("bangerd away"));
    env.bed.start_daemon().unwrap();
    tmux.wait_for("bangerd back", long, |s| {
        s.contains("● bangerd") && row(s, "inside").is_some() && row(s, "outside").is_some()
    });

    // Delete asks first, then the row goes.
    tmux.keys(&["g", "d"]);
    let screen = tmux.wait_for("the question", long, |s| {
        s.contains("Delete vm inside and its disks? (y/n)")
    });
    save("delete", &screen);
    tmux.keys(&["y"]);
    tmux.wait_for("inside gone", Duration::from_secs(60), |s| {
        row(s, "inside").is_none() && s.contains("delete vm inside: done")
    });
    assert!(
        env.vms().iter().all(|v| v["name"] != "inside"),
        "the daemon agrees"
    );

    tmux.keys(&["q"]);
    tmux.wait_for("the exit", long, |s| s.contains("tui exited 0"));
    env.ok(&["vm", "delete", "outside"]);
}

/// A call polkit wants a password for: the TUI leaves the screen, starts
/// pkttyagent on the terminal and makes the call again, allowing the
/// prompt, then comes back with the answer. Nobody can answer here (no
/// login session), so the create is refused, and nothing is made.
#[test]
fn a_call_that_needs_a_password_leaves_the_screen_for_the_prompt() {
    let env = setup_with("");
    let user = TestUser::create().unwrap();
    let command = format!(
        "ip netns exec {} runuser -u {} -- env DBUS_SYSTEM_BUS_ADDRESS={} HOME={} \
         TERM=xterm-256color {} tui; echo \"tui exited $?\"; sleep 600",
        env.ns.name(),
        user.name(),
        env.bed.bus_address(),
        user.home().display(),
        bin_path("banger").display(),
    );
    let tmux = Tmux::start("tui-prompt", &command, 100, 30);
    let long = Duration::from_secs(20);
    tmux.wait_for("the VM table", long, |s| {
        s.contains("● bangerd") && s.contains("no VMs: press c to create one")
    });
    tmux.keys(&["c"]);
    tmux.wait_for("the create form", long, |s| s.contains("create a VM"));
    tmux.type_text("denied");
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the refusal", Duration::from_secs(60), |s| {
        s.contains("cannot create vm denied:") && s.contains("● bangerd")
    });
    let normal = tmux.normal_screen();
    assert!(
        normal.contains("polkit asks who you are to create vm denied:"),
        "the prompt's screen:\n{normal}\nthe TUI:\n{screen}"
    );
    assert!(env.vms().iter().all(|v| v["name"] != "denied"));
    tmux.keys(&["q"]);
    tmux.wait_for("the exit", long, |s| s.contains("tui exited 0"));
}
