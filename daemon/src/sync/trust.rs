//! Whom the device trusts to sign its desired state: the config's `trusted_keys`, and the
//! signing keys a trusted root delegates (`trust.delegation` in the desired-state bucket).
//! The delegation held is kept in the store, so a device never goes back to an older one
//! (which may name a revoked key), across restarts too.

use super::{Sync, SyncError};
use crate::config::TrustConfig;
use crate::store::{now_unix, OutboxKind, Store};
use cairn_core::fleet::{self, Delegation};
use ed25519_dalek::VerifyingKey;

#[derive(Debug, Default)]
pub(super) struct Trusted {
    config: TrustConfig,
    delegation: Option<(Delegation, Vec<VerifyingKey>)>,
    /// The highest serial this device ever held, kept even when that delegation no longer
    /// verifies (the config's roots changed): no older delegation is taken after it.
    floor: u64,
}

impl Trusted {
    /// The config's trust, with the delegation the store holds (if it still verifies against
    /// the configured roots).
    pub fn load(config: TrustConfig, store: &Store) -> Result<Trusted, crate::store::StoreError> {
        let mut trusted = Trusted {
            config,
            delegation: None,
            floor: 0,
        };
        if let Some((serial, bytes)) = store.delegation()? {
            trusted.floor = serial;
            // Checked again as if new (serial 0 up), but not for expiry: an expired delegation
            // is held (a replay of an older one stays refused), it just delegates nothing.
            match fleet::verify_delegation(&bytes, &trusted.config.roots, serial, i64::MIN) {
                Ok(held) => trusted.delegation = Some(held),
                Err(error) => {
                    tracing::warn!(%error, "the stored delegation is not trusted by this config; ignoring it")
                }
            }
        }
        Ok(trusted)
    }

    pub fn has_roots(&self) -> bool {
        !self.config.roots.is_empty()
    }

    /// The keys whose documents are accepted at `now`.
    pub fn signers(&self, now_unix: i64) -> Vec<VerifyingKey> {
        let mut keys = self.config.keys.clone();
        if let Some((delegation, delegated)) = &self.delegation {
            if delegation.expires_unix > now_unix {
                keys.extend(delegated.iter().copied());
            }
        }
        keys
    }

    /// The serial a new delegation must reach (the same serial is the one held, seen again).
    fn current(&self) -> u64 {
        self.held()
            .map_or(self.floor, |(serial, _)| serial.max(self.floor))
    }

    pub fn held(&self) -> Option<(u64, i64)> {
        self.delegation
            .as_ref()
            .map(|(d, _)| (d.serial, d.expires_unix))
    }
}

impl Sync {
    /// Checks a delegation read from the bucket; a newer valid one replaces the one held.
    /// True when the signing keys changed (documents refused before may now apply).
    pub(super) async fn apply_delegation(&self, value: &[u8]) -> Result<bool, SyncError> {
        let (roots, current, holding) = {
            let trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
            (
                trust.config.roots.clone(),
                trust.current(),
                trust.held().is_some(),
            )
        };
        let (delegation, keys) = match fleet::verify_delegation(value, &roots, current, now_unix())
        {
            Ok(held) if held.0.serial == current && holding => return Ok(false),
            Ok(held) => held,
            Err(rejection) => {
                self.reject(fleet::DELEGATION_KEY, &rejection.to_string())
                    .await?;
                return Ok(false);
            }
        };
        let (serial, bytes) = (delegation.serial, value.to_vec());
        self.store
            .call(move |store| store.record_delegation(serial, &bytes))
            .await?;
        tracing::info!(
            serial,
            keys = keys.len(),
            expires_unix = delegation.expires_unix,
            "took a new delegation of signing keys"
        );
        self.report(OutboxKind::Event, serde_json::json!({"device": self.device, "unix": now_unix(), "event": "delegation", "serial": serial, "keys": delegation.keys})).await;
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delegation = Some((delegation, keys));
        Ok(true)
    }
}
