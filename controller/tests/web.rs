//! The web console and `/metrics` against a real `vmhad` process (fake
//! drivers): HTTPS with the self-signed certificate on port 9010 of the
//! node's address (no `[web]` section), login only after `vmctl
//! web-password`, failed logins rate-limited, CSRF on actions, live updates
//! over server-sent events, the documented metric series.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use vmha_controller::control::{Client, Request};
use vmha_fs::key::ClusterKey;
use vmha_test_infra::ports::free_cluster_port;

mod common;
use common::vmhad::{call, NodeConfig, Vmhad};

/// A loopback address of its own per test (127.X.Y.1), so that port 9010
/// is free for it.
fn own_address(salt: u8) -> String {
    let pid = std::process::id();
    format!("127.{}.{}.1", 100 + (pid % 100), salt)
}

fn write_config(dir: &Path, address: &str, web: &str) -> PathBuf {
    let key = dir.join("cluster.key");
    if !key.exists() {
        ClusterKey::generate_file(&key).unwrap();
    }
    NodeConfig {
        addresses: [address, "127.0.0.2"],
        sections: web,
        ..NodeConfig::new("web", dir, &key, free_cluster_port())
    }
    .write()
}

fn start_vmhad(dir: &Path, address: &str, web: &str) -> Vmhad {
    let cfg = write_config(dir, address, web);
    let guard = Vmhad::spawn(&cfg, "node1", &[]);
    let socket = dir.join("vmhad.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !call(&socket, &Request::Status).is_some_and(|r| r.ok) {
        assert!(Instant::now() < deadline, "vmhad did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

fn vmctl() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vmhad"))
        .parent()
        .unwrap()
        .join("vmctl")
}

fn set_password(vmhad: &Vmhad, password: &str) {
    use std::io::Write;
    let mut child = Command::new(vmctl())
        .args([
            "--config",
            vmhad.config().to_str().unwrap(),
            "web-password",
            "--stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "vmctl web-password failed");
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn base(address: &str) -> String {
    format!("https://{address}:9010")
}

/// Waits until the console answers (it starts right after the socket).
async fn wait_console(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if client.get(format!("{url}/login")).send().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "the console did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs in; returns the cookie header value, or the status on failure.
async fn login(client: &reqwest::Client, url: &str, password: &str) -> Result<String, StatusCode> {
    let r = client
        .post(format!("{url}/login"))
        .form(&[("password", password)])
        .send()
        .await
        .unwrap();
    if r.status() != StatusCode::SEE_OTHER {
        return Err(r.status());
    }
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    Ok(cookie.split(';').next().unwrap().to_string())
}

async fn status_json(client: &reqwest::Client, url: &str, cookie: &str) -> serde_json::Value {
    client
        .get(format!("{url}/api/status"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn local_state(view: &serde_json::Value) -> String {
    view["local"]["modules"][0]["nodes"]["node1"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn anonymous_sees_only_the_login_form_and_login_needs_web_password() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(1);
    let vmhad = start_vmhad(dir.path(), &address, "");
    let client = http();
    let url = base(&address);
    wait_console(&client, &url).await;

    let r = client.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/login");
    let r = client.get(format!("{url}/login")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let page = r.text().await.unwrap();
    assert!(page.contains("type=\"password\""), "{page}");
    for secret in ["vm1", "node1", "swap", "prim"] {
        assert!(!page.contains(secret), "the login page shows `{secret}`");
    }
    for path in ["/api/status", "/api/events", "/api/log?module=vm1"] {
        let r = client.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }

    // No password set yet: nothing logs in.
    assert_eq!(
        login(&client, &url, "").await,
        Err(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        login(&client, &url, "admin").await,
        Err(StatusCode::UNAUTHORIZED)
    );

    set_password(&vmhad, "correct horse");
    let cookie = login(&client, &url, "correct horse").await.unwrap();
    let r = client
        .get(format!("{url}/"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("/static/app.js"));
    let view = status_json(&client, &url, &cookie).await;
    assert_eq!(view["local"]["modules"][0]["name"], "vm1");
    assert_eq!(view["user"], "admin");
    let mode = std::fs::metadata(dir.path().join("state/web-password"))
        .unwrap()
        .permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600);
}

#[tokio::test]
async fn wrong_passwords_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(2);
    let vmhad = start_vmhad(dir.path(), &address, "");
    set_password(&vmhad, "right");
    let client = http();
    let url = base(&address);
    wait_console(&client, &url).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(login(&client, &url, "wrong").await.unwrap_err());
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // Even the right password waits out the back-off.
    assert_eq!(
        login(&client, &url, "right").await,
        Err(StatusCode::TOO_MANY_REQUESTS)
    );
    let log = std::fs::read_to_string(dir.path().join("vmhad.log")).unwrap();
    assert!(log.contains("wrong password"), "{log}");
}

#[tokio::test]
async fn actions_need_the_csrf_token_and_are_logged_with_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(3);
    let vmhad = start_vmhad(dir.path(), &address, "");
    set_password(&vmhad, "pw");
    let client = http();
    let url = base(&address);
    wait_console(&client, &url).await;
    let cookie = login(&client, &url, "pw").await.unwrap();
    let view = status_json(&client, &url, &cookie).await;
    assert_ne!(local_state(&view), "STOP");
    let csrf = view["csrf"].as_str().unwrap().to_string();
    let body = serde_json::json!({"action": "stop", "module": "vm1"});

    for token in [None, Some("0000")] {
        let mut req = client
            .post(format!("{url}/api/action"))
            .header(COOKIE, &cookie)
            .json(&body);
        if let Some(t) = token {
            req = req.header("X-CSRF-Token", t);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::FORBIDDEN);
    }
    assert_ne!(
        local_state(&status_json(&client, &url, &cookie).await),
        "STOP"
    );

    // prim needs the module's name typed.
    let r = client
        .post(format!("{url}/api/action"))
        .header(COOKIE, &cookie)
        .header("X-CSRF-Token", &csrf)
        .json(&serde_json::json!({"action": "prim", "module": "vm1", "confirm": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let r = client
        .post(format!("{url}/api/action"))
        .header(COOKIE, &cookie)
        .header("X-CSRF-Token", &csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        local_state(&status_json(&client, &url, &cookie).await),
        "STOP"
    );
    let log = std::fs::read_to_string(dir.path().join("state/vm1/events.log")).unwrap();
    assert!(log.contains("web:admin from 127."), "{log}");
    assert!(log.contains("WAIT -> STOP: stop requested"), "{log}");
}

#[tokio::test]
async fn metrics_have_the_documented_series() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(4);
    let _vmhad = start_vmhad(dir.path(), &address, "");
    let client = http();
    let url = base(&address);
    wait_console(&client, &url).await;
    let r = client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for series in [
        "vmha_module_role{module=\"vm1\",node=\"node1\",role=\"WAIT\"} 1",
        "vmha_module_role{module=\"vm1\",node=\"node1\",role=\"PRIM\"} 0",
        "vmha_module_ready{module=\"vm1\",node=\"node1\"} 0",
        "vmha_node_reachable{module=\"vm1\",node=\"node2\"} 0",
        "vmha_module_connected{module=\"vm1\",node=\"node1\"} 0",
        "vmha_peer_outofsync_bytes{module=\"vm1\",node=\"node1\"} 0",
        "vmha_resync_rate_bytes_per_second{module=\"vm1\",node=\"node1\"} 0",
        "vmha_module_failovers_total{module=\"vm1\",node=\"node1\"} 0",
        "vmha_module_split_brains_total{module=\"vm1\",node=\"node1\"} 0",
        "vmha_module_checker_failures_total{module=\"vm1\",node=\"node1\"} 0",
        "vmha_peer_heartbeat_up{node=\"node2\",address=\"127.0.0.2\"} 0",
        // vmha-fs's own series (values only where a writer runs).
        "# TYPE vmha_replicated_bytes counter",
        "# TYPE vmha_replicated_ops counter",
        "# TYPE vmha_write_latency_seconds histogram",
        "# TYPE vmha_fsync_latency_seconds histogram",
        "# TYPE vmha_activity_log_writes counter",
        "# TYPE vmha_dirty_bytes gauge",
    ] {
        assert!(text.contains(series), "missing `{series}` in\n{text}");
    }
    for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not in the README"
        );
    }

    // metrics_auth: a login (here basic auth) is required.
    drop(_vmhad);
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let web = format!("[web]\nlisten = [\"127.0.0.1:{port}\"]\nmetrics_auth = true\n");
    let vmhad = start_vmhad(dir.path(), &own_address(5), &web);
    set_password(&vmhad, "pw");
    let url = format!("https://127.0.0.1:{port}");
    wait_console(&client, &url).await;
    let r = client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .get(format!("{url}/metrics"))
        .basic_auth("admin", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("vmha_module_role{"));
}

#[tokio::test]
async fn event_stream_sends_an_update_when_a_module_changes_state() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(6);
    let vmhad = start_vmhad(dir.path(), &address, "");
    set_password(&vmhad, "pw");
    let client = http();
    let url = base(&address);
    wait_console(&client, &url).await;
    let cookie = login(&client, &url, "pw").await.unwrap();
    let mut events = client
        .get(format!("{url}/api/events"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        seen.push_str(&String::from_utf8_lossy(
            &events.chunk().await.unwrap().unwrap(),
        ));
    }
    assert!(seen.starts_with("event: status"), "{seen}");
    assert!(!seen.contains("\"STOP\""), "{seen}");
    // Stopped from the shell: the page learns it without asking.
    let mut c = Client::connect(&dir.path().join("vmhad.sock")).unwrap();
    assert!(c.call(&Request::Stop { module: None }).unwrap().ok);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut after = String::new();
    while !after.contains("\"state\":\"STOP\"") {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .expect("no update within 10 s")
            .unwrap()
            .unwrap();
        after.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_self_signed_certificate_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let address = own_address(7);
    let client = http();
    let url = base(&address);
    let cert = dir.path().join("state/web/cert.pem");
    let key = dir.path().join("state/web/key.pem");
    let first = {
        let _vmhad = start_vmhad(dir.path(), &address, "");
        wait_console(&client, &url).await;
        std::fs::read_to_string(&cert).unwrap()
    };
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(first.contains("BEGIN CERTIFICATE"));
    let _vmhad = start_vmhad(dir.path(), &address, "");
    wait_console(&client, &url).await;
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), first);
}
