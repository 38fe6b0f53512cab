//! Parallel gzip: the uncompressed stream is cut into fixed-size chunks, each
//! compressed as its own gzip member on the rayon pool, and the members are
//! written in order. Concatenated members are one valid gzip stream (RFC 1952
//! §2.2) that Go's, zlib's and Rust's readers all decode. The chunk size and
//! level are fixed, so the bytes are the same on every machine.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;

use flate2::{Compression, GzBuilder};
use kiln_core::Digest;
use kiln_core::layer::{GZIP_CHUNK, GZIP_LEVEL};
use sha2::{Digest as _, Sha256};

/// A writer that gzips on every core. Must not be used from inside a rayon
/// worker: it blocks waiting for the pool.
pub struct ParallelGzip<W: Write> {
    out: W,
    chunk: Vec<u8>,
    diff_hasher: Sha256,
    raw_size: u64,
    inflight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    max_inflight: usize,
    on_chunk: Box<dyn FnMut(u64) + Send>,
}

impl<W: Write> ParallelGzip<W> {
    /// `on_chunk` is told how many uncompressed bytes each finished chunk had.
    pub fn new(out: W, on_chunk: Box<dyn FnMut(u64) + Send>) -> Self {
        Self {
            out,
            chunk: Vec::with_capacity(GZIP_CHUNK),
            diff_hasher: Sha256::new(),
            raw_size: 0,
            inflight: VecDeque::new(),
            // Enough to keep every core busy while the producer fills the next chunk.
            max_inflight: 2 * rayon::current_num_threads() + 1,
            on_chunk,
        }
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(GZIP_CHUNK));
        self.diff_hasher.update(&chunk);
        self.raw_size += chunk.len() as u64;
        let (tx, rx) = mpsc::channel();
        rayon::spawn(move || {
            let len = chunk.len() as u64;
            // The receiver only goes away if the writer was dropped; nothing to tell then.
            let _ = tx.send(compress(&chunk).map(|mut v| {
                v.extend_from_slice(&len.to_le_bytes());
                v
            }));
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
        let mut member = rx
            .recv()
            .map_err(|_| io::Error::other("compression worker vanished"))??;
        // The last 8 bytes carry the chunk's raw length for progress.
        let len_at = member.len() - 8;
        let mut len = [0u8; 8];
        len.copy_from_slice(&member[len_at..]);
        member.truncate(len_at);
        self.out.write_all(&member)?;
        (self.on_chunk)(u64::from_le_bytes(len));
        Ok(())
    }

    /// Compress what is left and wait for every member. Returns the inner
    /// writer, the sha256 of the uncompressed stream (the OCI `diff_id`) and
    /// its length.
    pub fn finish(mut self) -> io::Result<(W, Digest, u64)> {
        if !self.chunk.is_empty() || self.raw_size == 0 {
            self.dispatch()?;
        }
        while !self.inflight.is_empty() {
            self.drain_one()?;
        }
        self.out.flush()?;
        Ok((
            self.out,
            Digest::from_hasher(self.diff_hasher),
            self.raw_size,
        ))
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = GZIP_CHUNK - self.chunk.len();
        let n = room.min(buf.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == GZIP_CHUNK {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn multi_member_output_decodes_to_the_input_and_is_deterministic() {
        let data: Vec<u8> = (0..(3 * GZIP_CHUNK + 123))
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect();
        let run = || {
            let mut gz = ParallelGzip::new(Vec::new(), Box::new(|_| {}));
            for part in data.chunks(10_000) {
                gz.write_all(part).unwrap();
            }
            gz.finish().unwrap()
        };
        let (a, diff_id, len) = run();
        let (b, _, _) = run();
        assert_eq!(a, b);
        assert_eq!(len, data.len() as u64);
        assert_eq!(diff_id, Digest::of(&data));
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&a[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
