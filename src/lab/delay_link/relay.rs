//! One relayed connection, on a thread of its own: both directions, the hold, and the
//! buffer cap.
//!
//! Why a thread and not tokio tasks: the link's accuracy is a matter of wake-ups. A chunk
//! due now must be written now, and bytes arriving now must be stamped now; every hand-off
//! between a timer and a task, or a task waiting for a runtime worker busy with the
//! service's requests, added milliseconds at the tail (measured: p99 3.2 ms of late timer
//! wake-ups and 2 ms of hand-off to the writer task). Here one thread waits in `ppoll` on
//! both sockets with a nanosecond timeout for the next due chunk, reads, stamps, holds and
//! writes itself, with no hand-off anywhere.

use std::{
    collections::VecDeque,
    io::{self, Read},
    net::{Shutdown, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    DelayControl,
    sys::{self, StopSignal, nonblocking, write_some},
};

/// The most read from a socket at once.
pub(super) const READ_BUFFER_BYTES: usize = 256 * 1024;
/// What a held chunk costs beyond its bytes (queue entry and allocation), charged to the
/// cap so that many tiny chunks cannot exceed it either.
pub(super) const CHUNK_OVERHEAD_BYTES: u64 = 64;

/// The task side of a relay thread: dropping it stops the thread, which closes both
/// sockets and drops whatever it still holds.
pub(super) struct RelayHandle {
    stop: Arc<StopSignal>,
    finished: tokio::sync::oneshot::Receiver<io::Result<()>>,
}

impl RelayHandle {
    /// Resolves when both directions are done, or with the error that ended them.
    pub(super) async fn finished(&mut self) -> io::Result<()> {
        (&mut self.finished)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("delay link relay thread died")))
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop.raise();
    }
}

/// Starts relaying between `client` and `upstream` (both non-blocking) on a new thread.
pub(super) fn spawn(
    client: TcpStream,
    upstream: TcpStream,
    control: DelayControl,
) -> io::Result<RelayHandle> {
    let stop = Arc::new(StopSignal::new()?);
    // Holds count from when the bytes reached this machine, not from when the thread read
    // them: a late wake-up to read must not lengthen the delay.
    sys::stamp_arrivals(&upstream)?;
    let (done, finished) = tokio::sync::oneshot::channel();
    let mut relay = Relay {
        held: Held::new(control.buffer_bytes()),
        forward: Forward::default(),
        scratch: vec![0; READ_BUFFER_BYTES],
        client,
        upstream,
        stop: stop.clone(),
        control,
    };
    std::thread::Builder::new()
        .name("lagprobe-link".into())
        .spawn(move || {
            sys::sharpen_this_thread();
            let result = relay.run();
            relay.held.release_all(&relay.control);
            let _ = done.send(result);
        })?;
    Ok(RelayHandle { stop, finished })
}

/// A chunk from the upstream, due to the client at `due`.
struct Chunk {
    due: Instant,
    bytes: Box<[u8]>,
}

/// The upstream-to-client direction: bytes held for the delay, in order, within the cap.
struct Held {
    chunks: VecDeque<Chunk>,
    /// Of the front chunk, already written.
    front_written: usize,
    /// Bytes held plus [`CHUNK_OVERHEAD_BYTES`] per chunk.
    charged_bytes: u64,
    buffer_bytes: u64,
    /// The client's socket was full at the last write.
    client_full: bool,
    upstream_eof: bool,
    /// The reader has stopped at the cap (counted once per stop).
    at_cap: bool,
    client_shut: bool,
}

impl Held {
    fn new(buffer_bytes: u64) -> Self {
        Held {
            chunks: VecDeque::new(),
            front_written: 0,
            charged_bytes: 0,
            buffer_bytes,
            client_full: false,
            upstream_eof: false,
            at_cap: false,
            client_shut: false,
        }
    }

    /// How much the next read may take: nothing until a whole read buffer (or a quarter
    /// of a smaller cap) fits again, so that a full link does not crawl in tiny reads.
    fn read_room(&self) -> usize {
        let room = self.buffer_bytes.saturating_sub(self.charged_bytes);
        let worth_reading = (READ_BUFFER_BYTES as u64).min(self.buffer_bytes / 4).max(1);
        if room < worth_reading + CHUNK_OVERHEAD_BYTES {
            return 0;
        }
        (room - CHUNK_OVERHEAD_BYTES).min(READ_BUFFER_BYTES as u64) as usize
    }

    fn push(&mut self, due: Instant, bytes: &[u8], control: &DelayControl) {
        let charge = bytes.len() as u64 + CHUNK_OVERHEAD_BYTES;
        self.charged_bytes += charge;
        control.held_changed(charge as i64, self.charged_bytes);
        self.chunks.push_back(Chunk {
            due,
            bytes: bytes.into(),
        });
    }

    fn pop_front(&mut self, control: &DelayControl) {
        if let Some(chunk) = self.chunks.pop_front() {
            let charge = chunk.bytes.len() as u64 + CHUNK_OVERHEAD_BYTES;
            self.charged_bytes -= charge;
            control.held_changed(-(charge as i64), self.charged_bytes);
        }
        self.front_written = 0;
    }

    fn release_all(&mut self, control: &DelayControl) {
        while !self.chunks.is_empty() {
            self.pop_front(control);
        }
    }

    /// When the front chunk is due, if it is waiting for its time (not for the client).
    fn next_due(&self) -> Option<Instant> {
        self.chunks
            .front()
            .filter(|_| !self.client_full)
            .map(|c| c.due)
    }
}

/// The client-to-upstream direction: passed at once; one read's worth at most waits for
/// the upstream's socket.
#[derive(Default)]
struct Forward {
    pending: Vec<u8>,
    written: usize,
    upstream_full: bool,
    client_eof: bool,
    upstream_shut: bool,
}

struct Relay {
    client: TcpStream,
    upstream: TcpStream,
    stop: Arc<StopSignal>,
    control: DelayControl,
    held: Held,
    forward: Forward,
    scratch: Vec<u8>,
}

/// Which descriptors to wait for, and how long.
struct Interest {
    upstream: libc::c_short,
    client: libc::c_short,
    timeout: Option<Duration>,
}

impl Relay {
    fn run(&mut self) -> io::Result<()> {
        loop {
            self.deliver_due()?;
            self.flush_forward()?;
            if self.finish_directions()? {
                return Ok(());
            }
            let interest = self.interest();
            let ready = sys::wait(
                [
                    (self.upstream.as_raw_fd(), interest.upstream),
                    (self.client.as_raw_fd(), interest.client),
                    (self.stop.fd(), libc::POLLIN),
                ],
                interest.timeout,
            )?;
            if ready[2] != 0 {
                return Ok(());
            }
            if ready[1] & libc::POLLOUT != 0 {
                self.held.client_full = false;
            }
            if ready[0] & libc::POLLOUT != 0 {
                self.forward.upstream_full = false;
            }
            if ready[0] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_upstream_burst()?;
            }
            if ready[1] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_client()?;
            }
        }
    }

    fn interest(&mut self) -> Interest {
        let mut upstream = 0;
        let mut client = 0;
        if !self.held.upstream_eof && !self.paced_by_client() {
            if self.held.read_room() > 0 {
                self.held.at_cap = false;
                upstream |= libc::POLLIN;
            } else if !self.held.at_cap {
                // Not reading is the backpressure: the upstream's socket fills, then the
                // upstream's sends block, as at a full netem queue or a slow TCP peer.
                self.held.at_cap = true;
                self.control.buffer_was_full();
            }
        }
        if self.forward.upstream_full {
            upstream |= libc::POLLOUT;
        }
        if self.forward.pending.is_empty() && !self.forward.client_eof {
            client |= libc::POLLIN;
        }
        if self.held.client_full {
            client |= libc::POLLOUT;
        }
        let timeout = self
            .held
            .next_due()
            .map(|due| due.saturating_duration_since(Instant::now()));
        Interest {
            upstream,
            client,
            timeout,
        }
    }

    /// With no hold the link is a plain relay: it reads only what the client takes, so it
    /// neither buffers (and copies) nor grows while the client is slower than the upstream.
    fn paced_by_client(&self) -> bool {
        self.held.client_full && self.control.holds_nothing()
    }

    /// Reads while bytes pass straight through (up to a few reads, so the other direction
    /// is not kept waiting): at zero delay one poll then serves several reads.
    fn read_upstream_burst(&mut self) -> io::Result<()> {
        const READS_PER_WAKE_UP: usize = 8;
        for _ in 0..READS_PER_WAKE_UP {
            if !self.read_upstream()? || !self.held.chunks.is_empty() || self.paced_by_client() {
                break;
            }
        }
        Ok(())
    }

    /// Reads what the upstream sent (within the cap) and holds it, or passes it at once
    /// when there is no hold and nothing ahead of it; false when there was nothing to read.
    fn read_upstream(&mut self) -> io::Result<bool> {
        let room = self.held.read_room();
        if room == 0 || self.held.upstream_eof || self.paced_by_client() {
            return Ok(false);
        }
        let Some((read, arrived)) = sys::read_stamped(&self.upstream, &mut self.scratch[..room])?
        else {
            return Ok(false);
        };
        if read == 0 {
            self.held.upstream_eof = true;
            return Ok(false);
        }
        let hold = self.control.hold();
        let mut start = 0;
        if hold.is_zero() && self.held.chunks.is_empty() && !self.held.client_full {
            start = write_some(&self.client, &self.scratch[..read])?;
            self.held.client_full = start < read;
        }
        if start < read {
            self.held
                .push(arrived + hold, &self.scratch[start..read], &self.control);
        }
        Ok(true)
    }

    /// Writes every chunk whose time has come, until the client's socket is full.
    fn deliver_due(&mut self) -> io::Result<()> {
        while let Some(chunk) = self.held.chunks.front() {
            if self.held.client_full || chunk.due > Instant::now() {
                return Ok(());
            }
            let rest = &chunk.bytes[self.held.front_written..];
            let written = write_some(&self.client, rest)?;
            if written < rest.len() {
                self.held.front_written += written;
                self.held.client_full = true;
                return Ok(());
            }
            self.held.pop_front(&self.control);
        }
        Ok(())
    }

    fn read_client(&mut self) -> io::Result<()> {
        if !self.forward.pending.is_empty() || self.forward.client_eof {
            return Ok(());
        }
        let Some(read) = nonblocking(self.client.read(&mut self.scratch))? else {
            return Ok(());
        };
        if read == 0 {
            self.forward.client_eof = true;
            return Ok(());
        }
        let written = write_some(&self.upstream, &self.scratch[..read])?;
        if written < read {
            self.forward.pending = self.scratch[written..read].to_vec();
            self.forward.written = 0;
            self.forward.upstream_full = true;
        }
        Ok(())
    }

    fn flush_forward(&mut self) -> io::Result<()> {
        if self.forward.pending.is_empty() || self.forward.upstream_full {
            return Ok(());
        }
        let rest = &self.forward.pending[self.forward.written..];
        let written = write_some(&self.upstream, rest)?;
        if written < rest.len() {
            self.forward.written += written;
            self.forward.upstream_full = true;
        } else {
            self.forward.pending = Vec::new();
            self.forward.written = 0;
        }
        Ok(())
    }

    /// Passes each end-of-stream on once everything before it is delivered; true when
    /// both directions are done.
    fn finish_directions(&mut self) -> io::Result<bool> {
        if self.held.upstream_eof && self.held.chunks.is_empty() && !self.held.client_shut {
            shut_write(&self.client)?;
            self.held.client_shut = true;
        }
        let forward = &mut self.forward;
        if forward.client_eof && forward.pending.is_empty() && !forward.upstream_shut {
            shut_write(&self.upstream)?;
            forward.upstream_shut = true;
        }
        Ok(self.held.client_shut && self.forward.upstream_shut)
    }
}

fn shut_write(stream: &TcpStream) -> io::Result<()> {
    match stream.shutdown(Shutdown::Write) {
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
