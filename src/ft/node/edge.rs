//! The link thread's hold on its socket (see [`LinkEdge`]).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{apply_socket_event, Clock, LinkEnd, SocketEvent};
use crate::vmm::sys;

/// Longest one write may block the link thread (the socket's write
/// timeout); what the kernel has not taken by then waits for the thread's
/// next turn.
pub(super) const WRITE_SLICE: Duration = Duration::from_millis(5);

/// While bytes wait for the socket, the link thread comes back this often.
const UNSENT_RETRY: Duration = Duration::from_millis(2);

/// How much later than it meant to the link thread may judge the peer
/// before the lateness counts as its own stall, not the peer's silence.
/// Scheduling noise on a busy 2-core host stays below it; the stalls that
/// made false failovers (129 ms to over a second, docs/benchmarks.md) do not.
const STALL_SLACK: Duration = Duration::from_millis(30);

/// The link thread's hold on its socket: bytes the kernel has not taken
/// yet, and when it last judged the peer and how long it then meant to wait.
///
/// Writes never block the thread for long: a peer that reads slowly backs
/// the link up (its window fills, the engine waits) while the thread goes
/// on hearing the peer's heartbeats and judging its silence; a write that
/// blocked until the peer's timeout used to end a live link. And time the
/// thread itself could not run (its host overloaded) is not counted as the
/// peer's silence: what the peer sent meanwhile may sit unread in a buffer.
#[derive(Default)]
pub(super) struct LinkEdge {
    unsent: Vec<u8>,
    sent: usize,
    /// When the link last judged its timers.
    judged_at: Option<Duration>,
    /// How long the thread meant to wait before judging again.
    planned_wait: Option<Duration>,
}

impl LinkEdge {
    /// A new connection: nothing of the old one is owed.
    pub(super) fn reset(&mut self) {
        *self = LinkEdge::default();
    }

    pub(super) fn has_unsent(&self) -> bool {
        self.sent < self.unsent.len()
    }

    /// Write what the link wants sent, as far as the socket takes it now;
    /// a failed write is a lost connection.
    pub(super) fn transmit(
        &mut self,
        link: &mut dyn LinkEnd,
        stream: &mut TcpStream,
        now: Duration,
    ) {
        loop {
            if !self.has_unsent() {
                match link.poll_transmit(now) {
                    Some(bytes) => {
                        self.unsent = bytes;
                        self.sent = 0;
                    }
                    None => return,
                }
            }
            match stream.write(&self.unsent[self.sent..]) {
                Ok(0) => {
                    self.reset();
                    link.connection_lost("writing to the connection: it takes no more bytes");
                    return;
                }
                Ok(n) => {
                    tracing::trace!(bytes = n, "link: written");
                    self.sent += n;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.reset();
                    link.connection_lost(&format!("writing to the connection: {e}"));
                    return;
                }
            }
        }
    }

    /// The last words (a Bye, a refusal): keep writing for up to `limit`.
    pub(super) fn flush(
        &mut self,
        link: &mut dyn LinkEnd,
        stream: &mut TcpStream,
        clock: &Clock,
        limit: Duration,
    ) {
        let until = clock.now() + limit;
        loop {
            self.transmit(link, stream, clock.now());
            if !self.has_unsent() || clock.now() >= until {
                return;
            }
        }
    }

    /// The thread is about to wait until `deadline` (at most): how long it
    /// may wait, shortened while bytes wait for the socket. Everything the
    /// thread does from its last judgement to here, and any wait past the
    /// deadline, is its own lateness.
    pub(super) fn plan_wait(&mut self, now: Duration, deadline: Duration) -> Duration {
        let mut timeout = deadline.saturating_sub(now);
        if self.has_unsent() {
            timeout = timeout.min(UNSENT_RETRY);
        }
        self.planned_wait = Some(timeout);
        timeout
    }

    /// The thread is back from its wait: before anything reaches the link
    /// (a frame applied late would find its deadline passed), credit the
    /// link with the thread's own lateness beyond [`STALL_SLACK`].
    pub(super) fn woke(&mut self, link: &mut dyn LinkEnd, clock: &Clock) {
        let now = clock.now();
        let planned = self.planned_wait.take();
        let (Some(at), Some(planned)) = (self.judged_at, planned) else {
            return;
        };
        let late = now.saturating_sub(at).saturating_sub(planned);
        if late <= STALL_SLACK {
            return;
        }
        let credited = link.credit_local_stall(late, now);
        if !credited.is_zero() {
            tracing::warn!(
                "the link thread ran {:.0} ms late (host overloaded?): {:.0} ms not counted as the peer's silence",
                late.as_secs_f64() * 1e3,
                credited.as_secs_f64() * 1e3
            );
        }
    }

    /// Let the link judge its timers, after taking in every byte the socket
    /// reader has already delivered. If the kernel still holds bytes the
    /// reader has not taken (the reader thread starved on an overloaded
    /// host), the peer spoke since: its silence so far is credited (once
    /// the reader catches up the bytes are gone, so a peer that really went
    /// silent is judged one timeout later at most).
    pub(super) fn judge(
        &mut self,
        link: &mut dyn LinkEnd,
        socket_rx: Option<&Receiver<SocketEvent>>,
        stream: Option<&TcpStream>,
        clock: &Clock,
    ) {
        if let Some(rx) = socket_rx {
            while let Ok(event) = rx.try_recv() {
                apply_socket_event(link, Ok(event), clock.now());
            }
        }
        let now = clock.now();
        let unread = stream.map_or(Ok(0), sys::unread_socket_bytes);
        if unread.is_ok_and(|n| n > 0) {
            let credited = link.credit_local_stall(Duration::MAX, now);
            if !credited.is_zero() {
                tracing::debug!(
                    "the socket reader is behind: {:.0} ms of silence credited",
                    credited.as_secs_f64() * 1e3
                );
            }
        }
        link.handle_timeout(now);
        self.judged_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Instant;

    use super::*;

    /// A link end that wants `frames` sent and records what the edge did.
    #[derive(Default)]
    struct Recorded {
        frames: Vec<Vec<u8>>,
        lost: Option<String>,
        received: usize,
        credits: Vec<Duration>,
        judged: usize,
    }

    impl LinkEnd for Recorded {
        fn on_bytes_received(&mut self, bytes: &[u8], _now: Duration) {
            self.received += bytes.len();
        }
        fn connection_lost(&mut self, reason: &str) {
            self.lost = Some(reason.to_string());
        }
        fn poll_transmit(&mut self, _now: Duration) -> Option<Vec<u8>> {
            (!self.frames.is_empty()).then(|| self.frames.remove(0))
        }
        fn handle_timeout(&mut self, _now: Duration) {
            self.judged += 1;
        }
        fn credit_local_stall(&mut self, stalled: Duration, _now: Duration) -> Duration {
            self.credits.push(stalled);
            stalled
        }
    }

    fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        writer.set_write_timeout(Some(WRITE_SLICE)).unwrap();
        (writer, reader)
    }

    #[test]
    fn a_peer_that_does_not_read_backs_the_link_up_without_blocking_it() {
        let (mut writer, mut reader) = connected();
        let frame: Vec<u8> = (0..4u32 << 20).map(|i| i as u8).collect();
        let mut link = Recorded {
            frames: vec![frame.clone(), frame.clone()],
            ..Default::default()
        };
        let mut edge = LinkEdge::default();
        let clock = Clock(Instant::now());
        // 8 MiB is more than loopback's socket buffers take unread.
        let started = Instant::now();
        edge.transmit(&mut link, &mut writer, clock.now());
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(edge.has_unsent(), "the kernel cannot take 8 MiB unread");
        assert!(link.lost.is_none(), "a slow peer is not a lost one");
        // The thread comes back soon while bytes wait.
        assert_eq!(
            edge.plan_wait(clock.now(), clock.now() + Duration::from_secs(1)),
            UNSENT_RETRY
        );
        // Once the peer reads, everything arrives, in order and whole.
        let reading = std::thread::spawn(move || {
            let mut got = vec![0u8; 8 << 20];
            reader.read_exact(&mut got).unwrap();
            got
        });
        let until = Instant::now() + Duration::from_secs(20);
        while (edge.has_unsent() || !link.frames.is_empty()) && Instant::now() < until {
            edge.transmit(&mut link, &mut writer, clock.now());
        }
        let got = reading.join().unwrap();
        assert_eq!(&got[..4 << 20], &frame[..]);
        assert_eq!(&got[4 << 20..], &frame[..]);
        assert!(link.lost.is_none());
    }

    #[test]
    fn bytes_the_reader_has_not_taken_yet_credit_the_peers_silence() {
        let (mut peer, ours) = connected();
        let mut link = Recorded::default();
        let mut edge = LinkEdge::default();
        let clock = Clock(Instant::now());
        edge.judge(&mut link, None, Some(&ours), &clock);
        assert!(link.credits.is_empty(), "nothing unread yet");
        peer.write_all(b"heartbeat").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while sys::unread_socket_bytes(&ours).unwrap() == 0 {
            assert!(Instant::now() < until, "the bytes never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
        edge.judge(&mut link, None, Some(&ours), &clock);
        assert_eq!(link.credits, vec![Duration::MAX]);
        assert_eq!(link.judged, 2);
    }

    #[test]
    fn a_closed_connection_is_a_lost_one_and_nothing_is_owed_after() {
        let (mut writer, reader) = connected();
        drop(reader);
        let mut link = Recorded {
            frames: vec![vec![1; 1 << 20]; 8],
            ..Default::default()
        };
        let mut edge = LinkEdge::default();
        let clock = Clock(Instant::now());
        let until = Instant::now() + Duration::from_secs(5);
        while link.lost.is_none() && Instant::now() < until {
            edge.transmit(&mut link, &mut writer, clock.now());
        }
        assert!(link.lost.unwrap().contains("writing to the connection"));
        assert!(!edge.has_unsent());
    }

    #[test]
    fn the_threads_lateness_is_credited_before_the_link_hears_anything_and_judges() {
        let mut link = Recorded::default();
        let mut edge = LinkEdge::default();
        let clock = Clock(Instant::now());
        let (tx, rx) = crossbeam_channel::unbounded();
        edge.judge(&mut link, Some(&rx), None, &clock);
        // On time: no credit.
        let now = clock.now();
        let wait = edge.plan_wait(now, now + Duration::from_millis(5));
        std::thread::sleep(wait);
        edge.woke(&mut link, &clock);
        edge.judge(&mut link, Some(&rx), None, &clock);
        assert!(link.credits.is_empty());
        // Bytes the reader delivered while the thread was away are taken
        // in before the judgement; the 150 ms it overslept are credited.
        let now = clock.now();
        edge.plan_wait(now, now + Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(155));
        tx.send(SocketEvent::Bytes(vec![0; 42])).unwrap();
        edge.woke(&mut link, &clock);
        assert_eq!(
            link.received, 0,
            "credited before any byte reaches the link"
        );
        assert_eq!(link.credits.len(), 1);
        edge.judge(&mut link, Some(&rx), None, &clock);
        assert_eq!(link.received, 42);
        assert_eq!(link.credits.len(), 1);
        assert!(
            link.credits[0] >= Duration::from_millis(150),
            "{:?}",
            link.credits
        );
        assert_eq!(link.judged, 3);
    }
}
