//! Byte streams over the agent connection (protocol version 1, additive).
//!
//! A stream is opened by a request that says so ([`crate::Request::Exec`]);
//! its id is that request's id. Its bytes then travel as binary frames
//! inside the same length-delimited framing as the JSON messages. A JSON
//! payload always starts with `{`; a stream frame starts with its tag:
//!
//! | tag | layout after the tag | meaning |
//! | --- | --- | --- |
//! | `D` | id (u64 BE), channel (u8), bytes | data on a channel; no bytes means end of that channel |
//! | `C` | id (u64 BE), channel (u8), n (u32 BE) | the receiver took `n` more bytes of that channel |
//! | `X` | id (u64 BE), how (u8: 0 exit code, 1 signal), value (i32 BE) | the process ended; the stream is over |
//!
//! Flow control is per channel and per direction: a sender may have at
//! most [`WINDOW`] bytes of a channel sent and not yet acknowledged by a
//! `C` frame; a receiver acknowledges bytes once it has passed them on.
//! A peer that sends past the window breaks the protocol and loses the
//! stream. So a slow reader of one stream holds up only that stream, and
//! a connection that carries many streams (a virtio-serial port carries
//! every stream of a VM) never buffers more than a window per channel.
//!
//! An agent too old to know `Exec` answers it with
//! [`crate::ErrorKind::UnknownRequest`] and never sees a stream frame.

use serde::{Deserialize, Serialize};

/// Bytes of one channel a sender may have in flight.
pub const WINDOW: u32 = 256 * 1024;

/// The largest data frame a sender makes.
pub const CHUNK: usize = 32 * 1024;

const HEADER: usize = 1 + 8 + 1;

/// A channel of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Host to guest: the process's standard input (or the terminal's keys).
    Stdin,
    /// Guest to host: standard output (or the terminal's output).
    Stdout,
    /// Guest to host: standard error (not used with a terminal).
    Stderr,
}

impl Channel {
    /// The channel's number on the wire.
    pub fn number(self) -> u8 {
        match self {
            Channel::Stdin => 0,
            Channel::Stdout => 1,
            Channel::Stderr => 2,
        }
    }

    /// The channel numbered `n`.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            0 => Some(Channel::Stdin),
            1 => Some(Channel::Stdout),
            2 => Some(Channel::Stderr),
            _ => None,
        }
    }

    /// Index into per-channel tables.
    pub fn index(self) -> usize {
        usize::from(self.number())
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal of this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// One binary frame of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// Bytes on a channel; empty means the channel ended.
    Data {
        /// The stream.
        id: u64,
        /// The channel.
        channel: Channel,
        /// The bytes.
        bytes: bytes::Bytes,
    },
    /// The peer passed on `n` more bytes of `channel`.
    Credit {
        /// The stream.
        id: u64,
        /// The channel.
        channel: Channel,
        /// How many bytes.
        n: u32,
    },
    /// The process ended.
    Exit {
        /// The stream.
        id: u64,
        /// How.
        status: ExitStatus,
    },
}

/// Why a payload is not a stream frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its tag's layout.
    #[error("stream frame {tag:?} is {len} bytes, too short")]
    Short {
        /// The tag.
        tag: char,
        /// Its length.
        len: usize,
    },
    /// An unknown tag.
    #[error("unknown stream frame tag {0:#04x}")]
    Tag(u8),
    /// An unknown channel number.
    #[error("unknown stream channel {0}")]
    Channel(u8),
    /// A data frame over [`CHUNK`] bytes.
    #[error("data frame of {0} bytes is over the {CHUNK}-byte limit")]
    TooLarge(usize),
    /// An exit frame with an unknown kind.
    #[error("unknown exit kind {0}")]
    ExitKind(u8),
}

/// Whether `payload` is a JSON message rather than a stream frame.
pub fn is_json(payload: &[u8]) -> bool {
    payload.first() == Some(&b'{')
}

fn id_of(p: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[1..9]);
    u64::from_be_bytes(b)
}

impl StreamFrame {
    /// The stream the frame belongs to.
    pub fn id(&self) -> u64 {
        match self {
            StreamFrame::Data { id, .. }
            | StreamFrame::Credit { id, .. }
            | StreamFrame::Exit { id, .. } => *id,
        }
    }

    /// The frame as a payload for [`crate::codec::FrameCodec`].
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StreamFrame::Data { id, channel, bytes } => {
                let mut out = Vec::with_capacity(HEADER + bytes.len());
                out.push(b'D');
                out.extend_from_slice(&id.to_be_bytes());
                out.push(channel.number());
                out.extend_from_slice(bytes);
                out
            }
            StreamFrame::Credit { id, channel, n } => {
                let mut out = Vec::with_capacity(HEADER + 4);
                out.push(b'C');
                out.extend_from_slice(&id.to_be_bytes());
                out.push(channel.number());
                out.extend_from_slice(&n.to_be_bytes());
                out
            }
            StreamFrame::Exit { id, status } => {
                let mut out = Vec::with_capacity(HEADER + 4);
                out.push(b'X');
                out.extend_from_slice(&id.to_be_bytes());
                let (how, value) = match status {
                    ExitStatus::Code(c) => (0u8, *c),
                    ExitStatus::Signal(s) => (1u8, *s),
                };
                out.push(how);
                out.extend_from_slice(&value.to_be_bytes());
                out
            }
        }
    }

    /// Read a stream frame from a payload that is not JSON.
    pub fn decode(payload: &bytes::Bytes) -> Result<StreamFrame, FrameError> {
        let Some(&tag) = payload.first() else {
            return Err(FrameError::Short { tag: ' ', len: 0 });
        };
        let short = || FrameError::Short {
            tag: char::from(tag),
            len: payload.len(),
        };
        let need = match tag {
            b'D' => HEADER,
            b'C' | b'X' => HEADER + 4,
            other => return Err(FrameError::Tag(other)),
        };
        if payload.len() < need {
            return Err(short());
        }
        let id = id_of(payload);
        let value = |p: &[u8]| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&p[HEADER..HEADER + 4]);
            b
        };
        match tag {
            b'D' => {
                let channel =
                    Channel::from_number(payload[9]).ok_or(FrameError::Channel(payload[9]))?;
                let bytes = payload.slice(HEADER..);
                if bytes.len() > CHUNK {
                    return Err(FrameError::TooLarge(bytes.len()));
                }
                Ok(StreamFrame::Data { id, channel, bytes })
            }
            b'C' => {
                if payload.len() != need {
                    return Err(short());
                }
                let channel =
                    Channel::from_number(payload[9]).ok_or(FrameError::Channel(payload[9]))?;
                Ok(StreamFrame::Credit {
                    id,
                    channel,
                    n: u32::from_be_bytes(value(payload)),
                })
            }
            _ => {
                if payload.len() != need {
                    return Err(short());
                }
                let v = i32::from_be_bytes(value(payload));
                let status = match payload[9] {
                    0 => ExitStatus::Code(v),
                    1 => ExitStatus::Signal(v),
                    k => return Err(FrameError::ExitKind(k)),
                };
                Ok(StreamFrame::Exit { id, status })
            }
        }
    }
}

/// What the caller of `vm exec` sends besides stdin on the socket bangerd
/// hands it (JSON frames; stdin travels as `D` frames of stream 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Deliver a signal to the process (its process group).
    Signal {
        /// The signal number.
        signal: i32,
    },
    /// The terminal changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// What bangerd sends the caller of `vm exec` instead of an exit frame
/// when the stream broke (a JSON frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broken {
    /// Why.
    pub error: String,
}

/// Counts the bytes of one channel in flight against [`WINDOW`], on the
/// receiving side: [`Inflow::receive`] refuses bytes past the window.
#[derive(Debug, Default)]
pub struct Inflow {
    pending: std::sync::atomic::AtomicU64,
}

impl Inflow {
    /// `n` bytes arrived; false when that is past the window (the sender
    /// broke the protocol).
    pub fn receive(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.pending.fetch_add(n as u64, Ordering::AcqRel);
        before + n as u64 <= u64::from(WINDOW)
    }

    /// `n` bytes were passed on; returns the credit to grant.
    pub fn passed_on(&self, n: usize) -> u32 {
        use std::sync::atomic::Ordering;
        let n = n.min(WINDOW as usize) as u64;
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
        n as u32
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            StreamFrame::Data {
                id: 7,
                channel: Channel::Stderr,
                bytes: Bytes::from_static(b"hello"),
            },
            StreamFrame::Data {
                id: u64::MAX,
                channel: Channel::Stdin,
                bytes: Bytes::new(),
            },
            StreamFrame::Credit {
                id: 1,
                channel: Channel::Stdout,
                n: WINDOW,
            },
            StreamFrame::Exit {
                id: 2,
                status: ExitStatus::Signal(9),
            },
            StreamFrame::Exit {
                id: 3,
                status: ExitStatus::Code(-1),
            },
        ] {
            let bytes = Bytes::from(f.encode());
            assert!(!is_json(&bytes));
            assert_eq!(StreamFrame::decode(&bytes).unwrap(), f);
        }
    }

    #[test]
    fn wire_form_is_stable() {
        let f = StreamFrame::Credit {
            id: 258,
            channel: Channel::Stdin,
            n: 5,
        };
        assert_eq!(f.encode(), b"C\0\0\0\0\0\0\x01\x02\0\0\0\0\x05".to_vec());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let cases: &[(&[u8], FrameError)] = &[
            (b"", FrameError::Short { tag: ' ', len: 0 }),
            (b"Q123456789", FrameError::Tag(b'Q')),
            (b"D1234", FrameError::Short { tag: 'D', len: 5 }),
            (b"D12345678\x03", FrameError::Channel(3)),
            (
                b"C12345678\x01\0\0\0\x01\x00",
                FrameError::Short { tag: 'C', len: 15 },
            ),
            (b"X12345678\x02\0\0\0\x01", FrameError::ExitKind(2)),
        ];
        for (input, want) in cases {
            assert_eq!(
                StreamFrame::decode(&Bytes::copy_from_slice(input)).unwrap_err(),
                *want
            );
        }
        let mut big = b"D12345678\x01".to_vec();
        big.extend(std::iter::repeat_n(0, CHUNK + 1));
        assert_eq!(
            StreamFrame::decode(&Bytes::from(big)).unwrap_err(),
            FrameError::TooLarge(CHUNK + 1)
        );
    }

    #[test]
    fn inflow_refuses_past_the_window() {
        let f = Inflow::default();
        assert!(f.receive(WINDOW as usize));
        assert_eq!(f.passed_on(100), 100);
        assert!(f.receive(100));
        assert!(!f.receive(1));
    }

    #[test]
    fn controls_parse() {
        let c: Control = serde_json::from_str(r#"{"op":"resize","rows":24,"cols":80}"#).unwrap();
        assert_eq!(c, Control::Resize { rows: 24, cols: 80 });
        assert!(serde_json::from_str::<Control>(r#"{"op":"shutdown"}"#).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StreamFrame::decode(&Bytes::from(bytes));
        }
    }
}
