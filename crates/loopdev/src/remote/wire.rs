//! The JSON of osbuild's remoteloop protocol: the request a `LoopClient` sends and the two replies a
//! `LoopServer` gives. Encoding is byte-for-byte Python's `json.dumps` with its defaults (separators
//! `", "` and `": "`, `ensure_ascii`, keys in insertion order), so a capture of ours equals one of osbuild's.

use crate::device::ConfigureOptions;
use nix::errno::Errno;
use serde_json::{Map, Value};
use std::fmt;

/// Payload of the packet that says "the JSON is in the memfd that is the first fd" (osbuild PR #1838).
pub const ARGS_VIA_FD: &[u8] = b"<args-via-fd>";

/// osbuild's default sector size when the request has none.
pub const DEFAULT_SECTOR_SIZE: u32 = 512;

/// A request that cannot be served, before any kernel call: the errno says which kind of wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub errno: Errno,
    pub message: String,
}

impl WireError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        WireError { errno, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        WireError::new(Errno::EINVAL, message)
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", crate::error::errno_name(self.errno), self.message)
    }
}

impl std::error::Error for WireError {}

/// `{"fd": 0, "dir_fd": 1, "offset"?, "sizelimit"?, "lock", "partscan", "read_only", "sector_size"}`.
/// `fd` and `dir_fd` index the `SCM_RIGHTS` array of the same message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub fd: usize,
    pub dir_fd: usize,
    /// None (or 0: osbuild tests `if offset:`) = from the start.
    pub offset: Option<u64>,
    /// None (or 0) = up to the end of the file.
    pub sizelimit: Option<u64>,
    pub lock: bool,
    pub partscan: bool,
    pub read_only: bool,
    pub sector_size: u32,
    /// Our extension (osbuild's server ignores it): the reply also carries an open fd of the device, with
    /// the access the binding allows. Root peers only: any fd of a loop device lets its holder rebind it.
    pub want_fd: bool,
}

impl Default for Request {
    /// What osbuild's client sends for `device(filename)`: backing file at index 0, directory at 1.
    fn default() -> Self {
        Request {
            fd: 0,
            dir_fd: 1,
            offset: None,
            sizelimit: None,
            lock: false,
            partscan: false,
            read_only: false,
            sector_size: DEFAULT_SECTOR_SIZE,
            want_fd: false,
        }
    }
}

impl Request {
    /// The exact bytes osbuild's `LoopClient.device()` sends: keys in its order, `offset`/`sizelimit`
    /// only when non-zero.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(r#"{{"fd": {}, "dir_fd": {}"#, self.fd, self.dir_fd);
        if let Some(offset) = self.offset.filter(|&o| o != 0) {
            out.push_str(&format!(r#", "offset": {offset}"#));
        }
        if let Some(limit) = self.sizelimit.filter(|&l| l != 0) {
            out.push_str(&format!(r#", "sizelimit": {limit}"#));
        }
        out.push_str(&format!(
            r#", "lock": {}, "partscan": {}, "read_only": {}, "sector_size": {}"#,
            py_bool(self.lock),
            py_bool(self.partscan),
            py_bool(self.read_only),
            self.sector_size
        ));
        // Only when asked for: without it the bytes are osbuild's own.
        if self.want_fd {
            out.push_str(r#", "want_fd": true"#);
        }
        out.push('}');
        out.into_bytes()
    }

    /// Parses a request with osbuild's defaults (`msg.get("lock", False)` …). Stricter than osbuild where
    /// Python would do something odd: indices are non-negative integers (no `fds[-1]`), flags are booleans
    /// (or null), sizes are non-negative integers. Unknown keys are ignored, as osbuild does.
    pub fn parse(bytes: &[u8]) -> Result<Request, WireError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| WireError::invalid(format!("request is not valid JSON: {e}")))?;
        let map = match value {
            Value::Object(map) => map,
            _ => return Err(WireError::invalid("request must be a JSON object")),
        };
        let index = |key: &str| -> Result<usize, WireError> {
            let v = map.get(key).ok_or_else(|| WireError::invalid(format!("request has no key '{key}'")))?;
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| WireError::invalid(format!("'{key}' must be a non-negative integer index, got {v}")))
        };
        Ok(Request {
            fd: index("fd")?,
            dir_fd: index("dir_fd")?,
            offset: opt_u64(&map, "offset")?,
            sizelimit: opt_u64(&map, "sizelimit")?,
            lock: opt_bool(&map, "lock")?,
            partscan: opt_bool(&map, "partscan")?,
            read_only: opt_bool(&map, "read_only")?,
            sector_size: match opt_u64(&map, "sector_size")? {
                None => DEFAULT_SECTOR_SIZE,
                Some(n) => {
                    u32::try_from(n).map_err(|_| WireError::invalid(format!("'sector_size' {n} is out of range")))?
                }
            },
            want_fd: opt_bool(&map, "want_fd")?,
        })
    }

    /// What osbuild's server passes to `loop_for_fd`: always `autoclear=True`; `lock` is separate.
    pub fn configure_options(&self) -> ConfigureOptions {
        ConfigureOptions {
            offset: self.offset.unwrap_or(0),
            size_limit: self.sizelimit.unwrap_or(0),
            block_size: self.sector_size,
            autoclear: true,
            partscan: self.partscan,
            read_only: self.read_only,
            direct_io: false,
            file_name: None,
        }
    }
}

fn opt_u64(map: &Map<String, Value>, key: &str) -> Result<Option<u64>, WireError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| WireError::invalid(format!("'{key}' must be a non-negative integer, got {v}"))),
    }
}

fn opt_bool(map: &Map<String, Value>, key: &str) -> Result<bool, WireError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(WireError::invalid(format!("'{key}' must be a boolean, got {v}"))),
    }
}

/// osbuild's exception message body (`api.exception()`): Python type name, `str(e)`, traceback text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub kind: String,
    pub value: String,
    pub traceback: String,
}

impl Exception {
    /// `OSError` whose value starts like Python's `str(OSError)`: `[Errno 16] <our message>`, so both
    /// osbuild's client (which only shows it) and ours (which reads the errno back) get what they need.
    pub fn os_error(errno: Errno, message: &str, traceback: impl Into<String>) -> Self {
        Exception {
            kind: "OSError".into(),
            value: format!("[Errno {}] {message}", errno as i32),
            traceback: traceback.into(),
        }
    }

    /// The errno in a `[Errno N] …` value, as Python's OSError and our server write it.
    pub fn errno(&self) -> Option<i32> {
        let rest = self.value.strip_prefix("[Errno ")?;
        let end = rest.find(']')?;
        rest[..end].parse().ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"devname": "loop3"}`: the node was created as `loop3` in the request's directory (`loop3.d/loop3`
    /// for a non-root peer).
    Device(String),
    /// `{"method": "exception", "exception": {"type", "value", "traceback"}}`.
    Exception(Exception),
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        match self {
            Reply::Device(name) => {
                out.push_str(r#"{"devname": "#);
                py_str(&mut out, name);
                out.push('}');
            }
            Reply::Exception(e) => {
                out.push_str(r#"{"method": "exception", "exception": {"type": "#);
                py_str(&mut out, &e.kind);
                out.push_str(r#", "value": "#);
                py_str(&mut out, &e.value);
                out.push_str(r#", "traceback": "#);
                py_str(&mut out, &e.traceback);
                out.push_str("}}");
            }
        }
        out.into_bytes()
    }

    /// Reads a reply from any osbuild version: `devname`, the exception message (v161+), and the
    /// `{"error": "..."}` some ports send. Anything else is a protocol error.
    pub fn parse(bytes: &[u8]) -> Result<Reply, WireError> {
        let bad = |why: &str| WireError::new(Errno::EPROTO, format!("unexpected reply from the loop server: {why}"));
        let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let map = match value {
            Value::Object(map) => map,
            _ => return Err(bad("not a JSON object")),
        };
        if let Some(devname) = map.get("devname") {
            let name = devname.as_str().ok_or_else(|| bad("'devname' is not a string"))?;
            if !is_loop_devname(name) {
                return Err(bad(&format!("'devname' {name:?} is not a loop device name")));
            }
            return Ok(Reply::Device(name.to_string()));
        }
        let text = |v: Option<&Value>| match v {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        if map.get("method").and_then(Value::as_str) == Some("exception") {
            let e = map.get("exception").and_then(Value::as_object).ok_or_else(|| bad("exception without body"))?;
            return Ok(Reply::Exception(Exception {
                kind: text(e.get("type")),
                value: text(e.get("value")),
                traceback: text(e.get("traceback")),
            }));
        }
        if let Some(error) = map.get("error") {
            return Ok(Reply::Exception(Exception {
                kind: "Error".into(),
                value: text(Some(error)),
                traceback: "".into(),
            }));
        }
        Err(bad("neither 'devname' nor an exception"))
    }
}

/// `loop<digits>`, or `loop<digits>.d/loop<digits>` (the same digits: where a non-root peer's node is, see
/// `node::make_for_peer`): the only names a client should ever turn into a path in its directory.
pub fn is_loop_devname(name: &str) -> bool {
    let plain = |name: &str| {
        name.strip_prefix("loop")
            .map_or(false, |n| !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match name.split_once(".d/") {
        Some((holder, node)) => holder == node && plain(node),
        None => plain(name),
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// A JSON string as Python's `json.dumps(ensure_ascii=True)` writes it: everything outside `' '..='~'`
/// escaped, short escapes where JSON has them, `\uXXXX` (lowercase, UTF-16) otherwise.
pub fn py_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_equal_osbuilds() {
        // json.dumps({"fd": 0, "dir_fd": 1, "lock": False, "partscan": False, "read_only": False,
        //             "sector_size": 512})
        assert_eq!(
            String::from_utf8(Request::default().encode()).unwrap(),
            r#"{"fd": 0, "dir_fd": 1, "lock": false, "partscan": false, "read_only": false, "sector_size": 512}"#
        );
        let r = Request {
            offset: Some(1 << 20),
            sizelimit: Some(4096),
            lock: true,
            partscan: true,
            read_only: true,
            sector_size: 4096,
            ..Request::default()
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            concat!(
                r#"{"fd": 0, "dir_fd": 1, "offset": 1048576, "sizelimit": 4096, "lock": true, "#,
                r#""partscan": true, "read_only": true, "sector_size": 4096}"#
            )
        );
        // Zero offset/sizelimit are left out, like osbuild's `if offset:`.
        let zero = Request { offset: Some(0), sizelimit: Some(0), ..Request::default() };
        assert_eq!(zero.encode(), Request::default().encode());
    }

    #[test]
    fn requests_round_trip_and_take_osbuild_defaults() {
        let r = Request { offset: Some(512), lock: true, sector_size: 4096, ..Request::default() };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let minimal = Request::parse(br#"{"dir_fd": 0, "fd": 1, "extra": [1, 2]}"#).unwrap();
        assert_eq!(minimal, Request { fd: 1, dir_fd: 0, ..Request::default() });
        let nulls = Request::parse(br#"{"fd":0,"dir_fd":1,"offset":null,"lock":null,"sector_size":null}"#).unwrap();
        assert_eq!(nulls, Request::default());
        let o = r.configure_options();
        assert!(o.autoclear);
        assert_eq!((o.offset, o.block_size), (512, 4096));
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not valid JSON"),
            (b"{\"fd\": 0, \"dir_fd\"", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
            (b"[0, 1]", "JSON object"),
            (b"null", "JSON object"),
            (br#"{"dir_fd": 1}"#, "no key 'fd'"),
            (br#"{"fd": 0}"#, "no key 'dir_fd'"),
            (br#"{"fd": -1, "dir_fd": 1}"#, "'fd' must be"),
            (br#"{"fd": 0.5, "dir_fd": 1}"#, "'fd' must be"),
            (br#"{"fd": "0", "dir_fd": 1}"#, "'fd' must be"),
            (br#"{"fd": true, "dir_fd": 1}"#, "'fd' must be"),
            (br#"{"fd": 0, "dir_fd": 1, "lock": 1}"#, "'lock' must be a boolean"),
            (br#"{"fd": 0, "dir_fd": 1, "offset": -512}"#, "'offset' must be"),
            (br#"{"fd": 0, "dir_fd": 1, "sizelimit": "1"}"#, "'sizelimit' must be"),
            (br#"{"fd": 0, "dir_fd": 1, "sector_size": 8589934592}"#, "out of range"),
        ];
        for (bytes, why) in cases {
            let e = Request::parse(bytes).unwrap_err();
            assert_eq!(e.errno, Errno::EINVAL);
            assert!(e.message.contains(why), "{:?}: {} lacks {why:?}", String::from_utf8_lossy(bytes), e.message);
        }
    }

    #[test]
    fn replies_look_like_osbuilds() {
        assert_eq!(Reply::Device("loop3".into()).encode(), br#"{"devname": "loop3"}"#);
        let e = Exception::os_error(Errno::EBUSY, "EBUSY: device or resource busy, ioctl LOOP_CONFIGURE", "tb\n");
        assert_eq!(
            String::from_utf8(Reply::Exception(e.clone()).encode()).unwrap(),
            concat!(
                r#"{"method": "exception", "exception": {"type": "OSError", "value": "[Errno 16] EBUSY: device or "#,
                r#"resource busy, ioctl LOOP_CONFIGURE", "traceback": "tb\n"}}"#
            )
        );
        assert_eq!(e.errno(), Some(16));
        assert_eq!(Reply::parse(&Reply::Exception(e.clone()).encode()).unwrap(), Reply::Exception(e));
        assert_eq!(Reply::parse(br#"{"devname": "loop12"}"#).unwrap(), Reply::Device("loop12".into()));
    }

    #[test]
    fn replies_from_other_servers_and_garbage() {
        let go = Reply::parse(br#"{"error": "no loop device"}"#).unwrap();
        assert!(matches!(go, Reply::Exception(Exception { ref value, .. }) if value == "no loop device"));
        for bad in [&br#"{"devname": "../etc/passwd"}"#[..], br#"{"devname": 3}"#, b"[]", b"{}", b"nope"] {
            assert_eq!(Reply::parse(bad).unwrap_err().errno, Errno::EPROTO, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn strings_are_escaped_like_python() {
        // json.dumps("a\"b\\c\n\x01\x7fé😀") == '"a\\"b\\\\c\\n\\u0001\\u007f\\u00e9\\ud83d\\ude00"'
        let mut out = String::new();
        py_str(&mut out, "a\"b\\c\n\u{1}\u{7f}é😀");
        assert_eq!(out, r#""a\"b\\c\n\u0001\u007f\u00e9\ud83d\ude00""#);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{1}\u{7f}é😀");
    }

    #[test]
    fn devnames_are_checked() {
        assert!(is_loop_devname("loop0") && is_loop_devname("loop123") && is_loop_devname("loop7.d/loop7"));
        for bad in [
            "loop",
            "loop-1",
            "loop1/..",
            "sda",
            "loop1p1",
            "",
            "loop7.d/loop8",
            "loop7.d/",
            ".d/loop7",
            "loop7.d/loop7.d/loop7",
            "../loop7.d/loop7",
            "loop7.d/../loop7",
        ] {
            assert!(!is_loop_devname(bad), "{bad}");
        }
    }
}
