//! The console and vmctl for both nodes (issue 13 items 2, 3, 4, 6), against
//! two real `vmhad` processes (fake drivers) on their own loopback
//! addresses: node1's console shows node2's own status (from node2's vmhad
//! over the daemon channel), runs an action on node2 that lands in both
//! event logs with the user, shows node2 as last known with its age once
//! it is gone; `vmctl status --all` and `vmctl report` cover both nodes, and
//! the report carries no key material.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;
use vmha_controller::control::{Client, Request};
use vmha_fs::key::ClusterKey;
use vmha_test_infra::ports::free_cluster_port;

mod common;
use common::vmhad::{NodeConfig, Vmhad};

/// Loopback addresses of their own per test (127.X.Y.1 and .2), so that
/// port 9010 is free on both.
fn own_addresses(salt: u8) -> (String, String) {
    let pid = std::process::id();
    let net = format!("127.{}.{}", 100 + (pid % 100), 200 + salt);
    (format!("{net}.1"), format!("{net}.2"))
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// Fields drop in order: both vmhad stop (and write their last event-log
// line) before their directory goes.
struct Pair {
    key_file: PathBuf,
    a1: String,
    /// node1's configuration, state and socket.
    dir1: PathBuf,
    n1: Vmhad,
    n2: Option<Vmhad>,
    _tmp: tempfile::TempDir,
}

fn config(dir: &Path, key: &Path, a1: &str, a2: &str, hb: u16, channel: u16) -> PathBuf {
    NodeConfig {
        channel_port: Some(channel),
        addresses: [a1, a2],
        ..NodeConfig::new("webpeer", dir, key, hb)
    }
    .write()
}

fn local(dir: &Path, request: &Request) -> Option<vmha_controller::control::Response> {
    Client::connect(&dir.join("vmhad.sock"))
        .ok()?
        .call(request)
        .ok()
}

fn wait(what: &str, pair: &Pair, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nnode1:\n{}\nnode2:\n{}",
            pair.n1.log(),
            pair.n2.as_ref().map(Vmhad::log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pair {
    fn start(salt: u8) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let key_file = tmp.path().join("cluster.key");
        ClusterKey::generate_file(&key_file).unwrap();
        let (a1, a2) = own_addresses(salt);
        let (hb, channel) = (free_cluster_port(), free_tcp_port());
        let dir1 = tmp.path().join("node1");
        let c1 = config(&dir1, &key_file, &a1, &a2, hb, channel);
        let c2 = config(&tmp.path().join("node2"), &key_file, &a1, &a2, hb, channel);
        let n1 = Vmhad::spawn(&c1, "node1", &[]);
        let n2 = Vmhad::spawn(&c2, "node2", &[]);
        let pair = Pair {
            _tmp: tmp,
            key_file,
            a1,
            dir1,
            n1,
            n2: Some(n2),
        };
        wait("both daemons answer", &pair, || {
            local(&pair.dir1, &Request::Status).is_some()
                && local(&pair.dir2(), &Request::Status).is_some()
        });
        pair
    }

    fn dir2(&self) -> PathBuf {
        self.dir1.with_file_name("node2")
    }

    fn vmctl(&self, node_dir: &Path, args: &[&str]) -> std::process::Output {
        let exe = Path::new(env!("CARGO_BIN_EXE_vmhad"))
            .parent()
            .unwrap()
            .join("vmctl");
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(node_dir.join("vmha.toml"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if args.contains(&"--stdin") {
            use std::io::Write;
            writeln!(child.stdin.take().unwrap(), "pw-of-node1").unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Sets node1's console password and logs in: the client and cookie.
    async fn login(&self) -> (reqwest::Client, String, String) {
        let out = self.vmctl(&self.dir1, &["web-password", "--stdin"]);
        assert!(out.status.success(), "{out:?}");
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let url = format!("https://{}:9010", self.a1);
        let deadline = Instant::now() + Duration::from_secs(20);
        let r = loop {
            match client
                .post(format!("{url}/login"))
                .form(&[("password", "pw-of-node1")])
                .send()
                .await
            {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "console not up: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_string();
        (client, url, cookie)
    }
}

async fn status(client: &reqwest::Client, url: &str, cookie: &str) -> Value {
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

async fn wait_view(
    what: &str,
    client: &reqwest::Client,
    url: &str,
    cookie: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = status(client, url, cookie).await;
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_of(dir: &Path) -> Vec<String> {
    local(dir, &Request::Log { module: None })
        .map(|r| r.lines)
        .unwrap_or_default()
}

/// node1's console shows node2's own status, runs `maintenance-on` there
/// (node2's module state changes, both event logs name the user), merges
/// both logs by time; `vmctl status --all` shows node2's own view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_the_peers_own_status_and_acts_there() {
    let pair = Pair::start(1);
    let (client, url, cookie) = pair.login().await;
    let v = wait_view("node2's own status", &client, &url, &cookie, |v| {
        v["peer"]["node"] == "node2" && v["peer_link"]["reachable"] == true
    })
    .await;
    assert_eq!(v["peer_link"]["node"], "node2");
    // It is node2's own answer: its software line, its own node field.
    let own = local(&pair.dir2(), &Request::Status)
        .unwrap()
        .status
        .unwrap();
    assert_eq!(v["peer"]["node"], own.node.as_str());
    assert!(v["peer"]["modules"][0]["nodes"]["node2"]["state"].is_string());
    assert_eq!(
        v["peer"]["modules"][0]["nodes"]["node2"]["maintenance"],
        false
    );

    let csrf = v["csrf"].as_str().unwrap().to_string();
    let r = client
        .post(format!("{url}/api/action"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .json(&serde_json::json!({"action": "maintenance-on", "module": "vm1", "node": "node2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["ok"], true, "{a:#}");
    // Ran on node2: node2's own status says so, and the console shows it.
    let own = local(&pair.dir2(), &Request::Status)
        .unwrap()
        .status
        .unwrap();
    assert!(own.modules[0].nodes["node2"].maintenance, "{own:?}");
    wait_view(
        "node2 in maintenance on the page",
        &client,
        &url,
        &cookie,
        |v| v["peer"]["modules"][0]["nodes"]["node2"]["maintenance"] == true,
    )
    .await;
    // Both event logs name the user and the node.
    let theirs = log_of(&pair.dir2());
    assert!(
        theirs.iter().any(|l| l.contains("web:admin")
            && l.contains("node1's console")
            && l.contains("maintenance")),
        "node2's log: {theirs:#?}"
    );
    let ours = log_of(&pair.dir1);
    assert!(
        ours.iter().any(|l| l.contains("web:admin")
            && l.contains("on node2")
            && l.contains("maintenance")),
        "node1's log: {ours:#?}"
    );
    // The log view merges both nodes by time.
    let lines: Vec<String> = client
        .get(format!("{url}/api/log?module=vm1"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(lines.iter().any(|l| l.starts_with("node1 | ")));
    assert!(lines.iter().any(|l| l.starts_with("node2 | ")));
    let stamps: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split(" | ").nth(1)?.split_whitespace().next())
        .collect();
    let mut sorted = stamps.clone();
    sorted.sort_unstable();
    assert_eq!(stamps, sorted, "merged by time");

    // vmctl status --all: node2's own view, said so; --json adds peer_status.
    let out = pair.vmctl(&pair.dir1, &["status", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("node2 (its own view"), "{text}");
    let out = pair.vmctl(&pair.dir1, &["status", "--all", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["node"], "node1");
    assert_eq!(json["peer_status"]["node"], "node2");
    let plain: Value =
        serde_json::from_slice(&pair.vmctl(&pair.dir1, &["status", "--json"]).stdout).unwrap();
    assert!(plain.get("peer_status").is_none() && plain["node"] == "node1");
}

/// Once node2's vmhad is gone, the page keeps its last known status, marked
/// unreachable, with an age that grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_shown_as_last_known_with_its_age() {
    let mut pair = Pair::start(2);
    let (client, url, cookie) = pair.login().await;
    wait_view("node2's own status", &client, &url, &cookie, |v| {
        v["peer_link"]["reachable"] == true
    })
    .await;
    drop(pair.n2.take());
    let v = wait_view("node2 unreachable", &client, &url, &cookie, |v| {
        v["peer_link"]["reachable"] == false
    })
    .await;
    assert_eq!(v["peer"]["node"], "node2", "last known status kept: {v:#}");
    assert!(v["peer_link"]["error"].is_string());
    let first = v["peer_link"]["age_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = status(&client, &url, &cookie).await;
    assert!(v["peer_link"]["age_ms"].as_u64().unwrap() > first, "{v:#}");
    // Actions for it fail clearly.
    let csrf = v["csrf"].as_str().unwrap();
    let a: Value = client
        .post(format!("{url}/api/action"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", csrf)
        .json(&serde_json::json!({"action": "verify", "module": "vm1", "node": "node2"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("node2"), "{a:#}");
}

fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

fn check_report(archive: &[u8], key_file: &Path) {
    let files = entries(archive);
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        names.contains(&"vmha-report/node2/vm1/fs0/sync.json"),
        "{names:#?}"
    );
    for node in ["node1", "node2"] {
        for f in [
            "vmha.toml",
            "versions.txt",
            "status.json",
            "kernel.txt",
            "mounts.txt",
            "vm1/events.log",
            "errors.txt",
        ] {
            let want = format!("vmha-report/{node}/{f}");
            assert!(names.contains(&want.as_str()), "{want} missing: {names:#?}");
        }
    }
    let key = std::fs::read_to_string(key_file).unwrap();
    let key = key.trim();
    for (path, data) in &files {
        let text = String::from_utf8_lossy(data);
        assert!(!text.contains(key), "{path} carries the cluster key");
        if path.ends_with("vmha.toml") {
            assert!(!text.contains("cluster.key"), "{path}: {text}");
            assert!(text.contains("key_file = \"(redacted)\""), "{path}: {text}");
        }
        if path.ends_with("node2/status.json") {
            let s: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(s["node"], "node2");
        }
        if path.ends_with("versions.txt") {
            assert!(
                text.contains("vmhad") && text.contains(env!("CARGO_PKG_VERSION")),
                "{text}"
            );
        }
    }
}

/// `vmctl report` and the console's download: one tar.gz with both nodes'
/// parts (node2's over the channel) and no key material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_covers_both_nodes_without_key_material() {
    let pair = Pair::start(3);
    // A vmha-fs state file of node2 (fake drivers write none) and a key-like
    // file that must stay out.
    let fs0 = pair.dir2().join("state/vm1/fs0");
    std::fs::create_dir_all(&fs0).unwrap();
    std::fs::write(fs0.join("sync.json"), r#"{"phase":"done"}"#).unwrap();
    std::fs::copy(&pair.key_file, fs0.join("copied.key")).unwrap();
    let out_file = pair.dir1.join("report.tar.gz");
    let out = pair.vmctl(&pair.dir1, &["report", "--out", out_file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nodes: node1, node2"), "{text}");
    check_report(&std::fs::read(&out_file).unwrap(), &pair.key_file);

    let (client, url, cookie) = pair.login().await;
    let anonymous = client
        .get(format!("{url}/api/report"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .get(format!("{url}/api/report"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains(".tar.gz"));
    check_report(&r.bytes().await.unwrap(), &pair.key_file);
}
