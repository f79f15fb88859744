//! `selftest`: the arbiter's promise checked end to end on real processes.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::local_cluster::{ClusterOptions, Launcher, LocalCluster};
use crate::state_machine::TasOutcome;

const VM: &str = "selftest-vm";

pub fn run(launcher: Launcher) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    match check(launcher) {
        Ok(summary) => {
            println!(
                "selftest PASS in {:.1}s: {summary}",
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!(
                "selftest FAIL after {:.1}s: {e:#}",
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn check(launcher: Launcher) -> anyhow::Result<String> {
    let opts = ClusterOptions {
        allow_fault_injection: false,
        cluster_id: "twinvm-selftest".into(),
        ..Default::default()
    };
    let mut cluster =
        LocalCluster::start(launcher, opts).context("starting 3 arbiter processes")?;

    // Two contenders race for generation 1.
    let deadline = Duration::from_secs(10);
    let handles: Vec<_> = ["primary", "backup"]
        .into_iter()
        .map(|who| {
            let mut client = cluster.client(deadline);
            std::thread::spawn(move || (who, client.test_and_set(VM, 1, who)))
        })
        .collect();
    let mut winners = Vec::new();
    let mut holders_seen = Vec::new();
    for h in handles {
        let (who, result) = h
            .join()
            .map_err(|_| anyhow::anyhow!("contender thread panicked"))?;
        match result.with_context(|| format!("{who}'s test-and-set"))? {
            TasOutcome::Won { .. } => winners.push(who),
            TasOutcome::Held { holder, .. } => holders_seen.push(holder),
            other => bail!("{who} got {other:?}"),
        }
    }
    if winners.len() != 1 {
        bail!("expected exactly one winner, got {winners:?}");
    }
    let winner = winners[0];
    if holders_seen.iter().any(|h| h != winner) {
        bail!("the loser was told holder {holders_seen:?}, winner is {winner}");
    }

    // Kill -9 the leader; a new leader must give the same answer.
    let old_leader = cluster.wait_leader(Duration::from_secs(10))?;
    cluster.kill(old_leader);
    let new_leader = cluster
        .wait_leader(Duration::from_secs(15))
        .context("electing a new leader")?;
    let loser = if winner == "primary" {
        "backup"
    } else {
        "primary"
    };
    let mut client = cluster.client(deadline);
    match client.test_and_set(VM, 1, loser)? {
        TasOutcome::Held { holder, .. } if holder == winner => {}
        other => {
            bail!("after killing leader {old_leader}, new leader {new_leader} answered {other:?}")
        }
    }

    // Restart everything from disk; the decision must survive.
    for id in cluster.ids() {
        cluster.kill(id);
    }
    for id in cluster.ids() {
        cluster.spawn(id)?;
    }
    cluster
        .wait_leader(Duration::from_secs(15))
        .context("electing after full restart")?;
    let slot = client.get(VM)?.context("decision lost after restart")?;
    if slot.holder.as_deref() != Some(winner) || slot.generation != 1 {
        bail!("after restart the record is {slot:?}, expected {winner} at generation 1");
    }
    drop(cluster); // kills the processes; the temp dir goes with it
    Ok(format!(
        "one winner ({winner}), same answer after killing leader {old_leader} (new leader {new_leader}), decision survived full restart"
    ))
}
