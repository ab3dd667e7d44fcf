//! `lagprobe link-ping` (hidden): the benchmark's outside client for the delay link.
//!
//! The link's accuracy has to be seen from another process, as a replica sees it: timing
//! inside the process that runs the link would share its scheduler and miss whatever it
//! adds. This mode runs an echo server (the link's upstream) and clients that send small
//! messages through the link and time each echo, on plain threads with blocking sockets so
//! that the client adds as little of its own as it can. It prints one line per round trip:
//! `direct NS` (straight to the echo server before the run: the loopback baseline), `first NS`
//! (each connection's first round trip through the link), `link NS` (the others),
//! and `floor NS`: round trips straight to the echo server from one more connection during
//! the run, paced like the link's, which show what this client and the machine add by
//! themselves (their wake-ups on a busy machine), with no link in the way. The first line
//! says whether `--realtime` took effect: `realtime yes` or `realtime no`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;

/// Bytes per message: small, like a WAL keepalive or a short record.
const MESSAGE_BYTES: usize = 16;
/// Round trips straight to the echo server, for the baseline.
const DIRECT_ROUND_TRIPS: u32 = 200;

#[derive(Debug, Clone, Args)]
pub struct LinkPingArgs {
    /// Where to run the echo server (the link's upstream).
    #[arg(long)]
    pub echo_listen: SocketAddr,
    /// The delay link to ping through.
    #[arg(long)]
    pub link: SocketAddr,
    /// Connections through the link, each doing sequential round trips.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Round trips per connection.
    #[arg(long, default_value_t = 100)]
    pub round_trips: u32,
    /// Connections start this far apart (µs), so their messages are not due at once.
    #[arg(long, default_value_t = 0)]
    pub stagger_us: u64,
    /// Run the echo server and the clients at real-time priority (when the process may),
    /// so that their own wake-ups on a busy machine drop out of what is measured.
    #[arg(long)]
    pub realtime: bool,
}

impl LinkPingArgs {
    /// The floor's pause between round trips: as often as the link's connections together
    /// send, so it sees the same rhythm of wake-ups.
    fn floor_pause(&self) -> Duration {
        Duration::from_micros(self.stagger_us.max(100))
    }
}

/// Runs the echo server and the clients; prints every round trip.
pub fn run(args: &LinkPingArgs) -> anyhow::Result<()> {
    // Threads started from here on inherit the priority. Refused, the run goes on at
    // ordinary priority and says so.
    let realtime = args.realtime && realtime_priority().is_ok();
    let listener = TcpListener::bind(args.echo_listen)?;
    std::thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            std::thread::spawn(move || echo(socket));
        }
    });
    let direct = round_trips(args.echo_listen, DIRECT_ROUND_TRIPS)?;
    let started = Instant::now();
    let clients: Vec<_> = (0..args.connections)
        .map(|index| {
            let (link, count) = (args.link, args.round_trips);
            let start_at = started + Duration::from_micros(args.stagger_us * u64::from(index));
            std::thread::spawn(move || {
                std::thread::sleep(start_at.saturating_duration_since(Instant::now()));
                round_trips(link, count)
            })
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let floor = {
        let (done, echo, pause) = (done.clone(), args.echo_listen, args.floor_pause());
        std::thread::spawn(move || paced_round_trips(echo, pause, &done))
    };
    let mut out = format!("realtime {}\n", if realtime { "yes" } else { "no" });
    for took in direct {
        out.push_str(&format!("direct {}\n", took.as_nanos()));
    }
    for client in clients {
        let through = client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        for (index, took) in through.iter().enumerate() {
            // The first includes the connection's set-up in the link (its thread starting).
            let kind = if index == 0 { "first" } else { "link" };
            out.push_str(&format!("{kind} {}\n", took.as_nanos()));
        }
    }
    done.store(true, Ordering::Relaxed);
    let floor = floor
        .join()
        .map_err(|_| anyhow::anyhow!("the floor client panicked"))??;
    for took in floor {
        out.push_str(&format!("floor {}\n", took.as_nanos()));
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// The lowest real-time priority and 1 µs timer slack for this thread (and the threads it
/// starts), as the delay link's own threads have.
fn realtime_priority() -> std::io::Result<()> {
    // SAFETY: both calls change only the calling thread's scheduling attributes.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let lowest = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &lowest) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn echo(mut socket: TcpStream) {
    let _ = socket.set_nodelay(true);
    let mut buffer = [0u8; 4096];
    while let Ok(read) = socket.read(&mut buffer) {
        if read == 0 || socket.write_all(&buffer[..read]).is_err() {
            return;
        }
    }
}

/// `count` sequential round trips to `addr`.
fn round_trips(addr: SocketAddr, count: u32) -> std::io::Result<Vec<Duration>> {
    let mut stream = connect(addr)?;
    (0..count)
        .map(|sequence| round_trip(&mut stream, sequence))
        .collect()
}

/// Round trips to `addr` with `pause` between them until `done`.
fn paced_round_trips(
    addr: SocketAddr,
    pause: Duration,
    done: &AtomicBool,
) -> std::io::Result<Vec<Duration>> {
    let mut stream = connect(addr)?;
    let mut times = Vec::new();
    for sequence in 0.. {
        if done.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(pause);
        times.push(round_trip(&mut stream, sequence)?);
    }
    Ok(times)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One message and its echo, timed from just before the write to just after the whole
/// echo is read.
fn round_trip(stream: &mut TcpStream, sequence: u32) -> std::io::Result<Duration> {
    let mut message = [0u8; MESSAGE_BYTES];
    message[..4].copy_from_slice(&sequence.to_le_bytes());
    let mut echoed = [0u8; MESSAGE_BYTES];
    let sent = Instant::now();
    stream.write_all(&message)?;
    stream.read_exact(&mut echoed)?;
    let took = sent.elapsed();
    if echoed != message {
        return Err(std::io::Error::other("echo out of order"));
    }
    Ok(took)
}
