//! The remote loop client, wire-compatible with osbuild's `LoopClient`: an autobound `SOCK_SEQPACKET`
//! socket connected to the server; each request sends the backing file and the node directory as fds
//! 0 and 1 and waits for `{"devname": …}` or an exception.
//!
//! A request can be given up (a deadline, or `cancel()` from another thread) while the server still works
//! on it. Replies carry no id but come in order, so the client remembers each abandoned request and
//! discards the first reply that arrives for it, removing the node the server made for that device (the
//! device itself stays with the connection, which the server releases when it closes).

use super::jsoncomm::{self, Incoming, Limits};
use super::seqpacket;
use super::wire::{Reply, Request};
use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::collections::VecDeque;
use std::os::unix::io::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest reply accepted (an osbuild server's traceback can be long; nothing legitimate is this big).
pub const MAX_REPLY: usize = 16 << 20;

/// What a request sends as its backing file or node directory: an fd the caller has, or a path opened
/// (O_CLOEXEC) where the request is made, so that the caller makes no trip of its own to open and close it.
#[derive(Debug)]
pub enum Sent {
    Fd(OwnedFd),
    /// The backing file: opened read-only if the flag says so, else read-write.
    File(PathBuf, bool),
    Dir(PathBuf),
}

impl Sent {
    pub fn open(self) -> Result<OwnedFd> {
        let (path, flags) = match self {
            Sent::Fd(fd) => return Ok(fd),
            Sent::File(path, true) => (path, OFlag::O_RDONLY),
            Sent::File(path, false) => (path, OFlag::O_RDWR),
            Sent::Dir(path) => (path, OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        };
        let raw = nix::fcntl::open(&path, flags | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map_err(|e| Error::os(e, "open").with_path(&path))?;
        // SAFETY: open just returned this fd and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    path: PathBuf,
    /// One request at a time: replies carry no id, so a second sender would read the first one's reply.
    /// Holds the directories of requests given up on, oldest first: their replies are still to come.
    abandoned: Mutex<VecDeque<OwnedFd>>,
    /// The eventfd the request in progress also waits on; `cancel` signals it.
    current: Mutex<Option<Arc<OwnedFd>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// socket → bind("") (autobind, like osbuild) → connect(path).
    pub fn connect(path: &Path) -> Result<Client> {
        let sock = seqpacket::socket(false)?;
        seqpacket::bind_auto(sock.as_fd())?;
        seqpacket::connect(sock.as_fd(), path)?;
        Ok(Client::from_socket(sock, path))
    }

    /// A client over an already connected socket (e.g. one end of `seqpacket::socketpair`); `path` is only
    /// used in error messages.
    pub fn from_socket(sock: OwnedFd, path: &Path) -> Client {
        Client { sock, path: path.to_path_buf(), abandoned: Mutex::new(VecDeque::new()), current: Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks for a device bound to `file` with its node in `dir`, and waits for the reply: an exception reply
    /// is `Ok`, a transport or protocol failure is `Err`. With `req.want_fd`, a server that supports it
    /// also sends an open fd of the device, returned with the reply. `req.fd`/`req.dir_fd` are set to 0 and 1. Gives up
    /// with ETIMEDOUT after `timeout`, or ECANCELED when `cancel` is called meanwhile; the late reply is
    /// then discarded by a later request (and its node removed from `dir`).
    pub fn request(
        &self,
        file: BorrowedFd,
        dir: OwnedFd,
        req: &Request,
        timeout: Option<Duration>,
    ) -> Result<(Reply, Option<OwnedFd>)> {
        let mut abandoned = lock(&self.abandoned);
        let deadline = timeout.map(|t| Instant::now() + t);
        let cancel = Arc::new(seqpacket::eventfd()?);
        *lock(&self.current) = Some(Arc::clone(&cancel));
        let result = self.exchange(&mut abandoned, file, dir, req, deadline, cancel.as_fd());
        *lock(&self.current) = None;
        result
    }

    /// Gives up the request in progress, if any (from another thread).
    pub fn cancel(&self) {
        if let Some(cancel) = lock(&self.current).as_ref() {
            let _ = seqpacket::eventfd_signal(cancel.as_fd());
        }
    }

    fn exchange(
        &self,
        abandoned: &mut VecDeque<OwnedFd>,
        file: BorrowedFd,
        dir: OwnedFd,
        req: &Request,
        deadline: Option<Instant>,
        cancel: BorrowedFd,
    ) -> Result<(Reply, Option<OwnedFd>)> {
        let req = Request { fd: 0, dir_fd: 1, ..req.clone() };
        if let Err(e) = jsoncomm::send_message(self.sock.as_fd(), &req.encode(), &[file, dir.as_fd()]) {
            // A server that turned us away replies and hangs up, possibly before our request arrived:
            // prefer its explanation to the bare EPIPE.
            if e.is(Errno::EPIPE) || e.is(Errno::ECONNRESET) {
                if let Ok(answer) = self.recv_reply(false) {
                    return Ok(answer);
                }
            }
            return Err(e.with_path(&self.path));
        }
        loop {
            if let Err(e) = self.wait_readable(deadline, cancel) {
                abandoned.push_back(dir);
                return Err(e);
            }
            let (reply, fd) = self.recv_reply(true)?;
            match abandoned.pop_front() {
                None => return Ok((reply, fd)),
                Some(old_dir) => discard(reply, old_dir.as_fd()), // and its fd closes
            }
        }
    }

    /// Until the socket has a reply (or hung up): ETIMEDOUT at the deadline, ECANCELED on `cancel`.
    fn wait_readable(&self, deadline: Option<Instant>, cancel: BorrowedFd) -> Result<()> {
        loop {
            let timeout = match deadline {
                None => -1,
                Some(t) => match t.checked_duration_since(Instant::now()) {
                    None => 0,
                    Some(left) => left.as_millis().min(i32::MAX as u128) as i32 + 1,
                },
            };
            let mut pfds =
                [seqpacket::pollfd(self.sock.as_fd(), libc::POLLIN), seqpacket::pollfd(cancel, libc::POLLIN)];
            match seqpacket::poll(&mut pfds, timeout) {
                Err(e) if e.is(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            if pfds[0].revents != 0 {
                return Ok(());
            }
            let gave_up = |errno, why: &str| Error::os(errno, "recvmsg").with_path(&self.path).with_detail(why);
            if pfds[1].revents != 0 {
                return Err(gave_up(Errno::ECANCELED, "the request was cancelled before the loop server replied"));
            }
            if deadline.map_or(false, |t| Instant::now() >= t) {
                return Err(gave_up(Errno::ETIMEDOUT, "the loop server did not reply in time"));
            }
        }
    }

    fn recv_reply(&self, wait: bool) -> Result<(Reply, Option<OwnedFd>)> {
        let err = |e: Errno, detail: String| Error::os(e, "recvmsg").with_path(&self.path).with_detail(detail);
        let len = loop {
            match seqpacket::peek_len(self.sock.as_fd(), wait) {
                Err(e) if e.is(Errno::EINTR) => continue,
                other => break other.map_err(|e| e.with_path(&self.path))?,
            }
        };
        let closed = || err(Errno::ECONNRESET, "the loop server closed the connection without replying".into());
        if len == 0 {
            return Err(closed());
        }
        let limits = Limits { max_packet: len.min(MAX_REPLY), max_payload: MAX_REPLY, max_fds: 1 };
        match jsoncomm::recv_message(self.sock.as_fd(), &limits).map_err(|e| e.with_path(&self.path))? {
            Incoming::Closed(_) => Err(closed()),
            Incoming::Invalid(w, _) => Err(err(w.errno, w.message)),
            Incoming::Message(m) => {
                let reply = Reply::parse(&m.payload).map_err(|w| err(w.errno, w.message))?;
                Ok((reply, m.fds.into_iter().next()))
            }
        }
    }

    /// Shuts the socket down: a request blocked waiting for its reply returns ECONNRESET at once.
    pub fn shutdown(&self) -> Result<()> {
        seqpacket::shutdown(self.sock.as_fd())
    }
}

/// The late reply to a request given up on: no one will use its device, so its node goes (the device is
/// the connection's until it closes). Only our node is removed: see `remove_node`.
fn discard(reply: Reply, dir: BorrowedFd) {
    if let Reply::Device(name) = reply {
        let _ = crate::node::remove_node(dir, &name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::jsoncomm::Message;
    use crate::remote::wire::Exception;
    use std::fs::File;

    /// A fake server on the other end of a socketpair: receives one message, answers with `reply`.
    fn serve_once(sock: OwnedFd, reply: Vec<u8>) -> std::thread::JoinHandle<(Message, OwnedFd)> {
        std::thread::spawn(move || {
            let limits = crate::remote::DEFAULT_LIMITS;
            let m = match jsoncomm::recv_message(sock.as_fd(), &limits).unwrap() {
                Incoming::Message(m) => m,
                other => panic!("no message: {other:?}"),
            };
            seqpacket::send(sock.as_fd(), &reply, &[]).unwrap();
            (m, sock)
        })
    }

    #[test]
    fn a_request_round_trips_over_a_socketpair() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let client = Client::from_socket(a, Path::new("pair"));
        let server = serve_once(b, br#"{"devname": "loop7"}"#.to_vec());
        let file = File::open("/dev/null").unwrap();
        let dir = File::open("/").unwrap();
        let req = Request { offset: Some(4096), read_only: true, ..Request::default() };
        let sent = dir.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(client.request(file.as_fd(), sent, &req, None).unwrap().0, Reply::Device("loop7".into()));
        let (m, _sock) = server.join().unwrap();
        assert_eq!(m.payload, req.encode());
        assert_eq!(m.fds.len(), 2);
        let st = |fd: BorrowedFd| crate::inode::stat_fd(fd).unwrap();
        assert_eq!(st(m.fds[0].as_fd()).st_rdev, st(file.as_fd()).st_rdev, "fd 0 is the backing file");
        assert_eq!(st(m.fds[1].as_fd()).st_ino, st(dir.as_fd()).st_ino, "fd 1 is the directory");
    }

    #[test]
    fn exceptions_and_hangups_are_told_apart() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let client = Client::from_socket(a, Path::new("pair"));
        let e = Exception::os_error(Errno::ENOSPC, "ENOSPC: no space", "tb");
        let server = serve_once(b, Reply::Exception(e.clone()).encode());
        let f = File::open("/dev/null").unwrap();
        let own = || f.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(client.request(f.as_fd(), own(), &Request::default(), None).unwrap().0, Reply::Exception(e));
        drop(server.join().unwrap());
        let err = client.request(f.as_fd(), own(), &Request::default(), None).unwrap_err();
        assert!(err.is(Errno::EPIPE) || err.is(Errno::ECONNRESET), "{err}");
    }

    #[test]
    fn a_reply_via_memfd_is_read() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let client = Client::from_socket(a, Path::new("pair"));
        let server = std::thread::spawn(move || {
            let _ = jsoncomm::recv_message(b.as_fd(), &crate::remote::DEFAULT_LIMITS).unwrap();
            jsoncomm::send_via_fd(b.as_fd(), br#"{"devname": "loop9"}"#, &[]).unwrap();
            b
        });
        let f = File::open("/dev/null").unwrap();
        let own = f.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(client.request(f.as_fd(), own, &Request::default(), None).unwrap().0, Reply::Device("loop9".into()));
        drop(server.join().unwrap());
    }

    #[test]
    fn a_request_given_up_on_has_its_late_reply_discarded() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let client = Client::from_socket(a, Path::new("pair"));
        let f = File::open("/dev/null").unwrap();
        let own = || f.as_fd().try_clone_to_owned().unwrap();
        // No reply yet: the first request times out, the second is cancelled from another thread.
        let e = client.request(f.as_fd(), own(), &Request::default(), Some(Duration::from_millis(20))).unwrap_err();
        assert!(e.is(Errno::ETIMEDOUT), "{e}");
        let client = Arc::new(client);
        let canceller = {
            let client = Arc::clone(&client);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                client.cancel();
            })
        };
        let e = client.request(f.as_fd(), own(), &Request::default(), None).unwrap_err();
        assert!(e.is(Errno::ECANCELED), "{e}");
        canceller.join().unwrap();
        // The server answers all three in order; the third request gets the third reply.
        let limits = crate::remote::DEFAULT_LIMITS;
        let server = std::thread::spawn(move || {
            for name in ["loop1", "loop2", "loop3"] {
                let _ = jsoncomm::recv_message(b.as_fd(), &limits).unwrap();
                seqpacket::send(b.as_fd(), format!(r#"{{"devname": "{name}"}}"#).as_bytes(), &[]).unwrap();
            }
            b
        });
        assert_eq!(
            client.request(f.as_fd(), own(), &Request::default(), None).unwrap().0,
            Reply::Device("loop3".into())
        );
        drop(server.join().unwrap());
    }
}
