//! The relay thread's system calls (Linux): waiting with a nanosecond timeout, reading with
//! the kernel's arrival time, waking the thread, and its scheduling. Everything unsafe in
//! the delay link is here.

use std::{
    io::{self, Write},
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

/// Wakes a relay thread from its `ppoll`: an eventfd the thread polls beside its sockets.
#[derive(Debug)]
pub(super) struct StopSignal(OwnedFd);

impl StopSignal {
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1; nothing else owns it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        Ok(StopSignal(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn raise(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    pub(super) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Timer slack down to 1 µs (the default 50 µs is added to every timed wait), and the
/// lowest real-time priority when the process may take it, so that a due chunk's wake-up
/// does not queue behind the servers' and the service's threads on a busy machine. The
/// thread sleeps between chunks and moves bytes no faster than its peers produce and take
/// them, so the priority cannot starve anyone; without the privilege it stays ordinary.
pub(super) fn sharpen_this_thread() {
    // SAFETY: both calls change only the calling thread's scheduling attributes.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let lowest = libc::sched_param { sched_priority: 1 };
        let policy = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
        if libc::sched_setscheduler(0, policy, &lowest) != 0 {
            tracing::debug!(
                error = %io::Error::last_os_error(),
                "delay link thread stays at ordinary priority"
            );
        }
    }
}

/// `ppoll` on up to three descriptors (events 0: not waited for), for at most `timeout`
/// (`None`: until one is ready); returns each one's ready events.
pub(super) fn wait(
    fds: [(RawFd, libc::c_short); 3],
    timeout: Option<Duration>,
) -> io::Result<[libc::c_short; 3]> {
    let mut polled = fds.map(|(fd, events)| libc::pollfd {
        // A negative descriptor is skipped, so a hung-up socket we are not waiting
        // for cannot make the poll return at once, over and over.
        fd: if events == 0 { -1 } else { fd },
        events,
        revents: 0,
    });
    let timespec = timeout.map(|timeout| libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    });
    let timespec_ptr = timespec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `polled` is a live array of 3 pollfds; the timespec outlives the call.
    let ready = unsafe { libc::ppoll(polled.as_mut_ptr(), 3, timespec_ptr, std::ptr::null()) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok([0; 3]);
        }
        return Err(error);
    }
    Ok(polled.map(|fd| fd.revents))
}

/// `SO_TIMESTAMPNS` (the same value on every Linux architecture lagprobe builds for).
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Asks the kernel to stamp received data: [`read_stamped`] then says when the bytes
/// arrived, not when this thread got round to reading them.
pub(super) fn stamp_arrivals(stream: &TcpStream) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: passes a live c_int of the size given.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads what `stream` has; `None` when nothing is there now. The instant is when the last
/// of the bytes arrived by the kernel's stamp (moved onto the monotonic clock), or now
/// when there is no stamp.
pub(super) fn read_stamped(
    stream: &TcpStream,
    buffer: &mut [u8],
) -> io::Result<Option<(usize, Instant)>> {
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // u64s, so that the control buffer is aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control) as _;
    // SAFETY: `message` describes live buffers of the sizes it gives.
    let read = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut message, 0) };
    let now = Instant::now();
    if read < 0 {
        return nonblocking(Err(io::Error::last_os_error())).map(|_| None);
    }
    let arrived = arrival(&message).map_or(now, |ago| now.checked_sub(ago).unwrap_or(now));
    Ok(Some((read as usize, arrived)))
}

/// The oldest kernel stamp trusted: the stamp is wall-clock time, and a clock set back
/// must not release bytes early by more than this. Older stamps count from now instead
/// (later, never earlier); a reader is never that late unless the link is at its cap.
const MAX_STAMP_AGE: Duration = Duration::from_millis(100);

/// How long ago the kernel stamped the data `message` received, if it did and the stamp is
/// plausible (not from the future, not older than [`MAX_STAMP_AGE`]).
fn arrival(message: &libc::msghdr) -> Option<Duration> {
    // SAFETY: walks the control messages recvmsg filled in, within msg_controllen.
    let stamp = unsafe {
        let mut header = libc::CMSG_FIRSTHDR(message);
        let mut stamp = None;
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == SO_TIMESTAMPNS {
                let data = libc::CMSG_DATA(header).cast::<libc::timespec>();
                stamp = Some(std::ptr::read_unaligned(data));
            }
            header = libc::CMSG_NXTHDR(message, header);
        }
        stamp?
    };
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &raw mut now) };
    let nanos = |t: &libc::timespec| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    let ago_ns = nanos(&now) - nanos(&stamp);
    (0..MAX_STAMP_AGE.as_nanos() as i128)
        .contains(&ago_ns)
        .then(|| Duration::from_nanos(ago_ns as u64))
}

/// `Some(n)`, or `None` when the socket had nothing (or no room) right now.
pub(super) fn nonblocking(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Ok(n) => Ok(Some(n)),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Writes as much of `bytes` as the socket takes now.
pub(super) fn write_some(mut stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match nonblocking(stream.write(&bytes[written..]))? {
            Some(0) => return Err(io::ErrorKind::WriteZero.into()),
            Some(n) => written += n,
            None => break,
        }
    }
    Ok(written)
}
