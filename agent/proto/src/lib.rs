//! The banger guest agent protocol, in one place for both sides.
//!
//! Transport: any byte stream (AF_VSOCK, a virtio-serial port, a unix
//! socket in tests). Framing: [`codec::FrameCodec`], a 4-byte big-endian
//! length and a JSON payload of at most [`codec::MAX_FRAME_LEN`] bytes.
//! Every request carries the protocol version and an id; the reply
//! carries the same id, so several requests may be in flight on one
//! stream (a `WaitPort` does not hold up a `Health`).
//!
//! Versioning: [`PROTOCOL_VERSION`] grows only when a change is not
//! additive. New request kinds and new reply fields are additive: an
//! older agent answers an unknown request with
//! [`ErrorKind::UnknownRequest`], and unknown reply fields are ignored.

#[cfg(feature = "client")]
pub mod client;
pub mod codec;
pub mod stream;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The AF_VSOCK port the agent listens on in the guest.
pub const VSOCK_PORT: u32 = 1024;

/// The name of the virtio-serial port the agent uses when vsock is
/// unavailable (`/sys/class/virtio-ports/*/name` in the guest).
pub const SERIAL_PORT_NAME: &str = "org.banger.agent";

/// A request as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// The sender's [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Chosen by the sender, echoed in the reply.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub request: Request,
}

/// What the host can ask of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent alive: uptime, boot id, version.
    Health,
    /// Facts about the guest: kernel, OS, memory, disk use.
    Info,
    /// Answer once something listens on TCP `port` in the guest, or fail
    /// with [`ErrorKind::Timeout`] after `timeout_ms`.
    WaitPort {
        /// The guest TCP port.
        port: u16,
        /// How long to wait at most.
        timeout_ms: u64,
    },
    /// Shut the guest down cleanly (or reboot it). The reply comes first.
    Shutdown {
        /// Reboot instead of powering off.
        #[serde(default)]
        reboot: bool,
    },
    /// Set the guest's wall clock to the host's.
    SyncTime {
        /// The host's realtime clock in nanoseconds since the Unix epoch.
        unix_ns: i64,
    },
    /// Run a command; the request's id becomes the id of its stream
    /// ([`stream`]). Answered with [`Response::ExecStarted`] once it
    /// runs; its output follows as stream frames and its end as an exit
    /// frame.
    Exec(ExecSpec),
    /// Send `signal` to the process group of stream `stream`.
    Signal {
        /// The stream (the id of its `Exec`).
        stream: u64,
        /// The signal number.
        signal: i32,
    },
    /// Connect to TCP `port` on the guest's loopback address; the
    /// request's id becomes the id of a stream ([`stream`]) whose stdin
    /// goes to the connection and whose stdout comes from it. Answered
    /// with [`Response::Connected`]; the exit frame (code 0) follows the
    /// connection's end.
    Connect {
        /// The guest TCP port.
        port: u16,
    },
    /// Resize the terminal of stream `stream`.
    Resize {
        /// The stream (the id of its `Exec`).
        stream: u64,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Mount the virtio-fs share `tag` at `target` (made, with its
    /// parents, when missing), read-only when asked. Answered with
    /// [`Response::Mounted`].
    Mount {
        /// The share's virtio-fs tag (what the VMM calls it).
        tag: String,
        /// The absolute path of the mount point in the guest.
        target: String,
        /// Mount it read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Make a guest that was restored from another guest's memory (a
    /// template's, or a forked VM's) a VM of its own. Answered with
    /// [`Response::Renewed`].
    Renew(Box<Identity>),
}

/// Who a restored guest now is ([`Request::Renew`]). The agent renews,
/// in order: the kernel's random pool (`seed` added and a reseed
/// forced, so nothing after shares the old guest's randomness), the
/// clock, the hostname, the machine and VM ids, the NIC (MAC, address,
/// route, resolver), root's authorized keys, and the SSH host keys (the
/// SSH server started again with them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Random bytes from the host (at least [`MIN_SEED`]).
    pub seed: Vec<u8>,
    /// The host's realtime clock in nanoseconds since the Unix epoch.
    pub unix_ns: i64,
    /// A DNS label.
    pub hostname: String,
    /// The VM's id (`/etc/banger/vm-id`).
    pub vm_id: String,
    /// 32 lowercase hex digits (`/etc/machine-id`).
    pub machine_id: String,
    /// The NIC to renew (`eth0`).
    pub device: String,
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its address with prefix length, `10.0.0.5/24`.
    pub address: String,
    /// The default gateway, if any.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The resolver, if any.
    #[serde(default)]
    pub dns: Option<String>,
    /// Root's authorized SSH keys (the file is replaced).
    pub authorized_keys: Vec<String>,
}

/// The fewest random bytes [`Identity::seed`] may carry.
pub const MIN_SEED: usize = 32;

/// What to run for [`Request::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The program and its arguments; the program is looked up on `PATH`.
    pub argv: Vec<String>,
    /// `NAME=value` entries added to the default environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Where to run; the user's home directory when absent.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Who runs it (a name or a numeric uid); root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a new terminal of this size instead of pipes.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal's size and type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// `TERM` for the process.
    #[serde(default)]
    pub term: Option<String>,
}

/// Every request's wire name, for telling an unknown request from a bad one.
pub const REQUEST_OPS: &[&str] = &[
    "health",
    "info",
    "wait_port",
    "shutdown",
    "sync_time",
    "exec",
    "signal",
    "resize",
    "connect",
    "mount",
    "renew",
];

impl Request {
    /// The request's wire name, for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Health => "health",
            Request::Info => "info",
            Request::WaitPort { .. } => "wait_port",
            Request::Shutdown { .. } => "shutdown",
            Request::SyncTime { .. } => "sync_time",
            Request::Exec(_) => "exec",
            Request::Signal { .. } => "signal",
            Request::Resize { .. } => "resize",
            Request::Connect { .. } => "connect",
            Request::Mount { .. } => "mount",
            Request::Renew(_) => "renew",
        }
    }
}

/// A reply as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The agent's [`PROTOCOL_VERSION`].
    pub v: u32,
    /// The id of the request this answers; 0 when the request was too
    /// broken to read one.
    pub id: u64,
    /// The answer.
    pub result: Result<Response, AgentError>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Health`].
    Health(Health),
    /// Answer to [`Request::Info`].
    Info(Box<Info>),
    /// Answer to [`Request::WaitPort`].
    PortReady {
        /// The port that is now listening.
        port: u16,
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// Answer to [`Request::Shutdown`]: the guest is going down.
    ShuttingDown {
        /// Whether it will come back.
        reboot: bool,
    },
    /// Answer to [`Request::SyncTime`].
    TimeSynced {
        /// How far the guest clock was off (host minus guest), in ns.
        offset_ns: i64,
    },
    /// Answer to [`Request::Exec`]: the process runs.
    ExecStarted {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Answer to [`Request::Connect`]: the connection is open.
    Connected,
    /// Answer to [`Request::Signal`].
    Signalled,
    /// Answer to [`Request::Resize`].
    Resized,
    /// Answer to [`Request::Mount`]: the share is mounted at the target
    /// (now, or already before).
    Mounted,
    /// Answer to [`Request::Renew`]: the guest has its new identity.
    Renewed {
        /// What was renewed, in order, with how long each took (ms).
        steps: Vec<(String, u64)>,
    },
}

/// Answer to [`Request::Health`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The agent's version (its crate version).
    pub agent_version: String,
    /// The highest protocol version the agent speaks.
    pub protocol: u32,
    /// Seconds since the guest booted.
    pub uptime_secs: f64,
    /// The guest's `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

/// Answer to [`Request::Info`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// `uname -m`.
    pub machine: String,
    /// The guest's hostname.
    pub hostname: String,
    /// `ID` from `/etc/os-release`, if any.
    pub os_id: Option<String>,
    /// `PRETTY_NAME` from `/etc/os-release`, if any.
    pub os_pretty_name: Option<String>,
    /// `MemTotal` in bytes.
    pub memory_total_bytes: u64,
    /// `MemAvailable` in bytes.
    pub memory_available_bytes: u64,
    /// Use of the filesystems that matter (`/` and `/root`).
    pub disks: Vec<DiskUsage>,
}

/// Space on one mounted filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// The mount point asked about.
    pub path: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What went wrong, for humans.
    pub message: String,
}

impl AgentError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The classes of failure a reply can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame was not a request (bad JSON, missing fields).
    BadFrame,
    /// The frame was over the size limit; it was skipped.
    FrameTooLarge,
    /// The request's protocol version is not spoken here.
    UnsupportedVersion,
    /// The request's `op` is not known to this agent.
    UnknownRequest,
    /// The request's arguments are out of range.
    InvalidArgument,
    /// The wait ran out.
    Timeout,
    /// The work itself failed.
    Failed,
    /// What the request names (a program, a user, a directory, a stream)
    /// does not exist in the guest.
    NotFound,
    /// An error kind newer than this build.
    #[serde(other)]
    Unknown,
}

/// Read a request from a frame payload, turning anything unreadable into
/// the error reply to send back (with the id, when one could be read).
pub fn parse_request(payload: &[u8]) -> Result<RequestEnvelope, (u64, AgentError)> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        (
            0,
            AgentError::new(ErrorKind::BadFrame, format!("frame is not JSON: {e}")),
        )
    })?;
    let id = value.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
    let Some(v) = value.get("v").and_then(|v| v.as_u64()) else {
        return Err((
            id,
            AgentError::new(ErrorKind::BadFrame, "request has no protocol version \"v\""),
        ));
    };
    if v != u64::from(PROTOCOL_VERSION) {
        return Err((
            id,
            AgentError::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported; this agent speaks {PROTOCOL_VERSION}"
                ),
            ),
        ));
    }
    if value.get("id").and_then(|v| v.as_u64()).is_none() {
        return Err((
            0,
            AgentError::new(ErrorKind::BadFrame, "request has no numeric \"id\""),
        ));
    }
    let op = value.get("op").and_then(|v| v.as_str()).map(str::to_owned);
    serde_json::from_value(value).map_err(|e| match op {
        Some(op) if !REQUEST_OPS.contains(&op.as_str()) => (
            id,
            AgentError::new(ErrorKind::UnknownRequest, format!("unknown request {op:?}")),
        ),
        Some(op) => (
            id,
            AgentError::new(ErrorKind::BadFrame, format!("bad {op} request: {e}")),
        ),
        None => (
            id,
            AgentError::new(ErrorKind::BadFrame, "request has no \"op\""),
        ),
    })
}

/// Serialize a request for the wire.
pub fn encode_request(id: u64, request: Request) -> Vec<u8> {
    let env = RequestEnvelope {
        v: PROTOCOL_VERSION,
        id,
        request,
    };
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(&env).unwrap_or_default()
}

/// Serialize a reply for the wire.
pub fn encode_response(id: u64, result: Result<Response, AgentError>) -> Vec<u8> {
    let env = ResponseEnvelope {
        v: PROTOCOL_VERSION,
        id,
        result,
    };
    serde_json::to_vec(&env).unwrap_or_default()
}

/// Read a reply from a frame payload.
pub fn parse_response(payload: &[u8]) -> Result<ResponseEnvelope, serde_json::Error> {
    serde_json::from_slice(payload)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Health,
            Request::Info,
            Request::WaitPort {
                port: 22,
                timeout_ms: 5000,
            },
            Request::Shutdown { reboot: true },
            Request::SyncTime { unix_ns: -5 },
            Request::Exec(ExecSpec {
                argv: vec!["ls".into(), "-l".into()],
                env: vec!["A=b".into()],
                workdir: Some("/tmp".into()),
                user: Some("nobody".into()),
                tty: Some(TtySize {
                    rows: 24,
                    cols: 80,
                    term: Some("xterm".into()),
                }),
            }),
            Request::Signal {
                stream: 4,
                signal: 2,
            },
            Request::Resize {
                stream: 4,
                rows: 1,
                cols: 2,
            },
            Request::Connect { port: 8080 },
            Request::Mount {
                tag: "share0".into(),
                target: "/mnt/share".into(),
                read_only: true,
            },
            Request::Renew(Box::new(Identity {
                seed: vec![7; MIN_SEED],
                unix_ns: 1,
                hostname: "web".into(),
                vm_id: "0123456789abcdef".into(),
                machine_id: "0".repeat(32),
                device: "eth0".into(),
                mac: "0a:b6:0a:00:00:02".into(),
                address: "10.0.0.2/24".into(),
                gateway: Some("10.0.0.1".into()),
                dns: None,
                authorized_keys: vec!["ssh-ed25519 AAAA me".into()],
            })),
        ] {
            assert!(
                REQUEST_OPS.contains(&req.op()),
                "{} is not in REQUEST_OPS",
                req.op()
            );
            let bytes = encode_request(9, req.clone());
            let env = parse_request(&bytes).unwrap();
            assert_eq!(env.id, 9);
            assert_eq!(env.request, req);
        }
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Response::TimeSynced { offset_ns: -7 },
            Response::Connected,
            Response::Mounted,
            Response::Renewed {
                steps: vec![("hostname".into(), 1)],
            },
        ] {
            let bytes = encode_response(9, Ok(reply.clone()));
            let env = parse_response(&bytes).unwrap();
            assert_eq!((env.id, env.result), (9, Ok(reply)));
        }
    }

    #[test]
    fn mount_wire_form_is_stable_and_read_only_defaults_to_false() {
        let bytes = encode_request(
            4,
            Request::Mount {
                tag: "work".into(),
                target: "/mnt/work".into(),
                read_only: false,
            },
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"v":1,"id":4,"op":"mount","tag":"work","target":"/mnt/work","read_only":false}"#
        );
        let env =
            parse_request(br#"{"v":1,"id":4,"op":"mount","tag":"work","target":"/w"}"#).unwrap();
        assert_eq!(
            env.request,
            Request::Mount {
                tag: "work".into(),
                target: "/w".into(),
                read_only: false,
            }
        );
        // A mount without a target is a bad mount request, not an unknown one.
        let (id, err) = parse_request(br#"{"v":1,"id":5,"op":"mount","tag":"work"}"#).unwrap_err();
        assert_eq!((id, err.kind), (5, ErrorKind::BadFrame), "{}", err.message);
        assert_eq!(
            String::from_utf8(encode_response(4, Ok(Response::Mounted))).unwrap(),
            r#"{"v":1,"id":4,"result":{"Ok":{"kind":"mounted"}}}"#
        );
    }

    #[test]
    fn wire_form_is_stable() {
        let bytes = encode_request(
            3,
            Request::WaitPort {
                port: 22,
                timeout_ms: 10,
            },
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"v":1,"id":3,"op":"wait_port","port":22,"timeout_ms":10}"#
        );
        let reply = encode_response(
            3,
            Ok(Response::PortReady {
                port: 22,
                waited_ms: 4,
            }),
        );
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            r#"{"v":1,"id":3,"result":{"Ok":{"kind":"port_ready","port":22,"waited_ms":4}}}"#
        );
    }

    #[test]
    fn bad_requests_get_typed_errors_with_the_id_when_known() {
        let cases: &[(&str, u64, ErrorKind)] = &[
            ("not json", 0, ErrorKind::BadFrame),
            (r#"{"id":4,"op":"health"}"#, 4, ErrorKind::BadFrame),
            (
                r#"{"v":2,"id":5,"op":"health"}"#,
                5,
                ErrorKind::UnsupportedVersion,
            ),
            (r#"{"v":1,"op":"health"}"#, 0, ErrorKind::BadFrame),
            (r#"{"v":1,"id":6,"op":"fly"}"#, 6, ErrorKind::UnknownRequest),
            (r#"{"v":1,"id":7}"#, 7, ErrorKind::BadFrame),
            (
                r#"{"v":1,"id":8,"op":"wait_port","port":70000,"timeout_ms":1}"#,
                8,
                ErrorKind::BadFrame,
            ),
        ];
        for (input, id, kind) in cases {
            let (got_id, err) = parse_request(input.as_bytes()).unwrap_err();
            assert_eq!((got_id, err.kind), (*id, *kind), "{input}: {}", err.message);
        }
    }

    #[test]
    fn fields_from_a_newer_host_are_ignored() {
        let env = parse_request(br#"{"v":1,"id":9,"op":"health","extra":1}"#).unwrap();
        assert_eq!(env.request, Request::Health);
    }

    #[test]
    fn unknown_error_kinds_from_a_newer_agent_still_parse() {
        let env = parse_response(
            br#"{"v":1,"id":1,"result":{"Err":{"kind":"brand_new","message":"m"}}}"#,
        )
        .unwrap();
        assert_eq!(env.result.unwrap_err().kind, ErrorKind::Unknown);
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn parse_request_never_panics_on_json_shapes(
            v in proptest::option::of(0u64..4),
            id in proptest::option::of(any::<u64>()),
            op in proptest::option::of(prop_oneof![
                proptest::sample::select(REQUEST_OPS).prop_map(str::to_owned),
                "[a-z_]{0,12}",
            ]),
            port in proptest::option::of(any::<i64>()),
            tag in proptest::option::of(".{0,40}"),
            target in proptest::option::of(".{0,40}"),
            read_only in proptest::option::of(any::<bool>()),
        ) {
            let known = op.as_deref().is_some_and(|op| REQUEST_OPS.contains(&op));
            let mut m = serde_json::Map::new();
            if let Some(v) = v { m.insert("v".into(), v.into()); }
            if let Some(id) = id { m.insert("id".into(), id.into()); }
            if let Some(op) = op { m.insert("op".into(), op.into()); }
            if let Some(port) = port { m.insert("port".into(), port.into()); m.insert("timeout_ms".into(), 1.into()); }
            if let Some(tag) = tag { m.insert("tag".into(), tag.into()); }
            if let Some(target) = target { m.insert("target".into(), target.into()); }
            if let Some(read_only) = read_only { m.insert("read_only".into(), read_only.into()); }
            let bytes = serde_json::to_vec(&serde_json::Value::Object(m)).unwrap();
            // A known request with bad arguments is a bad frame, never an
            // unknown request (which the host reads as "agent too old").
            if let Err((_, err)) = parse_request(&bytes) {
                prop_assert!(!(known && err.kind == ErrorKind::UnknownRequest), "{}", err.message);
            }
        }
    }
}
