//! The libvirt side of a live swap: the destination's libvirt reached
//! through the daemon channel, and the check that a domain's disks may be
//! migrated as shared storage.
//!
//! Why forward libvirt over our own channel: a peer-to-peer tunnelled
//! migration (`VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_TUNNELLED`) makes the
//! source's libvirtd open a libvirt connection to the destination and send
//! the migration stream inside it. libvirt would reach the peer through its
//! own TCP/TLS listener or ssh, which operators would have to set up and
//! secure. Instead the source's libvirtd is given a local unix socket
//! ([`Forwarder`]); every connection to it becomes an authenticated
//! daemon-channel session to the peer's vmhad (channel version 4,
//! [`crate::channel::Message::LibvirtStream`]), which connects it to its own
//! local libvirt socket ([`libvirt_socket`]). The stream travels over the
//! module's replication network, authenticated frame by frame with the
//! cluster key; nothing listens beyond vmhad's channel port.
//!
//! Why the disk check ([`check_disks`]): the migration treats the disks as
//! shared storage (never `NON_SHARED_*`: the data is already on the peer
//! through vmha-fs). libvirt cannot recognise a FUSE mount as shared and
//! would refuse without `VIR_MIGRATE_UNSAFE`; with it, libvirt checks
//! nothing, so vmhad checks what makes it safe: every disk lies inside the
//! module's replicated directories (the same path on both nodes, the same
//! data) and is opened with `cache='none'` (no host page cache holding
//! writes the destination would not see).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmha_fs::key::ClusterKey;

use crate::channel::{ChannelError, Client};
use crate::config::{Config, Module, NodeIndex};
use crate::driver::{DriverError, VmDriver};

/// The system libvirtd's socket (`qemu:///system`, monolithic daemon).
pub const LIBVIRTD_SOCKET: &str = "/run/libvirt/libvirt-sock";
/// The modular QEMU daemon's socket (`qemu:///system` with virtqemud).
pub const VIRTQEMUD_SOCKET: &str = "/run/libvirt/virtqemud-sock";
/// The forwarded socket's file name inside its private directory.
const SOCKET_NAME: &str = "libvirt.sock";
/// How often the accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Errors of the live-migration primitives.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("libvirt_uri `{uri}`: {why}")]
    Uri { uri: String, why: String },
    #[error("cannot read the domain's XML: {0}")]
    Xml(String),
    #[error("cannot live-migrate {domain}: {}", .problems.join("; "))]
    Disks {
        domain: String,
        problems: Vec<String>,
    },
    #[error("libvirt forwarder: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(
        "the peer has no address on network {network} (module {module}'s replication network)"
    )]
    NoPeerAddress { module: String, network: usize },
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// The local unix socket of a libvirt URI, for the peer's side of the
/// forward: `qemu:///system` (or `qemu+unix:///system`) is the system
/// daemon's socket ([`LIBVIRTD_SOCKET`], else [`VIRTQEMUD_SOCKET`] when only
/// the modular daemon runs); a `?socket=PATH` parameter names it explicitly.
/// Remote URIs and session daemons are refused (vmhad forwards only its own
/// node's system libvirt).
pub fn libvirt_socket(uri: &str) -> Result<PathBuf, MigrateError> {
    let bad = |why: &str| MigrateError::Uri {
        uri: uri.to_string(),
        why: why.to_string(),
    };
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad("not a libvirt URI"))?;
    if scheme != "qemu" && scheme != "qemu+unix" {
        return Err(bad(
            "live swap forwards only a local QEMU libvirt (qemu:///system or qemu+unix:///system)",
        ));
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(bad(
            "names a remote host: live swap forwards only this node's libvirt",
        ));
    }
    if path != "/system" {
        return Err(bad("live swap needs the system daemon (`/system`)"));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        if let Some(socket) = param.strip_prefix("socket=") {
            let socket = PathBuf::from(socket);
            if !socket.is_absolute() {
                return Err(bad("socket= must be an absolute path"));
            }
            return Ok(socket);
        }
    }
    if !Path::new(LIBVIRTD_SOCKET).exists() && Path::new(VIRTQEMUD_SOCKET).exists() {
        return Ok(VIRTQEMUD_SOCKET.into());
    }
    Ok(LIBVIRTD_SOCKET.into())
}

/// `path` with `.` and `..` resolved lexically; `None` if relative or if
/// `..` climbs above `/`.
fn normalise(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Checks, from a domain's live XML, that every disk may be live-migrated
/// as shared storage: each `<disk>` of type `file` or `block` (and every
/// file of its `<backingStore>` chain) lies inside one of `dirs` (the
/// module's replicated directories; `..` resolved) and has
/// `<driver cache='none'/>` (a `<readonly/>` disk needs no cache mode:
/// nothing is written through it). A cdrom or floppy without media is
/// ignored; any other disk type (network, volume, dir, nvme) is refused.
/// The error names each offending disk and why.
pub fn check_disks(domain: &str, xml: &str, dirs: &[PathBuf]) -> Result<(), MigrateError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| MigrateError::Xml(e.to_string()))?;
    let dirs: Vec<PathBuf> = dirs.iter().filter_map(|d| normalise(d)).collect();
    let inside =
        |p: &str| normalise(Path::new(p)).is_some_and(|p| dirs.iter().any(|d| p.starts_with(d)));
    let dir_list = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut problems = Vec::new();
    let devices = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"));
    for disk in devices
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk"))
    {
        let kind = disk.attribute("type").unwrap_or("file");
        let device = disk.attribute("device").unwrap_or("disk");
        let child = |name: &str| disk.children().find(|n| n.has_tag_name(name));
        let target = child("target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("?");
        let source = child("source").and_then(|s| s.attribute("file").or(s.attribute("dev")));
        let removable = device == "cdrom" || device == "floppy";
        let name = match source {
            Some(s) => format!("disk {target} ({s})"),
            None => format!("disk {target}"),
        };
        if source.is_none()
            && removable
            && child("source").is_none_or(|s| s.attributes().len() == 0)
        {
            continue; // An empty drive.
        }
        if kind != "file" && kind != "block" {
            problems.push(format!(
                "{name}: type '{kind}' (only file or block disks inside the module's directories can be migrated)"
            ));
            continue;
        }
        let Some(source) = source else {
            problems.push(format!("{name}: no source file or device"));
            continue;
        };
        if !inside(source) {
            problems.push(format!(
                "{name}: outside the module's replicated directories ({dir_list})"
            ));
        }
        // The backing chain: every layer must be on the peer too.
        let mut layer = child("backingStore");
        while let Some(b) = layer {
            let file = b
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| s.attribute("file").or(s.attribute("dev")));
            if let Some(file) = file {
                if !inside(file) {
                    problems.push(format!(
                        "{name}: backing file {file} outside the module's replicated directories ({dir_list})"
                    ));
                }
            } else if b
                .attribute("type")
                .is_some_and(|t| t != "file" && t != "block")
            {
                problems.push(format!(
                    "{name}: backing store of type '{}'",
                    b.attribute("type").unwrap_or("?")
                ));
            }
            layer = b.children().find(|n| n.has_tag_name("backingStore"));
        }
        let readonly = child("readonly").is_some();
        let cache = child("driver").and_then(|d| d.attribute("cache"));
        if !readonly && cache != Some("none") {
            problems.push(format!(
                "{name}: cache='{}', needs <driver cache='none'/>",
                cache.unwrap_or("default")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::Disks {
            domain: domain.to_string(),
            problems,
        })
    }
}

/// vmhad's run directory: that of its control socket (`/run/vmha` by
/// default). The forwarded sockets are made there.
pub fn run_dir(config: &Config) -> PathBuf {
    config
        .cluster
        .control_socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/run/vmha"))
}

/// The peer's daemon channel on `module`'s replication network (the
/// migration stream rides it).
pub fn peer_channel_addr(
    config: &Config,
    peer: NodeIndex,
    module: &Module,
) -> Option<std::net::SocketAddr> {
    let ip = config
        .node(peer)
        .addresses
        .get(module.replication_network)
        .or_else(|| config.node(peer).addresses.first())?;
    Some(std::net::SocketAddr::new(*ip, config.cluster.channel_port))
}

/// The libvirt side of a live swap on the source, in one call: forwards the
/// peer's libvirt for the duration of the call ([`Forwarder`], to the peer's
/// vmhad on `module`'s replication network) and live-migrates `module`'s
/// domain there with [`VmDriver::migrate_live`] (disk check, then
/// `LIVE | PEER2PEER | TUNNELLED | PAUSED | UNSAFE`). On success the domain
/// is paused on the peer and gone here. Blocks: run it where the daemon runs
/// driver calls (`spawn_blocking`); bounded by the driver's migration timeout
/// (the migration is aborted then) plus the channel's connect timeout.
pub fn live_migrate(
    vm: &dyn VmDriver,
    config: &Config,
    key: &ClusterKey,
    peer: NodeIndex,
    module: &Module,
) -> Result<(), MigrateError> {
    let addr =
        peer_channel_addr(config, peer, module).ok_or_else(|| MigrateError::NoPeerAddress {
            module: module.name.clone(),
            network: module.replication_network,
        })?;
    let forwarder = Forwarder::start(&run_dir(config), addr, key, &module.name)?;
    let result = vm.migrate_live(module, forwarder.socket());
    drop(forwarder);
    Ok(result?)
}

/// A private unix socket that leads to the peer's libvirt: every connection
/// accepted on it becomes a daemon-channel session to the peer's vmhad
/// ([`Client::libvirt_stream`]) copied both ways until either side closes.
/// It lives as long as this value (one migration): dropping it stops
/// accepting, closes the connections still open and removes the socket and
/// its directory.
///
/// The socket (mode 0600) is in a directory of its own (mode 0700) under
/// vmhad's run directory, so no other user can connect even between its
/// creation and its chmod.
#[derive(Debug)]
pub struct Forwarder {
    dir: PathBuf,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// The accepted connections (clones, to shut them down on drop).
    open: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Checks that the peer's vmhad at `peer` serves libvirt streams (channel
    /// version 4; older: [`ChannelError::TooOldForLiveSwap`]), then listens.
    /// `module`: whose `libvirt_uri` the peer connects to.
    pub fn start(
        run_dir: &Path,
        peer: std::net::SocketAddr,
        key: &ClusterKey,
        module: &str,
    ) -> Result<Forwarder, MigrateError> {
        Client::connect(peer, key)?.check_libvirt_stream()?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| MigrateError::Io { what, path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(run_dir)
            .map_err(io("creating", run_dir))?;
        let dir = run_dir.join(format!(
            "migrate-{module}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io("creating", &dir))?;
        let socket = dir.join(SOCKET_NAME);
        let cleanup = |e| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let listener = UnixListener::bind(&socket)
            .map_err(io("listening on", &socket))
            .map_err(cleanup)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", &socket))
            .map_err(cleanup)?;
        listener
            .set_nonblocking(true)
            .map_err(io("listening on", &socket))
            .map_err(cleanup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (t_stop, t_open, key, module) = (
            Arc::clone(&stop),
            Arc::clone(&open),
            key.clone(),
            module.to_string(),
        );
        let thread = std::thread::Builder::new()
            .name("libvirt-forward".into())
            .spawn(move || accept_loop(&listener, &t_stop, &t_open, peer, &key, &module))
            .map_err(io("starting the thread for", &socket))
            .map_err(cleanup)?;
        tracing::info!(socket = %socket.display(), %peer, "forwarding the peer's libvirt");
        Ok(Forwarder {
            dir,
            socket,
            stop,
            open,
            thread: Some(thread),
        })
    }

    /// The forwarded socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The libvirt URI of the peer's system daemon through this forwarder
    /// (`dconnuri` of a peer-to-peer migration, or `virsh -c`).
    pub fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.socket.display())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    open: &Mutex<Vec<UnixStream>>,
    peer: std::net::SocketAddr,
    key: &ClusterKey,
    module: &str,
) {
    while !stop.load(Ordering::Relaxed) {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("libvirt forwarder: accept failed: {e}");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if let Err(e) = conn.set_nonblocking(false) {
            tracing::warn!("libvirt forwarder: {e}");
            continue;
        }
        match conn.try_clone() {
            Ok(clone) => lock(open).push(clone),
            Err(e) => {
                tracing::warn!("libvirt forwarder: {e}");
                continue;
            }
        }
        let (key, module) = (key.clone(), module.to_string());
        let spawned = std::thread::Builder::new()
            .name("libvirt-forward-conn".into())
            .spawn(move || {
                let result =
                    Client::connect(peer, &key).and_then(|c| c.libvirt_stream(&module, conn));
                match result {
                    Ok(()) => tracing::debug!(%peer, "forwarded libvirt connection closed"),
                    Err(e) => tracing::warn!(%peer, "forwarded libvirt connection: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!("libvirt forwarder: cannot start a connection thread: {e}");
        }
    }
}

/// Cuts a [`Forwarder`]'s connections from another thread: the migration
/// using it then fails at once (libvirt sees its connection closed) instead
/// of waiting for libvirt's keepalive on a link that went silent.
#[derive(Clone, Debug)]
pub struct ForwardCut {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<UnixStream>>>,
}

impl ForwardCut {
    /// Accepts no more connections and shuts down every open one.
    pub fn cut(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for conn in lock(&self.open).iter() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Forwarder {
    /// A handle that cuts this forward ([`ForwardCut::cut`]).
    pub fn cutter(&self) -> ForwardCut {
        ForwardCut {
            stop: Arc::clone(&self.stop),
            open: Arc::clone(&self.open),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for conn in lock(&self.open).drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "libvirt forwarder: cannot remove: {e}");
        }
        tracing::info!(socket = %self.socket.display(), "libvirt forward ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> Vec<PathBuf> {
        vec![
            "/var/lib/libvirt/images/vm1".into(),
            "/srv/vm1-data/".into(),
        ]
    }

    fn domain(disks: &str) -> String {
        format!("<domain type='kvm'><name>vm1</name><devices>{disks}<interface type='network'/></devices></domain>")
    }

    fn problems(xml: &str) -> Vec<String> {
        match check_disks("vm1", xml, &dirs()) {
            Ok(()) => Vec::new(),
            Err(MigrateError::Disks { problems, .. }) => problems,
            Err(e) => vec![format!("other error: {e}")],
        }
    }

    #[test]
    fn disks_in_the_mount_with_cache_none_pass() {
        let xml = domain(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
             <source file='/var/lib/libvirt/images/vm1/vm1.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             <disk type=\"block\" device=\"disk\"><driver name=\"qemu\" type=\"raw\" cache=\"none\" io=\"native\"/>\
             <source dev=\"/srv/vm1-data/./disk2\"/><target dev=\"vdb\"/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda'/><readonly/></disk>\
             <disk type='file' device='floppy'><source/><target dev='fda'/></disk>\
             <disk type='file' device='cdrom'><source file='/srv/vm1-data/boot.iso'/><target dev='sdb'/><readonly/></disk>",
        );
        assert_eq!(problems(&xml), Vec::<String>::new());
    }

    #[test]
    fn each_offending_disk_is_named_with_its_reason() {
        let xml = domain(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='writeback'/>\
             <source file='/var/lib/libvirt/images/vm1/vm1.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
             <source file='/var/lib/libvirt/images/vm1/../other/x.qcow2'/><target dev='vdb'/></disk>\
             <disk type='file' device='disk'><driver name='qemu'/>\
             <source file='/var/lib/libvirt/images/vm10/y.img'/><target dev='vdc'/></disk>\
             <disk type='network' device='disk'><driver name='qemu' cache='none'/>\
             <source protocol='nbd' name='x'><host name='h'/></source><target dev='vdd'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
             <source file='/srv/vm1-data/top.qcow2'/>\
             <backingStore type='file'><format type='qcow2'/><source file='/var/lib/base.qcow2'/><backingStore/></backingStore>\
             <target dev='vde'/></disk>\
             <disk type='file' device='cdrom'><source file='/tmp/x.iso'/><target dev='sda'/><readonly/></disk>",
        );
        let p = problems(&xml);
        assert_eq!(
            p,
            vec![
                "disk vda (/var/lib/libvirt/images/vm1/vm1.qcow2): cache='writeback', needs <driver cache='none'/>".to_string(),
                "disk vdb (/var/lib/libvirt/images/vm1/../other/x.qcow2): outside the module's replicated directories (/var/lib/libvirt/images/vm1, /srv/vm1-data)".into(),
                "disk vdc (/var/lib/libvirt/images/vm10/y.img): outside the module's replicated directories (/var/lib/libvirt/images/vm1, /srv/vm1-data)".into(),
                "disk vdc (/var/lib/libvirt/images/vm10/y.img): cache='default', needs <driver cache='none'/>".into(),
                "disk vdd: type 'network' (only file or block disks inside the module's directories can be migrated)".into(),
                "disk vde (/srv/vm1-data/top.qcow2): backing file /var/lib/base.qcow2 outside the module's replicated directories (/var/lib/libvirt/images/vm1, /srv/vm1-data)".into(),
                "disk sda (/tmp/x.iso): outside the module's replicated directories (/var/lib/libvirt/images/vm1, /srv/vm1-data)".into(),
            ]
        );
        let e = check_disks("vm1", &xml, &dirs()).map_err(|e| e.to_string());
        assert!(e.is_err_and(|e| e.starts_with("cannot live-migrate vm1: disk vda")));
    }

    #[test]
    fn a_relative_or_escaping_path_is_outside() {
        let xml = domain(
            "<disk type='file'><driver cache='none'/><source file='vm1.qcow2'/><target dev='vda'/></disk>\
             <disk type='file'><driver cache='none'/><source file='/../../srv/vm1-data/a'/><target dev='vdb'/></disk>",
        );
        let p = problems(&xml);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("vda") && p[0].contains("outside"));
        assert!(p[1].contains("vdb") && p[1].contains("outside"));
        assert!(check_disks("vm1", "<domain", &dirs())
            .is_err_and(|e| matches!(e, MigrateError::Xml(_))));
    }

    #[test]
    fn libvirt_uris_map_to_local_sockets() {
        let system = libvirt_socket("qemu:///system").unwrap_or_default();
        assert!(system == Path::new(LIBVIRTD_SOCKET) || system == Path::new(VIRTQEMUD_SOCKET));
        assert_eq!(
            libvirt_socket("qemu+unix:///system?socket=/tmp/n1/libvirt-sock").ok(),
            Some(PathBuf::from("/tmp/n1/libvirt-sock"))
        );
        for bad in [
            "qemu+ssh://host/system",
            "qemu://host/system",
            "qemu:///session",
            "test:///default",
            "qemu+unix:///system?socket=rel",
            "nonsense",
        ] {
            assert!(libvirt_socket(bad).is_err(), "{bad}");
        }
    }
}
