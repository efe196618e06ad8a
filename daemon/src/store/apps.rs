//! Apps and their generations: each deploy commits a generation; a rollback makes an older
//! one current; a generation is never changed once written.

use super::{now_unix, Owner, Store, StoreError};
use crate::digest::Digest;
use crate::spec::{AppName, AppSpec};
use rusqlite::params;

/// An app's desired state: its current generation's spec.
#[derive(Debug, Clone)]
pub struct AppRecord {
    pub name: AppName,
    pub owner: Owner,
    pub generation: u64,
    /// The spec, or why this cairnd cannot read it: the app is then failed, not the daemon.
    pub spec: Result<AppSpec, Box<Unreadable>>,
}

#[derive(Debug, Clone)]
pub struct GenerationRecord {
    pub generation: u64,
    pub digest: Digest,
    pub created_unix: i64,
    pub spec: Result<AppSpec, Box<Unreadable>>,
}

/// A stored spec this cairnd cannot read: written by a newer cairn (a field it does not know)
/// or damaged. What can be told of it stands in, so the app can be shown, removed or deployed
/// over; it never runs.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub reason: String,
    pub stand_in: AppSpec,
}

impl Unreadable {
    fn of(
        app: &AppName,
        generation: i64,
        digest: &str,
        text: &str,
        error: String,
    ) -> Box<Unreadable> {
        // The address, if it can be read, so `cairnctl ls` shows where the app was.
        let listen = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|value| value.pointer("/http/listen")?.as_str()?.parse().ok())
            .unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let component: Digest = digest.parse().unwrap_or_else(|_| Digest::of(b""));
        let stand_in = AppSpec::from_stored_json(
            &serde_json::json!({
                "name": app.as_str(),
                "component": component.to_string(),
                "http": { "listen": listen.to_string() },
            })
            .to_string(),
        )
        .expect("the smallest spec reads");
        Box::new(Unreadable {
            reason: format!(
                "generation {generation} was stored in a form this cairnd cannot read ({error}); \
                 it may have been written by a newer cairn: run that, deploy the app again, \
                 roll back to a generation this one reads, or remove it"
            ),
            stand_in,
        })
    }
}

impl Store {
    /// Records `spec` as the app's next generation and makes it current, in one transaction.
    pub fn commit_generation(&self, spec: &AppSpec, owner: Owner) -> Result<u64, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let next: u64 = transaction
            .query_row(
                "SELECT COALESCE(MAX(generation), 0) + 1 FROM generations WHERE app = ?1",
                [spec.name.as_str()],
                |row| row.get::<_, i64>(0),
            )
            .map_err(|e| self.error(e))? as u64;
        transaction
            .execute(
                "INSERT INTO generations (app, generation, spec, digest, created_unix) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![spec.name.as_str(), next as i64, spec.to_stored_json(), spec.component.to_string(), now_unix()],
            )
            .map_err(|e| self.error(e))?;
        transaction
            .execute(
                "INSERT INTO apps (name, owner, generation, updated_unix) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET generation = excluded.generation, updated_unix = excluded.updated_unix",
                params![spec.name.as_str(), owner.as_str(), next as i64, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(next)
    }

    /// Makes an existing generation current again (an error if it is gone, collected since it
    /// was chosen).
    pub fn set_current_generation(&self, app: &AppName, generation: u64) -> Result<(), StoreError> {
        let connection = self.lock();
        let changed = connection
            .execute(
                "UPDATE apps SET generation = ?2, updated_unix = ?3 WHERE name = ?1
                   AND EXISTS (SELECT 1 FROM generations WHERE app = ?1 AND generation = ?2)",
                params![app.as_str(), generation as i64, now_unix()],
            )
            .map_err(|e| self.error(e))?;
        if changed == 0 {
            return Err(StoreError::Gone(format!(
                "generation {generation} of {app}"
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn app(&self, name: &AppName) -> Result<Option<AppRecord>, StoreError> {
        Ok(self.apps_where(Some(name))?.into_iter().next())
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.apps_where(None)
    }

    fn apps_where(&self, name: Option<&AppName>) -> Result<Vec<AppRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(
                "SELECT a.name, a.owner, a.generation, g.spec, g.digest FROM apps a
                 JOIN generations g ON g.app = a.name AND g.generation = a.generation
                 WHERE ?1 IS NULL OR a.name = ?1 ORDER BY a.name",
            )
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([name.map(|n| n.as_str().to_string())], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (name, owner, generation, text, digest) = row.map_err(|e| self.error(e))?;
            let Ok(name) = name.parse::<AppName>() else {
                tracing::error!(app = %name.escape_debug(), "a stored app has a name this cairnd does not accept; it is left alone");
                continue;
            };
            let spec = read_spec(&name, generation, &digest, &text);
            records.push(AppRecord {
                name,
                owner: Owner::parse(&owner),
                generation: generation as u64,
                spec,
            });
        }
        Ok(records)
    }

    /// Every generation of `app`, oldest first.
    pub fn generations(&self, app: &AppName) -> Result<Vec<GenerationRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT generation, spec, created_unix, digest FROM generations WHERE app = ?1 ORDER BY generation")
            .map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([app.as_str()], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for row in rows {
            let (generation, text, created_unix, digest) = row.map_err(|e| self.error(e))?;
            let spec = read_spec(app, generation, &digest, &text);
            records.push(GenerationRecord {
                generation: generation as u64,
                digest: match &spec {
                    Ok(spec) => spec.component.clone(),
                    Err(unreadable) => unreadable.stand_in.component.clone(),
                },
                created_unix,
                spec,
            });
        }
        Ok(records)
    }

    /// Forgets an app: its generations and its logs. Component blobs stay; its pool id is
    /// freed by `release_pool_id` once its pool has ended.
    pub fn remove_app(&self, app: &AppName) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(|e| self.error(e))?;
        let removed = transaction
            .execute("DELETE FROM apps WHERE name = ?1", [app.as_str()])
            .map_err(|e| self.error(e))?;
        for sql in [
            "DELETE FROM generations WHERE app = ?1",
            "DELETE FROM logs WHERE app = ?1",
            "DELETE FROM schedule_state WHERE app = ?1",
        ] {
            transaction
                .execute(sql, [app.as_str()])
                .map_err(|e| self.error(e))?;
        }
        transaction.commit().map_err(|e| self.error(e))?;
        Ok(removed == 1)
    }
}

/// A stored spec, checked to be the app's own (a row naming another app is damage too).
fn read_spec(
    app: &AppName,
    generation: i64,
    digest: &str,
    text: &str,
) -> Result<AppSpec, Box<Unreadable>> {
    match AppSpec::from_stored_json(text) {
        Ok(spec) if spec.name == *app => Ok(spec),
        Ok(spec) => Err(Unreadable::of(
            app,
            generation,
            digest,
            text,
            format!("it names the app {}", spec.name),
        )),
        Err(error) => Err(Unreadable::of(
            app,
            generation,
            digest,
            text,
            error.to_string(),
        )),
    }
}
