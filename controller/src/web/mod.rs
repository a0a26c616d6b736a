//! The web console and `/metrics`, served by every vmhad over HTTPS (issue
//! 13): port 9010 of every address of this node unless `[web] listen` says
//! otherwise, rustls with the configured certificate or a self-signed one
//! kept in the state directory.
//!
//! Why it looks like this:
//! - The console is a view of this node's `status` answer (the peer as its
//!   heartbeats show it) and issues the control socket's requests through
//!   [`DaemonHandle::request_as`], so the page can do nothing `vmctl` cannot
//!   and every action lands in the event log with who asked.
//! - The peer's own view comes over the authenticated channel between the
//!   daemons ([`PeerSource`], vmhad's is [`ChannelPeer`]): its full status,
//!   its event log (merged with this node's by time), actions run there with
//!   the user who asked in both event logs, its part of the report. An
//!   unreachable peer is shown as last known, greyed, with its age.
//! - `/api/report` serves the same tar.gz as `vmctl report` (a GET: it
//!   changes nothing, so the session cookie, `SameSite=Strict`, is enough).
//! - Pre-authentication limits as for the other listeners (issue 8): at most
//!   [`MAX_HANDSHAKES`] TLS handshakes pending (one more is dropped at once),
//!   each done within [`HANDSHAKE_DEADLINE`]; at most [`MAX_CONNECTIONS`]
//!   connections, request headers within [`HEADER_DEADLINE`]; rejections are
//!   logged at most once per second per kind.
//! - A console that cannot listen is logged, never fatal: HA does not depend
//!   on it.
//! - Static assets are `include_str!`: nothing is fetched at run time, no
//!   build step.

mod auth;
pub mod metrics;
pub mod peer;
mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use vmha_fs::ratelog::RateLog;

pub use self::auth::{check_password, password_path, set_password, AuthError};
pub use self::peer::{ChannelPeer, PeerLink};
pub use self::tls::{self_signed_paths, TlsError};
use crate::config::Web;
use crate::control::{Request, Response as Answer};
use crate::daemon::DaemonHandle;
use crate::report::ReportFile;
use crate::status::Status;

/// TLS handshakes pending at once; one more connection is closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// A TLS handshake must be complete this long after the connection.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Established connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Request headers must be complete within this.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// How often the event stream looks for changes.
const SSE_POLL: Duration = Duration::from_millis(250);
/// Event-log lines per module sent with each update.
const LAST_EVENTS: usize = 8;
/// The session cookie's name.
const COOKIE: &str = "vmha_session";

/// Errors starting the console.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the console could listen on none of {0}")]
    NoListener(String),
}

/// A boxed future (the [`PeerSource`] methods are object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The peer's vmhad as the console reaches it (the channel between the
/// daemons).
pub trait PeerSource: Send + Sync + std::fmt::Debug {
    /// The peer's own (last known) status. `None` when unknown: the page
    /// then shows the peer as this node's heartbeats know it.
    fn peer_status(&self) -> BoxFuture<'_, Option<Status>>;
    /// Whether that status is fresh, and its age.
    fn peer_link(&self) -> Option<PeerLink> {
        None
    }
    /// The peer's node name, when there is a channel to it.
    fn peer_name(&self) -> Option<String> {
        None
    }
    /// Runs `request` on the peer, `user` in its event log.
    fn command(&self, request: Request, user: String) -> BoxFuture<'_, Result<Answer, String>> {
        let _ = (request, user);
        Box::pin(async { Err("no channel to the peer".to_string()) })
    }
    /// The last `last` lines of the peer's event log of `module`.
    fn log(&self, module: String, last: usize) -> BoxFuture<'_, Result<Vec<String>, String>> {
        let _ = (module, last);
        Box::pin(async { Err("no channel to the peer".to_string()) })
    }
    /// The peer's part of the diagnostic report.
    fn report(&self) -> BoxFuture<'_, Result<Vec<ReportFile>, String>> {
        Box::pin(async { Err("no channel to the peer".to_string()) })
    }
}

/// No channel to the peer: always `None`.
#[derive(Debug, Default)]
pub struct NoPeer;

impl PeerSource for NoPeer {
    fn peer_status(&self) -> BoxFuture<'_, Option<Status>> {
        Box::pin(async { None })
    }
}

/// What the handlers share.
#[derive(Debug)]
struct App {
    daemon: DaemonHandle,
    peer: Arc<dyn PeerSource>,
    sessions: auth::Sessions,
    state_dir: PathBuf,
    metrics_auth: bool,
}

/// The client's address, per connection.
#[derive(Debug, Clone, Copy)]
struct Client(SocketAddr);

/// A running console: its listeners' tasks (aborted on drop).
#[derive(Debug)]
pub struct WebServer {
    addresses: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl WebServer {
    /// The addresses actually listened on.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where to listen: `[web] listen`, else port 9010 of every address of this node.
pub fn listen_addresses(web: &Web, node_addresses: &[IpAddr]) -> Vec<SocketAddr> {
    if web.listen.is_empty() {
        node_addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, Web::DEFAULT_PORT))
            .collect()
    } else {
        web.listen.clone()
    }
}

/// Starts the console (if `[web] enabled`) for the daemon behind `daemon`.
/// `Ok(None)` when disabled. Addresses that cannot be bound are logged and
/// skipped; none at all is an error.
pub async fn start(
    daemon: DaemonHandle,
    peer: Arc<dyn PeerSource>,
) -> Result<Option<WebServer>, WebError> {
    let config = daemon.config();
    let web = config.web.clone();
    if !web.enabled {
        tracing::info!("web console disabled ([web] enabled = false)");
        return Ok(None);
    }
    let state_dir = config.cluster.state_dir.clone();
    let node_index = daemon.node();
    let node = config.node(node_index).clone();
    let addresses = listen_addresses(&web, &node.addresses);
    let (cert, key) = match (&web.cert_file, &web.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let mut names = vec![node.name.clone(), "localhost".to_string()];
            names.extend(node.addresses.iter().map(ToString::to_string));
            names.extend(addresses.iter().map(|a| a.ip().to_string()));
            names.dedup();
            let dir = state_dir.clone();
            tokio::task::spawn_blocking(move || tls::ensure_self_signed(&dir, names))
                .await
                .map_err(|e| TlsError::Generate(e.to_string()))??
        }
    };
    let tls_config = tls::server_config(&cert, &key)?;
    let app = Arc::new(App {
        daemon,
        peer,
        sessions: auth::Sessions::default(),
        state_dir,
        metrics_auth: web.metrics_auth,
    });
    let router = router(Arc::clone(&app));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let rejections = Arc::new(Mutex::new(RateLog::new("web console")));
    let mut bound = Vec::new();
    let mut tasks = Vec::new();
    for address in &addresses {
        let listener = match TcpListener::bind(address).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("web console: cannot listen on {address}: {e}");
                continue;
            }
        };
        let local = listener.local_addr().unwrap_or(*address);
        tracing::info!("web console on https://{local}/");
        bound.push(local);
        tasks.push(tokio::spawn(serve(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::clone(&tls_config)),
            router.clone(),
            Arc::clone(&handshakes),
            Arc::clone(&connections),
            Arc::clone(&rejections),
        )));
    }
    if bound.is_empty() {
        let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        return Err(WebError::NoListener(list.join(", ")));
    }
    Ok(Some(WebServer {
        addresses: bound,
        tasks,
    }))
}

fn reject(log: &Mutex<RateLog>, kind: &'static str, peer: SocketAddr, detail: &str) {
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .reject(kind, &peer, detail);
}

/// Accepts connections: bounded handshakes with a deadline, then HTTP/1.1.
async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    rejections: Arc<Mutex<RateLog>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("web console: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(pending) = Arc::clone(&handshakes).try_acquire_owned() else {
            reject(&rejections, "too many handshakes", peer, "dropped");
            continue;
        };
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            reject(&rejections, "too many connections", peer, "dropped");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let rejections = Arc::clone(&rejections);
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    reject(&rejections, "handshake failed", peer, &e.to_string());
                    return;
                }
                Err(_) => {
                    reject(&rejections, "handshake too slow", peer, "deadline passed");
                    return;
                }
            };
            drop(pending);
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(Client(peer));
                    let mut router = router.clone();
                    async move {
                        use tower::Service;
                        router.call(request).await
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(tls);
            let result = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(io, service)
                .await;
            if let Err(e) = result {
                tracing::debug!("web console: connection from {peer}: {e}");
            }
        });
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .route("/api/status", get(api_status))
        .route("/api/events", get(api_events))
        .route("/api/log", get(api_log))
        .route("/api/action", post(api_action))
        .route("/api/report", get(api_report))
        .route("/metrics", get(metrics_handler))
        .with_state(app)
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const LOGIN_HTML: &str = include_str!("assets/login.html");
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The logged-in session of a request, if any.
fn session(app: &App, headers: &HeaderMap) -> Option<(String, auth::Session)> {
    let token = cookie_token(headers)?;
    let session = app.sessions.get(&token)?;
    Some((token, session))
}

/// Basic auth (`admin:PASSWORD`), for `/metrics` with `metrics_auth`.
async fn basic_auth(app: &Arc<App>, headers: &HeaderMap, from: IpAddr) -> bool {
    use base64_decode::decode;
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Some(text) = decode(value.trim()).and_then(|b| String::from_utf8(b).ok()) else {
        return false;
    };
    let Some((user, password)) = text.split_once(':') else {
        return false;
    };
    if user != auth::ADMIN || app.sessions.admit(from) != auth::Admission::Go {
        return false;
    }
    verify(app, password.to_string(), from, "metrics").await
}

/// Checks the password off the async threads; failures count and are logged.
async fn verify(app: &Arc<App>, password: String, from: IpAddr, what: &str) -> bool {
    let dir = app.state_dir.clone();
    let outcome = tokio::task::spawn_blocking(move || check_password(&dir, &password))
        .await
        .ok()
        .flatten();
    match outcome {
        Some(true) => {
            app.sessions.succeeded(from);
            true
        }
        Some(false) => {
            let n = app.sessions.failed(from);
            tracing::warn!(client = %from, failures = n, "web console: wrong password ({what})");
            false
        }
        None => {
            let n = app.sessions.failed(from);
            tracing::warn!(
                client = %from, failures = n,
                "web console: login refused ({what}): no password set (vmctl web-password)"
            );
            false
        }
    }
}

async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match session(&app, &headers) {
        Some(_) => Html(INDEX_HTML).into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

fn login_page(message: &str) -> String {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    LOGIN_HTML.replace("{{message}}", &escaped)
}

async fn login_form() -> Html<String> {
    Html(login_page(""))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    password: String,
}

async fn login(
    State(app): State<Arc<App>>,
    Extension(Client(from)): Extension<Client>,
    Form(form): Form<LoginForm>,
) -> Response {
    let ip = from.ip();
    if let auth::Admission::Wait(d) = app.sessions.admit(ip) {
        tracing::warn!(client = %from, "web console: login attempt while rate-limited");
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            Html(login_page(&format!(
                "Too many failed logins: try again in {} s.",
                d.as_secs().max(1)
            ))),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if !verify(&app, form.password, ip, "login").await {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(
                "Wrong password (or none set yet: `vmctl web-password`).",
            )),
        )
            .into_response();
    }
    let (token, _) = app.sessions.create(auth::ADMIN);
    tracing::info!(client = %from, "web console: {} logged in", auth::ADMIN);
    let mut r = Redirect::to("/").into_response();
    let cookie = format!("{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Debug, Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if let Some((token, s)) = session(&app, &headers) {
        if auth::same(&form.csrf, &s.csrf) {
            app.sessions.remove(&token);
        } else {
            return (StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response();
        }
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "vmha_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
        .into_response()
}

/// What the page shows: this node's status, the peer's own (when the
/// channel gives it: last known, with `peer_link` saying whether it is
/// fresh and how old), the latest event-log lines per module.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct View {
    local: Status,
    peer: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_link: Option<PeerLink>,
    events: std::collections::BTreeMap<String, Vec<String>>,
}

async fn view(app: &App) -> View {
    let local = app.daemon.status();
    let peer = app.peer.peer_status().await;
    let peer_link = app.peer.peer_link();
    let events = local
        .modules
        .iter()
        .map(|m| {
            let lines = app.daemon.log_lines(&m.name).unwrap_or_default();
            let skip = lines.len().saturating_sub(LAST_EVENTS);
            (m.name.clone(), lines.into_iter().skip(skip).collect())
        })
        .collect();
    View {
        local,
        peer,
        peer_link,
        events,
    }
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "log in first").into_response()
}

#[derive(Debug, Serialize)]
struct StatusAnswer {
    user: String,
    csrf: String,
    #[serde(flatten)]
    view: View,
}

async fn api_status(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some((_, s)) = session(&app, &headers) else {
        return unauthorized();
    };
    Json(StatusAnswer {
        user: s.user,
        csrf: s.csrf,
        view: view(&app).await,
    })
    .into_response()
}

/// The view without what changes at every heartbeat (ages), to decide
/// whether an update is worth sending at once.
fn steady(view: &View) -> View {
    let mut v = view.clone();
    if let Some(link) = &mut v.peer_link {
        link.age_ms = None;
    }
    for m in v
        .local
        .modules
        .iter_mut()
        .chain(v.peer.iter_mut().flat_map(|p| p.modules.iter_mut()))
    {
        for n in m.nodes.values_mut() {
            if n.last_seen_ms.is_some() {
                n.last_seen_ms = Some(None);
            }
            if let Some(h) = &mut n.heartbeats {
                for age in h.values_mut() {
                    *age = age.map(|_| 0);
                }
            }
        }
    }
    for w in std::iter::once(&mut v.local.witness)
        .chain(v.peer.iter_mut().map(|p| &mut p.witness))
        .flatten()
    {
        w.last_probe_ms = None;
    }
    v
}

/// Server-sent events: an `status` event with the [`View`] at once, then on
/// every change (ages at most every 2 s).
async fn api_events(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if session(&app, &headers).is_none() {
        return unauthorized();
    }
    struct Cursor {
        app: Arc<App>,
        last: Option<View>,
        sent_at: tokio::time::Instant,
    }
    let cursor = Cursor {
        app,
        last: None,
        sent_at: tokio::time::Instant::now(),
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if c.last.is_some() {
                tokio::time::sleep(SSE_POLL).await;
            }
            let v = view(&c.app).await;
            let now = tokio::time::Instant::now();
            let changed = match &c.last {
                None => true,
                Some(last) => {
                    steady(last) != steady(&v)
                        || (now.duration_since(c.sent_at) >= Duration::from_secs(2) && *last != v)
                }
            };
            if changed {
                let data = serde_json::to_string(&v).unwrap_or_default();
                c.last = Some(v);
                c.sent_at = now;
                let event = SseEvent::default().event("status").data(data);
                return Some((Ok::<_, std::convert::Infallible>(event), c));
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    module: String,
}

async fn api_log(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<LogQuery>,
) -> Response {
    if session(&app, &headers).is_none() {
        return unauthorized();
    }
    let Some(local) = app.daemon.log_lines(&q.module) else {
        return (StatusCode::NOT_FOUND, "no such module").into_response();
    };
    let node = app.daemon.status().node;
    let mut lines: Vec<(String, String)> = local.into_iter().map(|l| (node.clone(), l)).collect();
    if let Some(peer) = app.peer.peer_name() {
        match app
            .peer
            .log(q.module.clone(), crate::eventlog::RING_LINES)
            .await
        {
            Ok(theirs) => lines.extend(theirs.into_iter().map(|l| (peer.clone(), l))),
            Err(e) => lines.push((
                peer.clone(),
                format!("(the peer's event log cannot be read now: {e})"),
            )),
        }
    }
    Json(merge_by_time(lines)).into_response()
}

/// Both nodes' lines as `NODE | LINE`, by time (each line starts with its
/// RFC 3339 UTC timestamp; a line without one keeps its place after the
/// line before it).
fn merge_by_time(lines: Vec<(String, String)>) -> Vec<String> {
    let mut keyed: Vec<(String, String, String)> = Vec::with_capacity(lines.len());
    let mut last = String::new();
    for (node, line) in lines {
        let stamp = line.split_whitespace().next().unwrap_or_default();
        if stamp.len() >= 20 && stamp.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            last = stamp.to_string();
        }
        keyed.push((last.clone(), node, line));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed
        .into_iter()
        .map(|(_, node, line)| format!("{node} | {line}"))
        .collect()
}

/// An action of the page.
#[derive(Debug, Deserialize)]
struct ActionBody {
    /// `start`, `stop`, `swap`, `prim`, `verify`, `maintenance-on`, `maintenance-off`.
    action: String,
    module: String,
    /// `prim` only: the module's name typed by the operator.
    #[serde(default)]
    confirm: Option<String>,
    /// The node to run it on (this node when omitted); the peer's actions go
    /// over the daemon channel.
    #[serde(default)]
    node: Option<String>,
}

#[derive(Debug, Serialize)]
struct ActionAnswer {
    ok: bool,
    error: Option<String>,
    lines: Vec<String>,
}

/// The CSRF header every action carries.
pub const CSRF_HEADER: &str = "x-csrf-token";

async fn api_action(
    State(app): State<Arc<App>>,
    Extension(Client(from)): Extension<Client>,
    headers: HeaderMap,
    Json(body): Json<ActionBody>,
) -> Response {
    let Some((_, s)) = session(&app, &headers) else {
        return unauthorized();
    };
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !auth::same(sent, &s.csrf) {
        tracing::warn!(client = %from, "web console: action refused: missing or wrong CSRF token");
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response();
    }
    let module = Some(body.module.clone());
    let request = match body.action.as_str() {
        "start" => Request::Start { module },
        "stop" => Request::Stop { module },
        "swap" => Request::Swap {
            module,
            live: false,
        },
        "verify" => Request::Verify { module },
        "maintenance-on" => Request::Maintenance { on: true, module },
        "maintenance-off" => Request::Maintenance { on: false, module },
        "prim" => {
            if body.confirm.as_deref() != Some(body.module.as_str()) {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(ActionAnswer {
                        ok: false,
                        error: Some("prim: type the module's name to confirm".to_string()),
                        lines: Vec::new(),
                    }),
                )
                    .into_response();
            }
            Request::Prim { module }
        }
        other => {
            return (StatusCode::BAD_REQUEST, format!("unknown action `{other}`")).into_response()
        }
    };
    let this = app.daemon.status().node;
    let who = format!("web:{} from {from}", s.user);
    let r = match body.node.as_deref() {
        None => app.daemon.request_as(request, &who).await,
        Some(n) if n == this => app.daemon.request_as(request, &who).await,
        Some(n) if app.peer.peer_name().as_deref() == Some(n) => {
            peer_action(&app, request, &who, n, &this).await
        }
        Some(n) => return (StatusCode::BAD_REQUEST, format!("unknown node `{n}`")).into_response(),
    };
    Json(ActionAnswer {
        ok: r.ok,
        error: r.error,
        lines: r.lines,
    })
    .into_response()
}

/// An action for the peer: run there over the channel (its event log names
/// the user and this console), and written to this node's event log too.
async fn peer_action(app: &App, request: Request, who: &str, peer: &str, this: &str) -> Answer {
    let what = serde_json::to_string(&request).unwrap_or_default();
    let logs = match &request {
        Request::Start { module }
        | Request::Stop { module }
        | Request::Swap { module, .. }
        | Request::Prim { module }
        | Request::Verify { module }
        | Request::Maintenance { module, .. } => module.clone(),
        _ => None,
    };
    let log = |line: String| {
        let daemon = app.daemon.clone();
        let module = logs.clone();
        async move { daemon.log_event(module.as_deref(), line).await }
    };
    log(format!("{who} asked {what} on {peer}")).await;
    let user = format!("{who} on {this}'s console");
    let response = match app.peer.command(request, user).await {
        Ok(r) => r,
        Err(e) => Answer::error(format!("{peer} cannot be reached: {e}")),
    };
    let outcome = match (&response.ok, &response.error) {
        (true, _) => format!("{who}: done on {peer}"),
        (false, e) => format!(
            "{who}: refused on {peer}: {}",
            e.clone().unwrap_or_default()
        ),
    };
    log(outcome).await;
    response
}

/// The diagnostic report of both nodes (as `vmctl report`).
async fn api_report(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if session(&app, &headers).is_none() {
        return unauthorized();
    }
    let config = app.daemon.config();
    let status = app.daemon.status();
    let node = status.node.clone();
    let config_file = app.daemon.config_file();
    let local = tokio::task::spawn_blocking(move || {
        crate::report::collect(&crate::report::Source {
            config: &config,
            config_file: config_file.as_deref(),
            node: &status.node,
            status: Some(&status),
            budget: crate::report::LOCAL_BUDGET,
        })
    })
    .await
    .unwrap_or_default();
    let mut parts = vec![(node.clone(), local)];
    let mut notes = vec![format!("made by {node}'s console")];
    if let Some(peer) = app.peer.peer_name() {
        match app.peer.report().await {
            Ok(files) => parts.push((peer, files)),
            Err(e) => notes.push(format!("{peer}: no part: {e}")),
        }
    }
    let mut buf = Vec::new();
    if let Err(e) = crate::report::write_tar_gz(&mut buf, &parts, &notes) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let name = format!(
        "vmha-report-{}-{}.tar.gz",
        app.daemon.config().cluster.name,
        crate::eventlog::timestamp(std::time::SystemTime::now()).replace(':', "")
    );
    let disposition = format!("attachment; filename=\"{name}\"");
    let mut r = ([(header::CONTENT_TYPE, "application/gzip")], buf).into_response();
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

async fn metrics_handler(
    State(app): State<Arc<App>>,
    Extension(Client(from)): Extension<Client>,
    headers: HeaderMap,
) -> Response {
    if app.metrics_auth
        && session(&app, &headers).is_none()
        && !basic_auth(&app, &headers, from.ip()).await
    {
        let mut r = (StatusCode::UNAUTHORIZED, "login required").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"vmha\""),
        );
        return r;
    }
    let status = app.daemon.status();
    let failover_ms = app.daemon.config().cluster.failover_timeout_ms;
    let fs = app.daemon.fs_metrics();
    let text = metrics::render(&status, &app.daemon.counters(), &fs, failover_ms);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Base64 for basic auth (standard alphabet, padding optional): small
/// enough not to need a crate.
mod base64_decode {
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let mut acc: u32 = 0;
        let mut bits = 0;
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
            }
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn decodes() {
            assert_eq!(super::decode("YWRtaW46cHc=").unwrap(), b"admin:pw");
            assert!(super::decode("a*b").is_none());
        }
    }
}
