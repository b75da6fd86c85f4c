//! x86-64 machine description: address map, CPUID, registers, memory map,
//! and the tables firmware would leave: ACPI, MP, SMBIOS.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod irq;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod smbios;
