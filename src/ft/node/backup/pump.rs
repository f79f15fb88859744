//! The backup's link thread: accepts its primary, hands the log to the
//! replaying engine, acknowledges it, and drives the failover machine.

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crossbeam_channel::{Receiver, Select, Sender};

use super::{LinkNews, MainNews, REPLAY_QUEUE_BYTES};
use crate::ft::failover::{Action, Failover, FailoverConfig, FailoverEvent, Verdict};
use crate::ft::link::{BackupEvent, BackupLink, ExpectedHello};
use crate::ft::node::status::StatusBoard;
use crate::ft::node::{
    apply_socket_event, spawn_socket_reader, stop_for, Arbitration, Clock, EngineHandle, LinkEdge,
    PairConfig, SocketEvent, EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, WRITE_SLICE,
};
use crate::ft::output::ShadowOutputs;
use crate::replay::engine::{Control, Output};
use crate::replay::log::{record_cost, LogHeader, RecordDecoder};
use crate::replay::schedule::LiveItem;

/// Most record bytes (`log::record_cost`) one turn decodes. A few kilobytes
/// of log can stand for thousands of pages (a zero or unchanged page costs a
/// few bytes), and the thread that decodes them also sends the acks and
/// heartbeats: a 256 KiB read decoded in one go took this thread over a
/// second on a busy host CPU and its primary judged it silent (measured,
/// docs/benchmarks.md, "A shared host CPU").
const DECODE_PER_TURN: u64 = 8 << 20;

/// The link thread's state.
pub(super) struct BackupPump {
    pub(super) clock: Clock,
    pub(super) cfg: PairConfig,
    pub(super) link: Option<BackupLink>,
    pub(super) stream: Option<TcpStream>,
    pub(super) edge: LinkEdge,
    pub(super) socket_rx: Option<Receiver<SocketEvent>>,
    pub(super) arbitration: Arbitration,
    pub(super) decoder: Option<RecordDecoder>,
    /// To the replaying engine; dropped when no more log will come.
    pub(super) live_tx: Option<std::sync::mpsc::Sender<LiveItem>>,
    /// Bytes queued for the engine (`log::record_cost`).
    pub(super) queued: Arc<AtomicU64>,
    /// Watermarks queued but not yet acknowledged (queue over its bound).
    pub(super) unacked: VecDeque<u64>,
    /// The watermark of log bytes the decoder holds but has not turned
    /// into records yet (at most [`DECODE_PER_TURN`] a turn); no further
    /// link event is taken until it is out.
    pub(super) decoding: Option<u64>,
    pub(super) shadow: Arc<Mutex<ShadowOutputs<Output>>>,
    pub(super) verdict_rx: Receiver<Verdict>,
    pub(super) main_rx: Receiver<MainNews>,
    pub(super) news_tx: Sender<LinkNews>,
    pub(super) engine_handle: EngineHandle,
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) board: StatusBoard,
    pub(super) landmark: Arc<AtomicU64>,
    /// The engine's catch-ups so far.
    pub(super) catch_ups: Arc<AtomicU64>,
    /// This backup's guest, to compare with the primary's Hello.
    pub(super) ours: LogHeader,
    pub(super) done: Option<(i32, String)>,
    pub(super) last_replayed: u64,
    /// The landmark the primary's log starts at (a clone's cut, else 0).
    pub(super) start_landmark: u64,
    /// Live, with a survivor's link thread publishing the status.
    pub(super) survivor: Arc<AtomicBool>,
}

impl BackupPump {
    pub(super) fn run(mut self, listener: TcpListener) {
        let (code, message) = match self.accept_primary(&listener).and_then(|()| self.pump()) {
            Ok(done) => done,
            Err(e) => (EXIT_ERROR, format!("{e:#}")),
        };
        self.stopping.store(true, Ordering::Relaxed);
        if code != EXIT_OK {
            self.engine_handle.send(Control::Stop);
        }
        self.live_tx = None;
        let _ = self.news_tx.send(LinkNews::Done { code, message });
    }

    /// Accept connections until one completes the handshake and its Hello
    /// names this VM, generation and guest; strangers are refused and
    /// logged, and the backup keeps waiting.
    fn accept_primary(&mut self, listener: &TcpListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .context("setting the listener non-blocking")?;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                bail!("stopped while waiting for the primary");
            }
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e).context("accepting the primary's connection"),
            };
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(WRITE_SLICE))?;
            let link = BackupLink::new(
                self.cfg.link,
                &self.cfg.key,
                ExpectedHello {
                    vm: self.cfg.vm.clone(),
                    generation: self.cfg.generation,
                },
                self.clock.now(),
            )
            .context("setting up the logging channel")?;
            let (tx, rx) = crossbeam_channel::unbounded();
            spawn_socket_reader(stream.try_clone()?, tx)?;
            self.link = Some(link);
            self.stream = Some(stream);
            self.edge.reset();
            self.socket_rx = Some(rx);
            match self.await_hello()? {
                Some(header) => {
                    self.decoder = Some(RecordDecoder::new(&header));
                    let _ = self.news_tx.send(LinkNews::Hello(header));
                    return Ok(());
                }
                None => {
                    tracing::warn!("connection from {peer} did not become our primary; waiting on");
                    if let Some(s) = self.stream.take() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    self.link = None;
                }
            }
        }
    }

    /// Drive the handshake to the Hello; Some(header) once accepted.
    fn await_hello(&mut self) -> Result<Option<LogHeader>> {
        loop {
            self.transmit();
            let link = self.link.as_mut().expect("a link is being set up");
            while let Some(event) = link.poll_event() {
                match event {
                    BackupEvent::HelloReceived { start_landmark, .. }
                        if start_landmark != self.start_landmark =>
                    {
                        let reason = format!(
                            "its log starts at landmark {start_landmark}, this backup's state is at {}",
                            self.start_landmark
                        );
                        eprintln!("twinvm backup: refusing a primary: {reason}");
                        link.refuse_hello(&reason)?;
                        continue;
                    }
                    BackupEvent::HelloReceived { log_header, .. } => {
                        let header = match LogHeader::decode(&log_header) {
                            Ok(h) => h,
                            Err(e) => {
                                link.refuse_hello(&format!("its log header is malformed: {e}"))?;
                                continue;
                            }
                        };
                        let differences = header.differences_from(&self.ours);
                        if !differences.is_empty() {
                            let reason = format!(
                                "it runs another guest than this backup: {}",
                                differences.join("; ")
                            );
                            eprintln!("twinvm backup: refusing a primary: {reason}");
                            link.refuse_hello(&reason)?;
                            continue;
                        }
                        link.accept_hello(self.clock.now())
                            .context("accepting the Hello")?;
                        self.arbitration.failover = Some(Failover::backup(
                            FailoverConfig::new(&self.cfg.vm, self.cfg.generation, &self.cfg.node),
                            self.clock.now(),
                        ));
                        self.transmit();
                        return Ok(Some(header));
                    }
                    BackupEvent::Closed { reason } => {
                        tracing::warn!(
                            "a connection ended before its Hello was accepted: {reason}"
                        );
                        self.flush();
                        return Ok(None);
                    }
                    BackupEvent::PeerSuspected { silent_for } => {
                        tracing::warn!(
                            "a connection went silent for {silent_for:?} before its Hello"
                        );
                        self.flush();
                        return Ok(None);
                    }
                    other => bail!("{other:?} before the Hello"),
                }
            }
            self.wait_socket(Duration::from_millis(50))?;
        }
    }
}

impl BackupPump {
    fn link(&mut self) -> &mut BackupLink {
        self.link.as_mut().expect("established")
    }

    fn pump(&mut self) -> Result<(i32, String)> {
        loop {
            let open = self.link.as_ref().is_some_and(|l| !l.is_closed());
            if let Some(done) = self.turn()? {
                self.flush();
                return Ok(done);
            }
            // A write that lost the connection is the next turn's news, now.
            if open && self.link.as_ref().is_some_and(BackupLink::is_closed) {
                continue;
            }
            self.wait()?;
        }
    }

    /// One turn between waits: what the last wake-up brought is handled,
    /// and what that produced (the ack of records just received) is written
    /// before the thread waits again. An ack decided after the turn's write
    /// waited for the next wake-up: a 2 ms timer unless more bytes came, which
    /// held every output of a one-request-at-a-time client for 2 ms.
    fn turn(&mut self) -> Result<Option<(i32, String)>> {
        self.handle_events()?;
        self.ack_what_fits()?;
        self.report_replayed();
        self.perform_actions()?;
        self.transmit();
        self.publish_status();
        Ok(self.done.take())
    }

    fn transmit(&mut self) {
        if let (Some(link), Some(stream)) = (self.link.as_mut(), self.stream.as_mut()) {
            self.edge.transmit(link, stream, self.clock.now());
        }
    }

    /// The last words on this connection, for up to the peer timeout.
    fn flush(&mut self) {
        if let (Some(link), Some(stream)) = (self.link.as_mut(), self.stream.as_mut()) {
            let limit = self.cfg.link.peer_timeout;
            self.edge.flush(link, stream, &self.clock, limit);
        }
    }

    fn judge_link(&mut self) {
        if let Some(link) = self.link.as_mut() {
            self.edge.judge(
                link,
                self.socket_rx.as_ref(),
                self.stream.as_ref(),
                &self.clock,
            );
        }
    }

    /// Acknowledge queued watermarks while the replay queue is within its
    /// bound (receipt is what an ack means; the bound keeps memory finite).
    fn ack_what_fits(&mut self) -> Result<()> {
        while let Some(&w) = self.unacked.front() {
            if self.queued.load(Ordering::Relaxed) > REPLAY_QUEUE_BYTES {
                break;
            }
            self.unacked.pop_front();
            tracing::trace!(watermark = w, "backup: ack");
            if self.link.as_ref().is_some_and(|l| !l.is_closed()) {
                self.link()
                    .ack_through(w)
                    .context("acknowledging the log")?;
            }
        }
        Ok(())
    }

    fn report_replayed(&mut self) {
        let replayed = self.landmark.load(Ordering::Relaxed);
        if replayed > self.last_replayed {
            self.last_replayed = replayed;
            if let Some(link) = self.link.as_mut() {
                if !link.is_closed() {
                    let _ = link.set_replayed(replayed);
                }
            }
        }
    }

    /// Take log bytes that end at `watermark`, to be decoded.
    fn queue_log(&mut self, bytes: &[u8], watermark: u64) {
        if let Some(decoder) = self.decoder.as_mut() {
            decoder.push(bytes);
            self.decoding = Some(watermark);
        }
    }

    /// Turn the held log bytes into records for the engine, up to `budget`
    /// bytes of records (`log::record_cost`) and only while the replay
    /// queue is within its bound (None: all of them, the log is over), then
    /// the watermark. True when nothing is left to decode; `spent` grows
    /// by what was decoded.
    fn decode(&mut self, budget: Option<u64>, spent: &mut u64) -> Result<bool, String> {
        let Some(watermark) = self.decoding else {
            return Ok(true);
        };
        let (Some(decoder), Some(tx)) = (self.decoder.as_mut(), self.live_tx.as_ref()) else {
            self.decoding = None;
            return Ok(true);
        };
        loop {
            let held_back = budget.is_some_and(|budget| {
                *spent >= budget || self.queued.load(Ordering::Relaxed) > REPLAY_QUEUE_BYTES
            });
            if held_back && decoder.holds_a_frame() {
                return Ok(false);
            }
            match decoder.next_record() {
                Ok(Some(record)) => {
                    let cost = record_cost(&record);
                    *spent += cost;
                    self.queued.fetch_add(cost, Ordering::Relaxed);
                    if tx.send(LiveItem::Record(record)).is_err() {
                        self.decoding = None;
                        return Ok(true);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.decoding = None;
                    return Err(format!("the primary's log is corrupt: {e}"));
                }
            }
        }
        let _ = tx.send(LiveItem::Watermark(watermark));
        self.unacked.push_back(watermark);
        self.decoding = None;
        Ok(true)
    }

    fn handle_events(&mut self) -> Result<()> {
        let mut spent = 0;
        loop {
            // Log bytes held come first, in order: no later event is taken
            // until their records and watermark are out.
            match self.decode(Some(DECODE_PER_TURN), &mut spent) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(reason) => self.refuse_log(&reason),
            }
            let Some(event) = self.link.as_mut().and_then(|l| l.poll_event()) else {
                return Ok(());
            };
            match event {
                BackupEvent::Records {
                    log_bytes,
                    watermark,
                } => {
                    tracing::trace!(watermark, bytes = log_bytes.len(), "backup: records");
                    self.queue_log(&log_bytes, watermark);
                }
                BackupEvent::Released { released } => self
                    .shadow
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .on_released(released),
                BackupEvent::Bye { reason } => {
                    self.failover_event(FailoverEvent::Bye { reason });
                }
                BackupEvent::PeerSuspected { silent_for } => {
                    eprintln!(
                        "twinvm backup: primary lost (silent for {} ms); asking the arbiter",
                        silent_for.as_millis()
                    );
                    self.failover_event(FailoverEvent::PeerSuspected);
                }
                BackupEvent::Closed { reason } => {
                    eprintln!("twinvm backup: primary lost ({reason}); asking the arbiter");
                    self.failover_event(FailoverEvent::LinkClosed {
                        reason: reason.to_string(),
                    });
                }
                BackupEvent::HelloReceived { .. } => {
                    self.link().close("a second Hello");
                }
            }
        }
    }

    /// Authenticated but undecodable log: a broken primary. Stop taking its
    /// log; the failover machine decides.
    fn refuse_log(&mut self, reason: &str) {
        eprintln!("twinvm backup: {reason}");
        if let Some(link) = self.link.as_mut() {
            link.close(reason);
        }
    }

    fn failover_event(&mut self, event: FailoverEvent) {
        self.arbitration.handle(event, self.clock.now());
    }

    fn perform_actions(&mut self) -> Result<()> {
        for action in self.arbitration.actions(self.clock.now()) {
            match action {
                Action::FinishLog => {
                    // Nothing more can come: let the engine replay what it
                    // has to the end (it reports LogExhausted there).
                    if let Some(link) = self.link.as_mut() {
                        if !link.is_closed() {
                            link.close("the backup stops following the primary");
                        }
                    }
                    self.shadow
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .log_finished();
                    // What was received and not decoded yet is replayed too.
                    if let Err(reason) = self.decode(None, &mut 0) {
                        eprintln!("twinvm backup: {reason}");
                    }
                    self.unacked.clear();
                    self.live_tx = None;
                }
                Action::Promote { landmark } => {
                    eprintln!(
                        "twinvm backup: going live at landmark {landmark} (arbiter: won generation {})",
                        self.cfg.generation
                    );
                    let outputs = self
                        .shadow
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take_for_go_live();
                    // The board says `live` before the main thread hears of
                    // it: once it has, the survivor's pump owns the board
                    // and this thread publishes no more (without this the
                    // board could keep `asking-arbiter` for good).
                    self.publish_status();
                    let _ = self.news_tx.send(LinkNews::Promote { outputs });
                }
                Action::Stop { exit_code, message } => {
                    self.done = Some(stop_for(&self.engine_handle, exit_code, message));
                }
                other => tracing::error!("primary action {other:?} on the backup; ignored"),
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let now = self.clock.now();
        let landmark = self.landmark.load(Ordering::Relaxed);
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the board's lock: the survivor's pump is started
        // after the flag is set, so its `live` is never overwritten with
        // this link's last state (seen: a clone live and serving, its
        // status stuck at asking-arbiter).
        if self.survivor.load(Ordering::SeqCst) {
            return;
        }
        self.arbitration.publish(&mut b);
        b.landmark = landmark;
        b.catch_ups = self.catch_ups.load(Ordering::Relaxed);
        if let Some(link) = &self.link {
            let st = link.status(now);
            b.watermark = st.received_watermark;
            b.acked = st.acked_watermark;
            b.released = st.released;
            b.lag_landmarks = st.received_watermark.saturating_sub(landmark);
            b.lag_ms = st.lag_ns as f64 / 1e6;
            b.log_bytes = st.stats.log_bytes;
            b.peer_connected = st.established && st.closed.is_none();
        }
        if let Some(decoder) = &self.decoder {
            b.page_cache = Some((&decoder.page_stats()).into());
        }
        b.held_outputs = self.shadow.lock().map(|s| s.len() as u64).unwrap_or(0);
        b.uptime_s = now.as_secs_f64();
    }

    /// Bytes or the end of the connection, for at most `timeout`.
    fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let Some(rx) = &self.socket_rx else {
            thread::sleep(timeout);
            return Ok(());
        };
        let now = self.clock.now();
        let timeout = self.edge.plan_wait(now, now + timeout);
        let received = rx.recv_timeout(timeout);
        if let Some(link) = self.link.as_mut() {
            self.edge.woke(link, &self.clock);
        }
        match received {
            Ok(event) => {
                let now = self.clock.now();
                apply_socket_event(self.link(), Ok(event), now);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                self.socket_rx = None;
            }
        }
        self.judge_link();
        Ok(())
    }

    /// Sleep until something arrives or a timer is due.
    fn wait(&mut self) -> Result<()> {
        let now = self.clock.now();
        // Short while acks or held log bytes wait for the replay queue to
        // drain; no wait while held bytes can be decoded now.
        let mut deadline = now
            + if self.decoding.is_some()
                && self.queued.load(Ordering::Relaxed) <= REPLAY_QUEUE_BYTES
            {
                Duration::ZERO
            } else if self.unacked.is_empty() && self.decoding.is_none() {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(2)
            };
        for t in [
            self.link.as_ref().and_then(|l| l.poll_timeout()),
            self.arbitration.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        {
            deadline = deadline.min(t);
        }
        let timeout = self.edge.plan_wait(now, deadline);
        let socket_rx = self.socket_rx.clone();
        let (verdict_rx, main_rx) = (self.verdict_rx.clone(), self.main_rx.clone());
        let mut sel = Select::new();
        let socket = socket_rx.as_ref().map(|rx| sel.recv(rx));
        let verdict = sel.recv(&verdict_rx);
        let main = sel.recv(&main_rx);
        let selected = sel.select_timeout(timeout);
        if selected.is_err() {
            tracing::trace!(
                unacked = self.unacked.len(),
                waited_us = timeout.as_micros() as u64,
                "backup: wait timed out"
            );
        }
        if let Some(link) = self.link.as_mut() {
            self.edge.woke(link, &self.clock);
        }
        if let Ok(op) = selected {
            let index = op.index();
            if Some(index) == socket {
                let rx = socket_rx.as_ref().expect("selected");
                match op.recv(rx) {
                    Ok(event) => {
                        let now = self.clock.now();
                        apply_socket_event(self.link(), Ok(event), now);
                    }
                    Err(_) => self.socket_rx = None,
                }
            } else if index == verdict {
                if let Ok(v) = op.recv(&verdict_rx) {
                    self.failover_event(FailoverEvent::ArbiterVerdict(v));
                }
            } else if index == main {
                match op.recv(&main_rx) {
                    Ok(MainNews::LogExhausted { landmark }) => {
                        self.failover_event(FailoverEvent::LogExhausted { landmark })
                    }
                    Ok(MainNews::Diverged { landmark, detail }) => {
                        eprintln!(
                            "twinvm backup: this replica diverged from the primary at landmark {landmark}: {detail}"
                        );
                        if let Some(link) = self.link.as_mut() {
                            link.send_diverged(landmark, &detail);
                        }
                        self.failover_event(FailoverEvent::Diverged { landmark, detail });
                        if self.arbitration.failover.is_none() {
                            self.done = Some((EXIT_DIVERGED, "diverged".into()));
                        }
                    }
                    Ok(MainNews::Ended { code, message }) => {
                        self.done = Some((code, message));
                    }
                    Err(_) => {}
                }
            }
        }
        self.judge_link();
        Ok(())
    }
}

#[cfg(test)]
mod turn_tests;
