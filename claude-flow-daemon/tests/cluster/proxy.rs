//! A TCP proxy between the daemons and PostgreSQL that the test can cut:
//! [`Proxy::cut`] closes every open connection and closes each new one as
//! soon as it is accepted (the daemons see the server go away and cannot
//! reconnect); [`Proxy::restore`] forwards again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    addr: SocketAddr,
    /// Cancelled by a cut: every connection opened before it ends. `None`
    /// while cut.
    open: Arc<Mutex<Option<CancellationToken>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let state = open.clone();
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let token = state.lock().unwrap_or_else(PoisonError::into_inner).clone();
                // While cut, the connection is dropped here: closed at once.
                if let Some(token) = token {
                    tokio::spawn(forward(client, upstream, token));
                }
            }
        });
        Self {
            addr,
            open,
            acceptor,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        if let Some(token) = self.lock().take() {
            token.cancel();
        }
    }

    pub fn restore(&self) {
        let mut open = self.lock();
        if open.is_none() {
            *open = Some(CancellationToken::new());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, cut: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        // Dropping both streams closes both connections.
        () = cut.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}
