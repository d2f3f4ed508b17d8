//! The guard of `banger web` on a router of its own (no bus needed), the
//! state the pages get, and the create form's checks. The real server,
//! bus and browser are tested in `bangerd/tests/it/web.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::{get, post};
use tower::ServiceExt;
use zbus::{ObjectPath, OwnedVariant, Variant};

use super::routes::{CSRF_HEADER, CreateForm, guard};
use super::snapshot::snapshot;
use super::{Gate, Secrets};
use crate::client::Props;
use crate::live::{Interfaces, Model, Update};

fn gate_on(addr: &str) -> Gate {
    Gate {
        secrets: Secrets {
            token: "t0ken".into(),
            session: "s3ssion".into(),
            csrf: "csrf".into(),
        },
        addr: addr.parse().expect("addr"),
        hostname: "devbox".into(),
    }
}

fn gate() -> Arc<Gate> {
    Arc::new(gate_on("127.0.0.1:8123"))
}

#[test]
fn which_host_names_are_this_server() {
    let local = gate_on("127.0.0.1:8123");
    for ok in ["127.0.0.1:8123", "localhost:8123", "LOCALHOST:8123"] {
        assert!(local.allows_host(ok), "{ok}");
    }
    for bad in [
        "127.0.0.1:8124",
        "127.0.0.2:8123",
        "evil.example:8123",
        "devbox:8123",
        "127.0.0.1",
        "",
    ] {
        assert!(!local.allows_host(bad), "{bad}");
    }
    // Listening everywhere: any address literal, this host's name.
    let everywhere = gate_on("0.0.0.0:8123");
    for ok in [
        "192.168.1.5:8123",
        "[fe80::1]:8123",
        "devbox:8123",
        "devbox.local:8123",
        "localhost:8123",
    ] {
        assert!(everywhere.allows_host(ok), "{ok}");
    }
    for bad in [
        "evil.example:8123",
        "192.168.1.5:80",
        "devbox.evil.example:8123",
    ] {
        assert!(!everywhere.allows_host(bad), "{bad}");
    }
}

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "page" }))
        .route("/api/thing", post(|| async { "done" }))
        .layer(axum::middleware::from_fn_with_state(gate(), guard))
}

async fn call(request: Request<Body>) -> axum::response::Response {
    app().oneshot(request).await.expect("response")
}

fn get_req(uri: &str) -> axum::http::request::Builder {
    Request::get(uri).header(header::HOST, "127.0.0.1:8123")
}

fn post_req() -> axum::http::request::Builder {
    Request::post("/api/thing")
        .header(header::HOST, "127.0.0.1:8123")
        .header(header::COOKIE, "other=1; banger_web=s3ssion")
}

#[tokio::test]
async fn the_token_becomes_a_strict_http_only_cookie() {
    let response = call(get_req("/?token=t0ken").body(Body::empty()).expect("req")).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/");
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .expect("text");
    assert_eq!(
        cookie,
        "banger_web=s3ssion; HttpOnly; SameSite=Strict; Path=/"
    );

    let response = call(get_req("/?token=wrong").body(Body::empty()).expect("req")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_the_cookie_nothing_is_served() {
    let response = call(get_req("/").body(Body::empty()).expect("req")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = call(
        get_req("/")
            .header(header::COOKIE, "banger_web=s3ssioN")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = call(
        get_req("/")
            .header(header::COOKIE, "banger_web=s3ssion")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("text");
    assert!(csp.contains("default-src 'self'"), "{csp}");
}

#[tokio::test]
async fn another_host_name_is_refused() {
    // DNS rebinding: a page of evil.example whose name now points here.
    let response = call(
        Request::get("/?token=t0ken")
            .header(header::HOST, "evil.example:8123")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = call(
        Request::get("/")
            .header(header::HOST, "localhost:8123")
            .header(header::COOKIE, "banger_web=s3ssion")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_post_needs_the_csrf_header_and_its_own_origin() {
    let response = call(post_req().body(Body::empty()).expect("req")).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "no CSRF header");
    let response = call(
        post_req()
            .header(CSRF_HEADER, "nope")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "wrong CSRF header"
    );
    let response = call(
        post_req()
            .header(CSRF_HEADER, "csrf")
            .header(header::ORIGIN, "http://evil.example")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "another origin");
    let response = call(
        post_req()
            .header(CSRF_HEADER, "csrf")
            .header(header::ORIGIN, "http://127.0.0.1:8123")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

fn v<'a>(value: impl Into<Variant<'a>>) -> OwnedVariant {
    OwnedVariant::try_from(value.into()).expect("owned")
}

fn vm(name: &str, owner: u32) -> (String, Interfaces) {
    let props: Props = HashMap::from([
        ("Id".to_owned(), v(name)),
        ("Name".to_owned(), v(name)),
        ("State".to_owned(), v("running")),
        ("OwnerUID".to_owned(), v(owner)),
        (
            "Image".to_owned(),
            v(ObjectPath::try_from("/org/banger/Manager/image/x").expect("path")),
        ),
    ]);
    (
        format!("/org/banger/Manager/vm/{name}"),
        Interfaces::from([(banger_dbus::VM_INTERFACE.to_owned(), props)]),
    )
}

#[test]
fn pages_see_their_users_vms_and_root_sees_all() {
    let mut model = Model::default();
    model.apply(
        Update::Loaded(vec![vm("mine", 1000), vm("theirs", 1001)]),
        Instant::now(),
    );
    let names = |me| -> Vec<String> {
        snapshot(&model, me, Instant::now())["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(names(1000), ["mine"]);
    assert_eq!(names(0), ["mine", "theirs"]);
    let state = snapshot(&model, 1000, Instant::now());
    assert_eq!(state["connected"], true);
    assert_eq!(state["vms"][0]["cpu_percent"], serde_json::Value::Null);
}

#[test]
fn the_create_form_is_checked() {
    let form = |json: &str| -> CreateForm { serde_json::from_str(json).expect("form") };
    let options =
        form(r#"{"name":"dev","image":"aa11","vcpus":2,"memory_mib":1024,"disk":"8G","nat":true}"#)
            .options("ssh-ed25519 AAAA me".into())
            .expect("valid");
    assert_eq!(options.vcpus, Some(2));
    assert_eq!(options.disk_bytes, Some(8 << 30));
    assert_eq!(options.nat, Some(true));
    assert_eq!(options.ssh_keys, ["ssh-ed25519 AAAA me"]);
    let defaults = form("{}").options(String::new()).expect("valid");
    assert_eq!(
        (defaults.vcpus, defaults.disk_bytes, defaults.nat),
        (None, None, None)
    );
    for bad in [
        r#"{"disk":"lots"}"#,
        r#"{"vcpus":0}"#,
        r#"{"image":"../etc"}"#,
    ] {
        assert!(form(bad).options(String::new()).is_err(), "{bad}");
    }
}
