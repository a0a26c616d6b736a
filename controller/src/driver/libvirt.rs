//! libvirt through the `virt` crate (the C library's bindings).
//!
//! One connection per module (and `libvirt_uri`), opened on first use. Not one
//! shared by all modules: libvirtd serves at most `max_client_requests` (5 by
//! default) calls of one connection at a time and queues the rest, so 32
//! modules failing over at once would start their domains five at a time
//! behind each other's state polls. A connection that fails (libvirtd restarted or stopped) is dropped
//! and the call is retried once on a fresh one, so a restarted libvirtd never
//! wedges the daemon. Every call blocks; the daemon runs them with
//! `spawn_blocking`.
//!
//! The domain's definition lives in `<first replicated dir>/<domain>.xml`:
//! [`VmDriver::define`] defines it from there, and on the writer
//! [`VmDriver::refresh_xml`] writes libvirt's inactive XML back whenever the
//! operator redefined the domain (`virsh edit`), so the peer defines the same.
//!
//! Snapshots: qcow2 holds an internal snapshot's data, an external one's
//! overlay is a file (best in one of the module's replicated directories), but
//! libvirt keeps the snapshot *metadata* (`virsh snapshot-list`, what
//! `snapshot-revert` needs) in its own per-node files, which vmha-fs does not
//! replicate. So the writer also exports every snapshot's XML to
//! `<first replicated dir>/<domain>.snapshots/<snapshot>.xml` (see
//! [`snapshot_dir`]; in [`VmDriver::refresh_xml`], when the set of snapshot
//! names or the current snapshot changed; `current` names the current one),
//! and [`VmDriver::define`] redefines them from there
//! (`virDomainSnapshotCreateXML` with `REDEFINE`, parents first) — what
//! operators of the product we replace do by hand with
//! `virsh snapshot-create --redefine` on the other node.
//!
//! The checker's view of a domain ([`VmDriver::watch_state`]) follows
//! libvirt's lifecycle events (libvirt's default event loop, one thread per
//! process, a callback on each module's connection): libvirt is asked for the
//! state when an event arrived for the domain, and otherwise at most every
//! [`VM_POLL_EVERY`]. Asking every domain's state at every check (two RPCs per
//! module twice a second) was most of an idle vmhad's CPU with 32 modules and
//! grew with the heartbeat frequency.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void, CStr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

use super::{DriverError, Paused, VmDriver, VmState};
use crate::config::Module;

/// How long `start` waits for the domain to run.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a live migration may take before it is aborted
/// ([`VmDriver::migrate_live`]; [`LibvirtDriver::with_migrate_timeout`]).
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);

/// The flags of a live swap's migration: live, peer-to-peer and tunnelled
/// (the source's libvirtd opens the destination's libvirt through the
/// forwarded socket and sends the migration stream inside that connection,
/// so inside vmha's daemon channel), the destination left paused (never two
/// writers), and the disks taken as shared storage that libvirt cannot
/// recognise (`UNSAFE`: vmhad checked them, `crate::migrate::check_disks`).
/// Never `NON_SHARED_*` (the data is already on the peer), nor
/// `PERSIST_DEST`/`UNDEFINE_SOURCE` (the domain stays defined on both nodes).
///
/// libvirt 10.8 and later have `shared_filesystems` in `qemu.conf`: where
/// the operator lists the module's directories there, libvirt itself treats
/// the disks as shared, and that is preferred: vmhad reads this node's
/// `qemu.conf` ([`QEMU_CONF`]; libvirtd runs beside it) and migrates without
/// `UNSAFE` when every replicated directory lies under a listed path
/// ([`migrate_flags`]).
pub const MIGRATE_FLAGS: u32 = sys::VIR_MIGRATE_LIVE
    | sys::VIR_MIGRATE_PEER2PEER
    | sys::VIR_MIGRATE_TUNNELLED
    | sys::VIR_MIGRATE_PAUSED
    | sys::VIR_MIGRATE_UNSAFE;

/// How often an overdue migration is asked again to abort.
const ABORT_RETRY: Duration = Duration::from_millis(500);

/// The first libvirt (`major * 1_000_000 + minor * 1000 + micro`) whose
/// `qemu.conf` knows `shared_filesystems`.
pub const SHARED_FILESYSTEMS_SINCE: u32 = 10_008_000;

/// The QEMU driver's configuration of the local libvirtd.
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// The paths listed by `shared_filesystems = [ "...", ... ]` in `qemu.conf`
/// text (the list may span lines; `#` starts a comment). Empty when the key
/// is missing or commented out.
pub fn shared_filesystems(qemu_conf: &str) -> Vec<PathBuf> {
    let text: String = qemu_conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let Some(at) = text.find("shared_filesystems") else {
        return Vec::new();
    };
    let rest = &text[at + "shared_filesystems".len()..];
    let Some(rest) = rest.trim_start().strip_prefix('=') else {
        return Vec::new();
    };
    let Some(list) = rest.trim_start().strip_prefix('[') else {
        return Vec::new();
    };
    let list = list.split(']').next().unwrap_or_default();
    list.split('"')
        .skip(1)
        .step_by(2)
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// The migration flags: [`MIGRATE_FLAGS`], without `UNSAFE` when libvirt
/// (`version`) knows `shared_filesystems` and `qemu.conf` lists a path
/// holding every one of the module's directories.
pub fn migrate_flags(version: u32, qemu_conf: &str, replicated: &[PathBuf]) -> u32 {
    if version < SHARED_FILESYSTEMS_SINCE || replicated.is_empty() {
        return MIGRATE_FLAGS;
    }
    let shared = shared_filesystems(qemu_conf);
    let covered = replicated
        .iter()
        .all(|dir| shared.iter().any(|s| dir.starts_with(s)));
    if covered {
        MIGRATE_FLAGS & !sys::VIR_MIGRATE_UNSAFE
    } else {
        MIGRATE_FLAGS
    }
}

/// How long `stop` waits after `destroy`.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);

/// The XML the file is compared with and rewritten from: the persistent
/// definition, with secrets (e.g. graphics passwords) so the peer's
/// definition is complete, as `virsh edit` shows it.
const XML_FLAGS: sys::virDomainXMLFlags = sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE;
/// The flags undefine tries in turn: keep NVRAM and TPM state (the QEMU
/// driver), then fewer for drivers that refuse them (e.g. the test driver).
const UNDEFINE_FLAGS: [sys::virDomainUndefineFlagsValues; 3] = [
    sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_KEEP_TPM,
    sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM,
    0,
];

/// The `virt`-crate driver. Cheap to create; connects on first use.
#[derive(Debug)]
pub struct LibvirtDriver {
    /// By (uri, module name): the connection and its lifecycle callback.
    conns: Mutex<HashMap<(String, String), Conn>>,
    /// Lifecycle events seen, by domain.
    events: Arc<Events>,
    /// The checker's last answer per module ([`VmDriver::watch_state`]).
    watched: Mutex<HashMap<String, Watched>>,
    vm_poll_every: Duration,
    /// Modules whose domain this driver defined from the replicated XML (the
    /// last `define` succeeded): only their definition may overwrite the file,
    /// a stale local definition must not.
    defined: Mutex<HashSet<String>>,
    start_timeout: Duration,
    migrate_timeout: Duration,
    /// When each module's XML was last compared ([`VmDriver::refresh_xml`]).
    /// With the domain's event count then.
    xml_checked: Mutex<HashMap<String, (Instant, u64)>>,
    /// When each module's snapshots were last listed.
    snapshots_checked: Mutex<HashMap<String, Instant>>,
    xml_every: Duration,
    /// Per module, the sorted snapshot names and the current snapshot last
    /// exported to [`snapshot_dir`]: the files are compared again only when
    /// they change.
    snapshots_exported: Mutex<HashMap<String, Exported>>,
}

/// How often the writer compares libvirt's XML with the replicated file.
/// Not at every check (every heartbeat interval): fetching the XML and
/// reading the file through the FUSE mount for 32 modules twice a second
/// was the largest part of an idle vmhad's and libvirtd's CPU; an operator's
/// `virsh edit` reaches the file within this.
pub const XML_REFRESH_EVERY: Duration = Duration::from_secs(2);

/// With lifecycle events delivered, the XML is compared after an event of
/// the domain (a redefinition is one) and otherwise only this often.
pub const XML_REFRESH_FALLBACK: Duration = Duration::from_secs(30);

/// How often the checker asks libvirt for a domain's state when no lifecycle
/// event came (a fixed period, whatever the heartbeat interval): an event
/// lost or not delivered (a connection that could not register) is noticed
/// within this. Without events the state is asked at every check.
pub const VM_POLL_EVERY: Duration = Duration::from_secs(2);

/// A module's connection; `callback`: its lifecycle registration, if any.
#[derive(Debug)]
struct Conn {
    conn: Connect,
    callback: Option<c_int>,
}

impl Conn {
    /// Ends the lifecycle registration (it holds a reference on the
    /// connection, which would otherwise never close).
    fn deregister(&self) {
        if let Some(id) = self.callback {
            // SAFETY: `conn` is valid (owned by `self`); `id` came from
            // `register_events` on it. A failure (a dead connection) is ignored.
            unsafe {
                sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id);
            }
        }
    }
}

/// The checker's last answer for a module: the state, when it was asked,
/// and how many events of the domain had been seen before asking.
#[derive(Debug, Clone, Copy)]
struct Watched {
    state: VmState,
    at: Instant,
    events: u64,
}

/// Whether the checker may answer from `last` instead of asking libvirt:
/// events are delivered on the connection, none came for the domain since
/// `last` was asked, and `last` is younger than `every`.
fn answer_from_cache(
    last: Option<&Watched>,
    events_delivered: bool,
    events_now: u64,
    now: Instant,
    every: Duration,
) -> Option<VmState> {
    let last = last?;
    (events_delivered
        && last.events == events_now
        && now.saturating_duration_since(last.at) < every)
        .then_some(last.state)
}

/// Domain lifecycle events (started, stopped, crashed, defined, ...) from
/// libvirt's event loop, so the checker need not ask every domain's state at
/// every check: it asks when an event arrived for the domain and at most every
/// [`VM_POLL_EVERY`] otherwise (a lost event, or a connection that could not
/// register, still ends up seen).
#[derive(Debug, Default)]
struct Events {
    /// By (uri, domain name): the events seen, and the task waiting for them.
    domains: Mutex<HashMap<(String, String), DomainEvents>>,
}

#[derive(Debug, Default)]
struct DomainEvents {
    count: u64,
    notify: Arc<Notify>,
}

impl Events {
    /// An event for `domain` on `uri` (libvirt's event-loop thread).
    fn record(&self, uri: &str, domain: &str) {
        let mut domains = lock(&self.domains);
        if let Some(d) = domains.get_mut(&(uri.to_string(), domain.to_string())) {
            d.count += 1;
            d.notify.notify_one();
        }
    }

    fn count(&self, module: &Module) -> u64 {
        lock(&self.domains)
            .entry(dom_key(module))
            .or_default()
            .count
    }

    fn notify(&self, module: &Module) -> Arc<Notify> {
        Arc::clone(
            &lock(&self.domains)
                .entry(dom_key(module))
                .or_default()
                .notify,
        )
    }
}

fn dom_key(module: &Module) -> (String, String) {
    (module.libvirt_uri.clone(), module.domain.clone())
}

/// What the lifecycle callback of one connection gets: whom to tell, and for
/// which URI.
struct CallbackData {
    events: Arc<Events>,
    uri: String,
}

/// libvirt's default event loop, registered once per process before the
/// first connection (remote connections deliver events only through it) and
/// run by a thread of its own. `false`: no event loop, the checker polls.
fn event_loop() -> bool {
    static STARTED: OnceLock<bool> = OnceLock::new();
    *STARTED.get_or_init(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e, "no libvirt event loop: domain states are polled");
            return false;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!(error = %e, "libvirt event loop");
                    std::thread::sleep(POLL);
                }
            });
        match spawned {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no libvirt event thread: domain states are polled");
                false
            }
        }
    })
}

/// Called by libvirt on its event-loop thread for every lifecycle event of
/// any domain on the connection.
extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `Box<CallbackData>` leaked at registration;
    // libvirt frees it (`free_callback_data`) only after the last call.
    let data = unsafe { &*(opaque as *const CallbackData) };
    // SAFETY: `dom` is valid for the duration of the call; the name it
    // returns lives as long as the domain object.
    let name = unsafe { sys::virDomainGetName(dom) };
    if !name.is_null() {
        // SAFETY: non-null, NUL-terminated by libvirt.
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        data.events.record(&data.uri, &name);
    }
    0
}

/// libvirt's `freecb`: drops the callback data when the registration ends.
extern "C" fn free_callback_data(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: the pointer came from `Box::into_raw` in `register_events`
        // and libvirt calls this once.
        drop(unsafe { Box::from_raw(opaque as *mut CallbackData) });
    }
}

/// Registers the lifecycle callback on `conn` for every domain; the
/// callback's id, or `None` when libvirt refused (the checker then polls).
fn register_events(conn: &Connect, uri: &str, events: &Arc<Events>) -> Option<c_int> {
    let data = Box::into_raw(Box::new(CallbackData {
        events: Arc::clone(events),
        uri: uri.to_string(),
    }));
    type Lifecycle = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    // SAFETY: libvirt's VIR_DOMAIN_EVENT_CALLBACK cast: for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE libvirt calls the generic pointer with the
    // lifecycle signature (`virConnectDomainEventCallback`), which is
    // `on_lifecycle`'s.
    let generic = unsafe { std::mem::transmute::<Lifecycle, Generic>(on_lifecycle as Lifecycle) };
    // SAFETY: `conn` is an open connection; a null domain means every
    // domain; `data` stays valid until libvirt calls `free_callback_data`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            data.cast(),
            Some(free_callback_data),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take `data` (registration failed).
        drop(unsafe { Box::from_raw(data) });
        tracing::info!(uri, error = %VirtError::last_error(), "no domain events: states are polled");
        return None;
    }
    Some(id)
}

impl Default for LibvirtDriver {
    fn default() -> Self {
        LibvirtDriver::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn conn_key(module: &Module) -> (String, String) {
    (module.libvirt_uri.clone(), module.name.clone())
}

/// Whether `e` means the connection itself is gone (rather than the call
/// being refused): the connection is then reopened.
fn is_connection_error(e: &VirtError) -> bool {
    matches!(
        e.code(),
        Enum::Known(
            ErrorNumber::SystemError
                | ErrorNumber::Rpc
                | ErrorNumber::NoConnect
                | ErrorNumber::InvalidConn
                | ErrorNumber::InternalError
        )
    )
}

fn is_no_domain(e: &VirtError) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

/// The checker's view of a libvirt state; `active`: whether the domain has a
/// running instance (for the states that do not say).
pub fn map_state(state: Enum<DomainState, sys::virDomainState>, active: bool) -> VmState {
    match state {
        Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::Shutdown) => {
            VmState::Running
        }
        Enum::Known(DomainState::Paused | DomainState::PMSuspended) => VmState::Paused,
        Enum::Known(DomainState::Shutoff) => VmState::ShutOff,
        Enum::Known(DomainState::Crashed) => VmState::Crashed,
        Enum::Known(DomainState::NoState) | Enum::Unknown(_) => {
            if active {
                VmState::Running
            } else {
                VmState::ShutOff
            }
        }
    }
}

/// The domain UUID an XML definition names (the first `<uuid>` element),
/// normalised to 32 lowercase hex digits; `None` if it names none.
pub fn xml_uuid(xml: &str) -> Option<String> {
    let start = xml.find("<uuid>")? + "<uuid>".len();
    let len = xml[start..].find("</uuid>")?;
    Some(normalise_uuid(&xml[start..start + len]))
}

/// `xml` with `<uuid>uuid</uuid>` as the root element's first child; `None`
/// if the root element's opening tag is not found.
pub fn with_uuid(xml: &str, uuid: &str) -> Option<String> {
    let root = xml.find("<domain")?;
    let end = root + xml[root..].find('>')? + 1;
    Some(format!("{}<uuid>{uuid}</uuid>{}", &xml[..end], &xml[end..]))
}

/// libvirt accepts UUIDs with or without dashes, in either case.
pub fn normalise_uuid(uuid: &str) -> String {
    uuid.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `<first replicated dir>/<domain>.xml`.
pub fn xml_path(module: &Module) -> Result<PathBuf, DriverError> {
    let dir = module.replicated.first().ok_or_else(|| {
        DriverError::failed(
            format!("the XML of {}", module.domain),
            "no replicated directory",
        )
    })?;
    Ok(dir.join(format!("{}.xml", module.domain)))
}

/// Replaces `path` with `bytes` atomically ([`vmha_fs::atomic`]: temporary
/// file, fsync, rename, fsync of the directory). Through the replicated mount
/// the peer receives the new file whole. Keeps the old file's mode (0600 for a
/// new one: the XML may hold secrets).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    vmha_fs::atomic::write_keeping_mode(path, bytes)
}

/// Snapshot names (sorted) and the current snapshot, as last exported.
type Exported = (Vec<String>, Option<String>);

/// The file in [`snapshot_dir`] naming the current snapshot (no `.xml`: it
/// cannot be a snapshot's file).
pub const CURRENT_FILE: &str = "current";

/// `<first replicated dir>/<domain>.snapshots`: the XML of each of the
/// domain's libvirt snapshots as `<snapshot name>.xml`, written by the writer,
/// redefined by the node that defines the domain.
pub fn snapshot_dir(module: &Module) -> Result<PathBuf, DriverError> {
    let xml = xml_path(module)?;
    Ok(xml.with_file_name(format!("{}.snapshots", module.domain)))
}

/// The file name of snapshot `name`'s XML, or `None` for a name that cannot
/// be one safely (empty, hidden, with a `/` or NUL).
pub fn snapshot_file_name(name: &str) -> Option<String> {
    let bad = name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']);
    (!bad).then(|| format!("{name}.xml"))
}

/// The parent a snapshot's XML names (`<parent><name>…</name></parent>`,
/// before the embedded `<domain>`), if any.
pub fn snapshot_parent(xml: &str) -> Option<&str> {
    // Past the root element `<domainsnapshot`, up to the embedded `<domain`.
    let body = xml
        .find("<domainsnapshot")
        .map_or(0, |i| i + "<domainsnapshot".len());
    let head = &xml[body..body + xml[body..].find("<domain").unwrap_or(xml.len() - body)];
    let parent = &head[head.find("<parent>")? + "<parent>".len()..];
    let parent = &parent[..parent.find("</parent>")?];
    let start = parent.find("<name>")? + "<name>".len();
    let len = parent[start..].find("</name>")?;
    Some(parent[start..start + len].trim())
}

/// `snapshots` (name, XML) in an order where each parent comes before its
/// children (libvirt's redefine wants the parent known); a parent that is
/// not in the set counts as known, a cycle keeps the input order.
pub fn parents_first(mut snapshots: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut done: Vec<(String, String)> = Vec::with_capacity(snapshots.len());
    while !snapshots.is_empty() {
        let ready = snapshots.iter().position(|(_, xml)| {
            snapshot_parent(xml).is_none_or(|p| {
                done.iter().any(|(n, _)| n == p) || !snapshots.iter().any(|(n, _)| n == p)
            })
        });
        done.push(snapshots.remove(ready.unwrap_or(0)));
    }
    done
}

/// The snapshots saved in `dir` as (name, XML); `None` if `dir` does not
/// exist (nothing was ever exported: local metadata is then kept).
fn read_snapshot_dir(dir: &Path) -> std::io::Result<Option<Vec<(String, String)>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".xml")) else {
            continue;
        };
        if snapshot_file_name(name).is_none() {
            continue;
        }
        out.push((name.to_string(), std::fs::read_to_string(entry.path())?));
    }
    out.sort();
    Ok(Some(out))
}

impl LibvirtDriver {
    pub fn new() -> LibvirtDriver {
        // libvirt's default handler prints every error (e.g. "domain not
        // found" for a missing domain) on stderr; they are returned instead.
        virt::error::clear_error_callback();
        // Before the first connection: remote connections deliver events
        // only through an event loop registered when they open.
        event_loop();
        LibvirtDriver {
            conns: Mutex::new(HashMap::new()),
            events: Arc::new(Events::default()),
            watched: Mutex::new(HashMap::new()),
            vm_poll_every: VM_POLL_EVERY,
            defined: Mutex::new(HashSet::new()),
            start_timeout: START_TIMEOUT,
            migrate_timeout: MIGRATE_TIMEOUT,
            xml_checked: Mutex::new(HashMap::new()),
            snapshots_checked: Mutex::new(HashMap::new()),
            xml_every: XML_REFRESH_EVERY,
            snapshots_exported: Mutex::new(HashMap::new()),
        }
    }

    /// The driver with another bound for `start` (tests).
    pub fn with_start_timeout(start_timeout: Duration) -> LibvirtDriver {
        LibvirtDriver {
            start_timeout,
            ..LibvirtDriver::new()
        }
    }

    /// The driver aborting a live migration after `timeout` instead of
    /// [`MIGRATE_TIMEOUT`].
    pub fn with_migrate_timeout(self, timeout: Duration) -> LibvirtDriver {
        LibvirtDriver {
            migrate_timeout: timeout,
            ..self
        }
    }

    /// The driver comparing the XML at every `refresh_xml` call (tests).
    pub fn with_xml_refresh_every(self, every: Duration) -> LibvirtDriver {
        LibvirtDriver {
            xml_every: every,
            ..self
        }
    }

    /// The driver asking libvirt for a watched state at most every `every`
    /// when no event came (tests).
    pub fn with_vm_poll_every(self, every: Duration) -> LibvirtDriver {
        LibvirtDriver {
            vm_poll_every: every,
            ..self
        }
    }

    /// The module's cached connection to its `libvirt_uri` if it is alive,
    /// else a new one; with it, whether lifecycle events are delivered on it.
    fn connection_events(&self, module: &Module) -> Result<(Connect, bool), VirtError> {
        let key = conn_key(module);
        {
            let mut conns = lock(&self.conns);
            if let Some(c) = conns.get(&key) {
                if c.conn.is_alive().unwrap_or(false) {
                    return Ok((c.conn.clone(), c.callback.is_some()));
                }
                tracing::info!(uri = %key.0, module = %key.1, "libvirt connection lost, reconnecting");
                if let Some(old) = conns.remove(&key) {
                    old.deregister();
                }
            }
        }
        // Opened without the lock: a libvirtd slow to accept must not hold up
        // the other modules.
        let conn = Connect::open(Some(&key.0))?;
        let callback = if event_loop() {
            register_events(&conn, &key.0, &self.events)
        } else {
            None
        };
        let events = callback.is_some();
        if let Some(old) = lock(&self.conns).insert(
            key,
            Conn {
                conn: conn.clone(),
                callback,
            },
        ) {
            old.deregister();
        }
        Ok((conn, events))
    }

    /// The module's cached connection to its `libvirt_uri` if it is alive,
    /// else a new one.
    fn connection(&self, module: &Module) -> Result<Connect, VirtError> {
        self.connection_events(module).map(|(c, _)| c)
    }

    /// Drops the module's cached connection (a broken one; if another call
    /// already replaced it, that one is merely reopened next time).
    fn forget(&self, module: &Module) {
        if let Some(old) = lock(&self.conns).remove(&conn_key(module)) {
            old.deregister();
        }
    }

    /// The next watched state is asked from libvirt (after an action of
    /// ours on the domain).
    fn unwatch(&self, module: &Module) {
        lock(&self.watched).remove(&module.name);
    }

    /// How many connections are open (tests).
    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Runs `f` on the module's connection; on a connection failure, once
    /// more on a fresh connection.
    fn with_conn<T>(
        &self,
        module: &Module,
        what: &str,
        mut f: impl FnMut(&Connect) -> Result<T, VirtError>,
    ) -> Result<T, DriverError> {
        let uri = module.libvirt_uri.as_str();
        let mut retried = false;
        loop {
            let conn = self
                .connection(module)
                .map_err(|e| DriverError::failed(format!("connecting to libvirt at {uri}"), e))?;
            match f(&conn) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let broken = is_connection_error(&e) || !conn.is_alive().unwrap_or(false);
                    if broken {
                        self.forget(module);
                    }
                    if broken && !retried {
                        tracing::info!(uri, error = %e, "{what}: retrying on a new libvirt connection");
                        retried = true;
                        continue;
                    }
                    return Err(DriverError::failed(what, e));
                }
            }
        }
    }

    fn lookup(conn: &Connect, module: &Module) -> Result<Option<Domain>, VirtError> {
        match conn.lookup_domain_by_name(&module.domain) {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn domain_state(dom: &Domain) -> Result<VmState, VirtError> {
        let info = dom.info()?;
        let active = match info.state {
            Enum::Known(DomainState::NoState) | Enum::Unknown(_) => dom.is_active()?,
            _ => false,
        };
        Ok(map_state(info.state, active))
    }

    fn wait_for(&self, module: &Module, timeout: Duration, done: fn(VmState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state(module).is_ok_and(done) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Defines `xml`. A file without a UUID keeps the UUID of the domain
    /// defined here. If libvirt refuses because the domain exists with
    /// another UUID (re-created by an operator on one node), replaces the
    /// existing definition when the domain is not running (its disks stay).
    fn define_xml(conn: &Connect, module: &Module, xml: &str) -> Result<(), DefineError> {
        let existing = Self::lookup(conn, module).map_err(DefineError::Virt)?;
        let existing_uuid = match &existing {
            Some(dom) => Some(normalise_uuid(
                &dom.uuid_string().map_err(DefineError::Virt)?,
            )),
            None => None,
        };
        let wanted = xml_uuid(xml);
        let adopted;
        let xml = match (&existing, &wanted) {
            (Some(dom), None) => {
                adopted = with_uuid(xml, &dom.uuid_string().map_err(DefineError::Virt)?);
                adopted.as_deref().unwrap_or(xml)
            }
            _ => xml,
        };
        let first = match conn.define_domain_xml(xml) {
            Ok(dom) => return dom.set_autostart(false).map_err(DefineError::Virt),
            Err(e) => e,
        };
        let (Some(existing), Some(existing_uuid), Some(wanted)) = (existing, existing_uuid, wanted)
        else {
            return Err(DefineError::Virt(first));
        };
        if is_connection_error(&first) || wanted == existing_uuid {
            // Same domain: the refusal is about something else.
            return Err(DefineError::Virt(first));
        }
        if existing.is_active().map_err(DefineError::Virt)? {
            return Err(DefineError::Running {
                existing: existing_uuid,
                wanted,
                cause: first,
            });
        }
        let old = existing.xml_desc(XML_FLAGS).map_err(DefineError::Virt)?;
        tracing::warn!(
            domain = %module.domain,
            existing = %existing_uuid,
            wanted = %wanted,
            "the domain is defined here with another UUID: replacing that definition (disks are kept)"
        );
        Self::undefine_keeping_storage(&existing).map_err(DefineError::Virt)?;
        match conn.define_domain_xml(xml) {
            Ok(dom) => dom.set_autostart(false).map_err(DefineError::Virt),
            Err(e) => {
                // Put the old definition back rather than leave none.
                if let Err(restore) = conn.define_domain_xml(&old) {
                    tracing::error!(domain = %module.domain, error = %restore, "restoring the previous definition failed");
                }
                Err(DefineError::Virt(e))
            }
        }
    }

    /// Undefines without removing anything else: NVRAM and TPM state are kept
    /// (libvirt never removes disks on undefine). A driver that does not know
    /// those flags has no such state: it gets fewer flags.
    fn undefine_keeping_storage(dom: &Domain) -> Result<(), VirtError> {
        let mut result = Ok(());
        for flags in UNDEFINE_FLAGS {
            result = dom.undefine_flags(flags);
            match &result {
                Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::InvalidArg)) => continue,
                _ => break,
            }
        }
        result
    }
}

/// Why a define failed (kept apart so a connection failure is retried).
#[derive(Debug, thiserror::Error)]
enum DefineError {
    #[error(transparent)]
    Virt(VirtError),
    #[error(
        "the domain runs on this node with UUID {existing} while the replicated XML defines \
         {wanted}; stop it here first ({cause})"
    )]
    Running {
        existing: String,
        wanted: String,
        cause: VirtError,
    },
}

impl VmDriver for LibvirtDriver {
    fn define(&self, module: &Module) -> Result<(), DriverError> {
        self.unwatch(module);
        lock(&self.defined).remove(&module.name);
        let path = xml_path(module)?;
        let what = format!("define {} from {}", module.domain, path.display());
        let xml = std::fs::read_to_string(&path).map_err(|e| DriverError::failed(&what, e))?;
        let mut running = None;
        let result = self.with_conn(module, &what, |conn| {
            match Self::define_xml(conn, module, &xml) {
                Ok(()) => Ok(()),
                Err(DefineError::Virt(e)) => Err(e),
                Err(e @ DefineError::Running { .. }) => {
                    running = Some(e.to_string());
                    Ok(())
                }
            }
        });
        result?;
        if let Some(reason) = running {
            return Err(DriverError::failed(what, reason));
        }
        lock(&self.snapshots_exported).remove(&module.name);
        self.redefine_snapshots(module);
        lock(&self.defined).insert(module.name.clone());
        Ok(())
    }

    fn start(&self, module: &Module) -> Result<(), DriverError> {
        self.unwatch(module);
        let what = format!("start {}", module.domain);
        if self.state(module)? == VmState::Missing {
            return Err(DriverError::failed(what, "the domain is not defined"));
        }
        self.with_conn(module, &what, |conn| {
            let dom = conn.lookup_domain_by_name(&module.domain)?;
            match Self::domain_state(&dom)? {
                VmState::Running => Ok(()),
                // Asked to run: a paused instance is resumed.
                VmState::Paused => dom.resume(),
                VmState::Crashed if dom.is_active()? => {
                    dom.destroy()?;
                    dom.create()
                }
                _ => dom.create(),
            }
        })?;
        if self.wait_for(module, self.start_timeout, |s| s == VmState::Running) {
            Ok(())
        } else {
            Err(DriverError::Timeout {
                what: format!("start of {}", module.domain),
                secs: self.start_timeout.as_secs(),
            })
        }
    }

    fn stop(&self, module: &Module) -> Result<(), DriverError> {
        self.unwatch(module);
        // libvirtd may be restarting: the stop is not given up at once (the
        // caller unmounts the disks next).
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        let state = loop {
            match self.state(module) {
                Ok(state) => break state,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(POLL),
            }
        };
        if state.is_down() {
            return Ok(());
        }
        // A paused guest cannot handle ACPI: destroy right away.
        if state != VmState::Paused {
            let what = format!("shutdown {}", module.domain);
            // A guest without ACPI handling ignores this; destroy follows.
            if let Err(e) =
                self.with_conn(module, &what, |conn| match Self::lookup(conn, module)? {
                    Some(dom) => dom.shutdown(),
                    None => Ok(()),
                })
            {
                tracing::info!(domain = %module.domain, error = %e, "ACPI shutdown refused");
            }
            let timeout = Duration::from_secs(module.stop_timeout_s);
            if self.wait_for(module, timeout, VmState::is_down) {
                return Ok(());
            }
            tracing::warn!(domain = %module.domain, secs = module.stop_timeout_s, "no ACPI shutdown in time: destroying");
        }
        let what = format!("destroy {}", module.domain);
        let destroyed = self.with_conn(module, &what, |conn| match Self::lookup(conn, module)? {
            Some(dom) => dom.destroy(),
            None => Ok(()),
        });
        if self.wait_for(module, DESTROY_TIMEOUT, VmState::is_down) {
            // Destroy may have raced with the end of the shutdown.
            return Ok(());
        }
        destroyed?;
        Err(DriverError::Timeout {
            what: format!("destroy of {}", module.domain),
            secs: DESTROY_TIMEOUT.as_secs(),
        })
    }

    fn state(&self, module: &Module) -> Result<VmState, DriverError> {
        let what = format!("state of {}", module.domain);
        self.with_conn(module, &what, |conn| match Self::lookup(conn, module)? {
            Some(dom) => Self::domain_state(&dom),
            None => Ok(VmState::Missing),
        })
    }

    fn watch_state(&self, module: &Module) -> Result<VmState, DriverError> {
        let delivered = match self.connection_events(module) {
            Ok((_, delivered)) => delivered,
            Err(_) => false, // `state` reports the failure
        };
        // Read before asking: an event during the call makes the next check ask again.
        let events = self.events.count(module);
        let now = Instant::now();
        if let Some(state) = answer_from_cache(
            lock(&self.watched).get(&module.name),
            delivered,
            events,
            now,
            self.vm_poll_every,
        ) {
            return Ok(state);
        }
        let result = self.state(module);
        match &result {
            Ok(state) => {
                lock(&self.watched).insert(
                    module.name.clone(),
                    Watched {
                        state: *state,
                        at: now,
                        events,
                    },
                );
            }
            Err(_) => self.unwatch(module),
        }
        result
    }

    fn state_changes(&self, module: &Module) -> Option<Arc<Notify>> {
        event_loop().then(|| self.events.notify(module))
    }

    fn migrate_live(&self, module: &Module, dest: &Path) -> Result<(), DriverError> {
        self.unwatch(module);
        let what = format!("live migration of {}", module.domain);
        let uri = module.libvirt_uri.as_str();
        // Not through `with_conn`: a migration is never retried behind the
        // caller's back.
        let conn = self
            .connection(module)
            .map_err(|e| DriverError::failed(format!("connecting to libvirt at {uri}"), e))?;
        let dom = Self::lookup(&conn, module)
            .map_err(|e| DriverError::failed(&what, e))?
            .ok_or_else(|| DriverError::failed(&what, "the domain is not defined here"))?;
        match Self::domain_state(&dom).map_err(|e| DriverError::failed(&what, e))? {
            VmState::Running => {}
            state => {
                return Err(DriverError::failed(
                    &what,
                    format!("the domain is {state:?} here, not running"),
                ))
            }
        }
        let xml = dom.xml_desc(0).map_err(|e| DriverError::failed(&what, e))?;
        crate::migrate::check_disks(&module.domain, &xml, &module.replicated)
            .map_err(|e| DriverError::failed(&what, e))?;
        let flags = match conn.lib_version() {
            Ok(version) if version >= SHARED_FILESYSTEMS_SINCE => {
                let conf = std::fs::read_to_string(QEMU_CONF).unwrap_or_default();
                let flags = migrate_flags(version, &conf, &module.replicated);
                if flags & sys::VIR_MIGRATE_UNSAFE == 0 {
                    tracing::info!(version, "qemu.conf's shared_filesystems holds the module's directories: migrating without VIR_MIGRATE_UNSAFE");
                }
                flags
            }
            _ => MIGRATE_FLAGS,
        };
        let dconnuri = format!("qemu+unix:///system?socket={}", dest.display());
        tracing::info!(domain = %module.domain, %dconnuri, flags, "live migration starts");
        // A hung migration (a peer gone silent) must not hang vmhad: after
        // the timeout the job is aborted, which makes the call return.
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watched = dom.clone();
        let timeout = self.migrate_timeout;
        let domain = module.domain.clone();
        let watchdog = std::thread::Builder::new()
            .name("migrate-watchdog".into())
            .spawn(move || {
                if finished.recv_timeout(timeout)
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return false;
                }
                tracing::warn!(%domain, secs = timeout.as_secs(), "live migration still running: aborting it");
                // Again until the call returns: a job in a phase that
                // cannot be aborted yet (or not started yet) refuses.
                let mut logged = false;
                loop {
                    // SAFETY: `watched` is a live domain handle (a reference
                    // of its own, freed when it drops after this thread);
                    // virDomainAbortJob takes it and no other pointer.
                    if unsafe { sys::virDomainAbortJob(watched.as_ptr()) } < 0 && !logged {
                        logged = true;
                        tracing::info!(%domain, "aborting the live migration: {}", VirtError::last_error());
                    }
                    if finished.recv_timeout(ABORT_RETRY)
                        != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    {
                        return true;
                    }
                }
            })
            .map_err(|e| DriverError::failed(&what, e))?;
        let started = Instant::now();
        let result = dom.migrate_to_uri2(Some(&dconnuri), None, None, flags, None, 0);
        let _ = done.send(());
        let aborted = watchdog.join().unwrap_or(false);
        match result {
            Ok(()) => {
                tracing::info!(domain = %module.domain, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "live migration done: the domain is paused on the peer");
                Ok(())
            }
            Err(_) if aborted => Err(DriverError::Timeout {
                what,
                secs: timeout.as_secs(),
            }),
            Err(e) => Err(DriverError::failed(what, e)),
        }
    }

    fn abort_migration(&self, module: &Module) -> Result<(), DriverError> {
        let what = format!("abort the migration of {}", module.domain);
        self.with_conn(module, &what, |conn| {
            let Some(dom) = Self::lookup(conn, module)? else {
                return Ok(());
            };
            // SAFETY: `dom` is a live domain handle owned by this closure
            // for the call's duration; virDomainAbortJob takes it and no
            // other pointer.
            if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
                let e = VirtError::last_error();
                // No job (it ended meanwhile): nothing to abort.
                if matches!(e.code(), Enum::Known(ErrorNumber::OperationInvalid)) {
                    return Ok(());
                }
                return Err(e);
            }
            Ok(())
        })
    }

    fn resume(&self, module: &Module) -> Result<(), DriverError> {
        self.unwatch(module);
        let what = format!("resume {}", module.domain);
        self.with_conn(module, &what, |conn| {
            let dom = conn.lookup_domain_by_name(&module.domain)?;
            match Self::domain_state(&dom)? {
                VmState::Running => Ok(()),
                _ => dom.resume(),
            }
        })
    }

    fn paused(&self, module: &Module) -> Result<Option<Paused>, DriverError> {
        use virt::domain::{DomainPausedReason, DomainStateReason};
        let what = format!("state of {}", module.domain);
        self.with_conn(module, &what, |conn| {
            let Some(dom) = Self::lookup(conn, module)? else {
                return Ok(None);
            };
            let (state, reason) = dom.state()?;
            if state != Enum::Known(DomainState::Paused) {
                return Ok(None);
            }
            Ok(Some(match reason {
                Enum::Known(DomainStateReason::Paused(Enum::Known(
                    DomainPausedReason::Migration,
                ))) => Paused::IncomingMigration,
                Enum::Known(DomainStateReason::Paused(Enum::Known(DomainPausedReason::User))) => {
                    Paused::User
                }
                _ => Paused::Other,
            }))
        })
    }

    fn refresh_xml(&self, module: &Module) -> Result<bool, DriverError> {
        if !lock(&self.defined).contains(&module.name) {
            return Ok(false);
        }
        let now = Instant::now();
        let xml_due = {
            // A redefinition (`virsh edit`) is a lifecycle event ("defined"):
            // with events, compare after one, else every XML_REFRESH_FALLBACK.
            let delivered = self.connection_events(module).is_ok_and(|(_, d)| d);
            let events = self.events.count(module);
            let mut checked = lock(&self.xml_checked);
            let skip = checked.get(&module.name).is_some_and(|&(at, seen)| {
                let since = now.saturating_duration_since(at);
                since < self.xml_every
                    || (delivered && seen == events && since < XML_REFRESH_FALLBACK)
            });
            if !skip {
                checked.insert(module.name.clone(), (now, events));
            }
            !skip
        };
        // Taking a snapshot is no lifecycle event: its names are listed every
        // `xml_every` (one RPC; the files are compared only on a change).
        let snapshots_due = {
            let mut checked = lock(&self.snapshots_checked);
            let skip = checked
                .get(&module.name)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.xml_every);
            if !skip {
                checked.insert(module.name.clone(), now);
            }
            !skip
        };
        let xml = if xml_due {
            self.refresh_domain_xml(module)?
        } else {
            false
        };
        let snapshots = if snapshots_due {
            self.export_snapshots(module)?
        } else {
            false
        };
        Ok(xml || snapshots)
    }
}

impl LibvirtDriver {
    /// [`VmDriver::refresh_xml`] for `<domain>.xml`.
    fn refresh_domain_xml(&self, module: &Module) -> Result<bool, DriverError> {
        let path = xml_path(module)?;
        let what = format!("inactive XML of {}", module.domain);
        let Some(xml) = self.with_conn(module, &what, |conn| {
            Self::lookup(conn, module)?
                .map(|dom| dom.xml_desc(XML_FLAGS))
                .transpose()
        })?
        else {
            return Ok(false);
        };
        match std::fs::read(&path) {
            Ok(bytes) if bytes == xml.as_bytes() => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::failed(
                    format!("reading {}", path.display()),
                    e,
                ))
            }
        }
        write_atomically(&path, xml.as_bytes())
            .map_err(|e| DriverError::failed(format!("writing {}", path.display()), e))?;
        Ok(true)
    }

    /// Writer: exports the domain's snapshots to [`snapshot_dir`] when the
    /// set of their names changed since the last export (after a define:
    /// compares every file). A file is removed only for a snapshot deleted
    /// here since the last export, so a snapshot whose redefinition failed
    /// keeps its file. `Ok(true)`: a file changed.
    fn export_snapshots(&self, module: &Module) -> Result<bool, DriverError> {
        let what = format!("snapshots of {}", module.domain);
        let last = lock(&self.snapshots_exported).get(&module.name).cloned();
        let found = self.with_conn(module, &what, |conn| {
            let Some(dom) = Self::lookup(conn, module)? else {
                return Ok(None);
            };
            let snaps = dom.list_all_snapshots(0)?;
            let mut names = snaps
                .iter()
                .map(|s| s.name())
                .collect::<Result<Vec<_>, _>>()?;
            names.sort();
            // Without snapshots (the usual case) one RPC per check, not two.
            let current = if names.is_empty() {
                None
            } else {
                match dom.current_snapshot(0) {
                    Ok(snap) => Some(snap.name()?),
                    Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomainSnapshot)) => {
                        None
                    }
                    Err(e) => return Err(e),
                }
            };
            let now = (names, current);
            if last.as_ref() == Some(&now) {
                return Ok(None);
            }
            let xmls = snaps
                .iter()
                .map(|s| Ok((s.name()?, s.xml_desc(sys::VIR_DOMAIN_SNAPSHOT_XML_SECURE)?)))
                .collect::<Result<Vec<_>, VirtError>>()?;
            Ok(Some((now, xmls)))
        })?;
        let Some((now, xmls)) = found else {
            return Ok(false);
        };
        let (names, current) = &now;
        let dir = snapshot_dir(module)?;
        let io = |what: &str, path: &Path, e: std::io::Error| {
            DriverError::failed(format!("{what} {}", path.display()), e)
        };
        let mut changed = false;
        if !xmls.is_empty() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io("creating", &dir, e))?;
        }
        for (name, xml) in &xmls {
            let Some(file) = snapshot_file_name(name) else {
                tracing::warn!(domain = %module.domain, snapshot = %name, "snapshot name unfit for a file name: not exported");
                continue;
            };
            let path = dir.join(file);
            match std::fs::read(&path) {
                Ok(bytes) if bytes == xml.as_bytes() => continue,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("reading", &path, e)),
            }
            write_atomically(&path, xml.as_bytes()).map_err(|e| io("writing", &path, e))?;
            tracing::info!(domain = %module.domain, snapshot = %name, path = %path.display(), "snapshot XML exported");
            changed = true;
        }
        let current_path = dir.join(CURRENT_FILE);
        match current {
            Some(name) if std::fs::read(&current_path).ok().as_deref() != Some(name.as_bytes()) => {
                write_atomically(&current_path, name.as_bytes())
                    .map_err(|e| io("writing", &current_path, e))?;
                changed = true;
            }
            None if current_path.exists() => {
                std::fs::remove_file(&current_path)
                    .map_err(|e| io("removing", &current_path, e))?;
                changed = true;
            }
            _ => {}
        }
        let gone_names = last.iter().flat_map(|(names, _)| names);
        for gone in gone_names.filter(|n| !names.contains(n)) {
            let Some(file) = snapshot_file_name(gone) else {
                continue;
            };
            let path = dir.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(domain = %module.domain, snapshot = %gone, "snapshot deleted: its XML removed");
                    changed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &path, e)),
            }
        }
        lock(&self.snapshots_exported).insert(module.name.clone(), now);
        Ok(changed)
    }

    /// After a define: redefines the snapshots saved in [`snapshot_dir`]
    /// (parents first) and drops the local metadata of snapshots no longer
    /// there (metadata only: no disk data is touched). Without the directory
    /// (never exported) the local metadata stays. Failures are logged, never
    /// fatal: the VM must start without its snapshot metadata too. Returns
    /// what failed (for tests).
    fn redefine_snapshots(&self, module: &Module) -> Vec<String> {
        let read = snapshot_dir(module).and_then(|dir| {
            let failed = |e| DriverError::failed(format!("reading {}", dir.display()), e);
            let saved = read_snapshot_dir(&dir).map_err(failed)?;
            let current = match std::fs::read_to_string(dir.join(CURRENT_FILE)) {
                Ok(name) => Some(name),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(failed(e)),
            };
            Ok(saved.map(|saved| (saved, current)))
        });
        let (saved, current) = match read {
            Ok(Some((saved, current))) => (parents_first(saved), current),
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::warn!(domain = %module.domain, error = %e, "snapshots not redefined");
                return vec![e.to_string()];
            }
        };
        let what = format!("redefine the snapshots of {}", module.domain);
        let result = self.with_conn(module, &what, |conn| {
            let mut redefined = Vec::new();
            let mut failed = Vec::new();
            let mut dropped = Vec::new();
            let Some(dom) = Self::lookup(conn, module)? else {
                return Ok((redefined, failed, dropped));
            };
            for (name, xml) in &saved {
                let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE;
                if current.as_deref() == Some(name.as_str()) {
                    flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT;
                }
                match dom.create_snapshot_xml(xml, flags) {
                    Ok(_) => redefined.push(name.clone()),
                    Err(e) if !conn.is_alive().unwrap_or(false) => return Err(e),
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
            for snap in dom.list_all_snapshots(0)? {
                let name = snap.name()?;
                if saved.iter().all(|(n, _)| *n != name) {
                    match snap.delete(sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY) {
                        Ok(()) => dropped.push(name),
                        Err(e) => failed.push(format!("dropping the metadata of {name}: {e}")),
                    }
                }
            }
            Ok((redefined, failed, dropped))
        });
        match result {
            Ok((redefined, failed, dropped)) => {
                if !redefined.is_empty() || !dropped.is_empty() {
                    tracing::info!(domain = %module.domain, ?redefined, ?dropped, "snapshots redefined from the replicated XML");
                }
                if !failed.is_empty() {
                    tracing::warn!(domain = %module.domain, ?failed, "some snapshots could not be redefined");
                }
                failed
            }
            Err(e) => {
                tracing::warn!(domain = %module.domain, error = %e, "snapshots not redefined");
                vec![e.to_string()]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn shared_filesystems_are_read_from_qemu_conf() {
        let conf = r#"
# shared_filesystems = [ "/commented" ]
user = "root"
shared_filesystems = [
  "/var/lib/libvirt/images",   # the vmha mounts
  "/srv/shared"
]
"#;
        assert_eq!(
            shared_filesystems(conf),
            [
                PathBuf::from("/var/lib/libvirt/images"),
                PathBuf::from("/srv/shared")
            ]
        );
        assert!(shared_filesystems("# shared_filesystems = [\"/x\"]\n").is_empty());
        assert!(shared_filesystems("").is_empty());
    }

    #[test]
    fn unsafe_is_dropped_only_where_libvirt_treats_every_directory_as_shared() {
        let conf = r#"shared_filesystems = [ "/var/lib/libvirt/images" ]"#;
        let dirs = [PathBuf::from("/var/lib/libvirt/images/vm1")];
        let safe = MIGRATE_FLAGS & !sys::VIR_MIGRATE_UNSAFE;
        assert_eq!(migrate_flags(SHARED_FILESYSTEMS_SINCE, conf, &dirs), safe);
        // Debian 12's libvirt 9.0: always UNSAFE (vmhad checked the disks).
        assert_eq!(migrate_flags(9_000_000, conf, &dirs), MIGRATE_FLAGS);
        // A directory outside the listed paths, or no list: UNSAFE.
        let two = [dirs[0].clone(), PathBuf::from("/srv/vm1-snapshots")];
        assert_eq!(
            migrate_flags(SHARED_FILESYSTEMS_SINCE, conf, &two),
            MIGRATE_FLAGS
        );
        assert_eq!(
            migrate_flags(SHARED_FILESYSTEMS_SINCE, "", &dirs),
            MIGRATE_FLAGS
        );
        // A prefix of a name is not its parent.
        let sibling = [PathBuf::from("/var/lib/libvirt/images2/vm1")];
        assert_eq!(
            migrate_flags(SHARED_FILESYSTEMS_SINCE, conf, &sibling),
            MIGRATE_FLAGS
        );
    }

    #[test]
    fn states() {
        let k = |s| Enum::Known(s);
        assert_eq!(map_state(k(DomainState::Running), true), VmState::Running);
        assert_eq!(map_state(k(DomainState::Blocked), true), VmState::Running);
        assert_eq!(map_state(k(DomainState::Shutdown), true), VmState::Running);
        assert_eq!(map_state(k(DomainState::Paused), true), VmState::Paused);
        assert_eq!(
            map_state(k(DomainState::PMSuspended), true),
            VmState::Paused
        );
        assert_eq!(map_state(k(DomainState::Shutoff), false), VmState::ShutOff);
        assert_eq!(map_state(k(DomainState::Crashed), false), VmState::Crashed);
        assert_eq!(map_state(k(DomainState::NoState), true), VmState::Running);
        assert_eq!(map_state(k(DomainState::NoState), false), VmState::ShutOff);
        assert_eq!(map_state(Enum::Unknown(99), false), VmState::ShutOff);
    }

    #[test]
    fn uuids() {
        let xml = "<domain type='kvm'>\n  <name>vm1</name>\n  \
                   <uuid>1B4E28BA-2FA1-11D2-883F-0016D3CCA427</uuid>\n</domain>";
        assert_eq!(
            xml_uuid(xml).as_deref(),
            Some("1b4e28ba2fa111d2883f0016d3cca427")
        );
        assert_eq!(
            normalise_uuid("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            "1b4e28ba2fa111d2883f0016d3cca427"
        );
        assert_eq!(xml_uuid("<domain><name>vm1</name></domain>"), None);
        let added = with_uuid(
            "<?xml version='1.0'?>\n<domain type='kvm'><name>vm1</name></domain>",
            "ab-cd",
        )
        .unwrap();
        assert_eq!(
            added,
            "<?xml version='1.0'?>\n<domain type='kvm'><uuid>ab-cd</uuid><name>vm1</name></domain>"
        );
        assert_eq!(xml_uuid(&added).as_deref(), Some("abcd"));
        assert_eq!(with_uuid("<vm/>", "x"), None);
    }

    #[test]
    fn atomic_write_replaces_and_keeps_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.xml");
        write_atomically(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vm1.xml")]);
    }

    /// libvirt's in-process test driver: real API, no daemon.
    const TEST_URI: &str = "test:///default";

    fn module(domain: &str, dir: &Path) -> Module {
        Module {
            name: domain.to_string(),
            domain: domain.to_string(),
            libvirt_uri: TEST_URI.to_string(),
            replicated: vec![dir.to_path_buf()],
            port: 7101,
            replication_network: 0,
            default_primary: None,
            failover: true,
            lock_timeout_ms: 1000,
            stop_timeout_s: 2,
            rate_limit_mb_s: 0,
            resync_streams: 0,
            protocol: vmha_fs::Protocol::C,
            local_writes: vmha_fs::LocalWrites::Cached,
            maxloop: 3,
            loop_interval_s: 60,
            swap: Default::default(),
        }
    }

    fn test_xml(name: &str, uuid: Option<&str>, description: &str) -> String {
        let uuid = uuid
            .map(|u| format!("<uuid>{u}</uuid>"))
            .unwrap_or_default();
        format!(
            "<domain type='test'><name>{name}</name>{uuid}<description>{description}</description>\
             <memory>65536</memory><os><type>hvm</type></os></domain>"
        )
    }

    fn write_xml(m: &Module, xml: &str) {
        std::fs::write(xml_path(m).unwrap(), xml).unwrap();
    }

    fn uuid_of(m: &Module) -> String {
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        normalise_uuid(&dom.uuid_string().unwrap())
    }

    #[test]
    fn define_start_stop_on_the_test_driver() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-lifecycle", dir.path());
        let d = LibvirtDriver::with_start_timeout(Duration::from_secs(5));
        assert_eq!(d.state(&m).unwrap(), VmState::Missing);
        assert!(d.start(&m).is_err(), "start of an undefined domain");
        assert!(d.define(&m).is_err(), "no XML file yet");
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        d.define(&m).unwrap();
        assert_eq!(d.state(&m).unwrap(), VmState::ShutOff);
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        assert!(!dom.autostart().unwrap(), "autostart stays off");
        d.start(&m).unwrap();
        assert_eq!(d.state(&m).unwrap(), VmState::Running);
        d.start(&m).unwrap(); // already running: fine
        dom.suspend().unwrap();
        assert_eq!(d.state(&m).unwrap(), VmState::Paused);
        d.stop(&m).unwrap();
        assert_eq!(d.state(&m).unwrap(), VmState::ShutOff);
        d.stop(&m).unwrap(); // already off: fine
                             // Redefining the same domain (same UUID) while it runs is fine.
        d.start(&m).unwrap();
        d.define(&m).unwrap();
        d.stop(&m).unwrap();
        dom.undefine().unwrap();
    }

    /// Each module calls libvirt on its own connection, so libvirtd's
    /// per-connection request limit (`max_client_requests`) does not queue
    /// one module's start behind another's.
    #[test]
    fn one_connection_per_module() {
        let dir = tempfile::tempdir().unwrap();
        let a = module("vmha-conn-a", dir.path());
        let b = module("vmha-conn-b", dir.path());
        let d = LibvirtDriver::new();
        assert_eq!(d.state(&a).unwrap(), VmState::Missing);
        assert_eq!(d.state(&a).unwrap(), VmState::Missing);
        assert_eq!(d.connections(), 1, "a module reuses its connection");
        assert_eq!(d.state(&b).unwrap(), VmState::Missing);
        assert_eq!(d.connections(), 2, "another module has its own");
    }

    #[test]
    fn watched_state_is_answered_from_the_cache_only_without_news() {
        let t0 = Instant::now();
        let every = Duration::from_secs(2);
        let last = Watched {
            state: VmState::Running,
            at: t0,
            events: 3,
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            answer_from_cache(Some(&last), true, 3, at(1999), every),
            Some(VmState::Running)
        );
        assert_eq!(
            answer_from_cache(Some(&last), true, 4, at(10), every),
            None,
            "an event came: ask"
        );
        assert_eq!(
            answer_from_cache(Some(&last), true, 3, at(2000), every),
            None,
            "the fixed period is over: ask"
        );
        assert_eq!(
            answer_from_cache(Some(&last), false, 3, at(10), every),
            None,
            "no events on the connection: ask at every check"
        );
        assert_eq!(answer_from_cache(None, true, 3, at(10), every), None);
    }

    /// The checker's view follows lifecycle events: with a poll period of an
    /// hour, a domain destroyed behind the driver's back is still seen down,
    /// and the module's change notice fires.
    #[test]
    fn watched_state_follows_lifecycle_events() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-events", dir.path());
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        let d = LibvirtDriver::with_start_timeout(Duration::from_secs(5))
            .with_vm_poll_every(Duration::from_secs(3600));
        d.define(&m).unwrap();
        d.start(&m).unwrap();
        let changes = d.state_changes(&m).expect("an event loop");
        assert_eq!(d.watch_state(&m).unwrap(), VmState::Running);
        assert_eq!(d.watch_state(&m).unwrap(), VmState::Running);
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        dom.destroy().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), changes.notified())
                .await
                .expect("a change notice after the destroy");
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.watch_state(&m).unwrap() != VmState::ShutOff {
            assert!(Instant::now() < deadline, "the destroy was not seen");
            std::thread::sleep(Duration::from_millis(20));
        }
        dom.undefine().unwrap();
    }

    /// Comparing libvirt's XML with the file costs an RPC and a read through
    /// the mount: at most once per `xml_every` per module.
    #[test]
    fn refresh_compares_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-refresh-rate", dir.path());
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        let d = LibvirtDriver::new().with_xml_refresh_every(Duration::from_secs(3600));
        d.define(&m).unwrap();
        assert!(
            d.refresh_xml(&m).unwrap(),
            "the first compare writes libvirt's XML"
        );
        std::fs::write(xml_path(&m).unwrap(), "stale").unwrap();
        assert!(
            !d.refresh_xml(&m).unwrap(),
            "no second compare within the interval"
        );
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        conn.lookup_domain_by_name(&m.domain)
            .unwrap()
            .undefine()
            .unwrap();
    }

    /// With events, a redefinition is compared after its event, not at
    /// every interval: no compare while nothing happens.
    #[test]
    fn refresh_compares_after_a_redefinition_event() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-refresh-event", dir.path());
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        let d = LibvirtDriver::new().with_xml_refresh_every(Duration::ZERO);
        d.define(&m).unwrap();
        assert!(d.refresh_xml(&m).unwrap(), "the first compare writes");
        // The define's own event arrives asynchronously: let it be compared.
        std::thread::sleep(Duration::from_millis(500));
        d.refresh_xml(&m).unwrap();
        // Nothing happened: no compare, even of a file changed behind its back.
        std::fs::write(xml_path(&m).unwrap(), "stale").unwrap();
        assert!(!d.refresh_xml(&m).unwrap(), "no event: no compare");
        // `virsh edit`: a "defined" event, then a compare.
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        let text = dom.xml_desc(XML_FLAGS).unwrap();
        conn.define_domain_xml(&text.replace("<description>one", "<description>edited"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.refresh_xml(&m).unwrap() {
            assert!(
                Instant::now() < deadline,
                "the redefinition was not compared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = std::fs::read_to_string(xml_path(&m).unwrap()).unwrap();
        assert!(now.contains("<description>edited</description>"), "{now}");
        dom.undefine().unwrap();
    }

    #[test]
    fn refresh_rewrites_the_file_only_when_libvirt_differs() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-refresh", dir.path());
        let d = LibvirtDriver::new().with_xml_refresh_every(Duration::ZERO);
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        assert!(!d.refresh_xml(&m).unwrap(), "not defined by the driver");
        d.define(&m).unwrap();
        // The first refresh writes libvirt's normalised form (with the UUID).
        assert!(d.refresh_xml(&m).unwrap());
        let text = std::fs::read_to_string(xml_path(&m).unwrap()).unwrap();
        assert_eq!(xml_uuid(&text), Some(uuid_of(&m)));
        assert!(!d.refresh_xml(&m).unwrap(), "unchanged: no rewrite");
        assert!(!d.refresh_xml(&m).unwrap(), "unchanged: no rewrite");
        // An operator redefines it (`virsh edit`).
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let edited = text.replace("<description>one", "<description>edited");
        assert_ne!(edited, text);
        conn.define_domain_xml(&edited).unwrap();
        // Compared once its lifecycle event arrived.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.refresh_xml(&m).unwrap() {
            assert!(
                Instant::now() < deadline,
                "the redefinition was not compared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = std::fs::read_to_string(xml_path(&m).unwrap()).unwrap();
        assert!(now.contains("<description>edited</description>"), "{now}");
        assert!(!d.refresh_xml(&m).unwrap());
        // After a failed define the local definition must not overwrite the file.
        write_xml(&m, "not xml");
        assert!(d.define(&m).is_err());
        assert!(!d.refresh_xml(&m).unwrap());
        assert_eq!(std::fs::read(xml_path(&m).unwrap()).unwrap(), b"not xml");
        conn.lookup_domain_by_name(&m.domain)
            .unwrap()
            .undefine()
            .unwrap();
    }

    #[test]
    fn snapshot_names_parents_and_order() {
        assert_eq!(snapshot_file_name("int1").as_deref(), Some("int1.xml"));
        for bad in ["", ".hidden", "a/b", "a\0b"] {
            assert_eq!(snapshot_file_name(bad), None, "{bad:?}");
        }
        let snap = |name: &str, parent: Option<&str>| {
            let parent = parent
                .map(|p| format!("<parent>\n    <name>{p}</name>\n  </parent>"))
                .unwrap_or_default();
            format!(
                "<domainsnapshot>\n  <name>{name}</name>\n  {parent}\n  \
                 <domain type='qemu'><name>vm1</name><devices><parent><name>x</name></parent>\
                 </devices></domain>\n</domainsnapshot>"
            )
        };
        assert_eq!(snapshot_parent(&snap("a", Some("b"))), Some("b"));
        // A `<parent>` inside the embedded domain is not the snapshot's.
        assert_eq!(snapshot_parent(&snap("a", None)), None);
        let input = vec![
            (
                "a-grandchild".to_string(),
                snap("a-grandchild", Some("b-child")),
            ),
            ("b-child".to_string(), snap("b-child", Some("c-root"))),
            ("c-root".to_string(), snap("c-root", None)),
            ("d-orphan".to_string(), snap("d-orphan", Some("gone"))),
        ];
        let order: Vec<String> = parents_first(input).into_iter().map(|(n, _)| n).collect();
        assert_eq!(order, ["c-root", "b-child", "a-grandchild", "d-orphan"]);
        // A cycle does not hang.
        let cycle = vec![
            ("x".to_string(), snap("x", Some("y"))),
            ("y".to_string(), snap("y", Some("x"))),
        ];
        assert_eq!(parents_first(cycle).len(), 2);
    }

    fn snapshot_names(dom: &Domain) -> Vec<String> {
        let mut names: Vec<String> = dom
            .list_all_snapshots(0)
            .unwrap()
            .iter()
            .map(|s| s.name().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The writer exports each snapshot's XML beside the domain XML; the node
    /// that defines the domain from there gets the same snapshots (parents
    /// first, so `b-parent` before `a-child`), and a deletion on the writer
    /// removes the file.
    #[test]
    fn snapshots_are_exported_and_redefined() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-snapshots", dir.path());
        write_xml(&m, &test_xml(&m.domain, None, "one"));
        let d = LibvirtDriver::new().with_xml_refresh_every(Duration::ZERO);
        d.define(&m).unwrap();
        d.refresh_xml(&m).unwrap();
        let sdir = snapshot_dir(&m).unwrap();
        assert_eq!(sdir, dir.path().join("vmha-snapshots.snapshots"));
        assert!(!sdir.exists(), "no snapshots: no directory");
        let conn = Connect::open(Some(TEST_URI)).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        for name in ["b-parent", "a-child"] {
            let xml = format!("<domainsnapshot><name>{name}</name></domainsnapshot>");
            dom.create_snapshot_xml(&xml, 0).unwrap();
        }
        assert!(d.refresh_xml(&m).unwrap(), "new snapshots exported");
        assert_eq!(
            std::fs::read_to_string(sdir.join(CURRENT_FILE)).unwrap(),
            "a-child"
        );
        let child = std::fs::read_to_string(sdir.join("a-child.xml")).unwrap();
        assert_eq!(snapshot_parent(&child), Some("b-parent"));
        assert!(sdir.join("b-parent.xml").is_file());
        assert!(!d.refresh_xml(&m).unwrap(), "unchanged: nothing written");

        // The other node: the domain defined from the replicated XML, without
        // snapshot metadata (here: undefined with it, then defined again).
        // (Dropping stale local metadata needs `DELETE_METADATA_ONLY`, which
        // the test driver lacks: the qemu driver has it.)
        dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            .unwrap();
        d.define(&m).unwrap();
        let dom = conn.lookup_domain_by_name(&m.domain).unwrap();
        assert_eq!(snapshot_names(&dom), ["a-child", "b-parent"]);
        let parent = Domain::lookup_snapshot_by_name(&dom, "a-child", 0)
            .unwrap()
            .parent(0)
            .unwrap();
        assert_eq!(parent.name().unwrap(), "b-parent");
        assert_eq!(dom.current_snapshot(0).unwrap().name().unwrap(), "a-child");
        // Redefining over the same metadata (the node that ran the domain
        // before takes it back) is fine.
        assert_eq!(d.redefine_snapshots(&m), Vec::<String>::new());
        assert_eq!(snapshot_names(&dom), ["a-child", "b-parent"]);
        // A file libvirt refuses is reported, the others are redefined.
        std::fs::write(sdir.join("broken.xml"), "<domainsnapshot>").unwrap();
        let failed = d.redefine_snapshots(&m);
        assert!(
            failed.len() == 1 && failed[0].starts_with("broken: "),
            "{failed:?}"
        );
        std::fs::remove_file(sdir.join("broken.xml")).unwrap();

        // Deleted on the writer: its file goes, the other stays.
        assert!(!d.refresh_xml(&m).unwrap(), "the files are libvirt's XML");
        Domain::lookup_snapshot_by_name(&dom, "a-child", 0)
            .unwrap()
            .delete(0)
            .unwrap();
        assert!(d.refresh_xml(&m).unwrap());
        assert!(!sdir.join("a-child.xml").exists());
        assert!(sdir.join("b-parent.xml").is_file());
        dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            .unwrap();
    }

    #[test]
    fn define_replaces_a_stopped_domain_with_another_uuid_but_not_a_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = module("vmha-uuid", dir.path());
        let d = LibvirtDriver::with_start_timeout(Duration::from_secs(5));
        let (u1, u2, u3) = (
            "11111111-2222-3333-4444-555555555551",
            "11111111-2222-3333-4444-555555555552",
            "11111111-2222-3333-4444-555555555553",
        );
        write_xml(&m, &test_xml(&m.domain, Some(u1), "one"));
        d.define(&m).unwrap();
        assert_eq!(uuid_of(&m), normalise_uuid(u1));
        // Re-created elsewhere: another UUID. Not running here: replaced.
        write_xml(&m, &test_xml(&m.domain, Some(u2), "two"));
        d.define(&m).unwrap();
        assert_eq!(uuid_of(&m), normalise_uuid(u2));
        // A file without a UUID keeps the UUID defined here.
        write_xml(&m, &test_xml(&m.domain, None, "three"));
        d.define(&m).unwrap();
        assert_eq!(uuid_of(&m), normalise_uuid(u2));
        // Running here: refused, the running definition stays.
        write_xml(&m, &test_xml(&m.domain, Some(u2), "two"));
        d.define(&m).unwrap();
        d.start(&m).unwrap();
        write_xml(&m, &test_xml(&m.domain, Some(u3), "four"));
        let err = d.define(&m).unwrap_err().to_string();
        assert!(err.contains("runs on this node"), "{err}");
        assert_eq!(uuid_of(&m), normalise_uuid(u2));
        assert_eq!(d.state(&m).unwrap(), VmState::Running);
        // An invalid new definition leaves the old one in place.
        d.stop(&m).unwrap();
        write_xml(
            &m,
            &format!(
                "<domain type='test'><name>{}</name><uuid>{u3}</uuid><memory>oops</memory></domain>",
                m.domain
            ),
        );
        assert!(d.define(&m).is_err());
        assert_eq!(uuid_of(&m), normalise_uuid(u2));
        Connect::open(Some(TEST_URI))
            .unwrap()
            .lookup_domain_by_name(&m.domain)
            .unwrap()
            .undefine()
            .unwrap();
    }
}
