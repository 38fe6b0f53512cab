//! The descriptors that must outlive an agent process, and how they travel
//! between the agent and its supervisor (`kiln serve`).
//!
//! The agent opens its listening sockets (the API socket, each service's
//! listener) and each instance's output pipes itself, and sends a copy of
//! each to the supervisor over a datagram socket pair (`SCM_RIGHTS`), under
//! a name: `api`, `listen:service:web`, `log:INSTANCE`. The supervisor
//! only holds them. When an agent dies or is replaced, the next one is
//! started with every held descriptor: clients meanwhile wait in the
//! kernel's accept queues (a socket someone holds is never refused), and
//! instances keep writing into pipes whose buffers someone holds (never a
//! `SIGPIPE`, never a lost line).
//!
//! Messages are one datagram each: a JSON [`Note`] and up to [`MAX_FDS`]
//! descriptors.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};

/// Set (to `0`) when the agent's standard input is its end of the pair.
pub const KEEPER_FD: &str = "KILN_KEEPER_FD";

/// Descriptors one message carries at most (a listener has one socket per
/// router thread).
pub const MAX_FDS: usize = 64;

/// What travels between an agent and its supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "kebab-case")]
pub enum Note {
    /// Agent → supervisor: hold these (replacing what `name` held).
    Keep { name: String },
    /// Agent → supervisor: `name` is closed for good.
    Forget { name: String },
    /// Agent → supervisor: the agent process runs (a successor: its
    /// predecessor may hand over now).
    Started {},
    /// Agent → supervisor: the agent serves.
    Serving {},
    /// Supervisor → agent, at its start: what is held under `name`.
    Held { name: String },
    /// Supervisor → agent: that was all.
    HeldEnd {},
}

/// Send `note` with `fds`.
pub fn send(sock: &UnixDatagram, note: &Note, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let body = serde_json::to_vec(note).map_err(std::io::Error::other)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS
        || (!fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)))
    {
        return Err(std::io::Error::other(format!(
            "{} descriptors in one message (at most {MAX_FDS})",
            fds.len()
        )));
    }
    sendmsg(
        sock,
        &[IoSlice::new(&body)],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receive one note and its descriptors (close-on-exec).
pub fn recv(sock: &UnixDatagram) -> std::io::Result<(Note, Vec<OwnedFd>)> {
    let mut body = vec![0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut body)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if got.bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let note = serde_json::from_slice(&body[..got.bytes]).map_err(std::io::Error::other)?;
    Ok((note, fds))
}

/// The agent's side: what it inherited, and where it sends what it opens.
/// Without a supervisor (tests, or an agent run by hand) it keeps nothing.
#[derive(Default)]
pub struct Keeper {
    link: Option<UnixDatagram>,
    inherited: Mutex<HashMap<String, Vec<OwnedFd>>>,
}

impl Keeper {
    /// No supervisor: nothing is inherited, nothing kept.
    pub fn none() -> Self {
        Self::default()
    }

    /// Connect to the supervisor, when [`KEEPER_FD`] says it started this
    /// process with the link as its standard input, and take what it holds.
    pub fn from_env() -> std::io::Result<Self> {
        if std::env::var_os(KEEPER_FD).is_none() {
            return Ok(Self::none());
        }
        // The link is this process's stdin (inherited without any unsafe
        // descriptor juggling); a close-on-exec copy is what we use, and
        // instances get /dev/null as their stdin.
        let owned = std::io::stdin().as_fd().try_clone_to_owned()?;
        let link = UnixDatagram::from(owned);
        let mut inherited = HashMap::new();
        loop {
            match recv(&link)? {
                (Note::Held { name }, fds) => {
                    inherited.insert(name, fds);
                }
                (Note::HeldEnd {}, _) => break,
                (other, _) => {
                    return Err(std::io::Error::other(format!(
                        "unexpected note from the supervisor: {other:?}"
                    )));
                }
            }
        }
        let keeper = Self {
            link: Some(link),
            inherited: Mutex::new(inherited),
        };
        keeper.note(&Note::Started {}, &[]);
        Ok(keeper)
    }

    /// Whether a supervisor holds what this agent opens.
    pub fn supervised(&self) -> bool {
        self.link.is_some()
    }

    /// Take what the previous agent left under `name`.
    pub fn take(&self, name: &str) -> Option<Vec<OwnedFd>> {
        self.lock().remove(name)
    }

    /// The names inherited and not taken yet.
    pub fn left(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<OwnedFd>>> {
        self.inherited.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Have the supervisor hold `fds` under `name`.
    pub fn keep(&self, name: &str, fds: &[BorrowedFd<'_>]) {
        self.note(
            &Note::Keep {
                name: name.to_owned(),
            },
            fds,
        );
    }

    /// `name` is closed for good.
    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
        self.note(
            &Note::Forget {
                name: name.to_owned(),
            },
            &[],
        );
    }

    /// The agent serves.
    pub fn serving(&self) {
        self.note(&Note::Serving {}, &[]);
    }

    fn note(&self, note: &Note, fds: &[BorrowedFd<'_>]) {
        if let Some(link) = &self.link
            && let Err(e) = send(link, note, fds)
        {
            // The supervisor is gone (it stops this agent too): nothing
            // more to keep.
            tracing::warn!("cannot reach the supervisor ({note:?}): {e}");
        }
    }
}

/// The descriptors of `fds`, borrowed.
pub fn borrowed(fds: &[impl AsFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn notes_carry_descriptors_that_still_work() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let (mut near, far) = UnixStream::pair().unwrap();
        let far: OwnedFd = far.into();
        send(
            &a,
            &Note::Keep {
                name: "log:x".into(),
            },
            &[far.as_fd()],
        )
        .unwrap();
        drop(far);
        let (note, mut fds) = recv(&b).unwrap();
        assert_eq!(
            note,
            Note::Keep {
                name: "log:x".into()
            }
        );
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same socket: bytes written to it
        // arrive at the other end.
        let mut got = UnixStream::from(fds.remove(0));
        got.write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        near.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here");
        let flags = rustix::io::fcntl_getfd(&got).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn too_many_descriptors_are_refused_whole() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let socks: Vec<OwnedFd> = (0..MAX_FDS + 1)
            .map(|_| UnixDatagram::unbound().unwrap().into())
            .collect();
        let err = send(&a, &Note::Keep { name: "x".into() }, &borrowed(&socks)).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn without_a_supervisor_nothing_is_kept_or_inherited() {
        let k = Keeper::none();
        assert!(!k.supervised());
        assert!(k.take("api").is_none());
        k.keep("api", &[]);
        k.forget("api");
    }
}
