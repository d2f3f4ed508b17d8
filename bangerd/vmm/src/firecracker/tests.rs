//! The Firecracker driver against its contract, `reference/firecracker-api.yaml`:
//! a checker that reads the upstream OpenAPI file and validates requests
//! against it, and a server built on that checker that answers the way
//! the file (and Firecracker's documented pre-boot rules) say. The real
//! binary is not available here (TESTBED.md); the file is the contract.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hyper::service::service_fn;
use serde_yaml_ng::Value as Yaml;

use super::*;

/// The upstream OpenAPI description, parsed.
struct Spec {
    doc: Yaml,
}

impl Spec {
    fn load() -> Self {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reference/firecracker-api.yaml");
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let doc: Yaml = serde_yaml_ng::from_str(&text).expect("the spec is YAML");
        assert_eq!(doc["swagger"].as_str(), Some("2.0"));
        Self { doc }
    }

    /// The operation for `method` on `path` (templates like
    /// `/drives/{drive_id}` match), with the path parameters.
    fn operation(&self, method: &Method, path: &str) -> Option<(&Yaml, HashMap<String, String>)> {
        let paths = self.doc["paths"].as_mapping()?;
        for (template, ops) in paths {
            let template = template.as_str()?;
            let Some(params) = match_template(template, path) else {
                continue;
            };
            let op = &ops[method.as_str().to_ascii_lowercase().as_str()];
            if !op.is_null() {
                return Some((op, params));
            }
        }
        None
    }

    fn resolve<'a>(&'a self, schema: &'a Yaml) -> &'a Yaml {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r.strip_prefix("#/definitions/").expect("local refs only");
                &self.doc["definitions"][name]
            }
            None => schema,
        }
    }

    /// Check `body` against the operation's body parameter.
    fn check_request(&self, op: &Yaml, body: Option<&Value>) -> std::result::Result<(), String> {
        let param = op["parameters"]
            .as_sequence()
            .and_then(|ps| ps.iter().find(|p| p["in"].as_str() == Some("body")));
        match (param, body) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("this operation takes no body".into()),
            (Some(p), None) if p["required"].as_bool() == Some(true) => {
                Err("the body is required".into())
            }
            (Some(_), None) => Ok(()),
            (Some(p), Some(b)) => self.check(&p["schema"], b, "body"),
        }
    }

    /// Validate `value` against `schema` (the subset of JSON Schema the
    /// file uses). Unknown fields are refused, as Firecracker's
    /// deserializers do.
    /// `at` names the value: `body...` for requests (where read-only
    /// fields may not be sent), `response...` for answers.
    fn check(&self, schema: &Yaml, value: &Value, at: &str) -> std::result::Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(options) = schema["enum"].as_sequence() {
            let ok = options.iter().any(|o| match (o, value) {
                (Yaml::String(a), Value::String(b)) => a == b,
                (Yaml::Number(a), Value::Number(b)) => a.as_i64() == b.as_i64(),
                _ => false,
            });
            if !ok {
                return Err(format!("{at}: {value} is not one of {options:?}"));
            }
        }
        match schema["type"].as_str() {
            Some("object") | None if schema["properties"].is_mapping() => {
                let object = value
                    .as_object()
                    .ok_or_else(|| format!("{at}: expected an object, got {value}"))?;
                for required in schema["required"].as_sequence().into_iter().flatten() {
                    let key = required.as_str().unwrap_or_default();
                    if !object.contains_key(key) {
                        return Err(format!("{at}: missing required field {key}"));
                    }
                }
                for (key, v) in object {
                    let property = &schema["properties"][key.as_str()];
                    if !property.is_null() {
                        if property["readOnly"].as_bool() == Some(true) && at.starts_with("body") {
                            return Err(format!("{at}.{key} is read-only"));
                        }
                        self.check(property, v, &format!("{at}.{key}"))?;
                    } else if schema["additionalProperties"].is_mapping() {
                        self.check(&schema["additionalProperties"], v, &format!("{at}.{key}"))?;
                    } else {
                        return Err(format!("{at}: unknown field {key}"));
                    }
                }
                Ok(())
            }
            Some("object") => value
                .is_object()
                .then_some(())
                .ok_or_else(|| format!("{at}: expected an object")),
            Some("string") => value
                .is_string()
                .then_some(())
                .ok_or_else(|| format!("{at}: expected a string, got {value}")),
            Some("boolean") => value
                .is_boolean()
                .then_some(())
                .ok_or_else(|| format!("{at}: expected a boolean, got {value}")),
            Some("integer") => {
                let n = value
                    .as_i64()
                    .ok_or_else(|| format!("{at}: expected an integer, got {value}"))?;
                if let Some(min) = schema["minimum"].as_i64()
                    && n < min
                {
                    return Err(format!("{at}: {n} is below the minimum {min}"));
                }
                if let Some(max) = schema["maximum"].as_i64()
                    && n > max
                {
                    return Err(format!("{at}: {n} is above the maximum {max}"));
                }
                Ok(())
            }
            Some("array") => {
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{at}: expected an array, got {value}"))?;
                for (i, item) in items.iter().enumerate() {
                    self.check(&schema["items"], item, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether the operation documents `status` (or has a default).
    fn documents(&self, op: &Yaml, status: u16) -> bool {
        let responses = &op["responses"];
        !responses[status as usize].is_null() || !responses["default"].is_null()
    }

    /// The schema of the operation's answer with `status`.
    fn response_schema<'a>(&'a self, op: &'a Yaml, status: u16) -> &'a Yaml {
        let r = &op["responses"][status as usize];
        if r.is_null() {
            &op["responses"]["default"]["schema"]
        } else {
            &r["schema"]
        }
    }

    /// "Post-boot only" in the operation's summary.
    fn post_boot_only(op: &Yaml) -> bool {
        op["summary"]
            .as_str()
            .is_some_and(|s| s.contains("Post-boot only"))
    }

    /// "Pre-boot only" in the operation's summary.
    fn pre_boot_only(op: &Yaml) -> bool {
        op["summary"]
            .as_str()
            .is_some_and(|s| s.contains("Pre-boot only"))
    }
}

fn match_template(template: &str, path: &str) -> Option<HashMap<String, String>> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut params = HashMap::new();
    for (a, b) in t.iter().zip(&p) {
        if let Some(name) = a.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
            if b.is_empty() {
                return None;
            }
            params.insert(name.to_owned(), (*b).to_owned());
        } else if a != b {
            return None;
        }
    }
    Some(params)
}

/// What the spec server saw and how it behaves.
#[derive(Debug, Default)]
struct Seen {
    /// Every request that passed the checks, in order.
    calls: Vec<ApiCall>,
    /// Every refusal sent, with its message.
    refusals: Vec<String>,
    /// `InstanceStart` succeeded.
    started: bool,
    /// PUT /boot-source succeeded.
    boot_source: bool,
    /// PUT /metrics succeeded (the spec: a second one is refused).
    metrics: bool,
    /// Refuse a PUT to this path with this message (like a real
    /// Firecracker refusing, e.g., a missing file).
    fail: Option<(String, String)>,
    /// The guest is paused (`PATCH /vm`).
    paused: bool,
    /// Something other than the logger and metrics was configured (a
    /// snapshot then no longer loads).
    configured: bool,
    /// The chroot the files are named in, when the server stands for a
    /// jailed Firecracker.
    root: Option<PathBuf>,
    /// What each `/snapshot/create` wrote, and the owner each file had
    /// when it was written: (path, uid, gid).
    written: Vec<(String, u32, u32)>,
    /// What `/snapshot/load` read: the state's and the memory's bytes.
    loaded: Option<(Vec<u8>, Vec<u8>)>,
}

impl Seen {
    /// Where the file Firecracker names `named` is.
    fn file(&self, named: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(named.trim_start_matches('/')),
            None => PathBuf::from(named),
        }
    }
}

/// A Firecracker stand-in that checks every request against the spec and
/// answers as the spec says: 204 for accepted PUT/PATCH, 200 with
/// `InstanceInfo` for `GET /`, 400 with `Error` otherwise.
struct SpecServer {
    socket: PathBuf,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl SpecServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let spec = Arc::new(Spec::load());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = shared.clone();
                let spec = spec.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let seen = seen.clone();
                        let spec = spec.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&spec, &seen, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            socket,
            seen,
            task,
            _dir: dir,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("lock")
    }
}

impl Drop for SpecServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(
    spec: &Spec,
    op: Option<&Yaml>,
    status: u16,
    body: Option<Value>,
) -> hyper::Response<Full<Bytes>> {
    // The server's own answers must be what the spec documents.
    if let Some(op) = op {
        assert!(spec.documents(op, status), "{status} is not documented");
        if let Some(b) = &body {
            let schema = spec.response_schema(op, status);
            if let Err(e) = spec.check(schema, b, "response") {
                panic!("the server's own answer breaks the spec: {e}");
            }
        }
    }
    let mut builder = hyper::Response::builder().status(status);
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    builder
        .body(Full::new(
            body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
        ))
        .expect("response")
}

async fn answer(
    spec: &Spec,
    seen: &Mutex<Seen>,
    req: Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let json_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let refuse = |op: Option<&Yaml>, message: String| {
        seen.lock().expect("lock").refusals.push(message.clone());
        reply(spec, op, 400, Some(json!({ "fault_message": message })))
    };
    let Some((op, params)) = spec.operation(&method, &path) else {
        return refuse(
            None,
            format!("Invalid request method and/or path: {method} {path}"),
        );
    };
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else if !json_type {
        return refuse(Some(op), "the body must be sent as application/json".into());
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => return refuse(Some(op), format!("the body is not JSON: {e}")),
        }
    };
    if let Err(e) = spec.check_request(op, body.as_ref()) {
        return refuse(Some(op), e);
    }
    // Ids in the path and the body must agree (Firecracker checks it).
    for (param, field) in [("drive_id", "drive_id"), ("iface_id", "iface_id")] {
        if let (Some(p), Some(b)) = (params.get(param), body.as_ref().and_then(|b| b.get(field)))
            && b.as_str() != Some(p.as_str())
        {
            return refuse(
                Some(op),
                format!("the {field} in the path and the body differ"),
            );
        }
    }
    if method == Method::GET && path == "/" {
        let s = seen.lock().expect("lock");
        let state = match (s.started, s.paused) {
            (false, _) => "Not started",
            (true, false) => "Running",
            (true, true) => "Paused",
        };
        drop(s);
        return reply(
            spec,
            Some(op),
            200,
            Some(json!({
                "app_name": "Firecracker",
                "id": "anonymous-instance",
                "state": state,
                "vmm_version": "1.17.0-dev",
            })),
        );
    }
    let mut s = seen.lock().expect("lock");
    if s.started && Spec::pre_boot_only(op) {
        drop(s);
        return refuse(
            Some(op),
            format!("{path} is pre-boot only and the microVM runs"),
        );
    }
    if !s.started && (Spec::post_boot_only(op) || path == "/vm") {
        drop(s);
        return refuse(
            Some(op),
            format!("{path} is post-boot only and the microVM has not started"),
        );
    }
    if let Some((fail_path, message)) = s.fail.clone()
        && fail_path == path
    {
        drop(s);
        return refuse(Some(op), message);
    }
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.pointer(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_default()
    };
    match path.as_str() {
        "/vm" => s.paused = field("/state") == "Paused",
        "/snapshot/create" if !s.paused => {
            drop(s);
            return refuse(Some(op), "the microVM must be paused first".into());
        }
        "/snapshot/create" => {
            // Firecracker creates (or truncates) both files and writes.
            for (named, data) in [
                (field("/snapshot_path"), "device state"),
                (field("/mem_file_path"), "guest memory"),
            ] {
                let file = s.file(&named);
                let written = std::fs::metadata(&file)
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        (m.uid(), m.gid())
                    })
                    .and_then(|owner| std::fs::write(&file, data).map(|()| owner));
                match written {
                    Ok((uid, gid)) => s.written.push((named, uid, gid)),
                    Err(e) => {
                        drop(s);
                        return refuse(Some(op), format!("cannot write {named}: {e}"));
                    }
                }
            }
        }
        "/snapshot/load" if s.configured => {
            drop(s);
            return refuse(
                Some(op),
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                    .into(),
            );
        }
        "/snapshot/load" => {
            let read = |named: String| {
                std::fs::read(s.file(&named)).map_err(|e| format!("cannot open {named}: {e}"))
            };
            let loaded = read(field("/snapshot_path"))
                .and_then(|state| Ok((state, read(field("/mem_backend/backend_path"))?)));
            match loaded {
                Ok(l) => s.loaded = Some(l),
                Err(e) => {
                    drop(s);
                    return refuse(Some(op), e);
                }
            }
            s.started = true;
            s.paused = body.as_ref().and_then(|b| b["resume_vm"].as_bool()) != Some(true);
        }
        "/logger" | "/metrics" | "/actions" => {}
        _ => s.configured = true,
    }
    let action = body
        .as_ref()
        .and_then(|b| b.get("action_type"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    match action.as_deref() {
        Some("InstanceStart") if s.started => {
            drop(s);
            return refuse(Some(op), "the microVM is already running".into());
        }
        Some("InstanceStart") if !s.boot_source => {
            drop(s);
            return refuse(
                Some(op),
                "Cannot start microvm without kernel configuration.".into(),
            );
        }
        Some("InstanceStart") => s.started = true,
        Some("SendCtrlAltDel") if !s.started => {
            drop(s);
            return refuse(Some(op), "the microVM is not running".into());
        }
        _ => {}
    }
    if path == "/metrics" && s.metrics {
        drop(s);
        return refuse(Some(op), "Metrics system already initialized".into());
    }
    match path.as_str() {
        "/boot-source" => s.boot_source = true,
        "/metrics" => s.metrics = true,
        _ => {}
    }
    s.calls.push(ApiCall { method, path, body });
    drop(s);
    reply(spec, Some(op), 204, None)
}

fn spec_for(dir: &Path) -> LaunchSpec {
    LaunchSpec {
        id: "0123456789abcdef".into(),
        name: "web".into(),
        kernel: "/k/vmlinux".into(),
        initrd: Some("/k/initrd.img".into()),
        cmdline: "console=ttyS0 root=/dev/vda".into(),
        vcpus: 2,
        memory_mib: 512,
        paths: VmPaths::new(dir, dir, "0123456789abcdef"),
        system_disk: VmPaths::new(dir, dir, "0123456789abcdef").system_disk,
        net: Some(("bgtap3".into(), "0a:b6:0a:00:00:02".into())),
        accel: super::super::Accel::Kvm,
        confine: None,
        shares: Vec::new(),
        incoming: false,
    }
}

#[test]
fn every_call_of_the_sequence_is_in_the_spec_and_valid() {
    let spec = Spec::load();
    let calls = Firecracker::configuration(&spec_for(Path::new("/s")));
    for call in &calls {
        let (op, _) = spec
            .operation(&call.method, &call.path)
            .unwrap_or_else(|| panic!("{} {} is not in the spec", call.method, call.path));
        spec.check_request(op, call.body.as_ref())
            .unwrap_or_else(|e| panic!("{} {}: {e}", call.method, call.path));
        assert!(spec.documents(op, 204), "{} answers 204", call.path);
    }
    let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/logger",
            "/metrics",
            "/machine-config",
            "/boot-source",
            "/drives/system",
            "/drives/work",
            "/network-interfaces/net0",
            "/vsock",
            "/entropy",
            "/serial",
            "/actions",
        ]
    );
    let body = |path: &str| {
        calls
            .iter()
            .find(|c| c.path == path)
            .and_then(|c| c.body.clone())
    };
    assert_eq!(
        body("/actions"),
        Some(json!({"action_type": "InstanceStart"}))
    );
    assert_eq!(
        body("/machine-config"),
        Some(json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false}))
    );
    let boot = body("/boot-source").expect("boot source");
    assert_eq!(boot["kernel_image_path"], "/k/vmlinux");
    assert_eq!(boot["initrd_path"], "/k/initrd.img");
    let system = body("/drives/system").expect("system drive");
    assert_eq!(system["is_root_device"], true);
    assert_eq!(
        system["path_on_host"],
        "/s/vms/0123456789abcdef/system.ext4"
    );
    assert_eq!(body("/drives/work").expect("work")["is_root_device"], false);
    assert_eq!(
        body("/vsock").expect("vsock")["uds_path"],
        "/s/vms/0123456789abcdef/agent.sock"
    );
    // Without an initramfs or a NIC, those fields and calls are left out.
    let mut bare = spec_for(Path::new("/s"));
    bare.initrd = None;
    bare.net = None;
    let calls = Firecracker::configuration(&bare);
    assert!(
        calls
            .iter()
            .all(|c| !c.path.starts_with("/network-interfaces"))
    );
    let boot = calls
        .iter()
        .find(|c| c.path == "/boot-source")
        .expect("boot");
    assert!(
        boot.body
            .as_ref()
            .is_some_and(|b| b.get("initrd_path").is_none())
    );
    // The command line carries only the socket and the id.
    let fc = Firecracker {
        binary: "firecracker".into(),
        jailer: None,
    };
    assert_eq!(
        fc.args(&spec_for(Path::new("/s"))),
        [
            "--api-sock",
            "/s/vms/0123456789abcdef/control.sock",
            "--id",
            "0123456789abcdef"
        ]
    );
}

#[test]
fn the_checker_refuses_what_firecracker_refuses() {
    let spec = Spec::load();
    let check = |path: &str, body: Value| {
        let (op, _) = spec.operation(&Method::PUT, path).expect("operation");
        spec.check_request(op, Some(&body))
    };
    for (path, body, words) in [
        ("/machine-config", json!({"vcpu_count": 2}), "mem_size_mib"),
        (
            "/machine-config",
            json!({"vcpu_count": 0, "mem_size_mib": 128}),
            "minimum",
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 33, "mem_size_mib": 128}),
            "maximum",
        ),
        (
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 128}),
            "integer",
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 128, "cpus": 1}),
            "unknown field",
        ),
        ("/actions", json!({"action_type": "Reboot"}), "not one of"),
        (
            "/drives/x",
            json!({"drive_id": "x", "is_root_device": "yes"}),
            "boolean",
        ),
        (
            "/vsock",
            json!({"guest_cid": 2, "uds_path": "/x"}),
            "minimum",
        ),
        (
            "/boot-source",
            json!({"boot_args": "x"}),
            "kernel_image_path",
        ),
    ] {
        let err = check(path, body.clone()).expect_err(&format!("{path} {body}"));
        assert!(err.contains(words), "{path} {body}: {err}");
    }
    assert!(spec.operation(&Method::PUT, "/nope").is_none());
    assert!(spec.operation(&Method::DELETE, "/drives/x").is_none());
    assert!(spec.operation(&Method::PATCH, "/drives/x").is_some());
}

#[tokio::test]
async fn the_driver_configures_and_stops_a_spec_server() {
    let server = SpecServer::start().await;
    let api = Api::new(&server.socket);
    assert_eq!(
        api.wait_ready(Duration::from_secs(5)).await.expect("ready"),
        "Not started"
    );
    let spec = spec_for(Path::new("/s"));
    let calls = Firecracker::configuration(&spec);
    api.configure(&calls)
        .await
        .expect("the spec server accepts the sequence");
    assert_eq!(
        server.seen().calls,
        calls,
        "refusals: {:?}",
        server.seen().refusals
    );
    assert!(server.seen().refusals.is_empty());
    assert_eq!(api.state().await.expect("state"), "Running");

    // Again: the sequence stops at the first refusal, which carries the
    // status and message; pre-boot configuration is refused while it runs.
    let err = api.configure(&calls).await.expect_err("metrics twice");
    assert!(
        err.message
            .contains("PUT /metrics (400): Metrics system already initialized"),
        "{}",
        err.message
    );
    let machine = calls
        .iter()
        .find(|c| c.path == "/machine-config")
        .expect("machine");
    let err = api.send(machine).await.expect_err("pre-boot only");
    assert!(err.message.contains("pre-boot only"), "{}", err.message);

    // Graceful stop: Ctrl-Alt-Del through the actions endpoint.
    let fc = Firecracker {
        binary: "firecracker".into(),
        jailer: None,
    };
    let mut paths = spec.paths.clone();
    paths.control_socket = server.socket.clone();
    fc.request_shutdown(&paths).await.expect("SendCtrlAltDel");
    let last = server.seen().calls.last().cloned().expect("a call");
    assert_eq!(last.body, Some(json!({"action_type": "SendCtrlAltDel"})));
}

#[tokio::test]
async fn a_refusal_stops_the_sequence_and_carries_the_fault_message() {
    let server = SpecServer::start().await;
    server.seen().fail = Some((
        "/drives/work".into(),
        "Unable to open the block device backing file".into(),
    ));
    let api = Api::new(&server.socket);
    let calls = Firecracker::configuration(&spec_for(Path::new("/s")));
    let err = api.configure(&calls).await.expect_err("refused");
    assert!(
        err.message
            .contains("firecracker refused PUT /drives/work (400): Unable to open the block device backing file"),
        "{}",
        err.message
    );
    let sent: Vec<String> = server.seen().calls.iter().map(|c| c.path.clone()).collect();
    assert_eq!(sent.last().map(String::as_str), Some("/drives/system"));
    assert!(!server.seen().started);
    // InstanceStart before any boot source is refused as the real one does.
    let fresh = SpecServer::start().await;
    let err = Api::new(&fresh.socket)
        .send(&ApiCall::put(
            "/actions",
            json!({"action_type": "InstanceStart"}),
        ))
        .await
        .expect_err("no kernel");
    assert!(
        err.message.contains("without kernel configuration"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn unreachable_apis_and_dead_processes_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Api::new(dir.path().join("none.sock"))
        .state()
        .await
        .expect_err("nothing listens");
    assert!(
        err.message.contains("cannot reach the firecracker API"),
        "{}",
        err.message
    );

    // A binary that exits at once: launch says so without waiting out
    // the API timeout, and leaves no process.
    let mut spec = spec_for(dir.path());
    spec.paths = VmPaths::new(dir.path(), dir.path(), "0123456789abcdef");
    std::fs::create_dir_all(&spec.paths.dir).expect("dir");
    std::fs::create_dir_all(&spec.paths.run).expect("run");
    let fc = Firecracker {
        binary: "/bin/false".into(),
        jailer: None,
    };
    let started = Instant::now();
    let err = fc
        .launch(&spec, &crate::supervise::Direct)
        .await
        .expect_err("exits");
    assert!(
        err.message.contains("firecracker exited at start"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        metrics_path(&spec.paths).exists(),
        "outputs are made before start"
    );
}

/// A stand-in for Firecracker's jailer (none is installed here): it does
/// to the file system what upstream's `docs/jailer.md` says the jailer
/// does (the chroot at `<chroot_base>/<exec_file_name>/<id>/root`, the
/// exec file copied in, the chroot handed to `uid:gid`) and binds the API
/// socket where the jailed Firecracker would (`--api-sock`, inside the
/// chroot, owned by the uid), relaying it to the spec server named in
/// `target`. It records its arguments in `argv.json`.
const FAKE_JAILER: &str = r#"#!/usr/bin/python3
import json, os, shutil, socket, sys, threading
here = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv[1:]
with open(os.path.join(here, "argv.json"), "w") as f:
    json.dump(argv, f)
ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
assert len(ours) % 2 == 0, ours
o = dict(zip(ours[0::2], ours[1::2]))
name = os.path.basename(o["--exec-file"])
assert "firecracker" in name, name
root = os.path.join(o["--chroot-base-dir"], name, o["--id"], "root")
os.makedirs(root, exist_ok=True)
shutil.copy(o["--exec-file"], os.path.join(root, name))
uid, gid = int(o["--uid"]), int(o["--gid"])
os.chown(root, uid, gid)
api = os.path.join(root, dict(zip(theirs[0::2], theirs[1::2]))["--api-sock"].lstrip("/"))
listener = socket.socket(socket.AF_UNIX)
listener.bind(api)
os.chown(api, uid, gid)
listener.listen(16)
target = open(os.path.join(here, "target")).read()

def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass

while True:
    conn, _ = listener.accept()
    up = socket.socket(socket.AF_UNIX)
    up.connect(target)
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    threading.Thread(target=pump, args=(up, conn), daemon=True).start()
"#;

#[tokio::test]
async fn a_jailed_firecracker_finds_its_files_in_the_chroot_and_is_reached_there() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const UID: u32 = crate::jail::VMM_GROUP + 7;
    let server = SpecServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).expect("tools");
    let jailer_bin = tools.join("jailer");
    std::fs::write(&jailer_bin, FAKE_JAILER).expect("jailer");
    std::fs::set_permissions(&jailer_bin, std::fs::Permissions::from_mode(0o755)).expect("mode");
    std::fs::write(tools.join("firecracker"), "not run").expect("firecracker");
    std::fs::write(
        tools.join("target"),
        server.socket.to_string_lossy().as_bytes(),
    )
    .expect("target");

    let mut spec = spec_for(dir.path());
    spec.paths = VmPaths::new(&dir.path().join("state"), &dir.path().join("run"), &spec.id);
    let p = spec.paths.clone();
    std::fs::create_dir_all(&p.dir).expect("vm dir");
    std::fs::create_dir_all(&p.run).expect("run dir");
    spec.kernel = dir.path().join("state/vmlinux");
    spec.initrd = Some(dir.path().join("state/initrd.img"));
    spec.system_disk = p.system_disk.clone();
    for file in [
        &spec.kernel,
        spec.initrd.as_ref().expect("initrd"),
        &p.system_disk,
        &p.work_disk,
    ] {
        std::fs::write(file, "data").expect("file");
    }
    spec.confine = Some(crate::Confine {
        helper: "/nonexistent/bangerd".into(),
        uid: UID,
    });
    let fc = Firecracker {
        binary: tools.join("firecracker"),
        jailer: Some(jailer_bin),
    };
    let layout = Layout::new(&p, &fc.binary);

    let (mut watched, id) = fc
        .launch(&spec, &crate::supervise::Direct)
        .await
        .expect("launched through the jailer");
    let argv: Vec<String> =
        serde_json::from_slice(&std::fs::read(tools.join("argv.json")).expect("argv"))
            .expect("json");
    assert_eq!(
        argv,
        jailer::args(&layout, &fc.binary, &spec.id, UID, crate::jail::VMM_GROUP)
    );
    let calls = server.seen().calls.clone();
    assert!(
        server.seen().refusals.is_empty(),
        "{:?}",
        server.seen().refusals
    );
    assert_eq!(
        calls,
        Firecracker::configuration_as(&spec, &Names::jailed(&spec))
    );
    // Every file the configuration names is in the chroot and is the VM's
    // own file.
    for (path, key, original) in [
        ("/boot-source", "kernel_image_path", spec.kernel.clone()),
        (
            "/boot-source",
            "initrd_path",
            spec.initrd.clone().expect("initrd"),
        ),
        ("/drives/system", "path_on_host", p.system_disk.clone()),
        ("/drives/work", "path_on_host", p.work_disk.clone()),
        ("/logger", "log_path", p.vmm_log.clone()),
        ("/serial", "serial_out_path", p.console_log.clone()),
    ] {
        let call = calls.iter().find(|c| c.path == path).expect(path);
        let named = call.body.as_ref().and_then(|b| b[key].as_str()).expect(key);
        assert!(
            named.starts_with('/') && !named[1..].contains('/'),
            "{named}"
        );
        let inside = std::fs::metadata(layout.host(named)).expect(named);
        let real = std::fs::metadata(&original).expect("original");
        assert_eq!(
            inside.ino(),
            real.ino(),
            "{named} is {}",
            original.display()
        );
    }
    // The agent and the API are reached in the chroot.
    assert_eq!(
        fc.agent(&p),
        AgentEndpoint::FirecrackerVsock {
            uds: layout.host(jailer::inside::VSOCK),
            port: banger_agent_proto::VSOCK_PORT,
        }
    );
    fc.request_shutdown(&p).await.expect("SendCtrlAltDel");
    let last = server.seen().calls.last().cloned().expect("a call");
    assert_eq!(last.body, Some(json!({"action_type": "SendCtrlAltDel"})));

    // A snapshot is written in the chroot by the VM's uid, into bangerd's
    // own files, which are root's again after.
    let host_file = dir.path().join("host-file");
    std::fs::write(&host_file, "the host's").expect("host file");
    std::os::unix::fs::symlink(&host_file, layout.host(jailer::inside::STATE))
        .expect("a link the VM user left");
    server.seen().root = Some(layout.root.clone());
    let (state, memory) = (p.dir.join("suspend.tmp"), p.dir.join("suspend.mem.tmp"));
    let fds = StateFds {
        state: state_file(&state),
        memory: Some(state_file(&memory)),
    };
    fc.save(&p, fds).await.expect("saved");
    assert_eq!(
        server.seen().written,
        [
            ("/snapshot.state".to_owned(), UID, crate::jail::VMM_GROUP),
            ("/snapshot.mem".to_owned(), UID, crate::jail::VMM_GROUP),
        ]
    );
    for file in [&state, &memory] {
        let m = std::fs::metadata(file).expect("meta");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 0, 0o600));
    }
    assert_eq!(
        std::fs::read_to_string(&memory).expect("memory"),
        "guest memory"
    );
    assert!(!layout.host(jailer::inside::STATE).exists());
    assert!(!layout.host(jailer::inside::MEMORY).exists());
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("host file"),
        "the host's",
        "the link was replaced, not followed"
    );

    // The chroot is the VM user's: a link it puts in its socket's place
    // (here to the spec server's, standing for any socket of the host's)
    // is not followed.
    let api = layout.host(jailer::inside::API);
    std::fs::remove_file(&api).expect("remove");
    std::os::unix::fs::symlink(&server.socket, &api).expect("symlink");
    let before = server.seen().calls.len();
    let err = fc.request_shutdown(&p).await.expect_err("a link");
    assert!(err.message.contains("not a socket"), "{}", err.message);
    assert_eq!(
        server.seen().calls.len(),
        before,
        "nothing reached the host's socket"
    );

    crate::kill_failed(&crate::supervise::Direct, &spec.id, &mut watched, id).await;
    jailer::release(&p).expect("released");
    assert!(!layout.base.exists());
    let disk = std::fs::metadata(&p.work_disk).expect("work disk");
    assert_eq!((disk.uid(), disk.gid()), (0, 0));

    // Loaded in a new jail: the same names, this VM's TAP, no socket
    // override (the vsock has the same name in every chroot).
    let fresh = SpecServer::start().await;
    std::fs::write(
        tools.join("target"),
        fresh.socket.to_string_lossy().as_bytes(),
    )
    .expect("target");
    let incoming = LaunchSpec {
        incoming: true,
        ..spec.clone()
    };
    let (mut watched, id) = fc
        .launch(&incoming, &crate::supervise::Direct)
        .await
        .expect("launched for a snapshot");
    fresh.seen().root = Some(layout.root.clone());
    fc.restore(&incoming, fds_of(&state, &memory))
        .await
        .expect("loaded");
    let load = assert_loaded(&fresh);
    assert_eq!(
        load.body,
        Some(json!({
            "snapshot_path": "/snapshot.state",
            "mem_backend": {"backend_type": "File", "backend_path": "/snapshot.mem"},
            "resume_vm": true,
            "network_overrides": [{"iface_id": "net0", "host_dev_name": "bgtap3"}],
        }))
    );
    let m = std::fs::metadata(&memory).expect("meta");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (0, crate::jail::VMM_GROUP, 0o640),
        "readable to every jailed VMM that loads it"
    );
    assert!(!layout.host(jailer::inside::MEMORY).exists());
    crate::kill_failed(&crate::supervise::Direct, &spec.id, &mut watched, id).await;
    jailer::release(&p).expect("released");
}

/// `server` loaded the saved files with no refusal; its last call.
fn assert_loaded(server: &SpecServer) -> ApiCall {
    let seen = server.seen();
    assert!(seen.refusals.is_empty(), "{:?}", seen.refusals);
    assert_eq!(
        seen.loaded,
        Some((b"device state".to_vec(), b"guest memory".to_vec()))
    );
    seen.calls.last().cloned().expect("load")
}

/// A new file, opened for reading and writing (as bangerd opens a
/// state's).
pub(super) fn state_file(path: &Path) -> std::os::fd::OwnedFd {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("state file")
        .into()
}

/// The snapshot API as the contract says: pause, create with both
/// files, resume; a fresh VMM with only its logger and metrics loads
/// the files with this VM's TAP and (unjailed) vsock socket; the files
/// are linked only for the request; a refusal leaves the guest running.
#[tokio::test]
async fn a_guest_is_saved_and_loaded_through_the_snapshot_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = SpecServer::start().await;
    let mut spec = spec_for(dir.path());
    std::fs::create_dir_all(&spec.paths.dir).expect("dir");
    spec.paths.control_socket = server.socket.clone();
    let p = spec.paths.clone();
    let fc = Firecracker {
        binary: "firecracker".into(),
        jailer: None,
    };
    assert!(fc.snapshots() && fc.memory_apart());
    assert!(!fc.portable_snapshots(), "unjailed, it names its own disks");
    let jailed = Firecracker {
        binary: "firecracker".into(),
        jailer: Some("jailer".into()),
    };
    assert!(jailed.portable_snapshots());
    let api = Api::new(&server.socket);
    api.configure(&Firecracker::configuration(&spec))
        .await
        .expect("booted");

    let (state, memory) = (p.dir.join("suspend.tmp"), p.dir.join("suspend.mem.tmp"));
    let fds = |state: &Path, memory: Option<&Path>| StateFds {
        state: state_file(state),
        memory: memory.map(state_file),
    };
    let saved = fc
        .save(&p, fds(&state, Some(&memory)))
        .await
        .expect("saved");
    assert_eq!(saved.accel, Accel::Kvm);
    assert!(
        server.seen().refusals.is_empty(),
        "{:?}",
        server.seen().refusals
    );
    let calls = server.seen().calls.clone();
    let n = calls.len();
    assert_eq!(calls[n - 2], ApiCall::vm_state("Paused"));
    let [s_named, m_named] = [
        p.dir.join("firecracker.state"),
        p.dir.join("firecracker.mem"),
    ]
    .map(|f| f.to_string_lossy().into_owned());
    assert_eq!(
        calls[n - 1],
        ApiCall::put(
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": s_named, "mem_file_path": m_named})
        )
    );
    assert_eq!(
        std::fs::read_to_string(&state).expect("state"),
        "device state"
    );
    assert_eq!(
        std::fs::read_to_string(&memory).expect("memory"),
        "guest memory"
    );
    assert!(!Path::new(&s_named).exists() && !Path::new(&m_named).exists());
    assert_eq!(api.state().await.expect("state"), "Paused");
    fc.resume(&p).await.expect("resumed");
    assert_eq!(api.state().await.expect("state"), "Running");

    // Refused, the guest runs on; without a memory file nothing is sent.
    server.seen().fail = Some(("/snapshot/create".into(), "No space left on device".into()));
    let e = fc
        .save(&p, fds(&p.dir.join("b.tmp"), Some(&p.dir.join("b.mem"))))
        .await
        .expect_err("refused");
    assert!(e.message.contains("No space left"), "{}", e.message);
    assert_eq!(api.state().await.expect("state"), "Running");
    assert!(!Path::new(&s_named).exists());
    let before = server.seen().calls.len();
    server.seen().fail = None;
    let e = fc
        .save(&p, fds(&p.dir.join("c.tmp"), None))
        .await
        .expect_err("no memory file");
    assert!(e.message.contains("memory"), "{}", e.message);
    assert_eq!(api.state().await.expect("state"), "Running");
    assert_eq!(server.seen().calls.len(), before + 2, "paused and resumed");
    assert!(fc.quit(&p).await.is_err(), "killed, not asked");

    // A fresh Firecracker for the saved guest.
    let fresh = SpecServer::start().await;
    let mut incoming = LaunchSpec {
        incoming: true,
        ..spec.clone()
    };
    incoming.paths.control_socket = fresh.socket.clone();
    incoming.net = Some(("bgtap9".into(), "0a:b6:0a:00:00:09".into()));
    let api = Api::new(&fresh.socket);
    let only = Firecracker::configuration(&incoming);
    let paths: Vec<&str> = only.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["/logger", "/metrics"]);
    api.configure(&only).await.expect("logger and metrics");
    assert!(fc.awaits_state(&incoming.paths).await);
    fc.restore(&incoming, fds_of(&state, &memory))
        .await
        .expect("loaded");
    let load = assert_loaded(&fresh);
    assert_eq!(
        load,
        ApiCall::put(
            "/snapshot/load",
            json!({
                "snapshot_path": s_named,
                "mem_backend": {"backend_type": "File", "backend_path": m_named},
                "resume_vm": true,
                "network_overrides": [{"iface_id": "net0", "host_dev_name": "bgtap9"}],
                "vsock_override": {"uds_path": p.agent_socket.to_string_lossy()},
            })
        )
    );
    assert_eq!(api.state().await.expect("state"), "Running");
    assert!(!fc.awaits_state(&incoming.paths).await);
    assert!(!Path::new(&s_named).exists() && !Path::new(&m_named).exists());

    // A VMM configured for a boot takes no snapshot.
    let booted = SpecServer::start().await;
    incoming.paths.control_socket = booted.socket.clone();
    Api::new(&booted.socket)
        .configure(&Firecracker::configuration(&spec)[..4])
        .await
        .expect("configured");
    let e = fc
        .restore(&incoming, fds_of(&state, &memory))
        .await
        .expect_err("refused");
    assert!(
        e.message.contains("could not load") && e.message.contains("boot-specific"),
        "{}",
        e.message
    );
    assert!(!Path::new(&s_named).exists());
}

/// The saved files, opened for reading.
fn fds_of(state: &Path, memory: &Path) -> StateFds {
    let open = |p: &Path| std::fs::File::open(p).expect("open").into();
    StateFds {
        state: open(state),
        memory: Some(open(memory)),
    }
}
