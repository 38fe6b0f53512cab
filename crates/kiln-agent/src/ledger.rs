//! The node's key and the ledger's signed checkpoints. Every event is
//! chained by the state store as it is written ([`kiln_core::ledger`]);
//! here the agent signs the head every [`EVERY_ENTRIES`] entries or every
//! `--checkpoint-every` ([`EVERY`] by default), and when it stops, so that cutting entries off the end of
//! the ledger is detected as well as editing one.
//!
//! The key is ed25519, made on first start: `$KILN_HOME/node.key` (PKCS#8,
//! 0600) and `$KILN_HOME/node.pub` (`ed25519 HEX`, what `kiln audit verify
//! --key` reads).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::digest::hex;
use kiln_core::event::{Actor, Change};
use kiln_core::ledger::{Checkpoint, checkpoint_message};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

use crate::state::{ClusterState, NewEvent, StateError};

/// What the agent's own verifications of its ledger found (`/metrics`).
#[derive(Debug, Default)]
pub struct Health {
    /// 1 once a verification found a break (until the agent restarts on a
    /// whole ledger).
    pub broken: std::sync::atomic::AtomicBool,
    pub verifications: std::sync::atomic::AtomicU64,
}

impl Health {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        let _ = writeln!(
            out,
            "# HELP kiln_ledger_broken 1 when the agent found its ledger broken (kiln audit says where).\n# TYPE kiln_ledger_broken gauge\nkiln_ledger_broken {}",
            u8::from(self.broken.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP kiln_ledger_verifications_total Full verifications of the ledger by the agent.\n# TYPE kiln_ledger_verifications_total counter\nkiln_ledger_verifications_total {}",
            self.verifications.load(Ordering::Relaxed)
        );
    }
}

/// Verify the whole ledger against this node's key and the keys the store
/// lists (the chain and every checkpoint; an unsigned end is not a break here: an agent that was
/// killed left one, which it signs now). A break is logged, counted and
/// recorded as a `ledger-broken` entry — once per distinct break — and the
/// agent goes on serving: traffic must not depend on the audit trail.
pub async fn verify_own(
    key: &NodeKey,
    state: &dyn ClusterState,
    health: &Health,
) -> Result<(), StateError> {
    use std::sync::atomic::Ordering;
    let entries = state.ledger(0).await?;
    let checkpoints = state.checkpoints().await?;
    health.verifications.fetch_add(1, Ordering::Relaxed);
    // The keys whose checkpoints count: this node's, and every node's the
    // store lists (each node of a cluster signs what it checkpoints).
    let mut keys = vec![key.pair.public_key().as_ref().to_vec()];
    for (text, _) in state.node_keys().await? {
        if let Ok(k) = kiln_core::ledger::parse_public_key(&text) {
            keys.push(k.to_vec());
        }
    }
    // Hashing every entry is work for a blocking thread.
    let (verdict, entries) = tokio::task::spawn_blocking(move || {
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let verdict = kiln_core::ledger::verify_by(&entries, &checkpoints, &keys);
        (verdict, entries)
    })
    .await
    .map_err(|e| StateError::Backend(Box::new(e)))?;
    let Err(bad) = verdict else {
        return Ok(());
    };
    health.broken.store(true, Ordering::Relaxed);
    tracing::error!("the ledger is broken: {bad}; kiln goes on serving (kiln audit shows where)");
    let change = Change::LedgerBroken {
        seq: bad.seq,
        reason: bad.reason.clone(),
    };
    let detail = change.detail();
    let known = entries.iter().any(|e| {
        e.kind == kiln_core::ledger::BROKEN
            && serde_json::from_str::<serde_json::Value>(&e.detail)
                .ok()
                .as_ref()
                == Some(&detail)
    });
    if !known {
        state
            .append_event(&NewEvent::node(change, Actor::Agent))
            .await?;
    }
    Ok(())
}

/// Sign at least this often while entries are added.
pub const EVERY: Duration = Duration::from_secs(10);
/// And after this many entries, whichever comes first.
pub const EVERY_ENTRIES: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an ed25519 key (PKCS#8)", path.display())]
    Invalid { path: PathBuf },
    #[error("cannot make the node key: {0}")]
    Generate(String),
}

pub struct NodeKey {
    pair: Ed25519KeyPair,
}

impl NodeKey {
    /// The key of `home`, made (and kept) if there is none.
    pub fn load_or_create(home: &Path) -> Result<Self, KeyError> {
        let path = home.join("node.key");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|e| KeyError::Generate(e.to_string()))?;
                kiln_store::fsutil::write_private(&path, made.as_ref()).map_err(io(&path))?;
                made.as_ref().to_vec()
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| KeyError::Invalid { path: path.clone() })?;
        let key = Self { pair };
        let public = home.join("node.pub");
        let text = format!("{}\n", key.public());
        if std::fs::read_to_string(&public).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&public, text).map_err(io(&public))?;
        }
        Ok(key)
    }

    /// `ed25519 HEX`, as `node.pub` holds it.
    pub fn public(&self) -> String {
        format!("ed25519 {}", hex(self.pair.public_key().as_ref()))
    }

    /// Sign the ledger's head unless the last checkpoint already covers it.
    pub async fn checkpoint(
        &self,
        state: &dyn ClusterState,
    ) -> Result<Option<Checkpoint>, StateError> {
        let Some((seq, head)) = state.head().await? else {
            return Ok(None);
        };
        if state.last_checkpoint().await?.is_some_and(|c| c >= seq) {
            return Ok(None);
        }
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let signature = hex(self
            .pair
            .sign(&checkpoint_message(seq, &head, &time))
            .as_ref());
        let cp = Checkpoint {
            seq,
            head,
            time,
            signature,
        };
        state.put_checkpoint(&cp).await?;
        Ok(Some(cp))
    }
}

/// Sign the head every `every` while it moves, or as soon as it is
/// [`EVERY_ENTRIES`] past the last checkpoint.
pub async fn run(key: Arc<NodeKey>, state: Arc<dyn ClusterState>, every: Duration) {
    let mut since = tokio::time::Instant::now();
    let tick = every.clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let due = since.elapsed() >= every;
        // One signature: cheap enough for an async thread.
        let signed = async {
            let behind = match (state.head().await?, state.last_checkpoint().await?) {
                (Some((seq, _)), Some(c)) => seq.saturating_sub(c),
                (Some((seq, _)), None) => seq,
                (None, _) => 0,
            };
            if behind >= EVERY_ENTRIES || (due && behind > 0) {
                key.checkpoint(&*state).await
            } else {
                Ok(None)
            }
        }
        .await;
        match signed {
            Ok(Some(_)) => since = tokio::time::Instant::now(),
            Ok(None) => {
                if due {
                    since = tokio::time::Instant::now();
                }
            }
            Err(e) => tracing::error!("ledger checkpoint: {e}"),
        }
    }
}
