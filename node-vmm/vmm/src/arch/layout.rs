//! Guest physical address map. Guests and docs/vmm.md rely on these values.

/// GDT used for the boot segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// Stack pointer handed to a 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6100;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6200;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for a 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: usable low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table starts here (floating pointer, then the configuration table).
pub const MPTABLE_START: u64 = EBDA_START;
/// ACPI tables live in the legacy BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = SMBIOS_START;
/// SMBIOS entry point and tables: the BIOS area, where Linux scans for them.
pub const SMBIOS_START: u64 = 0xf0000;
/// Start of high memory: kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends here; the rest of RAM goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// virtio-mmio devices, one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt lines of virtio devices start here (IOAPIC pins 16..23).
pub const VIRTIO_IRQ_BASE: u32 = 16;
pub const VIRTIO_MAX_DEVICES: usize = 8;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the VMX TSS and one for the identity map.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// ACPI `PM1a` event block (status 0x600, enable 0x602) and control block.
pub const PM1_EVT_PORT: u16 = 0x600;
pub const PM1_CNT_PORT: u16 = 0x604;
/// ACPI system control interrupt.
pub const SCI_IRQ: u32 = 9;
/// `SLP_TYP` value the DSDT advertises for S5 (soft off).
pub const S5_SLP_TYP: u8 = 5;
/// pvpanic: a guest write here reports a guest panic.
pub const PVPANIC_PORT: u16 = 0x505;
/// POST diagnostic port: accepted and ignored (guests use it as a no-op exit).
pub const POST_PORT: u16 = 0x80;

/// Guest RAM regions for a machine with `mem_size` bytes.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, mem_size - MMIO_HOLE_START)]
    }
}

/// Base address of virtio-mmio device number `index`.
pub fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

/// Interrupt line of virtio-mmio device number `index`.
pub fn virtio_irq(index: usize) -> u32 {
    VIRTIO_IRQ_BASE + index as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_hole_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn ram_above_hole_is_split_around_it() {
        let r = ram_regions(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_HOLE_START),
                (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
