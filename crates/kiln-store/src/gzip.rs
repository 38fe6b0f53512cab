//! Parallel gzip: the uncompressed stream is cut into chunks where the
//! writer says ([`ParallelGzip::cut`], at entry boundaries: see
//! `kiln_core::layer::cut_after`), each compressed as its own gzip member
//! on the rayon pool, and the members are written in order. Concatenated
//! members are one valid gzip stream (RFC 1952 §2.2) that Go's, zlib's and
//! Rust's readers all decode. The cuts and the level are fixed, so the
//! bytes are the same on every machine.
//!
//! A chunk whose raw bytes an earlier layer already compressed is not
//! compressed again: its member is copied from that layer's blob
//! ([`Reuse`]), checked against the chunk's CRC-32 and length, which every
//! gzip member ends with. The result is byte for byte what compressing
//! would give, so an incremental bake's digest is a full bake's.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use flate2::{Compression, GzBuilder};
use kiln_core::Digest;
use kiln_core::layer::{GZIP_CHUNK, GZIP_LEVEL};
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256};

/// A chunk never grows past this, whatever the writer says (memory bound).
const MAX_CHUNK: usize = 4 * GZIP_CHUNK;

/// One member of a layer blob: the sha256 of its raw bytes, and where its
/// compressed bytes are in the blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub raw: Digest,
    pub offset: u64,
    pub len: u64,
    /// For a member that ends where an entry ends: what a later bake needs
    /// to resume the layer after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// The state of a layer's streams where a member ends at an entry
/// boundary. A re-bake whose entries up to there are the same (the same
/// chain, `kiln_core::layer::chain`) copies the blob's bytes up to there,
/// restores both SHA-256 states, and goes on from the next entry: nothing
/// before is read, hashed or compressed again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Entries before the boundary, and their chain.
    pub entries: usize,
    pub chain: Digest,
    /// Raw bytes before the boundary; the raw stream's SHA-256 state there.
    pub raw_size: u64,
    pub raw_state: String,
    /// The compressed stream's SHA-256 state after this member.
    pub out_state: String,
    /// The cut came from the entry before it (`cut_after`), not from the
    /// entry after it being a big one (`alone`): only then does it hold
    /// whatever the next entry is.
    #[serde(default)]
    pub by_content: bool,
}

/// What a writer of compressed bytes can say of its SHA-256 so far.
pub trait Checkpoint {
    /// The serialized SHA-256 state of everything written so far, if it
    /// keeps one.
    fn checkpoint(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Checkpoint for Vec<u8> {}

/// A SHA-256 state, serialized.
pub fn sha256_state(h: &Sha256) -> Vec<u8> {
    h.serialize().to_vec()
}

/// A SHA-256 state back from [`sha256_state`].
pub fn sha256_from_state(bytes: &[u8]) -> Option<Sha256> {
    let state = sha2::digest::common::hazmat::SerializedState::<Sha256>::try_from(bytes).ok()?;
    Sha256::deserialize(&state).ok()
}

/// Lowercase hex back to bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Members earlier layers hold, by the sha256 of their raw bytes; and
/// each earlier layer's members in order (to resume after a prefix).
#[derive(Clone, Debug, Default)]
pub struct Reuse {
    members: BTreeMap<Digest, (PathBuf, u64, u64)>,
    pub layers: Vec<(PathBuf, Vec<Member>)>,
}

impl Reuse {
    /// Add the members of the blob at `path`.
    pub fn add(&mut self, path: PathBuf, members: &[Member]) {
        for m in members {
            self.members
                .entry(m.raw.clone())
                .or_insert_with(|| (path.clone(), m.offset, m.len));
        }
        self.layers.push((path, members.to_vec()));
    }

    /// The longest prefix an earlier layer shares with a layer whose chain
    /// after `i` entries is `chains[i]`: that layer's blob, its members up
    /// to the boundary, and the boundary's state. `cuts_before(i)`: whether
    /// this layer cuts before its entry `i` whatever came before (it is a
    /// big one), which a boundary not cut by content needs.
    pub fn prefix(
        &self,
        chains: &[Digest],
        cuts_before: impl Fn(usize) -> bool,
    ) -> Option<(PathBuf, Vec<Member>, Resume)> {
        let mut best: Option<(PathBuf, Vec<Member>, Resume)> = None;
        for (path, members) in &self.layers {
            for (k, m) in members.iter().enumerate() {
                let Some(r) = &m.resume else { continue };
                let same = r.entries > 0
                    && chains.get(r.entries) == Some(&r.chain)
                    && (r.by_content || cuts_before(r.entries));
                if same
                    && best
                        .as_ref()
                        .is_none_or(|(_, _, b)| r.raw_size > b.raw_size)
                {
                    best = Some((path.clone(), members[..=k].to_vec(), r.clone()));
                }
            }
        }
        best
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// What a finished stream was made of.
#[derive(Debug)]
pub struct Finished<W> {
    pub out: W,
    /// sha256 of the uncompressed stream (the OCI `diff_id`).
    pub diff_id: Digest,
    pub raw_size: u64,
    pub members: Vec<Member>,
    /// Members copied from an earlier layer instead of compressed.
    pub reused: usize,
}

/// An entry boundary a chunk ends at: entries before it, their chain,
/// whether the cut was by content, the raw size and the raw stream's
/// SHA-256 state there.
type Boundary = (usize, Digest, bool, u64, Vec<u8>);

/// A finished job: the member's bytes, its raw digest and length, whether
/// it was copied, and the boundary it ends at.
type Job = io::Result<(Vec<u8>, Digest, u64, bool, Option<Boundary>)>;

/// A writer that gzips on every core. Must not be used from inside a rayon
/// worker: it blocks waiting for the pool.
pub struct ParallelGzip<W: Write + Checkpoint> {
    out: W,
    chunk: Vec<u8>,
    diff_hasher: Sha256,
    raw_size: u64,
    inflight: VecDeque<mpsc::Receiver<Job>>,
    max_inflight: usize,
    on_chunk: Box<dyn FnMut(u64) + Send>,
    /// Cut every `GZIP_CHUNK` bytes (inside a big entry).
    split: bool,
    reuse: Arc<Reuse>,
    written: u64,
    members: Vec<Member>,
    reused: usize,
    /// The entry boundary the next dispatched chunk ends at.
    boundary: Option<(usize, Digest, bool)>,
}

impl<W: Write + Checkpoint> ParallelGzip<W> {
    /// `on_chunk` is told how many uncompressed bytes each finished chunk had.
    pub fn new(out: W, on_chunk: Box<dyn FnMut(u64) + Send>) -> Self {
        Self::reusing(out, on_chunk, Arc::default())
    }

    /// As [`new`](Self::new), copying the members `reuse` has.
    pub fn reusing(out: W, on_chunk: Box<dyn FnMut(u64) + Send>, reuse: Arc<Reuse>) -> Self {
        Self {
            out,
            chunk: Vec::with_capacity(GZIP_CHUNK),
            diff_hasher: Sha256::new(),
            raw_size: 0,
            inflight: VecDeque::new(),
            // Enough to keep every core busy while the producer fills the next chunk.
            max_inflight: 2 * rayon::current_num_threads() + 1,
            on_chunk,
            split: false,
            reuse,
            written: 0,
            members: Vec::new(),
            reused: 0,
            boundary: None,
        }
    }

    /// Go on after a prefix an earlier layer shares ([`Reuse::prefix`]):
    /// `out` already holds that prefix's compressed bytes (and its hash
    /// state); the raw stream resumes from `resume`'s state.
    pub fn resumed(
        out: W,
        on_chunk: Box<dyn FnMut(u64) + Send>,
        reuse: Arc<Reuse>,
        members: Vec<Member>,
        resume: &Resume,
    ) -> io::Result<Self> {
        let state = unhex(&resume.raw_state)
            .and_then(|b| sha256_from_state(&b))
            .ok_or_else(|| io::Error::other("a member cache entry has a bad hash state"))?;
        let mut gz = Self::reusing(out, on_chunk, reuse);
        gz.diff_hasher = state;
        gz.raw_size = resume.raw_size;
        gz.written = members.last().map_or(0, |m| m.offset + m.len);
        gz.reused = members.len();
        gz.members = members;
        Ok(gz)
    }

    /// End the current member here, where `entries` entries (whose chain is
    /// `chain`) end: a later bake may resume after it. `by_content`: the
    /// entry before decided the cut (else the big entry after it did).
    pub fn cut_at(&mut self, entries: usize, chain: Digest, by_content: bool) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.boundary = Some((entries, chain, by_content));
        self.dispatch()
    }

    /// End the current member here (nothing if it is empty).
    pub fn cut(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.dispatch()
    }

    /// Inside a big entry: cut every `GZIP_CHUNK` bytes.
    pub fn split(&mut self, on: bool) {
        self.split = on;
    }

    /// Raw bytes in the current member so far.
    pub fn member_len(&self) -> usize {
        self.chunk.len()
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(GZIP_CHUNK));
        self.diff_hasher.update(&chunk);
        self.raw_size += chunk.len() as u64;
        let boundary = self
            .boundary
            .take()
            .map(|(n, c, b)| (n, c, b, self.raw_size, sha256_state(&self.diff_hasher)));
        let (tx, rx) = mpsc::channel();
        let reuse = self.reuse.clone();
        rayon::spawn(move || {
            let raw = Digest::of(&chunk);
            let len = chunk.len() as u64;
            let copied = reuse
                .members
                .get(&raw)
                .and_then(|(path, offset, mlen)| copy_member(path, *offset, *mlen, &chunk).ok());
            // The receiver only goes away if the writer was dropped; nothing to tell then.
            let _ = tx.send(match copied {
                Some(member) => Ok((member, raw, len, true, boundary)),
                None => compress(&chunk).map(|m| (m, raw, len, false, boundary)),
            });
        });
        self.inflight.push_back(rx);
        while self.inflight.len() > self.max_inflight {
            self.drain_one()?;
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        let Some(rx) = self.inflight.pop_front() else {
            return Ok(());
        };
        let (member, raw, len, copied, boundary) = rx
            .recv()
            .map_err(|_| io::Error::other("compression worker vanished"))??;
        self.out.write_all(&member)?;
        let resume = match (boundary, self.out.checkpoint()) {
            (Some((entries, chain, by_content, raw_size, raw_state)), Some(out_state)) => {
                Some(Resume {
                    entries,
                    chain,
                    raw_size,
                    raw_state: kiln_core::digest::hex(&raw_state),
                    out_state: kiln_core::digest::hex(&out_state),
                    by_content,
                })
            }
            _ => None,
        };
        self.members.push(Member {
            raw,
            offset: self.written,
            len: member.len() as u64,
            resume,
        });
        self.written += member.len() as u64;
        self.reused += usize::from(copied);
        (self.on_chunk)(len);
        Ok(())
    }

    /// Compress what is left and wait for every member.
    pub fn finish(mut self) -> io::Result<Finished<W>> {
        if !self.chunk.is_empty() || self.raw_size == 0 {
            self.dispatch()?;
        }
        while !self.inflight.is_empty() {
            self.drain_one()?;
        }
        self.out.flush()?;
        Ok(Finished {
            out: self.out,
            diff_id: Digest::from_hasher(self.diff_hasher),
            raw_size: self.raw_size,
            members: self.members,
            reused: self.reused,
        })
    }
}

impl<W: Write + Checkpoint> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let limit = if self.split { GZIP_CHUNK } else { MAX_CHUNK };
        let room = limit.saturating_sub(self.chunk.len());
        let n = room.min(buf.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() >= limit {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One gzip member with a fixed header (no name, mtime 0, OS "unknown").
fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzBuilder::new().mtime(0).operating_system(255).write(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::new(GZIP_LEVEL),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// The member at `offset` of the blob at `path`, if it is the one of
/// `raw`: its header is kiln's, and its trailer's CRC-32 and length are
/// `raw`'s (what compressing `raw` would end with).
fn copy_member(path: &PathBuf, offset: u64, len: u64, raw: &[u8]) -> io::Result<Vec<u8>> {
    if len < 18 {
        return Err(io::Error::other("member too short"));
    }
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut member = vec![0u8; len as usize];
    f.read_exact(&mut member)?;
    // kiln's member header, the same for every member (level, no name,
    // mtime 0): made once.
    static HEADER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let header = match HEADER.get() {
        Some(h) => h,
        None => {
            let h = compress(&[])?;
            HEADER.get_or_init(|| h)
        }
    };
    let tail = &member[member.len() - 8..];
    let mut crc = flate2::Crc::new();
    crc.update(raw);
    let fits = member[..10] == header[..10]
        && tail[..4] == crc.sum().to_le_bytes()
        && tail[4..] == (raw.len() as u32).to_le_bytes();
    if fits {
        Ok(member)
    } else {
        Err(io::Error::other("member does not match"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        (0..(3 * GZIP_CHUNK + 123))
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect()
    }

    /// Write `data` cutting at `cuts` (offsets), reusing `reuse`.
    fn run(data: &[u8], cuts: &[usize], reuse: Arc<Reuse>) -> Finished<Vec<u8>> {
        let mut gz = ParallelGzip::reusing(Vec::new(), Box::new(|_| {}), reuse);
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            gz.write_all(&data[at..c]).unwrap();
            gz.cut().unwrap();
            at = c;
        }
        gz.finish().unwrap()
    }

    #[test]
    fn multi_member_output_decodes_to_the_input_and_is_deterministic() {
        let data = data();
        let a = run(&data, &[1000, 500_000, 2_000_000], Arc::default());
        let b = run(&data, &[1000, 500_000, 2_000_000], Arc::default());
        assert_eq!(a.out, b.out);
        assert_eq!(a.raw_size, data.len() as u64);
        assert_eq!(a.diff_id, Digest::of(&data));
        // Past MAX_CHUNK without a cut, it is cut anyway.
        assert_eq!(a.members.len(), 4);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&a.out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn members_of_unchanged_chunks_are_copied_and_the_bytes_are_a_full_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = data();
        let cuts = [700_000, 1_400_000, 2_100_000];
        let first = run(&data, &cuts, Arc::default());
        let blob = dir.path().join("blob");
        std::fs::write(&blob, &first.out).unwrap();
        // One byte of the second chunk changes.
        data[800_000] ^= 1;
        let mut reuse = Reuse::default();
        reuse.add(blob.clone(), &first.members);
        let again = run(&data, &cuts, Arc::new(reuse));
        let full = run(&data, &cuts, Arc::default());
        assert_eq!(
            again.out, full.out,
            "an incremental run's bytes are a full run's"
        );
        assert_eq!((again.reused, full.reused), (3, 0));
        // A member that does not match its raw bytes (a corrupt blob) is
        // compressed again, not copied.
        let mut bad = first.out.clone();
        let end = (first.members[0].offset + first.members[0].len) as usize;
        bad[end - 8] ^= 0xff;
        std::fs::write(&blob, &bad).unwrap();
        let mut reuse = Reuse::default();
        reuse.add(blob, &first.members);
        let guarded = run(&data, &cuts, Arc::new(reuse));
        assert_eq!(guarded.out, full.out);
        assert_eq!(guarded.reused, 2);
    }
}
