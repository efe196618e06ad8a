//! Numbered schema migrations. `PRAGMA user_version` records how many have run; each runs in
//! its own transaction, so a crash mid-migration leaves the previous version intact. Never edit
//! a migration that has shipped: add the next one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: the foundation: blobs, component names, precompiled code, apps, generations, logs.
    "CREATE TABLE blobs (
         digest TEXT PRIMARY KEY,
         size INTEGER NOT NULL,
         data BLOB NOT NULL,
         created_unix INTEGER NOT NULL
     );
     CREATE TABLE components (
         name TEXT NOT NULL,
         tag TEXT NOT NULL,
         digest TEXT NOT NULL REFERENCES blobs (digest),
         source TEXT NOT NULL,
         created_unix INTEGER NOT NULL,
         PRIMARY KEY (name, tag)
     );
     CREATE TABLE compiled (
         digest TEXT NOT NULL,
         fingerprint TEXT NOT NULL,
         data BLOB NOT NULL,
         checksum TEXT NOT NULL,
         created_unix INTEGER NOT NULL,
         PRIMARY KEY (digest, fingerprint)
     );
     CREATE TABLE generations (
         app TEXT NOT NULL,
         generation INTEGER NOT NULL,
         spec TEXT NOT NULL,
         digest TEXT NOT NULL REFERENCES blobs (digest),
         created_unix INTEGER NOT NULL,
         PRIMARY KEY (app, generation)
     );
     CREATE TABLE apps (
         name TEXT PRIMARY KEY,
         owner TEXT NOT NULL,
         generation INTEGER NOT NULL,
         updated_unix INTEGER NOT NULL
     );
     CREATE TABLE logs (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         app TEXT NOT NULL,
         generation INTEGER NOT NULL,
         unix_millis INTEGER NOT NULL,
         stream TEXT NOT NULL,
         line TEXT NOT NULL
     );
          CREATE INDEX logs_by_app ON logs (app, id);",
    // 2: fleet sync: what was applied per key, what was refused, and the outbox of reports.
    "CREATE TABLE sync_applied (
         key TEXT PRIMARY KEY,
         version INTEGER NOT NULL,
         applied_unix INTEGER NOT NULL,
         apps TEXT NOT NULL
     );
     CREATE TABLE sync_rejections (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         key TEXT NOT NULL,
         reason TEXT NOT NULL,
         unix INTEGER NOT NULL
     );
     CREATE TABLE outbox (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         kind TEXT NOT NULL,
         payload BLOB NOT NULL,
         bytes INTEGER NOT NULL,
         created_unix INTEGER NOT NULL
     );
     CREATE TABLE counters (
         name TEXT PRIMARY KEY,
         value INTEGER NOT NULL
     );",
    // 3: the app specs each applied key carries, so that when the key that wins an app
    // (device over groups) lets go of it, the next one's spec can take over, offline too.
    "ALTER TABLE sync_applied ADD COLUMN specs TEXT NOT NULL DEFAULT '[]';",
    // 4: manifests imported from the import folder (the image's boot partition), by file, with
    // a hash of what was imported, so a boot re-imports only a file that changed.
    "CREATE TABLE imports (
        file TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        app TEXT NOT NULL,
        imported_unix INTEGER NOT NULL
     );",
    // 5: what the runtime learnt about precompiled code when it was made (the pool's sizing),
    // so a pool start does not deserialise the code a second time to find out.
    "ALTER TABLE compiled ADD COLUMN facts TEXT;",
    // 6: the user and group id each app's pool runs as (`pool_users`), kept while the app is.
    "CREATE TABLE pool_ids (
        app TEXT PRIMARY KEY,
        id INTEGER NOT NULL UNIQUE
     );",
    // 7: when a component was last about to be used (a deploy, a push of it again, a fleet
    // fetch that found it): collection's grace period counts from then too.
    "ALTER TABLE blobs ADD COLUMN touched_unix INTEGER NOT NULL DEFAULT 0;",
    // 8: who this installation is. `installation` is random, made with the file, so no two
    // installations (and no re-flash) share report message ids. `device` is the fleet id used
    // when the config names none: an upgraded store keeps the id its own document was applied
    // under (the host name then), a new one gets a random id, never the host name an image sets.
    // For each applied document its expiry (a frozen upstream is noticed) and whether all its
    // deploys succeeded (a failed one is retried). And the root's delegation of signing keys
    // held, so a device never goes back to an older one (which may name a revoked key).
    "CREATE TABLE identity (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
     );
     INSERT INTO identity (name, value) VALUES ('installation', lower(hex(randomblob(16))));
     INSERT INTO identity (name, value) VALUES ('device', coalesce(
        (SELECT substr(key, 8) FROM sync_applied WHERE key LIKE 'device.%'
           AND length(key) BETWEEN 8 AND 71 AND substr(key, 8) NOT GLOB '*[^A-Za-z0-9_-]*'
           ORDER BY applied_unix DESC LIMIT 1),
        'cairn-' || lower(hex(randomblob(8)))));
     ALTER TABLE sync_applied ADD COLUMN expires_unix INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sync_applied ADD COLUMN complete INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE sync_applied ADD COLUMN value_sha256 TEXT NOT NULL DEFAULT '';
     CREATE TABLE fleet_delegation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        serial INTEGER NOT NULL,
        signed BLOB NOT NULL
     );",
    // 9: each `[[schedule]]`'s last due time and run, so a run missed while cairnd was stopped
    // is known at the next start.
    "CREATE TABLE schedule_state (
        app TEXT NOT NULL,
        name TEXT NOT NULL,
        last_due_ms INTEGER NOT NULL,
        last_run TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (app, name)
     );",
    // 10: the event history (`store/events.rs`), bounded by row count.
    "CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        generation INTEGER NOT NULL,
        unix_millis INTEGER NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL
     );
     CREATE INDEX events_time ON events (unix_millis);",
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the database is at schema version {found}, newer than this cairnd knows ({known}); \
         run a cairnd at least as new as the one that last wrote it"
    )]
    Newer { found: usize, known: usize },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// How many migrations the file has had; an error if it is newer than this cairnd. Reads
/// only, so that a file from a newer cairn is refused before anything writes to it.
pub fn applied(connection: &Connection) -> Result<usize, MigrationError> {
    let applied: usize =
        connection.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    if applied > MIGRATIONS.len() {
        return Err(MigrationError::Newer {
            found: applied,
            known: MIGRATIONS.len(),
        });
    }
    Ok(applied)
}

pub fn run(connection: &mut Connection) -> Result<(), MigrationError> {
    let applied = applied(connection)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_refuse_a_newer_schema() {
        let mut connection = Connection::open_in_memory().unwrap();
        run(&mut connection).unwrap();
        run(&mut connection).unwrap();
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        connection.pragma_update(None, "user_version", 999).unwrap();
        let err = run(&mut connection).unwrap_err();
        assert!(
            matches!(err, MigrationError::Newer { found: 999, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("newer than this cairnd knows"),
            "{err}"
        );
    }

    fn identity(connection: &Connection) -> (String, String) {
        let value = |name: &str| {
            connection
                .query_row("SELECT value FROM identity WHERE name = ?1", [name], |r| {
                    r.get::<_, String>(0)
                })
                .unwrap()
        };
        (value("installation"), value("device"))
    }

    #[test]
    fn every_store_gets_its_own_identity_and_an_upgraded_one_keeps_its_device_id() {
        let mut first = Connection::open_in_memory().unwrap();
        let mut second = Connection::open_in_memory().unwrap();
        run(&mut first).unwrap();
        run(&mut second).unwrap();
        let (installation, device) = identity(&first);
        assert_eq!(installation.len(), 32, "{installation}");
        assert!(installation.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(
            device.starts_with("cairn-") && device.len() == 22,
            "{device}"
        );
        assert!(cairn_core::fleet::check_name("device id", &device).is_ok());
        assert_ne!(identity(&first), identity(&second));
        assert_ne!(identity(&first).0, identity(&second).0);
        assert_ne!(identity(&first).1, identity(&second).1);

        // A store from before schema 8 whose device had applied its own document keeps the
        // id that document was published for.
        let mut old = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..7] {
            old.execute_batch(sql).unwrap();
        }
        old.pragma_update(None, "user_version", 7).unwrap();
        old.execute(
            "INSERT INTO sync_applied (key, version, applied_unix, apps) VALUES ('group.north', 2, 5, '[]'), ('device.pump-7', 3, 6, '[]')",
            [],
        )
        .unwrap();
        run(&mut old).unwrap();
        assert_eq!(identity(&old).1, "pump-7");

        // A host name with dots cannot be a subject token: a random id instead.
        let mut dotted = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..7] {
            dotted.execute_batch(sql).unwrap();
        }
        dotted.pragma_update(None, "user_version", 7).unwrap();
        dotted
            .execute(
                "INSERT INTO sync_applied (key, version, applied_unix, apps) VALUES ('device.pump.plant', 3, 6, '[]')",
                [],
            )
            .unwrap();
        run(&mut dotted).unwrap();
        assert!(identity(&dotted).1.starts_with("cairn-"));
    }
}
