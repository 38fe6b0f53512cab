//! The one-node [`StateStore`]: SQLite (bundled), WAL, under
//! `$KILN_HOME/state.db`.

use std::path::Path;
use std::sync::Mutex;

use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::ledger;

use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release};
use kiln_core::rollout::SavedRollout;
use kiln_core::secret::{Sealed, SecretValue};
use kiln_core::spec::ServiceName;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{Event, InstanceRecord, NewEvent, Result, ServiceRecord, StateError, StateStore, now};

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}

/// SQLite in WAL mode under `$KILN_HOME/state.db`. Calls are short and
/// serialized by a mutex; the agent's write rate (a few per instance
/// lifecycle) is far below what that allows. Every write is an IMMEDIATE
/// transaction: another process (the CLI recording a bake) may write too,
/// and an event is chained after the ledger's head as it stands under the
/// write lock.
pub struct SqliteState {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS services (
    name     TEXT PRIMARY KEY,
    settings TEXT NOT NULL,   -- JSON ServiceSettings
    target   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    service  TEXT NOT NULL,
    revision INTEGER NOT NULL,
    config   TEXT NOT NULL,   -- JSON ReleaseConfig
    hash     TEXT NOT NULL,
    created  TEXT NOT NULL,
    cause    TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    reason   TEXT,
    PRIMARY KEY (service, revision)
);
CREATE TABLE IF NOT EXISTS instances (
    id          TEXT PRIMARY KEY,
    service     TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    slot        INTEGER NOT NULL,
    pid         INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    port        INTEGER NOT NULL
);
-- Append-only. `seq` orders every state change; the ledger table holds a
-- hash of (previous hash, this row) for each.
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    time     TEXT NOT NULL,
    kind     TEXT NOT NULL,
    service  TEXT,
    revision INTEGER,
    instance TEXT,
    detail   TEXT NOT NULL,
    actor    TEXT              -- uid:N or agent; NULL before actors were kept
);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, seq);
-- Secret values by their sealed digest (the releases hold only digests),
-- and the key they are sealed with: the reason this file is owner-only.
CREATE TABLE IF NOT EXISTS secrets (
    sealed TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
-- API tokens: their SHA-256, never the token.
CREATE TABLE IF NOT EXISTS tokens (
    name    TEXT PRIMARY KEY,
    record  TEXT NOT NULL     -- JSON TokenRecord
);
CREATE TABLE IF NOT EXISTS node (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- The ledger: each event's place in the hash chain (kiln_core::ledger),
-- and the node's signed checkpoints of its head.
CREATE TABLE IF NOT EXISTS ledger (
    seq  INTEGER PRIMARY KEY,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq       INTEGER PRIMARY KEY,
    head      TEXT NOT NULL,
    time      TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS ledger_append_only_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_append_only_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"#;

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn insert_event(conn: &Connection, e: &NewEvent) -> Result<u64> {
    let (time, detail) = (now(), json(&e.change.detail()));
    conn.execute(
        "INSERT INTO events (time, kind, service, revision, instance, detail, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            time,
            e.change.kind(),
            e.service.as_ref().map(|s| s.as_str().to_owned()),
            e.revision.map(|r| r as i64),
            e.instance,
            detail,
            e.actor.to_string()
        ],
    )?;
    let seq = conn.last_insert_rowid() as u64;
    // Chained in the same transaction as the event: both or neither.
    let prev = last_hash(conn)?;
    let entry = super::ledger_entry(seq, time, e, detail).chained(&prev);
    insert_ledger(conn, &entry)?;
    Ok(seq)
}

fn last_hash(conn: &Connection) -> Result<String> {
    Ok(conn
        .query_row(
            "SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or_else(|| ledger::GENESIS.to_owned()))
}

fn insert_ledger(conn: &Connection, e: &ledger::Entry) -> Result<()> {
    conn.execute(
        "INSERT INTO ledger (seq, prev, hash) VALUES (?1, ?2, ?3)",
        params![e.seq as i64, e.prev, e.hash],
    )?;
    Ok(())
}

type LedgerRow = (
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// Entries after `after`, each event with its chain columns (empty when
/// a ledger row is missing: verification names it).
fn read_ledger(conn: &Connection, after: u64) -> Result<Vec<ledger::Entry>> {
    let mut stmt = conn.prepare(
        "SELECT e.seq, e.time, e.actor, e.service, e.revision, e.instance, e.kind, e.detail, l.prev, l.hash \
         FROM events e LEFT JOIN ledger l ON l.seq = e.seq WHERE e.seq > ?1 ORDER BY e.seq",
    )?;
    let rows = stmt.query_map([after.min(i64::MAX as u64) as i64], |r| {
        Ok::<LedgerRow, _>((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, time, actor, service, revision, instance, kind, detail, prev, hash) = row?;
        out.push(ledger::Entry {
            seq: seq as u64,
            time,
            actor,
            service,
            revision: revision.map(|r| r as u64),
            instance,
            kind,
            detail,
            prev: prev.unwrap_or_default(),
            hash: hash.unwrap_or_default(),
        });
    }
    Ok(out)
}

impl SqliteState {
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |source: rusqlite::Error| StateError::Open {
            path: path.display().to_string(),
            source: Box::new(source),
        };
        // Owner-only: it holds every env and secret value. SQLite gives the WAL
        // and shared-memory files the database's mode when it makes them;
        // ones made before the database was private are made so too.
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let private = std::fs::Permissions::from_mode(0o600);
            let io_err = |source: std::io::Error| StateError::Private {
                path: path.display().to_string(),
                source,
            };
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err)?;
            f.set_permissions(private.clone()).map_err(io_err)?;
            for suffix in ["-wal", "-shm"] {
                let mut side = path.as_os_str().to_owned();
                side.push(suffix);
                match std::fs::set_permissions(&side, private.clone()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
                    _ => {}
                }
            }
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        // A database made before events named their actor, or before
        // rollouts were kept, gains the column (earlier rows read as actor
        // unknown; services as having no saved rollout: idle).
        for (table, column) in [("events", "actor"), ("services", "rollout")] {
            let has = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))
                .and_then(|mut q| q.exists([]))
                .map_err(open_err)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))
                    .map_err(open_err)?;
            }
        }
        let state = Self {
            conn: Mutex::new(conn),
        };
        state.chain_unchained()?;
        Ok(state)
    }

    /// Events recorded before the ledger existed join the chain, in order,
    /// once (their hashes say when they were chained, not that they were
    /// never changed before).
    fn chain_unchained(&self) -> Result<()> {
        // Events and their ledger rows are written together, so only a
        // database older than the ledger has events past its last row: two
        // lookups by primary key, no write lock, at every open.
        let max = |conn: &Connection, table: &str| -> Result<i64> {
            Ok(conn.query_row(
                &format!("SELECT COALESCE(MAX(seq), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )?)
        };
        let mut conn = self.conn();
        if max(&conn, "events")? == max(&conn, "ledger")? {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let chained = max(&tx, "ledger")?;
        let mut prev = last_hash(&tx)?;
        for e in read_ledger(&tx, chained as u64)? {
            let e = e.chained(&prev);
            insert_ledger(&tx, &e)?;
            prev = e.hash;
        }
        tx.commit()?;
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (every change is a transaction), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StateError::Decode { what, source })
}

fn outcome_str(o: Outcome) -> String {
    o.to_string()
}

type ReleaseRow = (
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
);

fn release_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}
fn release_decode(r: ReleaseRow) -> Result<Release> {
    let (service, revision, config, hash, created, cause, outcome, reason) = r;
    Ok(Release {
        service: decode("service name", &json(&service))?,
        revision: revision as u64,
        config: decode("release config", &config)?,
        hash: decode("release hash", &json(&hash))?,
        created,
        cause,
        outcome: decode("release outcome", &json(&outcome))?,
        reason,
    })
}

const RELEASE_COLUMNS: &str = "service, revision, config, hash, created, cause, outcome, reason";

impl StateStore for SqliteState {
    fn services(&self) -> Result<Vec<ServiceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, settings, target FROM services ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, settings, target) = row?;
            out.push(ServiceRecord {
                name: decode("service name", &json(&name))?,
                settings: decode("service settings", &settings)?,
                target: target as u64,
            });
        }
        Ok(out)
    }

    fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT settings, target FROM services WHERE name = ?1",
                [name.as_str()],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        row.map(|(settings, target)| {
            Ok(ServiceRecord {
                name: name.clone(),
                settings: decode("service settings", &settings)?,
                target: target as u64,
            })
        })
        .transpose()
    }

    fn releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = ?1 ORDER BY revision"
        ))?;
        let rows = stmt.query_map([service.as_str()], release_from_row)?;
        rows.map(|r| release_decode(r?)).collect()
    }

    fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>> {
        let conn = self.conn();
        let row: Option<Option<String>> = conn
            .query_row(
                "SELECT rollout FROM services WHERE name = ?1",
                [service.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        row.flatten()
            .map(|json| decode("saved rollout", &json))
            .transpose()
    }

    fn set_rollout(&self, service: &ServiceName, rollout: &SavedRollout) -> Result<()> {
        let json = serde_json::to_string(rollout).map_err(|source| StateError::Decode {
            what: "saved rollout",
            source,
        })?;
        self.conn().execute(
            "UPDATE services SET rollout = ?2 WHERE name = ?1",
            params![service.as_str(), json],
        )?;
        Ok(())
    }

    fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = ?1 AND (
                 outcome IN ('pending', 'active')
                 OR revision = (SELECT target FROM services WHERE name = ?1)
                 OR revision = (SELECT MAX(revision) FROM releases WHERE service = ?1)
             ) ORDER BY revision"
        ))?;
        let rows = stmt.query_map([service.as_str()], release_from_row)?;
        rows.map(|r| release_decode(r?)).collect()
    }

    fn all_releases(&self) -> Result<Vec<Release>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases ORDER BY service, revision"
        ))?;
        let rows = stmt.query_map([], release_from_row)?;
        rows.map(|r| release_decode(r?)).collect()
    }

    fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!(
                    "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = ?1 AND revision = ?2"
                ),
                params![service.as_str(), revision as i64],
                release_from_row,
            )
            .optional()?;
        row.map(release_decode).transpose()
    }

    fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        apply_in(&tx, service, release, events)?;
        tx.commit()?;
        Ok(())
    }

    fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some((revision, reason)) = abandoned {
            set_outcome_in(&tx, &service.name, revision, Outcome::Failed, Some(reason))?;
        }
        apply_in(&tx, service, Some(release), events)?;
        tx.commit()?;
        Ok(())
    }

    fn set_outcome(
        &self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
        event: &NewEvent,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        set_outcome_in(&tx, service, revision, outcome, reason)?;
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    fn fail_release(
        &self,
        service: &ServiceName,
        revision: u64,
        reason: &str,
        return_to: Option<u64>,
        events: &[NewEvent],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        set_outcome_in(&tx, service, revision, Outcome::Failed, Some(reason))?;
        if let Some(previous) = return_to {
            tx.execute(
                "UPDATE services SET target = ?2 WHERE name = ?1",
                params![service.as_str(), previous as i64],
            )?;
            // Superseded when the failed release went live (a failure in
            // its watch): it is what runs again.
            set_outcome_in(&tx, service, previous, Outcome::Active, None)?;
        }
        for e in events {
            insert_event(&tx, e)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn remove_service(&self, name: &ServiceName, event: &NewEvent) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM services WHERE name = ?1", [name.as_str()])?;
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    fn put_instance(&self, i: &InstanceRecord, event: &NewEvent) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR REPLACE INTO instances (id, service, revision, slot, pid, start_ticks, port) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![i.id, i.service.as_str(), i.revision as i64, i.slot, i.pid, i.start_ticks as i64, i.port],
        )?;
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    fn remove_instance(&self, id: &str, event: &NewEvent) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(())
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, service, revision, slot, pid, start_ticks, port FROM instances ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, u16>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, service, revision, slot, pid, start_ticks, port) = row?;
            out.push(InstanceRecord {
                id,
                service: decode("service name", &json(&service))?,
                revision: revision as u64,
                slot,
                pid,
                start_ticks: start_ticks as u64,
                port,
            });
        }
        Ok(out)
    }

    fn append_event(&self, event: &NewEvent) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = insert_event(&tx, event)?;
        tx.commit()?;
        Ok(seq)
    }

    fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO node (name, value) VALUES ('secret-key', ?1)",
            [&fresh[..]],
        )?;
        let key: Vec<u8> = tx.query_row(
            "SELECT value FROM node WHERE name = 'secret-key'",
            [],
            |r| r.get(0),
        )?;
        tx.commit()?;
        <[u8; 32]>::try_from(key.as_slice()).map_err(|_| StateError::SecretKey(key.len()))
    }

    fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (sealed, value) in secrets {
            tx.execute(
                "INSERT OR IGNORE INTO secrets (sealed, value) VALUES (?1, ?2)",
                params![sealed.as_str(), value.expose()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>> {
        let conn = self.conn();
        let v: Option<String> = conn
            .query_row(
                "SELECT value FROM secrets WHERE sealed = ?1",
                [sealed.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.map(SecretValue::new))
    }

    fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = tx.execute(
            "INSERT OR IGNORE INTO tokens (name, record) VALUES (?1, ?2)",
            params![record.name.as_str(), json(record)],
        )?;
        if added == 0 {
            return Ok(false);
        }
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(true)
    }

    fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>> {
        let conn = self.conn();
        let v: Option<String> = conn
            .query_row(
                "SELECT record FROM tokens WHERE name = ?1",
                [name.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        v.map(|v| decode("token record", &v)).transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, record FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(1))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(decode("token record", &row?)?);
        }
        Ok(out)
    }

    fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx.execute("DELETE FROM tokens WHERE name = ?1", [name.as_str()])? == 0 {
            return Ok(false);
        }
        insert_event(&tx, event)?;
        tx.commit()?;
        Ok(true)
    }

    fn ledger(&self, after: u64) -> Result<Vec<ledger::Entry>> {
        read_ledger(&self.conn(), after)
    }

    fn checkpoints(&self) -> Result<Vec<ledger::Checkpoint>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT seq, head, time, signature FROM checkpoints ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok(ledger::Checkpoint {
                seq: r.get::<_, i64>(0)? as u64,
                head: r.get(1)?,
                time: r.get(2)?,
                signature: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn put_checkpoint(&self, cp: &ledger::Checkpoint) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO checkpoints (seq, head, time, signature) VALUES (?1, ?2, ?3, ?4)",
            params![cp.seq as i64, cp.head, cp.time, cp.signature],
        )?;
        Ok(())
    }

    fn last_checkpoint(&self) -> Result<Option<u64>> {
        Ok(self
            .conn()
            .query_row("SELECT MAX(seq) FROM checkpoints", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .map(|s| s as u64))
    }

    fn head(&self) -> Result<Option<(u64, String)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    fn events(&self, after: u64) -> Result<Vec<Event>> {
        // Saturating: `after as i64` wrapped a large `after` to -1 (everything).
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.query_events("seq > ?1", &[&after])
    }

    fn events_of(&self, kinds: &[&str]) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for kind in kinds {
            out.extend(self.query_events("kind = ?1", &[kind])?);
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }
}

impl SqliteState {
    /// The events `filter` (an SQL condition on `events`) selects, in order.
    fn query_events(&self, filter: &str, params: &[&dyn rusqlite::ToSql]) -> Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT seq, time, kind, service, revision, instance, detail, actor FROM events WHERE {filter} ORDER BY seq"))?;
        let rows = stmt.query_map(params, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, time, kind, service, revision, instance, detail, actor) = row?;
            let actor = actor
                .map(|a| a.parse::<Actor>())
                .transpose()
                .map_err(|e| StateError::Backend(e.into()))?;
            let detail = decode("event detail", &detail)?;
            out.push(Event {
                seq: seq as u64,
                time,
                actor,
                service,
                revision: revision.map(|r| r as u64),
                instance,
                change: Change::from_parts(&kind, detail).map_err(|source| StateError::Decode {
                    what: "event",
                    source,
                })?,
            });
        }
        Ok(out)
    }
}

/// A release's outcome (and its reason, when given), inside the caller's
/// transaction.
fn set_outcome_in(
    tx: &rusqlite::Transaction<'_>,
    service: &ServiceName,
    revision: u64,
    outcome: Outcome,
    reason: Option<&str>,
) -> Result<()> {
    tx.execute(
        "UPDATE releases SET outcome = ?3, reason = COALESCE(?4, reason) WHERE service = ?1 AND revision = ?2",
        params![service.as_str(), revision as i64, outcome_str(outcome), reason],
    )?;
    Ok(())
}

/// The writes of an apply, inside the caller's transaction.
fn apply_in(
    tx: &rusqlite::Transaction<'_>,
    service: &ServiceRecord,
    release: Option<&Release>,
    events: &[NewEvent],
) -> Result<()> {
    if let Some(r) = release {
        tx.execute(
            &format!(
                "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                r.service.as_str(),
                r.revision as i64,
                json(&r.config),
                r.hash.to_string(),
                r.created,
                r.cause,
                outcome_str(r.outcome),
                r.reason
            ],
        )
        .map_err(|e| match e.sqlite_error_code() {
            // The (service, revision) key is the only one this can break.
            Some(rusqlite::ErrorCode::ConstraintViolation) => StateError::ReleaseExists {
                service: r.service.clone(),
                revision: r.revision,
            },
            _ => e.into(),
        })?;
    }
    tx.execute(
            "INSERT INTO services (name, settings, target) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET settings = excluded.settings, target = excluded.target",
            params![service.name.as_str(), json(&service.settings), service.target as i64],
        )?;
    for e in events {
        insert_event(tx, e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::contract::{event, release, service, web};

    /// A new state database in a temporary directory.
    fn fresh() -> (tempfile::TempDir, SqliteState) {
        let dir = tempfile::tempdir().unwrap();
        let state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        (dir, state)
    }

    mod contract {
        crate::state::contract::contract_tests!(super::fresh);
    }

    #[test]
    fn everything_survives_reopening() {
        let (dir, state) = fresh();
        let name = web();
        let r1 = release(1);
        state
            .record_apply(&service(&name, 2, 1), Some(&r1), &[event("x")])
            .unwrap();
        drop(state);
        let state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(state.releases(&name).unwrap(), [r1]);
        assert_eq!(state.service(&name).unwrap().unwrap().target, 1);
        assert_eq!(state.events(0).unwrap().len(), 1);
    }

    /// A database from before the ledger (events, no ledger rows) has its
    /// events chained, in order, when it is opened; the ledger is
    /// append-only like the events.
    #[test]
    fn events_recorded_before_the_ledger_are_chained_on_open() {
        let (dir, state) = fresh();
        for r in ["a", "b", "c"] {
            state.append_event(&event(r)).unwrap();
        }
        let before = state.ledger(0).unwrap();
        {
            let conn = state.conn();
            assert!(conn.execute("DELETE FROM ledger", []).is_err());
            conn.execute_batch("DROP TRIGGER ledger_append_only_delete; DELETE FROM ledger;")
                .unwrap();
        }
        assert_eq!(state.head().unwrap(), None);
        drop(state);
        let state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let after = state.ledger(0).unwrap();
        assert_eq!(after, before, "the same chain as when written");
        kiln_core::ledger::verify(&after, &[], &[0; 32]).unwrap();
    }

    #[test]
    fn events_are_append_only() {
        let (_dir, state) = fresh();
        state.append_event(&event("x")).unwrap();
        let conn = state.conn();
        assert!(conn.execute("UPDATE events SET kind = 'y'", []).is_err());
        assert!(conn.execute("DELETE FROM events", []).is_err());
    }
}
