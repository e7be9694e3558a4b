//! The results store: one SQLite file (WAL mode, `synchronous=FULL`).
//!
//! Tables: `runs` (one row per invocation of a study), `settings` (one row per finished setting,
//! keyed by the study's config hash and the [`SettingKey`], every metric of METHODS.md with its
//! bootstrap interval, NULL for "n/a") and `phases` (seconds per phase of each setting). A setting
//! is written in one transaction, so a process killed at any moment loses at most the setting in
//! flight and never leaves half of one; a plain `INSERT` refuses a duplicate key, and
//! [`Store::is_done`] lets a rerun skip what is finished.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params, params_from_iter, types::Value};

use super::setting::{Estimate, Metrics, Phases, SettingKey, SettingRecord};

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// What can go wrong with a store; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("results store {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open results store {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("{path} is not a mergeattack results store ({reason})")]
    NotAStore { path: PathBuf, reason: String },
    #[error("results store {path} has schema version {found}, this build reads version {SCHEMA_VERSION}")]
    Version { path: PathBuf, found: i64 },
    #[error(
        "results store {path}: the disk is full; setting {key} was not saved and the store is unchanged (free space, then rerun to resume)"
    )]
    Full { path: PathBuf, key: String },
    #[error("cannot write to results store {path} ({source}); setting {key} was not saved and the store is unchanged")]
    Write { path: PathBuf, key: String, source: rusqlite::Error },
    #[error("setting {key} is already in results store {path} (config {config_hash})")]
    Duplicate { path: PathBuf, key: String, config_hash: String },
    #[error("setting {key}: {name} is {value}, not a finite number; refusing to store it")]
    NonFinite { key: String, name: String, value: f64 },
    #[error("results store {path}: {source}")]
    Sql { path: PathBuf, source: rusqlite::Error },
    #[error("setting {key} of config {config_hash} has different results in {first} and {second}")]
    Conflict { key: String, config_hash: String, first: PathBuf, second: PathBuf },
}

/// Facts about one invocation of a study.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub config_hash: String,
    pub code_version: String,
    pub seed: u64,
    pub argv: Vec<String>,
}

/// A `runs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub info: RunInfo,
    pub started_unix: i64,
    pub finished_unix: Option<i64>,
}

/// A stored setting with the study it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSetting {
    pub config_hash: String,
    pub record: SettingRecord,
}

const KEY_COLUMNS: &[&str] = &["config_hash", "dataset", "method", "attack", "surrogate", "eps"];

/// The non-key columns of `settings`, in order.
fn value_columns() -> Vec<String> {
    let mut cols: Vec<String> = vec!["eps_value".into(), "n_images".into(), "needs_task_id".into()];
    for m in Metrics::NAMES {
        cols.push(m.to_string());
        cols.push(format!("{m}_lo"));
        cols.push(format!("{m}_hi"));
    }
    cols.push("grad_align_merged_skipped".into());
    cols.push("grad_align_reference_skipped".into());
    for p in Phases::NAMES {
        cols.push(format!("seconds_{p}"));
    }
    cols
}

fn schema() -> String {
    let mut s = String::from(
        "CREATE TABLE IF NOT EXISTS runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            config_hash TEXT NOT NULL,
            code_version TEXT NOT NULL,
            seed INTEGER NOT NULL,
            started_unix INTEGER NOT NULL,
            finished_unix INTEGER,
            argv TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS settings (
            config_hash TEXT NOT NULL, dataset TEXT NOT NULL, method TEXT NOT NULL, attack TEXT NOT NULL,
            surrogate TEXT NOT NULL, eps TEXT NOT NULL,
            run_id INTEGER REFERENCES runs(id),
            eps_value REAL NOT NULL, n_images INTEGER NOT NULL, needs_task_id INTEGER NOT NULL",
    );
    for m in Metrics::NAMES {
        s.push_str(&format!(",\n            {m} REAL, {m}_lo REAL, {m}_hi REAL"));
    }
    s.push_str(",\n            grad_align_merged_skipped INTEGER, grad_align_reference_skipped INTEGER");
    for p in Phases::NAMES {
        s.push_str(&format!(", seconds_{p} REAL NOT NULL"));
    }
    s.push_str(
        ",
            PRIMARY KEY (config_hash, dataset, method, attack, surrogate, eps)
        );
        CREATE TABLE IF NOT EXISTS phases (
            config_hash TEXT NOT NULL, dataset TEXT NOT NULL, method TEXT NOT NULL, attack TEXT NOT NULL,
            surrogate TEXT NOT NULL, eps TEXT NOT NULL, phase TEXT NOT NULL, seconds REAL NOT NULL,
            PRIMARY KEY (config_hash, dataset, method, attack, surrogate, eps, phase)
        );",
    );
    s
}

const SKIPPED_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS skipped (
    config_hash TEXT NOT NULL, dataset TEXT NOT NULL, method TEXT NOT NULL, attack TEXT NOT NULL,
    surrogate TEXT NOT NULL, eps TEXT NOT NULL, reason TEXT NOT NULL, run_id INTEGER,
    PRIMARY KEY (config_hash, dataset, method, attack, surrogate, eps)
);";

/// A setting the runner skipped, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SkippedSetting {
    pub config_hash: String,
    pub key: SettingKey,
    pub reason: String,
}

/// An open results store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    run_id: Option<i64>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn opt_f64(v: Option<f64>) -> Value {
    v.map(Value::Real).unwrap_or(Value::Null)
}

impl Store {
    /// Open (creating if needed) a store for writing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
        let store = Store { conn, path: path.to_path_buf(), run_id: None };
        store.check_is_store()?;
        let sql = |source| StoreError::Sql { path: path.to_path_buf(), source };
        store.conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(sql)?;
        let mode: String = store.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("results store {}: journal mode is {mode}, not WAL", path.display());
        }
        store.conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;").map_err(sql)?;
        let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        match version {
            0 => {
                let tx = store.conn.unchecked_transaction().map_err(sql)?;
                tx.execute_batch(&schema()).map_err(sql)?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};")).map_err(sql)?;
                tx.commit().map_err(sql)?;
            }
            SCHEMA_VERSION => {}
            found => return Err(StoreError::Version { path: path.to_path_buf(), found }),
        }
        // Settings the runner could not run (e.g. a merge method that cannot take a pool of this size), with the reason;
        // a later run that finishes one deletes its row. Added without a version bump: stores
        // written before it simply have no skipped settings.
        store.conn.execute_batch(SKIPPED_SCHEMA).map_err(sql)?;
        Ok(store)
    }

    /// Open an existing store for reading only.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing { path: path.to_path_buf() });
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
        let store = Store { conn, path: path.to_path_buf(), run_id: None };
        store.check_is_store()?;
        let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| store.sql(e))?;
        if version != SCHEMA_VERSION {
            if version == 0 {
                return Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                    reason: "it has no results tables".into(),
                });
            }
            return Err(StoreError::Version { path: path.to_path_buf(), found: version });
        }
        Ok(store)
    }

    /// The file behind this store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sql { path: self.path.clone(), source }
    }

    /// Refuse files that are not SQLite databases, or SQLite databases of something else.
    fn check_is_store(&self) -> Result<(), StoreError> {
        let not = |reason: String| StoreError::NotAStore { path: self.path.clone(), reason };
        let tables: Vec<String> = (|| {
            let mut st = self.conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
            st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()
        })()
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => not("the file is not an SQLite database".into()),
            _ => self.sql(e),
        })?;
        let ours = ["runs", "settings", "phases", "skipped"];
        let foreign: Vec<&String> =
            tables.iter().filter(|t| !ours.contains(&t.as_str()) && !t.starts_with("sqlite_")).collect();
        if !foreign.is_empty() {
            return Err(not(format!(
                "it holds other tables: {}",
                foreign.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    /// Record the start of a run; later inserts refer to it.
    pub fn begin_run(&mut self, info: &RunInfo) -> Result<i64, StoreError> {
        let argv = serde_json::to_string(&info.argv).expect("strings serialise");
        self.conn
            .execute(
                "INSERT INTO runs (config_hash, code_version, seed, started_unix, argv) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![info.config_hash, info.code_version, info.seed as i64, now_unix(), argv],
            )
            .map_err(|e| self.sql(e))?;
        let id = self.conn.last_insert_rowid();
        self.run_id = Some(id);
        Ok(id)
    }

    /// Record the end of the current run.
    pub fn finish_run(&mut self) -> Result<(), StoreError> {
        if let Some(id) = self.run_id.take() {
            self.conn
                .execute("UPDATE runs SET finished_unix = ?1 WHERE id = ?2", params![now_unix(), id])
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let run = || -> rusqlite::Result<Vec<RunRow>> {
            let mut st = self.conn.prepare(
                "SELECT id, config_hash, code_version, seed, started_unix, finished_unix, argv FROM runs ORDER BY id",
            )?;
            st.query_map([], |r| {
                let argv: String = r.get(6)?;
                Ok(RunRow {
                    id: r.get(0)?,
                    info: RunInfo {
                        config_hash: r.get(1)?,
                        code_version: r.get(2)?,
                        seed: r.get::<_, i64>(3)? as u64,
                        argv: serde_json::from_str(&argv).unwrap_or_else(|_| vec![argv.clone()]),
                    },
                    started_unix: r.get(4)?,
                    finished_unix: r.get(5)?,
                })
            })?
            .collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// True when this setting of this study is already stored.
    pub fn is_done(&self, config_hash: &str, key: &SettingKey) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT 1 FROM settings WHERE config_hash=?1 AND dataset=?2 AND method=?3 AND attack=?4 AND surrogate=?5 AND eps=?6",
                params![config_hash, key.dataset, key.method, key.attack, key.surrogate, key.eps],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.sql(e))
    }

    /// The keys of every stored setting of one study.
    pub fn done_keys(&self, config_hash: &str) -> Result<BTreeSet<SettingKey>, StoreError> {
        let run = || -> rusqlite::Result<BTreeSet<SettingKey>> {
            let mut st = self
                .conn
                .prepare("SELECT dataset, method, attack, surrogate, eps FROM settings WHERE config_hash = ?1")?;
            st.query_map([config_hash], |r| {
                Ok(SettingKey {
                    dataset: r.get(0)?,
                    method: r.get(1)?,
                    attack: r.get(2)?,
                    surrogate: r.get(3)?,
                    eps: r.get(4)?,
                })
            })?
            .collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// Store one finished setting in one transaction (its row and its phase rows).
    pub fn insert(&mut self, config_hash: &str, rec: &SettingRecord) -> Result<(), StoreError> {
        self.insert_timed(config_hash, rec, &[])
    }

    /// [`Store::insert`] with more phase rows than [`Phases`] holds (e.g. `load`, `metrics`), in
    /// the same transaction; a `skipped` row of the same setting is deleted in it too.
    pub fn insert_timed(
        &mut self,
        config_hash: &str,
        rec: &SettingRecord,
        extra_phases: &[(&str, f64)],
    ) -> Result<(), StoreError> {
        if let Some((name, v)) = extra_phases.iter().find(|(_, v)| !v.is_finite()) {
            return Err(StoreError::NonFinite { key: rec.key.to_string(), name: format!("seconds_{name}"), value: *v });
        }
        if let Some((name, value)) = rec.first_non_finite() {
            return Err(StoreError::NonFinite { key: rec.key.to_string(), name, value });
        }
        let k = &rec.key;
        let mut values: Vec<Value> = vec![
            Value::Text(config_hash.into()),
            Value::Text(k.dataset.clone()),
            Value::Text(k.method.clone()),
            Value::Text(k.attack.clone()),
            Value::Text(k.surrogate.clone()),
            Value::Text(k.eps.clone()),
            self.run_id.map(Value::Integer).unwrap_or(Value::Null),
            Value::Real(rec.eps_value),
            Value::Integer(rec.n_images as i64),
            Value::Integer(rec.needs_task_id as i64),
        ];
        for e in rec.metrics.values() {
            values.extend([opt_f64(e.value), opt_f64(e.lo), opt_f64(e.hi)]);
        }
        for s in [rec.grad_align_merged_skipped, rec.grad_align_reference_skipped] {
            values.push(s.map(|v| Value::Integer(v as i64)).unwrap_or(Value::Null));
        }
        for v in rec.seconds.values() {
            values.push(Value::Real(v));
        }
        let mut cols: Vec<String> = KEY_COLUMNS.iter().map(|c| c.to_string()).collect();
        cols.push("run_id".into());
        cols.extend(value_columns());
        let placeholders = (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let sql = format!("INSERT INTO settings ({}) VALUES ({placeholders})", cols.join(", "));

        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.unchecked_transaction()?;
            tx.execute(&sql, params_from_iter(values.iter()))?;
            let phases = Phases::NAMES.iter().copied().zip(rec.seconds.values()).chain(extra_phases.iter().copied());
            for (phase, secs) in phases {
                tx.execute(
                    "INSERT INTO phases (config_hash, dataset, method, attack, surrogate, eps, phase, seconds)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![config_hash, k.dataset, k.method, k.attack, k.surrogate, k.eps, phase, secs],
                )?;
            }
            tx.execute(
                "DELETE FROM skipped WHERE config_hash=?1 AND dataset=?2 AND method=?3 AND attack=?4 AND surrogate=?5 AND eps=?6",
                params![config_hash, k.dataset, k.method, k.attack, k.surrogate, k.eps],
            )?;
            tx.commit()
        })();
        result.map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::ConstraintViolation) => {
                StoreError::Duplicate { path: self.path.clone(), key: k.to_string(), config_hash: config_hash.into() }
            }
            Some(ErrorCode::DiskFull) => StoreError::Full { path: self.path.clone(), key: k.to_string() },
            Some(_) => StoreError::Write { path: self.path.clone(), key: k.to_string(), source: e },
            None => self.sql(e),
        })
    }

    /// Every stored setting, ordered by config hash and key.
    pub fn settings(&self) -> Result<Vec<StoredSetting>, StoreError> {
        let mut cols: Vec<String> = KEY_COLUMNS.iter().map(|c| c.to_string()).collect();
        cols.extend(value_columns());
        let sql = format!(
            "SELECT {} FROM settings ORDER BY config_hash, dataset, method, attack, surrogate, eps_value, eps",
            cols.join(", ")
        );
        let run = || -> rusqlite::Result<Vec<StoredSetting>> {
            let mut st = self.conn.prepare(&sql)?;
            st.query_map([], |r| {
                let mut i = 0usize;
                let mut next_text = || -> rusqlite::Result<String> {
                    i += 1;
                    r.get(i - 1)
                };
                let config_hash = next_text()?;
                let key = SettingKey {
                    dataset: next_text()?,
                    method: next_text()?,
                    attack: next_text()?,
                    surrogate: next_text()?,
                    eps: next_text()?,
                };
                let mut c = KEY_COLUMNS.len();
                let get_f = |c: &mut usize| -> rusqlite::Result<Option<f64>> {
                    *c += 1;
                    r.get(*c - 1)
                };
                let eps_value = get_f(&mut c)?.unwrap_or(f64::NAN);
                let n_images: i64 = r.get(c)?;
                let needs_task_id: i64 = r.get(c + 1)?;
                c += 2;
                let mut metrics = Metrics::default();
                for e in metrics.values_mut() {
                    *e = Estimate { value: get_f(&mut c)?, lo: get_f(&mut c)?, hi: get_f(&mut c)? };
                }
                let ga_m: Option<i64> = r.get(c)?;
                let ga_r: Option<i64> = r.get(c + 1)?;
                c += 2;
                let seconds = Phases {
                    merge: get_f(&mut c)?.unwrap_or(0.0),
                    craft: get_f(&mut c)?.unwrap_or(0.0),
                    evaluate: get_f(&mut c)?.unwrap_or(0.0),
                };
                Ok(StoredSetting {
                    config_hash,
                    record: SettingRecord {
                        key,
                        eps_value,
                        n_images: n_images as u64,
                        needs_task_id: needs_task_id != 0,
                        metrics,
                        grad_align_merged_skipped: ga_m.map(|v| v as u64),
                        grad_align_reference_skipped: ga_r.map(|v| v as u64),
                        seconds,
                    },
                })
            })?
            .collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// Record (or update the reason of) a setting that could not be run.
    pub fn mark_skipped(&mut self, config_hash: &str, key: &SettingKey, reason: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO skipped (config_hash, dataset, method, attack, surrogate, eps, reason, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![config_hash, key.dataset, key.method, key.attack, key.surrogate, key.eps, reason, self.run_id],
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::DiskFull) => StoreError::Full { path: self.path.clone(), key: key.to_string() },
                _ => self.sql(e),
            })?;
        Ok(())
    }

    fn has_table(&self, name: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.sql(e))
    }

    /// Every skipped setting that is not also finished, ordered by config hash and key.
    pub fn skipped(&self) -> Result<Vec<SkippedSetting>, StoreError> {
        if !self.has_table("skipped")? {
            return Ok(Vec::new());
        }
        let run = || -> rusqlite::Result<Vec<SkippedSetting>> {
            let mut st = self.conn.prepare(
                "SELECT config_hash, dataset, method, attack, surrogate, eps, reason FROM skipped
                 ORDER BY config_hash, dataset, method, attack, surrogate, eps",
            )?;
            st.query_map([], |r| {
                Ok(SkippedSetting {
                    config_hash: r.get(0)?,
                    key: SettingKey {
                        dataset: r.get(1)?,
                        method: r.get(2)?,
                        attack: r.get(3)?,
                        surrogate: r.get(4)?,
                        eps: r.get(5)?,
                    },
                    reason: r.get(6)?,
                })
            })?
            .collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// Every phase row: (config hash, key) -> [(phase, seconds)] in phase-name order.
    pub fn phases(&self) -> Result<PhaseRows, StoreError> {
        let run = || -> rusqlite::Result<PhaseRows> {
            let mut st = self.conn.prepare(
                "SELECT config_hash, dataset, method, attack, surrogate, eps, phase, seconds FROM phases
                 ORDER BY config_hash, dataset, method, attack, surrogate, eps, phase",
            )?;
            let mut out = PhaseRows::new();
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    SettingKey {
                        dataset: r.get(1)?,
                        method: r.get(2)?,
                        attack: r.get(3)?,
                        surrogate: r.get(4)?,
                        eps: r.get(5)?,
                    },
                    r.get::<_, String>(6)?,
                    r.get::<_, f64>(7)?,
                ))
            })?;
            for row in rows {
                let (h, k, p, s) = row?;
                out.entry((h, k)).or_default().push((p, s));
            }
            Ok(out)
        };
        run().map_err(|e| self.sql(e))
    }

    /// The config hashes of the runs recorded in this store (sorted, distinct).
    pub fn config_hashes(&self) -> Result<Vec<String>, StoreError> {
        let run = || -> rusqlite::Result<Vec<String>> {
            let mut st = self
                .conn
                .prepare("SELECT config_hash FROM runs UNION SELECT config_hash FROM settings ORDER BY config_hash")?;
            st.query_map([], |r| r.get::<_, String>(0))?.collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// Run SQLite's integrity check; `Ok(true)` when the file is sound.
    pub fn integrity_ok(&self) -> Result<bool, StoreError> {
        let r: String = self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| self.sql(e))?;
        Ok(r == "ok")
    }
}

/// Phase rows by (config hash, setting key).
pub type PhaseRows = std::collections::BTreeMap<(String, SettingKey), Vec<(String, f64)>>;

/// The phase rows of several stores together (a setting found in two stores keeps the first's).
pub fn read_phases(paths: &[PathBuf]) -> Result<PhaseRows, StoreError> {
    let mut out = PhaseRows::new();
    for p in paths {
        for (k, v) in Store::open_read_only(p)?.phases()? {
            out.entry(k).or_insert(v);
        }
    }
    Ok(out)
}

/// The skipped settings of several stores together, leaving out those finished in any of them.
pub fn read_skipped(paths: &[PathBuf]) -> Result<Vec<SkippedSetting>, StoreError> {
    let mut done: BTreeSet<(String, SettingKey)> = BTreeSet::new();
    let mut skipped: BTreeSet<SkippedSetting> = BTreeSet::new();
    for p in paths {
        let s = Store::open_read_only(p)?;
        for h in s.config_hashes()? {
            for k in s.done_keys(&h)? {
                done.insert((h.clone(), k));
            }
        }
        skipped.extend(s.skipped()?);
    }
    Ok(skipped.into_iter().filter(|s| !done.contains(&(s.config_hash.clone(), s.key.clone()))).collect())
}

/// Read the settings of several stores together (e.g. the shards of one study), ordered by config
/// hash and key. A setting found in two stores is kept once when both copies agree and is an
/// error when they differ.
pub fn read_stores(paths: &[PathBuf]) -> Result<Vec<StoredSetting>, StoreError> {
    let mut all: Vec<(StoredSetting, usize)> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let store = Store::open_read_only(p)?;
        all.extend(store.settings()?.into_iter().map(|s| (s, i)));
    }
    all.sort_by(|(a, _), (b, _)| {
        (&a.config_hash, &a.record.key.dataset, &a.record.key.method, &a.record.key.attack, &a.record.key.surrogate)
            .cmp(&(
                &b.config_hash,
                &b.record.key.dataset,
                &b.record.key.method,
                &b.record.key.attack,
                &b.record.key.surrogate,
            ))
            .then(a.record.eps_value.total_cmp(&b.record.eps_value))
            .then(a.record.key.eps.cmp(&b.record.key.eps))
    });
    let mut out: Vec<StoredSetting> = Vec::with_capacity(all.len());
    let mut from: Vec<usize> = Vec::with_capacity(all.len());
    for (s, i) in all {
        if let Some(last) = out.last()
            && last.config_hash == s.config_hash
            && last.record.key == s.record.key
        {
            // Timings legitimately differ between two runs of one setting; results must not.
            let mut a = last.record.clone();
            let mut b = s.record.clone();
            a.seconds = Phases::default();
            b.seconds = Phases::default();
            if a != b {
                return Err(StoreError::Conflict {
                    key: s.record.key.to_string(),
                    config_hash: s.config_hash.clone(),
                    first: paths[*from.last().expect("parallel")].clone(),
                    second: paths[i].clone(),
                });
            }
            continue;
        }
        out.push(s);
        from.push(i);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> SettingRecord {
        let m = Metrics {
            acc_merged: Estimate::with_ci(0.5 + i as f64 * 1e-3, 0.4, 0.6),
            rtasr_ref_all: Estimate::na(),
            ..Default::default()
        };
        SettingRecord {
            key: SettingKey {
                dataset: format!("d{}", i % 3),
                method: format!("m{i}"),
                attack: "fgsm".into(),
                surrogate: "finetuned".into(),
                eps: "8/255".into(),
            },
            eps_value: 8.0 / 255.0,
            n_images: 10,
            needs_task_id: i.is_multiple_of(2),
            metrics: m,
            grad_align_merged_skipped: Some(1),
            grad_align_reference_skipped: None,
            seconds: Phases { merge: 1.0, craft: 2.0, evaluate: 3.0 },
        }
    }

    #[test]
    fn disk_full_is_a_clear_error_and_leaves_the_store_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sqlite");
        let mut store = Store::open(&path).unwrap();
        // Cap the file size: inserts then fail exactly as on a full disk (SQLITE_FULL).
        let pages: i64 = store.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        store.conn.query_row(&format!("PRAGMA max_page_count = {}", pages + 2), [], |r| r.get::<_, i64>(0)).unwrap();
        let mut ok = 0usize;
        let err = loop {
            match store.insert("h", &record(ok)) {
                Ok(()) => ok += 1,
                Err(e) => break e,
            }
            assert!(ok < 10_000, "the page cap never triggered");
        };
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("disk is full") && msg.contains("full.sqlite") && msg.contains(&format!("m{ok}")),
            "{msg}"
        );
        assert!(store.integrity_ok().unwrap());
        let rows = store.settings().unwrap();
        assert_eq!(rows.len(), ok);
        assert!(!store.is_done("h", &record(ok).key).unwrap());
        let phases: i64 = store.conn.query_row("SELECT count(*) FROM phases", [], |r| r.get(0)).unwrap();
        assert_eq!(phases as usize, 3 * ok, "no phase rows of the failed setting");
        drop(store);
        // Space is back: the same store resumes and takes the failed setting.
        let mut store = Store::open(&path).unwrap();
        store.insert("h", &record(ok)).unwrap();
        assert_eq!(store.settings().unwrap().len(), ok + 1);
    }

    #[test]
    fn duplicates_and_non_finite_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let mut store = Store::open(&path).unwrap();
        store.insert("h", &record(0)).unwrap();
        let e = store.insert("h", &record(0)).unwrap_err();
        assert!(matches!(e, StoreError::Duplicate { .. }), "{e}");
        store.insert("other", &record(0)).unwrap();
        let mut bad = record(1);
        bad.metrics.tasr_all.value = Some(f64::INFINITY);
        let e = store.insert("h", &bad).unwrap_err().to_string();
        assert!(e.contains("tasr_all is inf"), "{e}");
        assert_eq!(store.settings().unwrap().len(), 2);
    }

    #[test]
    fn foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.sqlite");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        let e = Store::open_read_only(&junk).err().unwrap().to_string();
        assert!(e.contains("junk.sqlite is not a mergeattack results store"), "{e}");
        let e = Store::open_read_only(&dir.path().join("nope.sqlite")).err().unwrap().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
