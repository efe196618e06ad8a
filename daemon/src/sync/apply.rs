//! Turning verified documents into running apps: checking a document read from a key,
//! realising it (artifacts, then deploys and removals in precedence order), retrying what
//! failed, letting go of keys the device no longer follows, and noticing expiry.

use super::retry::{self, Pending};
use super::{precedence, Sync, SyncError};
use crate::reconcile::ReconcileError;
use crate::spec::AppName;
use crate::store::{now_unix, Applied, OutboxKind, Owner};
use async_nats::jetstream;
use cairn_core::fleet::{self, Document};
use std::time::Instant;

impl Sync {
    /// Checks one document read from `key` and, if it is to be trusted, makes it so. Only a
    /// failure of the store ends the session; a refusal or a failure to realise is recorded,
    /// reported, and (for the latter) retried with its own backoff.
    pub(super) async fn apply(
        &self,
        context: Option<&jetstream::Context>,
        key: &str,
        value: &[u8],
    ) -> Result<(), SyncError> {
        if !self.targets().iter().any(|t| t == key) {
            return Ok(());
        }
        let owned_key = key.to_string();
        let applied = self.store.call(move |store| store.applied()).await?;
        let previous = applied.iter().find(|a| a.key == owned_key);
        let applied_version = previous.map(|a| a.version).unwrap_or(0);
        // The applied value seen again (a reconnect, `sync now`) is not news, even when it
        // would now be refused (its signing key rotated out, expired: expiry is watched
        // apart); anything else at the applied version is.
        let sha = value_sha256(value);
        if previous.is_some_and(|p| p.value_sha256 == sha) {
            return Ok(());
        }
        let document = match fleet::verify(
            value,
            &self.signers(),
            key,
            &self.targets(),
            applied_version,
            now_unix(),
        ) {
            Ok(document) => document,
            Err(rejection) => {
                // A record from before schema 8 has no hash: the same version is not news.
                let unhashed = previous.is_some_and(|p| p.value_sha256.is_empty());
                if unhashed
                    && matches!(rejection, fleet::Rejection::Stale { version, applied } if version == applied)
                {
                    return Ok(());
                }
                return self.reject(key, &rejection.to_string()).await;
            }
        };
        self.realise(context, key, document, value).await
    }

    /// Makes a verified document so: every artifact first (nothing changes unless all are
    /// here), then the plan's deploys and removals. Recorded as applied once the changes are
    /// made, complete or not; what failed is retried.
    pub(super) async fn realise(
        &self,
        context: Option<&jetstream::Context>,
        key: &str,
        document: Document,
        value: &[u8],
    ) -> Result<(), SyncError> {
        let applied = self.store.call(|store| store.applied()).await?;
        let plan = precedence::plan(&self.targets(), key, &document.apps, &applied);
        // Shadowed apps' artifacts too, so a later handover works offline.
        for digest in plan.artifacts() {
            let fetched = match context {
                Some(context) => self.fetch_artifact(context, digest).await,
                None => {
                    let wanted = digest.clone();
                    match self
                        .store
                        .call(move |store| store.touch_blob(&wanted))
                        .await?
                    {
                        true => Ok(()),
                        false => Err(SyncError::Upstream(format!(
                            "artifact {digest} is not here yet; it is fetched when the link returns"
                        ))),
                    }
                }
            };
            if let Err(error) = fetched {
                let reason = error.to_string();
                self.failed(key, "artifact", &reason, Pending::Value(value.to_vec()))
                    .await;
                return Ok(());
            }
        }
        for (app, by) in &plan.shadowed {
            tracing::info!(app = %app.name, key, by, "fleet app shadowed by a key that wins it");
            if self.first_report(&format!("{key}#shadowed:{}", app.name), by) {
                self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": "shadowed", "key": key, "app": app.name.to_string(), "by": by})).await;
            }
        }
        let mut problems = Vec::new();
        for (from, app) in plan.deploys {
            if from != key {
                tracing::info!(app = %app.name, key, from, "handing a fleet app to the next key that lists it");
            }
            let name = app.name.clone();
            match self.reconciler.deploy(app, Owner::Fleet).await {
                Ok(_) => {}
                Err(error @ ReconcileError::OwnedElsewhere { .. }) => {
                    problems.push(format!("conflict: {error}"))
                }
                Err(error) => problems.push(format!("app `{name}`: {error}")),
            }
        }
        for gone in plan.removals {
            if let Ok(name) = gone.parse::<AppName>() {
                match self.reconciler.remove_owned(&name, Owner::Fleet).await {
                    // A local app of that name is not the fleet's to remove.
                    Ok(()) | Err(ReconcileError::OwnedElsewhere { .. }) => {}
                    Err(error) => problems.push(format!("removing `{gone}`: {error}")),
                }
            }
        }
        let (record_key, version, expires_unix, specs, complete, sha) = (
            key.to_string(),
            document.version,
            document.expires_unix,
            document.apps.clone(),
            problems.is_empty(),
            value_sha256(value),
        );
        self.store
            .call(move |store| {
                store.record_applied(&Applied {
                    key: &record_key,
                    version,
                    specs: &specs,
                    expires_unix,
                    complete,
                    value_sha256: &sha,
                })
            })
            .await?;
        tracing::info!(
            key,
            version,
            problems = problems.len(),
            "applied fleet state"
        );
        if complete {
            self.retries().succeeded(key);
            self.clear_error(key);
        } else {
            self.failed(key, "deploy", &problems.join("; "), Pending::Reconcile)
                .await;
        }
        self.report(OutboxKind::Status, self.status_report().await)
            .await;
        Ok(())
    }

    /// Records that `key` could not be realised, schedules its retry, and reports it unless
    /// the same failure was reported lately.
    async fn failed(&self, key: &str, what: &str, reason: &str, pending: Pending) {
        let delay = self.retries().failed(key, reason, pending, Instant::now());
        tracing::warn!(key, reason, retry_in = ?delay, "fleet state not realised; retrying");
        self.set_link(|link| link.last_error = format!("{key}: {reason}"));
        if self.first_report(key, reason) {
            let (owned_key, recorded) = (key.to_string(), format!("{reason} (retrying)"));
            if let Err(error) = self
                .store
                .call(move |store| store.record_rejection(&owned_key, &recorded))
                .await
            {
                tracing::warn!(%error, "could not record a fleet failure");
            }
            self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": what, "key": key, "error": reason, "retry_in_secs": delay.as_secs()})).await;
        }
    }

    /// A refused document: recorded for `sync status`, reported unless reported lately.
    pub(super) async fn reject(&self, key: &str, reason: &str) -> Result<(), SyncError> {
        self.retries().forget(key);
        if !self.first_report(key, reason) {
            return Ok(());
        }
        tracing::warn!(key, reason, "refused fleet state");
        let (owned_key, owned_reason) = (key.to_string(), reason.to_string());
        self.store
            .call(move |store| store.record_rejection(&owned_key, &owned_reason))
            .await?;
        self.report(
            OutboxKind::Event,
            serde_json::json!({"device": self.device, "unix": now_unix(), "event": "rejected", "key": key, "reason": reason}),
        )
        .await;
        Ok(())
    }

    /// The link's last error, if it was about `key`, is history once `key` is realised.
    fn clear_error(&self, key: &str) {
        let prefix = format!("{key}: ");
        self.set_link(|link| {
            if link.last_error.starts_with(&prefix) {
                link.last_error.clear();
            }
        });
    }

    fn retries(&self) -> std::sync::MutexGuard<'_, retry::Retries> {
        self.retries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn first_report(&self, key: &str, reason: &str) -> bool {
        self.retries().should_report(key, reason, Instant::now())
    }

    /// Tries again the keys whose backoff is over. Offline (`context` none) that works for a
    /// document whose artifacts are all here.
    pub(super) async fn retry_due(
        &self,
        context: Option<&jetstream::Context>,
    ) -> Result<(), SyncError> {
        let due = self.retries().due(Instant::now());
        let targets = self.targets();
        for (key, pending) in due {
            if !targets.contains(&key) {
                self.retries().succeeded(&key);
                continue;
            }
            tracing::info!(key, "retrying fleet state");
            match pending {
                Pending::Value(value) => self.apply(context, &key, &value).await?,
                Pending::Reconcile => self.reconcile_fleet(&key).await?,
            }
        }
        Ok(())
    }

    /// Brings every fleet app to the spec of the key that wins it, and removes fleet apps no
    /// followed key lists: what a document whose deploys, removals or handovers partly failed
    /// still owes, whatever the diff that failed was.
    async fn reconcile_fleet(&self, key: &str) -> Result<(), SyncError> {
        let targets = self.targets();
        let rank = |k: &str| targets.iter().position(|t| t == k);
        let applied = self.store.call(|store| store.applied()).await?;
        let mut winners: std::collections::BTreeMap<String, (usize, crate::spec::AppSpec)> =
            Default::default();
        for record in &applied {
            let Some(r) = rank(&record.key) else { continue };
            for spec in &record.specs {
                let better = winners
                    .get(spec.name.as_str())
                    .is_none_or(|(held, _)| r < *held);
                if better {
                    winners.insert(spec.name.to_string(), (r, spec.clone()));
                }
            }
        }
        let mut problems = Vec::new();
        for (name, (_, spec)) in winners.iter() {
            match self.reconciler.deploy(spec.clone(), Owner::Fleet).await {
                Ok(_) => {}
                Err(error @ ReconcileError::OwnedElsewhere { .. }) => {
                    problems.push(format!("conflict: {error}"))
                }
                Err(error) => problems.push(format!("app `{name}`: {error}")),
            }
        }
        for app in self.reconciler.list().await {
            if app.owner == Owner::Fleet.as_str() && !winners.contains_key(&app.name) {
                if let Ok(name) = app.name.parse::<AppName>() {
                    if let Err(error) = self.reconciler.remove_owned(&name, Owner::Fleet).await {
                        problems.push(format!("removing `{}`: {error}", app.name));
                    }
                }
            }
        }
        if problems.is_empty() {
            self.store
                .call(|store| store.mark_applied_complete())
                .await?;
            self.retries().succeeded(key);
            self.clear_error(key);
            tracing::info!(key, "fleet state complete");
            self.report(OutboxKind::Status, self.status_report().await)
                .await;
        } else {
            self.failed(key, "deploy", &problems.join("; "), Pending::Reconcile)
                .await;
        }
        Ok(())
    }

    /// Puts the applied documents whose deploys did not all succeed (before a restart) in line
    /// for a retry.
    pub(super) async fn queue_incomplete(&self) {
        let Ok(applied) = self.store.call(|store| store.applied()).await else {
            return;
        };
        let targets = self.targets();
        for record in applied
            .into_iter()
            .filter(|a| !a.complete && targets.contains(&a.key))
        {
            self.retries().failed(
                &record.key,
                "a deploy failed before the restart",
                Pending::Reconcile,
                Instant::now(),
            );
        }
    }

    /// Lets go of applied keys the device no longer follows (a group taken out of the
    /// config): their apps pass to the best key still followed that lists them, or go.
    pub(super) async fn leave_unfollowed(&self) -> Result<(), SyncError> {
        let targets = self.targets();
        let applied = self.store.call(|store| store.applied()).await?;
        for record in applied.iter().filter(|a| !targets.contains(&a.key)) {
            let plan = precedence::leave(&targets, &record.key, &applied);
            let mut problems = Vec::new();
            for (from, app) in plan.deploys {
                tracing::info!(app = %app.name, left = record.key, from, "handing a fleet app to the next key that lists it");
                let name = app.name.clone();
                match self.reconciler.deploy(app, Owner::Fleet).await {
                    // A local app holds the name: it is not the fleet's to hand over.
                    Ok(_) | Err(ReconcileError::OwnedElsewhere { .. }) => {}
                    Err(error) => problems.push(format!("app `{name}`: {error}")),
                }
            }
            for gone in &plan.removals {
                if let Ok(name) = gone.parse::<AppName>() {
                    match self.reconciler.remove_owned(&name, Owner::Fleet).await {
                        Ok(()) | Err(ReconcileError::OwnedElsewhere { .. }) => {}
                        Err(error) => problems.push(format!("removing `{gone}`: {error}")),
                    }
                }
            }
            tracing::info!(
                key = record.key,
                removed = plan.removals.len(),
                "left a key this device no longer follows"
            );
            self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": "left", "key": record.key, "removed": plan.removals, "problems": problems})).await;
            if problems.is_empty() {
                let key = record.key.clone();
                self.store
                    .call(move |store| store.forget_applied(&key))
                    .await?;
            }
        }
        Ok(())
    }

    /// Past an applied document's expiry the device keeps serving what it has (the upstream
    /// may be frozen or unreachable), says so in `sync status`, and reports it once.
    pub(super) async fn check_expiry(&self) {
        let Ok(applied) = self.store.call(|store| store.applied()).await else {
            return;
        };
        let now = now_unix();
        for record in applied {
            if record.expires_unix == 0 || record.expires_unix > now {
                continue;
            }
            let seen = (record.key.clone(), record.version);
            if !self
                .expired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(seen)
            {
                continue;
            }
            tracing::warn!(
                key = record.key,
                version = record.version,
                expires_unix = record.expires_unix,
                "the applied fleet state has expired; serving it until a newer version arrives"
            );
            self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now, "event": "expired", "key": record.key, "version": record.version, "expires_unix": record.expires_unix})).await;
        }
    }
}

fn value_sha256(value: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(value))
}
