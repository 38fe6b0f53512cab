//! The ledger: every event an entry of a hash chain, and signed
//! checkpoints of its head, checked by [`verify`] with nothing but the
//! entries, the checkpoints and the node's public key.
//!
//! **Entry hash, version 1.** `sha256(prev ‖ body)`, where `prev` is the
//! 32 bytes of the previous entry's hash (zeros for the first) and `body`
//! the compact JSON of [`Body`]: the entry's fields in the order declared,
//! the change's detail as the exact JSON text the store keeps (so no
//! re-encoding can change a hash). An edit changes the entry's hash; a
//! deletion, insertion or reordering breaks a sequence number or a `prev`.
//!
//! **Checkpoint, version 1.** An ed25519 signature by the node's key over
//! [`checkpoint_message`] (sequence number, head hash, time): rewriting the
//! whole chain after an edit, or cutting entries off its end, no longer
//! matches what was signed.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::hex;

/// One ledger entry: an event and its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    /// `uid:N`, `token:NAME` or `agent`; none for events recorded before
    /// actors were.
    pub actor: Option<String>,
    pub service: Option<String>,
    pub revision: Option<u64>,
    pub instance: Option<String>,
    pub kind: String,
    /// The change's fields, as the JSON text kept.
    pub detail: String,
    /// Hex of the previous entry's hash (64 zeros for the first).
    pub prev: String,
    /// Hex of this entry's hash.
    pub hash: String,
}

/// What an entry's hash covers besides `prev`.
#[derive(Serialize)]
struct Body<'a> {
    v: u32,
    seq: u64,
    time: &'a str,
    actor: Option<&'a str>,
    service: Option<&'a str>,
    revision: Option<u64>,
    instance: Option<&'a str>,
    kind: &'a str,
    detail: &'a str,
}

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl Entry {
    /// The entry's hash from its content and `prev`.
    pub fn compute_hash(&self) -> String {
        let body = Body {
            v: 1,
            seq: self.seq,
            time: &self.time,
            actor: self.actor.as_deref(),
            service: self.service.as_deref(),
            revision: self.revision,
            instance: self.instance.as_deref(),
            kind: &self.kind,
            detail: &self.detail,
        };
        let mut h = Sha256::new();
        h.update(unhex32(&self.prev).unwrap_or([0xff; 32]));
        h.update(serde_json::to_vec(&body).unwrap_or_default());
        hex(&h.finalize())
    }

    /// Chain this entry after `prev`: sets `prev` and `hash`.
    pub fn chained(mut self, prev: &str) -> Self {
        self.prev = prev.to_owned();
        self.hash = self.compute_hash();
        self
    }
}

/// A signed statement of the ledger's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub head: String,
    pub time: String,
    /// Hex of the ed25519 signature of [`checkpoint_message`].
    pub signature: String,
}

/// What a checkpoint's signature covers.
pub fn checkpoint_message(seq: u64, head: &str, time: &str) -> Vec<u8> {
    format!("kiln ledger checkpoint v1\n{seq}\n{head}\n{time}\n").into_bytes()
}

/// What a good ledger proved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub entries: u64,
    pub checkpoints: usize,
    /// The last entry a valid checkpoint covers (0: none).
    pub signed_through: u64,
    pub head: String,
}

/// The first thing wrong with a ledger.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", seq.map(|s| format!("entry {s}: ")).unwrap_or_default())]
pub struct Bad {
    /// The first bad entry, when one can be named.
    pub seq: Option<u64>,
    pub reason: String,
}

fn bad(seq: Option<u64>, reason: impl Into<String>) -> Bad {
    Bad {
        seq,
        reason: reason.into(),
    }
}

/// Check a whole ledger: the chain from its first entry, then every
/// checkpoint's signature (with `key`, the node's 32-byte ed25519 public
/// key) and the head it signed.
pub fn verify(entries: &[Entry], checkpoints: &[Checkpoint], key: &[u8]) -> Result<Verified, Bad> {
    verify_by(entries, checkpoints, &[key])
}

/// [`verify`] a ledger that several nodes sign (a cluster's: each node
/// signs the checkpoints it writes): every checkpoint's signature must be
/// made by one of `keys`.
pub fn verify_by(
    entries: &[Entry],
    checkpoints: &[Checkpoint],
    keys: &[&[u8]],
) -> Result<Verified, Bad> {
    let mut prev = GENESIS.to_owned();
    for (i, e) in entries.iter().enumerate() {
        let want = i as u64 + 1;
        if e.seq > want {
            let later = entries[i..].iter().any(|x| x.seq == want);
            return Err(bad(
                Some(want),
                if later {
                    format!("out of order (reordered): entry {} comes before it", e.seq)
                } else {
                    format!(
                        "missing (deleted): the entry after {} is {}",
                        want - 1,
                        e.seq
                    )
                },
            ));
        }
        if e.seq < want {
            return Err(bad(
                Some(e.seq),
                format!(
                    "found again after entry {}: inserted or reordered",
                    want - 1
                ),
            ));
        }
        if e.prev != prev {
            return Err(bad(
                Some(e.seq),
                "does not follow the entry before it (its prev hash differs): inserted or reordered",
            ));
        }
        if e.compute_hash() != e.hash {
            return Err(bad(
                Some(e.seq),
                "edited: its content does not hash to its recorded hash",
            ));
        }
        prev = e.hash.clone();
    }
    let last = entries.len() as u64;
    let publics: Vec<_> = keys
        .iter()
        .map(|k| ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, *k))
        .collect();
    let mut signed_through = 0;
    for cp in checkpoints {
        let sig = unhex(&cp.signature).ok_or_else(|| {
            bad(
                None,
                format!(
                    "the checkpoint at entry {} has a malformed signature",
                    cp.seq
                ),
            )
        })?;
        let message = checkpoint_message(cp.seq, &cp.head, &cp.time);
        if !publics.iter().any(|p| p.verify(&message, &sig).is_ok()) {
            return Err(bad(
                None,
                format!(
                    "the checkpoint at entry {} is not signed by {} (another node's key, or edited)",
                    cp.seq,
                    if keys.len() == 1 {
                        "this key"
                    } else {
                        "any of the cluster's keys"
                    }
                ),
            ));
        }
        if cp.seq > last {
            return Err(bad(
                Some(last + 1),
                format!(
                    "missing: the ledger ends at entry {last}, but a checkpoint signed entry {}: entries were cut off its end",
                    cp.seq
                ),
            ));
        }
        let Some(at) = cp.seq.checked_sub(1).and_then(|i| entries.get(i as usize)) else {
            continue;
        };
        if at.hash != cp.head {
            return Err(bad(
                None,
                format!(
                    "the chain up to entry {} is not the one its checkpoint signed: an entry at or before it was changed and the hashes after it recomputed",
                    cp.seq
                ),
            ));
        }
        signed_through = signed_through.max(cp.seq);
    }
    Ok(Verified {
        entries: last,
        checkpoints: checkpoints.len(),
        signed_through,
        head: prev,
    })
}

/// How far a ledger's end may run past its last checkpoint. A running
/// agent signs the head every 100 entries and every checkpoint interval
/// (10 s by default), so a longer unsigned end means checkpoints were
/// stripped, or the agent died before it could sign (then say so with
/// `--allow-unsigned-tail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TailLimit {
    /// Entries after the last checkpoint.
    pub entries: u64,
    /// Age of the first of them, at the time the ledger was read.
    pub age: std::time::Duration,
}

impl Default for TailLimit {
    fn default() -> Self {
        Self {
            entries: 100,
            age: std::time::Duration::from_secs(60),
        }
    }
}

/// The kind of the entry an agent records when it finds its own ledger
/// broken: the break stays in the chain, and every later verification
/// fails on it.
pub const BROKEN: &str = "ledger-broken";

/// Check what [`verify`] cannot: that no more than `limit` of the ledger's
/// end lacks a checkpoint (`read_at`: when the ledger was read — an
/// export's time, or now), and that the agent never recorded a break.
pub fn check_tail(
    entries: &[Entry],
    v: &Verified,
    limit: TailLimit,
    read_at: std::time::SystemTime,
) -> Result<(), Bad> {
    if let Some(e) = entries.iter().find(|e| e.kind == BROKEN) {
        return Err(bad(
            Some(e.seq),
            format!("the agent found its ledger broken: {}", e.detail),
        ));
    }
    let unsigned = v.entries.saturating_sub(v.signed_through);
    let Some(first) = entries.get(v.signed_through as usize) else {
        return Ok(());
    };
    let hint = "checkpoints were stripped, or the agent stopped before signing (--allow-unsigned-tail accepts it)";
    if unsigned > limit.entries {
        return Err(bad(
            Some(first.seq),
            format!(
                "{unsigned} entries after entry {} are covered by no checkpoint (at most {} may be): {hint}",
                v.signed_through, limit.entries
            ),
        ));
    }
    let made = humantime::parse_rfc3339_weak(&first.time).map_err(|_| {
        bad(
            Some(first.seq),
            format!("its time `{}` is not a time", first.time),
        )
    })?;
    if read_at
        .duration_since(made)
        .is_ok_and(|age| age > limit.age)
    {
        return Err(bad(
            Some(first.seq),
            format!(
                "made at {} and covered by no checkpoint more than {} later: {hint}",
                first.time,
                humantime::format_duration(limit.age)
            ),
        ));
    }
    Ok(())
}

/// Whether `older` (an earlier export's entries) is a prefix of `current`:
/// the same entries, unchanged, in the same places.
pub fn is_prefix(older: &[Entry], current: &[Entry]) -> Result<(), Bad> {
    for (i, e) in older.iter().enumerate() {
        match current.get(i) {
            None => {
                return Err(bad(
                    Some(e.seq),
                    "in the older export but no longer in the ledger: cut off",
                ));
            }
            Some(c) if c.hash != e.hash || c.seq != e.seq => {
                return Err(bad(
                    Some(e.seq),
                    "differs from the older export: the ledger was rewritten",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

/// Parse a public key as kiln writes it (`node.pub`: 64 hex digits,
/// optionally after `ed25519 `).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let t = t.strip_prefix("ed25519 ").unwrap_or(t).trim();
    unhex32(t).ok_or_else(|| "not a kiln public key (ed25519 and 64 hex digits)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair as _;

    fn entry(seq: u64, kind: &str) -> Entry {
        Entry {
            seq,
            time: format!("2026-12-01T00:00:{seq:02}Z"),
            actor: Some("uid:0".into()),
            service: Some("web".into()),
            revision: Some(1),
            instance: None,
            kind: kind.into(),
            detail: "{}".into(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    fn chain(n: u64) -> Vec<Entry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|s| {
                let e = entry(s, "release-created").chained(&prev);
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn key() -> ring::signature::Ed25519KeyPair {
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn sign(k: &ring::signature::Ed25519KeyPair, e: &Entry) -> Checkpoint {
        let time = "2026-12-01T01:00:00Z".to_owned();
        Checkpoint {
            seq: e.seq,
            head: e.hash.clone(),
            signature: hex(k.sign(&checkpoint_message(e.seq, &e.hash, &time)).as_ref()),
            time,
        }
    }

    #[test]
    fn a_whole_ledger_verifies() {
        let k = key();
        let l = chain(5);
        let cps = vec![sign(&k, &l[2]), sign(&k, &l[4])];
        let v = verify(&l, &cps, k.public_key().as_ref()).unwrap();
        assert_eq!((v.entries, v.signed_through), (5, 5));
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_entry() {
        let k = key();
        let l = chain(6);
        let cps = vec![sign(&k, &l[5])];
        let pk = k.public_key().as_ref().to_vec();
        let check = |l: &[Entry]| verify(l, &cps, &pk).unwrap_err();

        let mut edited = l.clone();
        edited[2].detail = r#"{"x":1}"#.into();
        assert_eq!(check(&edited).seq, Some(3));
        assert!(check(&edited).reason.contains("edited"));

        let mut deleted = l.clone();
        deleted.remove(3);
        assert_eq!(check(&deleted).seq, Some(4));
        assert!(check(&deleted).reason.contains("deleted"));

        let mut inserted = l.clone();
        inserted.insert(2, l[1].clone());
        assert_eq!(check(&inserted).seq, Some(2));
        assert!(
            check(&inserted).reason.contains("found again"),
            "{}",
            check(&inserted)
        );

        let mut reordered = l.clone();
        reordered.swap(3, 4);
        assert_eq!(check(&reordered).seq, Some(4));
        assert!(check(&reordered).reason.contains("reordered"));

        let truncated = &l[..4];
        let e = check(truncated);
        assert_eq!(e.seq, Some(5));
        assert!(e.reason.contains("cut off"), "{e}");

        // Edited and every hash after it recomputed: only the checkpoint knows.
        let mut rewritten = l.clone();
        rewritten[1].detail = r#"{"y":2}"#.into();
        let mut prev = rewritten[0].hash.clone();
        for e in rewritten.iter_mut().skip(1) {
            *e = e.clone().chained(&prev);
            prev = e.hash.clone();
        }
        assert!(
            check(&rewritten)
                .reason
                .contains("not the one its checkpoint signed")
        );
    }

    #[test]
    fn another_key_or_an_edited_checkpoint_is_refused() {
        let (k, other) = (key(), key());
        let l = chain(3);
        let cp = sign(&k, &l[2]);
        assert!(verify(&l, std::slice::from_ref(&cp), other.public_key().as_ref()).is_err());
        // A cluster's ledger: any of its nodes' keys signs.
        let both = [other.public_key().as_ref(), k.public_key().as_ref()];
        assert!(verify_by(&l, std::slice::from_ref(&cp), &both).is_ok());
        assert!(verify_by(&l, std::slice::from_ref(&cp), &both[..1]).is_err());
        assert!(verify_by(&l, std::slice::from_ref(&cp), &[]).is_err());
        let mut moved = cp.clone();
        moved.seq = 2;
        assert!(verify(&l, &[moved], k.public_key().as_ref()).is_err());
        let mut garbled = cp;
        garbled.signature = "zz".into();
        assert!(verify(&l, &[garbled], k.public_key().as_ref()).is_err());
    }

    #[test]
    fn an_older_export_is_a_prefix_only_while_unchanged() {
        let l = chain(5);
        assert!(is_prefix(&l[..3], &l).is_ok());
        let mut other = l.clone();
        other[1].time = "later".into();
        let other: Vec<Entry> = {
            let mut prev = GENESIS.to_owned();
            other
                .into_iter()
                .map(|e| {
                    let e = e.chained(&prev);
                    prev = e.hash.clone();
                    e
                })
                .collect()
        };
        assert_eq!(is_prefix(&l[..3], &other).unwrap_err().seq, Some(2));
        assert_eq!(is_prefix(&l, &l[..2]).unwrap_err().seq, Some(3));
    }

    fn at(secs: u64) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    /// A chain whose entries were made one second apart from 2026-01-01.
    fn timed(n: u64) -> Vec<Entry> {
        let base = 1_767_225_600; // 2026-01-01T00:00:00Z
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut e = entry(seq, "release-created");
                e.time = humantime::format_rfc3339_millis(at(base + seq)).to_string();
                let e = e.chained(&prev);
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn the_checkpoint_message_is_a_fixed_format() {
        // Signed by one node, checked offline by any kiln: its bytes are a
        // wire format and never change.
        assert_eq!(
            checkpoint_message(7, "ab", "2026-12-01T00:00:00Z"),
            b"kiln ledger checkpoint v1\n7\nab\n2026-12-01T00:00:00Z\n".to_vec()
        );
    }

    #[test]
    fn an_unsigned_end_is_a_break_past_its_limits() {
        let k = key();
        let base = 1_767_225_600;
        let limit = TailLimit {
            entries: 5,
            age: std::time::Duration::from_secs(10),
        };
        let entries = timed(20);
        let cp = sign(&k, &entries[14]);
        let pk = k.public_key().as_ref().to_vec();
        let v = verify(&entries, std::slice::from_ref(&cp), &pk).unwrap();
        assert_eq!(v.signed_through, 15);
        // 5 unsigned entries, the first made 1 s before: fine.
        check_tail(&entries, &v, limit, at(base + 17)).unwrap();
        // Exactly the age: fine; a second past it: broken, naming entry 16.
        check_tail(&entries, &v, limit, at(base + 26)).unwrap();
        let e = check_tail(&entries, &v, limit, at(base + 27)).unwrap_err();
        assert_eq!(e.seq, Some(16), "{e}");
        assert!(e.reason.contains("no checkpoint"), "{e}");
        // One entry more than allowed: broken whatever the time.
        let entries = timed(21);
        let v = verify(&entries, std::slice::from_ref(&cp), &pk).unwrap();
        let e = check_tail(&entries, &v, limit, at(base + 17)).unwrap_err();
        assert_eq!(e.seq, Some(16));
        assert!(e.reason.starts_with("6 entries after entry 15"), "{e}");
        // Stripped of every checkpoint: the whole ledger is the tail.
        let v = verify(&entries, &[], &pk).unwrap();
        assert_eq!(
            check_tail(&entries, &v, limit, at(base)).unwrap_err().seq,
            Some(1)
        );
        // Everything signed: nothing to check, however old.
        let all = sign(&k, &entries[20]);
        let v = verify(&entries, &[all], &pk).unwrap();
        check_tail(&entries, &v, limit, at(base + 1_000_000)).unwrap();
        // An empty ledger is whole.
        let v = verify(&[], &[], &pk).unwrap();
        check_tail(&[], &v, limit, at(base)).unwrap();
    }

    #[test]
    fn a_recorded_break_fails_every_later_verification() {
        let k = key();
        let mut entries = timed(3);
        let mut broken = entry(4, BROKEN);
        broken.detail = r#"{"seq":2}"#.into();
        broken.time = entries[2].time.clone();
        entries.push(broken.chained(&entries[2].hash));
        let all = sign(&k, &entries[3]);
        let pk = k.public_key().as_ref().to_vec();
        let v = verify(&entries, &[all], &pk).unwrap();
        let e = check_tail(&entries, &v, TailLimit::default(), at(0)).unwrap_err();
        assert_eq!(e.seq, Some(4));
        assert!(e.reason.contains("found its ledger broken"), "{e}");
    }

    #[test]
    fn public_keys_parse_strictly() {
        assert!(parse_public_key(&format!("ed25519 {}", "ab".repeat(32))).is_ok());
        for bad in [
            "",
            "ed25519 xyz",
            &"ab".repeat(31),
            "-----BEGIN PRIVATE KEY-----",
        ] {
            assert!(parse_public_key(bad).is_err(), "{bad}");
        }
    }
}
