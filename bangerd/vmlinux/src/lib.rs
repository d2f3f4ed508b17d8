//! Kernel image formats: recognise an ELF vmlinux or an x86 bzImage and
//! extract the ELF payload of a bzImage for Firecracker.
