//! The delay link: a userspace TCP relay that holds bytes flowing from the upstream server
//! (the primary) to the connecting client (the replica) for a set delay, and passes the
//! other direction at once.
//!
//! This is where the old demo's `tc netem` sat: on the primary's egress towards the replica,
//! so the WAL stream arrives late while the replica's replies and the application's own
//! database traffic are not slowed. Bytes keep their order: each chunk is stamped when it is
//! read and written once its time has come, after every chunk read before it. The delay is
//! read per chunk, so changing it takes effect for the next bytes without reconnecting.
//!
//! Each connection holds at most its buffer's worth of bytes (`--link-buffer-mb`, counted in
//! bytes, not chunks); when it is full the link stops reading from the upstream, so the
//! upstream's sends block as they would behind a slow network, instead of the link growing.
//! At delay D a full buffer of B bytes passes about B / D: 64 MiB at 1 s is 64 MiB/s (a
//! little more: bytes that waited in the kernel's socket buffer count from their arrival).
//!
//! Tokio accepts and connects; each relayed connection then runs on a thread of its own
//! (`relay`), which is what keeps the delay exact at the tail.

mod relay;
mod sys;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream, ToSocketAddrs},
    sync::watch,
    task::JoinSet,
};

use crate::settings::{LINK_BUFFER_MB, MIB};

/// The smallest buffer a link takes.
pub const MIN_BUFFER_BYTES: u64 = 64 * 1024;

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

/// How full a link's buffers are, in the held (upstream-to-client) direction; the other
/// direction passes at once and waits with at most one read's worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct BufferStats {
    /// The cap per connection and direction.
    pub buffer_bytes: u64,
    /// Held now, over every connection (bytes plus a small charge per chunk).
    pub held_bytes: u64,
    /// The most one connection has held at once since the link started.
    pub peak_held_bytes: u64,
    /// Times a connection's buffer filled up and the link stopped reading its upstream.
    pub full_count: u64,
}

#[derive(Debug)]
struct ControlState {
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    down: watch::Sender<bool>,
    buffer_bytes: u64,
    held_bytes: AtomicU64,
    peak_held_bytes: AtomicU64,
    full_count: AtomicU64,
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
    /// A control with the default buffer (`LINK_BUFFER_MB`).
    pub fn new(delay: Duration) -> Self {
        Self::with_buffer(delay, LINK_BUFFER_MB.default * MIB)
    }

    /// A control whose connections hold at most `buffer_bytes` each way (at least
    /// [`MIN_BUFFER_BYTES`]: below a few reads' worth the link could not read at all).
    pub fn with_buffer(delay: Duration, buffer_bytes: u64) -> Self {
        DelayControl {
            state: Arc::new(ControlState {
                delay_us: AtomicU64::new(micros(delay)),
                jitter_us: AtomicU64::new(0),
                down: watch::channel(false).0,
                buffer_bytes: buffer_bytes.max(MIN_BUFFER_BYTES),
                held_bytes: AtomicU64::new(0),
                peak_held_bytes: AtomicU64::new(0),
                full_count: AtomicU64::new(0),
            }),
        }
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.state.buffer_bytes
    }

    pub fn buffer_stats(&self) -> BufferStats {
        BufferStats {
            buffer_bytes: self.state.buffer_bytes,
            held_bytes: self.state.held_bytes.load(Ordering::Relaxed),
            peak_held_bytes: self.state.peak_held_bytes.load(Ordering::Relaxed),
            full_count: self.state.full_count.load(Ordering::Relaxed),
        }
    }

    /// A connection now holds `connection_bytes`, `delta` more than before.
    fn held_changed(&self, delta: i64, connection_bytes: u64) {
        if delta >= 0 {
            self.state
                .held_bytes
                .fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.state
                .held_bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        self.state
            .peak_held_bytes
            .fetch_max(connection_bytes, Ordering::Relaxed);
    }

    fn buffer_was_full(&self) {
        self.state.full_count.fetch_add(1, Ordering::Relaxed);
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

    /// No delay and no jitter: bytes are due the moment they arrive.
    fn holds_nothing(&self) -> bool {
        self.state.delay_us.load(Ordering::Relaxed) == 0
            && self.state.jitter_us.load(Ordering::Relaxed) == 0
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
    /// connection, so a recreated upstream host is followed), with the default buffer.
    pub async fn bind(
        listen: impl ToSocketAddrs,
        upstream: String,
        delay: Duration,
    ) -> std::io::Result<Self> {
        Self::bind_with(listen, upstream, DelayControl::new(delay)).await
    }

    /// [`DelayLink::bind`] with a control of the caller's (its buffer size, say).
    pub async fn bind_with(
        listen: impl ToSocketAddrs,
        upstream: String,
        control: DelayControl,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
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
    // Both stay non-blocking: the relay thread waits in ppoll, never in a read or write.
    let mut relayed = relay::spawn(inbound.into_std()?, outbound.into_std()?, control.clone())?;
    // Returning (or this future being dropped: redirect, link dropped) drops the handle,
    // which stops the thread and closes both sockets.
    tokio::select! {
        finished = relayed.finished() => finished,
        () = control.cut() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "delay link cut")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// Bytes of the test stream: byte `n` of the stream is `n % 251`, so any loss,
    /// duplication or reordering shows.
    const PATTERN_BYTES: usize = 251 * 1024;

    /// An upstream that streams `chunks` patterns to its first client, counting what its
    /// socket accepted.
    async fn pattern_upstream(chunks: usize) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let pattern: Vec<u8> = (0..PATTERN_BYTES).map(|n| (n % 251) as u8).collect();
            for _ in 0..chunks {
                // Small writes, so the count follows what the socket really took.
                for piece in pattern.chunks(16 * 1024) {
                    if socket.write_all(piece).await.is_err() {
                        return;
                    }
                    counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
            }
        });
        (addr, accepted)
    }

    /// Reads the whole stream and checks every byte; returns how many came.
    async fn read_pattern(client: &mut TcpStream) -> u64 {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        loop {
            let read = client.read(&mut buffer).await.unwrap();
            if read == 0 {
                return offset;
            }
            for &byte in &buffer[..read] {
                assert_eq!(byte, (offset % 251) as u8, "byte {offset}");
                offset += 1;
            }
        }
    }

    /// Waits until `count` has not grown for a while (the sender is blocked).
    async fn until_stalled(count: &AtomicU64) -> u64 {
        let mut last = count.load(Ordering::Relaxed);
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = count.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("the sender never stopped: {last} bytes accepted");
    }

    /// Streams more than every buffer on the way can take into a link whose client does
    /// not read; once the sender is stuck, checks it was pushed back and what the link
    /// holds, then reads everything and checks it.
    async fn stalled_receiver(delay: Duration, buffer_bytes: u64) -> BufferStats {
        // 61 MiB: more than the link's buffer and every socket buffer on the way.
        let chunks = 256;
        let total = (chunks * PATTERN_BYTES) as u64;
        let (upstream, accepted) = pattern_upstream(chunks).await;
        let control = DelayControl::with_buffer(delay, buffer_bytes);
        let link = DelayLink::bind_with("127.0.0.1:0", upstream.to_string(), control)
            .await
            .unwrap();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();

        let stalled_at = until_stalled(&accepted).await;
        assert!(stalled_at < total, "the link took all {total} bytes");
        let stalled = link.control().buffer_stats();
        assert_eq!(read_pattern(&mut client).await, total);
        let after = link.control().buffer_stats();
        assert!(after.peak_held_bytes <= buffer_bytes, "{after:?}");
        stalled
    }

    #[tokio::test]
    async fn a_stalled_receiver_fills_the_buffer_and_no_more() {
        const BUFFER_BYTES: u64 = 1024 * 1024;
        let stats = stalled_receiver(Duration::from_millis(50), BUFFER_BYTES).await;
        // Full, less at most what one read would have needed room for.
        let read_bytes = relay::READ_BUFFER_BYTES as u64 + relay::CHUNK_OVERHEAD_BYTES;
        assert!(stats.held_bytes > BUFFER_BYTES - read_bytes, "{stats:?}");
        assert!(stats.peak_held_bytes <= BUFFER_BYTES, "{stats:?}");
        assert!(stats.full_count >= 1, "{stats:?}");
    }

    #[tokio::test]
    async fn at_zero_delay_a_stalled_receiver_paces_the_link_without_buffering() {
        let stats = stalled_receiver(Duration::ZERO, 64 * 1024 * 1024).await;
        // What one read left over when the client's socket filled, nothing more.
        let read_bytes = relay::READ_BUFFER_BYTES as u64 + relay::CHUNK_OVERHEAD_BYTES;
        assert!(stats.peak_held_bytes <= read_bytes, "{stats:?}");
    }

    #[tokio::test]
    async fn at_a_delay_the_buffer_bounds_what_is_held_and_everything_arrives_in_order() {
        const BUFFER_BYTES: u64 = 1024 * 1024;
        let delay = Duration::from_millis(200);
        // 4 MiB through a 1 MiB buffer held 200 ms: at least three full holds.
        let chunks = 16;
        let total = (chunks * PATTERN_BYTES) as u64;
        let (upstream, _) = pattern_upstream(chunks).await;
        let control = DelayControl::with_buffer(delay, BUFFER_BYTES);
        let link = DelayLink::bind_with("127.0.0.1:0", upstream.to_string(), control)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut client = TcpStream::connect(link.local_addr()).await.unwrap();
        assert_eq!(read_pattern(&mut client).await, total);
        // A lower bound only: the link must not let more than its buffer through per delay.
        let holds = total / BUFFER_BYTES;
        assert!(
            started.elapsed() >= delay * holds as u32,
            "{:?}",
            started.elapsed()
        );
        let stats = link.control().buffer_stats();
        assert!(stats.peak_held_bytes <= BUFFER_BYTES, "{stats:?}");
        assert!(stats.full_count >= 1, "{stats:?}");
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(link.control().buffer_stats().held_bytes, 0);
    }
}
