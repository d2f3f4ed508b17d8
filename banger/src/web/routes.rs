//! The HTTP side of `banger web`: the guard every request passes (Host,
//! token or cookie, and for a POST the Origin and the CSRF header), the
//! pages (one small HTML shell each; `app.js` draws them), the event
//! stream, and the actions.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;

use super::snapshot::{snapshot, visible};
use super::{Gate, Shared};
use crate::client::{Interaction, VmJob};
use crate::exit::{Failure, Kind};

/// The session cookie.
const COOKIE: &str = "banger_web";
/// The header every POST carries the CSRF token in.
pub const CSRF_HEADER: &str = "x-banger-csrf";
/// Changes closer together than this go to the page as one.
const THROTTLE: Duration = Duration::from_millis(100);

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|s| page(s, "dashboard", String::new())))
        .route("/create", get(|s| page(s, "create", String::new())))
        .route("/images", get(|s| page(s, "images", String::new())))
        .route("/kernels", get(|s| page(s, "kernels", String::new())))
        .route("/jobs", get(|s| page(s, "jobs", String::new())))
        .route("/vm/{id}", get(vm_page))
        .route("/job/{id}", get(job_page))
        .route("/assets/app.js", get(|| asset(APP_JS, "text/javascript")))
        .route("/assets/style.css", get(|| asset(STYLE_CSS, "text/css")))
        .route("/api/events", get(events))
        .route("/api/vm/{id}/console", get(console))
        .route("/api/available/{kind}", get(available))
        .route("/api/vm/{id}/{action}", post(vm_action))
        .route("/api/create", post(create))
        .route("/api/image/{id}/delete", post(delete_image))
        .route("/api/kernel/{id}/delete", post(delete_kernel))
        .route("/api/pull", post(pull))
        .route("/api/job/{id}/cancel", post(cancel))
        .layer(middleware::from_fn_with_state(shared.gate.clone(), guard))
        .with_state(shared)
}

/// Compare secrets in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>banger web</title>\
         <p>{message}</p>"
    );
    (status, Html(body)).into_response()
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

fn query_token(uri: &axum::http::Uri) -> Option<String> {
    let Query(mut query) =
        Query::<std::collections::HashMap<String, String>>::try_from_uri(uri).ok()?;
    query.remove("token")
}

/// Who may ask what; see the module documentation.
pub async fn guard(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| gate.allows_host(h))
        .map(str::to_owned)
    else {
        return refuse(StatusCode::FORBIDDEN, "unexpected Host header");
    };
    if let Some(token) = query_token(req.uri()) {
        if !same(&token, &gate.secrets.token) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this link is not valid: use the one banger web printed",
            );
        }
        // The token becomes a cookie; the address bar loses it.
        let cookie = format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
            gate.secrets.session
        );
        return Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, req.uri().path())
            .header(header::SET_COOKIE, cookie)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if !cookie_value(req.headers()).is_some_and(|c| same(c, &gate.secrets.session)) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "not signed in: open the link banger web printed",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if origin.is_some_and(|o| o != format!("http://{host}")) {
            return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        let csrf = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !csrf.is_some_and(|c| same(c, &gate.secrets.csrf)) {
            return refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
        }
    }
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Ids in URLs are the daemon's: letters, digits, `-` and `_`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn page(State(shared): State<Arc<Shared>>, page: &str, id: String) -> Response {
    let title = match page {
        "dashboard" => "VMs",
        "create" => "create a VM",
        "images" => "images",
        "kernels" => "kernels",
        "jobs" => "jobs",
        "vm" => "VM",
        _ => "job",
    };
    let nav = [
        ("/", "VMs"),
        ("/create", "Create"),
        ("/images", "Images"),
        ("/kernels", "Kernels"),
        ("/jobs", "Jobs"),
    ]
    .iter()
    .map(|(href, text)| format!("<a href=\"{href}\">{text}</a>"))
    .collect::<String>();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"csrf\" content=\"{csrf}\">\
         <title>banger · {title}</title>\
         <link rel=\"stylesheet\" href=\"/assets/style.css\"></head>\
         <body data-page=\"{page}\" data-id=\"{id}\">\
         <header><strong>banger</strong><nav>{nav}</nav><span id=\"daemon\">connecting…</span></header>\
         <main id=\"main\"><p class=\"muted\">loading…</p></main>\
         <script src=\"/assets/app.js\" defer></script></body></html>",
        csrf = shared.gate.secrets.csrf,
    );
    let mut response = Html(html).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn vm_page(state: State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if !valid_id(&id) {
        return refuse(StatusCode::NOT_FOUND, "no such VM");
    }
    page(state, "vm", id).await
}

async fn job_page(state: State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if !id.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() || id.len() > 20 {
        return refuse(StatusCode::NOT_FOUND, "no such job");
    }
    page(state, "job", id).await
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Counts an open event stream while it lives.
struct Viewer(Arc<Shared>);

impl Viewer {
    fn new(shared: Arc<Shared>) -> Self {
        shared.viewers.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The page's state now, then after every change.
async fn events(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = shared.changed.subscribe();
    let viewer = Viewer::new(shared);
    let stream = futures_util::stream::unfold(
        (changes, viewer, true),
        |(mut changes, viewer, first)| async move {
            if !first {
                changes.changed().await.ok()?;
                tokio::time::sleep(THROTTLE).await;
            }
            changes.borrow_and_update();
            let shared = &viewer.0;
            let state = {
                let model = shared.model.lock().unwrap_or_else(|e| e.into_inner());
                snapshot(&model, shared.me, Instant::now())
            };
            let event = Event::default().event("state").data(state.to_string());
            Some((Ok(event), (changes, viewer, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A failure as the pages show it.
fn failed(f: &Failure) -> Response {
    let status = match f.kind() {
        Kind::Permission => StatusCode::FORBIDDEN,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::InvalidArgument => StatusCode::BAD_REQUEST,
        Kind::Busy => StatusCode::CONFLICT,
        Kind::Limit => StatusCode::TOO_MANY_REQUESTS,
        Kind::Unavailable | Kind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        axum::Json(json!({"error": f.name(), "message": f.message()})),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    failed(&Failure::new(Kind::NotFound, format!("no such {what}")))
}

/// The object path of the caller's VM `id`.
fn vm_path(shared: &Shared, id: &str) -> Option<String> {
    let model = shared.model.lock().unwrap_or_else(|e| e.into_inner());
    model
        .vms()
        .into_iter()
        .find(|v| v.id == id && visible(v, shared.me))
        .map(|v| v.path)
}

fn started(job: &zbus::OwnedObjectPath) -> Response {
    axum::Json(json!({"job": crate::progress::job_label(job.as_str())})).into_response()
}

#[derive(Deserialize)]
struct Offset {
    #[serde(default)]
    offset: u64,
}

async fn console(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(Offset { offset }): Query<Offset>,
) -> Response {
    let Some(path) = vm_path(&shared, &id) else {
        return not_found("VM");
    };
    match shared.client.vm_console_log(&path, offset).await {
        Ok((data, next)) => axum::Json(json!({
            "text": crate::output::printable(&data),
            "next": next,
        }))
        .into_response(),
        Err(f) => failed(&f),
    }
}

async fn available(State(shared): State<Arc<Shared>>, Path(kind): Path<String>) -> Response {
    if kind != "images" && kind != "kernels" {
        return not_found("catalog");
    }
    match shared.client.available(&kind).await {
        Ok((_, _, entries)) => axum::Json(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "name": e.name,
                        "version": e.version,
                        "description": e.description,
                        "size": e.size,
                        "installed": e.installed,
                        "usable": e.usable,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(f) => failed(&f),
    }
}

async fn vm_action(
    State(shared): State<Arc<Shared>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let job = match action.as_str() {
        "start" => VmJob::Start,
        "stop" => VmJob::Stop,
        "restart" => VmJob::Restart,
        "delete" => VmJob::Delete,
        _ => return not_found("action"),
    };
    let Some(path) = vm_path(&shared, &id) else {
        return not_found("VM");
    };
    match shared.client.vm_job(&path, job, Interaction::Allowed).await {
        Ok(job) => started(&job),
        Err(f) => failed(&f),
    }
}

/// The create form.
#[derive(Debug, Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    pub name: String,
    /// An image id; empty for the default.
    #[serde(default)]
    pub image: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// A size such as `8G`; empty for the default.
    #[serde(default)]
    pub disk: String,
    #[serde(default)]
    pub nat: bool,
}

impl CreateForm {
    /// The create's options, or why the form is wrong.
    pub fn options(&self, public_key: String) -> Result<banger_dbus::options::CreateVm, Failure> {
        let disk_bytes = match self.disk.trim() {
            "" => None,
            text => Some(crate::vm::parse_size(text)?),
        };
        if self.vcpus == Some(0) || self.memory_mib == Some(0) {
            return Err(Failure::new(
                Kind::InvalidArgument,
                "vCPUs and memory must be above 0",
            ));
        }
        if !self.image.is_empty() && !valid_id(&self.image) {
            return Err(Failure::new(Kind::InvalidArgument, "no such image"));
        }
        Ok(banger_dbus::options::CreateVm {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_bytes,
            nat: self.nat.then_some(true),
            ssh_keys: vec![public_key],
            ..Default::default()
        })
    }
}

async fn create(
    State(shared): State<Arc<Shared>>,
    axum::Json(form): axum::Json<CreateForm>,
) -> Response {
    let result = async {
        let (_, public) = crate::vm::ssh_key()?;
        let options = form.options(public)?;
        let name = match form.name.trim() {
            "" => {
                let model = shared.model.lock().unwrap_or_else(|e| e.into_inner());
                let vms = model.vms();
                let taken: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
                crate::names::random(&taken)
            }
            name => name.to_owned(),
        };
        let (_, job) = shared
            .client
            .create_vm(&name, &form.image, &options, Interaction::Allowed)
            .await?;
        Ok::<_, Failure>((name, job))
    }
    .await;
    match result {
        Ok((name, job)) => axum::Json(json!({
            "job": crate::progress::job_label(job.as_str()),
            "name": name,
        }))
        .into_response(),
        Err(f) => failed(&f),
    }
}

async fn delete_image(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if !valid_id(&id) {
        return not_found("image");
    }
    match shared.client.delete_image(&id, Interaction::Allowed).await {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(f) => failed(&f),
    }
}

async fn delete_kernel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if !valid_id(&id) {
        return not_found("kernel");
    }
    match shared.client.delete_kernel(&id, Interaction::Allowed).await {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(f) => failed(&f),
    }
}

#[derive(Deserialize)]
struct PullForm {
    kind: String,
    name: String,
}

async fn pull(
    State(shared): State<Arc<Shared>>,
    axum::Json(form): axum::Json<PullForm>,
) -> Response {
    let image = match form.kind.as_str() {
        "image" => true,
        "kernel" => false,
        _ => return not_found("catalog"),
    };
    match shared
        .client
        .pull(image, &form.name, Interaction::Allowed)
        .await
    {
        Ok(job) => started(&job),
        Err(f) => failed(&f),
    }
}

async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Ok(n) = id.parse::<u64>() else {
        return not_found("job");
    };
    let path = banger_dbus::job_path(n);
    match shared.client.cancel(&path, Interaction::Allowed).await {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(f) => failed(&f),
    }
}
