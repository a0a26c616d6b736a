//! A TCP port forward from this machine into a simulated node's network
//! namespace, so the demo can print a console URL a browser on the host opens.
//!
//! Why in-process: the node addresses exist only inside the namespaces (no
//! route from the host), and the forward must end with the cluster. The
//! listener is bound in the host's namespace; a dedicated thread moves itself
//! into the node's network namespace (`setns` affects only the calling thread)
//! and makes the outgoing connections there (a socket stays in the namespace
//! it was created in). Two copy threads per connection shovel the bytes (TLS
//! passes through untouched). Dropping the [`PortForward`] stops accepting.

use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

type ConnectRequest = mpsc::Sender<io::Result<TcpStream>>;

/// Forwards connections to a host address into a node's namespace.
#[derive(Debug)]
pub struct PortForward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl PortForward {
    /// Listens on the first of `listen` that is free and forwards each
    /// connection to `target` inside the network namespace of process `netns_pid`.
    pub fn start(listen: &[SocketAddr], netns_pid: u32, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .with_context(|| format!("binding the port forward on {listen:?}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let ns_path = format!("/proc/{netns_pid}/ns/net");
        let ns = File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        let (req_tx, req_rx) = mpsc::channel::<ConnectRequest>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name("forward-connect".into())
            .spawn(move || {
                let entered = move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(LinkNameSpaceType::Network),
                )
                .map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                for reply in req_rx {
                    let _ = reply.send(TcpStream::connect_timeout(&target, Duration::from_secs(5)));
                }
            })
            .context("spawning the connect thread")?;
        ready_rx
            .recv()
            .context("the connect thread ended")?
            .with_context(|| format!("entering the network namespace of {netns_pid}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("forward-accept".into())
            .spawn(move || accept_loop(&listener, &req_tx, &stop2))
            .context("spawning the accept thread")?;
        Ok(Self {
            local,
            stop,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, connect: &mpsc::Sender<ConnectRequest>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => continue,
        };
        let (tx, rx) = mpsc::channel();
        if connect.send(tx).is_err() {
            return;
        }
        let Ok(Ok(server)) = rx.recv() else {
            continue;
        };
        if client.set_nonblocking(false).is_err() {
            continue;
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("forward-up".into())
            .spawn(move || pump(client, server));
        let _ = std::thread::Builder::new()
            .name("forward-down".into())
            .spawn(move || pump(s2, c2));
    }
}

/// Copies `from` to `to` until EOF, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
