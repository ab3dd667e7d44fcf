//! The delay link: a userspace TCP relay that holds bytes flowing from the upstream server
//! (the primary) to the connecting client (the replica) for a set delay, and passes the
//! other direction at once.
//!
//! This is where the old demo's `tc netem` sat: on the primary's egress towards the replica,
//! so the WAL stream arrives late while the replica's replies and the application's own
//! database traffic are not slowed. Bytes keep their order: each chunk is stamped when it is
//! read and written once its time has come, after every chunk read before it. The delay is
//! read per chunk, so changing it takes effect for the next bytes without reconnecting.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream, ToSocketAddrs,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    task::JoinSet,
};

use bytes::{Bytes, BytesMut};

/// Chunks held per connection (twice: before and after their time) before the reader waits:
/// with reads of up to 256 KiB, enough for a WAL stream of well over 100 MiB/s at 1 s.
const CHUNKS_IN_FLIGHT: usize = 1024;
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// A delay link's settings at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DelaySettings {
    /// How long primary-to-replica bytes are held.
    #[serde(rename = "delay_ms", with = "duration_ms")]
    pub delay: Duration,
    /// Up to this much more, uniformly at random per chunk (order is still kept).
    #[serde(rename = "jitter_ms", with = "duration_ms", default)]
    pub jitter: Duration,
    /// Cut: relayed connections are dropped and new ones refused.
    #[serde(default)]
    pub link_down: bool,
}

mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[derive(Debug)]
struct ControlState {
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    down: watch::Sender<bool>,
}

/// The live settings of a delay link, shared by every connection through it.
#[derive(Debug, Clone)]
pub struct DelayControl {
    state: Arc<ControlState>,
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl DelayControl {
    pub fn new(delay: Duration) -> Self {
        DelayControl {
            state: Arc::new(ControlState {
                delay_us: AtomicU64::new(micros(delay)),
                jitter_us: AtomicU64::new(0),
                down: watch::channel(false).0,
            }),
        }
    }

    /// How long primary-to-replica bytes are held now (without jitter).
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.state.delay_us.load(Ordering::Relaxed))
    }

    /// Changes the delay for bytes read from now on; bytes already held keep their time.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_us.store(micros(delay), Ordering::Relaxed);
    }

    pub fn settings(&self) -> DelaySettings {
        DelaySettings {
            delay: self.delay(),
            jitter: Duration::from_micros(self.state.jitter_us.load(Ordering::Relaxed)),
            link_down: *self.state.down.borrow(),
        }
    }

    /// Applies delay, jitter and cut at once.
    pub fn apply(&self, settings: DelaySettings) {
        self.set_delay(settings.delay);
        self.state
            .jitter_us
            .store(micros(settings.jitter), Ordering::Relaxed);
        self.state.down.send_replace(settings.link_down);
    }

    /// The hold for the next chunk: the delay plus a uniform share of the jitter.
    fn hold(&self) -> Duration {
        let jitter_us = self.state.jitter_us.load(Ordering::Relaxed);
        let extra_us = if jitter_us == 0 {
            0
        } else {
            fastrand::u64(0..=jitter_us)
        };
        Duration::from_micros(
            self.state
                .delay_us
                .load(Ordering::Relaxed)
                .saturating_add(extra_us),
        )
    }

    fn is_down(&self) -> bool {
        *self.state.down.borrow()
    }

    /// Resolves once the link is cut.
    async fn cut(&self) {
        let mut down = self.state.down.subscribe();
        let _ = down.wait_for(|down| *down).await;
    }
}

/// A running relay. Dropping it stops accepting and closes every relayed connection.
#[derive(Debug)]
pub struct DelayLink {
    local_addr: SocketAddr,
    control: DelayControl,
    /// Where connections are relayed to; `None` refuses them (between a primary's death
    /// and the promotion of its successor).
    upstream: watch::Sender<Option<String>>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl DelayLink {
    /// Listens on `listen` and relays every connection to `upstream` (resolved per
    /// connection, so a recreated upstream host is followed).
    pub async fn bind(
        listen: impl ToSocketAddrs,
        upstream: String,
        delay: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let control = DelayControl::new(delay);
        let (upstream, upstream_changes) = watch::channel(Some(upstream));
        let accept_loop = tokio::spawn(accept_loop(listener, upstream_changes, control.clone()));
        Ok(DelayLink {
            local_addr,
            control,
            upstream,
            accept_loop,
        })
    }

    /// Relays to `upstream` from now on (`None`: refuses connections). Every relayed
    /// connection is dropped with the bytes it holds, as when the old upstream's machine
    /// dies with its queue: a failover must not deliver the dead primary's last WAL late.
    pub fn redirect(&self, upstream: Option<String>) {
        self.upstream.send_replace(upstream);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn control(&self) -> &DelayControl {
        &self.control
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: watch::Receiver<Option<String>>,
    control: DelayControl,
) {
    // Owning the connection tasks here means aborting this loop aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, peer)) if control.is_down() => {
                    tracing::debug!(%peer, "delay link is cut: connection refused");
                    drop(inbound);
                }
                Ok((inbound, peer)) => {
                    let mut redirected = upstream.clone();
                    let Some(target) = redirected.borrow_and_update().clone() else {
                        tracing::debug!(%peer, "delay link has no upstream: connection refused");
                        continue;
                    };
                    let control = control.clone();
                    connections.spawn(async move {
                        tracing::debug!(%peer, upstream = %target, "delay link: connection opened");
                        let upstream = target.as_str();
                        let relayed = tokio::select! {
                            relayed = relay(inbound, upstream, control) => relayed,
                            _ = redirected.changed() => Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionAborted,
                                "delay link redirected",
                            )),
                        };
                        match relayed {
                            Ok(()) => tracing::debug!(%peer, "delay link: connection closed"),
                            Err(error) => tracing::info!(%peer, %upstream, %error, "delay link: connection ended"),
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "delay link: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn relay(inbound: TcpStream, upstream: &str, control: DelayControl) -> std::io::Result<()> {
    let outbound = TcpStream::connect(upstream).await?;
    // Small WAL messages must not wait for Nagle's algorithm: that would add its own delay.
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (mut from_client, to_client) = inbound.into_split();
    let (from_upstream, mut to_upstream) = outbound.into_split();

    let client_to_upstream = async move {
        tokio::io::copy(&mut from_client, &mut to_upstream).await?;
        to_upstream.shutdown().await
    };
    let cut = control.clone();
    tokio::select! {
        relayed = async {
            tokio::try_join!(client_to_upstream, delayed_copy(from_upstream, to_client, control))
        } => relayed.map(|_| ()),
        () = cut.cut() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "delay link cut")),
    }
}

/// Copies `from` to `to`, delivering each chunk `control.hold()` after it was read.
///
/// The hold is timed by a thread of its own: tokio's timer ticks in whole milliseconds and
/// would add up to a millisecond (more under load) to every chunk, while a thread's sleep
/// is accurate to tens of microseconds. The thread only times; reading and writing stay
/// asynchronous. Chunks go reader -> timer thread -> writer through bounded channels, in
/// order, so a slow replica still pushes back on the primary.
async fn delayed_copy(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    control: DelayControl,
) -> std::io::Result<()> {
    let (held_sender, mut held) = mpsc::channel::<(std::time::Instant, Bytes)>(CHUNKS_IN_FLIGHT);
    let (due_sender, mut due) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    // Chunks read but not yet taken by the writer; at 0 with no hold, a chunk may skip the
    // timer thread without overtaking anything.
    let pending = Arc::new(AtomicU64::new(0));
    let timer_due_sender = due_sender.clone();
    std::thread::Builder::new()
        .name("lagprobe-delay".into())
        .spawn(move || {
            while let Some((deliver_at, chunk)) = held.blocking_recv() {
                let now = std::time::Instant::now();
                if deliver_at > now {
                    std::thread::sleep(deliver_at - now);
                }
                if timer_due_sender.blocking_send(chunk).is_err() {
                    return;
                }
            }
        })?;
    // The writer half is shared: with nothing pending and no hold, the reader writes the
    // chunk itself, saving a task hand-off per chunk (the link's zero-delay throughput).
    let to = Arc::new(tokio::sync::Mutex::new(to));
    let reader_to = to.clone();
    let reader_pending = pending.clone();
    let reader = async move {
        let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
        loop {
            buffer.reserve(READ_BUFFER_BYTES);
            let read = from.read_buf(&mut buffer).await?;
            if read == 0 {
                return Ok(());
            }
            let hold = control.hold();
            let chunk = buffer.split().freeze();
            let sent = if hold.is_zero() && reader_pending.load(Ordering::Acquire) == 0 {
                reader_to.lock().await.write_all(&chunk).await?;
                true
            } else {
                reader_pending.fetch_add(1, Ordering::AcqRel);
                held_sender
                    .send((std::time::Instant::now() + hold, chunk))
                    .await
                    .is_ok()
            };
            if !sent {
                return Ok(());
            }
        }
    };
    drop(due_sender);
    let writer = async move {
        while let Some(chunk) = due.recv().await {
            to.lock().await.write_all(&chunk).await?;
            // Only now is the chunk out: a zero-hold chunk read next may go straight after it.
            pending.fetch_sub(1, Ordering::AcqRel);
        }
        to.lock().await.shutdown().await
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut reader, mut writer) = socket.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Duration {
        let started = std::time::Instant::now();
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
        started.elapsed()
    }

    #[tokio::test]
    async fn holds_upstream_bytes_for_the_delay_and_keeps_order() {
        let upstream = echo_server().await;
        let link = DelayLink::bind(
            "127.0.0.1:0",
            upstream.to_string(),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();

        let delayed = round_trip(&mut client, b"first").await;
        assert!(delayed >= Duration::from_millis(200), "{delayed:?}");
        assert!(delayed < Duration::from_millis(1200), "{delayed:?}");

        // Many small writes come back whole and in order.
        let message: Vec<u8> = (0..50_000u32).flat_map(|n| n.to_le_bytes()).collect();
        round_trip(&mut client, &message).await;

        link.control().set_delay(Duration::ZERO);
        let prompt = round_trip(&mut client, b"second").await;
        assert!(prompt < Duration::from_millis(150), "{prompt:?}");
    }

    #[tokio::test]
    async fn client_to_upstream_direction_is_not_delayed() {
        // A sink upstream that records when bytes arrive.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let arrived = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut byte = [0u8; 1];
            socket.read_exact(&mut byte).await.unwrap();
            std::time::Instant::now()
        });
        let link = DelayLink::bind("127.0.0.1:0", upstream.to_string(), Duration::from_secs(5))
            .await
            .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        let sent = std::time::Instant::now();
        client.write_all(b"x").await.unwrap();
        let arrived = arrived.await.unwrap();
        assert!(
            arrived - sent < Duration::from_millis(500),
            "{:?}",
            arrived - sent
        );
    }

    #[tokio::test]
    async fn cutting_the_link_drops_and_refuses_connections_until_restored() {
        let upstream = echo_server().await;
        let link = DelayLink::bind("127.0.0.1:0", upstream.to_string(), Duration::ZERO)
            .await
            .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        round_trip(&mut client, b"before").await;
        link.control().apply(DelaySettings {
            link_down: true,
            ..link.control().settings()
        });
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        let mut refused = TcpStream::connect(link.local_addr()).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

        link.control().apply(DelaySettings::default());
        let mut again = TcpStream::connect(link.local_addr()).await.unwrap();
        round_trip(&mut again, b"after").await;
    }

    #[tokio::test]
    async fn jitter_adds_at_most_its_bound_and_keeps_order() {
        let upstream = echo_server().await;
        let link = DelayLink::bind("127.0.0.1:0", upstream.to_string(), Duration::ZERO)
            .await
            .unwrap();
        link.control().apply(DelaySettings {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(30),
            link_down: false,
        });
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        for n in 0..20u32 {
            let took = round_trip(&mut client, &n.to_le_bytes()).await;
            assert!(took >= Duration::from_millis(20), "{took:?}");
            assert!(took < Duration::from_millis(50 + 200), "{took:?}");
        }
        assert_eq!(link.control().settings().jitter, Duration::from_millis(30));
    }

    #[tokio::test]
    async fn redirecting_drops_held_bytes_and_relays_to_the_new_upstream() {
        let old = echo_server().await;
        let new = echo_server().await;
        let link = DelayLink::bind("127.0.0.1:0", old.to_string(), Duration::from_millis(500))
            .await
            .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        // Held in the link when the upstream changes: it must never arrive.
        client.write_all(b"held").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        link.redirect(None);
        let mut byte = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        let mut refused = TcpStream::connect(link.local_addr()).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

        link.redirect(Some(new.to_string()));
        link.control().set_delay(Duration::ZERO);
        let mut again = TcpStream::connect(link.local_addr()).await.unwrap();
        round_trip(&mut again, b"after").await;
    }

    #[tokio::test]
    async fn dropping_the_link_closes_relayed_connections() {
        let upstream = echo_server().await;
        let link = DelayLink::bind("127.0.0.1:0", upstream.to_string(), Duration::ZERO)
            .await
            .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        round_trip(&mut client, b"hello").await;
        drop(link);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte))
            .await
            .expect("connection closed promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
