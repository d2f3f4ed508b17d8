//! Payload decoders. Each stops at the end of its first stream and caps
//! the output at [`MAX_VMLINUX`].

use std::io::Read;

use crate::{Compression, Error, MAX_VMLINUX};

/// Legacy lz4 framing: this magic, then `[u32 LE size][block]` repeated.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Blocks of the legacy format decompress to at most 8 MiB.
const LZ4_BLOCK: usize = 8 << 20;

fn failed(c: Compression, reason: impl ToString) -> Error {
    Error::Decompress {
        compression: c.name(),
        reason: reason.to_string(),
    }
}

/// Read all of `r`, refusing more than [`MAX_VMLINUX`] bytes.
fn read_capped(c: Compression, r: impl Read) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    r.take(MAX_VMLINUX + 1)
        .read_to_end(&mut out)
        .map_err(|e| failed(c, e))?;
    if out.len() as u64 > MAX_VMLINUX {
        return Err(Error::TooLarge);
    }
    Ok(out)
}

/// Decompress one payload.
pub fn decompress(c: Compression, payload: &[u8]) -> Result<Vec<u8>, Error> {
    match c {
        Compression::Gzip => read_capped(c, flate2::read::GzDecoder::new(payload)),
        Compression::Xz => read_capped(c, liblzma::read::XzDecoder::new(payload)),
        Compression::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(payload)
                .map_err(|e| failed(c, e))?
                .single_frame();
            read_capped(c, d)
        }
        Compression::Lz4 => lz4_legacy(payload),
    }
}

fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let c = Compression::Lz4;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            payload.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    if word(0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(failed(c, "missing the legacy lz4 magic"));
    }
    // The worst case of compressing one 8 MiB block.
    let max_block = LZ4_BLOCK + LZ4_BLOCK / 255 + 16;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_BLOCK];
    let mut at = 4;
    while let Some(size) = word(at) {
        let size = size as usize;
        // The stream ends at EOF, at another stream's magic, or at a word
        // that cannot be a block size (the build's appended length).
        if size == LZ4_LEGACY_MAGIC as usize || size == 0 || size > max_block {
            break;
        }
        let Some(data) = payload.get(at + 4..at + 4 + size) else {
            break;
        };
        let n = lz4_flex::block::decompress_into(data, &mut block).map_err(|e| failed(c, e))?;
        out.extend_from_slice(&block[..n]);
        if out.len() as u64 > MAX_VMLINUX {
            return Err(Error::TooLarge);
        }
        at += 4 + size;
    }
    if out.is_empty() {
        return Err(failed(c, "the stream holds no blocks"));
    }
    Ok(out)
}
