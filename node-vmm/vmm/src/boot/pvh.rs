//! PVH boot: `hvm_start_info` with memory map, command line, RSDP and initrd
//! module (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootSpec;
use crate::arch::{e820, layout};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the start info, memmap and module list.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    initrd: Option<(u64, u64)>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let map = e820::memory_map(spec.mem_size);
    for (i, e) in map.iter().enumerate() {
        let mut entry = [0u8; 24];
        entry[0..8].copy_from_slice(&e.addr.to_le_bytes());
        entry[8..16].copy_from_slice(&e.size.to_le_bytes());
        entry[16..20].copy_from_slice(&e.kind.to_le_bytes());
        mem.write_slice(
            &entry,
            GuestAddress(layout::PVH_MEMMAP_START + i as u64 * 24),
        )?;
    }
    let mut nr_modules = 0u32;
    if let Some((addr, size)) = initrd {
        let mut m = [0u8; 32];
        m[0..8].copy_from_slice(&addr.to_le_bytes());
        m[8..16].copy_from_slice(&size.to_le_bytes());
        mem.write_slice(&m, GuestAddress(layout::PVH_MODLIST_START))?;
        nr_modules = 1;
    }
    let mut info = [0u8; 56];
    info[0..4].copy_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1: has memmap
    info[12..16].copy_from_slice(&nr_modules.to_le_bytes());
    info[16..24].copy_from_slice(&layout::PVH_MODLIST_START.to_le_bytes());
    info[24..32].copy_from_slice(&layout::CMDLINE_START.to_le_bytes());
    info[32..40].copy_from_slice(&spec.rsdp_addr.to_le_bytes());
    info[40..48].copy_from_slice(&layout::PVH_MEMMAP_START.to_le_bytes());
    info[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    mem.write_slice(&info, GuestAddress(layout::PVH_INFO_START))
}
