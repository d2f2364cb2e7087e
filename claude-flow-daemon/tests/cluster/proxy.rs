//! A TCP proxy between the daemons and PostgreSQL that the test controls,
//! for two kinds of outage:
//!
//! - [`Proxy::cut`]: every open connection is closed and each new one is
//!   closed as soon as it is accepted (the server went away; the daemons
//!   see errors at once).
//! - [`Proxy::stall`]: nothing gets through, in either direction, and
//!   nothing is closed (a network that drops packets silently: the
//!   daemons' statements get no answer). What was sent meanwhile, closes
//!   included, is delivered after [`Proxy::restore`], as TCP delivers it
//!   once a partition heals.
//!
//! [`Proxy::restore`] forwards again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The proxy; dropping it closes everything.
pub struct Proxy {
    addr: SocketAddr,
    /// Cancelled by a cut: every connection opened before it ends. `None`
    /// while cut.
    open: Arc<Mutex<Option<CancellationToken>>>,
    /// Whether bytes flow (false while stalled).
    flowing: watch::Sender<bool>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let (flowing, _) = watch::channel(true);
        let state = open.clone();
        let flow = flowing.clone();
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let token = state.lock().unwrap_or_else(PoisonError::into_inner).clone();
                // While cut, the connection is dropped here: closed at once.
                if let Some(token) = token {
                    tokio::spawn(forward(client, upstream, token, flow.subscribe()));
                }
            }
        });
        Self {
            addr,
            open,
            flowing,
            acceptor,
        }
    }

    /// Where the daemons connect.
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

    /// Lets nothing through, closing nothing, until
    /// [`restore`](Self::restore).
    pub fn stall(&self) {
        self.flowing.send_replace(false);
    }

    /// Ends a cut or a stall.
    pub fn restore(&self) {
        let mut open = self.lock();
        if open.is_none() {
            *open = Some(CancellationToken::new());
        }
        self.flowing.send_replace(true);
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

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    cut: CancellationToken,
    mut flowing: watch::Receiver<bool>,
) {
    let connected = async {
        // A connection made during a stall reaches the server only after.
        flowing.wait_for(|f| *f).await.ok()?;
        TcpStream::connect(upstream).await.ok()
    };
    let server = tokio::select! {
        () = cut.cancelled() => return,
        server = connected => server,
    };
    let Some(server) = server else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let pumps = async {
        tokio::join!(
            pump(client_read, server_write, flowing.clone()),
            pump(server_read, client_write, flowing.clone()),
        )
    };
    tokio::select! {
        // Dropping both halves of both streams closes both connections.
        () = cut.cancelled() => {}
        _ = pumps => {}
    }
}

/// Copies `from` to `to`, holding each chunk (and the close) while the
/// proxy is stalled.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut flowing: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if flowing.wait_for(|f| *f).await.is_err() {
            return;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
