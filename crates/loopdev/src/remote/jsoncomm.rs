//! osbuild's jsoncomm framing over `SOCK_SEQPACKET`: one JSON document per packet with its fds in
//! `SCM_RIGHTS`, or, when the JSON is too big for a packet, the 13-byte packet `<args-via-fd>` whose first
//! fd is a memfd holding the JSON (the real fds follow it; JSON indices do not count the memfd).

use super::seqpacket::{self, Packet};
use super::wire::{WireError, ARGS_VIA_FD};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};

/// osbuild names its payload memfd this way.
const PAYLOAD_NAME: &[u8] = b"jsoncomm/payload\0";

/// What a receiver accepts. Anything beyond is refused (and every fd that came with it closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet payload read directly.
    pub max_packet: usize,
    /// Largest JSON read from an `<args-via-fd>` memfd.
    pub max_payload: usize,
    /// Most fds a message may carry, not counting the memfd.
    pub max_fds: usize,
}

#[derive(Debug)]
pub struct Message {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Arrived through the `<args-via-fd>` memfd.
    pub via_fd: bool,
}

#[derive(Debug)]
pub enum Incoming {
    /// End of stream (an empty packet means the same, as in osbuild), and the fds an empty packet carried:
    /// for the caller to close where it may block, like `Invalid`'s. Dropped here, on the server's poll
    /// thread, a locked pipe end sent in an empty packet stopped the whole server.
    Closed(Vec<OwnedFd>),
    Message(Message),
    /// A packet that broke the framing or the limits, and the fds it carried: closing a peer's fd can block
    /// (a socket with SO_LINGER), so the caller decides where they are closed.
    Invalid(WireError, Vec<OwnedFd>),
}

pub use super::seqpacket::SCM_MAX_FD;

/// Sends `payload` with `fds`: in one packet when it fits, else through a memfd like osbuild (chosen up
/// front above `wmem_max`, or after the kernel said EMSGSIZE).
pub fn send_message(sock: BorrowedFd, payload: &[u8], fds: &[BorrowedFd]) -> Result<()> {
    if payload.len() > seqpacket::wmem_max() {
        return send_via_fd(sock, payload, fds);
    }
    match seqpacket::send(sock, payload, fds) {
        Ok(n) if n == payload.len() => Ok(()),
        Ok(n) => Err(Error::os(Errno::EMSGSIZE, "sendmsg").with_detail(format!("sent {n} of {} bytes", payload.len()))),
        Err(e) if e.is(Errno::EMSGSIZE) => send_via_fd(sock, payload, fds),
        Err(e) => Err(e),
    }
}

/// The `<args-via-fd>` form: a memfd named `jsoncomm/payload` at offset 0 as the first fd.
pub fn send_via_fd(sock: BorrowedFd, payload: &[u8], fds: &[BorrowedFd]) -> Result<()> {
    let memfd = File::from(seqpacket::memfd(PAYLOAD_NAME)?);
    memfd.write_all_at(payload, 0).map_err(|e| io_error(e, "write"))?;
    let mut all = vec![memfd.as_fd()];
    all.extend_from_slice(fds);
    seqpacket::send(sock, ARGS_VIA_FD, &all).map(drop)
}

/// Receives one message within `limits`. `Err` is a socket error (EAGAIN on a non-blocking socket, a
/// reset peer); a packet we refuse is `Ok(Incoming::Invalid)` so the caller can answer it.
pub fn recv_message(sock: BorrowedFd, limits: &Limits) -> Result<Incoming> {
    let mut buf = vec![0u8; limits.max_packet];
    // Room for every fd a packet can carry: fds the kernel could not deliver it closes itself, on this thread.
    let Packet { len, mut fds, truncated, fds_truncated } = seqpacket::recv(sock, &mut buf, SCM_MAX_FD)?;
    if len == 0 && !truncated {
        return Ok(Incoming::Closed(fds));
    }
    let too_many =
        WireError::new(Errno::E2BIG, format!("too many file descriptors in one message (at most {})", limits.max_fds));
    if fds_truncated || fds.len() > limits.max_fds + 1 {
        return Ok(Incoming::Invalid(too_many, fds));
    }
    if truncated {
        let why = format!("message larger than {} bytes (use <args-via-fd>)", limits.max_packet);
        return Ok(Incoming::Invalid(WireError::new(Errno::EMSGSIZE, why), fds));
    }
    if &buf[..len] != ARGS_VIA_FD {
        if fds.len() > limits.max_fds {
            return Ok(Incoming::Invalid(too_many, fds));
        }
        buf.truncate(len);
        return Ok(Incoming::Message(Message { payload: buf, fds, via_fd: false }));
    }
    if fds.is_empty() {
        return Ok(Incoming::Invalid(WireError::invalid("<args-via-fd> without a payload file descriptor"), fds));
    }
    match read_payload(fds[0].as_fd(), limits.max_payload) {
        Ok(payload) => {
            fds.remove(0); // a memfd: closing it cannot block
            Ok(Incoming::Message(Message { payload, fds, via_fd: true }))
        }
        Err(e) => Ok(Incoming::Invalid(e, fds)),
    }
}

/// The JSON in an `<args-via-fd>` memfd, from offset 0 to EOF. Only shmem files (memfd, tmpfs) are read:
/// they cannot block, while a FUSE or FIFO fd could stall the reader forever.
fn read_payload(fd: BorrowedFd, max: usize) -> std::result::Result<Vec<u8>, WireError> {
    let not_memfd = || WireError::invalid("<args-via-fd> payload is not a memfd");
    // Seals first: F_GET_SEALS asks no filesystem, where fstat of a FUSE file would ask its daemon.
    if seqpacket::seals(fd).is_err() {
        return Err(not_memfd());
    }
    let st = crate::inode::stat_fd(fd).map_err(|e| WireError::new(e.errno, e.to_string()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(not_memfd());
    }
    let too_big = || WireError::new(Errno::EMSGSIZE, format!("<args-via-fd> payload larger than {max} bytes"));
    if usize::try_from(st.st_size).map_or(true, |n| n > max) {
        return Err(too_big());
    }
    let file = File::from(fd.try_clone_to_owned().map_err(|e| WireError::new(io_errno(&e), "dup failed"))?);
    let mut payload = vec![0u8; max + 1];
    let mut len = 0;
    while len < payload.len() {
        match file.read_at(&mut payload[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::new(io_errno(&e), format!("cannot read <args-via-fd> payload: {e}"))),
        }
    }
    if len > max {
        return Err(too_big());
    }
    payload.truncate(len);
    Ok(payload)
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn io_error(e: std::io::Error, syscall: &'static str) -> Error {
    Error::os(io_errno(&e), syscall)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_packet: 1024, max_payload: 4096, max_fds: 2 };

    fn message(i: Incoming) -> Message {
        match i {
            Incoming::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn invalid(i: Incoming) -> WireError {
        match i {
            Incoming::Invalid(e, _) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_and_memfd_messages_arrive_alike() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let f = File::open("/dev/null").unwrap();
        send_message(a.as_fd(), b"{\"x\": 1}", &[f.as_fd()]).unwrap();
        let m = message(recv_message(b.as_fd(), &LIMITS).unwrap());
        assert_eq!((m.payload.as_slice(), m.fds.len(), m.via_fd), (&b"{\"x\": 1}"[..], 1, false));

        let big = vec![b' '; 3000]; // bigger than max_packet, within max_payload
        send_via_fd(a.as_fd(), &big, &[f.as_fd(), f.as_fd()]).unwrap();
        let m = message(recv_message(b.as_fd(), &LIMITS).unwrap());
        assert_eq!((m.payload.len(), m.fds.len(), m.via_fd), (3000, 2, true));
    }

    #[test]
    fn limits_are_enforced() {
        let (a, b) = seqpacket::socketpair().unwrap();
        let f = File::open("/dev/null").unwrap();
        seqpacket::send(a.as_fd(), &[b'{'; 2000], &[]).unwrap();
        assert_eq!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).errno, Errno::EMSGSIZE);

        seqpacket::send(a.as_fd(), b"{}", &[f.as_fd(); 3]).unwrap();
        assert_eq!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).errno, Errno::E2BIG);
        seqpacket::send(a.as_fd(), b"{}", &[f.as_fd(); 40]).unwrap();
        assert_eq!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).errno, Errno::E2BIG);

        send_via_fd(a.as_fd(), &vec![b' '; 5000], &[]).unwrap();
        assert_eq!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).errno, Errno::EMSGSIZE);

        seqpacket::send(a.as_fd(), ARGS_VIA_FD, &[]).unwrap();
        assert_eq!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).errno, Errno::EINVAL);
        // /dev/null is not a memfd: never read from it.
        seqpacket::send(a.as_fd(), ARGS_VIA_FD, &[f.as_fd()]).unwrap();
        assert!(invalid(recv_message(b.as_fd(), &LIMITS).unwrap()).message.contains("not a memfd"));

        let null = std::fs::File::open("/dev/null").unwrap();
        seqpacket::send(a.as_fd(), b"", &[null.as_fd()]).unwrap();
        match recv_message(b.as_fd(), &LIMITS).unwrap() {
            Incoming::Closed(fds) => assert_eq!(fds.len(), 1, "an empty packet's fds are the caller's to close"),
            other => panic!("{other:?}"),
        }
        drop(a);
        assert!(matches!(recv_message(b.as_fd(), &LIMITS).unwrap(), Incoming::Closed(fds) if fds.is_empty()));
    }
}
