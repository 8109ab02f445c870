//! The campaign scheduler: one task that, every tick (or when woken by a change), times out
//! silent attempts, applies each campaign's verdict (canary promotion, abort, end), and sends
//! the notices the campaigns' pace, concurrency bound and windows allow, within a server-wide
//! budget shared equally between tenants (so one tenant's huge campaign cannot starve
//! another's). All state is in the database: after a kill -9 the next process picks up every
//! campaign where the last committed change left it.

use super::plan::{self, JobState, Pacer, Stage, Verdict};
use super::store::{Change, Job};
use super::{Live, Ota};
use crate::registry::now_ms;
use crate::storage::{PresenceEvent, StorageError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Runs until `stop` turns true.
pub async fn run(
    ota: Arc<Ota>,
    mut presence: broadcast::Receiver<PresenceEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(ota.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sched = Scheduler::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ota.wake.notified() => {}
            ev = presence.recv() => {
                match ev {
                    Ok(e) if e.status == "online" => {
                        if let Err(err) = ota.on_online(&e.product_key, &e.device_name).await {
                            tracing::warn!(error = %err, "OTA: handling a device's return failed");
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "OTA scheduler missed presence changes; queued jobs are found by the next rounds");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        presence = broadcast::channel(1).1;
                    }
                }
                continue;
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        if let Err(e) = sched.round(&ota, now_ms()).await {
            tracing::warn!(error = %e, "OTA scheduler round failed; retrying at the next tick");
        }
    }
}

/// What the scheduler keeps between rounds (all of it can be rebuilt from the database).
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Server-wide notice budget.
    tokens: f64,
    last: Option<i64>,
    /// Rotates the order tenants are served in.
    turn: usize,
    /// The notices of the previous process have been renewed.
    renewed: bool,
    packages: HashMap<String, super::store::Package>,
}

/// A campaign's wish for this round.
struct Want {
    live: Arc<Live>,
    n: usize,
}

impl Scheduler {
    /// One round at `now`.
    pub async fn round(&mut self, ota: &Ota, now: i64) -> Result<(), StorageError> {
        let rows = ota.db.list_campaigns(&["running", "paused"]).await?;
        let mut live = HashMap::new();
        for row in rows {
            if !self.packages.contains_key(&row.package_id) {
                if let Some(p) = ota.db.get_package(&row.package_id).await? {
                    self.packages.insert(p.id.clone(), p);
                }
            }
            let Some(p) = self.packages.get(&row.package_id) else {
                continue;
            };
            live.insert(row.id.clone(), Arc::new(Live::from_row(row, p.clone())));
        }
        if !self.renewed {
            // Every connection ended with the previous process: a notice it sent may never
            // have arrived. Jobs notified but not yet reported on go back to the queue, to be
            // notified again under a new attempt (never the same attempt twice).
            for l in live.values() {
                let n = ota
                    .db
                    .move_all(
                        &l.row.id,
                        &[JobState::Notified],
                        JobState::Queued,
                        "the cloud restarted before the device reported: notice renewed",
                        now,
                    )
                    .await?;
                if n > 0 {
                    tracing::info!(campaign = %l.row.id, jobs = n, "OTA notices renewed after a restart");
                }
            }
            self.renewed = true;
        }
        let keep: HashSet<String> = live.keys().cloned().collect();
        ota.drop_limiters(&keep);
        ota.pacers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep.contains(k));
        *ota.live.write().unwrap_or_else(|e| e.into_inner()) = live.clone();

        let per_second = f64::from(ota.config.max_notices_per_second.max(1));
        let last = *self.last.get_or_insert(now);
        self.tokens =
            (self.tokens + (now - last).max(0) as f64 * per_second / 1000.0).min(per_second);
        self.last = Some(now.max(last));

        let mut wants: Vec<Want> = Vec::new();
        let mut ordered: Vec<&Arc<Live>> = live.values().collect();
        ordered.sort_by(|a, b| {
            a.row
                .created_at
                .cmp(&b.row.created_at)
                .then(a.row.id.cmp(&b.row.id))
        });
        for l in ordered {
            self.expire(ota, l, now).await?;
            if l.row.state != "running" {
                continue;
            }
            if let Some(w) = self.decide(ota, l, now).await? {
                wants.push(w);
            }
        }
        let grants = self.share(&wants);
        for (w, n) in wants.iter().zip(grants) {
            if n == 0 {
                continue;
            }
            let sent = self.send(ota, &w.live, n, now).await?;
            self.tokens -= sent as f64;
            if let Some(p) = ota
                .pacers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&w.live.row.id)
            {
                p.spend(sent);
            }
        }
        Ok(())
    }

    /// Times out silent attempts: retried while retries remain, failed after.
    async fn expire(&self, ota: &Ota, l: &Live, now: i64) -> Result<(), StorageError> {
        let expired = ota.db.expired_jobs(&l.row.id, now, 1000).await?;
        for job in expired {
            let again = job.retries < i64::from(l.policy.retries);
            let state = job.job_state();
            let why = format!(
                "no report for {} while {} (attempt {})",
                format_args!("{} s", l.policy.timeout.as_secs()),
                state.as_str(),
                job.attempt
            );
            let from = [state];
            let change = Change {
                from: &from,
                attempt: Some(job.attempt),
                to: if again {
                    JobState::Queued
                } else {
                    JobState::Failed
                },
                step: None,
                detail: if again {
                    format!("{why}; retrying")
                } else {
                    format!("timed out: {why}")
                },
                deadline: None,
                retry: again,
            };
            if let Some(j) = ota
                .db
                .move_job(&l.row.id, &job.device_name, &change, now)
                .await?
            {
                ota.announce(Some(l), &j, &change.detail, now).await;
            }
        }
        Ok(())
    }

    /// Applies a running campaign's verdict; returns how many notices it would send now.
    async fn decide(
        &self,
        ota: &Ota,
        l: &Arc<Live>,
        now: i64,
    ) -> Result<Option<Want>, StorageError> {
        let (counts, _) = ota.db.job_counts(&l.row.id).await?;
        let mut pacer = ota
            .pacers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(l.row.id.clone())
            .or_insert_with(|| {
                serde_json::from_str(&l.row.rate).unwrap_or_else(|_| Pacer::new(&l.policy, now))
            })
            .clone();
        let ramped = pacer.ramp(&l.policy, now, counts.failure_rate());
        let stage = l.stage();
        let rate_json = serde_json::to_string(&pacer).unwrap_or_default();
        let verdict = plan::verdict(&l.policy, stage, &counts, now, l.ends_at());
        let id = &l.row.id;
        match &verdict {
            Verdict::Promote => {
                ota.db
                    .update_campaign(
                        id,
                        &["running"],
                        "running",
                        Stage::Main.as_str(),
                        "",
                        &rate_json,
                        now,
                    )
                    .await?;
                tracing::info!(campaign = %id, "OTA canary stage succeeded; notifying every targeted device");
            }
            Verdict::Abort(why) => {
                if ota
                    .db
                    .update_campaign(
                        id,
                        &["running"],
                        "aborted",
                        stage.as_str(),
                        why,
                        &rate_json,
                        now,
                    )
                    .await?
                {
                    ota.db
                        .cancel_jobs(
                            id,
                            &[JobState::Queued],
                            &format!("campaign aborted: {why}"),
                            now,
                        )
                        .await?;
                    tracing::warn!(campaign = %id, reason = %why, "OTA campaign aborted");
                }
                return Ok(None);
            }
            Verdict::Finish => {
                ota.db
                    .update_campaign(
                        id,
                        &["running"],
                        "finished",
                        stage.as_str(),
                        "",
                        &rate_json,
                        now,
                    )
                    .await?;
                tracing::info!(campaign = %id, succeeded = counts.succeeded, failed = counts.failed, "OTA campaign finished");
                return Ok(None);
            }
            Verdict::Ended => {
                ota.db
                    .cancel_jobs(
                        id,
                        &[JobState::Queued],
                        "the campaign's run time ended",
                        now,
                    )
                    .await?;
                return Ok(None);
            }
            Verdict::Continue => {
                if ramped {
                    ota.db
                        .update_campaign(
                            id,
                            &["running"],
                            "running",
                            stage.as_str(),
                            "",
                            &rate_json,
                            now,
                        )
                        .await?;
                }
            }
        }
        let allowance = pacer.allowance(now);
        ota.pacers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), pacer);
        if counts.queued == 0 || !l.policy.in_window(now) {
            return Ok(None);
        }
        let room = u64::from(l.policy.max_concurrent).saturating_sub(counts.active) as usize;
        let n = allowance.min(room);
        let live = if matches!(verdict, Verdict::Promote) {
            Arc::new(Live {
                row: super::store::CampaignRow {
                    stage: Stage::Main.as_str().into(),
                    ..l.row.clone()
                },
                ..(**l).clone()
            })
        } else {
            l.clone()
        };
        Ok((n > 0).then_some(Want { live, n }))
    }

    /// Splits the server-wide budget: tenants in turn get equal shares, and within a tenant
    /// its campaigns do; what one cannot use goes to the others.
    fn share(&mut self, wants: &[Want]) -> Vec<usize> {
        let mut grants = vec![0usize; wants.len()];
        let mut budget = self.tokens.max(0.0).floor() as usize;
        let mut tenants: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, w) in wants.iter().enumerate() {
            tenants
                .entry(w.live.row.tenant.as_str())
                .or_default()
                .push(i);
        }
        let mut order: Vec<Vec<usize>> = tenants.into_values().collect();
        if !order.is_empty() {
            let k = self.turn % order.len();
            order.rotate_left(k);
        }
        self.turn = self.turn.wrapping_add(1);
        while budget > 0 {
            let open: Vec<&Vec<usize>> = order
                .iter()
                .filter(|t| t.iter().any(|&i| grants[i] < wants[i].n))
                .collect();
            if open.is_empty() {
                break;
            }
            let per_tenant = (budget / open.len()).max(1);
            for t in open {
                let mut left = per_tenant.min(budget);
                let campaigns: Vec<usize> = t
                    .iter()
                    .copied()
                    .filter(|&i| grants[i] < wants[i].n)
                    .collect();
                let per_campaign = (left / campaigns.len()).max(1);
                for i in campaigns {
                    let give = per_campaign.min(wants[i].n - grants[i]).min(left);
                    grants[i] += give;
                    left -= give;
                    budget -= give;
                    if budget == 0 || left == 0 {
                        break;
                    }
                }
                if budget == 0 {
                    break;
                }
            }
        }
        grants
    }

    /// Notifies up to `n` of a campaign's queued jobs whose devices are online: each job's
    /// change is committed first, then its notice goes out.
    async fn send(
        &self,
        ota: &Ota,
        l: &Arc<Live>,
        n: usize,
        now: i64,
    ) -> Result<usize, StorageError> {
        let canary_only = l.stage() == Stage::Canary;
        let due: Vec<Job> = ota.db.due_jobs(&l.row.id, canary_only, n).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let names: Vec<String> = due.into_iter().map(|j| j.device_name).collect();
        let deadline = now + l.policy.timeout.as_millis() as i64;
        let moved = ota
            .db
            .notify_jobs(&l.row.id, &names, now, deadline, "notice sent")
            .await?;
        for job in &moved {
            ota.push(l, job, now);
        }
        ota.announce_many(l, &moved, "notice sent", now).await;
        Ok(moved.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(tenant: &str, n: usize) -> Want {
        let row = super::super::store::CampaignRow {
            id: format!("c-{tenant}-{n}"),
            name: String::new(),
            package_id: String::new(),
            product_key: String::new(),
            module: String::new(),
            tenant: tenant.into(),
            target: String::new(),
            policy: String::new(),
            state: "running".into(),
            stage: "main".into(),
            reason: String::new(),
            rate: String::new(),
            created_at: 0,
            updated_at: 0,
            finished_at: None,
        };
        let package = super::super::store::Package {
            id: String::new(),
            product_key: String::new(),
            module: String::new(),
            version: String::new(),
            src_versions: "[]".into(),
            file_name: String::new(),
            size: 0,
            sha256: String::new(),
            md5: String::new(),
            ed25519: None,
            sign_method: "Md5".into(),
            description: String::new(),
            created_at: 0,
        };
        Want {
            live: Arc::new(Live::from_row(row, package)),
            n,
        }
    }

    #[test]
    fn tenants_share_the_budget_equally_and_pass_on_what_they_cannot_use() {
        let mut s = Scheduler {
            tokens: 1_000.0,
            ..Scheduler::default()
        };
        // Tenant a has one huge campaign, b two small ones, c a medium one.
        let wants = vec![
            want("a", 100_000),
            want("b", 50),
            want("b", 100),
            want("c", 300),
        ];
        let g = s.share(&wants);
        assert_eq!(g.iter().sum::<usize>(), 1_000);
        assert_eq!(g[1] + g[2], 150, "b gets all it wants");
        assert_eq!(g[3], 300, "c gets all it wants");
        assert_eq!(g[0], 550, "a gets the rest, not everything");
        // With a small budget each tenant still gets its turn.
        let mut s = Scheduler {
            tokens: 3.0,
            ..Scheduler::default()
        };
        let g = s.share(&wants);
        assert_eq!(g.iter().sum::<usize>(), 3);
        assert!(g[0] == 1 && g[1] + g[2] == 1 && g[3] == 1, "{g:?}");
        // Nothing wanted, nothing given.
        assert!(s.share(&[]).is_empty());
    }
}
