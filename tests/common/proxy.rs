//! A TCP fault proxy: forwards connections to a target until cut; while cut, every open
//! connection is closed and new ones are dropped at once (a database outage).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FaultProxy {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (cut, cut_rx) = watch::channel(false);
        let cut_rx = Arc::new(cut_rx);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut rx = (*cut_rx).clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut upstream) = (client, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { addr, cut, task }
    }

    /// Cuts every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy that can "black-hole" its connections: [`BlackHoleProxy::black_hole`] stops
/// forwarding on every connection open at the time and stops reading from either side,
/// yet keeps both sockets open (no FIN, no RST), as when a host vanishes or a network
/// partition drops its packets; connections made afterwards are forwarded normally (the
/// service answers again at the same address, or a failover moved the name). Everything
/// is aborted and closed on drop.
pub struct BlackHoleProxy {
    pub addr: SocketAddr,
    /// Bumped by each black hole; a connection forwards while it equals the value it was
    /// accepted under.
    generation: watch::Sender<u64>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    _connections: Acceptor,
}

impl BlackHoleProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let (generation, generation_rx) = watch::channel(0u64);
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connections = Acceptor::start({
            let accepted = accepted.clone();
            move |client: TcpStream| {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut rx = generation_rx.clone();
                let mine = *rx.borrow_and_update();
                async move {
                    let mut client = client;
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                            return;
                        }
                        _ = rx.wait_for(|g| *g != mine) => {}
                    }
                    // Black-holed: hold both sockets open, read nothing, until aborted.
                    std::future::pending::<()>().await;
                    drop((client, upstream));
                }
            }
        })
        .await;
        Self {
            addr: connections.addr,
            generation,
            accepted,
            _connections: connections,
        }
    }

    /// The proxy's address as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Every connection open now stops forwarding (see the type's doc); new ones forward.
    pub fn black_hole(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A TCP proxy that loses one answer, as a connection that breaks after Redis ran a call
/// and before its answer came back (a reset, a killed client connection, a failover).
/// [`AnswerDropProxy::arm`] names bytes of a request; once a client has sent a request
/// holding them, that client's connection is closed at the next bytes the server sends it,
/// which are not forwarded. The server's side stays open and is read to its end, so the
/// server runs what it was sent. Fires once per arming; everything is aborted on drop.
pub struct AnswerDropProxy {
    pub addr: SocketAddr,
    armed: Arc<std::sync::Mutex<Option<Armed>>>,
    fired: Arc<std::sync::atomic::AtomicUsize>,
    _connections: Acceptor,
}

impl AnswerDropProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let armed = Arc::new(std::sync::Mutex::new(None::<Armed>));
        let fired = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connections = Acceptor::start({
            let (armed, fired) = (armed.clone(), fired.clone());
            move |client| {
                forward_until_an_answer_is_lost(client, target, armed.clone(), fired.clone())
            }
        })
        .await;
        Self {
            addr: connections.addr,
            armed,
            fired,
            _connections: connections,
        }
    }

    /// The proxy's address as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The next request holding `pattern` (within one read) loses its connection, and
    /// the answers it was waiting for.
    pub fn arm(&self, pattern: &[u8]) {
        *self.armed.lock().unwrap() = Some(Armed {
            pattern: pattern.to_vec(),
            lose_request: false,
        });
    }

    /// The next request holding `pattern` (within one read) is not forwarded: its
    /// connection is closed at once, as one lost before the request reached Redis.
    pub fn arm_request(&self, pattern: &[u8]) {
        *self.armed.lock().unwrap() = Some(Armed {
            pattern: pattern.to_vec(),
            lose_request: true,
        });
    }

    /// Client connections closed so far for an armed request.
    pub fn fired(&self) -> usize {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What an [`AnswerDropProxy`] is armed for.
struct Armed {
    pattern: Vec<u8>,
    /// Lose the request itself (else the answers to it).
    lose_request: bool,
}

async fn forward_until_an_answer_is_lost(
    client: TcpStream,
    target: SocketAddr,
    armed: Arc<std::sync::Mutex<Option<Armed>>>,
    fired: Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let mut client = Some(client);
    let mut doomed = false;
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    loop {
        let (mut server_read, mut server_write) = upstream.split();
        let Some(open) = client.as_mut() else {
            // The client is gone: drain the server's answers until it closes.
            match server_read.read(&mut from_server).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        };
        let (mut client_read, mut client_write) = open.split();
        tokio::select! {
            read = client_read.read(&mut from_client) => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        client = None;
                        continue;
                    }
                    Ok(n) => n,
                };
                let hit = {
                    let mut armed = armed.lock().unwrap();
                    let hit = armed.as_ref().is_some_and(|a| {
                        from_client[..n].windows(a.pattern.len()).any(|w| w == &a.pattern[..])
                    });
                    if hit { armed.take().map(|a| a.lose_request) } else { None }
                };
                // Counted before the client's socket closes: a test that sees the call
                // fail must find it counted.
                if hit == Some(true) {
                    fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    client = None;
                    continue;
                }
                if server_write.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
                if hit == Some(false) {
                    doomed = true;
                }
            }
            read = server_read.read(&mut from_server) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if doomed {
                    fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    client = None;
                } else if client_write.write_all(&from_server[..n]).await.is_err() {
                    client = None;
                }
            }
        }
    }
}

/// A listener on a free loopback port that hands each connection to a task of its own;
/// the accepting task and every connection's are aborted on drop.
struct Acceptor {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Acceptor {
    async fn start<F, Fut>(mut serve: F) -> Self
    where
        F: FnMut(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let tasks = Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let accept = tokio::spawn({
            let tasks = tasks.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let task = tokio::spawn(serve(client));
                    tasks.lock().unwrap().push(task.abort_handle());
                }
            }
        });
        Self {
            addr,
            accept,
            tasks,
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}
