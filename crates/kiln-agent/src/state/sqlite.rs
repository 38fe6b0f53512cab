//! The one-node [`ClusterState`] and [`NodeState`]: SQLite (bundled), WAL, under
//! `$KILN_HOME/state.db`.

use std::path::Path;
use std::sync::Mutex;

use kiln_core::auth::{TokenName, TokenRecord};
use kiln_core::ledger;

use kiln_core::event::{Actor, Change};
use kiln_core::release::{Outcome, Release};
use kiln_core::rollout::assign::{Assignment, Observation};
use kiln_core::rollout::{Routing, SavedRollout};
use kiln_core::secret::{Sealed, SecretValue};
use kiln_core::spec::ServiceName;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{
    Assigned, ClusterState, Event, Fence, Guard, InstanceRecord, NewEvent, NodeCounters, NodeState,
    Result, ServiceRecord, StateError, now,
};

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}

/// SQLite in WAL mode under `$KILN_HOME/state.db`, both stores of one
/// node in one file. Calls are short (microseconds: they run inline on the
/// async task that awaits them) and serialized by a mutex; the agent's
/// write rate (a few per instance lifecycle) is far below what that
/// allows. Every write is an IMMEDIATE transaction: another process (the
/// CLI recording a bake while no agent runs, `kiln gc`) may use the file
/// too, and an event is chained after the ledger's head as it stands
/// under the write lock.
pub struct SqliteState {
    conn: Mutex<Connection>,
    /// The last event's sequence number this process wrote or saw, for
    /// watchers (another process's writes are found by polling).
    head: super::Head,
}

/// How often a watcher looks for events another process wrote (this
/// process's own writes wake it at once).
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(1);

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
-- The leader's assignments of each service (one JSON list), and what each
-- node last observed of its instances.
CREATE TABLE IF NOT EXISTS assignments (
    service TEXT PRIMARY KEY,
    list    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    service TEXT NOT NULL,
    node    TEXT NOT NULL,
    list    TEXT NOT NULL,
    PRIMARY KEY (service, node)
);
CREATE TABLE IF NOT EXISTS observations (
    service TEXT NOT NULL,
    node    TEXT NOT NULL,
    list    TEXT NOT NULL,
    PRIMARY KEY (service, node)
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
-- The public keys whose checkpoints the ledger accepts (one per node that
-- ever signed; on one node, its own).
CREATE TABLE IF NOT EXISTS drained (
    node TEXT PRIMARY KEY
);
-- Paused services (`kiln pause`) and how long their requests wait.
CREATE TABLE IF NOT EXISTS paused (
    service    TEXT PRIMARY KEY,
    timeout_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_keys (
    key  TEXT PRIMARY KEY,
    node TEXT NOT NULL
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
        // Services made before versions were kept read as version 0.
        for (table, column, kind) in [
            ("events", "actor", "TEXT"),
            ("services", "rollout", "TEXT"),
            ("services", "version", "INTEGER NOT NULL DEFAULT 0"),
            ("assignments", "routing", "TEXT"),
        ] {
            let has = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
                ))
                .and_then(|mut q| q.exists([]))
                .map_err(open_err)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                    .map_err(open_err)?;
            }
        }
        let state = Self {
            conn: Mutex::new(conn),
            head: super::Head::default(),
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

    /// One write transaction (IMMEDIATE: the write lock is taken at once,
    /// so what it reads stays true until it commits); watchers hear of the
    /// events it appended once it committed.
    fn write<T>(&self, change: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done = change(&tx)?;
        let head = head_in(&tx)?;
        tx.commit()?;
        drop(conn);
        self.head.moved(head);
        Ok(done)
    }
}

/// The last event's sequence number (0: none).
fn head_in(conn: &Connection) -> Result<u64> {
    Ok(
        conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
            r.get::<_, i64>(0)
        })? as u64,
    )
}

/// The guard's verdict on a change of `service`, inside the transaction
/// that makes it.
fn check_in(conn: &Connection, service: &ServiceName, guard: Guard) -> Result<()> {
    if guard == Guard::NONE {
        return Ok(());
    }
    let version: i64 = conn
        .query_row(
            "SELECT version FROM services WHERE name = ?1",
            [service.as_str()],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    guard.check(service, version as u64, Fence(fence_in(conn)?))
}

/// The newest fence handed out (0: none).
fn fence_in(conn: &Connection) -> Result<u64> {
    let value: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM node WHERE name = 'fence'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(value
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// The service's record was changed by the events just written: its
/// version is the last one's sequence number.
fn bump_in(conn: &Connection, service: &ServiceName) -> Result<()> {
    conn.execute(
        "UPDATE services SET version = (SELECT COALESCE(MAX(seq), 0) FROM events) WHERE name = ?1",
        [service.as_str()],
    )?;
    Ok(())
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

#[async_trait::async_trait]
impl ClusterState for SqliteState {
    async fn services(&self) -> Result<Vec<ServiceRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, settings, target, version FROM services ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, settings, target, version) = row?;
            out.push(ServiceRecord {
                name: decode("service name", &json(&name))?,
                settings: decode("service settings", &settings)?,
                target: target as u64,
                version: version as u64,
            });
        }
        Ok(out)
    }

    async fn service(&self, name: &ServiceName) -> Result<Option<ServiceRecord>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT settings, target, version FROM services WHERE name = ?1",
                [name.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(settings, target, version)| {
            Ok(ServiceRecord {
                name: name.clone(),
                settings: decode("service settings", &settings)?,
                target: target as u64,
                version: version as u64,
            })
        })
        .transpose()
    }

    async fn releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = ?1 ORDER BY revision"
        ))?;
        let rows = stmt.query_map([service.as_str()], release_from_row)?;
        rows.map(|r| release_decode(r?)).collect()
    }

    async fn rollout(&self, service: &ServiceName) -> Result<Option<SavedRollout>> {
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

    async fn set_rollout(
        &self,
        service: &ServiceName,
        rollout: &SavedRollout,
        guard: Guard,
    ) -> Result<()> {
        let json = serde_json::to_string(rollout).map_err(|source| StateError::Decode {
            what: "saved rollout",
            source,
        })?;
        self.write(|tx| {
            check_in(tx, service, guard)?;
            tx.execute(
                "UPDATE services SET rollout = ?2 WHERE name = ?1",
                params![service.as_str(), json],
            )?;
            Ok(())
        })
    }

    async fn current_releases(&self, service: &ServiceName) -> Result<Vec<Release>> {
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

    async fn all_releases(&self) -> Result<Vec<Release>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases ORDER BY service, revision"
        ))?;
        let rows = stmt.query_map([], release_from_row)?;
        rows.map(|r| release_decode(r?)).collect()
    }

    async fn release(&self, service: &ServiceName, revision: u64) -> Result<Option<Release>> {
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

    async fn record_apply(
        &self,
        service: &ServiceRecord,
        release: Option<&Release>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        self.write(|tx| {
            check_in(tx, &service.name, guard)?;
            apply_in(tx, service, release, events)
        })
    }

    async fn record_rollback(
        &self,
        service: &ServiceRecord,
        release: &Release,
        abandoned: Option<(u64, &str)>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        self.write(|tx| {
            check_in(tx, &service.name, guard)?;
            if let Some((revision, reason)) = abandoned {
                set_outcome_in(tx, &service.name, revision, Outcome::Failed, Some(reason))?;
            }
            apply_in(tx, service, Some(release), events)
        })
    }

    async fn set_outcome(
        &self,
        service: &ServiceName,
        revision: u64,
        outcome: Outcome,
        reason: Option<&str>,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()> {
        self.write(|tx| {
            check_in(tx, service, guard)?;
            set_outcome_in(tx, service, revision, outcome, reason)?;
            insert_event(tx, event)?;
            Ok(())
        })
    }

    async fn fail_release(
        &self,
        service: &ServiceName,
        revision: u64,
        reason: &str,
        return_to: Option<u64>,
        events: &[NewEvent],
        guard: Guard,
    ) -> Result<()> {
        self.write(|tx| {
            check_in(tx, service, guard)?;
            set_outcome_in(tx, service, revision, Outcome::Failed, Some(reason))?;
            if let Some(previous) = return_to {
                tx.execute(
                    "UPDATE services SET target = ?2 WHERE name = ?1",
                    params![service.as_str(), previous as i64],
                )?;
                // Superseded when the failed release went live (a failure in
                // its watch): it is what runs again.
                set_outcome_in(tx, service, previous, Outcome::Active, None)?;
            }
            for e in events {
                insert_event(tx, e)?;
            }
            if return_to.is_some() {
                bump_in(tx, service)?;
            }
            Ok(())
        })
    }

    async fn remove_service(
        &self,
        name: &ServiceName,
        event: &NewEvent,
        guard: Guard,
    ) -> Result<()> {
        self.write(|tx| {
            check_in(tx, name, guard)?;
            tx.execute("DELETE FROM services WHERE name = ?1", [name.as_str()])?;
            tx.execute(
                "DELETE FROM assignments WHERE service = ?1",
                [name.as_str()],
            )?;
            tx.execute(
                "DELETE FROM observations WHERE service = ?1",
                [name.as_str()],
            )?;
            tx.execute("DELETE FROM counters WHERE service = ?1", [name.as_str()])?;
            insert_event(tx, event)?;
            Ok(())
        })
    }

    async fn assignments(&self, service: &ServiceName) -> Result<Option<Assigned>> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT list, routing FROM assignments WHERE service = ?1",
                [service.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(list, routing)| {
            Ok(Assigned {
                list: decode("assignments", &list)?,
                routing: routing.map(|r| decode("routing", &r)).transpose()?,
            })
        })
        .transpose()
    }

    async fn assign(
        &self,
        service: &ServiceName,
        assignments: &[Assignment],
        routing: Option<Routing>,
        rollout: Option<&SavedRollout>,
        guard: Guard,
    ) -> Result<()> {
        let routing = routing.as_ref().map(json);
        let rollout = rollout
            .map(serde_json::to_string)
            .transpose()
            .map_err(|source| StateError::Decode {
                what: "saved rollout",
                source,
            })?;
        self.write(|tx| {
            check_in(tx, service, guard)?;
            // Only for a service that exists (a removed one keeps none).
            tx.execute(
                "INSERT INTO assignments (service, list, routing)
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM services WHERE name = ?1)
                 ON CONFLICT(service) DO UPDATE SET list = excluded.list,
                    routing = coalesce(excluded.routing, routing)",
                params![service.as_str(), json(&assignments), routing],
            )?;
            if let Some(r) = &rollout {
                tx.execute(
                    "UPDATE services SET rollout = ?2 WHERE name = ?1",
                    params![service.as_str(), r],
                )?;
            }
            Ok(())
        })
    }

    async fn observations(&self, service: &ServiceName) -> Result<Vec<Observation>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT list FROM observations WHERE service = ?1 ORDER BY node")?;
        let rows = stmt.query_map([service.as_str()], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(decode::<Vec<Observation>>("observations", &row?)?);
        }
        Ok(out)
    }

    async fn publish(
        &self,
        service: &ServiceName,
        node: &str,
        observations: &[Observation],
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO observations (service, node, list)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM services WHERE name = ?1)
             ON CONFLICT(service, node) DO UPDATE SET list = excluded.list",
            params![service.as_str(), node, json(&observations)],
        )?;
        Ok(())
    }

    async fn publish_counters(
        &self,
        service: &ServiceName,
        node: &str,
        counters: &NodeCounters,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO counters (service, node, list)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM services WHERE name = ?1)
             ON CONFLICT(service, node) DO UPDATE SET list = excluded.list",
            params![service.as_str(), node, json(counters)],
        )?;
        Ok(())
    }

    async fn counters(
        &self,
        service: &ServiceName,
    ) -> Result<std::collections::BTreeMap<String, NodeCounters>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node, list FROM counters WHERE service = ?1")?;
        let rows = stmt.query_map([service.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (node, list) = row?;
            out.insert(node, decode("counters", &list)?);
        }
        Ok(out)
    }

    async fn lead(&self) -> Result<Fence> {
        self.write(|tx| {
            let next = fence_in(tx)? + 1;
            tx.execute(
                "INSERT OR REPLACE INTO node (name, value) VALUES ('fence', ?1)",
                [&next.to_be_bytes()[..]],
            )?;
            Ok(Fence(next))
        })
    }

    async fn watch(&self, after: u64) -> Result<Vec<Event>> {
        self.head.watch(self, after, Some(WATCH_POLL)).await
    }

    async fn append_event(&self, event: &NewEvent) -> Result<u64> {
        self.write(|tx| insert_event(tx, event))
    }

    async fn secret_key(&self, fresh: [u8; 32]) -> Result<[u8; 32]> {
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

    async fn put_secrets(&self, secrets: &[(Sealed, SecretValue)]) -> Result<()> {
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

    async fn secret(&self, sealed: &Sealed) -> Result<Option<SecretValue>> {
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

    async fn put_token(&self, record: &TokenRecord, event: &NewEvent) -> Result<bool> {
        self.write(|tx| {
            let added = tx.execute(
                "INSERT OR IGNORE INTO tokens (name, record) VALUES (?1, ?2)",
                params![record.name.as_str(), json(record)],
            )?;
            if added == 0 {
                return Ok(false);
            }
            insert_event(tx, event)?;
            Ok(true)
        })
    }

    async fn token(&self, name: &TokenName) -> Result<Option<TokenRecord>> {
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

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, record FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(1))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(decode("token record", &row?)?);
        }
        Ok(out)
    }

    async fn revoke_token(&self, name: &TokenName, event: &NewEvent) -> Result<bool> {
        self.write(|tx| {
            if tx.execute("DELETE FROM tokens WHERE name = ?1", [name.as_str()])? == 0 {
                return Ok(false);
            }
            insert_event(tx, event)?;
            Ok(true)
        })
    }

    async fn set_drained(&self, node: &str, drained: bool, event: &NewEvent) -> Result<bool> {
        self.write(|tx| {
            let changed = if drained {
                tx.execute("INSERT OR IGNORE INTO drained (node) VALUES (?1)", [node])?
            } else {
                tx.execute("DELETE FROM drained WHERE node = ?1", [node])?
            } > 0;
            if changed {
                insert_event(tx, event)?;
            }
            Ok(changed)
        })
    }

    async fn drained(&self) -> Result<std::collections::BTreeSet<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node FROM drained")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    async fn set_paused(
        &self,
        service: &ServiceName,
        timeout_ms: Option<u64>,
        event: &NewEvent,
    ) -> Result<bool> {
        self.write(|tx| {
            let changed = match timeout_ms {
                Some(t) => tx.execute(
                    "INSERT INTO paused (service, timeout_ms) VALUES (?1, ?2)
                     ON CONFLICT (service) DO UPDATE SET timeout_ms = ?2 WHERE timeout_ms != ?2",
                    params![service.as_str(), t as i64],
                )?,
                None => tx.execute("DELETE FROM paused WHERE service = ?1", [service.as_str()])?,
            } > 0;
            if changed {
                insert_event(tx, event)?;
            }
            Ok(changed)
        })
    }

    async fn paused(&self) -> Result<std::collections::BTreeMap<ServiceName, u64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT service, timeout_ms FROM paused")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (name, t) = row?;
            if let Ok(name) = ServiceName::try_from(name.as_str()) {
                out.insert(name, t.max(0) as u64);
            }
        }
        Ok(out)
    }

    async fn ledger(&self, after: u64) -> Result<Vec<ledger::Entry>> {
        read_ledger(&self.conn(), after)
    }

    async fn checkpoints(&self) -> Result<Vec<ledger::Checkpoint>> {
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

    async fn put_checkpoint(&self, cp: &ledger::Checkpoint) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO checkpoints (seq, head, time, signature) VALUES (?1, ?2, ?3, ?4)",
            params![cp.seq as i64, cp.head, cp.time, cp.signature],
        )?;
        Ok(())
    }

    async fn put_node_key(&self, node: &str, key: &str) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO node_keys (key, node) VALUES (?1, ?2)",
            params![key, node],
        )?;
        Ok(())
    }

    async fn node_keys(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT key, node FROM node_keys ORDER BY key")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    async fn last_checkpoint(&self) -> Result<Option<u64>> {
        Ok(self
            .conn()
            .query_row("SELECT MAX(seq) FROM checkpoints", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .map(|s| s as u64))
    }

    async fn head(&self) -> Result<Option<(u64, String)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    async fn events(&self, after: u64) -> Result<Vec<Event>> {
        // Saturating: `after as i64` wrapped a large `after` to -1 (everything).
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.query_events("seq > ?1", &[&after])
    }

    async fn events_of(&self, kinds: &[&str]) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for kind in kinds {
            out.extend(self.query_events("kind = ?1", &[kind])?);
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }
}

impl NodeState for SqliteState {
    fn put_instance(&self, i: &InstanceRecord) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO instances (id, service, revision, slot, pid, start_ticks, port) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![i.id, i.service.as_str(), i.revision as i64, i.slot, i.pid, i.start_ticks as i64, i.port],
        )?;
        Ok(())
    }

    fn remove_instance(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM instances WHERE id = ?1", [id])?;
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
    bump_in(tx, &service.name)
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
        async fn fresh() -> (tempfile::TempDir, super::SqliteState) {
            super::fresh()
        }
        crate::state::contract::contract_tests!(fresh);
    }

    #[tokio::test]
    async fn everything_survives_reopening() {
        let (dir, state) = fresh();
        let name = web();
        let r1 = release(1);
        state
            .record_apply(&service(&name, 2, 1), Some(&r1), &[event("x")], Guard::NONE)
            .await
            .unwrap();
        drop(state);
        let state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(state.releases(&name).await.unwrap(), [r1]);
        assert_eq!(state.service(&name).await.unwrap().unwrap().target, 1);
        assert_eq!(state.events(0).await.unwrap().len(), 1);
    }

    /// A database from before the ledger (events, no ledger rows) has its
    /// events chained, in order, when it is opened; the ledger is
    /// append-only like the events.
    #[tokio::test]
    async fn events_recorded_before_the_ledger_are_chained_on_open() {
        let (dir, state) = fresh();
        for r in ["a", "b", "c"] {
            state.append_event(&event(r)).await.unwrap();
        }
        let before = state.ledger(0).await.unwrap();
        {
            let conn = state.conn();
            assert!(conn.execute("DELETE FROM ledger", []).is_err());
            conn.execute_batch("DROP TRIGGER ledger_append_only_delete; DELETE FROM ledger;")
                .unwrap();
        }
        assert_eq!(state.head().await.unwrap(), None);
        drop(state);
        let state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let after = state.ledger(0).await.unwrap();
        assert_eq!(after, before, "the same chain as when written");
        kiln_core::ledger::verify(&after, &[], &[0; 32]).unwrap();
    }

    #[tokio::test]
    async fn events_are_append_only() {
        let (_dir, state) = fresh();
        state.append_event(&event("x")).await.unwrap();
        let conn = state.conn();
        assert!(conn.execute("UPDATE events SET kind = 'y'", []).is_err());
        assert!(conn.execute("DELETE FROM events", []).is_err());
    }
}
