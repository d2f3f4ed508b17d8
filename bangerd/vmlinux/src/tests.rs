#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

/// A small ELF64 x86-64 executable with `segments` PT_LOAD segments.
fn elf(segments: u16, payload: usize) -> Vec<u8> {
    let phoff = 64usize;
    let total = phoff + 56 * usize::from(segments) + payload;
    let mut f = b"\x7fELF\x02\x01\x01\x00".to_vec();
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&62u16.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0x100_0000u64.to_le_bytes());
    f.extend_from_slice(&(phoff as u64).to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, segments, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for i in 0..u64::from(segments) {
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        let addr = 0x100_0000 + i * 0x20_0000;
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&(total as u64).to_le_bytes());
        f.extend_from_slice(&(total as u64).to_le_bytes());
        f.extend_from_slice(&0x1000u64.to_le_bytes());
    }
    // Compressible but not trivial content.
    f.extend((0..payload).map(|i| (i % 251) as u8 ^ (i / 4096) as u8));
    f
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::stream::encode_all(data, 3).unwrap(),
        Compression::Lz4 => {
            let mut out = 0x184C_2102u32.to_le_bytes().to_vec();
            for chunk in data.chunks(8 << 20) {
                let block = lz4_flex::block::compress(chunk);
                out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
            }
            out
        }
    }
}

/// A fake bzImage: 4 setup sectors + header, 512 bytes of "decompressor",
/// then `payload`, the kernel build's appended size word, and `trailer`.
fn bzimage(payload: &[u8], decompressed_len: usize, trailer: &[u8], protocol: u16) -> Vec<u8> {
    let setup_sects = 4usize;
    let pm_start = (setup_sects + 1) * 512;
    let mut f = vec![0u8; pm_start];
    f[0x1f1] = setup_sects as u8;
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
    // Version string at 0x300 (pointer is relative to 0x200).
    f[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
    let v = b"6.1.0-test-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
    f[0x300..0x300 + v.len()].copy_from_slice(v);
    let decompressor = 512usize;
    let mut blob = payload.to_vec();
    blob.extend_from_slice(&(decompressed_len as u32).to_le_bytes());
    f[0x248..0x24c].copy_from_slice(&(decompressor as u32).to_le_bytes());
    f[0x24c..0x250].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    f.extend(std::iter::repeat_n(0x90, decompressor));
    f.extend_from_slice(&blob);
    f.extend_from_slice(trailer);
    f
}

const ALL: [Compression; 4] = [
    Compression::Gzip,
    Compression::Xz,
    Compression::Zstd,
    Compression::Lz4,
];

#[test]
fn every_compression_round_trips_with_trailing_data() {
    let vmlinux = elf(2, 300_000);
    for c in ALL {
        let image = bzimage(
            &compress(c, &vmlinux),
            vmlinux.len(),
            b"TRAILING GARBAGE",
            0x020f,
        );
        match inspect(&image).unwrap() {
            KernelImage::BzImage(bz) => {
                assert_eq!(bz.compression, c);
                assert_eq!(bz.protocol, (2, 15));
                assert_eq!(bz.version.as_deref(), Some("6.1.0-test-cloud-amd64"));
            }
            other => panic!("{c:?}: {other:?}"),
        }
        assert_eq!(extract_vmlinux(&image).unwrap(), vmlinux, "{}", c.name());
    }
}

#[test]
fn lz4_with_several_blocks() {
    let vmlinux = elf(1, (8 << 20) + 12345);
    let image = bzimage(
        &compress(Compression::Lz4, &vmlinux),
        vmlinux.len(),
        b"",
        0x020f,
    );
    assert_eq!(extract_vmlinux(&image).unwrap(), vmlinux);
}

#[test]
fn old_protocol_payload_is_found_by_scanning() {
    let vmlinux = elf(1, 10_000);
    let mut image = bzimage(
        &compress(Compression::Gzip, &vmlinux),
        vmlinux.len(),
        b"",
        0x0206,
    );
    image[0x248..0x250].fill(0);
    assert_eq!(extract_vmlinux(&image).unwrap(), vmlinux);
}

#[test]
fn an_elf_is_accepted_as_is() {
    let vmlinux = elf(1, 100);
    match inspect(&vmlinux).unwrap() {
        KernelImage::Elf(info) => {
            assert_eq!(info.load_segments, 1);
            assert_eq!(info.entry, 0x100_0000);
            info.check_firecracker().unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(extract_vmlinux(&vmlinux).unwrap(), vmlinux);
}

#[test]
fn bad_inputs_get_the_right_errors() {
    let vmlinux = elf(1, 1000);
    let err = |bytes: &[u8]| extract_vmlinux(bytes).unwrap_err();

    assert!(matches!(err(b""), Error::UnknownFormat(_)));
    let e = err(b"#!/bin/sh\necho hi\n");
    assert!(e.to_string().contains("23 21 2f 62"), "{e}");

    let mut short = bzimage(
        &compress(Compression::Gzip, &vmlinux),
        vmlinux.len(),
        b"",
        0x020f,
    );
    short.truncate(0x300);
    assert!(
        matches!(err(&short), Error::BadBzImage(_)),
        "{}",
        err(&short)
    );

    let mut outside = bzimage(
        &compress(Compression::Gzip, &vmlinux),
        vmlinux.len(),
        b"",
        0x020f,
    );
    outside[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(err(&outside), Error::BadBzImage(m) if m.contains("outside")));

    let bz2 = bzimage(b"BZh91AY&SY....", 0, b"", 0x020f);
    assert!(matches!(err(&bz2), Error::UnsupportedCompression("bzip2")));
    let lzma = bzimage(&[0x5d, 0, 0, 0x80, 0], 0, b"", 0x020f);
    assert!(matches!(err(&lzma), Error::UnsupportedCompression("lzma")));

    let unknown = bzimage(b"\x00\x01\x02\x03\x04", 0, b"", 0x020f);
    assert!(matches!(err(&unknown), Error::NoPayload));

    let not_elf = bzimage(
        &compress(Compression::Zstd, b"just text, no kernel"),
        20,
        b"",
        0x020f,
    );
    assert!(
        matches!(err(&not_elf), Error::BadElf(m) if m.contains("did not decompress to an ELF"))
    );

    let corrupt = {
        let mut p = compress(Compression::Xz, &vmlinux);
        let mid = p.len() / 2;
        p[mid] ^= 0xff;
        bzimage(&p, vmlinux.len(), b"", 0x020f)
    };
    assert!(
        matches!(
            err(&corrupt),
            Error::Decompress {
                compression: "xz",
                ..
            }
        ),
        "{}",
        err(&corrupt)
    );

    let mut elf32 = vmlinux.clone();
    elf32[4] = 1;
    assert!(matches!(err(&elf32), Error::BadElf(m) if m.contains("32-bit")));
    let mut arm = vmlinux.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(matches!(err(&arm), Error::BadElf(m) if m.contains("183")));
    let mut dynamic = vmlinux.clone();
    dynamic[16..18].copy_from_slice(&3u16.to_le_bytes());
    assert!(matches!(err(&dynamic), Error::BadElf(m) if m.contains("ET_EXEC")));
    let mut beyond = vmlinux.clone();
    beyond[64 + 32..64 + 40].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(err(&beyond), Error::BadElf(m) if m.contains("PT_LOAD")));
    let mut no_load = vmlinux.clone();
    no_load[64..68].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(err(&no_load), Error::BadElf(m) if m.contains("no PT_LOAD")));
    let truncated = &vmlinux[..40];
    assert!(matches!(err(truncated), Error::BadElf(_)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = inspect(&bytes);
        let _ = extract_vmlinux(&bytes);
    }

    #[test]
    fn mutated_images_never_panic(
        which in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let vmlinux = elf(1, 4000);
        let mut image = bzimage(&compress(ALL[which], &vmlinux), vmlinux.len(), b"tail", 0x020f);
        for (at, byte) in flips {
            let i = at.index(image.len());
            image[i] = byte;
        }
        let _ = inspect(&image);
        let _ = extract_vmlinux(&image);
        let mut elf = vmlinux.clone();
        let i = (image.len() + 7) % elf.len();
        elf[i] ^= 0x5a;
        let _ = extract_vmlinux(&elf);
    }
}

/// The Debian cloud kernel from `scripts/build-test-kernel` (or
/// `BANGER_TEST_VMLINUZ`): a bzImage (lz4 in Debian 12's current kernels,
/// zstd in older ones) whose vmlinux `readelf` accepts.
#[test]
fn real_debian_kernel() {
    let path = std::env::var_os("BANGER_TEST_VMLINUZ")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("BANGER_ARTIFACTS").map(|d| PathBuf::from(d).join("kernel/vmlinuz"))
        })
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/guest/kernel/vmlinuz")
        });
    assert!(
        path.exists(),
        "{} is missing: run `sudo scripts/build-test-kernel` or set BANGER_TEST_VMLINUZ",
        path.display()
    );
    let bytes = std::fs::read(&path).unwrap();
    let KernelImage::BzImage(bz) = inspect(&bytes).unwrap() else {
        panic!("{} is not a bzImage", path.display());
    };
    assert!(
        bz.version.as_deref().unwrap_or("").starts_with("6.1"),
        "{:?}",
        bz.version
    );
    let start = std::time::Instant::now();
    let vmlinux = extract_vmlinux(&bytes).unwrap();
    eprintln!(
        "{}: {} bytes, {} payload -> vmlinux {} bytes in {:?}",
        path.display(),
        bytes.len(),
        bz.compression.name(),
        vmlinux.len(),
        start.elapsed()
    );
    let KernelImage::Elf(info) = inspect(&vmlinux).unwrap() else {
        panic!("not an ELF");
    };
    info.check_firecracker().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmlinux");
    std::fs::write(&file, &vmlinux).unwrap();
    let out = std::process::Command::new("readelf")
        .args(["-h", "-l", "-W"])
        .arg(&file)
        .output()
        .expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "ELF64",
        "Advanced Micro Devices X86-64",
        "EXEC (Executable file)",
        "LOAD",
    ] {
        assert!(text.contains(want), "readelf lacks {want:?}:\n{text}");
    }
    let entry = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Entry point address:"))
        .map(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap())
        .unwrap();
    assert_eq!(entry, info.entry);
    let loads = text
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .count();
    assert_eq!(loads, info.load_segments);
}
