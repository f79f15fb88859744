//! Load generators for the `counter` guest, shared by the network benchmark
//! (benches/net.rs) and the pair benchmark (benches/pair.rs): a closed loop
//! with a window of requests in flight, and an open loop at a fixed rate.
//! Each runs on the calling thread (enter the client's network namespace
//! first) and returns what it measured.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use twinvm::net::probe::{decode_counter_reply, encode_counter_request};

/// A reply later than this counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// One load's outcome.
#[derive(Default)]
pub struct LoopFigures {
    pub sent: u64,
    /// One per answered request, from its send to its reply.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl LoopFigures {
    /// Requests not answered within [`REPLY_TIMEOUT`].
    pub fn lost(&self) -> u64 {
        self.sent - self.latencies.len() as u64
    }

    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile `p` (0-100) in µs; NaN with no answer.
    pub fn percentile_us(&self, p: usize) -> f64 {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    }
}

fn connected_socket(bind: SocketAddr, target: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    Ok(socket)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// An ICMP error that came back for an earlier datagram (nothing answered
/// at the guest's address for a moment): that request is lost, the load
/// goes on.
fn is_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

/// Requests `first_id..first_id + requests` with at most `window` in flight:
/// each reply (or a request given up after [`REPLY_TIMEOUT`]) lets the next
/// one go. `window` 1 is one request at a time.
pub fn closed_loop(
    bind: SocketAddr,
    target: SocketAddr,
    window: usize,
    first_id: u64,
    requests: u64,
) -> io::Result<LoopFigures> {
    let window = window.max(1);
    let socket = connected_socket(bind, target)?;
    let end_id = first_id + requests;
    let mut next_id = first_id;
    // Id → when sent; ids go out in order, so the first is the oldest.
    let mut outstanding: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut figures = LoopFigures::default();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    while next_id < end_id || !outstanding.is_empty() {
        while next_id < end_id && outstanding.len() < window {
            outstanding.insert(next_id, Instant::now());
            socket.send(&encode_counter_request(next_id))?;
            figures.sent += 1;
            next_id += 1;
        }
        let now = Instant::now();
        outstanding.retain(|_, sent| now.duration_since(*sent) < REPLY_TIMEOUT);
        let Some((_, &oldest)) = outstanding.first_key_value() else {
            continue;
        };
        let wait = (oldest + REPLY_TIMEOUT)
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                if let Some((id, _)) = decode_counter_reply(&buf[..n]) {
                    if let Some(sent) = outstanding.remove(&id) {
                        figures.latencies.push(sent.elapsed());
                    }
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    figures.elapsed = started.elapsed();
    Ok(figures)
}

/// Requests `first_id..first_id + requests` sent at `rate_per_sec` whatever
/// the replies; latency from the moment each was sent. A send refused by an
/// ICMP error counts as sent and lost.
pub fn open_loop(
    bind: SocketAddr,
    target: SocketAddr,
    rate_per_sec: u64,
    first_id: u64,
    requests: u64,
) -> io::Result<LoopFigures> {
    let socket = connected_socket(bind, target)?;
    let receiver = socket.try_clone()?;
    receiver.set_read_timeout(Some(Duration::from_millis(20)))?;
    let interval = Duration::from_nanos(1_000_000_000 / rate_per_sec.max(1));
    let started = Instant::now();
    let stop_at = started + interval * requests as u32 + REPLY_TIMEOUT;
    let sender_failed = AtomicBool::new(false);
    let (sent_at, replies) = std::thread::scope(|scope| {
        let sender_failed = &sender_failed;
        let collector = scope.spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while (got.len() as u64) < requests
                && Instant::now() < stop_at
                && !sender_failed.load(Ordering::Relaxed)
            {
                if let Ok(n) = receiver.recv(&mut buf) {
                    if let Some((id, _)) = decode_counter_reply(&buf[..n]) {
                        got.push((id, Instant::now()));
                    }
                }
            }
            got
        });
        let mut sent_at = Vec::with_capacity(requests as usize);
        let mut send_error = None;
        for i in 0..requests {
            let due = started + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sent_at.push(Instant::now());
            match socket.send(&encode_counter_request(first_id + i)) {
                Ok(_) => {}
                Err(e) if is_icmp_error(&e) => {}
                Err(e) => {
                    sender_failed.store(true, Ordering::Relaxed);
                    send_error = Some(e);
                    break;
                }
            }
        }
        let replies = collector.join().expect("the reply collector panicked");
        match send_error {
            Some(e) => Err(e),
            None => Ok((sent_at, replies)),
        }
    })?;
    let mut figures = LoopFigures {
        sent: requests,
        elapsed: started.elapsed(),
        ..LoopFigures::default()
    };
    // Each id once: a duplicate reply is not a second answer.
    let mut answered = vec![false; requests as usize];
    for (id, at) in replies {
        let Some(i) = id.checked_sub(first_id).map(|i| i as usize) else {
            continue;
        };
        if let (Some(sent), Some(seen)) = (sent_at.get(i), answered.get_mut(i)) {
            if !*seen {
                *seen = true;
                figures.latencies.push(at.duration_since(*sent));
            }
        }
    }
    Ok(figures)
}
