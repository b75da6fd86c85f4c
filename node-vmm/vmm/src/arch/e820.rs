//! The guest memory map, shared by the PVH memmap and the Linux e820 table.

use super::layout;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Memory map for a guest with `mem_size` bytes of RAM.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        // EBDA (the MP table), VGA hole and BIOS area (ACPI, SMBIOS).
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in layout::ram_regions(mem_size) {
        let (start, size) = if start == 0 {
            (layout::HIMEM_START, size - layout::HIMEM_START)
        } else {
            (start, size)
        };
        map.push(E820Entry {
            addr: start,
            size,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_ram_and_reserves_bios_area() {
        let map = memory_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[2].addr + map[2].size, 128 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            (128 << 20) - (layout::HIMEM_START - layout::EBDA_START)
        );
    }
}
