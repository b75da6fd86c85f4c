//! x86-64 machine description: address map, CPUID, registers, memory map, ACPI.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod irq;
pub mod layout;
pub mod regs;
