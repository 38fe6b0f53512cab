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

    /// Append `bytes` (an instance's output, as it came), each line
    /// stamped with the time it was read.
    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut guard = self.file.lock().await;
        let (bytes, next_starts) = stamp_lines(bytes, &stamp, guard.2);
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
    pub async fn pump(
        &self,
        mut from: impl AsyncRead + Unpin,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            // Reading is cancel-safe: nothing is lost when `stop` wins.
            let read = tokio::select! {
                r = from.read(&mut buf) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if self.write(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// A line from kiln itself (start, exit) in the instance's log, on a
    /// line of its own.
    pub async fn note(&self, line: &str) {
        let starts = self.file.lock().await.2;
        let lead = if starts { "" } else { "\n" };
        let _ = self
            .write(format!("{lead}[kiln] {line}\n").as_bytes())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logs_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(dir.path().join("a.log")).await.unwrap();
        let chunk = vec![b'x'; (ROTATE_BYTES / 2) as usize + 1];
        let (_keep, running) = tokio::sync::watch::channel(false);
        log.pump(&chunk[..], running.clone()).await;
        log.pump(&chunk[..], running).await;
        let old = std::fs::metadata(dir.path().join("a.log.1")).unwrap().len();
        let new = std::fs::metadata(dir.path().join("a.log")).unwrap().len();
        assert!(old <= ROTATE_BYTES && new <= ROTATE_BYTES);
        // One line each (no newline in the chunks): one stamp of 25 bytes.
        assert_eq!(
            old + new,
            2 * chunk.len() as u64 + 25,
            "nothing lost in rotation"
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
