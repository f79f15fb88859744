//! The drill's client of the `counter` guest: numbered requests at a steady
//! pace, each retried with the same id until answered, every reply recorded
//! (duplicates included) into a [`History`].
//!
//! It runs on its own thread over a UDP socket the caller made (in the
//! client's network namespace: see [`crate::net::NetNs::enter_on_thread`]).
//! At most `window` requests are outstanding: while the service is down the
//! client retries those and sends no new ones, so what it holds and sends
//! stays bounded however long the outage.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tracing::debug;

use super::history::{History, Reply, RequestRecord};
use super::DrillError;
use crate::net::probe::{decode_counter_reply, encode_counter_request, CounterClient};

/// How the client paces and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSettings {
    /// The counter service (the guest's address and port).
    pub target: SocketAddr,
    /// A new request this often (while fewer than `window` are outstanding).
    pub interval: Duration,
    /// A request unanswered for this long is sent again, with the same id.
    pub retry_after: Duration,
    /// Most requests outstanding at once.
    pub window: usize,
}

impl ClientSettings {
    /// Check the settings make sense (they come from the command line).
    pub fn validate(&self) -> Result<(), DrillError> {
        let problem = if self.interval < Duration::from_micros(100) {
            Some("the request interval must be at least 0.1 ms")
        } else if self.retry_after < Duration::from_millis(1) {
            Some("the retry timeout must be at least 1 ms")
        } else if !(1..=4096).contains(&self.window) {
            Some("the window must be 1 to 4096 requests")
        } else {
            None
        };
        match problem {
            Some(p) => Err(DrillError::Usage(p.to_owned())),
            None => Ok(()),
        }
    }
}

enum ClientCommand {
    /// Send no new ids; retry the outstanding ones until answered or until
    /// this much time has passed, then end.
    Finish(Duration),
}

/// Counters the drill reads while the client runs.
#[derive(Debug, Default)]
struct Progress {
    answered: AtomicU64,
    replies: AtomicU64,
}

/// A running client; dropped, it stops at once.
pub struct Client {
    commands: Option<Sender<ClientCommand>>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<Result<History, DrillError>>>,
    epoch: Instant,
}

impl Client {
    /// Start the client on `socket` (bound in the right namespace, not yet
    /// connected); times in its history are offsets from `epoch`.
    pub fn start(
        socket: UdpSocket,
        settings: ClientSettings,
        epoch: Instant,
    ) -> Result<Client, DrillError> {
        settings.validate()?;
        socket
            .connect(settings.target)
            .map_err(client_err("connecting the client socket"))?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        let thread = std::thread::Builder::new()
            .name("drill-client".into())
            .spawn(move || run(&socket, settings, epoch, &rx, &shared))
            .map_err(client_err("starting the client thread"))?;
        Ok(Client {
            commands: Some(tx),
            progress,
            thread: Some(thread),
            epoch,
        })
    }

    /// Requests answered so far (each id counted once).
    pub fn answered(&self) -> u64 {
        self.progress.answered.load(Ordering::Relaxed)
    }

    /// Replies received so far (duplicates included).
    pub fn replies(&self) -> u64 {
        self.progress.replies.load(Ordering::Relaxed)
    }

    /// The origin of the history's times.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Send no new requests, retry the outstanding ones for up to `drain`,
    /// and return what the client saw.
    pub fn finish(mut self, drain: Duration) -> Result<History, DrillError> {
        if let Some(tx) = self.commands.take() {
            let _ = tx.send(ClientCommand::Finish(drain));
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(History::default()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the channel stops the thread at its next turn (≤ 20 ms).
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn client_err(op: &'static str) -> impl FnOnce(io::Error) -> DrillError {
    move |source| DrillError::Client { op, source }
}

/// Errors a connected UDP socket reports for ICMP errors that came back
/// (nothing answers at the guest's address while it is down): they are part
/// of an outage, not a failure of the client.
fn is_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The shortest and longest wait for a reply in one turn of the loop.
const MIN_WAIT: Duration = Duration::from_micros(200);
const MAX_WAIT: Duration = Duration::from_millis(20);

/// Wait up to `timeout` for `socket` to have a datagram (or an error) to
/// read. ppoll, not a socket receive timeout: those are rounded up to
/// scheduler ticks (4 ms at 250 Hz), which would slow the client's pace.
fn wait_readable(socket: &UdpSocket, timeout: Duration) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ppoll reads one pollfd (`fd`, which it may write `revents`
    // of) and the timespec; both live across the call; no signal mask.
    let ret = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
    match ret {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

struct State<'a> {
    socket: &'a UdpSocket,
    history: History,
    /// Outstanding ids → when last sent.
    outstanding: BTreeMap<u64, Instant>,
}

impl State<'_> {
    fn send(&mut self, id: u64) -> Result<(), DrillError> {
        match self.socket.send(&encode_counter_request(id)) {
            Ok(_) => Ok(()),
            Err(e) if is_icmp_error(&e) || is_timeout(&e) => {
                self.history.socket_errors += 1;
                Ok(())
            }
            Err(e) => Err(DrillError::Client {
                op: "sending a request",
                source: e,
            }),
        }
    }
}

fn run(
    socket: &UdpSocket,
    settings: ClientSettings,
    epoch: Instant,
    commands: &Receiver<ClientCommand>,
    progress: &Progress,
) -> Result<History, DrillError> {
    let mut st = State {
        socket,
        history: History::default(),
        outstanding: BTreeMap::new(),
    };
    let mut next_id: u64 = 1;
    let mut next_send = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let mut buf = [0u8; 64];
    socket
        .set_nonblocking(true)
        .map_err(client_err("making the client socket non-blocking"))?;
    loop {
        match commands.try_recv() {
            Ok(ClientCommand::Finish(drain)) => {
                drain_until.get_or_insert(Instant::now() + drain);
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) if drain_until.is_none() => break,
            Err(TryRecvError::Disconnected) => {}
        }
        let now = Instant::now();
        if let Some(until) = drain_until {
            if st.outstanding.is_empty() || now >= until {
                break;
            }
        }

        let may_send_new = drain_until.is_none() && st.outstanding.len() < settings.window;
        if may_send_new && now >= next_send {
            let id = next_id;
            next_id += 1;
            st.history.requests.push(RequestRecord {
                id,
                first_sent: now - epoch,
                sends: 1,
                answered: None,
            });
            st.outstanding.insert(id, now);
            st.send(id)?;
            next_send += settings.interval;
            if next_send <= now {
                // Behind (the window was full): keep the pace, do not burst.
                next_send = now + settings.interval;
            }
        }
        let due: Vec<u64> = st
            .outstanding
            .iter()
            .filter(|(_, &sent)| now.duration_since(sent) >= settings.retry_after)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            st.outstanding.insert(id, now);
            st.history.requests[(id - 1) as usize].sends += 1;
            st.send(id)?;
        }

        // Wait for a reply until the next thing to do.
        let mut next_event = st
            .outstanding
            .values()
            .map(|&sent| sent + settings.retry_after)
            .min()
            .unwrap_or(now + MAX_WAIT);
        if drain_until.is_none() && st.outstanding.len() < settings.window {
            next_event = next_event.min(next_send);
        }
        let wait = next_event
            .saturating_duration_since(Instant::now())
            .clamp(MIN_WAIT, MAX_WAIT);
        if !wait_readable(socket, wait).map_err(client_err("waiting for a reply"))? {
            continue;
        }
        // Take every datagram that is there (the socket is non-blocking).
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let at = epoch.elapsed();
                    match decode_counter_reply(&buf[..n]) {
                        Some((id, value)) if (1..next_id).contains(&id) => {
                            st.history.replies.push(Reply { id, value, at });
                            progress.replies.fetch_add(1, Ordering::Relaxed);
                            if st.outstanding.remove(&id).is_some() {
                                st.history.requests[(id - 1) as usize].answered = Some(at);
                                progress.answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => st.history.stray_datagrams += 1,
                    }
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) if is_icmp_error(&e) => st.history.socket_errors += 1,
                Err(e) => {
                    return Err(DrillError::Client {
                        op: "receiving a reply",
                        source: e,
                    })
                }
            }
        }
    }
    debug!(
        requests = st.history.requests.len(),
        replies = st.history.replies.len(),
        outstanding = st.outstanding.len(),
        "drill client done"
    );
    Ok(st.history)
}

/// Request ids of readiness probes have the top bit set, so they are never
/// confused with the drill client's (1, 2, ...).
const PROBE_ID_BASE: u64 = 1 << 63;

/// Wait until the counter service answers `probe` (a [`CounterClient`] made
/// on a thread in the client's namespace). `check` is called between attempts
/// (to stop on an interruption or on a process that ended); returns whether
/// the service answered before `timeout`.
pub fn wait_for_service(
    probe: &CounterClient,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), DrillError>,
) -> Result<bool, DrillError> {
    const ATTEMPT: Duration = Duration::from_millis(200);
    let end = Instant::now() + timeout;
    let mut n = 0;
    while Instant::now() < end {
        check()?;
        n += 1;
        match probe.request(PROBE_ID_BASE + n, ATTEMPT) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            // Nothing at the address yet (ARP fails, port unreachable while
            // the guest boots): wait and try again.
            Err(_) => {
                std::thread::sleep(ATTEMPT.min(end.saturating_duration_since(Instant::now())))
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter server on loopback that answers every request, except that
    /// it ignores the first copy of each id in `drop_first`; `repeat` ids are
    /// answered twice (the same value).
    fn server(
        drop_first: Vec<u64>,
        repeat: Vec<u64>,
    ) -> (SocketAddr, std::thread::JoinHandle<u64>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let t = std::thread::spawn(move || {
            let mut counter = 0u64;
            let mut dropped = std::collections::HashSet::new();
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(n, 12);
                let id = u64::from_le_bytes(buf[4..12].try_into().unwrap());
                if drop_first.contains(&id) && dropped.insert(id) {
                    continue;
                }
                counter += 1;
                let mut reply = Vec::from(*b"TWCR");
                reply.extend_from_slice(&id.to_le_bytes());
                reply.extend_from_slice(&counter.to_le_bytes());
                sock.send_to(&reply, from).unwrap();
                if repeat.contains(&id) {
                    sock.send_to(&reply, from).unwrap();
                }
            }
            counter
        });
        (addr, t)
    }

    fn settings(target: SocketAddr) -> ClientSettings {
        ClientSettings {
            target,
            interval: Duration::from_millis(2),
            retry_after: Duration::from_millis(20),
            window: 8,
        }
    }

    fn run_until(client: &Client, answered: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while client.answered() < answered {
            assert!(Instant::now() < end, "only {} answered", client.answered());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn requests_are_retried_until_answered_and_replies_all_kept() {
        let (addr, server) = server(vec![3, 7], vec![5]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = Client::start(sock, settings(addr), Instant::now()).unwrap();
        run_until(&client, 20);
        let h = client.finish(Duration::from_secs(2)).unwrap();
        let served = server.join().unwrap();
        assert!(h.requests.len() >= 20);
        assert!(h.requests.iter().all(|r| r.answered.is_some()), "{h:?}");
        // 3 and 7 were dropped once: sent again with the same id.
        assert!(
            h.requests[2].sends >= 2 && h.requests[6].sends >= 2,
            "{h:?}"
        );
        // 5 was answered twice with the same value: both replies kept.
        assert!(h.replies.iter().filter(|r| r.id == 5).count() >= 2, "{h:?}");
        // Every reply the server sent was seen, bar late ones to retries
        // that came after the client had finished.
        assert!(h.replies.len() as u64 <= served + 1, "{h:?}");
        let times: Vec<_> = h.replies.iter().map(|r| r.at).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let a = super::super::history::analyze(&h, None);
        assert_eq!((a.lost, a.backwards, a.repeated), (0, 0, 0));
        assert!(a.duplicate_replies >= 1);
    }

    #[test]
    fn an_absent_server_leaves_requests_lost_and_the_window_bounded() {
        // A port nobody listens on: every send draws an ICMP port unreachable.
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = Client::start(sock, settings(addr), Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(client.answered(), 0);
        let h = client.finish(Duration::from_millis(50)).unwrap();
        assert_eq!(h.requests.len(), 8, "no more than the window of new ids");
        assert!(h.requests.iter().all(|r| r.answered.is_none()));
        assert!(h.requests[0].sends >= 3, "{:?}", h.requests[0]);
        assert!(h.socket_errors > 0);
        let a = super::super::history::analyze(&h, None);
        assert_eq!(a.lost, 8);
    }

    #[test]
    fn dropping_a_client_stops_it() {
        let (addr, server) = server(vec![], vec![]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = Client::start(sock, settings(addr), Instant::now()).unwrap();
        run_until(&client, 3);
        let start = Instant::now();
        drop(client);
        assert!(start.elapsed() < Duration::from_millis(500));
        server.join().unwrap();
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut s = settings("127.0.0.1:9".parse().unwrap());
        s.window = 0;
        let e = Client::start(UdpSocket::bind("127.0.0.1:0").unwrap(), s, Instant::now());
        assert!(matches!(e, Err(DrillError::Usage(_))));
    }
}
