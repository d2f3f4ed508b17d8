//! `banger web` in a real headless Chromium (driven through chromedriver's
//! WebDriver API) against the test bed with QEMU guests: requests without
//! the token or cookie are refused (401), a POST without the CSRF header
//! or from another origin is refused (403), the dashboard lists a VM
//! created from the CLI without a reload, a create from the form shows
//! its stages live, the VM page follows the console, a cross-site form
//! POST from another origin changes nothing, and delete asks first. Each
//! page is saved as a PNG in `target/tmp/web-screens/` for a person to
//! look at, with the first-paint timing. Needs root, chromium and
//! chromium-driver, and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testbed::{bin_path, eventually, free_loopback_port};
use base64::Engine;
use serde_json::{Value, json};

use crate::vm_lifecycle::{Env, setup_with};

/// The flags this closed network needs (no background connections).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
];

fn screens() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screens");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// The page's load and paint times, as the browser measured them.
const TIMING: &str = "const nav = performance.getEntriesByType('navigation')[0]; \
     const paint = performance.getEntriesByType('paint'); \
     const at = (name) => (paint.find((p) => p.name === name) || {}).startTime; \
     return {response_end_ms: nav.responseEnd, first_paint_ms: at('first-paint'), \
             first_contentful_paint_ms: at('first-contentful-paint'), \
             transfer_bytes: nav.transferSize};";

/// One chromedriver and its browser session; both ended on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_loopback_port().unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (package chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while http().get(format!("{base}/status")).call().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            _profile: profile,
        };
        let created = browser.command(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            }}}),
        );
        browser.session = created["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// A WebDriver command; its `value`.
    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let mut response = match method {
            "GET" => http().get(&url).call(),
            "DELETE" => http().delete(&url).call(),
            _ => http().post(&url).send_json(&body),
        }
        .unwrap();
        let status = response.status();
        let reply: Value = response.body_mut().read_json().unwrap();
        assert!(status.is_success(), "WebDriver {method} {path}: {reply}");
        reply["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session_command("POST", "/url", json!({"url": url}));
    }

    fn script(&self, js: &str) -> Value {
        self.session_command("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    /// [`TIMING`] once the browser has recorded the first contentful paint.
    fn paint_times(&self) -> Value {
        let start = Instant::now();
        loop {
            let timing = self.script(TIMING);
            if timing["first_contentful_paint_ms"].is_number()
                || start.elapsed() > Duration::from_secs(5)
            {
                return timing;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn text(&self) -> String {
        self.script("return document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn url(&self) -> String {
        self.session_command("GET", "/url", Value::Null)
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn element(&self, css: &str) -> String {
        let found = self.session_command(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    }

    /// Click the element `css` finds. The pages redraw from live state, so
    /// the element found may be replaced before the click lands: then it
    /// is found again (WebDriver's "stale element reference").
    fn click(&self, css: &str) {
        for _ in 0..5 {
            let element = self.element(css);
            let url = format!(
                "{}/session/{}/element/{element}/click",
                self.base, self.session
            );
            let mut response = http().post(&url).send_json(json!({})).unwrap();
            if response.status().is_success() {
                return;
            }
            let reply: Value = response.body_mut().read_json().unwrap();
            assert_eq!(
                reply["value"]["error"], "stale element reference",
                "click {css}: {reply}"
            );
        }
        panic!("{css} kept being replaced before a click landed");
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.session_command(
            "POST",
            &format!("/element/{element}/value"),
            json!({"text": text}),
        );
    }

    /// Wait until the page's text passes `test`; the text then.
    fn wait_for(&self, what: &str, timeout: Duration, test: impl Fn(&str) -> bool) -> String {
        eventually(timeout, || Some(self.text()).filter(|text| test(text))).unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for {what}; the page:\n{}",
                self.text()
            )
        })
    }

    fn screenshot(&self, name: &str) {
        let png = self.session_command("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(screens().join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = http().delete(&url).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `banger web` as root on a free loopback port; killed on drop.
struct Web {
    child: Child,
    url: String,
    base: String,
    /// Kept open, as a terminal would be (a closed one is
    /// [`a_reader_that_stops_after_the_url_does_not_stop_the_server`]).
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Web {
    fn start(env: &Env) -> Web {
        let mut child = Command::new(bin_path("banger"))
            .args(["web", "--listen", "127.0.0.1:0"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", env.bed.bus_address())
            .env("HOME", env.home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("banger web: open ")
            .unwrap_or_else(|| panic!("banger web printed {line:?}"))
            .to_owned();
        let base = url.split("/?").next().unwrap().to_owned();
        Web {
            child,
            url,
            base,
            _stdout: stdout,
        }
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain HTTP against the dashboard: what is refused, and the cookie and
/// CSRF token a signed-in page gets.
fn refusals(web: &Web) {
    let agent = http();
    let status = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| r.unwrap().status();
    assert_eq!(status(agent.get(format!("{}/", web.base)).call()), 401);
    assert_eq!(
        status(agent.get(format!("{}/api/events", web.base)).call()),
        401
    );
    assert_eq!(
        status(agent.get(format!("{}/?token=0000", web.base)).call()),
        401
    );
    let signed_in = agent.get(&web.url).call().unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let mut page = agent
        .get(format!("{}/", web.base))
        .header("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.body_mut().read_to_string().unwrap();
    let csrf = html
        .split("name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let post = |headers: &[(&str, &str)]| {
        let mut request = agent
            .post(format!("{}/api/pull", web.base))
            .header("Cookie", &cookie);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request
            .send_json(json!({"kind": "image", "name": "nothing-here"}))
            .unwrap()
            .status()
    };
    assert_eq!(post(&[]), 403, "no CSRF header");
    assert_eq!(
        post(&[("x-banger-csrf", "0000")]),
        403,
        "a wrong CSRF token"
    );
    assert_eq!(
        post(&[("x-banger-csrf", &csrf), ("Origin", "http://evil.example")]),
        403,
        "another origin"
    );
    // Through the guard, the call reaches bangerd, which knows no such entry.
    assert_eq!(post(&[("x-banger-csrf", &csrf)]), 404);
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let env = setup_with("");
    let web = Web::start(&env);
    refusals(&web);

    let browser = Browser::start();
    browser.goto(&web.url);
    browser.wait_for("the empty dashboard", Duration::from_secs(20), |t| {
        t.contains("no VMs") && t.contains("● bangerd")
    });
    assert_eq!(
        browser.url(),
        format!("{}/", web.base),
        "the token left the URL"
    );
    let first_load = browser.paint_times();

    // A VM created from the CLI appears without a reload.
    browser.script("window.bangerMarker = 42; return null");
    env.ok(&["vm", "create", "--no-start", "--name", "outside"]);
    browser.wait_for("vm outside", Duration::from_secs(2), |t| {
        t.contains("outside") && t.contains("stopped")
    });
    assert_eq!(browser.script("return window.bangerMarker"), json!(42));
    browser.screenshot("dashboard");

    // A create from the form, its stages shown live on the job page.
    browser.goto(&format!("{}/create", web.base));
    browser.wait_for("the form", Duration::from_secs(10), |t| {
        t.contains("Create a VM")
    });
    browser.type_into("#f-name", "fromweb");
    browser.screenshot("create");
    browser.click("#f-create");
    let start = Instant::now();
    let mut stages: Vec<String> = Vec::new();
    loop {
        let seen = browser.script(
            "return Array.from(document.querySelectorAll('[data-stage]')).map(e => e.dataset.stage)",
        );
        for stage in seen.as_array().into_iter().flatten() {
            let stage = stage.as_str().unwrap().to_owned();
            if !stages.contains(&stage) {
                stages.push(stage);
            }
        }
        let text = browser.text();
        if text.contains("succeeded") {
            break;
        }
        assert!(!text.contains("failed:"), "the create failed:\n{text}");
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no end:\n{text}"
        );
        if stages.len() == 2 {
            browser.screenshot("job-running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(browser.url().contains("/job/"), "{}", browser.url());
    assert!(stages.len() >= 3, "stages seen: {stages:?}");
    browser.screenshot("job");

    // The VM's page follows its console.
    let id = env.vm("fromweb")["id"].as_str().unwrap().to_owned();
    browser.click("#outcome a");
    browser.wait_for("the console", Duration::from_secs(20), |t| {
        t.contains("vm fromweb")
            && t.contains("banger-init:")
            && t.contains("banger vm ssh fromweb")
    });
    assert_eq!(browser.url(), format!("{}/vm/{id}", web.base));
    browser.screenshot("vm");

    // Every page, with its paint times once the browser is warm.
    let mut paints = Vec::new();
    for (path, name, expect) in [
        ("/images", "images", "tiny"),
        ("/kernels", "kernels", "test-kernel"),
        ("/jobs", "jobs", "Jobs"),
        ("/", "dashboard-again", "outside"),
        (&format!("/vm/{id}"), "vm-again", "banger vm ssh"),
    ] {
        browser.goto(&format!("{}{path}", web.base));
        browser.wait_for(name, Duration::from_secs(10), |t| t.contains(expect));
        paints.push(json!({"page": path, "timing": browser.paint_times()}));
        browser.screenshot(name);
    }
    let timing = json!({"first_load": first_load, "warm": paints});
    eprintln!("banger web paint times: {timing}");
    std::fs::write(screens().join("timing.json"), timing.to_string()).unwrap();

    // A page of another origin posts a form at the dashboard: refused,
    // nothing deleted.
    let site = tempfile::tempdir().unwrap();
    std::fs::write(
        site.path().join("evil.html"),
        format!(
            "<form method=post action=\"{}/api/vm/{id}/delete\"></form>\
             <script>document.forms[0].submit()</script>",
            web.base
        ),
    )
    .unwrap();
    let port = free_loopback_port().unwrap();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(site.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let evil = format!("http://127.0.0.1:{port}/evil.html");
    let start = Instant::now();
    while http().get(&evil).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    browser.goto(&evil);
    let refused = browser.wait_for("the refusal", Duration::from_secs(10), |t| {
        t.contains("not signed in") || t.contains("refused") || t.contains("CSRF")
    });
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(env.vm("fromweb")["state"], "running", "{refused}");

    // Delete from the VM page: the first click asks, the second deletes.
    browser.goto(&format!("{}/vm/{id}", web.base));
    browser.wait_for("the VM page", Duration::from_secs(10), |t| {
        t.contains("vm fromweb")
    });
    browser.click("button[data-action=delete]");
    browser.wait_for("the question", Duration::from_secs(5), |t| {
        t.contains("really delete?")
    });
    assert!(env.vms().iter().any(|v| v["name"] == "fromweb"));
    browser.click("button.armed");
    browser.wait_for("the VM gone", Duration::from_secs(60), |t| {
        t.contains("VM gone")
    });
    assert!(env.vms().iter().all(|v| v["name"] != "fromweb"));
    env.ok(&["vm", "delete", "outside"]);
}

/// `banger web | head -1`: the server outlives the reader of its stdout.
/// Here nobody reads it at all (the pipe's read end is closed before
/// banger starts), so its first line already meets a closed pipe.
#[test]
fn a_reader_that_stops_after_the_url_does_not_stop_the_server() {
    let bed = banger_testbed::TestBed::start(banger_testbed::Options::default()).unwrap();
    let home = tempfile::tempdir().unwrap();
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let mut child = Command::new(bin_path("banger"))
        .args(["web", "--listen", "127.0.0.1:0"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bed.bus_address())
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its listening socket, found by the inodes of its descriptors.
    let start = Instant::now();
    let port = loop {
        if let Some(port) = listening_port(child.id()) {
            break port;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "banger web exited: {}",
            String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr)
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no listening socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "banger web exited");
    let answer = http().get(format!("http://127.0.0.1:{port}/")).call();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        answer.map(|r| r.status().as_u16()).ok(),
        Some(401),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The loopback TCP port process `pid` listens on, if any.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
        (*state == "0A" && inodes.iter().any(|i| i == inode))
            .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
            .flatten()
    })
}
