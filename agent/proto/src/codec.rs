//! Framing: every message is a 4-byte big-endian length followed by that
//! many bytes of JSON.
//!
//! The decoder never gives up on a stream because of one bad frame: a
//! length over [`MAX_FRAME_LEN`] yields [`Frame::Oversized`] and the
//! payload is skipped as it arrives, so the peer can answer with an error
//! and go on reading the next frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The largest payload either side accepts (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

const HEADER_LEN: usize = 4;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete payload.
    Data(Bytes),
    /// A frame announced `len` bytes, more than [`MAX_FRAME_LEN`]; its
    /// payload is being discarded.
    Oversized(u64),
}

/// The length-delimited codec both sides use.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// Bytes of an oversized payload still to drop.
    discarding: u64,
}

impl FrameCodec {
    /// A codec at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget any partial state, e.g. after the peer reconnected to a
    /// virtio-serial port and the byte stream started over.
    pub fn reset(&mut self) {
        self.discarding = 0;
    }
}

/// Errors the codec itself can return; only I/O, since bad frames are
/// reported as [`Frame::Oversized`] or left to the message layer.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading or writing the transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The caller tried to send a payload over the limit.
    #[error("message of {0} bytes is over the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if self.discarding > 0 {
            let n = usize::try_from(self.discarding)
                .unwrap_or(usize::MAX)
                .min(src.len());
            src.advance(n);
            self.discarding -= n as u64;
            if self.discarding > 0 {
                return Ok(None);
            }
        }
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME_LEN {
            src.advance(HEADER_LEN);
            self.discarding = len as u64;
            // Drop what is already buffered now, the rest as it arrives.
            let n = self.discarding.min(src.len() as u64) as usize;
            src.advance(n);
            self.discarding -= n as u64;
            return Ok(Some(Frame::Oversized(len as u64)));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(Frame::Data(src.split_to(len).freeze())))
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
        if item.len() > MAX_FRAME_LEN {
            return Err(CodecError::TooLarge(item.len()));
        }
        dst.reserve(HEADER_LEN + item.len());
        dst.put_u32(item.len() as u32);
        dst.extend_from_slice(item);
        Ok(())
    }
}

impl Encoder<Vec<u8>> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Vec<u8>, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(item.as_slice(), dst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(payloads: &[Vec<u8>]) -> BytesMut {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        for p in payloads {
            codec.encode(p.as_slice(), &mut buf).unwrap();
        }
        buf
    }

    /// Feed `bytes` to a fresh decoder in chunks of `chunk` bytes.
    fn decode_chunked(bytes: &[u8], chunk: usize) -> Vec<Frame> {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn round_trips_frames() {
        let payloads = vec![b"{}".to_vec(), Vec::new(), vec![7; 1000]];
        let frames = decode_chunked(&encode(&payloads), 3);
        let want: Vec<Frame> = payloads
            .into_iter()
            .map(|p| Frame::Data(Bytes::from(p)))
            .collect();
        assert_eq!(frames, want);
    }

    #[test]
    fn oversized_frame_is_reported_skipped_and_the_stream_goes_on() {
        let mut bytes = ((MAX_FRAME_LEN + 10) as u32).to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0xAA, MAX_FRAME_LEN + 10));
        bytes.extend_from_slice(&encode(&[b"next".to_vec()]));
        for chunk in [1 << 16, 4096, MAX_FRAME_LEN * 2] {
            let frames = decode_chunked(&bytes, chunk);
            assert_eq!(
                frames,
                vec![
                    Frame::Oversized((MAX_FRAME_LEN + 10) as u64),
                    Frame::Data(Bytes::from_static(b"next"))
                ],
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn refuses_to_send_oversized() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let big = vec![0; MAX_FRAME_LEN + 1];
        assert!(matches!(
            codec.encode(big.as_slice(), &mut buf),
            Err(CodecError::TooLarge(_))
        ));
        assert!(buf.is_empty());
    }

    proptest! {
        #[test]
        fn any_chunking_round_trips(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            chunk in 1usize..64,
        ) {
            let frames = decode_chunked(&encode(&payloads), chunk);
            let want: Vec<Frame> = payloads.into_iter().map(|p| Frame::Data(Bytes::from(p))).collect();
            prop_assert_eq!(frames, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..128) {
            let frames = decode_chunked(&bytes, chunk);
            // Every frame consumed at least its 4-byte header.
            prop_assert!(frames.len() * HEADER_LEN <= bytes.len());
        }
    }
}
