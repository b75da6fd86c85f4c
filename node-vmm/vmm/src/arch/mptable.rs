//! The Intel `MultiProcessor` table (MP specification 1.4, chapter 4): a
//! floating pointer at the start of the EBDA and the configuration table
//! right after it.
//!
//! Linux prefers the ACPI MADT and ignores the table's content when ACPI is
//! on, but it still looks for the table early in `setup_arch`, and the
//! search is what costs: `smp_scan_config` remaps the remaining area for
//! every 16-byte step of the first KiB, the EBDA's KiB and the 64 KiB BIOS
//! area. Without a table that is ~6,000 fixmap remaps and TLB flushes, five
//! seconds of guest time under a software KVM (docs/vmm.md, "Linux early
//! boot"). With the table in the EBDA the search ends at its first step.
//! The content mirrors the MADT, so a kernel booted with `acpi=off` sees the
//! same machine.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_START: u64 = layout::MPTABLE_START;
/// The table must end before the ACPI tables.
const MPTABLE_LIMIT: u64 = layout::ACPI_START;

const SPEC_REV: u8 = 4; // MP specification 1.4
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
/// ISA interrupts routed through the IOAPIC (IRQ 0 goes to pin 2, as the
/// MADT's interrupt source override says).
const ISA_IRQS: u8 = 16;
const ISA_BUS_ID: u8 = 0;

/// Entry types (MP spec table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types (MP spec table 4-8).
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Local interrupt destinations: every local APIC.
const ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table for {cpus} vCPUs needs {len} bytes at {start:#x}, past the ACPI tables at {limit:#x}", start = MPTABLE_START, limit = MPTABLE_LIMIT)]
    TooBig { cpus: u8, len: usize },
    #[error("cannot write the MP table to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id: after the processors' (ids must be unique in the table).
fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// The configuration table's entries, in the order the specification asks:
/// processors, buses, IOAPICs, I/O interrupts, local interrupts.
fn entries(cpus: u8) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        e.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): what the
        // spec asks for; Linux reads both from CPUID instead.
        e.extend_from_slice(&0x600u32.to_le_bytes());
        e.extend_from_slice(&0x201u32.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    e.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    e.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    e.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // The 8259 cascade on pin 0, then ISA IRQ n on pin n (IRQ 0 on pin 2).
    let mut io = |kind: u8, irq: u8, pin: u8| {
        e.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, ISA_BUS_ID, irq, ioapic, pin]);
        count += 1;
    };
    io(INT_EXTINT, 0, 0);
    for irq in 0..ISA_IRQS {
        match irq {
            0 => io(INT_VECTORED, 0, 2),
            2 => {}
            _ => io(INT_VECTORED, irq, irq),
        }
    }
    // LINT0 from the 8259, LINT1 as NMI, as `regs::setup_lapic` wires them.
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        e.extend_from_slice(&[
            ENTRY_LOCAL_INTERRUPT,
            kind,
            0,
            0,
            ISA_BUS_ID,
            0,
            ALL_LAPICS,
            lint,
        ]);
        count += 1;
    }
    (e, count)
}

/// The floating pointer and the configuration table, as they go at
/// `MPTABLE_START`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    let (body, count) = entries(cpus);
    debug_assert_eq!(
        body.len(),
        usize::from(cpus) * PROCESSOR_LEN + (usize::from(count) - usize::from(cpus)) * ENTRY_LEN
    );
    let table_len = HEADER_LEN + body.len();
    let total = FLOATING_LEN + table_len;
    if MPTABLE_START + total as u64 > MPTABLE_LIMIT {
        return Err(MptableError::TooBig { cpus, len: total });
    }
    let table_at = MPTABLE_START + FLOATING_LEN as u64;

    let mut fp = Vec::with_capacity(FLOATING_LEN);
    fp.extend_from_slice(b"_MP_");
    // The config table is below 1 MiB: the u32 cannot truncate.
    fp.extend_from_slice(&(table_at as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut t = Vec::with_capacity(table_len);
    t.extend_from_slice(b"PCMP");
    // At most 64 vCPUs (config::MAX_CPUS): well under 64 KiB.
    let len16 = u16::try_from(table_len).map_err(|_| MptableError::TooBig { cpus, len: total })?;
    t.extend_from_slice(&len16.to_le_bytes());
    t.extend_from_slice(&[SPEC_REV, 0]);
    t.extend_from_slice(b"KUBEVMM ");
    t.extend_from_slice(b"KUBEVMM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&layout::LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // no extended entries
    t.extend_from_slice(&body);
    t[7] = checksum(&t);

    fp.extend_from_slice(&t);
    Ok(fp)
}

/// Writes the MP table into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    mem.write_slice(&build(cpus)?, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    /// Walks the configuration table the way Linux's `smp_read_mpc` does.
    fn walk(t: &[u8]) -> Vec<u8> {
        let mut kinds = Vec::new();
        let mut off = HEADER_LEN;
        while off < t.len() {
            let kind = t[off];
            kinds.push(kind);
            off += if kind == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                ENTRY_LEN
            };
        }
        assert_eq!(off, t.len(), "entries end exactly at the table's length");
        kinds
    }

    #[test]
    fn floating_pointer_and_table_check_out_for_every_cpu_count() {
        for cpus in [1u8, 2, 8, crate::config::MAX_CPUS] {
            let b = build(cpus).unwrap();
            let (fp, t) = b.split_at(FLOATING_LEN);
            assert_eq!(&fp[..4], b"_MP_");
            assert!(sums_to_zero(fp), "floating pointer checksum, {cpus} cpus");
            assert_eq!((fp[8], fp[9]), (1, SPEC_REV));
            let ptr = u32::from_le_bytes(fp[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), MPTABLE_START + FLOATING_LEN as u64);
            assert_eq!(&t[..4], b"PCMP");
            let len = u16::from_le_bytes(t[4..6].try_into().unwrap());
            assert_eq!(usize::from(len), t.len());
            assert!(sums_to_zero(t), "table checksum, {cpus} cpus");
            let count = u16::from_le_bytes(t[34..36].try_into().unwrap());
            let kinds = walk(t);
            assert_eq!(usize::from(count), kinds.len());
            assert!(
                kinds.windows(2).all(|w| w[0] <= w[1]),
                "entries in type order"
            );
            assert_eq!(
                kinds.iter().take_while(|k| **k == ENTRY_PROCESSOR).count(),
                usize::from(cpus)
            );
            assert!(MPTABLE_START + b.len() as u64 <= MPTABLE_LIMIT);
        }
    }

    #[test]
    fn only_the_first_processor_is_the_bsp_and_the_ioapic_id_is_unique() {
        let b = build(4).unwrap();
        let t = &b[FLOATING_LEN..];
        let cpus: Vec<&[u8]> = (0..4)
            .map(|i| &t[HEADER_LEN + i * PROCESSOR_LEN..][..PROCESSOR_LEN])
            .collect();
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BSP);
        assert!(cpus[1..].iter().all(|c| c[3] == CPU_ENABLED));
        let ioapic = &t[HEADER_LEN + 4 * PROCESSOR_LEN + ENTRY_LEN..][..ENTRY_LEN];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert!(cpus.iter().all(|c| c[1] != ioapic[1]));
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            layout::IOAPIC_ADDR
        );
    }

    #[test]
    fn irq0_goes_to_pin_2_like_the_madt_override() {
        let b = build(1).unwrap();
        let t = &b[FLOATING_LEN..];
        let io: Vec<&[u8]> = t[HEADER_LEN + PROCESSOR_LEN..]
            .chunks(ENTRY_LEN)
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .collect();
        let vectored = |irq: u8| {
            io.iter()
                .find(|e| e[1] == INT_VECTORED && e[5] == irq)
                .map(|e| e[7])
        };
        assert_eq!(vectored(0), Some(2));
        assert_eq!(vectored(2), None);
        assert_eq!(vectored(4), Some(4), "COM1");
        assert_eq!(vectored(9), Some(9), "SCI");
    }
}
