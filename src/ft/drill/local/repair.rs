//! The local pair's repair by clone: a new `twinvm backup --from-clone`
//! in a host's namespace, the side running alone cloned to it through its
//! control socket, and the wait until the pair is whole again. The
//! double-failure drill and `cargo bench --bench clone` use it.

use std::sync::atomic::AtomicBool;

use tracing::info;

use super::{
    ended_early, query_status, LocalOptions, LocalPair, GENERATION, STATUS_TIMEOUT, VM_NAME,
};
use crate::clone::CloneStatus;
use crate::ft::drill::pair::{backup_args, PairSpec, Proc, SideFiles};
use crate::ft::drill::topology::{addr, Host, Topology};
use crate::ft::drill::{wait_until, DrillError};

impl LocalPair {
    /// Clone the side on `from` (the first process started there, running
    /// alone: `live` or `alone`) to a new backup named `node` started in
    /// `to`'s namespace, and wait until the pair is whole: the source
    /// `replicating` one generation up, the clone `following`. Returns the
    /// source's report of the clone.
    pub fn clone_alone_side(
        &mut self,
        opts: &LocalOptions,
        from: Host,
        to: Host,
        node: &str,
        interrupted: &AtomicBool,
    ) -> Result<CloneStatus, DrillError> {
        let timeout = opts.phases.ready_timeout;
        let source_control = self.control(from);
        let generation = wait_until("the source running alone", timeout, interrupted, || {
            Ok(query_status(&source_control, STATUS_TIMEOUT)
                .ok()
                .filter(|s| s.state == "live" || s.state == "alone")
                .map(|s| s.generation))
        })?;
        let key_file = self
            .key_file()
            .ok_or_else(|| DrillError::Arbiter("the cluster has no key file".into()))?
            .to_owned();
        let listen = format!("{}:{}", to.ft_addr(), addr::FT_PORT);
        let spec = PairSpec {
            vm: VM_NAME.into(),
            generation: GENERATION,
            backup_listen: listen.clone(),
            key_file,
            arbiters: Topology::arbiter_addrs(),
            heartbeat_ms: opts.heartbeat_ms,
            peer_timeout_ms: opts.peer_timeout_ms,
        };
        let files = SideFiles::in_dir(self.dir.path(), node);
        let mut args = backup_args(&spec, &opts.guest, node, &files);
        args.push("--from-clone".into());
        let ns = match to {
            Host::A => &self.topo.host_a,
            Host::B => &self.topo.host_b,
        };
        let mut cmd = ns.command(&opts.exe);
        cmd.args(args);
        self.sides
            .push(Proc::spawn(cmd, node, "backup", files.clone())?);
        let watched = [from.node(), node];
        wait_until("the clone waiting", timeout, interrupted, || {
            self.check_nodes_running(&watched)?;
            let text = self.sides.last().map(Proc::stderr_text).unwrap_or_default();
            Ok(text.contains("waiting for a clone").then_some(()))
        })?;
        crate::ft::node::request_clone(&source_control, &listen)
            .map_err(|e| DrillError::Usage(format!("{} refused the clone: {e}", from.node())))?;
        let report = wait_until("the clone in sync", timeout, interrupted, || {
            self.check_nodes_running(&watched)?;
            let Ok(status) = crate::ft::node::query_status(&source_control) else {
                return Ok(None);
            };
            match status.clone {
                Some(c) if c.phase == "failed" => {
                    Err(DrillError::Usage(format!("the clone failed: {}", c.error)))
                }
                Some(c)
                    if c.phase == "done"
                        && status.state == "replicating"
                        && status.generation == generation + 1 =>
                {
                    Ok(Some(c))
                }
                _ => Ok(None),
            }
        })?;
        wait_until("the clone following", timeout, interrupted, || {
            self.check_nodes_running(&watched)?;
            Ok(query_status(&files.control, STATUS_TIMEOUT)
                .ok()
                .filter(|s| s.state == "following")
                .map(|_| ()))
        })?;
        info!(
            total_ms = report.total_ms,
            pause_ms = report.pause_ms,
            rounds = report.round,
            "{} was cloned to {node}",
            from.node()
        );
        Ok(report)
    }

    /// Kill every process started under the node name `node` (a clone
    /// the caller is done with).
    pub fn kill_node(&mut self, node: &str) {
        self.sides
            .iter_mut()
            .filter(|p| p.node == node)
            .for_each(Proc::kill);
    }

    /// An error if a process of one of `nodes` has ended (the first
    /// started under each name).
    fn check_nodes_running(&mut self, nodes: &[&str]) -> Result<(), DrillError> {
        for node in nodes {
            if let Some(e) = self
                .sides
                .iter_mut()
                .find(|p| p.node == *node)
                .and_then(ended_early)
            {
                return Err(e);
            }
        }
        Ok(())
    }
}
