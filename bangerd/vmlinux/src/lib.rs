//! Kernel image formats: recognise an ELF vmlinux or an x86 bzImage, and
//! extract the ELF vmlinux Firecracker needs from a bzImage.
//!
//! A bzImage is real-mode setup code, a boot-protocol header
//! (`Documentation/arch/x86/boot.rst`) and the protected-mode code, which
//! for a compressed kernel is a small decompressor followed by the
//! compressed vmlinux (`payload_offset`/`payload_length` in the header, since
//! protocol 2.08). The payload is gzip, xz, zstd or lz4 (the legacy lz4
//! framing) and is followed by trailing data (the build appends the
//! decompressed size), so every decoder here stops at the end of the first
//! stream.

mod decompress;
mod elf;

pub use elf::ElfInfo;

/// The largest vmlinux accepted (decompression bombs stop here).
pub const MAX_VMLINUX: u64 = 512 << 20;

/// Compression of a bzImage payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (deflate).
    Gzip,
    /// xz (LZMA2).
    Xz,
    /// Zstandard.
    Zstd,
    /// lz4, legacy framing.
    Lz4,
}

impl Compression {
    /// The short name, e.g. `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    /// Recognise a payload by its first bytes. `Err` names a known but
    /// unsupported format.
    fn detect(payload: &[u8]) -> Option<Result<Self, &'static str>> {
        const TABLE: &[(&[u8], Result<Compression, &str>)] = &[
            (&[0x1f, 0x8b], Ok(Compression::Gzip)),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Ok(Compression::Xz)),
            (&[0x28, 0xb5, 0x2f, 0xfd], Ok(Compression::Zstd)),
            (&[0x02, 0x21, 0x4c, 0x18], Ok(Compression::Lz4)),
            (b"BZh", Err("bzip2")),
            (&[0x5d, 0x00, 0x00], Err("lzma")),
            (&[0x89, b'L', b'Z', b'O'], Err("lzo")),
        ];
        TABLE
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|(_, c)| *c)
    }
}

/// Facts from a bzImage's boot-protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImageInfo {
    /// Boot protocol version, e.g. (2, 15).
    pub protocol: (u8, u8),
    /// The kernel version string, when the header points at one.
    pub version: Option<String>,
    /// Compression of the payload.
    pub compression: Compression,
    /// Byte range of the payload in the file.
    pub payload: std::ops::Range<usize>,
}

/// What a kernel file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// An ELF vmlinux.
    Elf(ElfInfo),
    /// An x86 bzImage.
    BzImage(BzImageInfo),
}

/// Why a kernel file was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither ELF nor bzImage.
    #[error(
        "not an ELF vmlinux or a bzImage (the file starts with {0}); pass the kernel's vmlinux or vmlinuz"
    )]
    UnknownFormat(String),
    /// A bzImage whose header does not make sense.
    #[error("bad bzImage header: {0}")]
    BadBzImage(String),
    /// A bzImage compressed with something banger cannot decompress.
    #[error(
        "the bzImage payload is {0}-compressed, which banger cannot decompress; use a kernel built with gzip, xz, zstd or lz4, or pass its vmlinux"
    )]
    UnsupportedCompression(&'static str),
    /// No payload found in a bzImage.
    #[error("no compressed payload found in the bzImage; pass the kernel's vmlinux instead")]
    NoPayload,
    /// Decompressing failed.
    #[error("decompressing the {compression} payload failed: {reason}")]
    Decompress {
        /// The payload's compression.
        compression: &'static str,
        /// Why.
        reason: String,
    },
    /// The result is over [`MAX_VMLINUX`].
    #[error("the decompressed kernel is over {} MiB; refusing it", MAX_VMLINUX >> 20)]
    TooLarge,
    /// An ELF that Firecracker's loader would refuse.
    #[error("the ELF kernel cannot be loaded: {0}")]
    BadElf(String),
}

/// Recognise `bytes` as an ELF vmlinux or a bzImage.
pub fn inspect(bytes: &[u8]) -> Result<KernelImage, Error> {
    if bytes.starts_with(b"\x7fELF") {
        return Ok(KernelImage::Elf(elf::parse(bytes)));
    }
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        return bzimage(bytes).map(KernelImage::BzImage);
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(Error::UnknownFormat(if head.is_empty() {
        "nothing (it is empty)".to_owned()
    } else {
        head.join(" ")
    }))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn bzimage(b: &[u8]) -> Result<BzImageInfo, Error> {
    let bad = |m: &str| Error::BadBzImage(m.to_owned());
    let setup_sects = match b.get(0x1f1).copied().ok_or_else(|| bad("file too short"))? {
        0 => 4,
        n => usize::from(n),
    };
    let protocol = u16_at(b, 0x206).ok_or_else(|| bad("file too short"))?;
    let protocol = ((protocol >> 8) as u8, protocol as u8);
    let pm_start = (setup_sects + 1) * 512;
    if pm_start >= b.len() {
        return Err(bad("the setup code runs past the end of the file"));
    }
    let version = u16_at(b, 0x20e)
        .filter(|&p| p != 0)
        .and_then(|p| b.get(usize::from(p) + 0x200..))
        .and_then(|s| {
            let end = s.iter().take(256).position(|&c| c == 0)?;
            let text = std::str::from_utf8(&s[..end]).ok()?;
            text.split_whitespace().next().map(str::to_owned)
        });

    let declared = if protocol >= (2, 8) {
        let off = u32_at(b, 0x248).unwrap_or(0) as usize;
        let len = u32_at(b, 0x24c).unwrap_or(0) as usize;
        (len > 0).then_some((pm_start.saturating_add(off), len))
    } else {
        None
    };
    let payload = match declared {
        Some((start, len)) => {
            let end = start
                .checked_add(len)
                .filter(|&e| e <= b.len())
                .ok_or_else(|| bad("payload_offset/payload_length point outside the file"))?;
            start..end
        }
        // Old protocol: look for a known compression magic in the
        // protected-mode code.
        None => {
            let start = (pm_start..b.len().saturating_sub(4))
                .find(|&i| matches!(Compression::detect(&b[i..]), Some(Ok(_))))
                .ok_or(Error::NoPayload)?;
            start..b.len()
        }
    };
    let compression = match Compression::detect(&b[payload.clone()]) {
        Some(Ok(c)) => c,
        Some(Err(name)) => return Err(Error::UnsupportedCompression(name)),
        None => return Err(Error::NoPayload),
    };
    Ok(BzImageInfo {
        protocol,
        version,
        compression,
        payload,
    })
}

/// The ELF vmlinux in `bytes`: returned as is (after checking it) for an
/// ELF, decompressed from the payload for a bzImage. Either way the result
/// is an ELF that Firecracker's x86-64 loader accepts.
pub fn extract_vmlinux(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let out = match inspect(bytes)? {
        KernelImage::Elf(info) => {
            info.check_firecracker()?;
            return Ok(bytes.to_vec());
        }
        KernelImage::BzImage(bz) => decompress::decompress(bz.compression, &bytes[bz.payload])?,
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(Error::BadElf(
            "the bzImage payload did not decompress to an ELF file".to_owned(),
        ));
    }
    elf::parse(&out).check_firecracker()?;
    Ok(out)
}

#[cfg(test)]
mod tests;
