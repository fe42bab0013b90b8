//! A database endpoint that moves, as a DNS name or a cluster endpoint does at a failover: a TCP
//! proxy on 127.0.0.1 forwarding to one server, which [`Endpoint::move_to`] changes, cutting
//! every connection open to the old one (the client sees its connection drop and reconnects to
//! the same address, now reaching the new server).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running endpoint.
pub struct Endpoint {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    target: Arc<AtomicU16>,
    /// Bumped on every move; connections opened before it end.
    generation: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Endpoint {
    /// Starts an endpoint forwarding to `127.0.0.1:{target_port}`.
    pub async fn start(target_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let target = Arc::new(AtomicU16::new(target_port));
        let generation = Arc::new(watch::channel(0u64).0);
        let (t, g) = (target.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = t.load(Ordering::SeqCst);
                let mut moved = g.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = moved.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            target,
            generation,
            task,
        })
    }

    /// Points the endpoint at `127.0.0.1:{target_port}` and cuts every open connection.
    pub fn move_to(&self, target_port: u16) {
        self.target.store(target_port, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}
