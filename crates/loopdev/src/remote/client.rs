//! The remote loop client, wire-compatible with osbuild's `LoopClient`: an autobound `SOCK_SEQPACKET`
//! socket connected to the server; each request sends the backing file and the node directory as fds
//! 0 and 1 and waits for `{"devname": …}` or an exception.

use super::jsoncomm::{self, Incoming, Limits};
use super::seqpacket;
use super::wire::{Reply, Request};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest reply accepted (an osbuild server's traceback can be long; nothing legitimate is this big).
pub const MAX_REPLY: usize = 16 << 20;

#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    path: PathBuf,
    /// One request at a time: replies carry no id, so a second sender would read the first one's reply.
    busy: Mutex<()>,
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
        Client { sock, path: path.to_path_buf(), busy: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks for a device bound to `file` with its node in `dir`. `req.fd`/`req.dir_fd` are set to 0 and 1
    /// (the order of the fds sent). The reply is returned as is: an exception reply is `Ok`, a transport
    /// or protocol failure is `Err`.
    pub fn request(&self, file: BorrowedFd, dir: BorrowedFd, req: &Request) -> Result<Reply> {
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let req = Request { fd: 0, dir_fd: 1, ..req.clone() };
        if let Err(e) = jsoncomm::send_message(self.sock.as_fd(), &req.encode(), &[file, dir]) {
            // A server that turned us away replies and hangs up, possibly before our request arrived:
            // prefer its explanation to the bare EPIPE.
            if e.is(Errno::EPIPE) || e.is(Errno::ECONNRESET) {
                if let Ok(reply) = self.recv_reply(false) {
                    return Ok(reply);
                }
            }
            return Err(e.with_path(&self.path));
        }
        self.recv_reply(true)
    }

    fn recv_reply(&self, wait: bool) -> Result<Reply> {
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
        let limits = Limits { max_packet: len.min(MAX_REPLY), max_payload: MAX_REPLY, max_fds: 0 };
        match jsoncomm::recv_message(self.sock.as_fd(), &limits).map_err(|e| e.with_path(&self.path))? {
            Incoming::Closed => Err(closed()),
            Incoming::Invalid(w) => Err(err(w.errno, w.message)),
            Incoming::Message(m) => Reply::parse(&m.payload).map_err(|w| err(w.errno, w.message)),
        }
    }

    /// Shuts the socket down: a request blocked waiting for its reply returns ECONNRESET at once.
    pub fn shutdown(&self) -> Result<()> {
        seqpacket::shutdown(self.sock.as_fd())
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
            let limits = crate::remote::server::DEFAULT_LIMITS;
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
        assert_eq!(client.request(file.as_fd(), dir.as_fd(), &req).unwrap(), Reply::Device("loop7".into()));
        let (m, _sock) = server.join().unwrap();
        assert_eq!(m.payload, req.encode());
        assert_eq!(m.fds.len(), 2);
        let st = |fd: BorrowedFd| crate::device::stat_fd(fd).unwrap();
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
        assert_eq!(client.request(f.as_fd(), f.as_fd(), &Request::default()).unwrap(), Reply::Exception(e));
        drop(server.join().unwrap());
        let err = client.request(f.as_fd(), f.as_fd(), &Request::default()).unwrap_err();
        assert!(err.is(Errno::EPIPE) || err.is(Errno::ECONNRESET), "{err}");
    }

    #[test]
    fn a_reply_via_memfd_is_read() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let client = Client::from_socket(a, Path::new("pair"));
        let server = std::thread::spawn(move || {
            let _ = jsoncomm::recv_message(b.as_fd(), &crate::remote::server::DEFAULT_LIMITS).unwrap();
            jsoncomm::send_via_fd(b.as_fd(), br#"{"devname": "loop9"}"#, &[]).unwrap();
            b
        });
        let f = File::open("/dev/null").unwrap();
        assert_eq!(client.request(f.as_fd(), f.as_fd(), &Request::default()).unwrap(), Reply::Device("loop9".into()));
        drop(server.join().unwrap());
    }
}
