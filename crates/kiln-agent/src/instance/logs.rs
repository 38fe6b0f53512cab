//! Instance logs: stdout and stderr of each instance, appended to
//! `$KILN_HOME/logs/SERVICE/INSTANCE.log`, rotated by size (the previous
//! file becomes `.log.1`), kept after the instance is gone until `kiln gc`
//! (or the agent's automatic collection) removes those of instances gone
//! for longer than the grace period. Every line starts with the time kiln
//! read it (RFC 3339, UTC, milliseconds, then a space): `kiln logs
//! --since` filters on it.

use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// Size at which a log file is rotated.
pub const ROTATE_BYTES: u64 = 8 << 20;

/// A partial line (no newline yet) is written as it is after this long
/// with nothing more from its stream.
pub const PARTIAL_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// A line longer than this is written in pieces of this size.
pub const MAX_LINE: usize = 64 << 10;

pub struct LogFile {
    path: PathBuf,
    /// The file, its size, and whether the next byte starts a line.
    file: Mutex<(File, u64, bool)>,
}

/// `bytes` with `stamp` (and a space) put at the start of every line:
/// the first one when `at_start`, then after each newline that is not the
/// last byte. Returns the stamped bytes and whether the next byte starts
/// a line.
pub fn stamp_lines(bytes: &[u8], stamp: &str, at_start: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(bytes.len() + 32);
    let mut start = at_start;
    for &b in bytes {
        if start {
            out.extend_from_slice(stamp.as_bytes());
            out.push(b' ');
            start = false;
        }
        out.push(b);
        if b == b'\n' {
            start = true;
        }
    }
    (out, start)
}

/// Open `path` for appending, creating it 0600; one made before logs were
/// private is made so.
async fn open_private(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .await?;
    Ok(file)
}

impl LogFile {
    /// Open (or create) the log at `path`, owner-only: an instance's
    /// output may hold anything its app prints.
    pub async fn create(path: PathBuf) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            tokio::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .await?;
        }
        let file = open_private(&path).await?;
        let size = file.metadata().await?.len();
        Ok(Self {
            path,
            file: Mutex::new((file, size, true)),
        })
    }

    /// Append `bytes` (lines of an instance's output, or a partial one),
    /// each line stamped with the time it was read, on a line of its own
    /// even if the file ends in the middle of one (a partial line written
    /// as it was).
    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut guard = self.file.lock().await;
        let lead: &[u8] = if guard.2 { b"" } else { b"\n" };
        let (stamped, next_starts) = stamp_lines(bytes, &stamp, true);
        let bytes = [lead, &stamped].concat();
        if guard.1 + bytes.len() as u64 > ROTATE_BYTES && guard.1 > 0 {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            tokio::fs::rename(&self.path, &old).await?;
            let file = open_private(&self.path).await?;
            *guard = (file, 0, guard.2);
        }
        guard.2 = next_starts;
        guard.0.write_all(&bytes).await?;
        // tokio's File completes writes in the background; flush so what
        // `kiln logs` reads is what the instance wrote.
        guard.0.flush().await?;
        guard.1 += bytes.len() as u64;
        Ok(())
    }

    /// Copy a child's output into the log until it closes, or until
    /// `stop` says so: then between two reads, so that what was read is
    /// written and what was not stays in the pipe (for a successor).
    ///
    /// Whole lines: stdout and stderr go to one file, and an app writes a
    /// line in pieces (Rust's `eprintln!` makes a write per argument), so
    /// each stream's partial line waits here until its newline comes —
    /// else a line of the other stream would be glued into its middle. A
    /// partial line is written as it is after [`PARTIAL_AFTER`] with no
    /// more (a prompt), past [`MAX_LINE`], and when the pump ends.
    pub async fn pump(
        &self,
        mut from: impl AsyncRead + Unpin,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 << 10];
        let mut partial: Vec<u8> = Vec::new();
        loop {
            // Reading is cancel-safe: nothing is lost when `stop` or the
            // partial line's timer wins.
            let read = tokio::select! {
                r = from.read(&mut buf) => Some(r),
                // (The watch's guard is not kept past the select.)
                stopped = stop.wait_for(|s| *s) => {
                    drop(stopped);
                    break;
                }
                () = tokio::time::sleep(PARTIAL_AFTER), if !partial.is_empty() => None,
            };
            let n = match read {
                None => {
                    if self.write(&std::mem::take(&mut partial)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Ok(0) | Err(_)) => break,
                Some(Ok(n)) => n,
            };
            partial.extend_from_slice(&buf[..n]);
            let whole = match partial.iter().rposition(|b| *b == b'\n') {
                Some(end) => end + 1,
                None if partial.len() >= MAX_LINE => partial.len(),
                None => continue,
            };
            let rest = partial.split_off(whole);
            if self.write(&partial).await.is_err() {
                return;
            }
            partial = rest;
        }
        if !partial.is_empty() {
            let _ = self.write(&partial).await;
        }
    }

    /// A line from kiln itself (start, exit) in the instance's log, on a
    /// line of its own.
    pub async fn note(&self, line: &str) {
        let _ = self.write(format!("[kiln] {line}\n").as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logs_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(dir.path().join("a.log")).await.unwrap();
        // Lines of 1 KiB, a little over half the rotation size.
        let lines = (ROTATE_BYTES / 2 / 1024) as usize + 1;
        let mut chunk = Vec::new();
        for _ in 0..lines {
            chunk.extend_from_slice(&[b'x'; 1023]);
            chunk.push(b'\n');
        }
        let (_keep, running) = tokio::sync::watch::channel(false);
        log.pump(&chunk[..], running.clone()).await;
        log.pump(&chunk[..], running).await;
        let old = std::fs::metadata(dir.path().join("a.log.1")).unwrap().len();
        let new = std::fs::metadata(dir.path().join("a.log")).unwrap().len();
        assert!(old <= ROTATE_BYTES && new <= ROTATE_BYTES);
        // Every line once, with its stamp of 25 bytes.
        assert_eq!(
            old + new,
            2 * (chunk.len() + 25 * lines) as u64,
            "nothing lost in rotation"
        );
    }

    /// Issue 22: one stream's line written in pieces (as `eprintln!`
    /// does) had the other stream's line glued into its middle — the
    /// restart test's lost `tick 1`.
    #[tokio::test]
    async fn a_line_written_in_pieces_stays_whole_beside_another_stream() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(LogFile::create(dir.path().join("c.log")).await.unwrap());
        let (_keep, running) = tokio::sync::watch::channel(false);
        let (mut err_tx, err_rx) = tokio::net::unix::pipe::pipe().unwrap();
        let (mut out_tx, out_rx) = tokio::net::unix::pipe::pipe().unwrap();
        let pumps = [err_rx, out_rx].map(|rx| {
            let (log, stop) = (log.clone(), running.clone());
            tokio::spawn(async move { log.pump(rx, stop).await })
        });
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(30));
        err_tx.write_all(b"hello v1 (instance ").await.unwrap();
        settle().await;
        out_tx.write_all(b"tick 1\n").await.unwrap();
        settle().await;
        err_tx.write_all(b"web-1) listening\n").await.unwrap();
        settle().await;
        // A partial line with nothing after it is written in time, whole
        // lines after it on lines of their own.
        err_tx.write_all(b"password: ").await.unwrap();
        tokio::time::sleep(PARTIAL_AFTER * 2).await;
        out_tx.write_all(b"tick 2\n").await.unwrap();
        drop((err_tx, out_tx));
        for p in pumps {
            p.await.unwrap();
        }
        let kept = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
        let lines: Vec<&str> = kept.lines().map(|l| &l[25..]).collect();
        assert_eq!(
            lines,
            [
                "tick 1",
                "hello v1 (instance web-1) listening",
                "password: ",
                "tick 2"
            ],
            "{kept}"
        );
    }

    #[test]
    fn every_line_is_stamped_once_whatever_the_reads_cut() {
        let s = "2026-12-07T01:00:00.000Z";
        assert_eq!(
            stamp_lines(b"a\nb\n", s, true),
            (format!("{s} a\n{s} b\n").into_bytes(), true)
        );
        // A line cut between two reads gets one stamp.
        let (one, starts) = stamp_lines(b"hel", s, true);
        assert!(!starts);
        let (two, starts) = stamp_lines(b"lo\nwor", s, starts);
        assert!(!starts);
        let mut all = one;
        all.extend(two);
        assert_eq!(all, format!("{s} hello\n{s} wor").into_bytes());
        assert_eq!(stamp_lines(b"", s, true), (Vec::new(), true));
        assert_eq!(
            stamp_lines(b"\n\n", s, true),
            (format!("{s} \n{s} \n").into_bytes(), true)
        );
    }

    /// A pump told to stop leaves what it has not read in the pipe, and
    /// writes all it read.
    #[tokio::test]
    async fn a_stopped_pump_leaves_the_rest_in_the_pipe() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(LogFile::create(dir.path().join("b.log")).await.unwrap());
        let (mut tx, rx) = tokio::net::unix::pipe::pipe().unwrap();
        // The supervisor's copy of the read end.
        let held = std::os::fd::AsFd::as_fd(&rx).try_clone_to_owned().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let pump = tokio::spawn({
            let log = log.clone();
            async move { log.pump(rx, stopped).await }
        });
        tx.write_all(b"one\n").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        pump.await.unwrap();
        tx.write_all(b"two\n").await.unwrap();
        let kept = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
        // One line, stamped: `TIME one`.
        assert_eq!(kept.lines().count(), 1, "{kept}");
        assert!(kept.ends_with(" one\n") && kept.len() == 25 + 4, "{kept}");
        // What it did not read is still in the pipe, for the next reader.
        let mut rest = [0u8; 4];
        let mut next = tokio::net::unix::pipe::Receiver::from_owned_fd(held).unwrap();
        tokio::io::AsyncReadExt::read_exact(&mut next, &mut rest)
            .await
            .unwrap();
        assert_eq!(&rest, b"two\n");
    }
}
