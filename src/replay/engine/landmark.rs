//! What happens at a landmark: the primary's decisions (inputs, timers,
//! interrupts, digests), logged; the backup's checks that it does exactly
//! what the log says; and the work around each KVM_RUN.

use std::time::Duration;

use crossbeam_channel::TryRecvError;

use super::interrupt_window::{self, WindowState};
use super::pending_input::MAX_HELD_SERIAL_INPUT;
use super::settings::HARVEST_EVERY;
use super::tick_deferral::{self, DeferralRule, KickDecision, Pending, SyncCost};
use super::{Control, Ending, Engine, Output, RunError, Stop};
use crate::devices::{Nanos, PlatformEvent};
use crate::replay::digest;
use crate::replay::engine::Role;
use crate::replay::log::{EndReason, Record};
use crate::vmm::sys;

/// Longest a halted guest's thread parks before it looks at its inputs
/// again, kick or not: every feeder kicks after sending, so this only
/// bounds what a missed kick could cost (and wakes an idle VM ten times a
/// second).
const INPUT_PARK_AT_MOST: Duration = Duration::from_millis(100);

/// What processing a landmark led to.
pub(super) enum AtLandmark {
    /// Go on; `injected` tells whether an interrupt went in.
    Continue { injected: bool },
    /// The run is over.
    End(Stop),
}

/// What a kick (EINTR) led to.
pub(super) enum AfterKick {
    /// Back into the guest.
    Resume,
    /// A sync point was made: it is the current landmark.
    Landmark,
    Stop(Stop),
}

fn ended(ending: Ending) -> Stop {
    Stop::Ended {
        ending,
        log_end: false,
    }
}

impl Engine {
    /// Right before KVM_RUN: a live engine arms the timer; a recording one
    /// tells its log sink that every record of this landmark is written.
    pub(super) fn before_run(&mut self) -> Result<(), RunError> {
        if self.role.replaying() {
            return Ok(());
        }
        self.arm_timer();
        if let Role::Record(rec) = &mut self.role {
            rec.log
                .get_mut()
                .landmark_done(self.landmark)
                .map_err(RunError::LogWrite)?;
            self.note_landmark_logged();
        }
        Ok(())
    }

    /// Control messages: true if a stop was asked for.
    fn drain_control(&mut self) -> Result<bool, RunError> {
        let mut stop = false;
        let held: Vec<Control> = self.held_control.drain(..).collect();
        let fresh: Vec<Control> = self.inputs.control.try_iter().collect();
        for msg in held.into_iter().chain(fresh) {
            match msg {
                Control::Stop => stop = true,
                Control::Wake => {}
                Control::DropLog => self.drop_log()?,
                Control::TrackDirty(on) => self.track_dirty(on)?,
                Control::CollectDirty(reply) => {
                    let _ = reply.send(self.collect_dirty().map_err(|e| e.to_string()));
                }
                Control::CloneAt(request) => self.pending_clone = Some(request),
            }
        }
        Ok(stop)
    }

    /// A replaying engine's look at its control messages: only a stop
    /// matters to it (the others are for live roles and are kept).
    pub(super) fn stop_asked(&mut self) -> bool {
        self.held_control.extend(self.inputs.control.try_iter());
        self.held_control.iter().any(|m| matches!(m, Control::Stop))
    }

    /// A recording primary goes on alone: its log is flushed and closed.
    fn drop_log(&mut self) -> Result<(), RunError> {
        if let Role::Record(rec) = &mut self.role {
            rec.log.flush().map_err(RunError::LogWrite)?;
            tracing::warn!(landmark = self.landmark, "log dropped: running alone");
            self.set_role(Role::Live)?;
        }
        Ok(())
    }

    /// The vCPU was kicked out of the guest at an arbitrary point.
    pub(super) fn on_kick(&mut self) -> Result<AfterKick, RunError> {
        if self.role.replaying() {
            if self.stop_asked() {
                return Ok(AfterKick::Stop(ended(Ending::Stopped)));
            }
            return Ok(AfterKick::Resume);
        }
        if self.drain_control()? {
            // End on a landmark so the log and its final digest agree.
            if !self.make_sync_point()? {
                return self.end_before_sync_point().map(AfterKick::Stop);
            }
            return self.end_live(Ending::Stopped).map(AfterKick::Stop);
        }
        // A clone waits for a landmark: make one now; so does an overdue
        // sync state.
        let decision = self.kick_decision();
        let for_state = std::mem::take(&mut self.state_kick_pending) && self.sync_state_overdue();
        if decision == KickDecision::SyncNow || self.pending_clone.is_some() || for_state {
            if for_state && decision != KickDecision::SyncNow {
                self.stats.sync_points_for_state += 1;
            }
            let began = self.real_now();
            if !self.make_sync_point()? {
                return self.end_before_sync_point().map(AfterKick::Stop);
            }
            let ended = self.real_now();
            self.last_sync = Some(SyncCost {
                ended,
                took: ended - began,
            });
            // A sync point harvested the dirty log: the landmark rule
            // need not do it again right away (each harvest re-protects).
            self.last_harvest = std::time::Instant::now();
            return Ok(AfterKick::Landmark);
        }
        if let KickDecision::DeferUntil(end) = decision {
            self.deferred_until = Some(end);
            self.stats.tick_deferrals += 1;
        }
        Ok(AfterKick::Resume)
    }

    /// After an exit that is a landmark: hand what the guest produced at it
    /// to the outputs (tagged with the landmark), logging (primary) or
    /// checking (backup) transmitted frames.
    pub(super) fn after_exit(&mut self) -> Result<(), RunError> {
        let console = std::mem::take(self.platform.uart.out_mut());
        if !console.is_empty() {
            self.outputs
                .emit(self.landmark, Output::Console(console))
                .map_err(RunError::Output)?;
        }
        for frame in self.platform.take_net_tx() {
            self.stats.net_tx_frames += 1;
            let hash = digest::frame_hash(&frame);
            let len = frame.len() as u32;
            if self.role.replaying() {
                match self.take_here()? {
                    Some(Record::NetTx {
                        len: l, hash: h, ..
                    }) if l == len && h == hash => {}
                    other => {
                        return Err(self.diverged(format!(
                            "the guest transmitted a {len}-byte frame but the log holds {}",
                            super::describe_record(other.as_ref())
                        )))
                    }
                }
            } else {
                self.log(Record::NetTx {
                    landmark: self.landmark,
                    len,
                    hash,
                })?;
            }
            self.outputs
                .emit(self.landmark, Output::Net(frame))
                .map_err(RunError::Output)?;
        }
        Ok(())
    }

    /// Process the current landmark in the role's way.
    pub(super) fn at_landmark(&mut self) -> Result<Option<Stop>, RunError> {
        let outcome = if self.role.replaying() {
            self.landmark_replay()?
        } else {
            self.landmark_live()?
        };
        Ok(match outcome {
            AtLandmark::End(stop) => Some(stop),
            AtLandmark::Continue { .. } => None,
        })
    }

    fn can_inject(&mut self) -> bool {
        match &self.sync_state {
            Some(cpu) => super::can_inject_from_state(cpu),
            None => {
                let run = self.vm.vcpu.get_kvm_run();
                run.ready_for_interrupt_injection != 0 && run.if_flag != 0
            }
        }
    }

    fn inject(&mut self, vector: u8) -> Result<(), RunError> {
        sys::inject_interrupt(&self.vm.vcpu, vector).map_err(super::kvm_err("inject interrupt"))?;
        self.stats.interrupts_injected += 1;
        self.injected_here = true;
        Ok(())
    }

    /// Take what the input channels hold, within bounds: serial bytes while
    /// little is held, frames one at a time (the NIC takes them when the
    /// guest has buffers).
    fn take_inputs(&mut self) {
        if let Some(rx) = &self.inputs.serial {
            while self.input.0.len() < MAX_HELD_SERIAL_INPUT {
                match rx.try_recv() {
                    Ok(bytes) => self.input.0.extend(bytes),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.inputs.serial = None;
                        break;
                    }
                }
            }
        }
        if self.held_frame.is_none() {
            if let Some(rx) = &self.inputs.net {
                match rx.try_recv() {
                    Ok(frame) => self.held_frame = Some(frame),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => self.inputs.net = None,
                }
            }
        }
    }

    /// Put received frames into the guest's receive ring while it has
    /// buffers, logging each. A frame without a buffer waits (held) until
    /// the guest posts more.
    fn deliver_frames(&mut self) -> Result<(), RunError> {
        use crate::devices::virtio::RxOutcome;
        loop {
            self.take_inputs();
            let Some(frame) = self.held_frame.take() else {
                return Ok(());
            };
            match self.platform.net_receive(&frame, &mut self.vm) {
                Some(RxOutcome::Delivered) => {
                    self.stats.net_rx_frames += 1;
                    self.signature.fold_input(&frame);
                    self.log(Record::NetRx {
                        landmark: self.landmark,
                        frame,
                    })?;
                }
                Some(RxOutcome::Dropped(why)) => {
                    // Dropped by the device (too big for the guest's buffer),
                    // which consumed a buffer: an input like any other.
                    tracing::debug!("received frame dropped by the NIC: {why}");
                    self.signature.fold_input(&frame);
                    self.log(Record::NetRx {
                        landmark: self.landmark,
                        frame,
                    })?;
                }
                Some(RxOutcome::NoBuffers) | Some(RxOutcome::NotReady) | None => {
                    self.held_frame = Some(frame);
                    return Ok(());
                }
            }
        }
    }

    /// End a live run; a recording gets its final digest and End record.
    pub(super) fn end_live(&mut self, ending: Ending) -> Result<Stop, RunError> {
        if self.role.recording() {
            self.record_digest()?;
            self.log(Record::End {
                landmark: self.landmark,
                reason: ending.log_reason(),
            })?;
            self.finish_log()?;
        }
        Ok(ended(ending))
    }

    /// The End record is written: hand everything to the sink and flush it.
    pub(super) fn finish_log(&mut self) -> Result<(), RunError> {
        if let Role::Record(rec) = &mut self.role {
            rec.log
                .get_mut()
                .landmark_done(self.landmark)
                .map_err(RunError::LogWrite)?;
            rec.log.flush().map_err(RunError::LogWrite)?;
        }
        Ok(())
    }

    /// The primary's work at a landmark: input, timers, reset, interrupt, digest.
    fn landmark_live(&mut self) -> Result<AtLandmark, RunError> {
        if self.drain_control()? {
            return self.end_live(Ending::Stopped).map(AtLandmark::End);
        }
        if self.log_limit_due() {
            return self.end_at_log_limit().map(AtLandmark::End);
        }
        if self.settings.trace_landmarks && self.role.recording() {
            let rip = self
                .vm
                .vcpu
                .get_regs()
                .map_err(super::kvm_err("get regs"))?
                .rip;
            self.log(Record::Trace {
                landmark: self.landmark,
                rip,
                signature: self.signature.last(),
            })?;
        }
        self.take_inputs();
        let accepted = self.input.feed(&mut self.platform);
        if !accepted.is_empty() {
            self.signature.fold_input(&accepted);
            self.log(Record::SerialInput {
                landmark: self.landmark,
                bytes: accepted,
            })?;
        }
        self.deliver_frames()?;
        // An interrupt already waiting goes in before time advances: a timer
        // edge arriving one landmark later is a legitimate virtual-time
        // choice, while polling first would let IRQ0 (highest priority, and
        // due again by the time a slow emulated timer handler returns)
        // starve every other line, e.g. the serial transmit interrupt.
        self.deferred_until = None;
        let waiting = self.platform.interrupt_pending();
        if let Some(deadline) = self.platform.next_deadline().filter(|_| !waiting) {
            let now = self.real_now();
            if deadline <= now {
                let late = Duration::from_nanos(now - deadline);
                self.stats.timer_polls += 1;
                self.stats.timer_poll_delay_total += late;
                self.stats.timer_poll_delay_max = self.stats.timer_poll_delay_max.max(late);
                self.platform.poll(now);
                self.log(Record::Poll {
                    landmark: self.landmark,
                    now,
                })?;
            }
        }
        if self.platform.reset_requested() {
            // The final digest sees the request pending, as the backup's
            // does when it checks the digest before the End record.
            let stop = self.end_live(Ending::ResetRequested)?;
            self.platform.take_event();
            return Ok(AtLandmark::End(stop));
        }
        let mut injected = false;
        if !self.injected_here && self.platform.interrupt_pending() && self.can_inject() {
            if let Some(vector) = self.platform.acknowledge_interrupt() {
                self.inject(vector)?;
                self.log(Record::Interrupt {
                    landmark: self.landmark,
                    vector,
                })?;
                injected = true;
            }
        }
        if self.role.recording() {
            if self.landmark % self.settings.digest_interval.max(1) == 0 {
                self.record_digest()?;
            }
            if self.last_harvest.elapsed() >= HARVEST_EVERY {
                self.harvest_dirty_pages()?;
            }
            if !self.state_kick_pending && self.sync_state_overdue() {
                // The kick stays pending until the next KVM_RUN, which
                // then returns at once, right after this exit's
                // instruction completes: on_kick makes the sync point there.
                self.state_kick_pending = true;
                self.kicker.kick();
            }
        }
        self.decide_interrupt_window();
        Ok(AtLandmark::Continue { injected })
    }

    /// The backup's work at a landmark: do exactly what the log says, and
    /// check that the log's decisions are the ones this replica would make.
    fn landmark_replay(&mut self) -> Result<AtLandmark, RunError> {
        if self.stop_asked() {
            return Ok(AtLandmark::End(ended(Ending::Stopped)));
        }
        self.apply_test_perturbation()?;
        let mut injected = false;
        loop {
            let record = match self.take_here() {
                Ok(Some(record)) => record,
                Ok(None) => break,
                Err(e) => return Err(e),
            };
            match record {
                Record::Trace { rip, signature, .. } => {
                    let ours = self
                        .vm
                        .vcpu
                        .get_regs()
                        .map_err(super::kvm_err("get regs"))?
                        .rip;
                    // A different exit first: it explains a different RIP
                    // (KVM leaves RIP on an IN until it completes, past an
                    // OUT at once), not the other way round.
                    if signature != self.signature.last() {
                        return Err(self.diverged(format!(
                            "this landmark's exit differs from the primary's (signature {} here, {} there; the primary was at RIP {rip:#x})",
                            hex(&self.signature.last()),
                            hex(&signature)
                        )));
                    }
                    if ours != rip {
                        return Err(self.diverged(format!(
                            "the primary was at RIP {rip:#x} at this landmark"
                        )));
                    }
                }
                Record::Poll { now, .. } => {
                    if self.platform.interrupt_pending() {
                        return Err(self.diverged(
                            "the log advances the timers, but an interrupt is waiting here (the primary polls only when none is)".into(),
                        ));
                    }
                    if self.platform.next_deadline().is_none_or(|d| d > now) {
                        return Err(self.diverged(format!(
                            "the log advances the timers to {now} ns, but no timer is due by then here (next deadline {:?})",
                            self.platform.next_deadline()
                        )));
                    }
                    self.clock = self.clock.max(now);
                    self.platform.poll(now);
                }
                Record::SerialInput { bytes, .. } => {
                    self.signature.fold_input(&bytes);
                    let taken = self.platform.enqueue_serial_input(&bytes);
                    if taken != bytes.len() {
                        return Err(self.diverged(format!(
                            "the UART took {taken} of {} logged input bytes",
                            bytes.len()
                        )));
                    }
                }
                Record::NetRx { frame, .. } => {
                    use crate::devices::virtio::RxOutcome;
                    self.signature.fold_input(&frame);
                    match self.platform.net_receive(&frame, &mut self.vm) {
                        Some(RxOutcome::Delivered) | Some(RxOutcome::Dropped(_)) => {
                            self.stats.net_rx_frames += 1
                        }
                        other => {
                            return Err(self.diverged(format!(
                            "the log delivers a received frame, but the NIC here answers {other:?}"
                        )))
                        }
                    }
                }
                Record::Interrupt { vector, .. } => {
                    if self.injected_here {
                        return Err(self.diverged(format!(
                            "the log injects vector {vector:#x} a second time at one landmark"
                        )));
                    }
                    if !self.can_inject() {
                        return Err(self.diverged(format!("the log injects vector {vector:#x} but the guest cannot take interrupts here")));
                    }
                    match self.platform.acknowledge_interrupt() {
                        Some(v) if v == vector => {
                            self.inject(vector)?;
                            injected = true;
                        }
                        other => {
                            return Err(self.diverged(format!(
                                "the log injects vector {vector:#x}, the platform has {other:x?}"
                            )))
                        }
                    }
                }
                Record::Digest { digest, .. } => self.verify_digest(&digest)?,
                Record::SyncState { state, .. } if self.sync_state.is_some() => {
                    self.check_sync_state(&state)?
                }
                Record::End { reason, .. } => {
                    self.check_end(reason)?;
                    return Ok(AtLandmark::End(Stop::Ended {
                        ending: ending_of(reason),
                        log_end: true,
                    }));
                }
                other => {
                    return Err(self.diverged(format!("unexpected {} record", other.kind_name())))
                }
            }
        }
        // The primary injects whenever the PIC holds an interrupt the guest
        // can take; a log with none here means the primary's PIC had none.
        if !self.injected_here && self.platform.interrupt_pending() && self.can_inject() {
            return Err(self.diverged(
                "an interrupt the guest can take is waiting here, but the log injects none".into(),
            ));
        }
        self.decide_interrupt_window();
        Ok(AtLandmark::Continue { injected })
    }

    /// At the end of a landmark's work (both roles, from the state they
    /// share): whether the next KVM_RUN asks for an interrupt-window exit
    /// (interrupt_window.rs).
    fn decide_interrupt_window(&mut self) {
        // Only when the log header's rule says so: otherwise landmarks
        // stay where logs without window exits have them.
        let interrupt_waiting =
            self.platform.tick_delivery().uses_window_exits() && self.platform.interrupt_pending();
        let state = WindowState {
            interrupt_waiting,
            injected_here: self.injected_here,
            // Read only when it matters (it is cheap, but keep it honest).
            can_inject: interrupt_waiting && self.can_inject(),
            at_window_exit: self.at_window_exit,
        };
        self.window_wanted = interrupt_window::wants_window(state);
        if self.window_wanted {
            tracing::trace!(
                landmark = self.landmark,
                at_sync_point = self.sync_state.is_some(),
                "interrupt window requested"
            );
        }
    }

    /// The log says the recording ended for `reason`: this replica must be
    /// in the state that ends a run that way.
    fn check_end(&mut self, reason: EndReason) -> Result<(), RunError> {
        match reason {
            EndReason::ResetRequested => {
                if self.platform.take_event() != Some(PlatformEvent::Reset) {
                    return Err(self.diverged(
                        "the log ends with a reset request, but the guest made none here".into(),
                    ));
                }
            }
            EndReason::HaltedForGood => {
                // The primary ends so only at a HLT exit (not a loaded sync
                // point, whose kvm_run still shows the exit before it).
                let halted = self.sync_state.is_none()
                    && self.vm.vcpu.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_HLT;
                if !halted {
                    return Err(self.diverged(
                        "the log ends with the guest halted, but this landmark is not a HLT here"
                            .into(),
                    ));
                }
                if self.vm.vcpu.get_kvm_run().if_flag != 0 {
                    return Err(self.diverged(
                        "the log ends with the guest halted with interrupts off, but they are on here".into(),
                    ));
                }
            }
            EndReason::Stopped => {}
        }
        Ok(())
    }

    /// What only a landmark can deliver: an interrupt the PIC holds (a
    /// lower-priority one stays there while a higher one is served: without
    /// this, IRQ4 would starve behind every timer tick of a guest spinning
    /// in user mode), a timer deadline, input the UART has not taken (held
    /// or still in its channel), or a frame for a guest that has buffers.
    /// The timer deadline is kept apart from the rest: only a tick may be
    /// deferred (tick_deferral.rs).
    fn pending(&mut self) -> Pending {
        let now = self.real_now();
        // Typed input still in its channel counts too (when the UART has
        // room): its sender's kick must not wait for a deferred tick.
        let typed = self.platform.serial_input_space() > 0
            && self.inputs.serial.as_ref().is_some_and(|rx| !rx.is_empty());
        // A tick the PIC already holds, with nothing else, waits like a tick
        // not raised yet: it was raised at a landmark where the guest could
        // not take it (in the handler of the tick before, the usual case
        // when a sync point outlasts the tick period), and counting it as
        // "something else" made every sync point the next one's cause.
        let held_tick = self.platform.held_tick_deadline();
        let other_waiting = (self.platform.interrupt_pending() && held_tick.is_none())
            || !self.input.0.is_empty()
            || typed
            || (self.platform.net_can_receive()
                && (self.held_frame.is_some()
                    || self.inputs.net.as_ref().is_some_and(|rx| !rx.is_empty())));
        let timer_deadline = match (held_tick, self.platform.next_deadline()) {
            (Some(held), Some(next)) => Some(held.min(next)),
            (held, next) => held.or(next),
        };
        Pending {
            now,
            timer_deadline,
            other_waiting,
            last_sync: self.last_sync,
        }
    }

    /// After a kick: stop for a sync point, let a user-mode guest run on
    /// with only a tick owed, or resume (nothing it can take).
    fn kick_decision(&mut self) -> KickDecision {
        let pending = self.pending();
        let run = self.vm.vcpu.get_kvm_run();
        let can_take = run.if_flag != 0 && run.ready_for_interrupt_injection != 0;
        let rule = DeferralRule {
            fixed: self.settings.tick_deferral.as_nanos() as Nanos,
            budget_percent: self.settings.sync_budget_percent,
        };
        let vcpu = &self.vm.vcpu;
        tick_deferral::on_kick(rule, pending, can_take, || {
            // Unreadable state: no deferral (deliver now, as before).
            vcpu.get_sregs().is_ok_and(|s| s.cs.dpl == 3)
        })
    }

    /// Kick the guest one sync bound after the next thing it must get
    /// (now, if something is already waiting), or when a deferral granted
    /// to an owed tick ends.
    fn arm_timer(&mut self) {
        let pending = self.pending();
        let bound = self.settings.sync_bound.as_nanos() as Nanos;
        let wake = tick_deferral::wake_at(bound, pending, self.deferred_until);
        self.timer.arm(self.start, wake);
    }

    /// The guest halted with interrupts enabled at a landmark: wait (live) for
    /// an interrupt, input or a stop.
    pub(super) fn halted(&mut self) -> Result<Option<Stop>, RunError> {
        loop {
            match self.landmark_live()? {
                AtLandmark::End(stop) => return Ok(Some(stop)),
                AtLandmark::Continue { injected: true } => return Ok(None),
                AtLandmark::Continue { injected: false } => {}
            }
            let deadline = self
                .platform
                .next_deadline()
                .map(|ns| self.start + Duration::from_nanos(ns));
            if !self.wait_for_input(deadline) {
                // Nobody can send input or a stop any more and no timer is
                // armed: the guest would sleep forever.
                return self.end_live(Ending::Stopped).map(Some);
            }
        }
    }

    /// Sleep until an input channel has something (or closed), or
    /// `deadline`. False if nothing could ever wake the guest.
    ///
    /// The channels are polled and the thread parks between polls; every
    /// feeder kicks after sending, and a kick unparks this thread
    /// (`Kicker::kick`). Not crossbeam's `Select`: it calls `sched_yield`
    /// four times before blocking, and on a host CPU shared with a busy
    /// thread each yield hands that thread a whole time slice (measured,
    /// docs/benchmarks.md, "A shared host CPU").
    fn wait_for_input(&mut self, deadline: Option<std::time::Instant>) -> bool {
        let serial_room = self.input.0.len() < MAX_HELD_SERIAL_INPUT;
        // A held frame waits for the guest's buffers, which only an
        // interrupt (a timer, another input) can lead it to post.
        let net_room = self.held_frame.is_none();
        let watching = self.control_open
            || (serial_room && self.inputs.serial.is_some())
            || (net_room && self.inputs.net.is_some());
        if !watching {
            return match deadline {
                None => false,
                Some(d) => {
                    std::thread::sleep(d.saturating_duration_since(std::time::Instant::now()));
                    true
                }
            };
        }
        loop {
            if self.take_one_input(serial_room, net_room) {
                return true;
            }
            let now = std::time::Instant::now();
            let until = match deadline {
                Some(d) if d <= now => return true,
                Some(d) => d.min(now + INPUT_PARK_AT_MOST),
                None => now + INPUT_PARK_AT_MOST,
            };
            std::thread::park_timeout(until - now);
        }
    }

    /// Take one item (or a closing) from the first input channel that has
    /// one: control, then serial input (if `serial_room`), then a frame (if
    /// `net_room`). A closed channel is forgotten. False if none had any.
    fn take_one_input(&mut self, serial_room: bool, net_room: bool) -> bool {
        if self.control_open {
            match self.inputs.control.try_recv() {
                Ok(msg) => {
                    self.held_control.push_back(msg);
                    return true;
                }
                Err(TryRecvError::Disconnected) => {
                    self.control_open = false;
                    return true;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        if let Some(rx) = self.inputs.serial.as_ref().filter(|_| serial_room) {
            match rx.try_recv() {
                Ok(bytes) => {
                    self.input.0.extend(bytes);
                    return true;
                }
                Err(TryRecvError::Disconnected) => {
                    self.inputs.serial = None;
                    return true;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        if let Some(rx) = self.inputs.net.as_ref().filter(|_| net_room) {
            match rx.try_recv() {
                Ok(frame) => {
                    self.held_frame = Some(frame);
                    return true;
                }
                Err(TryRecvError::Disconnected) => {
                    self.inputs.net = None;
                    return true;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        false
    }

    /// Primary, at a landmark: the backup will have executed everything up
    /// to here itself, so a later sync point needs only pages written after
    /// this point. Fetch the dirty log (at most once per [`HARVEST_EVERY`],
    /// to bound the ioctl cost), keep it for the next digest, and restart
    /// the sync-point set. Any superset stays correct, so the timing need
    /// not be deterministic; hot pages (`vmm::hot_pages`), left
    /// write-enabled, are reported by every harvest and so by every sync
    /// point until let go.
    fn harvest_dirty_pages(&mut self) -> Result<(), RunError> {
        self.last_harvest = std::time::Instant::now();
        self.vm
            .collect_dirty_pages(&mut [&mut self.since_digest, &mut self.since_state])?;
        self.since_sync = digest::DirtyPages::default();
        Ok(())
    }
}

fn ending_of(reason: EndReason) -> Ending {
    match reason {
        EndReason::ResetRequested => Ending::ResetRequested,
        EndReason::HaltedForGood => Ending::HaltedForGood,
        EndReason::Stopped => Ending::Stopped,
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
