//! The few ELF facts a VMM's kernel loader depends on.

use crate::Error;

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;

/// Facts about an ELF file, and whether Firecracker would load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// ELFCLASS64.
    pub class64: bool,
    /// Little-endian.
    pub little_endian: bool,
    /// `e_type` (2 is ET_EXEC).
    pub elf_type: u16,
    /// `e_machine` (62 is x86-64).
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// How many PT_LOAD segments there are.
    pub load_segments: usize,
    /// Why Firecracker's x86-64 loader would refuse it, if it would.
    pub problem: Option<String>,
}

impl ElfInfo {
    /// `Ok` when Firecracker's x86-64 loader accepts the file.
    pub fn check_firecracker(&self) -> Result<(), Error> {
        match &self.problem {
            None => Ok(()),
            Some(p) => Err(Error::BadElf(p.clone())),
        }
    }
}

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Read the header and program headers of an ELF file (which starts with
/// the ELF magic); never fails, but records what is wrong in `problem`.
pub fn parse(b: &[u8]) -> ElfInfo {
    let mut info = ElfInfo {
        class64: b.get(4) == Some(&2),
        little_endian: b.get(5) == Some(&1),
        elf_type: 0,
        machine: 0,
        entry: 0,
        load_segments: 0,
        problem: None,
    };
    if !info.class64 {
        info.problem = Some("it is a 32-bit ELF; Firecracker needs an ELF64 x86-64 vmlinux".into());
        return info;
    }
    if !info.little_endian {
        info.problem = Some("it is a big-endian ELF; Firecracker needs x86-64".into());
        return info;
    }
    let (Some(elf_type), Some(machine), Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (
        u16le(b, 16),
        u16le(b, 18),
        u64le(b, 24),
        u64le(b, 32),
        u16le(b, 54),
        u16le(b, 56),
    ) else {
        info.problem = Some("the ELF header is truncated".into());
        return info;
    };
    info.elf_type = elf_type;
    info.machine = machine;
    info.entry = entry;
    if machine != EM_X86_64 {
        info.problem = Some(format!("its machine is {machine}, not x86-64 (62)"));
        return info;
    }
    if elf_type != ET_EXEC {
        info.problem = Some(format!(
            "its type is {elf_type}, not an executable (ET_EXEC)"
        ));
        return info;
    }
    if phnum == 0 || usize::from(phentsize) < 56 {
        info.problem = Some("it has no program headers".into());
        return info;
    }
    let table_end = u64::from(phnum)
        .checked_mul(u64::from(phentsize))
        .and_then(|n| n.checked_add(phoff));
    if table_end.is_none_or(|end| end > b.len() as u64) {
        info.problem = Some("its program headers run past the end of the file".into());
        return info;
    }
    for i in 0..usize::from(phnum) {
        let at = phoff as usize + i * usize::from(phentsize);
        let (Some(p_type), Some(offset), Some(filesz)) =
            (u32le(b, at), u64le(b, at + 8), u64le(b, at + 32))
        else {
            info.problem = Some("a program header is truncated".into());
            return info;
        };
        if p_type != PT_LOAD {
            continue;
        }
        info.load_segments += 1;
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > b.len() as u64)
        {
            info.problem = Some(format!(
                "PT_LOAD segment {i} (offset {offset:#x}, {filesz} bytes) runs past the end of the file"
            ));
            return info;
        }
    }
    if info.load_segments == 0 {
        info.problem = Some("it has no PT_LOAD segment".into());
    }
    info
}
